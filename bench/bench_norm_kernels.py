"""Benchmark: the LayerNorm row kernels of models/wan/triton_norms.py at the 1.3B rollout's shape (one chunk: 3 frames
x 1560 tokens, 1536 channels, bf16) for each warp count, timed by triton.testing.do_bench_cudagraph (100 launches a
graph, so no launch gaps) and do_bench (L2 flushed before each call), with the bytes each moves and the rate.

    python bench/bench_norm_kernels.py [--warps 2,4,8,16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from models.wan import triton_norms as tn  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warps", default="2,4,8,16", help="comma-separated warp counts to time")
    args = ap.parse_args()
    B, F, fsl, C = 1, 3, 1560, 1536
    x, y = (torch.randn(B, F * fsl, C, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mod = torch.randn(B, F, 6, 1, C, device="cuda")
    shift, scale, gate = mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]
    w, b = torch.rand(C, device="cuda", dtype=torch.bfloat16), torch.randn(C, device="cuda", dtype=torch.bfloat16)
    row = x.numel() * x.element_size()
    cases = {  # name: (function, bytes moved)
        "norm_modulate": (lambda: tn.norm_modulate(x, shift, scale, 1e-6), 2 * row),
        "layer_norm_affine": (lambda: tn.layer_norm_affine(x, w, b, 1e-6), 2 * row),
        "add_norm_modulate": (lambda: tn.add_norm_modulate(x, y, shift, scale, 1e-6), 4 * row),
        "gated_residual_norm_modulate": (lambda: tn.gated_residual_norm_modulate(x, y, gate, shift, scale, 1e-6),
                                         4 * row),
        "gated_residual_norm_affine": (lambda: tn.gated_residual_norm_affine(x, y, gate, w, b, 1e-6), 4 * row),
    }
    print(f"# {torch.cuda.get_device_name()}, x [{B}, {F * fsl}, {C}] bf16")
    print("| kernel | warps | graphed (us) | GB/s | L2 flushed (us) | GB/s |")
    print("|---|---|---|---|---|---|")
    for name, (fn, nbytes) in cases.items():
        for warps in (int(w_) for w_ in args.warps.split(",")):
            tn.NUM_WARPS = warps
            fn()
            with torch.cuda.stream(torch.cuda.Stream()):
                graphed = triton.testing.do_bench_cudagraph(fn, rep=100) * 1e3
            flushed = triton.testing.do_bench(fn, rep=100) * 1e3
            print(f"| {name} | {warps} | {graphed:.1f} | {nbytes / graphed / 1e3:.0f} | {flushed:.1f} | "
                  f"{nbytes / flushed / 1e3:.0f} |")


if __name__ == "__main__":
    main()
