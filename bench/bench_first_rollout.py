"""Benchmark: the first rollouts of a fresh process, as a one-video `workbench generate` runs them: the 1.3B causal
Wan, random bf16 weights, 21 latent frames at 480x832 (35 DiT forwards), DiT only.

The first rollout of a shape warms up eagerly (models/common/rollout.py `RolloutGraphs`): either its first chunk,
recording the later chunks' CUDA graphs as it goes (`--warm-up chunk`, the default), or the whole rollout
(`--warm-up rollout`, before). Prints the wall time of rollouts 1-3 (2: the chunk-0 graphs are recorded, 3 and
later: replays), the steady-state rollout with and without the last chunk's context pass (`generate` skips it:
the latents are the same), and writes the first rollout's latents to `--out` so that runs in other processes can
be compared bitwise (`--compare A B`).

    python3 bench/bench_first_rollout.py --warm-up chunk --out /tmp/chunk.pt
    python3 bench/bench_first_rollout.py --warm-up rollout --out /tmp/rollout.pt
    python3 bench/bench_first_rollout.py --compare /tmp/chunk.pt /tmp/rollout.pt

Needs a CUDA GPU. Random weights: numbers are about speed, not video quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_rollout import random_model, rollout_inputs, run_rollout, timed  # noqa: E402
from models.common.rollout import RolloutGraphs  # noqa: E402


def wall(fn) -> float:
    """Seconds of one call of fn (synchronised before and after; no warm-up)."""
    return timed(fn, 1, warmups=0)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm-up", choices=["chunk", "rollout"], default="chunk")
    ap.add_argument("--out", help="write the first rollout's latents here (torch.save)")
    ap.add_argument("--repeats", type=int, default=3, help="steady-state rollouts timed per variant")
    ap.add_argument("--compare", nargs=2, metavar="PT", help="compare two --out files bitwise and exit")
    args = ap.parse_args()
    if args.compare:
        a, b = (torch.load(p) for p in args.compare)
        same = torch.equal(a, b)
        print(f"first-rollout latents {args.compare[0]} vs {args.compare[1]}: "
              f"{'bitwise equal' if same else 'DIFFERENT, max |diff| %.3g' % (a.float() - b.float()).abs().max()}")
        sys.exit(0 if same else 1)

    RolloutGraphs.warm_up_chunk = args.warm_up == "chunk"
    t0 = time.perf_counter()
    model = random_model()
    noise, context, _ = rollout_inputs()
    print(f"# model built in {time.perf_counter() - t0:.1f} s; warm-up: {args.warm_up}")
    result = {"warm_up": args.warm_up, "gpu": torch.cuda.get_device_name()}
    first = {}

    def rollout(last=True, keep=False):
        g = torch.Generator(device="cuda").manual_seed(1)
        out = run_rollout(model, noise, context, g, last_context_pass=last)
        if keep:
            first["latents"] = out

    times = [wall(lambda: rollout(keep=True))]
    graphs = model._rollout_graphs
    recorded_in_first = sorted(graphs.graphs) if graphs is not None else []
    times += [wall(rollout) for _ in range(2)]
    result["rollouts_1_3_s"] = [round(t, 3) for t in times]
    result["graphs_recorded_by_rollout_1"] = len(recorded_in_first)
    print(f"rollouts 1, 2, 3 of the process: {', '.join(f'{t:.3f} s' for t in times)} "
          f"(rollout 1 recorded {len(recorded_in_first)} graphs)")
    median35, steady = timed(rollout, args.repeats, warmups=0)
    result["steady_35_s"] = round(median35, 3)
    warm34 = [wall(lambda: rollout(last=False)) for _ in range(3)]  # a new graph key: warm-up, record, replay
    median34, steady34 = timed(lambda: rollout(last=False), args.repeats, warmups=0)
    result["first_34_s"] = [round(t, 3) for t in warm34]
    result["steady_34_s"] = round(median34, 3)
    print(f"steady state, 35 forwards (with the last context pass): {result['steady_35_s']:.3f} s "
          f"({', '.join(f'{t:.3f}' for t in steady)})")
    print(f"steady state, 34 forwards (generate's default, no last context pass): {result['steady_34_s']:.3f} s "
          f"({', '.join(f'{t:.3f}' for t in steady34)}; its first three {', '.join(f'{t:.3f}' for t in warm34)})")
    if args.out:
        torch.save(first["latents"].cpu(), args.out)
    print("json " + json.dumps(result))


if __name__ == "__main__":
    main()
