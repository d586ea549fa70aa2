"""`workbench info`: what model would run, how big it is, its token geometry and attention backend; with
--checkpoint, what a weights file holds (its entries, their sizes, which model config each fits)."""

from __future__ import annotations

import argparse

HELP = ("show a model's config, parameter count, token geometry and attention backend, or what a checkpoint "
        "holds")

EPILOG = """\
examples:
  workbench info                                   # the embedded default (the zoo's DMD student)
  workbench info --model teacher                   # another model of the embedded zoo: its weights, its sampler
  workbench info --preset wan2.1-t2v-1.3b          # built on the meta device: no weights needed
  workbench info --wan-dir wan_models/Wan2.1-T2V-1.3B --frames 21 --height 480 --width 832
  workbench info --checkpoint checkpoints/self_forcing_dmd.pt  # what it holds, which config it fits
"""

# the attributes a GAN critic adds to its Wan DiT (saved in its state dict beside the DiT's keys; the researchers'
# names, training/gan.py): a critic with them is still a Wan DiT of its size
GAN_BRANCH = ("_register_tokens", "_gan_ca_blocks", "_cls_pred_branch")


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--wan-dir", metavar="DIR", help="the official Wan2.1 folder (reads config.json only)")
    src.add_argument("--preset", help="a built-in size: wan2.1-t2v-1.3b, wan2.1-t2v-14b, tiny")
    src.add_argument("--model", metavar="NAME", help="a model of the embedded zoo: teacher, df, ode, dmd (the "
                                                     "default), sid; says which weights and sampler it runs with")
    p.add_argument("--frames", type=int, default=21, help="latent frames (default: %(default)s)")
    p.add_argument("--height", type=int, help="pixel height (default: the model's own size: 96 for the embedded "
                                              "default, config.json's video_size, else 480)")
    p.add_argument("--width", type=int, help="pixel width (default: 128 for the embedded default, config.json's "
                                             "video_size, else 832)")
    p.add_argument("--num-frame-per-block", type=int, default=3, help="frames per chunk (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="device whose attention backend to report (default: cuda if available)")
    p.add_argument("--checkpoint", metavar="FILE",
                   help="a weights file (a Self-Forcing .pt, a state dict, .safetensors): list its entries, tensor "
                        "and parameter counts, dtypes and the model size their shapes say, and whether each fits "
                        "the --wan-dir or --preset config (without them: the built-in sizes and the embedded "
                        "default); reads tensor shapes, not values")
    p.add_argument("--trust-pickle", action="store_true", help="allow a checkpoint that needs full unpickling")
    p.set_defaults(func=run)


def describe(config, *, frames: int, height: int, width: int, nfpb: int, device: str) -> str:
    import torch

    from models.common.attention_kernels import describe as backend_name
    from models.wan.config import VideoGeometry, latent_size
    from models.wan.model import WanModel

    with torch.device("meta"):
        model = WanModel(config, causal=True)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(model.state_dict())
    lh, lw = latent_size(height, width, config)
    geo = VideoGeometry(num_frames=frames, latent_height=lh, latent_width=lw, num_frame_per_block=nfpb)
    fsl = config.tokens_per_frame(geo.latent_height, geo.latent_width)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kv_layer = 2 * frames * fsl * config.dim * 2  # bytes: bf16 keys and values of every frame, one layer
    rows = [
        ("dim / ffn_dim", f"{config.dim} / {config.ffn_dim}"),
        ("layers x heads x head_dim", f"{config.num_layers} x {config.num_heads} x {config.head_dim}"),
        ("RoPE channels (t, h, w)", str(list(config.rope_split))),
        ("text", f"{config.text_len} tokens x {config.text_dim}"),
        ("parameters", f"{n_params:,} in {n_tensors} state-dict tensors"),
        ("video", f"{geo.pixel_frames} frames of {height}x{width} px -> {frames} latent frames of "
                  f"{geo.latent_height}x{geo.latent_width}"),
        ("tokens", f"{fsl} per frame, {fsl * frames} in all, {fsl * nfpb} per chunk of {nfpb} frames "
                   f"({geo.num_chunks} chunks)"),
        ("KV cache (global)", f"{frames * fsl} tokens per layer, {_size(kv_layer)} of keys and values per layer in "
                              f"bf16, {_size(kv_layer * config.num_layers)} over the {config.num_layers} layers"
                              + (f" (twice that in float32, the dtype on {device})" if dtype != torch.bfloat16
                                 else "")),
        ("attention window", "global" if config.local_attn_size == -1
         else f"{config.local_attn_size} frames, sink {config.sink_size}"),
        ("attention backend", f"{backend_name(device, dtype)} on {device}"),
    ]
    width_ = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width_}}  {v}" for k, v in rows)


