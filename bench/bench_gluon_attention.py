"""The Gluon FlashAttention-3-style forward (models/common/gluon_attention.py) against cuDNN at the rollout's shapes.

First its errors against a float64 reference (output, log-sum-exp, per-row frame mass), then GPU time per call
at q = 3 frames x 1560 tokens, k = 3..21 frames, 12 heads x 128, bf16 (CUDA graphs of `--calls` calls, variants
replayed in turns, median of `--repeats`): cuDNN one call, cuDNN balanced (the default on Hopper), the Gluon
kernel with and without the frame mass, and with the mass and the frame means (what `fused` capture runs on
sm90; means from `frame_means_into`'s two Triton passes, the default, or from torch), and the Triton forward with the frame
mass. "rollout" = 150 x the sum over the seven key lengths.

    python3 bench/bench_gluon_attention.py [--calls 10] [--repeats 7] [--skip-check]
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/

from graph_timing import gpu_banner, in_turns_ms, sweep_parser  # noqa: E402
from models.common.balanced_attention import balanced_attention, plan  # noqa: E402
from models.common.cuda_attention import cudnn  # noqa: E402
from models.common.triton_attention import frame_attention  # noqa: E402

FSL, H, D = 1560, 12, 128
KF = (3, 6, 9, 12, 15, 18, 21)


def reference(q, k, v, scale, fsl, heads):
    """float64 out [B, Lq, len(heads), D], lse [B, len(heads), Lq], mass [B, len(heads), nkf, Lq] (/ fsl)."""
    B, Lq = q.shape[:2]
    nkf = k.shape[1] // fsl
    outs, lses, masses = [], [], []
    for b in range(B):
        ob, lb, mb = [], [], []
        for h in heads:
            sc = q[b, :, h].double() @ k[b, :, h].double().T * scale
            lse = torch.logsumexp(sc, -1)
            p = torch.exp(sc - lse[:, None])
            ob.append(p @ v[b, :, h].double())
            lb.append(lse)
            mb.append(p.view(Lq, nkf, fsl).sum(-1).T / fsl)
        outs.append(torch.stack(ob, 1))
        lses.append(torch.stack(lb))
        masses.append(torch.stack(mb))
    return torch.stack(outs), torch.stack(lses), torch.stack(masses)


def fa(q, k, v, scale, fsl, gluon=True, mass=False, means=None):
    """means: None (no frame means), or how the Gluon path makes them ("torch" or "triton")."""
    r = frame_attention(q, k, v, frame_seq_len=fsl, scale=scale, with_mass=mass, with_lse=True,
                        frame_means=means is not None, config={"GLUON": gluon, "MEANS": means or "torch"})
    return (r.out, r.lse, r.row_mass) if means is None else (r.q_means, r.k_means)


def check(dev):
    """Errors of the Gluon path on small shapes and at the rollout's (split tiles), and capture neutrality."""
    ok = True
    for B, Hh, fsl, nqf, nkf in ((2, 4, 256, 2, 3), (1, 4, 1560, 3, 3), (2, 3, 200, 1, 5), (1, 12, 1560, 3, 9),
                                 (2, 12, 1560, 3, 21)):
        torch.manual_seed(nkf)
        q = torch.randn(B, nqf * fsl, Hh, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, nkf * fsl, Hh, D, device=dev, dtype=torch.bfloat16) * 1.5
        v = torch.randn(B, nkf * fsl, Hh, D, device=dev, dtype=torch.bfloat16)
        scale = 1 / math.sqrt(D)
        heads = (0, Hh - 1)
        ro, rl, rm = reference(q, k, v, scale, fsl, heads)
        oc, _ = cudnn(q, k, v, scale)
        ec = (oc[:, :, list(heads)].double() - ro).abs().max().item()
        for mass in (False, True):
            try:
                o, l, m = fa(q, k, v, scale, fsl, True, mass)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001  (report and go on: this is a development bench)
                print(f"  B{B} fsl{fsl} nkf{nkf} mass {mass}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                ok = False
                continue
            eo = (o[:, :, list(heads)].double() - ro).abs()
            el = (l[:, list(heads)].double() - rl).abs().max().item()
            em = (m[:, list(heads)].double() - rm).abs().max().item() if m is not None else float("nan")
            msum = (m.sum(2) * fsl - 1).abs().max().item() if m is not None else float("nan")
            nan = bool(torch.isnan(o).any())
            same = torch.equal(o, fa(q, k, v, scale, fsl, True, not mass)[0])
            good = not nan and eo.max().item() < 3 * ec + 1e-3 and el < 1e-3 and not (em > 1e-5) and same
            ok &= good
            print(f"  B{B} H{Hh} fsl{fsl} nqf{nqf} nkf{nkf} mass {mass}: out max {eo.max().item():.2e} (cuDNN {ec:.2e}) "
                  f"mean {eo.mean().item():.2e}, lse {el:.2e}, mass {em:.2e}, rows sum-1 {msum:.2e}, nan {nan}, "
                  f"out same with/without mass {same} {'ok' if good else 'BAD'}", flush=True)
        want_q = q.double().view(B, nqf, fsl, Hh, D).mean(2).transpose(1, 2)
        want_k = k.double().view(B, nkf, fsl, Hh, D).mean(2).transpose(1, 2)
        for means in ("torch", "triton"):
            qm, km = fa(q, k, v, scale, fsl, True, True, means)
            err = max((qm.double() - want_q).abs().max().item(), (km.double() - want_k).abs().max().item())
            ok &= err < 1e-6
            print(f"    frame means ({means}): max error {err:.2e} {'ok' if err < 1e-6 else 'BAD'}", flush=True)
    return ok


def main():
    ap = sweep_parser(__doc__, "bench_gluon_attention.json")
    ap.add_argument("--skip-check", action="store_true")
    a = ap.parse_args()
    dev, props, slots = gpu_banner()
    if not a.skip_check:
        print("errors against float64:", flush=True)
        print("check", "passed" if check(dev) else "FAILED", flush=True)
    torch.manual_seed(0)
    Lq, scale = 3 * FSL, 1.0 / math.sqrt(D)
    q = torch.randn(1, Lq, H, D, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(1, 21 * FSL, H, D, device=dev, dtype=torch.bfloat16)
    vc = torch.randn(1, 21 * FSL, H, D, device=dev, dtype=torch.bfloat16)
    rows = {}
    for kf in KF:
        k, v = kc[:, : kf * FSL], vc[:, : kf * FSL]
        p = plan(1, H, Lq, k.shape[1], slots)
        variants = {
            "cudnn": lambda: cudnn(q, k, v, scale),
            "cudnn-balanced": lambda: balanced_attention(q, k, v, scale, cudnn, slots=slots, p=p),
            "cudnn-main": lambda: cudnn(q[:, :4224], k, v, scale),
        }
        variants["gluon"] = lambda: fa(q, k, v, scale, FSL, True, False)
        variants["gluon mass"] = lambda: fa(q, k, v, scale, FSL, True, True)
        variants["triton mass"] = lambda: fa(q, k, v, scale, FSL, False, True)
        variants["gluon mass+means torch"] = lambda: fa(q, k, v, scale, FSL, True, True, "torch")  # fused capture
        variants["gluon mass+means triton"] = lambda: fa(q, k, v, scale, FSL, True, True, "triton")
        row = in_turns_ms(variants, a.calls, a.repeats)
        rows[kf] = row
        print(f"kf {kf:2d}: " + ", ".join(f"{n} {t:.3f}" for n, t in row.items() if t is not None), flush=True)
    print("\nrollout (150 x sum over key lengths); vs cudnn; vs cudnn-balanced")
    base = 150 * sum(rows[kf]["cudnn"] for kf in KF)
    bal = 150 * sum(rows[kf]["cudnn-balanced"] for kf in KF)
    summary = {}
    for n in rows[21]:
        if all(rows[kf].get(n) is not None for kf in KF):
            tot = 150 * sum(rows[kf][n] for kf in KF)
            summary[n] = [tot, tot / base, tot / bal]
            print(f"  {n:28s} {tot / 1000:.4f} s  {tot / base:.3f}x  {tot / bal:.3f}x", flush=True)
    flops = 150 * sum(4 * Lq * kf * FSL * D * H for kf in KF)
    print(f"  (attention FLOPs per rollout {flops / 1e12:.0f} T)")
    with open(a.out, "w") as f:
        json.dump({"device": props.name, "rows": rows, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
