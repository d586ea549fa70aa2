"""Benchmark: the full-size Wan2.1 VAE decode and the umT5-XXL text encoder on one CUDA GPU.

What it measures (wall time = median of --repeats runs after one warm-up, CUDA-synchronised; peak = the
largest `torch.cuda.max_memory_allocated` during the timed runs, and the part of it above the resident weights):
  - VAE decode of 21 latents at 60 x 104 (480 x 832 pixels, 81 frames): whole (`WanVAE.decode`) and streaming
    (`WanVAE.stream_decoder().push` in chunks of 3 latents, as a rollout produces them);
  - umT5-XXL encoding of a batch of prompts (default 8) padded to 512 tokens (`TextEncoder.encode`).
Both run for each of --dtypes (default bf16 and fp32: Self-Forcing runs the VAE in bf16 and the text encoder in
fp32).

How the models are built: full-size random weights in Wan's own key naming are drawn directly on the GPU, in
the benchmark dtype, from the specs of data/embedded/make_text_and_vae.py (VAE: base_dim 96, dim_mult 1,2,4,4,
2 res blocks; umT5-XXL: vocab 256384, d_model 4096, 24 layers, 64 heads x 64, d_ff 10240, 32 buckets); the
loaders build the diffusers / transformers modules on the meta device and *assign* those tensors, so the
weights exist once (checked). Timing does not depend on the weight values. The tokenizer is the embedded tiny
one unless --tokenizer points at a real google/umt5-xxl folder: every prompt is padded to 512 tokens, so the
encoder's work is the same.

Self-checks (any failure exits non-zero with CHECK FAILED): layouts and parameter counts, weights not held
twice, output shapes (81 frames of 480 x 832; [B, 512, 4096]), finite values, pixels in [-1, 1], streamed
chunks of 9 + 6 x 12 frames equal to the whole decode (tolerance by dtype), rows past each prompt's length
exactly zero, and a prompt encoded alone equal to the same prompt inside the batch.

Needs: CUDA, torch, transformers, diffusers (carry a wheel where it is not installed). No network.
Run from the repository root:  python bench/bench_vae_t5.py [--dtypes bf16,fp32] [--repeats 3] [--prompts 8]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GIB = 1024 ** 3
DEVICE = "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
UMT5_XXL = dict(vocab=256384, d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, num_buckets=32)


def umt5_params(vocab, d_model, num_layers, num_heads, d_kv, d_ff, num_buckets) -> int:
    """Embedding + per layer (q, k, v, o, gate, fc1, fc2, two norms, position bias) + final norm."""
    inner = num_heads * d_kv
    per_layer = 4 * d_model * inner + 3 * d_model * d_ff + 2 * d_model + num_buckets * num_heads
    return vocab * d_model + num_layers * per_layer + d_model  # umT5-XXL: 5,680,910,336


PROMPTS = [
    "A red fox runs through a snowy forest at dawn, the camera tracks it at ground level, soft golden light.",
    "Aerial drone shot of a futuristic neon city at night in the rain, reflections on wet streets, cinematic.",
    "A chef flips vegetables in a pan in a busy restaurant kitchen, steam and fire, slow motion close up.",
    "An astronaut floats inside a spaceship, Earth visible through the window, gentle drifting camera.",
    "Waves crash against a lighthouse on a stormy evening, wide angle, dramatic clouds and spray.",
    "A child in a yellow raincoat jumps into puddles on a quiet village street, handheld camera.",
    "Timelapse of flowers opening in a sunny garden, macro lens, shallow depth of field, bokeh.",
    "A samurai walks across a wooden bridge in a misty mountain valley, the camera slowly orbits him.",
]


class CheckFailed(RuntimeError):
    pass


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise CheckFailed(msg)


def _make_module():
    spec = importlib.util.spec_from_file_location("make_text_and_vae", ROOT / "data" / "embedded" /
                                                  "make_text_and_vae.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def draw_on_gpu(specs, dtype, seed: int) -> dict:
    """name -> tensor ~ N(mean, std^2), drawn in place on the GPU in `dtype` (no CPU copy, no fp32 temp)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return {name: torch.empty(shape, device=DEVICE, dtype=dtype).normal_(mean, std, generator=g)
            for name, (shape, mean, std) in specs.items()}


def timed(fn, repeats: int):
    """(median s, all times, peak bytes allocated during the timed runs, last result); one warm-up first."""
    result = fn()
    del result
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if i < repeats - 1:
            del result
    return statistics.median(times), times, torch.cuda.max_memory_allocated(), result


