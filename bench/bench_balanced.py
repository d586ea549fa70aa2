"""Wave-balanced cuDNN attention against one cuDNN call, at the rollout's self-attention shapes (issue 16).

The 1.3B rollout's attention calls: q = 3 frames x 1560 tokens, k = 3..21 frames, 12 heads x 128, bf16, batch 1.
For each key length it times, as CUDA graphs of `--calls` calls each (the rollout replays graphs), median of
`--repeats` replays taken in turns (variant after variant, so that whatever drifts over a sweep touches all alike):
- `cudnn`: one call of cuDNN's kernel (the model's attention before this schedule; choice `cudnn`);
- `cudnn-main`: the first 4224 query rows only (33 query blocks x 12 heads = 3 waves of 132 SMs): if cuDNN
  runs one 128-row tile per CTA, this takes 3/4 of `cudnn`'s time, not 4224/4680 of it;
- `balanced sS`: models/common/balanced_attention.py with the tail's keys cut in S segments; `balanced` its own
  plan; `split-all s2`: every row's keys in 2 segments (no main call);
- `indicator` / `indicator-balanced`: the value tensor widened to 160 columns (the indicator capture mode);
- `frames`: every key frame its own segment, all in one call, then the merge (the frame masses would come from
  the segments' log-sum-exps): the cost of exact frame statistics from cuDNN.
"rollout" = 150 x the sum over the seven key lengths (5 steps x 30 layers per chunk, one chunk per key length).
Then the errors against a float64 reference (heads 0-1) for cuDNN and the planned balanced call.

    python3 bench/bench_balanced.py [--calls 10] [--repeats 7] [--out $OUT/bench_balanced.json]
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
from models.common.balanced_attention import Plan, balanced_attention, merge_segments, plan  # noqa: E402
from models.common.cuda_attention import cudnn  # noqa: E402

FSL, H, D = 1560, 12, 128
KF = (3, 6, 9, 12, 15, 18, 21)


def reference(q, k, v, scale, heads=(0, 1)):
    """float64 out [Lq, len(heads), Dv] and lse [len(heads), Lq] of batch 0 (chunked over query rows)."""
    outs, lses = [], []
    for h in heads:
        kh, vh = k[0, :, h].double(), v[0, :, h].double()
        o, l = [], []
        for s in range(0, q.shape[1], 1024):
            sc = q[0, s:s + 1024, h].double() @ kh.T * scale
            lse = torch.logsumexp(sc, -1)
            o.append(torch.exp(sc - lse[:, None]) @ vh)
            l.append(lse)
        outs.append(torch.cat(o))
        lses.append(torch.cat(l))
    return torch.stack(outs, 1), torch.stack(lses)


def main():
    ap = sweep_parser(__doc__, "bench_balanced.json")
    a = ap.parse_args()
    dev, props, slots = gpu_banner()
    torch.manual_seed(0)
    Lq = 3 * FSL
    scale = 1.0 / math.sqrt(D)
    q = torch.randn(1, Lq, H, D, device=dev, dtype=torch.bfloat16)
    kc = torch.randn(1, 21 * FSL, H, D, device=dev, dtype=torch.bfloat16)  # a cache: calls read a prefix
    vc = torch.randn(1, 21 * FSL, H, D, device=dev, dtype=torch.bfloat16)
    rows = {}
    for kf in KF:
        k, v = kc[:, : kf * FSL], vc[:, : kf * FSL]
        Lk = k.shape[1]
        vw = torch.zeros(1, Lk, H, 160, device=dev, dtype=torch.bfloat16)
        vw[..., :D] = v
        p = plan(1, H, Lq, Lk, slots)
        main_rows = Plan(4224, 2, 0).main_rows
        variants = {
            "cudnn": lambda: cudnn(q, k, v, scale),
            "cudnn-main": lambda: cudnn(q[:, :main_rows], k, v, scale),
            "balanced": lambda: balanced_attention(q, k, v, scale, cudnn, slots=slots, p=p),
            "split-all s2": lambda: balanced_attention(q, k, v, scale, cudnn, slots=slots, p=Plan(0, 2, 0)),
            "indicator": lambda: cudnn(q, k, vw, scale),
            "indicator-balanced": lambda: balanced_attention(q, k, vw, scale, cudnn, slots=slots, p=p),
        }
        for s in (2, 3, 4, 5, 6, 8):
            if Lk % s == 0:
                variants[f"balanced s{s}"] = (lambda s=s: balanced_attention(q, k, v, scale, cudnn, slots=slots,
                                                                              p=Plan(main_rows, s, 0)))

        def frames():
            qs = q.expand(kf, Lq, H, D).contiguous()
            o, l = cudnn(qs, k.view(kf, FSL, H, D), v.view(kf, FSL, H, D), scale)
            return merge_segments(o.view(1, kf, Lq, H, D), l.view(1, kf, H, Lq), q.dtype)

        variants["frames"] = frames
        row = {"plan": [p.main_rows, p.split, p.cost], **in_turns_ms(variants, a.calls, a.repeats)}
        torch.cuda.empty_cache()
        rows[kf] = row
        print(f"kf {kf:2d} plan {p}: " + ", ".join(f"{n} {t:.3f}" for n, t in row.items()
                                                     if n != "plan" and t is not None), flush=True)
    names = [n for n in rows[21] if n != "plan"]
    summary = {}
    print("\nrollout (150 x sum over key lengths), ms; vs cudnn")
    base = 150 * sum(rows[kf]["cudnn"] for kf in KF)
    for n in names:
        if all(rows[kf].get(n) is not None for kf in KF):
            tot = 150 * sum(rows[kf][n] for kf in KF)
            summary[n] = [tot, tot / base]
            print(f"  {n:22s} {tot / 1000:.4f} s  {tot / base:.3f}x", flush=True)
    errors = {}
    for kf in (3, 21):
        k, v = kc[:, : kf * FSL], vc[:, : kf * FSL]
        ro, rl = reference(q, k, v, scale)
        for n, fn in (("cudnn", lambda: cudnn(q, k, v, scale)),
                      ("balanced", lambda: balanced_attention(q, k, v, scale, cudnn, slots=slots))):
            o, l = fn()
            eo = (o[0, :, :2].double() - ro).abs()
            el = (l[0, :2].double() - rl).abs()
            errors[f"{n} kf{kf}"] = [eo.max().item(), eo.mean().item(), el.max().item()]
            print(f"error {n:9s} kf {kf:2d}: out max {eo.max().item():.2e} mean {eo.mean().item():.2e}, "
                  f"lse max {el.max().item():.2e}", flush=True)
        ob, _ = balanced_attention(q, k, v, scale, cudnn, slots=slots)
        oc, _ = cudnn(q, k, v, scale)
        same = bool(torch.equal(ob[:, :4224], oc[:, :4224]))
        print(f"  kf {kf}: balanced main rows == cudnn bitwise: {same}; tail rows max |diff| "
              f"{(ob[:, 4224:].float() - oc[:, 4224:].float()).abs().max().item():.2e}", flush=True)
    with open(a.out, "w") as f:
        json.dump({"device": props.name, "rows": rows, "summary": summary, "errors": errors}, f, indent=1)


if __name__ == "__main__":
    main()
