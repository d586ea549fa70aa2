"""Benchmark the key-frame indicator path (workbench.kernels.indicator) against the plain attention call, per
chunk of the 1.3B few-step rollout, and project its cost onto a whole rollout.

For each chunk b = 0..6 (q = 3 frames x 1560 tokens, k = 3(b+1) frames, 12 heads x 128, bf16) it times, with
CUDA events: the plain cuDNN call the model makes (Ev = 128), the same kernel with a wider value tensor
(Ev = 144 ... 256, to see which widths the kernel runs well), copying V into the widened buffer, and the whole
indicator function. The projection multiplies by 5 forwards x 30 layers per chunk. Also times the FFN's first
linear with a separate tanh-GELU vs the cuBLASLt GELU epilogue (`torch._addmm_activation`) and their difference.

    python bench/bench_indicator.py [--reps 20]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_frame_attention import time_ms  # noqa: E402  (CUDA-event median after warm-up)
from models.common.cuda_attention import cudnn as _cudnn  # noqa: E402
from workbench.kernels.indicator import attention_with_frame_mass_indicator, widen_values  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--widths", default="128,144,160,176,192,224,256")
    args = ap.parse_args()
    print(f"# bench_indicator  {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"{torch.cuda.get_device_name()}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"# command: {' '.join(sys.argv)}")
    widths = [int(w) for w in args.widths.split(",")]
    fsl, H, D, scale = 1560, 12, 128, 128**-0.5
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 3 * fsl, H, D, device="cuda", generator=g).bfloat16()
    totals = {w: 0.0 for w in widths}
    totals.update(copy=0.0, indicator=0.0)
    print("| chunk | key frames | " + " | ".join(f"Ev={w} ms" for w in widths) + " | copy V ms | indicator fn ms |")
    print("|" + "---|" * (len(widths) + 4))
    for b in range(7):
        nkf = 3 * (b + 1)
        k = torch.randn(1, nkf * fsl, H, D, device="cuda", generator=g).bfloat16()
        row = []
        for w in widths:
            v = torch.randn(1, nkf * fsl, H, w, device="cuda", generator=g).bfloat16()
            t = time_ms(lambda: _cudnn(q, k, v, scale), args.reps, 3)
            totals[w] += t
            row.append(t)
        v = k.clone()
        widen_values(v, fsl)
        t_copy = time_ms(lambda: widen_values(v, fsl), args.reps, 3)
        t_ind = time_ms(lambda: attention_with_frame_mass_indicator(q, k, v, frame_seq_len=fsl), args.reps, 3)
        totals["copy"] += t_copy
        totals["indicator"] += t_ind
        print(f"| {b} | {nkf} | " + " | ".join(f"{t:.3f}" for t in row) + f" | {t_copy:.3f} | {t_ind:.3f} |")
    per_rollout = {k: v * 5 * 30 / 1000 for k, v in totals.items()}
    base = per_rollout[128]
    print("\n| projected per rollout (35 forwards x 30 layers) | s | vs Ev=128 |\n|---|---|---|")
    for name, t in per_rollout.items():
        print(f"| {name if isinstance(name, str) else f'cuDNN Ev={name}'} | {t:.3f} | {t - base:+.3f} s |")

    # FFN first linear + GELU: separate kernels vs cuBLASLt epilogue
    x = torch.randn(4680, 1536, device="cuda", generator=g).bfloat16()
    w1 = (torch.randn(8960, 1536, device="cuda", generator=g) * 0.02).bfloat16()
    b1 = (torch.randn(8960, device="cuda", generator=g) * 0.02).bfloat16()
    sep = time_ms(lambda: F.gelu(F.linear(x, w1, b1), approximate="tanh"), args.reps, 3)
    epi = time_ms(lambda: torch._addmm_activation(b1, x, w1.t(), use_gelu=True), args.reps, 3)
    a = F.gelu(F.linear(x, w1, b1), approximate="tanh").float()
    e = torch._addmm_activation(b1, x, w1.t(), use_gelu=True).float()
    ref = F.gelu(F.linear(x.double(), w1.double(), b1.double()), approximate="tanh")
    print(f"\n| FFN linear1 + GELU [4680x1536]x[1536x8960] | separate {sep:.3f} ms | epilogue {epi:.3f} ms | "
          f"x1050 saves {(sep - epi) * 1.05:.3f} s | max|diff| {(a - e).abs().max().item():.3e} | "
          f"err vs fp64: separate {(a.double() - ref).abs().max().item():.3e}, "
          f"epilogue {(e.double() - ref).abs().max().item():.3e} |")


if __name__ == "__main__":
    main()