def bench_vae(make, dtype_name: str, repeats: int, frames: int, h: int, w: int, chunk: int) -> list[dict]:
    from models.wan.vae import VAELayout, WanVAE, pixel_frames

    dtype = DTYPES[dtype_name]
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sd = draw_on_gpu(make.wan_vae_specs(make.wan_vae_shapes()), dtype, seed=0)
    weight_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    n_params = sum(t.numel() for t in sd.values())
    vae = WanVAE.from_state_dict(sd, device=DEVICE, dtype=dtype, source="random full-size Wan2.1 VAE")
    del sd
    resident = torch.cuda.memory_allocated() - base
    build_peak = torch.cuda.max_memory_allocated() - base
    check(vae.layout == VAELayout(96, 16, (1, 2, 4, 4), 2, (False, True, True)), f"VAE layout {vae.layout}")
    check(all(p.dtype == dtype and p.device.type == DEVICE for p in vae.model.parameters()),
          "VAE parameters not on the GPU in the benchmark dtype")
    check(resident <= weight_bytes * 1.02 + 16 * 2 ** 20 and build_peak <= weight_bytes * 1.02 + 64 * 2 ** 20,
          f"VAE weights held twice? weights {weight_bytes / GIB:.3f} GiB, resident {resident / GIB:.3f}, "
          f"build peak {build_peak / GIB:.3f}")
    print(f"[vae {dtype_name}] {n_params:,} parameters, {weight_bytes / GIB:.3f} GiB resident")

    g = torch.Generator(device=DEVICE).manual_seed(1)
    latents = torch.randn(1, frames, 16, h, w, device=DEVICE, generator=g)      # [B, F, 16, h, w]
    T, H, W = pixel_frames(frames), 8 * h, 8 * w

    med, times, peak, whole = timed(lambda: vae.decode(latents), repeats)
    check(whole.shape == (1, 3, T, H, W), f"decode shape {tuple(whole.shape)} != {(1, 3, T, H, W)}")
    check(bool(torch.isfinite(whole).all()), "decode produced NaN/inf")
    check(float(whole.min()) >= -1 and float(whole.max()) <= 1, "decode outside [-1, 1]")
    saturated = float((whole.abs() >= 1).float().mean())
    rows = [dict(what=f"VAE decode whole, {frames} lat {h}x{w} -> {T}x{H}x{W}", dtype=dtype_name, med=med,
                 times=times, peak=peak - base, extra=peak - base - resident, note=f"{saturated:.1%} clamped")]
    whole = whole.cpu()  # off the GPU so it does not count in the streaming peak

    def stream():
        dec = vae.stream_decoder()
        return [dec.push(latents[:, i:i + chunk]) for i in range(0, frames, chunk)]

    med, times, peak, parts = timed(stream, repeats)
    expect = [pixel_frames(min(chunk, frames))] + [4 * min(chunk, frames - i) for i in range(chunk, frames, chunk)]
    check([p.shape[2] for p in parts] == expect, f"stream chunk frames {[p.shape[2] for p in parts]} != {expect}")
    diff = (torch.cat([p.cpu() for p in parts], dim=2) - whole).abs()
    tol = {"bf16": 0.1, "fp32": 1e-3}[dtype_name]
    check(float(diff.max()) <= tol, f"streaming != whole decode: max |diff| {float(diff.max()):.3g} > {tol}")
    rows.append(dict(what=f"VAE decode stream, chunks of {chunk} ({'+'.join(map(str, expect[:2]))}+...)",
                     dtype=dtype_name, med=med, times=times, peak=peak - base, extra=peak - base - resident,
                     note=f"max|stream-whole| {float(diff.max()):.2g}"))
    del vae, whole, parts, latents, diff
    torch.cuda.empty_cache()
    return rows