def describe_checkpoint(path: str, configs: dict, trust_pickle: bool = False, wan_dir: str | None = None,
                        asked: str | None = None) -> str:
    """What the weights file at `path` holds: per state dict in it (a Self-Forcing .pt's generator, generator_ema,
    critic; a bare state dict's top level) its tensor and parameter counts and dtypes, then the model size its
    shapes say and which of `configs` ({label: WanConfig}) it fits, key for key and shape for shape (`asked`: the
    config the user named, said first); then the extract commands that load it (with `wan_dir`, the folder the
    asked config came from). Other entries (an optimiser's state) are counted, not fitted."""
    import re
    from collections import Counter
    from pathlib import Path

    import torch

    from models.files import load_tensors
    from models.wan.checkpoint import from_diffusers, strip_prefixes
    from models.wan.model import WanModel
    from workbench.progress import shell_word
    from workbench.weights import check_weights_args

    check_weights_args(path, False, trust_pickle=trust_pickle)  # (a folder, a missing or damaged file: one line)
    head = f"checkpoint: {path} ({_size(Path(path).stat().st_size)})"
    shard = re.search(r"-(\d+)-of-(\d+)\.safetensors$", Path(path).name)
    if shard:  # (its tensors are some of a model's: no size or fit to say)
        return (f"{head}\n  shard {int(shard.group(1))} of {int(shard.group(2))} of a model split over files: the "
                f"model is its folder,\n  --wan-dir {shell_word(str(Path(path).parent))}")
    # shapes and dtypes only: a .safetensors file's header (tensors on the meta device), a .pt memory-mapped
    blob = _safetensors_header(path) if Path(path).suffix == ".safetensors" else \
        load_tensors(path, trust_pickle=trust_pickle)
    if not isinstance(blob, dict):
        return f"{head}\n  a {type(blob).__name__}, not a state dict or a dict of them"
    bare = bool(blob) and all(isinstance(v, torch.Tensor) for v in blob.values())
    entries = {"(top level)": blob} if bare else {str(k): v for k, v in blob.items() if isinstance(v, dict)}
    others = [] if bare else sorted(f"{k} {v}" if isinstance(v, int) and not isinstance(v, bool) else str(k)
                                    for k, v in blob.items() if not isinstance(v, dict))  # (a step: its number)
    shapes, sizes = {}, {}  # each config's {name: shape}, and its size line
    for label, config in configs.items():
        with torch.device("meta"):
            sd = WanModel(config, causal=True).state_dict()
        shapes[label], sizes[label] = {k: tuple(v.shape) for k, v in sd.items()}, _model_size(sd)
    lines = [head + (": a bare state dict" if bare else "")]
    saved = re.fullmatch(r"checkpoint_model_(\d+)", Path(path).resolve().parent.name)
    if saved and (Path(path).resolve().parent / "training_state.pt").is_file():  # (a training run's: its step)
        lines.append(f"  saved by a training run at train step {int(saved.group(1))} (training_state.pt beside it "
                     "resumes the run)")
    width = max([len(k) for k in entries] + [5])
    fitting = {}  # entry -> the configs it fits
    critics = set()  # entries with a GAN discriminator's branch: a critic, no generator to load
    for name, sd in entries.items():
        flat = {k: v for k, v in strip_prefixes(sd).items() if isinstance(v, torch.Tensor)}
        gan = {k: v for k, v in flat.items() if k.split(".")[0] in GAN_BRANCH}
        flat = {k: v for k, v in flat.items() if k not in gan}
        if any(k.startswith("condition_embedder.") for k in flat):
            flat = from_diffusers(flat)
        nested = _tensors(sd)
        params = sum(v.numel() for v in nested)
        dtypes = ", ".join(str(d).removeprefix("torch.") for d, _ in Counter(v.dtype for v in nested).most_common())
        lines.append(f"  {name:<{width}}  {len(nested)} tensors, {params:,} parameters ({dtypes or '-'})")
        got = {k: tuple(v.shape) for k, v in flat.items()}
        fits = fitting[name] = [label for label, want in shapes.items() if want == got]
        size = _model_size(flat)
        if len(flat) + len(gan) < len(nested):
            verdict = "nested state (an optimiser's, say), not model weights"
        elif not nested:
            verdict = "no tensors"
        elif not size:
            verdict = "not a Wan DiT state dict (no blocks.N.self_attn / ffn tensors)"
        elif asked and asked not in fits:
            verdict = f"{size}: does not fit {asked}"
            if fits:
                verdict += f"; fits {' and '.join(fits)}"
            elif sizes[asked] == size:  # (its size: which tensors differ)
                verdict += _mismatch(shapes[asked], flat)
        elif fits:
            verdict = f"{size}: fits {' and '.join(fits)}"
        elif near := [label for label in sizes if sizes[label] == size]:  # (a tensor missing, extra or re-shaped)
            verdict = f"{size}: the size of {near[0]}, but not its tensors{_mismatch(shapes[near[0]], flat)}"
        else:
            verdict = (f"{size}: fits none of the built-in sizes (give --wan-dir the folder it belongs to, to "
                       "check it there)")
        if gan and size:
            critics.add(name)
            verdict += (f"; with a GAN discriminator's branch ({len(gan)} tensors: "
                        f"{', '.join(p for p in GAN_BRANCH if any(k.split('.')[0] == p for k in gan))})")
        lines.append(f"  {'':<{width}}  {verdict}")
    if not entries:
        lines.append("  no state dict in it")
    if others:
        lines.append(f"  other entries: {', '.join(others[:10])}{' ...' if len(others) > 10 else ''}")
    main = next((k for k in ("generator", "model", "generator_ema", "(top level)") if k in entries), None)
    fits = fitting.get(main, [])
    if main is None or not fits:
        return "\n".join(lines)
    if main in critics:
        lines.append("a GAN critic's weights (a Wan DiT with a discriminator's branch): no generator to load; a GAN "
                     "run's\n         checkpoint holds its generator beside it")
        return "\n".join(lines)
    command = (f"workbench extract --checkpoint {shell_word(str(path))}"  # (an EMA-only file: its EMA, by name)
               f"{' --use-ema' if main == 'generator_ema' else ''}{' --trust-pickle' if trust_pickle else ''}")
    if asked in fits and wan_dir:  # the folder the user named
        lines.append(f"load it: {command} --wan-dir {shell_word(wan_dir)}")
    elif "the embedded default" in fits:  # (extract's default folder)
        lines.append(f"load it: {command}")
    else:
        lines.append(f"load it: {command} --wan-dir WAN_DIR\n         (WAN_DIR: the Wan2.1 folder of {fits[0]})")
    if main != "generator_ema" and "generator_ema" in entries:
        lines.append("its EMA weights (generator_ema): the same with --use-ema")
    if main == "(top level)":
        lines.append("         (a bare state dict is read as the generator; it can also be a Wan folder's\n"
                     "         diffusion_pytorch_model.safetensors, beside its config.json)")
    return "\n".join(lines)


