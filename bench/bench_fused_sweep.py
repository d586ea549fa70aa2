"""Sweep the fused frame-attention forward's block configs, lazy rescaling and last-wave splitting against the
model's own attention kernel, on the seven self-attention shapes of the 1.3B few-step rollout; also the opt-in
warp-specialised output-only forward (`FUSED_WS_CANDIDATES` in models/common/triton_attention_plan.py).

Each call: q = 3 latent frames x 1560 tokens, 12 heads x 128, bf16; k/v = 3, 6, ..., 21 key frames (chunks 0-6
of the KV-cache rollout). Times are GPU times per call from CUDA-graph replays (10 calls a graph, median of 5
replays), so host launch costs are left out as they are in the graphed rollout. The "rollout" column is
150 x the sum over the seven shapes (5 forwards x 30 layers per chunk): the self-attention time of one rollout.
Each variant's mass is checked against the exact mode (cuDNN log-sum-exp + Triton recompute) and its output
against cuDNN.

    python bench/bench_fused_sweep.py [--json best.json]     # ~1-2 min on an H200

--json writes the fastest variant's config (the dict `frame_attention._launch_frame_forward(config=...)` takes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/

import torch  # noqa: E402

from graph_timing import graph_ms  # noqa: E402
from models.common import triton_attention_plan as plan_mod  # noqa: E402
from models.common.attention_kernels import attention_with_lse  # noqa: E402
from workbench.kernels import frame_attention as fa  # noqa: E402

FSL, NQF, H, D = 1560, 3, 12, 128
KEY_FRAMES = (3, 6, 9, 12, 15, 18, 21)


def worst(a: float, b: float) -> float:
    """The larger error, NaN if either is (Python's max(0.0, nan) is 0.0 and would hide a NaN output)."""
    return float("nan") if a != a or b != b else max(a, b)


def inputs(nkf):
    g = torch.Generator(device="cuda").manual_seed(nkf)
    q = torch.randn(1, NQF * FSL, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, nkf * FSL, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, nkf * FSL, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="", help="write the fastest variant's config here")
    ap.add_argument("--quick", action="store_true", help="only the default config's variants (and the WS ones)")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"gpu: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; "
          f"cuDNN {torch.backends.cudnn.version()}")
    scale = D ** -0.5
    data = {nkf: inputs(nkf) for nkf in KEY_FRAMES}
    want = {}
    for nkf, (q, k, v) in data.items():
        out, lse = attention_with_lse(q, k, v, scale=scale)
        want[nkf] = (out, fa.frame_mass_from_lse(q, k, lse.contiguous(), frame_seq_len=FSL, scale=scale))

    variants = [("cudnn (the model's call)", None)]
    configs = [dict(plan_mod.FUSED_CONFIG_SM90)] if args.quick else \
        [dict(c) for c in plan_mod.FUSED_CANDIDATES]
    for cfg in configs:
        variants.append((None, {**cfg, "split": None}))
    base = dict(plan_mod.FUSED_CONFIG_SM90)
    variants.append((None, {**base, "split": 1}))
    for split in (2, 3, 5, 7, 11):
        variants.append((None, {**base, "split": split, "n_full": 3 * props.multi_processor_count}))
    variants.append(("default config, no mass bookkeeping", {**base, "with_mass": False}))
    variants.append(("default config, no mass bookkeeping, no split", {**base, "split": 1, "with_mass": False}))
    # the opt-in warp-specialised plain forward (output only, no mass), split as planned and never split
    # (experimental on GPUs: only with WORKBENCH_EXPERIMENTAL_WS=1, see models/common/triton_attention.py)
    if os.environ.get("WORKBENCH_EXPERIMENTAL_WS") == "1":
        for cfg in plan_mod.FUSED_WS_CANDIDATES:
            variants.append((None, {**cfg, "split": None, "with_mass": False}))
        variants.append((None, {**plan_mod.FUSED_WS_CANDIDATES[0], "split": 1, "with_mass": False}))

    rows = []
    for name, cfg in variants:
        times, errs = [], [0.0, 0.0]
        for nkf, (q, k, v) in data.items():
            if cfg is None:
                fn = lambda q=q, k=k, v=v: attention_with_lse(q, k, v, scale=scale)  # noqa: E731
            else:
                c = dict(cfg)
                with_mass = c.pop("with_mass", True)
                fn = lambda q=q, k=k, v=v, c=c, wm=with_mass: fa._launch_frame_forward(  # noqa: E731
                    q, k, v, frame_seq_len=FSL, config=c, with_mass=wm)
            try:
                res = fn()
                times.append(graph_ms(fn))
            except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
                times = None
                print(f"FAILED {name or cfg}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                break
            if cfg is not None:
                errs[0] = worst(errs[0], (res[0].float() - want[nkf][0].float()).abs().max().item())
                if res[1] is not None:
                    errs[1] = worst(errs[1], (res[1] - want[nkf][1]).abs().max().item())
        if times is not None:
            rows.append((name or json.dumps(cfg), times, 150e-3 * sum(times), errs))
        torch.cuda.empty_cache()

    base_total = rows[0][2]
    print("\n| variant | " + " | ".join(f"{n} kf" for n in KEY_FRAMES) + " | rollout | vs cuDNN | out err | mass err |")
    print("|---|" + "---|" * (len(KEY_FRAMES) + 4))
    for name, times, total, errs in rows:
        cells = " | ".join(f"{t:.3f}" for t in times)
        print(f"| {name} | {cells} | {total:.3f} s | {total / base_total:.3f}x | {errs[0]:.1e} | {errs[1]:.1e} |")
    for (_, _, cfg), n in plan_mod._SLOTS.items():  # every compiled config's resident programs and its split plans
        c = dict(cfg)
        tiles = -(-NQF * FSL // c["BLOCK_M"]) * H
        plan = {nkf: plan_mod.split_plan(tiles, n, nkf, FSL / c["BLOCK_N"]) for nkf in KEY_FRAMES}
        print(f"resident programs {n} for {c}; (n_full, split) by key frames: {plan}")
    fused = [r for r in rows[1:] if r[0].startswith("{") and "n_full" not in r[0] and '"with_mass"' not in r[0]]
    best = min(fused, key=lambda r: r[2])
    print(f"\nfastest: {best[0]}: {best[2]:.3f} s per rollout, {best[2] / base_total:.3f}x cuDNN "
          f"(+{best[2] - base_total:.3f} s)")
    plain = [r for r in rows[1:] if "no mass" in r[0] or '"with_mass": false' in r[0]]  # output-only forwards
    if plain:  # (--json keeps the fastest forward with mass above)
        fast = min(plain, key=lambda r: r[2])
        print(f"fastest output-only forward: {fast[0]}: {fast[2]:.3f} s per rollout, {fast[2] / base_total:.3f}x "
              f"cuDNN (issue 16's target: <= 0.95x)")
    if args.json:
        cfg = json.loads(best[0])
        with open(args.json, "w") as f:
            json.dump(cfg, f)


if __name__ == "__main__":
    main()
