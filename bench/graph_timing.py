"""GPU time of short calls, from CUDA-graph replays: what the kernel sweeps (bench/bench_fused_sweep.py,
bench/bench_balanced.py) share. A graph of `calls` calls hides the launch gaps, as the rollout's own graphs do."""

from __future__ import annotations

import statistics

import torch


def record(fn, calls: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `calls` calls of fn, after eager warm-ups (one on a side stream, as graph capture runs)."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_ms(graph: torch.cuda.CUDAGraph, calls: int) -> float:
    """ms per call of one replay of a graph of `calls` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def graph_ms(fn, calls: int = 10, reps: int = 5) -> float:
    """GPU time per call of fn: median of `reps` replays of a graph of `calls` calls."""
    graph = record(fn, calls)
    return statistics.median(replay_ms(graph, calls) for _ in range(reps))


def in_turns_ms(fns: dict, calls: int, reps: int, on_refusal=print) -> dict:
    """{name: ms per call, or None when fn raised RuntimeError while recorded}: every fn's graph recorded
    first, then replayed `reps` times with the variants taking turns (so that whatever drifts over a sweep
    touches every variant alike); median of the replays."""
    graphs, times = {}, {}
    for name, fn in fns.items():
        try:
            graphs[name] = record(fn, calls)
        except RuntimeError as e:  # a refused shape: say so and go on
            on_refusal(f"  {name}: {str(e).splitlines()[0][:160]}")
    for _ in range(reps):
        for name, graph in graphs.items():
            times.setdefault(name, []).append(replay_ms(graph, calls))
    return {name: (statistics.median(times[name]) if name in times else None) for name in fns}


def sweep_parser(doc: str, out_name: str, repeats: int = 7):
    """The kernel sweeps' command line: --calls per graph, --repeats replays, --out JSON (under $OUT)."""
    import argparse
    import os

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), out_name))
    return ap


def gpu_banner():
    """(device, its properties, SM count), after printing the GPU, torch and cuDNN versions and the time."""
    import time

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, cuDNN "
          f"{torch.backends.cudnn.version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    return dev, props, props.multi_processor_count