def _mismatch(want: dict, flat: dict) -> str:
    """' (missing: ...; unexpected: ...; wrong shape: ...)': how a state dict's tensors differ from a config's
    {name: shape}; '' when they agree."""
    from models.errors import WeightsMismatchError
    from models.files import check_tensor_shapes

    try:
        check_tensor_shapes(want, flat, "")
    except WeightsMismatchError as e:
        return " " + str(e).strip()
    return ""


def _safetensors_header(path) -> dict:
    """{name: an empty tensor on the meta device of the file's shape and dtype} from a .safetensors header."""
    import torch
    from safetensors import safe_open

    from models.errors import CheckpointError

    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            return {k: torch.empty(s.get_shape(), dtype=dtypes.get(s.get_dtype(), torch.uint8), device="meta")
                    for k, s in slices.items()}
    except Exception as err:
        raise CheckpointError(f"cannot read safetensors file {str(path)!r}: {err}") from err


def _tensors(x) -> list:
    """Every tensor in x, however deep in dicts and lists (an optimiser state nests them)."""
    import torch

    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def _model_size(sd: dict) -> str:
    """'Wan DiT, 30 layers, width 1536, FFN 8960' from a Wan state dict's shapes, or '' for another dict."""
    from models.wan.checkpoint import weights_size

    size = weights_size(sd)
    return "" if size is None else "Wan DiT, {} layers, width {}, FFN {}".format(*size)


