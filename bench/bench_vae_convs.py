"""Benchmark: where the fast VAE decoder's time goes, and what other forms of its convolutions would cost.

    python3 bench/bench_vae_convs.py [--out DIR] [--latents 21] [--calls 5] [--reps 5]

On one CUDA GPU, the full-size Wan2.1 VAE (random bf16 weights drawn on the GPU), 480x832, 21 latents pushed in
chunks of 3 through models/wan/vae_fast.py's `FastDecoder`, as `workbench generate` decodes on CUDA:
 1. shapes: every convolution a decode runs (recorded from one eager decode with the temporal taps off, so
    each 3x3x3 convolution is one conv3d call): kind, input / weight shape, calls per decode, FLOPs.
 2. profile: one graphed decode under torch.profiler: kernel time by category (VAE convolutions, norms,
    copies, other elementwise: the biases and sums) and the top kernels; then the same with the temporal taps off
    (models/wan/vae_fast.py TAPS_CHANNELS) and the largest difference between the two decodes.
 3. convs: per distinct 3x3x3 causal convolution shape, GPU time per call (CUDA-graph replays of --calls
    calls, variants in turns, median of --reps) of:
      conv3d     F.conv3d on the channels-last buffer (what the decoder runs at 128 channels and more)
      taps       three F.conv2d over the buffer's frame views (one per temporal tap), summed in place
                 (what it runs at 64-127 output channels: models/wan/vae_fast.py TAPS_CHANNELS)
      stacked    the three frames concatenated on channels (a copy), one F.conv2d with 3 x Cin channels
      stacked-0  the same conv2d on an already stacked input (the copy's cost left out: a lower bound)
    each with its TFLOP/s and the decode's total (calls x time); max |difference| from conv3d.
    Then the upsamplers' 2D convolutions: the nearest-2x copy + conv2d as run, and the conv2d alone.
Everything printed also goes to DIR/bench_vae_convs.log as it is printed (bench/bench_e2e.py's `Tee`; its
`kernel_breakdown` makes section 2's categories, the same as bench_e2e's profile); numbers to
DIR/bench_vae_convs.json.
Needs: CUDA, torch, diffusers, triton. Run from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_e2e import Tee, _decode_stream, categorize, kernel_breakdown, table  # noqa: E402

CL3, CL2 = torch.channels_last_3d, torch.channels_last


class Recorder:
    """Stands in for vae_fast's `F`: records each conv call's shapes, then runs it."""

    def __init__(self):
        self.calls: dict = {}

    def __getattr__(self, name):
        return getattr(F, name)

    def _note(self, kind, x, w, padding):
        key = (kind, tuple(x.shape), tuple(w.shape), tuple(padding) if isinstance(padding, (tuple, list))
               else padding)
        self.calls[key] = self.calls.get(key, 0) + 1

    def conv3d(self, x, w, b=None, padding=0, **kw):
        self._note("conv3d", x, w, padding)
        return F.conv3d(x, w, b, padding=padding, **kw)

    def conv2d(self, x, w, b=None, padding=0, **kw):
        self._note("conv2d", x, w, padding)
        return F.conv2d(x, w, b, padding=padding, **kw)


def flops(kind, xs, ws, padding) -> float:
    """2 x multiply-adds of one call (stride 1; output frames = input frames - (kt - 1))."""
    if kind == "conv3d":
        B, C, T, H, W = xs
        Co, Ci, kt, kh, kw = ws
        return 2.0 * B * (T - kt + 1) * H * W * Co * Ci * kt * kh * kw
    B, C, H, W = xs
    Co, Ci, kh, kw = ws
    return 2.0 * B * H * W * Co * Ci * kh * kw


def build(latents: int):
    from bench_vae_t5 import _make_module, draw_on_gpu

    from models.wan.vae import WanVAE

    make = _make_module()
    sd = draw_on_gpu(make.wan_vae_specs(make.wan_vae_shapes()), torch.bfloat16, seed=0)
    vae = WanVAE.from_state_dict(sd, device="cuda", dtype=torch.bfloat16, decoder="fast")
    g = torch.Generator(device="cuda").manual_seed(1)
    z = torch.randn(1, latents, 16, 60, 104, device="cuda", generator=g)
    return vae, z


def section_shapes(vae, z) -> dict:
    import models.wan.vae_fast as vf
    from models.wan.vae_fast import FastDecoder

    rec = Recorder()
    real, taps = vf.F, dict(vf.TAPS_CHANNELS)
    vf.F = rec
    vf.TAPS_CHANNELS.clear()  # every 3x3x3 convolution as one conv3d call, so that section 3 compares them all
    try:
        saved = vae._fast
        vae._fast = FastDecoder(vae, graphs=False)
        _decode_stream(vae, z)
        torch.cuda.synchronize()
        vae._fast = saved
    finally:
        vf.F = real
        vf.TAPS_CHANNELS.update(taps)
    total = sum(n * flops(k, x, w, p) for (k, x, w, p), n in rec.calls.items())
    rows = [[k, list(x), list(w), p, n, f"{n * flops(k, x, w, p) / 1e12:.2f}"]
            for (k, x, w, p), n in sorted(rec.calls.items(), key=lambda kv: -kv[1] * flops(*kv[0]))]
    table(f"1. convolutions of one decode ({z.shape[1]} latents): {len(rec.calls)} distinct calls, "
          f"{total / 1e12:.1f} TFLOP", ["kind", "input", "weight", "padding", "calls", "TFLOP per decode"], rows)
    return rec.calls


def section_profile(vae, z, title: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        _decode_stream(vae, z)  # eager plans, then the graphs' recording
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    _decode_stream(vae, z)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _decode_stream(vae, z)
        torch.cuda.synchronize()
    rows, out = kernel_breakdown(prof, wall)
    table(f"2. one graphed decode, {title}: wall {wall * 1000:.1f} ms (no profiler)", rows[0], rows[1:])
    print("\ntop kernels (ms):")
    for name, ms in out["top"][:20]:
        print(f"  {ms:9.2f}  [{categorize(name)}]  {name[:130]}")
    return out


def section_convs(calls: dict, n_calls: int, reps: int) -> list:
    from graph_timing import in_turns_ms

    out, rows, totals = [], [], {}
    g = torch.Generator(device="cuda").manual_seed(2)
    for (k, xs, ws, p), n in sorted(calls.items(), key=lambda kv: -kv[1] * flops(*kv[0])):
        if k != "conv3d" or tuple(ws[2:]) != (3, 3, 3):
            continue
        B, C, T, H, W = xs
        To = T - 2
        x = torch.randn(xs, device="cuda", dtype=torch.bfloat16, generator=g).contiguous(memory_format=CL3)
        w = (torch.randn(ws, device="cuda", dtype=torch.bfloat16, generator=g) / (C * 27) ** 0.5
             ).contiguous(memory_format=CL3)
        b = torch.randn(ws[0], device="cuda", dtype=torch.bfloat16, generator=g)
        taps = [w[:, :, i].contiguous(memory_format=CL2) for i in range(3)]
        wst = w.permute(0, 2, 1, 3, 4).reshape(ws[0], 3 * C, 3, 3).contiguous(memory_format=CL2)

        def frames(i):  # [B*To, C, H, W] channels-last view of input frames i .. i + To
            return x[:, :, i:i + To].transpose(1, 2).reshape(B * To, C, H, W)

        stacked_in = torch.cat([frames(i) for i in range(3)], dim=1).contiguous(memory_format=CL2)

        def v_conv3d():
            return F.conv3d(x, w, b, padding=p)

        def v_taps():
            y = F.conv2d(frames(2), taps[2], b, padding=1)
            y.add_(F.conv2d(frames(1), taps[1], None, padding=1))
            return y.add_(F.conv2d(frames(0), taps[0], None, padding=1))

        def v_stacked():
            s = torch.cat([frames(i) for i in range(3)], dim=1).contiguous(memory_format=CL2)
            return F.conv2d(s, wst, b, padding=1)

        def v_stacked0():
            return F.conv2d(stacked_in, wst, b, padding=1)

        fns = dict(conv3d=v_conv3d, taps=v_taps, stacked=v_stacked, stacked0=v_stacked0)
        ref = v_conv3d().float()  # [B, Co, To, H, W]
        as2d = lambda y: y.float().reshape(B, To, ws[0], H, W).transpose(1, 2)  # noqa: E731
        d_taps = float((as2d(v_taps()) - ref).abs().max())
        d_st = float((as2d(v_stacked()) - ref).abs().max())
        ms = in_turns_ms(fns, n_calls, reps, on_refusal=print)
        fl = flops(k, xs, ws, p)
        cells = []
        for name in fns:
            t = ms[name]
            totals[name] = totals.get(name, 0.0) + (n * t if t else float("nan"))
            cells.append("-" if t is None else f"{t:.3f} ({fl / t / 1e9:.0f})")
        best = min((t for nm, t in ms.items() if t and nm != "stacked0"), default=None)
        rows.append([list(xs), ws[0], n, *cells, f"{best / ms['conv3d']:.2f}x", f"{d_taps:.2g} / {d_st:.2g}"])
        out.append(dict(input=list(xs), weight=list(ws), calls=n, ms=ms, tflop=fl / 1e12, diff_taps=d_taps,
                        diff_stacked=d_st))
        del x, w, stacked_in, ref
    table(f"3. the 3x3x3 causal convolutions: GPU ms per call (graphs of {n_calls} calls, in turns, median of "
          f"{reps}) and TFLOP/s", ["input [B, C, T, H, W]", "Cout", "calls", "conv3d", "taps", "stacked", "stacked-0",
                                   "best vs conv3d", "max diff taps / stacked"], rows)
    print("per decode (ms, the 3x3x3 convs only): " + ", ".join(f"{k} {v:.1f}" for k, v in totals.items()))
    rows = []
    for (k, xs, ws, p), n in calls.items():
        if k != "conv2d":
            continue
        N, C, H, W = xs
        small = torch.randn(N, H // 2, W // 2, C, device="cuda", dtype=torch.bfloat16, generator=g)
        x = torch.randn(xs, device="cuda", dtype=torch.bfloat16, generator=g).contiguous(memory_format=CL2)
        w = torch.randn(ws, device="cuda", dtype=torch.bfloat16, generator=g).contiguous(memory_format=CL2)

        def v_conv():
            return F.conv2d(x, w, None, padding=1)

        def v_up_conv():
            up = small[:, :, None, :, None, :].expand(N, H // 2, 2, W // 2, 2, C).reshape(N, H, W, C)
            return F.conv2d(up.permute(0, 3, 1, 2), w, None, padding=1)

        ms = in_turns_ms(dict(conv=v_conv, up=v_up_conv), n_calls, reps, on_refusal=print)
        fl = flops(k, xs, ws, p)
        rows.append([list(xs), ws[0], n, f"{ms['conv']:.3f} ({fl / ms['conv'] / 1e9:.0f})", f"{ms['up']:.3f}"])
        out.append(dict(input=list(xs), weight=list(ws), calls=n, ms=ms, tflop=fl / 1e12))
    table("the upsamplers' 2D convolutions (input as recorded: already upsampled)",
          ["input [N, C, H, W]", "Cout", "calls", "conv2d ms (TFLOP/s)", "nearest-2x copy + conv2d ms"], rows)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--latents", type=int, default=21)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_vae_convs: needs a CUDA GPU", file=sys.stderr)
        return 2
    import models.wan.vae_fast as vf

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "bench_vae_convs.log", "w")
    sys.stdout, sys.stderr = Tee(log, sys.stdout), Tee(log, sys.stderr)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} {torch.cuda.get_device_name()} torch "
          f"{torch.__version__} cuDNN {torch.backends.cudnn.version()}")
    vae, z = build(args.latents)
    res = {}
    calls = section_shapes(vae, z)
    res["shapes"] = [dict(kind=k, input=list(x), weight=list(w), padding=p, calls=n)
                     for (k, x, w, p), n in calls.items()]
    res["profile"] = section_profile(vae, z, "as built (temporal taps at TAPS_CHANNELS, biases in the "
                                             "next kernel)")
    want = _decode_stream(vae, z).clone()
    vf.TAPS_CHANNELS["cuda"], saved = range(0), vf.TAPS_CHANNELS["cuda"]
    vae._fast = None  # a fresh FastDecoder: buffers, graphs
    res["profile_no_taps"] = section_profile(vae, z, "without temporal taps (every 3x3x3 convolution one conv3d)")
    d = float((_decode_stream(vae, z) - want).abs().max())
    print(f"max |taps - no taps| over the decode: {d:.3g}")
    res["taps_vs_conv3d_max_diff"] = d
    vf.TAPS_CHANNELS["cuda"] = saved
    vae._fast = None
    (out / "bench_vae_convs.json").write_text(json.dumps(res, indent=1, default=str))  # (again after section 3)
    res["convs"] = section_convs(calls, args.calls, args.reps)
    (out / "bench_vae_convs.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
