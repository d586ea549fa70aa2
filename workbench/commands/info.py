"""`workbench info`: what model would run, how big it is, its token geometry and attention backend."""

from __future__ import annotations

import argparse

HELP = "show a model's config, parameter count, token geometry and attention backend"

EPILOG = """\
examples:
  workbench info                                   # the embedded default
  workbench info --preset wan2.1-t2v-1.3b          # built on the meta device: no weights needed
  workbench info --wan-dir wan_models/Wan2.1-T2V-1.3B --frames 21 --height 480 --width 832
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--wan-dir", metavar="DIR", help="the official Wan2.1 folder (reads config.json only)")
    src.add_argument("--preset", help="a built-in size: wan2.1-t2v-1.3b, wan2.1-t2v-14b, tiny")
    p.add_argument("--frames", type=int, default=21, help="latent frames (default: %(default)s)")
    p.add_argument("--height", type=int, help="pixel height (default: the model's own size: 96 for the embedded "
                                              "default, config.json's video_size, else 480)")
    p.add_argument("--width", type=int, help="pixel width (default: 128 for the embedded default, config.json's "
                                             "video_size, else 832)")
    p.add_argument("--num-frame-per-block", type=int, default=3, help="frames per chunk (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="device whose attention backend to report (default: cuda if available)")
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


def run(args) -> int:
    import torch

    from models.family import WAN, family_of
    from models.wan.config import default_video_size, preset
    from models.wan.embedded import require_embedded_dir
    from workbench.commands import check_frames
    from workbench.inputs import check_device

    check_frames(args.frames)
    if args.preset:
        config, name = preset(args.preset), args.preset
    else:
        folder = args.wan_dir or require_embedded_dir()
        config, name = family_of(folder).read_config(folder), ("embedded default" if not args.wan_dir else folder)
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


def _size(n_bytes: float) -> str:
    """'5.62 GiB', '192 MiB', '504 KiB': the largest unit that keeps the number 1 or more."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            v = n_bytes / scale
            return f"{v:.0f} {unit}" if v >= 100 else f"{v:.3g} {unit}"
    return f"{n_bytes:.0f} B"