def bench_t5(make, dtype_name: str, repeats: int, n_prompts: int, tokenizer_dir: Path) -> list[dict]:
    from models.wan.text_encoder import TextEncoder

    dtype = DTYPES[dtype_name]
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    pos_std = (2 * UMT5_XXL["num_buckets"] * UMT5_XXL["num_heads"]) ** -0.5
    specs = make.wan_t5_specs(**UMT5_XXL, norm_jitter=0.0, pos_std=pos_std)  # Wan's init
    sd = draw_on_gpu(specs, dtype, seed=0)
    n_params = sum(t.numel() for t in sd.values())
    weight_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    check(n_params == umt5_params(**UMT5_XXL), f"umT5 parameter count {n_params:,} != {umt5_params(**UMT5_XXL):,}")
    enc = TextEncoder.from_state_dict(sd, tokenizer_dir, device=DEVICE, dtype=dtype)
    del sd
    resident = torch.cuda.memory_allocated() - base
    build_peak = torch.cuda.max_memory_allocated() - base
    cfg = enc.model.config
    x = UMT5_XXL
    check((cfg.vocab_size, cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff) ==
          (x["vocab"], x["d_model"], x["num_layers"], x["num_heads"], x["d_kv"], x["d_ff"]),
          f"inferred umT5 config {cfg}")
    check(resident <= weight_bytes * 1.01 + 16 * 2 ** 20 and build_peak <= weight_bytes * 1.01 + 64 * 2 ** 20,
          f"umT5 weights held twice? weights {weight_bytes / GIB:.2f} GiB, resident {resident / GIB:.2f}, "
          f"build peak {build_peak / GIB:.2f}")
    print(f"[umt5 {dtype_name}] {n_params:,} parameters, {weight_bytes / GIB:.2f} GiB resident, "
          f"attention {cfg._attn_implementation}")

    prompts = (PROMPTS * (1 + n_prompts // len(PROMPTS)))[:n_prompts]
    med, times, peak, out = timed(lambda: enc.encode(prompts, batch_size=n_prompts), repeats)
    check(out.context.shape == (n_prompts, 512, UMT5_XXL["d_model"]), f"context shape {tuple(out.context.shape)}")
    check(bool(torch.isfinite(out.context).all()), "umT5 output has NaN/inf")
    for i, n in enumerate(out.lengths):
        check(1 < n < 512, f"prompt {i} has {n} tokens")
        check(bool((out.context[i, n:] == 0).all()) and bool((out.context[i, :n].abs().sum(-1) > 0).all()),
              f"prompt {i}: rows past the length are not exactly zero, or a real row is zero")
    alone = enc.encode([prompts[-1]]).context[0]
    tol = {"bf16": 0.1, "fp32": 1e-3}[dtype_name]
    err = float((alone - out.context[-1]).abs().max() / out.context[-1].abs().max())
    check(err <= tol, f"prompt encoded alone differs from the batch: relative max |diff| {err:.3g} > {tol}")
    rows = [dict(what=f"umT5-XXL encode {n_prompts} prompts x 512 tokens", dtype=dtype_name, med=med, times=times,
                 peak=peak - base, extra=peak - base - resident,
                 note=f"tokens {min(out.lengths)}-{max(out.lengths)}; alone vs batch {err:.1g}")]
    del enc, out, alone
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16, fp32 (default: both)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per umT5 batch")
    ap.add_argument("--latent-frames", type=int, default=21)
    ap.add_argument("--latent-size", default="60x104", help="latent h x w (480x832 pixels = 60x104)")
    ap.add_argument("--chunk", type=int, default=3, help="latent frames per streaming push")
    ap.add_argument("--tokenizer", default=str(ROOT / "data" / "embedded" / "google" / "umt5-xxl"))
    ap.add_argument("--skip-vae", action="store_true")
    ap.add_argument("--skip-t5", action="store_true")
    args = ap.parse_args(argv)

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        ap.error(f"--dtypes: unknown {bad}; allowed {sorted(DTYPES)}")
    try:
        h, w = (int(v) for v in args.latent_size.lower().split("x"))
    except ValueError:
        ap.error(f"--latent-size must be HxW, got {args.latent_size!r}")
    if args.repeats < 1 or args.prompts < 1 or args.chunk < 1 or args.latent_frames < 1:
        ap.error("--repeats, --prompts, --chunk and --latent-frames must be >= 1")
    if not torch.cuda.is_available():
        print("CHECK FAILED: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    try:
        import diffusers
        import transformers
    except ImportError as e:
        print(f"CHECK FAILED: {e}. Install diffusers and transformers (no network: pip install the carried wheel)",
              file=sys.stderr)
        return 2

    props = torch.cuda.get_device_properties(0)
    print("# bench_vae_t5")
    print(f"date     {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"machine  {socket.gethostname()}  {platform.platform()}  {platform.processor() or platform.machine()}")
    print(f"gpu      {props.name}  {props.total_memory / GIB:.1f} GiB  (cuda {torch.version.cuda}, "
          f"cudnn {torch.backends.cudnn.version()}, {torch.cuda.device_count()} visible)")
    print(f"software python {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, diffusers {diffusers.__version__}")
    print(f"settings dtypes {dtypes}, repeats {args.repeats} (+1 warm-up), latents {args.latent_frames} x {h}x{w}, "
          f"chunk {args.chunk}, prompts {args.prompts}, tokenizer {args.tokenizer}")
    torch.backends.cudnn.benchmark = False

    make = _make_module()
    rows = []
    try:
        for d in dtypes:
            if not args.skip_vae:
                rows += bench_vae(make, d, args.repeats, args.latent_frames, h, w, args.chunk)
            if not args.skip_t5:
                rows += bench_t5(make, d, args.repeats, args.prompts, Path(args.tokenizer))
    except CheckFailed as e:
        print(f"\nCHECK FAILED: {e}", file=sys.stderr)
        return 1

    print()
    print(f"| {'what':<52} | dtype | median s | runs s            | peak GiB | above weights GiB | note")
    print(f"|{'-' * 54}|-------|----------|-------------------|----------|-------------------|------")
    for r in rows:
        runs = " ".join(f"{t:.3f}" for t in r["times"])
        print(f"| {r['what']:<52} | {r['dtype']:<5} | {r['med']:8.3f} | {runs:<17} | {r['peak'] / GIB:8.2f} | "
              f"{r['extra'] / GIB:17.2f} | {r['note']}")
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
