"""Benchmark: the 1.3B causal Wan, random bf16 weights, one few-step rollout of 21 latent frames at 480x832
(7 chunks x (4 steps + context pass) = 35 DiT forwards), DiT only. Prints a table: wall time per rollout,
where the GPU time goes (self-attention, cross-attention, linears, RoPE, other), peak memory, and the time
to load a full 1.3B checkpoint from safetensors.

    python bench/bench_rollout.py [--compile] [--skip-load] [--repeats 3]

Needs a CUDA GPU. Random weights: numbers are about speed and memory, not video quality.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from gpu_power import sampler  # noqa: E402
from models.common.attention_kernels import ATTENTION_KERNELS  # noqa: E402
from models.common.rollout import causal_few_step  # noqa: E402
from models.common.scheduler import FlowMatchScheduler  # noqa: E402
from models.wan.config import preset  # noqa: E402
from models.wan.model import WanModel  # noqa: E402


def random_model(dtype=torch.bfloat16, causal=True, seed=0, name="wan2.1-t2v-1.3b", device="cuda"):
    """The `name` preset (default the 1.3B) with random weights: N(0, 0.02) matrices, zero biases, unit norms."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = WanModel(preset(name), causal=causal)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or name.endswith("norm3.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def rollout_inputs(seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    noise = torch.randn(1, 21, 16, 60, 104, generator=g, device="cuda").to(dtype)
    context = torch.randn(1, 512, 4096, generator=g, device="cuda").to(dtype)
    return noise, context, g


def run_rollout(model, noise, context, g, **kw):
    s = FlowMatchScheduler(5.0)
    return causal_few_step(model, noise, context, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g, **kw)


def timed(fn, repeats, warmups=1):
    """Median wall time of `repeats` calls after `warmups` untimed ones (graphed rollouts need 2: the first
    runs eagerly on the graphs' cache, the second records the graphs)."""
    for i in range(warmups):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if warmups > 1:
            print(f"# warm-up {i + 1}: {time.perf_counter() - t0:.3f} s")
    times, spans = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0, u0 = time.perf_counter(), time.time()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        spans.append((u0, time.time()))
    if sampler.proc is not None:  # bench/gpu_power.py: a power-limited GPU runs below its boost clock
        print(f"# timed runs: {sampler.describe(spans)}")
    return statistics.median(times), times


ATTENTION_NAMES = ("fmha", "flash", "cudnn", "attention", "sdpa", "_assemble_kernel")  # kernel names, lower case


def breakdown(model, noise, context, g, **kw):
    """GPU kernel time of one rollout, by kernel family (names as cuDNN / cuBLAS / our code emit them)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import models.wan.fused as fused
    import models.wan.model as wan

    original = fused.qk_norm_rope

    def traced(*args):
        with record_function("rope"):
            return original(*args)

    wan.fused.qk_norm_rope = traced
    try:
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            run_rollout(model, noise, context, g, **kw)
            torch.cuda.synchronize()
    finally:
        wan.fused.qk_norm_rope = original
    groups = {"attention": 0.0, "linears (GEMM)": 0.0, "other": 0.0}
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = evt.self_device_time_total / 1e6
        name = evt.key.lower()
        if any(s in name for s in ATTENTION_NAMES) and "gemm" not in name:
            groups["attention"] += t
        elif any(s in name for s in ("gemm", "xmma", "cutlass", "nvjet", "sm90")):
            groups["linears (GEMM)"] += t
        else:
            groups["other"] += t
    if os.environ.get("BENCH_TOP"):
        cuda = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda e: -e.self_device_time_total)
        for e in cuda[: int(os.environ["BENCH_TOP"])]:
            print(f"#   {e.self_device_time_total / 1e3:9.1f} ms  {e.count:6d}x  {e.key[:110]}")
    rope_t = sum(e.device_time_total for e in prof.key_averages() if e.key == "rope") / 1e6
    groups["other"] -= rope_t
    groups["q/k RMSNorm + RoPE"] = rope_t
    return groups


def load_time():
    from models.wan.checkpoint import load_wan, save_wan_folder

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP", "/tmp")) as tmp:
        cfg = preset("wan2.1-t2v-1.3b")
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in WanModel(cfg).state_dict().items()}
        sd = {k: torch.randn(s, dtype=torch.float32) * 0.02 for k, s in shapes.items()}  # fp32 like the release
        save_wan_folder(tmp, cfg, sd)
        size = sum(v.numel() * 4 for v in sd.values()) / 2**30
        del sd
        os.system(f"sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = load_wan(tmp, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        del model
        return dt, size


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    ap.add_argument("--attention-kernel", default="auto", choices=ATTENTION_KERNELS,
                    help="the model's attention kernel choice (models/common/attention_kernels.py)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(f"# bench_rollout  {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"{torch.cuda.get_device_name()}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"# command: {' '.join(sys.argv)}")
    from models.common.attention_kernels import describe as backend_name

    print(f"# attention backend: {backend_name('cuda', torch.bfloat16, args.attention_kernel)}")
    model = random_model()
    model.attention_kernel = args.attention_kernel
    if args.compile:
        for block in model.blocks:
            block.compile()
    noise, context, g = rollout_inputs()
    weights = torch.cuda.memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    median, times = timed(lambda: run_rollout(model, noise, context, g, cuda_graphs=False), args.repeats)
    peak = torch.cuda.max_memory_allocated() / 2**30
    reserved = torch.cuda.max_memory_reserved() / 2**30
    print("| measurement | value |\n|---|---|")
    print(f"| rollout wall time (median of {args.repeats}) | {median:.3f} s ({', '.join(f'{t:.3f}' for t in times)}) |")
    print(f"| peak GPU memory allocated (weights {weights:.2f} GiB) | {peak:.2f} GiB (reserved {reserved:.2f} GiB) |")
    import models.wan.fused as fused

    fused.GELU_EPILOGUE = False
    no_epi, no_epi_times = timed(lambda: run_rollout(model, noise, context, g, cuda_graphs=False), args.repeats)
    fused.GELU_EPILOGUE = True
    print(f"| same without the FFN's GELU epilogue (median of {args.repeats}) | {no_epi:.3f} s "
          f"({', '.join(f'{t:.3f}' for t in no_epi_times)}) |")
    a = run_rollout(model, noise, context, torch.Generator(device="cuda").manual_seed(1), cuda_graphs=False)
    fused.GELU_EPILOGUE = False
    b = run_rollout(model, noise, context, torch.Generator(device="cuda").manual_seed(1), cuda_graphs=False)
    fused.GELU_EPILOGUE = True
    print(f"| GELU epilogue vs separate GELU: max abs difference of the latents | {(a - b).abs().max().item():.3e} "
          f"(latents' max {b.abs().max().item():.2f}) |")
    torch.cuda.reset_peak_memory_stats()
    graphed, graph_times = timed(lambda: run_rollout(model, noise, context, g, cuda_graphs=True), args.repeats, 2)
    gpeak = torch.cuda.max_memory_allocated() / 2**30
    print(f"| same with CUDA graphs per chunk (median of {args.repeats}) | {graphed:.3f} s "
          f"({', '.join(f'{t:.3f}' for t in graph_times)}), peak {gpeak:.2f} GiB |")
    a = run_rollout(model, noise, context, torch.Generator(device="cuda").manual_seed(1), cuda_graphs=True)
    b = run_rollout(model, noise, context, torch.Generator(device="cuda").manual_seed(1), cuda_graphs=False)
    print(f"| CUDA-graph rollout vs eager: max abs difference of the latents | {(a - b).abs().max().item():.3e} |")
    groups = breakdown(model, noise, context, g, cuda_graphs=False)
    gg = breakdown(model, noise, context, g, cuda_graphs=True)
    print(f"| GPU kernel time of a graphed rollout (all kernels) | {sum(gg.values()):.3f} s |")
    total = sum(groups.values())
    for name, t in groups.items():
        print(f"| GPU time: {name} | {t:.3f} s ({100 * t / total:.0f}%) |")
    if not args.skip_load:
        dt, size = load_time()
        print(f"| load 1.3B from safetensors ({size:.1f} GiB fp32) to cuda bf16 | {dt:.2f} s |")


if __name__ == "__main__":
    main()
