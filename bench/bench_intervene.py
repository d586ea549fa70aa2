"""Benchmark: what interventions and KV-cache policies cost on the 1.3B causal Wan with random bf16 weights
(480x832, few-step rollout, DiT only).

    python3 bench/bench_intervene.py [--repeats 3] [--frames 42]

Part 1, 21 latent frames, CUDA graphs (as a plain rollout runs): the plain rollout against a single-head zero
ablation (one head of layer 15's self-attention, every call: target at most +2%), a mean ablation and a
temperature of the same head, and a sink scaling of frame 0 in one layer; each checked to change the latents.
Part 2, `--frames` latent frames (default 42: the window slides), a KV window of 21 frames: each cache policy of
workbench/kv_policies.py against window + sink (21, 3), today's rolling window (graphed where the policy is
graph-safe, eager otherwise; eager window + sink is listed too), with the KV-cache memory each allocates and holds
at the end and the peak GPU memory of the rollout. Prints markdown tables for bench/RESULTS.md.

`--smoke` runs every path on the CPU with the tiny model (no timing meaning): a check that the script works.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_rollout import random_model  # noqa: E402
from models.common.rollout import causal_few_step, release_graphs  # noqa: E402
from models.common.scheduler import FlowMatchScheduler  # noqa: E402
from workbench.hooks import CallFilter, attach  # noqa: E402
from workbench.interventions import HeadAblation, HeadOutputs, HeadTemperature, SinkScaling  # noqa: E402
from workbench.kv_policies import AttentionGuided, DeepSink, FifoWindow, HeadWise, WindowSink  # noqa: E402


class Bench:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = "cpu" if smoke else "cuda"
        self.dtype = torch.float32 if smoke else torch.bfloat16
        self.model = random_model(self.dtype, name="tiny" if smoke else "wan2.1-t2v-1.3b", device=self.device)
        self.latent = (4, 6) if smoke else (60, 104)
        self.text = (16, 32) if smoke else (512, 4096)

    def inputs(self, frames: int, seed: int = 0):
        g = torch.Generator(device=self.device).manual_seed(seed)
        noise = torch.randn(1, frames, 16, *self.latent, generator=g, device=self.device).to(self.dtype)
        context = torch.randn(1, *self.text, generator=g, device=self.device).to(self.dtype)
        return noise, context, g

    def rollout(self, frames: int, *subscribers, graphs: bool = True, policy=None, seed: int = 0):
        noise, context, g = self.inputs(frames, seed)
        s = FlowMatchScheduler(5.0)
        with attach(self.model, *subscribers):
            return causal_few_step(self.model, noise, context, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s,
                                   generator=g, cuda_graphs=graphs and not self.smoke, cache_policy=policy,
                                   cache_frames=frames)

    def sync(self):
        if not self.smoke:
            torch.cuda.synchronize()

    def timed(self, fn, repeats: int, warmups: int):
        for _ in range(warmups):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), times


def fmt(times) -> str:
    return ", ".join(f"{t:.3f}" for t in times)


def part_interventions(b: Bench, repeats: int) -> None:
    layer = min(15, b.model.config.num_layers - 1)
    sel = CallFilter(layers={layer}, kinds={"self"})
    reference = HeadOutputs(sel, keep_calls=False)
    b.rollout(21 if not b.smoke else 6, reference, graphs=False, seed=7)  # the mean ablation's reference batch
    frames = 21 if not b.smoke else 6
    plain_out = b.rollout(frames, graphs=False)
    print(f"\n| {frames} latent frames, CUDA graphs | median of {repeats} (s) | vs plain | runs (s) | "
          "latents changed |\n|---|---|---|---|---|")
    base, times = b.timed(lambda: b.rollout(frames), repeats, 2)
    print(f"| plain rollout | {base:.3f} | - | {fmt(times)} | - |")
    for name, edit in [
        (f"zero ablation, layer {layer} head 3", HeadAblation(sel, heads=[3])),
        (f"mean ablation, layer {layer} head 3", HeadAblation(sel, heads=[3], mode="mean", source=reference.mean())),
        (f"temperature 2, layer {layer} head 3", HeadTemperature(2.0, sel, heads=[3])),
        (f"sink scaling x0.5 of frame 0, layer {layer}, all heads", SinkScaling(0.5, [0], sel)),
    ]:
        t, times = b.timed(lambda: b.rollout(frames, edit), repeats, 2)
        changed = not torch.equal(b.rollout(frames, edit, graphs=False), plain_out)
        print(f"| {name} | {t:.3f} | {100 * (t / base - 1):+.1f}% | {fmt(times)} | {changed} |")
    release_graphs(b.model)


def part_policies(b: Bench, frames: int, repeats: int) -> None:
    cfg = b.model.config
    n = b.model.num_frame_per_block
    fsl = (b.latent[0] // 2) * (b.latent[1] // 2)
    window = 21 if not b.smoke else 9
    sink = 3 if not b.smoke else 1
    per_frame = 2 * fsl * cfg.num_heads * cfg.head_dim * cfg.num_layers * torch.finfo(b.dtype).bits // 8
    static = {layer: list(range(cfg.num_heads // 2)) for layer in range(cfg.num_layers)}  # half the heads static
    policies = [
        ("window + sink (today)", WindowSink(window, sink)),
        ("FIFO window", FifoWindow(window)),
        ("deep sink, RoPE re-aligned", DeepSink(window, window // 2)),
        ("attention-guided", AttentionGuided(window, sink)),
        ("head-wise (half the heads static, recent 6)", HeadWise(window, sink, static, static_recent=6)),
    ]
    print(f"\n| {frames} latent frames, window {window} | graphs | median of {repeats} (s) | vs window + sink "
          "(graphed) | KV cache allocated / held at the end (GiB) | peak GPU memory (GiB) |\n|---|---|---|---|---|---|")
    base = None
    for name, policy in policies:
        graphs = policy.graph_safe
        subs = (policy,) if hasattr(policy, "observe") else ()
        if not b.smoke:
            torch.cuda.reset_peak_memory_stats()
        t, times = b.timed(lambda: b.rollout(frames, *subs, graphs=graphs, policy=policy), repeats, 2 if graphs else 1)
        peak = torch.cuda.max_memory_allocated() / 2**30 if not b.smoke else float("nan")
        cap = policy.capacity(frames, n)
        held = min(cap, frames)  # at the end every layer's cache is full (nothing is dropped after the last chunk)
        base = t if base is None else base
        print(f"| {name} | {'yes' if graphs else 'no'} | {t:.3f} ({fmt(times)}) | {100 * (t / base - 1):+.1f}% | "
              f"{cap * per_frame / 2**30:.2f} / {held * per_frame / 2**30:.2f} | {peak:.2f} |")
        release_graphs(b.model)
    t, times = b.timed(lambda: b.rollout(frames, graphs=False, policy=WindowSink(window, sink)), repeats, 1)
    print(f"| window + sink, eager (for the eager policies) | no | {t:.3f} ({fmt(times)}) | "
          f"{100 * (t / base - 1):+.1f}% | - | - |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=42, help="latent frames of the policy rollouts (default 42)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model: check the script runs (no timings)")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench_intervene: needs a CUDA GPU (or --smoke for a CPU check)")
    name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"# bench_intervene  {datetime.datetime.now().isoformat(timespec='seconds')}  {name}  "
          f"torch {torch.__version__}  python {platform.python_version()}")
    print(f"# command: python3 {' '.join(sys.argv)}")
    b = Bench(args.smoke)
    part_interventions(b, args.repeats)
    part_policies(b, args.frames if not args.smoke else 18, args.repeats)


if __name__ == "__main__":
    main()
