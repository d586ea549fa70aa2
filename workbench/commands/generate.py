"""`workbench generate`: latents, an mp4 and a PNG grid per prompt and seed.

prompts --text encoder--> context --sampler (few-step causal | multi-step causal CFG | bidirectional)-->
latents [F, 16, h, w] --VAE (streamed chunk by chunk)--> 1 + 4 (F - 1) frames --> mp4 (16 fps) + PNG grid
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.commands import (ATTENTION_KERNELS, PROMPT_HELP, add_chunk_arguments, add_model_arguments,
                                add_schedule_arguments, add_size_arguments, latent_frames)

if TYPE_CHECKING:  # (the CLI imports torch only once a command runs)
    import torch

    from workbench.extract import Plan as CapturePlan

HELP = "generate videos (latents, mp4, PNG grid) from prompts"

EPILOG = """\
examples:
  workbench generate --prompt "a blue circle moving up"             # the embedded default (Self-Forcing DMD)
  workbench generate --prompt "a blue circle moving up" --model teacher     # the toy 'Wan' teacher
  workbench generate --prompts prompts.txt --seed 0-3 --wan-dir wan_models/Wan2.1-T2V-1.3B \\
      --checkpoint checkpoints/self_forcing_dmd.pt --use-ema --out videos/sf_dmd
  workbench generate --prompt "..." --sampler bidirectional --wan-dir wan_models/Wan2.1-T2V-1.3B   # Wan baseline
  workbench generate --prompt "a red square moving left" --image first.png   # image-to-video, 19 frames
  workbench generate --prompt "a green square moving right" --live --layers 0-5 --out runs/live &  # meanwhile:
  workbench view runs/live --wait                                   # frames and attention, chunk by chunk
  torchrun --nproc_per_node=8 -m workbench.cli generate --prompts prompts.txt --wan-dir ... --out videos/x
                                                       # prompts dealt over 8 GPUs, the same file names