def run(args) -> int:
    import torch

    from models.family import WAN, family_of
    from models.wan.config import PRESETS, default_video_size, preset
    from models.wan.embedded import require_embedded_dir
    from workbench.commands import check_frames
    from workbench.inputs import check_device

    check_frames(args.frames)
    if args.model and args.checkpoint:
        from workbench.errors import WorkbenchError

        raise WorkbenchError(f"--model {args.model} names a model of the embedded zoo and --checkpoint a file to "
                             "read: give one of them")
    if args.checkpoint:
        from pathlib import Path

        from models.wan.embedded import EMBEDDED_DIR

        configs = dict(PRESETS)  # (and the embedded default's, where this install has data/embedded and it is not
        # the folder asked for: "fits data/embedded and the embedded default" named one folder twice)
        if EMBEDDED_DIR.is_dir() and not (args.wan_dir and Path(args.wan_dir).resolve() == EMBEDDED_DIR.resolve()):
            configs = {"the embedded default": family_of(EMBEDDED_DIR).read_config(EMBEDDED_DIR), **configs}
        asked = args.preset or args.wan_dir
        if args.wan_dir:
            configs = {args.wan_dir: family_of(args.wan_dir).read_config(args.wan_dir), **configs}
        print(describe_checkpoint(args.checkpoint, configs, args.trust_pickle, args.wan_dir, asked))
        if not (args.preset or args.wan_dir):
            return 0  # (the model table below: of the config given with it)
    if args.preset:
        config, name = preset(args.preset), args.preset
    else:
        folder = args.wan_dir or require_embedded_dir()
        config = family_of(folder).read_config(folder)
        name = folder if args.wan_dir else zoo_model_lines(args.model)
    own_h, own_w = WAN.video_size if args.preset else default_video_size(args.wan_dir or require_embedded_dir())
    height = own_h if args.height is None else args.height
    width = own_w if args.width is None else args.width
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))  # (the backend is the GPU's)
    print(f"model: {name}")
    if args.wan_dir:
        from models.wan.folder import wan_parts

        parts = wan_parts(args.wan_dir)
        print(f"layout: {parts.layout} (DiT {parts.dit}, text encoder {parts.text_encoder}, tokenizer "
              f"{parts.tokenizer}, VAE {parts.vae})")
    print(describe(config, frames=args.frames, height=height, width=width, nfpb=args.num_frame_per_block,
                   device=device))
    return 0


def zoo_model_lines(name: str | None) -> str:
    """The zoo model `name` (None: the default) in words: what it is, its weights, its sampler; a clear error for a
    name the zoo lacks or a model the embedded folder does not hold."""
    import os

    from models.wan.embedded import EMBEDDED_DIR, pick

    def shown(path) -> str:  # (relative to the working directory where it is inside it, as the user would type it)
        rel = os.path.relpath(path)
        return path if rel.startswith("..") else rel

    entry = pick(name, False)
    if entry is None:  # (a folder before the zoo ships its students)
        return (f"embedded default: the DiT of {shown(str(EMBEDDED_DIR))} under the causal few-step sampler (the "
                "zoo's students are not in it)")
    weights = f"{shown(str(EMBEDDED_DIR))} (config, text encoder, VAE" + (
        ", DiT)" if entry.checkpoint is None else
        f") + {shown(str(entry.checkpoint_path()))} ({'generator_ema' if entry.use_ema else 'generator'})")
    steps = ("" if entry.sampler == "causal_few_step" else
             f", {entry.num_inference_steps} steps, CFG {entry.guidance_scale:g}")
    return (f"{entry.name}{' (the embedded default)' if name is None else ''} - {entry.description}\n"
            f"weights: {weights}\nsampler: {entry.sampler}{steps}")


def _size(n_bytes: float) -> str:
    """'5.62 GiB', '192 MiB', '504 KiB': the largest unit that keeps the number 1 or more."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            v = n_bytes / scale
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"
    return f"{n_bytes:.0f} B"
