"""Benchmark: the linear layers of one 1.3B block at the rollout's chunk (4680 tokens = 3 frames x 1560, bf16), each
timed alone inside a CUDA graph of 50 launches (triton.testing.do_bench_cudagraph): the q, k, v projections as three
GEMMs or as one of the stacked weights ([q; k; v]: 4608 outputs) or two ([q; k] and v), the output and cross-attention
projections, and the FFN's up (tanh-GELU in the cuBLASLt epilogue) and down GEMMs; microseconds, TFLOP/s, and the
microseconds one rollout's 1050 block calls spend in each (35 forwards x 30 blocks).

    python bench/bench_gemms.py [--tokens 4680]
"""

from __future__ import annotations

import argparse

import torch
import triton.testing


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4680, help="token rows of the GEMMs (one chunk: 3 x 1560)")
    args = ap.parse_args()
    M, C, Fd = args.tokens, 1536, 8960
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(M, C, device=dev, dtype=dt)
    h = torch.randn(M, Fd, device=dev, dtype=dt)
    w = {n: torch.randn(o, i, device=dev, dtype=dt) * i ** -0.5 for n, (o, i) in
         dict(q=(C, C), k=(C, C), v=(C, C), qkv=(3 * C, C), qk=(2 * C, C), up=(Fd, C), down=(C, Fd)).items()}
    b = {n: torch.randn(t.shape[0], device=dev, dtype=dt) for n, t in w.items()}
    lin = torch.nn.functional.linear
    up_t = w["up"].t().contiguous()  # [C, Fd]
    cases = {  # name: (function, flops, calls a block makes of it)
        "q, k, v: three GEMMs": (lambda: [lin(x, w[n], b[n]) for n in "qkv"], 3 * 2 * M * C * C, 1),
        "q, k, v: one GEMM of [q; k; v]": (lambda: lin(x, w["qkv"], b["qkv"]), 3 * 2 * M * C * C, 1),
        "q, k, v: [q; k] and v": (lambda: (lin(x, w["qk"], b["qk"]), lin(x, w["v"], b["v"])), 3 * 2 * M * C * C, 1),
        "one 1536 x 1536 projection (o, cross q, cross o)": (lambda: lin(x, w["q"], b["q"]), 2 * M * C * C, 3),
        "FFN up + GELU epilogue": (lambda: torch._addmm_activation(b["up"], x, w["up"].t(), use_gelu=True),
                                   2 * M * C * Fd, 1),
        "FFN down": (lambda: lin(h, w["down"], b["down"]), 2 * M * C * Fd, 1),
        # the up GEMM's variants: without the GELU, the weight stored transposed ([C, Fd] row-major), in halves
        "FFN up, no GELU": (lambda: lin(x, w["up"], b["up"]), 2 * M * C * Fd, 1),
        "FFN up + GELU epilogue, weight stored [C, Fd]": (
            lambda: torch._addmm_activation(b["up"], x, up_t, use_gelu=True), 2 * M * C * Fd, 1),
        "FFN up, no GELU, weight stored [C, Fd]": (lambda: torch.addmm(b["up"], x, up_t), 2 * M * C * Fd, 1),
        "FFN up + GELU epilogue, two halves of the outputs": (
            lambda: [torch._addmm_activation(b["up"][i:i + Fd // 2], x, w["up"][i:i + Fd // 2].t(), use_gelu=True)
                     for i in (0, Fd // 2)], 2 * M * C * Fd, 1),
        "FFN up + GELU epilogue, two halves of the tokens": (
            lambda: [torch._addmm_activation(b["up"], x[i:i + M // 2], w["up"].t(), use_gelu=True)
                     for i in (0, M // 2)], 2 * M * C * Fd, 1),
    }
    print(f"# {torch.cuda.get_device_name()}, M = {M} token rows, bf16")
    print("| GEMM(s) | us | TFLOP/s | ms per rollout (1050 block calls) |")
    print("|---|---|---|---|")
    for name, (fn, flops, calls) in cases.items():
        fn()
        with torch.cuda.stream(torch.cuda.Stream()):
            us = triton.testing.do_bench_cudagraph(fn, rep=200) * 1e3
        print(f"| {name} | {us:.1f} | {flops / us / 1e6:.0f} | {us * 1050 * calls / 1e3:.1f} |")


if __name__ == "__main__":
    main()