Writes, per prompt index P and seed S, into --out: pPPPP-sS.safetensors (latents [F, 16, h, w] under
"latents"; its metadata records the prompt, seed, sampler, checkpoint, use_ema, the weights' sha256, the text
encoder, schedule, window, image and dtype (docs/store.md "Generated videos"), which `workbench view` checks against a
store's before it shows the video beside the store's attention),
pPPPP-sS.mp4 (16 fps; needs the video extra: pip install -e ".[video]") and pPPPP-sS.png (a grid of every 5th
frame). With less than 40 GB of free GPU memory the text encoder leaves the GPU before the DiT is loaded
(low-memory mode).
With --live, each chunk's decoded frames and attention (attn_mass of --layers, --heads, --steps, captured as
`workbench extract` does; the latents stay bitwise the same) also go into --out as the chunk finishes:
live.json and pPPPP-sS.live/chunk-CCC.npz, which `workbench view OUT` shows while the run goes on and after.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", metavar="TEXT",
                     help=PROMPT_HELP)
    src.add_argument("--prompts", metavar="FILE", help="a prompt file, one prompt per line")
    p.add_argument("--seed", "--seeds", default="0", help="seed(s): 0, 0-3 or 1,2,3 (default: %(default)s)")
    p.add_argument("--image", metavar="PATH",
                   help="image-to-video: the image (resized to the video's size) is encoded by the VAE as latent "
                        "frame 0, a chunk of its own (implies --independent-first-frame: 19 frames by default), "
                        "and the rollout continues from it; with every prompt")
    add_chunk_arguments(p)
    add_size_arguments(p)
    p.add_argument("--sampler", choices=["causal_few_step", "causal_multi_step_cfg", "bidirectional"], metavar="NAME",
                   help="causal_few_step, causal_multi_step_cfg or bidirectional; default: the --model's "
                        "(causal_few_step for the students, bidirectional for the teacher); "
                        "causal_few_step for --wan-dir, with or without --checkpoint (as the researchers' "
                        "extraction runs the base weights)")
    p.add_argument("--num-inference-steps", type=int, help="multi-step samplers (default: the --model's, else 50)")
    p.add_argument("--guidance-scale", type=float, help="multi-step samplers (default: the --model's, else 5.0)")
    p.add_argument("--negative-prompt", help="for the CFG samplers (default: \"\", what the zoo was trained with)")
    p.add_argument("--local-attn-size", type=int, help="KV window in latent frames (default: -1, global)")
    p.add_argument("--sink-size", type=int, help="sink frames kept in the KV cache (default: 0)")
    add_schedule_arguments(p.add_argument_group("schedule (the researchers' inference config)"))
    add_model_arguments(p)
    p.add_argument("--low-memory", choices=["auto", "on", "off"], default="auto",
                   help="move the text encoder off the GPU before the rollout (auto: < 40 GB free)")
    p.add_argument("--attention-kernel", default="auto", choices=ATTENTION_KERNELS, metavar="KERNEL",
                   help="the DiT's attention kernel: auto (on H100/H200 the Gluon FlashAttention-3-style forward, "
                        "the one `workbench extract` captures from by default; flash-attn / cuDNN / SDPA elsewhere), "
                        "triton (the Gluon forward on H100/H200, a frame-tiled Triton forward on other GPUs), "
                        "cudnn-balanced (cuDNN on a wave-balanced schedule) or cudnn (one cuDNN call per "
                        "attention); outputs differ between kernels by bf16 rounding (default: %(default)s)")
    speed = p.add_argument_group("speed (bench/RESULTS.md: time saved on an H200, change to the latents)")
    speed.add_argument("--compile", nargs="?", const="default", choices=["default", "max-autotune-no-cudagraphs"],
                       metavar="MODE", help="torch.compile every DiT block (the first rollout compiles; CUDA-graph "
                                            "replay stays on); MODE default or max-autotune-no-cudagraphs "
                                            "(models/wan/accel.py)")
    speed.add_argument("--fp8", nargs="?", const="rowwise", choices=["rowwise", "tensor"], metavar="SCALES",
                       help="the blocks' linear layers in float8 (e4m3) with rowwise (default) or per-tensor scales, "
                            "via torch._scaled_mm; CUDA needs --dtype bfloat16 (the default there)")
    p.add_argument("--no-video", action="store_true", help="latents only (no VAE decode)")
    p.add_argument("--vae-decoder", default="auto", choices=["auto", "reference", "fast"],
                   help="the VAE decoder: reference (diffusers' modules) or fast (channels-last, CUDA graphs, narrow "
                        "convolutions as 2D temporal taps; frames differ from reference by float rounding; on the CPU "
                        "it decodes the embedded default's 81 frames ~4x faster); auto: $WORKBENCH_VAE_DECODER, else "
                        "fast on CUDA and reference on the CPU (default: %(default)s)")
    p.add_argument("--out", default="runs/generate", help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of another run in --out that have this run's names (p<prompt>-s<seed>); "
                        "without it such a run is refused before any work")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    live = p.add_argument_group("live view (watch the run with `workbench view OUT`)")
    live.add_argument("--live", action="store_true",
                      help="write each finished chunk's frames and attention into --out for `workbench view`")
    live.add_argument("--layers", help="with --live: layers to capture: 3, 0-29, 0,4,8 or all (default: all)")
    live.add_argument("--heads", help="with --live: heads to capture (default: all)")
    live.add_argument("--steps", help="with --live: steps of the per-chunk schedule, e.g. 0 or 0-4 (default: all)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Under torchrun (WORLD_SIZE > 1) each rank runs its share of the (prompt, seed) samples, dealt as
    `workbench extract` deals them, and writes them under the names a single-process run gives them."""
    from workbench.extract import _dist

    rank, world, initialised = _dist()
    locks = []  # the output folder's lock, taken by rank 0 once every check has passed
    try:
        return _run(args, rank, world, locks)
    finally:
        for lock in locks:
            lock.release()
        if initialised:
            import torch.distributed as dist

            dist.destroy_process_group()


def _whole(path: Path) -> bool:
    """A video file a resumed run keeps: there, and for an mp4 complete (one a full disk cut short is made again)."""
    from models.video import mp4_complete

    return path.is_file() and (path.suffix != ".mp4" or mp4_complete(path))


def _shown(key: str, value: str) -> str:
    """A recorded value of generate's metadata in words: the few-step schedule and the KV window as a reader
    knows them (their records are JSON and 'SIZE+sinkN'), a hash cut short, anything else quoted."""
    import json

    if key == "schedule":
        if not value:
            return "none (a multi-step sampler)"
        s = json.loads(value)
        return (f"{s['denoising_step_list']}{' warped' if s.get('warp') else ''}, shift {s.get('shift')}, "
                f"{s.get('num_frame_per_block')} frames a chunk, context noise {s.get('context_noise')}")
    if key == "guidance":
        if not value:
            return "none (the few-step sampler)"
        g = json.loads(value)
        return (f"{g['num_inference_steps']} steps, guidance {g['guidance_scale']}, shift {g['shift']}, "
                f"negative prompt {g['negative_prompt']!r}"
                + (f", {g['num_frame_per_block']} frames a chunk" if "num_frame_per_block" in g else ""))
    if key == "window":
        if not value:
            return "none (the bidirectional sampler)"
        size, _, sink = value.partition("+sink")
        return "global attention" if int(size) < 0 else f"a {size}-frame window, {sink} sink frame(s)"
    if key.endswith("sha256") and len(value) > 12:
        return value[:12]
    return repr(value)


def _differences(path: Path, want: dict, earlier: dict | None = None) -> list[str] | None:
    """How the latents file at `path` differs from what this run would write there (`want`: the metadata it
    records, and `shape`, the latents' [frames, h, w]); None when there is no such file of generate's. `earlier`:
    {an identity earlier workbenches gave this run's text encoder: this run's} (the same encoder)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "np") as f:
            made = f.metadata() or {}
            shape = list(f.get_slice("latents").get_shape())
    except Exception:  # not a file of generate's
        return None
    if made.get("text_encoder") in (earlier or {}):
        made["text_encoder"] = earlier[made["text_encoder"]]
    differ = [f"{k}: {_shown(k, made[k])} there, {_shown(k, v)} now" for k, v in want.items()
              if k != "shape" and k in made and made[k] != v]
    # (a setting recorded later is missing from older files: refused, unless this run's value is empty, as the
    # older run's was: e.g. no guidance for the few-step sampler)
    differ += [f"no {k} recorded" for k in want if k != "shape" and k not in made and want[k] != ""]
    if [shape[0], *shape[-2:]] != want["shape"]:
        f, h, w = want["shape"]
        differ.append(f"size: {shape[0]} latent frames of {shape[-2]}x{shape[-1]} there, {f} of {h}x{w} now")
    return differ


def _run(args, rank: int = 0, world: int = 1, locks: list | None = None) -> int:
    import gc

    import torch

    from models.video import ensure_writable_dir
    from models.wan.text_encoder import TextEncoder
    from workbench.extract import rank_share
    from workbench.progress import progress_bar
    from workbench.store import sample_id
    from workbench.store_lock import StoreLock

    plan = _plan(args, world)  # everything that can be wrong, before any work
    wanted = _wanted(args, plan)
    existing = _look(args, wanted, plan.earlier)
    out = ensure_writable_dir(args.out)  # every check passed: the output folder is made now
    if rank == 0 and locks is not None:  # one run writes a folder at a time (refused at once, naming the holder)
        locks.append(StoreLock(out, what="a generate folder").acquire())
        existing = _look(args, wanted, plan.earlier)  # (again: a run that held the folder may have written meanwhile)
    live = None
    if plan.capture is not None:  # live.json now: `workbench view OUT` can start waiting
        from workbench.view.live import LiveRun

        live = LiveRun(plan.capture, out, plan.device, fps=16, command=args.argv)

    # --- text first; in low-memory mode the encoder leaves the GPU before the DiT arrives
    encoder = TextEncoder.from_wan_dir(plan.wan_dir, device=plan.device, cache_dir=out / ".prompt_cache")
    every = [(i, s) for i in range(len(plan.prompts)) for s in plan.seeds]
    # a run stopped midway resumes: the samples already there as this run would make them (their latents, written
    # last, with this run's metadata and size, and the video files asked for) are kept; every rank reads them all
    # (the run's counts, said once), and makes what is missing of its own share
    videos = [] if args.no_video else [".png"] + [".mp4"] * plan.mp4
    kept_all = [] if args.overwrite or live is not None else [
        (i, s) for i, s in every if existing[sample_id(i, s)] == []
        and all(_whole(out / f"{sample_id(i, s)}{suffix}") for suffix in videos)]
    jobs = rank_share(every, rank, world)  # this rank's samples
    done = set(kept_all)
    kept = [job for job in jobs if job in done]
    jobs = [job for job in jobs if job not in done]
    args.own_samples = len(wanted)  # (what an interruption reports: this run's samples finished, kept ones first)
    args.finished_samples = [sample_id(i, s) for i, s in kept]
    todo_all = len(every) - len(kept_all)
    if kept_all and rank == 0:
        settings = ("schedule, window" if args.sampler == "causal_few_step" else
                    "steps, guidance, shift, negative prompt, chunk size, window"
                    if args.sampler == "causal_multi_step_cfg" else "steps, guidance, shift, negative prompt")
        print(f"resuming: {len(kept_all)} sample(s) are already in {out}, made with the same prompt, seed, "
              f"sampler, {settings}, dtype, weights{', image' if args.image else ''} and size; "
              + (f"generating the other {todo_all}" + (f" ({world} processes)" if world > 1 else "") if todo_all
                 else "nothing to do")
              + " (--overwrite makes them all again)", flush=True)
    contexts = {i: encoder.encode([plan.prompts[i]]).context
                for i in progress_bar(sorted({i for i, _ in jobs}), desc="encode", disable=args.no_progress)}
    negative = encoder.encode([args.negative_prompt]).context if args.sampler != "causal_few_step" else None
    if plan.low_memory:
        del encoder
        gc.collect()
        torch.cuda.empty_cache()

    # --- the DiT and the VAE, then each of this rank's samples
    model, vae, initial = _load(args, plan)
    # one bar for this run's samples (a bar each wrote two lines of a batch job's log per sample), named by the
    # sample it is on
    with progress_bar(total=len(jobs) * _forwards(args, model, live), desc="generate" if world == 1 else
                      f"generate (rank {rank})", unit="fwd", disable=args.no_progress or rank != 0) as bar:
        for i, seed in jobs:
            name = sample_id(i, seed)
            bar.set_postfix_str(name)
            _sample(args, plan, model, vae, initial, live, out, name, wanted[name], i, seed, contexts[i], negative,
                    bar)
            args.finished_samples.append(name)
    if live is not None:
        live.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank's files are written
    if rank == 0:
        _say_done(args, plan, out, kept_all, todo_all, world)
    return 0


@dataclass
class _Plan:
    """What a generate run was asked for, checked before any work (the files' hashes aside)."""
    prompts: list[str]
    seeds: list[int]
    wan_dir: Path
    h: int  # latent height and width
    w: int
    device: torch.device
    dtype_label: str  # "bfloat16", "float32", ...
    dtype: torch.dtype
    weights_path: Path  # the checkpoint, or the folder's DiT
    stamps: dict  # the files' stamps, checked once they are loaded (workbench/weights.py run_files)
    image: torch.Tensor | None  # [3, H, W] in [-1, 1] (--image)
    low_memory: bool  # the text encoder leaves the GPU before the DiT arrives
    mp4: bool  # mp4 files are written
    capture: CapturePlan | None  # what --live captures
    weights_sha256: str
    text_encoder: str  # the text encoder's identity, and {an identity earlier workbenches gave it: this one}
    earlier: dict


def _plan(args, world: int) -> _Plan:
    """Every check of the arguments and files that can be made before any weights are read."""
    import sys

    import torch

    from models.errors import ModelInputError
    from models.family import check_fits_cache, family_of
    from models.files import check_writable_dir
    from models.video import mp4_available, read_prompts
    from models.wan.checkpoint import wan_weights_file, weights_sha256
    from models.wan.embedded import require_embedded_dir
    from models.wan.folder import present, wan_parts
    from models.wan.text_encoder import check_encoder_files, earlier_identities, wan_dir_encoder_identity
    from models.wan.vae import resolve_decoder
    from workbench.chunking import check_image_frames
    from workbench.commands import apply_schedule, resolve_model
    from workbench.errors import WorkbenchError
    from workbench.extract import (_dtype, _rank_device, dtype_name, check_context_noise, check_device, check_window,
                                   default_prompts, parse_int_list)
    from workbench.inputs import check_prompts
    from workbench.weights import check_vae_file, check_wan_dir, run_files

    resolve_model(args)
    apply_schedule(args)
    resolve_decoder(args.vae_decoder)  # a bad WORKBENCH_VAE_DECODER included
    check_writable_dir(args.out)  # (made once every check has passed)
    prompts = read_prompts(args.prompts) if args.prompts else (args.prompt or default_prompts(args.wan_dir))
    check_prompts(prompts)  # (as extract and intervene refuse them: --prompt "" or "  ")
    seeds = parse_int_list(args.seed, what="seed", all_ok=False)
    if not seeds:
        raise WorkbenchError("--seed needs numbers, e.g. 0 or 0-3")
    wan_dir = Path(args.wan_dir) if args.wan_dir else require_embedded_dir()
    check_wan_dir(wan_dir)
    check_encoder_files(wan_dir)
    if args.image:
        if args.sampler == "bidirectional":
            raise WorkbenchError("--image runs the causal samplers (the image is the first chunk of the KV cache), "
                                 "and this run's sampler is bidirectional (a --model's own may be): add --sampler "
                                 "causal_multi_step_cfg or causal_few_step")
        args.independent_first_frame = True  # the image's latent is a chunk of its own
    check_context_noise(args.sampler, args.context_noise, bool(args.image), captured=args.live)
    args.frames = latent_frames(args)
    if args.image:
        check_image_frames(args.frames, args.num_frame_per_block)
    family = family_of(wan_dir)
    _, h, w, _ = family.video_geometry(wan_dir, args.height, args.width)
    if args.sampler != "bidirectional":
        from models.wan.config import VideoGeometry

        try:  # frames that do not fit the family's chunk layout are refused here
            VideoGeometry(num_frames=args.frames, num_frame_per_block=args.num_frame_per_block,
                          independent_first_frame=args.independent_first_frame)
        except ModelInputError as err:
            raise WorkbenchError(f"{err}{' (--image makes frame 0 a chunk of its own)' if args.image else ''}") from None
        check_window(args.local_attn_size, args.sink_size, args.num_frame_per_block)
        check_fits_cache(args.frames, args.local_attn_size, family.cache_frames, label=f"--frames {args.frames}")
    elif args.independent_first_frame:
        raise WorkbenchError("--independent-first-frame is a chunk layout of the causal samplers; the bidirectional "
                             "sampler denoises every frame together")
    device = _rank_device(check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")), world)
    dtype_label = dtype_name(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))  # ("bf16" too)
    dtype = _dtype(dtype_label)
    if args.fp8 and device.type == "cuda" and dtype != torch.bfloat16:
        raise WorkbenchError(f"--fp8 on CUDA computes in bfloat16; drop --dtype {args.dtype} or use --dtype bfloat16")
    if (not args.no_video or args.image) and not present(wan_parts(wan_dir).vae):
        raise WorkbenchError(f"no VAE at {wan_parts(wan_dir).describe('vae')}: the VAE decodes the videos"
                             f"{' and encodes --image' if args.image else ''}; add it, or pass --no-video for the "
                             "latents alone")
    if not args.no_video or args.image:
        check_vae_file(wan_dir)  # a truncated VAE (or LFS pointer) said now, not after the rollout
    weights_path = Path(args.checkpoint) if args.checkpoint else wan_weights_file(wan_dir)
    stamps = run_files(wan_dir, weights_path, args.image)  # (before the files' labels; checked once they are loaded)
    image = None
    if args.image:
        from models.video import read_image

        image = read_image(args.image, family.vae_stride * h, family.vae_stride * w)  # [3, H, W] in [-1, 1]
    low_memory = args.low_memory == "on" or (
        args.low_memory == "auto" and device.type == "cuda" and torch.cuda.mem_get_info(device)[0] < 40 * 2**30)
    mp4 = not args.no_video and mp4_available()
    if not args.no_video and not mp4:
        print("note: no mp4 files: mp4 needs the video extra (pip install -e '.[video]': ffmpeg, 165 MB); writing "
              "the latents and PNG grids", file=sys.stderr)
    if not args.live and (args.layers or args.heads or args.steps):
        raise WorkbenchError("--layers, --heads and --steps choose what --live captures; add --live")
    if args.live and world > 1:
        raise WorkbenchError("--live streams one process's run to `workbench view`; run it without torchrun")
    capture = None
    if args.live:  # what to capture, checked (layers, heads, steps) before any weights are read
        from workbench.view.live import live_plan

        capture = live_plan(args, prompts, seeds, device, dtype_label, h, w)
    # (the files' labels: the weights' hash, then the text encoder's identities)
    return _Plan(prompts, seeds, wan_dir, h, w, device, dtype_label, dtype, weights_path, stamps, image, low_memory,
                 mp4, capture, weights_sha256(weights_path), wan_dir_encoder_identity(wan_dir),
                 earlier_identities(wan_dir))


def _wanted(args, plan: _Plan) -> dict:
    """{sample name: the metadata its latents file records, and `shape`}: what makes a file this run's (another
    run's files under this run's names are replaced only when asked, --overwrite)."""
    import json

    from workbench.store import sample_id

    # the few-step sampler's schedule and chunking (a file made with another is not this run's)
    steps = dict(denoising_step_list=list(args.denoising_step_list), warp=args.warp_denoising_step,
                 shift=args.timestep_shift, context_noise=args.context_noise,
                 num_frame_per_block=args.num_frame_per_block)
    schedule = json.dumps(steps) if args.sampler == "causal_few_step" else ""
    # the multi-step samplers' solver and guidance (a file made with other steps, guidance, shift or negative
    # prompt is not this run's: its latents differ)
    multi = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                 shift=args.timestep_shift, negative_prompt=args.negative_prompt)
    if args.sampler == "causal_multi_step_cfg":  # (its chunks too: --num-frame-per-block changes its latents)
        multi["num_frame_per_block"] = args.num_frame_per_block
    guidance = json.dumps(multi) if args.sampler != "causal_few_step" else ""
    # the KV window and sink, and an image-to-video run's image by its bytes
    window = f"{args.local_attn_size}+sink{args.sink_size}" if args.sampler != "bidirectional" else ""
    image_sha = ""
    if args.image:
        from models.files import sha256_file

        image_sha = sha256_file(args.image)
    return {sample_id(i, s): dict(prompt=plan.prompts[i], seed=str(s), sampler=args.sampler,
                                  weights_sha256=plan.weights_sha256, text_encoder=plan.text_encoder,
                                  use_ema=str(bool(args.use_ema)), schedule=schedule, guidance=guidance, window=window,
                                  image_sha256=image_sha, dtype=plan.dtype_label, shape=[args.frames, plan.h, plan.w])
            for i in range(len(plan.prompts)) for s in plan.seeds}


