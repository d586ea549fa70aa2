"""Benchmark: `generate --compile` and `--fp8` on the 1.3B causal Wan (random bf16 weights), one few-step rollout
of 21 latent frames at 480x832 (35 DiT forwards), DiT only, CUDA-graph replay on (the default).

For each variant (a fresh model each): the first rollout (eager on the graphs' cache; for --compile it
compiles every block variant), the second (records the CUDA graphs), then the median of --repeats replayed
rollouts; peak memory; and how far the latents move from the plain model's on the same noise and
re-noising draws (max |diff|, relative Frobenius norm), next to the plain model's own graphed-vs-eager
difference (0: bitwise). For compiled variants the graphed rollout is also compared with the same compiled
model run eagerly, and a line after the table gives how many graphs dynamo compiled (the same for any number of
layers: models/wan/accel.py) and how often it hit its recompile limit (then blocks silently run eagerly).

    python3 bench/bench_compile_fp8.py [--repeats 3] [--variants plain,fp8,compile,compile+fp8,fp8-tensor]
    python3 bench/bench_compile_fp8.py --smoke      # the same steps on a CPU: the tiny model, no CUDA graphs

Needs a CUDA GPU (but --smoke). Random weights: numbers are about speed and numerics, not video quality. A
variant that fails prints its error and the others still run; variants that would start after --budget seconds
are skipped. Rows are printed (flushed) as each variant finishes, so a run cut short keeps the rows it has.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from bench.bench_rollout import random_model, rollout_inputs, run_rollout  # noqa: E402
from models.wan.accel import compile_blocks, quantize_fp8  # noqa: E402

VARIANTS = {  # the plain reference first; the per-tensor FP8 scales (the least asked for) last
    "plain": dict(),
    "fp8": dict(fp8="rowwise"),
    "compile": dict(compile="default"),
    "compile+fp8": dict(compile="default", fp8="rowwise"),
    "fp8-tensor": dict(fp8="tensor"),
}


class Smoke:
    """--smoke: the tiny preset on the CPU, 9 latent frames of 4 x 6, no CUDA graphs (checks the script, not speed)."""
    device = "cpu"

    @staticmethod
    def model():
        from models.wan.config import preset
        from models.wan.model import WanModel

        torch.manual_seed(0)
        return WanModel(preset("tiny"), causal=True).eval()

    @staticmethod
    def inputs():
        g = torch.Generator().manual_seed(0)
        return torch.randn(1, 9, 16, 4, 6, generator=g), torch.randn(1, 16, 32, generator=g), g


class H200:
    """The 1.3B causal Wan, random bf16 weights, 21 latent frames at 480 x 832 (bench/bench_rollout.py)."""
    device = "cuda"
    model = staticmethod(random_model)
    inputs = staticmethod(rollout_inputs)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats):
    """Median wall time of `repeats` calls, and the times."""
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def build(setup, compile: str | None = None, fp8: str | None = None):
    model = setup.model()
    if fp8:
        quantize_fp8(model, fp8)
    if compile:
        torch._dynamo.reset()  # a fresh start for each compiled variant (recompile limits count per code object)
        counters.clear()
        compile_blocks(model, compile)
    return model


def latents(setup, model, noise, context, graphs: bool):
    return run_rollout(model, noise, context, torch.Generator(device=setup.device).manual_seed(1), cuda_graphs=graphs)


def diff(a, b) -> str:
    d = (a.float() - b.float())
    return f"max {d.abs().max().item():.3e}, rel {(d.norm() / b.float().norm()).item():.3e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--budget", type=float, default=120.0,
                    help="seconds after which no new variant starts (default %(default)s: the whole run within ~4 min)")
    ap.add_argument("--smoke", action="store_true", help="run every step on the CPU with the tiny model")
    args = ap.parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(f"--variants {args.variants!r}: use names from {list(VARIANTS)}")
    if not args.smoke and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (--smoke runs the same steps on the CPU)")
    setup = Smoke if args.smoke else H200
    graphs = not args.smoke
    start = time.perf_counter()
    where = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(f"# bench_compile_fp8  {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"{where}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"# command: {' '.join(sys.argv)}")
    noise, context, _ = setup.inputs()
    reference = None
    compiled = []  # "variant: graphs, limit hits" of the compiled variants
    print("| variant | 1st rollout (compiles) | 2nd (records graphs) | replayed, median (runs) | peak | latents vs plain "
          "(graphed) | graphed vs eager, same model |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        if time.perf_counter() - start > args.budget:
            print(f"| {name} | skipped: past the {args.budget:.0f} s budget | | | | | |")
            continue
        try:
            if graphs:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            model = build(setup, **VARIANTS[name])
            t0 = time.perf_counter()
            run_rollout(model, noise, context, torch.Generator(device=setup.device).manual_seed(0), cuda_graphs=graphs)
            sync()
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            run_rollout(model, noise, context, torch.Generator(device=setup.device).manual_seed(0), cuda_graphs=graphs)
            sync()
            second = time.perf_counter() - t0
            g = torch.Generator(device=setup.device).manual_seed(0)
            median, times = timed(lambda: run_rollout(model, noise, context, g, cuda_graphs=graphs), args.repeats)
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if graphs else "-"
            graphed = latents(setup, model, noise, context, graphs)
            eager = latents(setup, model, noise, context, False)
            if name == "plain":
                reference = graphed
            vs_plain = "-" if reference is None or name == "plain" else diff(graphed, reference)
            same = "bitwise" if torch.equal(graphed, eager) else diff(graphed, eager)
            print(f"| {name} | {first:.2f} s | {second:.2f} s | {median:.3f} s ({', '.join(f'{t:.3f}' for t in times)}) "
                  f"| {peak} | {vs_plain} | {same} |", flush=True)
            if VARIANTS[name].get("compile"):
                hits = sum(n for why, n in counters["unimplemented"].items() if "recompile limit" in why)
                compiled.append(f"{name} {counters['stats']['unique_graphs']} graphs, {hits} recompile-limit hits")
            del model
        except Exception as err:  # one variant's failure should not hide the others' numbers
            print(f"| {name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:200]} | | | | | |", flush=True)
            traceback.print_exc(file=sys.stderr)
    if compiled:
        print(f"# dynamo: {'; '.join(compiled)}")
    if reference is not None:
        print(f"# plain latents: max |x| {reference.float().abs().max().item():.2f}, rms "
              f"{reference.float().pow(2).mean().sqrt().item():.3f}")
    print(f"# total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
