"""Benchmark: the cost of capturing attention statistics during the 1.3B few-step rollout (21 latent frames,
480x832, 35 DiT forwards, random bf16 weights, DiT only).

Rows: the plain rollout (eager, and with CUDA graphs) on the stock attention kernel (cuDNN) and on the
model's Triton kernel (attention_kernel="triton"); capture of attn_mass + attn_logit for all 30 layers x 12
heads x 5 steps, and for one layer, in the three capture modes ("exact": the model's kernel gives the output and
the log-sum-exp, a Triton kernel recomputes the frame mass; "indicator", stock kernel: the model's kernel runs
once with V widened by key-frame indicator columns; "fused", Triton kernel: the model's own forward also returns
the frame mass and the frame means; the probe keeps each key frame's mean between calls, and one more row
averages every key frame in every call, what that saves); and a materialising torch reference on one layer.
Each capture row is compared with the plain rollout of its own kernel and with the stock (cuDNN) plain rollout.
Also checks each mode's store against the exact one, that rows sum to 1, and that each mode leaves the rollout's
latents bitwise those of the plain rollout on the same kernel. Every timed row also prints the SM clock and power
draw over its timed runs (bench/gpu_power.py: the graphed rollout is power-limited on an H200).

    python bench/bench_capture.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_rollout import random_model, rollout_inputs, run_rollout, timed  # noqa: E402
from gpu_power import sampler  # noqa: E402
from models.common.attention_kernels import describe as backend_name  # noqa: E402
from models.common.rollout import release_graphs  # noqa: E402
from workbench.capture import CaptureSpec, Geometry, StatsProbe  # noqa: E402
from workbench.hooks import attach  # noqa: E402


class ReferenceProbe(StatsProbe):
    """attn_mass by the blockwise torch reference (materialises [heads, 1560, 8192] probability blocks)."""

    graph_safe = False

    def given(self, call, q, k, lse):
        from workbench.kernels.reference import frame_mass_reference

        return {"attn_mass": frame_mass_reference(q, k, frame_seq_len=call.frame_seq_len, lse=lse)}


class RecomputedKeyMeans(StatsProbe):
    """The fused store path averaging every key frame in every call (before session 21: no kept key means)."""

    reuse_key_means = False


def kernel_of(mode: str) -> str:
    """The model's attention kernel a capture mode runs with: "fused" reads the Triton kernel's statistics (the
    Gluon forward's on sm90), "indicator" the balanced cuDNN schedule's ("auto" is the Gluon forward on sm90)."""
    return {"fused": "triton", "indicator": "cudnn-balanced"}.get(mode, "auto")


def capture_run(model, noise, context, g, layers, mode, repeats, cls=StatsProbe, graphs=True,
                stats=("attn_mass", "attn_logit")):
    """One probe for every rollout of the row (reset in between), as `workbench extract` does; with graphs the
    first two rollouts warm up and record, the timed ones replay."""
    spec = CaptureSpec(tuple(layers), tuple(range(12)), (0, 1, 2, 3, 4), tuple(stats))
    geo = Geometry(batch=1, num_frames=21, frame_seq_len=1560, text_len=512)
    model.attention_kernel = kernel_of(mode)
    probe = cls(spec, geo, "cuda", mode=mode, kernel=model.attention_kernel)

    def once():
        probe.reset()
        with attach(model, probe):  # one seed for every run: the modes' stores compare cell by cell
            run_rollout(model, noise, context, torch.Generator(device="cuda").manual_seed(7), cuda_graphs=graphs)

    release_graphs(model)
    torch.cuda.reset_peak_memory_stats()
    median, times = timed(once, repeats, 2 if graphs else 1)
    peak = torch.cuda.max_memory_allocated() / 2**30
    return median, times, peak, probe.results()


def profile_capture(model, noise, context, g):
    """GPU time by kernel: one plain rollout and one all-layer fused capture (both eager, after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    spec = CaptureSpec(tuple(range(30)), tuple(range(12)), (0, 1, 2, 3, 4), ("attn_mass", "attn_logit"))
    probe = StatsProbe(spec, Geometry(batch=1, num_frames=21, frame_seq_len=1560, text_len=512), "cuda", mode="fused",
                       kernel="triton")
    for name, observers, kernel in (("plain, stock kernel", (), "auto"), ("plain, Triton kernel", (), "triton"),
                                    ("fused capture, all 30 layers", (probe,), "triton")):
        model.attention_kernel = kernel

        def once():
            probe.reset()
            with attach(model, *observers):
                run_rollout(model, noise, context, torch.Generator(device="cuda").manual_seed(7), cuda_graphs=False)
        once()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            once()
            torch.cuda.synchronize()
        cuda = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in cuda) / 1e6
        print(f"# kernel time, {name}: {total:.3f} s in {sum(e.count for e in cuda)} kernels")
        for e in cuda[: int(os.environ.get("BENCH_TOP", "15"))]:
            print(f"#   {e.self_device_time_total / 1e3:9.1f} ms  {e.count:6d}x  {e.key[:110]}")


def profile_graphed(model, noise, context, variants):
    """GPU time by kernel of one replayed graphed rollout per variant (name, kernel, probe or None, config update):
    the kernels as they run inside the CUDA graphs, at the clock the GPU holds under a full load (bench/gpu_power.py),
    with the union of busy time and the idle time between kernels."""
    import time

    from torch.profiler import ProfilerActivity, profile

    from bench_e2e import busy_span, gpu_kernels
    from models.common import triton_attention_plan as plan

    for name, kernel, probe, update in variants:
        saved, plan.FUSED_CONFIG_SM90 = plan.FUSED_CONFIG_SM90, {**plan.FUSED_CONFIG_SM90, **update}
        model.attention_kernel = kernel
        release_graphs(model)
        try:
            def once():
                if probe is not None:
                    probe.reset()
                with attach(model, *([probe] if probe is not None else [])):
                    run_rollout(model, noise, context, torch.Generator(device="cuda").manual_seed(7), cuda_graphs=True)
            for _ in range(3):  # warm-up, record, replay
                once()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                t0, u0 = time.perf_counter(), time.time()
                once()
                torch.cuda.synchronize()
                wall, u1 = time.perf_counter() - t0, time.time()
        finally:
            plan.FUSED_CONFIG_SM90 = saved
            release_graphs(model)
        kernels = gpu_kernels(prof)
        busy, span = busy_span(kernels)
        by: dict = {}
        for e in kernels:
            n, t = by.get(e.name, (0, 0.0))
            by[e.name] = (n + 1, t + (e.time_range.end - e.time_range.start) / 1e6)
        total = sum(t for _, t in by.values())
        print(f"# graphed profile, {name}: wall {wall:.3f} s (with the profiler), kernels {total:.3f} s in "
              f"{len(kernels)} launches, GPU busy {busy:.3f} s, idle between kernels {span - busy:.3f} s of a "
              f"{span:.3f} s span; {sampler.describe([(u0, u1)])}")
        for k, (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[: int(os.environ.get("BENCH_TOP", "15"))]:
            print(f"#   {t * 1000:9.1f} ms  {n:6d}x  {k[:110]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated words; run only the rows whose name has one")
    ap.add_argument("--skip-eager", action="store_true", help="skip the eager capture rows and the reference row")
    ap.add_argument("--fused-config", default="",
                    help="JSON dict (or a file holding one) updating frame_attention's Hopper config, e.g. the "
                         "output of bench/bench_fused_sweep.py --json, or '{\"MEANS\": \"torch\"}' (the frame "
                         "means beside the Gluon forward from torch instead of the default Triton passes)")
    ap.add_argument("--also-fused", action="append", default=[], metavar="JSON",
                    help="one more row 'fused, all 30 layers' with frame_attention's Hopper config updated by this "
                         "JSON dict for that row only (repeatable), e.g. '{\"MEANS\": \"triton\"}': variants timed "
                         "in one run, beside the same plain rows")
    ap.add_argument("--mass-only", action="store_true",
                    help="one more row: all-layer fused capture of attn_mass alone (no frame means for attn_logit)")
    ap.add_argument("--plain-kernels", default="auto,cudnn,cudnn-balanced,triton",
                    help="the kernels of the plain graphed rows, comma-separated (they must include 'auto', and "
                         "'triton' for the fused rows' same-kernel percentages)")
    ap.add_argument("--skip-bitwise", action="store_true",
                    help="skip the check of each mode's latents against the eager plain rollout (9 more rollouts)")
    ap.add_argument("--profile-graphs", action="store_true",
                    help="also print the GPU time by kernel of one replayed graphed rollout: plain, and all-layer "
                         "fused capture with each --also-fused config (as the kernels run under a full load)")
    ap.add_argument("--profile", action="store_true",
                    help="also print the GPU kernel time by kernel of one eager all-layer fused capture and of one "
                         "plain rollout (BENCH_TOP rows, default 15)")
    args = ap.parse_args()
    if "auto" not in args.plain_kernels.split(","):
        ap.error(f"--plain-kernels {args.plain_kernels!r}: include 'auto' (the rows compare with it)")
    sampler.start()
    import json

    from models.common import triton_attention_plan as plan

    if args.fused_config:
        text = Path(args.fused_config).read_text() if Path(args.fused_config).is_file() else args.fused_config
        plan.FUSED_CONFIG_SM90 = {**plan.FUSED_CONFIG_SM90, **json.loads(text)}
        print(f"# Triton kernel config: {plan.FUSED_CONFIG_SM90}")
    print(f"# bench_capture  {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"{torch.cuda.get_device_name()}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"# command: {' '.join(sys.argv)}")
    model = random_model()
    noise, context, g = rollout_inputs()
    torch.cuda.reset_peak_memory_stats()
    base, base_times = timed(lambda: run_rollout(model, noise, context, g, cuda_graphs=False), args.repeats)
    base_peak = torch.cuda.max_memory_allocated() / 2**30
    print("| run | wall time (median) | vs plain, same kernel | vs plain, stock kernel | peak memory | vs plain |\n"
          "|---|---|---|---|---|---|")
    print(f"| plain rollout (eager, stock kernel: {backend_name('cuda', torch.bfloat16)}) | {base:.3f} s "
          f"({', '.join(f'{t:.3f}' for t in base_times)}) | - | - | {base_peak:.2f} GiB | - |")
    graphed, gpeak = {}, {}  # kernel -> plain graphed rollout time, peak memory

    def plain_graphed(kernel):
        model.attention_kernel = kernel
        release_graphs(model)
        torch.cuda.reset_peak_memory_stats()
        t, times = timed(lambda: run_rollout(model, noise, context, g, cuda_graphs=True), args.repeats, 2)
        peak = torch.cuda.max_memory_allocated() / 2**30
        release_graphs(model)
        return t, times, peak

    for kernel in args.plain_kernels.split(","):
        try:
            graphed[kernel], times, gpeak[kernel] = plain_graphed(kernel)
            print(f"| plain rollout (CUDA graphs, {backend_name('cuda', torch.bfloat16, kernel)}) | {graphed[kernel]:.3f} s "
                  f"({', '.join(f'{t:.3f}' for t in times)}) | - | {100 * (graphed[kernel] / graphed['auto'] - 1):+.1f}% | "
                  f"{gpeak[kernel]:.2f} GiB | {gpeak[kernel] - base_peak:+.2f} GiB |")
        except Exception as err:
            print(f"| plain rollout (CUDA graphs, {kernel}) | FAILED: {type(err).__name__}: {str(err)[:200]} | | | | |")
    if args.profile:
        profile_capture(model, noise, context, g)
    if args.profile_graphs:
        spec = CaptureSpec(tuple(range(30)), tuple(range(12)), (0, 1, 2, 3, 4), ("attn_mass", "attn_logit"))
        geo = Geometry(batch=1, num_frames=21, frame_seq_len=1560, text_len=512)
        fused = lambda: StatsProbe(spec, geo, "cuda", mode="fused", kernel="triton")  # noqa: E731
        profile_graphed(model, noise, context, [("plain rollout, auto", "auto", None, {}),
                                                ("fused capture, all 30 layers", "triton", fused(), {})] +
                        [(f"fused capture, all 30 layers, {json.dumps(c)}", "triton", fused(), c)
                         for c in (json.loads(Path(a).read_text() if Path(a).is_file() else a)
                                   for a in args.also_fused)])
    results, timings = {}, {}
    extra = [json.loads(Path(a).read_text() if Path(a).is_file() else a) for a in args.also_fused]
    rows = [  # (name, layers, mode, probe class, CUDA graphs[, frame_attention config update for this row])
        ("indicator, all 30 layers", range(30), "indicator", StatsProbe, True),
        ("indicator, layer 3", [3], "indicator", StatsProbe, True),
        ("exact, all 30 layers", range(30), "exact", StatsProbe, True),
        ("exact, layer 3", [3], "exact", StatsProbe, True),
        ("fused, all 30 layers", range(30), "fused", StatsProbe, True),
        ("fused, all 30 layers, k means recomputed each call", range(30), "fused", RecomputedKeyMeans, True),
        ("fused, layer 3", [3], "fused", StatsProbe, True),
        ("indicator, all 30 layers, eager", range(30), "indicator", StatsProbe, False),
        ("indicator, layer 3, eager", [3], "indicator", StatsProbe, False),
        ("materialising torch reference, layer 3, eager", [3], "exact", ReferenceProbe, False),
    ] + [(f"fused, all 30 layers, {json.dumps(c)}", range(30), "fused", StatsProbe, True, c) for c in extra]
    if args.mass_only:  # the frame sums without attn_logit's frame means: what the means cost
        rows.append(("fused, all 30 layers, attn_mass only", range(30), "fused", StatsProbe, True, {}, ("attn_mass",)))
    if args.only:
        rows = [r for r in rows if any(word in r[0] for word in args.only.split(","))]
    if args.skip_eager:
        rows = [r for r in rows if r[4]]
    for name, layers, mode, cls, graphs, *more in rows:
        saved = plan.FUSED_CONFIG_SM90
        plan.FUSED_CONFIG_SM90 = {**saved, **(more[0] if more else {})}
        try:
            t, times, peak, res = capture_run(model, noise, context, g, layers, mode, args.repeats, cls, graphs,
                                              *more[1:])
        except Exception as err:  # report and go on: one failing mode must not hide the others
            print(f"| {name} | FAILED: {type(err).__name__}: {str(err)[:200]} | | | |")
            continue
        finally:
            plan.FUSED_CONFIG_SM90 = saved
            release_graphs(model)  # a graph recorded under this row's config must not replay under the next's
        results[name] = res
        kernel = kernel_of(mode)
        timings[name] = (t, graphs, kernel)
        if graphs and kernel in graphed:
            same, stock, ref_peak = graphed[kernel], graphed.get("auto"), gpeak[kernel]
        else:
            same, stock, ref_peak = (base, base, base_peak) if kernel == "auto" else (None, base, base_peak)
        pct = lambda ref: f"{100 * (t / ref - 1):+.1f}%" if ref else "-"  # noqa: E731
        print(f"| {name} ({kernel} kernel) | {t:.3f} s ({', '.join(f'{x:.3f}' for x in times)}) | {pct(same)} | "
              f"{pct(stock)} | {peak:.2f} GiB | {peak - ref_peak:+.2f} GiB |")
    if graphed and timings:  # the GPU's pace drifts by ~1-2% over minutes: time the baselines again, after the rows
        mean = {}
        for kernel in graphed:
            again, again_times, _ = plain_graphed(kernel)
            mean[kernel] = (graphed[kernel] + again) / 2
            print(f"# plain rollout (CUDA graphs, {kernel} kernel) timed again after the capture rows: {again:.3f} s "
                  f"({', '.join(f'{x:.3f}' for x in again_times)}); mean of both timings {mean[kernel]:.3f} s")
        for name, (t, graphs, kernel) in timings.items():
            if graphs and kernel in mean:
                print(f"# vs the means of the plain timings: {name}: {100 * (t / mean[kernel] - 1):+.1f}% over the "
                      f"plain rollout on its kernel ({kernel}), {100 * (t / mean['auto'] - 1):+.1f}% over the stock one")
    exact = results.get("exact, all 30 layers")
    for name, res in results.items():
        m = torch.from_numpy(res["attn_mass"])
        rows = m.nansum(-1)
        print(f"# {name}: attn_mass rows sum to 1 within {(rows - 1).abs().max().item():.2e}; "
              f"NaN cells {int(m.isnan().sum())} of {m.numel()}")
    for other in ("indicator", "fused"):
        res = results.get(f"{other}, all 30 layers")
        if exact is not None and res is not None:
            a, b = torch.from_numpy(exact["attn_mass"]), torch.from_numpy(res["attn_mass"])
            same_nan = bool((a.isnan() == b.isnan()).all())
            print(f"# {other} vs exact attn_mass: max |diff| {(a - b).abs().nan_to_num().max().item():.2e}, "
                  f"same NaN pattern {same_nan}")
    plains = {}
    for mode in () if args.skip_bitwise else ("exact", "indicator", "fused"):
        kernel = model.attention_kernel = kernel_of(mode)
        release_graphs(model)
        if kernel not in plains:
            plains[kernel] = run_rollout(model, noise, context, torch.Generator(device="cuda").manual_seed(7),
                                         cuda_graphs=False)
        plain = plains[kernel]
        spec = CaptureSpec(tuple(range(30)), tuple(range(12)), (0, 1, 2, 3, 4), ("attn_mass", "attn_logit"))
        probe = StatsProbe(spec, Geometry(batch=1, num_frames=21, frame_seq_len=1560, text_len=512), "cuda", mode=mode,
                           kernel=kernel)
        for _ in range(3):  # warm-up, record, replay: the last one is a replayed graph
            probe.reset()
            with attach(model, probe):
                got = run_rollout(model, noise, context, torch.Generator(device="cuda").manual_seed(7), cuda_graphs=True)
        release_graphs(model)
        print(f"# {mode} capture of all layers (graph replay, {kernel} kernel): latents bitwise equal to the eager "
              f"plain rollout on that kernel: {torch.equal(got, plain)}; max |diff| "
              f"{(got.float() - plain.float()).abs().max().item():.3e}")
    if len(plains) == 2:
        d = (plains["triton"].float() - plains["auto"].float()).abs().max().item()
        print(f"# plain rollouts on the Triton and the stock kernel differ by max |diff| {d:.3e} (bf16 rounding)")
    ref = results.get("materialising torch reference, layer 3, eager")
    if ref is not None and exact is not None:
        a = torch.from_numpy(exact["attn_mass"])[:, :, 3:4]
        b = torch.from_numpy(ref["attn_mass"])
        print(f"# exact (Triton from LSE) vs torch reference, layer 3: max |diff| {(a - b).abs().nan_to_num().max().item():.2e}")


if __name__ == "__main__":
    main()