def _look(args, wanted: dict, earlier: dict | None) -> dict:
    """How each file already there under this run's names differs from what this run would write (None: no file);
    another run's files are refused unless --overwrite (by every rank: none writes into another run's names)."""
    from workbench.errors import WorkbenchError

    existing = {name: _differences(Path(args.out) / f"{name}.safetensors", want, earlier)
                for name, want in wanted.items()}
    clash = [f"{name} ({'; '.join(differ)})" for name, differ in existing.items()  # (an older file records less)
             if differ and not all(d.startswith("no ") for d in differ)]
    if not args.overwrite and clash:
        more = f" and {len(clash) - 3} more" if len(clash) > 3 else ""
        raise WorkbenchError(f"{args.out} holds files of another run under this run's names: "
                             f"{'; '.join(clash[:3])}{more}. generate names its files p<prompt index>-s<seed>, so "
                             "this run would replace them: choose another --out, or pass --overwrite to replace them")
    return existing


def _load(args, plan: _Plan):
    """(the DiT, the VAE or None, the image's latent [1, 1, 16, h, w] or None) on the run's device and dtype."""
    from models.files import check_unchanged
    from models.wan.checkpoint import load_wan
    from models.wan.folder import wan_parts
    from models.wan.vae import WanVAE
    from workbench.weights import wan_dir_hint

    with wan_dir_hint(args.wan_dir, args.checkpoint):
        model = load_wan(plan.wan_dir, checkpoint=args.checkpoint, use_ema=args.use_ema,
                         causal=args.sampler != "bidirectional", num_frame_per_block=args.num_frame_per_block,
                         local_attn_size=args.local_attn_size, sink_size=args.sink_size, device=plan.device,
                         dtype=plan.dtype, trust_pickle=args.trust_pickle)
    check_unchanged(plan.stamps, "between the hashing of the files' labels and the loading of the weights")
    model.attention_kernel = args.attention_kernel
    model.independent_first_frame = args.independent_first_frame
    if args.fp8 or args.compile:
        from models.wan.accel import compile_blocks, quantize_fp8

        if args.fp8:
            quantize_fp8(model, args.fp8)
        if args.compile:
            compile_blocks(model, args.compile)
    vae = None
    if not args.no_video or plan.image is not None:
        vae = WanVAE.from_file(wan_parts(plan.wan_dir).vae, device=plan.device, dtype=plan.dtype,
                               decoder=args.vae_decoder)
    # image-to-video: the image's latent [1, 1, 16, h, w] is frame 0 of every sample
    initial = None if plan.image is None else vae.encode(plan.image[None, :, None]).to(plan.device, plan.dtype)
    return model, (None if args.no_video else vae), initial


