"""The operators one few-step rollout runs, counted: a CPU check that a refactor left the work unchanged.

Runs the `tiny` preset's causal rollout (21 latent frames of 8x8, float32, random weights from
bench/bench_rollout.py's `random_model`) under the torch profiler and prints each top-level aten operator with
how many times it ran, then the latents' float64 sum. Run it at two commits and diff the outputs: the same
lines mean the same operators in the same numbers and the same latents, so a GPU timing difference between the
two is the machine's, not the code's.

    git worktree add --detach /tmp/old OLD_COMMIT && cp bench/op_trace.py /tmp/old/bench/
    (cd /tmp/old && PYTHONPATH=. python bench/op_trace.py) > old.txt; PYTHONPATH=. python bench/op_trace.py > new.txt
    diff old.txt new.txt
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import bench_rollout  # noqa: E402


def main():
    torch.set_num_threads(2)
    model = bench_rollout.random_model(dtype=torch.float32, name="tiny", device="cpu")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 21, 16, 8, 8, generator=g)  # [B, F, C, H, W]
    context = torch.randn(1, 16, 32, generator=g)  # [B, text_len, text_dim] of the tiny preset
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        latents = bench_rollout.run_rollout(model, noise, context, g, cuda_graphs=False)
    counts = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            counts[event.name] += 1
    for name, n in sorted(counts.items()):
        print(name, n)
    print("latents float64 sum", float(latents.double().sum()))


if __name__ == "__main__":
    main()