def _forwards(args, model, live) -> int:
    """The DiT forwards of one sample (what the bar counts): each chunk's denoising steps (both CFG branches of
    a multi-step sampler) and its context pass, the last chunk's skipped unless --live shows it; with --image
    chunk 0 (the image) runs its context pass only (the bar stopped at 10/14)."""
    chunks = len(model.chunk_spans(args.frames)) if args.sampler != "bidirectional" else 1
    denoise = (len(args.denoising_step_list) if args.sampler == "causal_few_step" else 2 * args.num_inference_steps)
    context = 1 if args.sampler == "causal_few_step" else 2 if args.sampler != "bidirectional" else 0
    image = denoise if args.image else 0  # (the image's chunk is not denoised)
    return chunks * (denoise + context) - image - _skips_last_context_pass(args, live)


def _skips_last_context_pass(args, live) -> bool:
    """The last chunk's context pass only writes the cache (the same latents): skipped unless --live shows it."""
    return args.sampler == "causal_few_step" and live is None


def _sample(args, plan: _Plan, model, vae, initial, live, out: Path, name: str, want: dict, i: int, seed: int,
            context, negative, bar) -> None:
    """One (prompt, seed) sample: the rollout (each forward a step of `bar`), each chunk decoded as it finishes,
    then its files (latents last)."""
    import contextlib

    import torch

    from models.common.rollout import nonfinite_frame, sample, seeded_noise
    from models.files import atomic_write_bytes, safetensors_bytes
    from models.video import write_mp4, write_png_grid
    from workbench.commands import model_label
    from workbench.errors import Diverged

    device, dtype = plan.device, plan.dtype
    noise, gen = seeded_noise(seed, (1, args.frames, model.config.in_dim, plan.h, plan.w), device, dtype)
    # each finished chunk is decoded right away (the VAE decodes causally, chunk by chunk), on CUDA on a side
    # stream while the next chunk is denoised, and, with --live, streamed with its attention
    decoder = None if vae is None else vae.stream_decoder(overlap=True)
    pieces = []

    def on_chunk(chunk, start, x0):  # x0 [1, n, C, h, w], the chunk's clean latents
        pending = None if decoder is None else decoder.push_async(x0)
        if pending is not None:
            pieces.append(pending)
        if live is not None:
            live.chunk(chunk, start, x0.shape[1], None if pending is None else pending.get())  # [1, 3, t, H, W]

    watched = contextlib.nullcontext() if live is None else live.sample(model, name, prompt=plan.prompts[i],
                                                                        prompt_index=i, seed=seed)
    with watched:
        latents = sample(model, args.sampler, noise, context.to(device, dtype),
                         None if negative is None else negative.to(device, dtype), generator=gen,
                         num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                         denoising_step_list=args.denoising_step_list, timestep_shift=args.timestep_shift,
                         warp_denoising_step=args.warp_denoising_step, context_noise=args.context_noise,
                         on_forward=lambda *_: bar.update(1), on_chunk=on_chunk, initial_latent=initial,
                         last_context_pass=not _skips_last_context_pass(args, live))
    if (bad := nonfinite_frame(latents)) is not None:  # (its video would be NaN: refused by every writer, after all)
        raise Diverged.rollout(f"sample {name} (prompt {plan.prompts[i]!r}, seed {seed}): the rollout's latents are "
                               f"not finite (NaN or inf) from latent frame {bad} on", "nothing is written for it")
    tensors = {"latents": latents[0].float().cpu().contiguous()}
    # recorded beside each video, as a store records them, so that `workbench view` can tell whose video it is
    metadata = {**{k: v for k, v in want.items() if k != "shape"},  # (what a later run compares)
                "checkpoint": args.checkpoint or str(plan.wan_dir)}
    # the latents, which say whose files these are, go last; an earlier run's go first, so that a kill in
    # between never leaves new videos beside old latents
    (out / f"{name}.safetensors").unlink(missing_ok=True)
    if vae is not None:
        video = torch.cat([p.get() for p in pieces], dim=2)[0]  # [3, T, H, W] in [-1, 1]
        if plan.mp4:
            write_mp4(video, out / f"{name}.mp4", fps=16)
        write_png_grid(video, out / f"{name}.png", ncols=9, frames=range(0, video.shape[1], 5), label_frames=True,
                       title=f"{model_label(args)} · seed {seed} · {name} · \"{plan.prompts[i]}\"")
    atomic_write_bytes(out / f"{name}.safetensors", safetensors_bytes(tensors, metadata))


def _say_done(args, plan: _Plan, out: Path, kept_all: list, todo_all: int, world: int) -> None:
    """The run's one-paragraph summary: what was written where, under which names."""
    from workbench.commands import world_prompt_note

    total = len(plan.prompts) * len(plan.seeds)  # (every rank's, the kept ones included)
    kinds = ["latents (.safetensors)"] + (["videos (.mp4, 16 fps)"] * plan.mp4) + \
        (["frame grids (.png, every 5th frame, each named with its latent frame)"] * (not args.no_video))
    made = (f"all {len(kept_all)} sample(s) were already in {out}" if kept_all and not todo_all else
            f"wrote {todo_all} sample(s) to {out} ({len(kept_all)} more were there already)" if kept_all
            else f"wrote {total} sample(s) to {out}")
    print(made + (f" ({world} processes)" if world > 1 else "")
          + f": {', '.join(kinds)}, named p<prompt>-s<seed> (e.g. p0000-s{plan.seeds[0]})"
          + (f"; frame 0 of each is the image {args.image}" if args.image else ""))
    if args.model_note:
        print(args.model_note)
    if note := world_prompt_note(args, plan.prompts):
        print(note)
