"""Benchmark: the whole text-to-video pipeline of `workbench generate` on one CUDA GPU, 1.3B size, 480x832.

    python3 bench/bench_e2e.py [--out DIR] [--configs today,...] [--long 84,168] [--profile] [--budget 330]
                               [--repeats 2] [--skip decoder,text]

What runs (random full-size weights drawn directly on the GPU; the numbers are about speed, not quality):
  umT5-XXL text encoder bf16 (bench/bench_vae_t5.py's specs) with the embedded tiny tokenizer (the prompt below
  is 43 of its tokens; the encoder runs on a prompt's own tokens, its output padded to 512 rows as Wan's
  is; before session 14 it ran on all 512); the 1.3B causal DiT bf16 (bench/bench_rollout.py's
  random_model, its head drawn 10x smaller so that long videos stay finite) with its CUDA graphs as generate
  runs it; the full Wan2.1 VAE decoder bf16.
A pipeline run is what `workbench generate` does for one prompt and seed, minus the file writing: encode the
prompt, draw the noise, the few-step rollout with each finished chunk pushed to a stream decoder in the
rollout's `on_chunk`, then the concatenated frames. Wall time runs from before the encode to the last frame
on the GPU (CUDA-synchronised); FPS = pixel frames / wall. The first-chunk latency is the GPU time from the
start to the end of chunk 0's decode (CUDA events). Runs are steady state: the process has already made a
video of the same shape (graphs recorded, kernels compiled); each configuration's warm-ups are not timed.

Sections, in this order (each prints a table; everything printed also goes to DIR/bench_e2e.log, the numbers
to DIR/bench_e2e.json):
 1. e2e: end to end at 21 latent frames (81 frames), for these configurations:
      today      decode inside on_chunk on the rollout's stream, reference (diffusers) decoder, last context pass
                 (what `workbench generate` did before this benchmark)
      overlap    decode on a side stream (StreamDecoder overlap), reference decoder, no last context pass
                 (`workbench generate --vae-decoder reference`)
      fast-seq   fast decoder (models/wan/vae_fast.py: channels-last, CUDA graphs), on the rollout's stream
      fast       fast decoder on a side stream: what `workbench generate` runs on CUDA (since session 17)
      fast-hi    the same with the decode stream at high priority
    --configs picks some of them, in its order. Checks: every configuration's latents equal the first's
    bitwise; each run's streamed frames equal a whole decode by the same decoder bitwise; overlapped frames
    equal the same decoder's sequential frames bitwise (when that sequential configuration ran before).
 2. long: --long (default 84,168) latent frames with a 21-frame window and 3 sink frames, configuration
    --long-config (default `fast`; `fast-seq` runs each chunk's decode after its denoising): FPS, first-chunk
    latency, peak memory, and each chunk's rollout time (events at each on_chunk)
    and decode time: is the per-chunk time flat once the window is full (chunk >= 7)? And are the decoded
    frames and the latents finite? (A run whose random data goes inf/NaN draws less power and runs faster from
    there on: its rows do not count; bench/RESULTS.md, session 23.)
 3. decoder: the decoder alone (21 latents, chunks of 3, median of --repeats): reference eager;
    + cudnn.benchmark; + channels_last_3d weights and input; fast eager; fast + CUDA graphs;
    fast + graphs + cudnn.benchmark. Each with the max / mean |difference| of its frames from the float32
    reference decode (TF32 off) and from the bf16 reference decode, and streamed == whole decode.
 4. profile (--profile): torch.profiler kernel time by category (attention, GEMM, VAE convs, norms/RoPE,
    copies, other) and stream, the union of busy time, overlap, and host gaps (GPU idle between the first and
    last kernel), for one graphed rollout (DiT only) and one pipeline run of `fast`.
 5. text: the prompt encode alone in bf16 and float32 (generate loads the encoder in float32).
 6. decoder-compile (--decoder-compile): the fast decoder's step through torch.compile (last: its compile
    time is unknown).
Each timed run's SM clock and power draw are printed beside it (bench/gpu_power.py; the graphed 1.3B rollout
draws the H200's 700 W and runs below its boost clock).
--budget: sections starting after the time budget (seconds since start) are skipped and say so.
--watchdog S (default 240): a pipeline run in which no chunk finishes for S seconds is taken as hung (a GPU kernel
that never ends would otherwise hold the run until its caller's time limit, with nothing printed): every
thread's stack goes to the log and the process exits. 0: off.
--smoke: the same script on the embedded tiny models on the CPU (checks the script; measures nothing).

Needs: CUDA, torch, transformers, diffusers, triton. Run from the repository root.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from gpu_power import sampler  # noqa: E402
from models.common.attention_kernels import ATTENTION_KERNELS  # noqa: E402

GIB = 1024 ** 3
PROMPT = "A red fox runs through a snowy forest at dawn, the camera tracks it at ground level, soft golden light."
T0 = time.perf_counter()
RESULTS: dict = {"sections": {}}
WATCHDOG: dict = {"seconds": 0.0, "file": None}  # set by main (--watchdog)


def watchdog(arm: bool) -> None:
    """(Re)start the hang watchdog (`--watchdog`): unless re-armed within its seconds, dump every thread's stack to
    the log and exit; arm=False stops it."""
    if WATCHDOG["seconds"] <= 0:
        return
    if arm:
        faulthandler.dump_traceback_later(WATCHDOG["seconds"], exit=True, file=WATCHDOG["file"])
    else:
        faulthandler.cancel_dump_traceback_later()


def elapsed() -> float:
    return time.perf_counter() - T0


class Tee:
    """Everything printed (and every traceback) also goes to the log file."""

    def __init__(self, file, out):
        self.file, self.out = file, out

    def write(self, s):
        self.out.write(s)
        self.file.write(s)
        self.file.flush()

    def flush(self):
        self.out.flush()


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")


class HostEvent:
    """torch.cuda.Event's timing interface on the host clock (the --smoke run on the CPU is synchronous)."""

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, other) -> float:
        return (other.t - self.t) * 1000


class Dev:
    """Where the benchmark runs: the GPU at full size, or (--smoke) the embedded tiny models on the CPU, which
    checks this script's logic in about a minute before a GPU run."""

    device, dtype = "cuda", torch.bfloat16
    latent = (60, 104)  # 480 x 832
    window = (21, 3)  # local_attn_size, sink_size of the long runs
    frames = 21  # latent frames of the end-to-end and decoder sections
    smoke = False

    @classmethod
    def cuda(cls) -> bool:
        return cls.device == "cuda"

    @classmethod
    def sync(cls):
        if cls.cuda():
            torch.cuda.synchronize()

    @classmethod
    def event(cls):
        return torch.cuda.Event(enable_timing=True) if cls.cuda() else HostEvent()

    @classmethod
    def reset_peak(cls):
        if cls.cuda():
            torch.cuda.reset_peak_memory_stats()

    @classmethod
    def peak_gib(cls) -> float:
        return torch.cuda.max_memory_allocated() / GIB if cls.cuda() else 0.0

    @classmethod
    def allocated_gib(cls) -> float:
        return torch.cuda.memory_allocated() / GIB if cls.cuda() else 0.0

    @classmethod
    def empty_cache(cls):
        if cls.cuda():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# Models


class Models:
    """The text encoder, DiT and VAE (two decoders sharing one set of weights)."""

    def __init__(self):
        from models.wan.text_encoder import TextEncoder
        from models.wan.vae import WanVAE

        t = time.perf_counter()
        self.tokenizer = ROOT / "data" / "embedded" / "google" / "umt5-xxl"
        if Dev.smoke:
            from models.files import load_state_dict_file
            from models.wan.checkpoint import load_wan

            embedded = ROOT / "data" / "embedded"
            self.t5_specs = None
            self.encoder = TextEncoder.from_wan_dir(embedded)
            self.model = load_wan(embedded, causal=True)
            self.vae_sd = load_state_dict_file(embedded / "Wan2.1_VAE.pth")
        else:
            from bench_rollout import random_model
            from bench_vae_t5 import UMT5_XXL, _make_module, draw_on_gpu

            make = _make_module()
            pos_std = (2 * UMT5_XXL["num_buckets"] * UMT5_XXL["num_heads"]) ** -0.5
            self.t5_specs = make.wan_t5_specs(**UMT5_XXL, norm_jitter=0.0, pos_std=pos_std)
            self.encoder = TextEncoder.from_state_dict(draw_on_gpu(self.t5_specs, Dev.dtype, seed=0), self.tokenizer,
                                                       device=Dev.device, dtype=Dev.dtype)
            self.model = random_model()
            # the head drawn 10x smaller (flow predictions of about a tenth of the latents' scale, as a trained
            # model's): with N(0, 0.02) there too, the latents of the long videos grew to inf/NaN after 10-16
            # chunks (session 23), and non-finite data draws less power, so those chunks ran at a higher clock
            with torch.no_grad():
                self.model.head.head.weight.mul_(0.1)
            self.vae_sd = draw_on_gpu(make.wan_vae_specs(make.wan_vae_shapes()), Dev.dtype, seed=0)
        self.vae = {kind: self.new_vae(kind) for kind in ("reference", "fast")}  # the same weight tensors
        Dev.sync()
        self.weights = Dev.allocated_gib()
        print(f"# models built in {time.perf_counter() - t:.1f} s: {self.weights:.2f} GiB of weights "
              f"(text encoder, DiT, VAE; {Dev.dtype})")

    def new_vae(self, decoder: str, sd=None, dtype=None):
        from models.wan.vae import WanVAE

        return WanVAE.from_state_dict(self.vae_sd if sd is None else sd, device=Dev.device,
                                      dtype=dtype or Dev.dtype, decoder=decoder)


def pipeline(m: Models, frames: int, *, decoder: str, overlap: bool, last_context_pass: bool, seed: int = 0,
             priority: int = 0, vae=None) -> dict:
    """One `workbench generate` sample (no files): encode, noise, rollout with on_chunk decode, frames."""
    from models.common.rollout import sample

    vae = vae or m.vae[decoder]
    h, w = Dev.latent
    Dev.sync()
    t0, u0 = time.perf_counter(), time.time()
    start = Dev.event()
    start.record()
    context = m.encoder.encode([PROMPT]).context  # [1, 512, 4096]
    encoded = Dev.event()
    encoded.record()
    gen = torch.Generator(device=Dev.device).manual_seed(seed)
    noise = torch.randn((1, frames, 16, h, w), generator=gen, device=Dev.device).to(Dev.dtype)
    stream = vae.stream_decoder(overlap=overlap, priority=priority)
    pending, chunk_ends, decoded = [], [], []

    def on_chunk(chunk, s, x0):
        watchdog(True)
        e = Dev.event()
        e.record()
        chunk_ends.append(e)
        pending.append(stream.push_async(x0))
        if pending[-1].done is None:  # off CUDA the decode ran right away
            decoded.append((e, Dev.event()))
            decoded[-1][1].record()

    watchdog(True)
    latents = sample(m.model, "causal_few_step", noise, context.to(Dev.device, Dev.dtype), generator=gen,
                     on_chunk=on_chunk, last_context_pass=last_context_pass)
    video = torch.cat([p.get() for p in pending], dim=2)  # [1, 3, T, 480, 832]
    end = Dev.event()
    end.record()
    Dev.sync()
    watchdog(False)
    wall, span = time.perf_counter() - t0, (u0, time.time())
    T = video.shape[2]
    dit = [start.elapsed_time(chunk_ends[0]) - start.elapsed_time(encoded)] + \
        [a.elapsed_time(b) for a, b in zip(chunk_ends, chunk_ends[1:])]
    spans = decoded or [(p.started, p.done) for p in pending]
    return dict(wall=wall, span=span, frames=T, fps=T / wall, first_ms=start.elapsed_time(spans[0][1]),
                encode_ms=start.elapsed_time(encoded), gpu_ms=start.elapsed_time(end),
                dit_ms=dit, decode_ms=[a.elapsed_time(b) for a, b in spans], latents=latents, video=video)


def summary(runs: list[dict]) -> dict:
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    return dict(wall=med("wall"), fps=med("fps"), first_ms=med("first_ms"), encode_ms=med("encode_ms"),
                walls=[round(r["wall"], 3) for r in runs])


# ----------------------------------------------------------------------------------------------------------
# 1. End to end at 21 latent frames

CONFIGS = {  # name -> (decoder, overlap, last context pass, decode stream priority)
    "today": ("reference", False, True, 0),
    "overlap": ("reference", True, False, 0),
    "fast-seq": ("fast", False, False, 0),
    "fast": ("fast", True, False, 0),
    "fast-hi": ("fast", True, False, -5),
}


def section_e2e(m: Models, repeats: int, names: list[str]) -> None:
    from models.common.rollout import RolloutGraphs

    rows, out = [], {}
    base_latents = None
    seq_frames: dict = {}
    for i, name in enumerate(names):
        decoder, overlap, last, prio = CONFIGS[name]
        kw = dict(decoder=decoder, overlap=overlap, last_context_pass=last, priority=prio)
        # warm-up: the first shape runs eagerly (compiles), then records its graphs; a later graph key (no last
        # context pass) is recorded at once, every kernel being compiled by then
        warmups = 2  # eager + record for the first; record (+ the fast decoder's second video) for the others
        t = time.perf_counter()
        for w in range(warmups):
            pipeline(m, Dev.frames, **kw)
            if i == 0 and w == 0:
                RolloutGraphs.eager_first = False
        Dev.reset_peak()
        runs = [pipeline(m, Dev.frames, **kw) for _ in range(repeats)]
        peak = Dev.peak_gib()
        s = summary(runs)
        last_run = runs[-1]
        if base_latents is None:
            base_latents = last_run["latents"]
        same_latents = torch.equal(last_run["latents"], base_latents)
        whole = m.vae[decoder].decode(last_run["latents"])
        same_whole = torch.equal(whole, last_run["video"])
        del whole
        if not overlap:
            seq_frames[decoder] = last_run["video"]
        same_seq = torch.equal(last_run["video"], seq_frames[decoder]) if decoder in seq_frames else None
        dit = sum(last_run["dit_ms"]) / 1000
        where = "side stream" + (f" (priority {prio})" if prio else "") if overlap else "same stream"
        rows.append([name, decoder, where,
                     "yes" if last else "no", f"{s['wall']:.3f} s ({', '.join(map(str, s['walls']))})",
                     f"**{s['fps']:.1f}**", f"{s['first_ms'] / 1000:.3f} s", f"{s['encode_ms']:.0f} ms",
                     f"{dit:.3f} s", f"{peak:.2f} GiB (+{peak - m.weights:.2f})",
                     f"{same_latents}", f"{same_whole}", "-" if same_seq is None or not overlap else f"{same_seq}"])
        out[name] = dict(summary=s, peak_gib=peak, latents_equal_first=same_latents, frames_equal_whole=same_whole,
                         frames_equal_sequential=same_seq, dit_chunk_ms=[round(x, 1) for x in last_run["dit_ms"]],
                         decode_chunk_ms=[round(x, 1) for x in last_run["decode_ms"]],
                         warmup_s=round(time.perf_counter() - t - sum(r["wall"] for r in runs), 1))
        out[name]["power"] = sampler.describe([r["span"] for r in runs])  # bench/gpu_power.py
        print(f"# {name}: warm-up {out[name]['warmup_s']} s; chunk rollout ms {out[name]['dit_chunk_ms']}; chunk "
              f"decode ms {out[name]['decode_chunk_ms']}; timed runs: {out[name]['power']}")
        del runs, last_run
        Dev.empty_cache()
    RolloutGraphs.eager_first = True
    h, w = Dev.latent
    table(f"End to end, {Dev.frames} latent frames -> {1 + 4 * (Dev.frames - 1)} frames of {8 * h}x{8 * w} (median "
          f"of {repeats} runs)",
          ["config", "decoder", "decode on", "last context pass", "wall", "FPS", "first chunk", "encode",
           "rollout (events)", "peak (above weights)", f"latents == {names[0]}", "frames == whole decode",
           "frames == sequential"], rows)
    RESULTS["sections"]["e2e"] = out


# ----------------------------------------------------------------------------------------------------------
# 2. The decoder alone


def _channels_last_reference(m: Models):
    """A reference VAE whose decoder weights and input are channels-last (diffusers' modules otherwise)."""
    vae = m.new_vae("reference", sd={k: v.clone() for k, v in m.vae_sd.items()})
    for mod in vae.model.decoder.modules():
        if isinstance(mod, torch.nn.Conv3d):
            mod.weight.data = mod.weight.data.contiguous(memory_format=torch.channels_last_3d)
        elif isinstance(mod, torch.nn.Conv2d):
            mod.weight.data = mod.weight.data.contiguous(memory_format=torch.channels_last)
    forward = vae.model.decoder.forward
    vae.model.decoder.forward = lambda x, *a, **k: forward(x.contiguous(memory_format=torch.channels_last_3d), *a, **k)
    return vae


def _decode_stream(vae, latents, chunk=3):
    s = vae.stream_decoder()
    return torch.cat([s.push(latents[:, i:i + chunk]) for i in range(0, latents.shape[1], chunk)], dim=2)


def section_decoder(m: Models, repeats: int, compile_only: bool = False) -> None:
    g = torch.Generator(device=Dev.device).manual_seed(1)
    latents = torch.randn(1, Dev.frames, 16, *Dev.latent, device=Dev.device, generator=g)
    # the accuracy reference: float32 weights (the same values), diffusers' modules, TF32 off
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    ref32 = m.new_vae("reference", sd={k: v.float() for k, v in m.vae_sd.items()}, dtype=torch.float32)
    t = time.perf_counter()
    want32 = _decode_stream(ref32, latents)
    Dev.sync()
    t32 = time.perf_counter() - t
    torch.backends.cudnn.allow_tf32 = tf32
    del ref32
    Dev.empty_cache()
    want16 = None

    def fresh_fast(**kw):
        vae = m.new_vae("fast")
        fd = vae.fast_decoder()
        for k, v in kw.items():
            setattr(fd, k, v)
        return vae

    def compiled_fast():
        vae = fresh_fast(graphs=False)
        fd = vae.fast_decoder()
        fd._step = torch.compile(fd._step, dynamic=False)
        return vae

    options = [] if compile_only else [
        ("reference (diffusers), eager", lambda: m.vae["reference"], {}),
        ("reference + cudnn.benchmark", lambda: m.vae["reference"], {"benchmark": True}),
        ("reference + channels_last_3d", lambda: _channels_last_reference(m), {}),
        ("fast, eager", lambda: fresh_fast(graphs=False), {}),
        ("fast + CUDA graphs", lambda: fresh_fast(graphs=True), {}),
        ("fast + CUDA graphs + cudnn.benchmark", lambda: fresh_fast(graphs=True, cudnn_benchmark=True), {}),
    ]
    if compile_only:
        options.append(("fast + torch.compile of the step (no graphs)", compiled_fast, {}))
    rows, out = [], {}
    for name, make, flags in options:
        if elapsed() > BUDGET:
            rows.append([name, "skipped (time budget)", "", "", "", ""])
            continue
        try:
            bench_before = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = flags.get("benchmark", False)
            vae = make()
            t = time.perf_counter()
            for _ in range(2):  # plan / compile, then (graphs) record
                _decode_stream(vae, latents)
            Dev.sync()
            warm = time.perf_counter() - t
            times = []
            for _ in range(repeats):
                Dev.sync()
                t = time.perf_counter()
                frames = _decode_stream(vae, latents)
                Dev.sync()
                times.append(time.perf_counter() - t)
            whole = vae.decode(latents)
            torch.backends.cudnn.benchmark = bench_before
            if want16 is None:
                want16 = frames
            d32 = (frames - want32).abs()
            d16 = (frames - want16).abs()
            med = statistics.median(times)
            rows.append([name, f"**{med:.3f} s** ({', '.join(f'{x:.3f}' for x in times)})",
                         f"{frames.shape[2] / med:.0f}", f"{float(d32.max()):.3g} / {float(d32.mean()):.2g}",
                         f"{float(d16.max()):.3g} / {float(d16.mean()):.2g}", f"{torch.equal(whole, frames)}"])
            out[name] = dict(median_s=med, times=times, warmup_s=warm, max_vs_fp32=float(d32.max()),
                             mean_vs_fp32=float(d32.mean()), max_vs_bf16_ref=float(d16.max()),
                             stream_equals_whole=torch.equal(whole, frames))
            del vae, frames, whole, d32, d16
        except Exception as e:  # one option failing must not lose the others
            torch.backends.cudnn.benchmark = False
            traceback.print_exc()
            rows.append([name, f"FAILED: {type(e).__name__}: {str(e)[:120]}", "", "", "", ""])
            out[name] = dict(error=f"{type(e).__name__}: {e}")
        Dev.empty_cache()
    rows.append(["reference, float32 (TF32 off): the accuracy reference", f"{t32:.3f} s (one run, cold)", "",
                 "0", "", ""])
    ref, fast = out.get("reference (diffusers), eager", {}), out.get("fast + CUDA graphs", {})
    if "median_s" in ref and "median_s" in fast:
        exact = fast["max_vs_fp32"] <= ref["max_vs_fp32"] * 1.5 and fast["mean_vs_fp32"] <= ref["mean_vs_fp32"] * 1.5
        verdict = (f"fast + CUDA graphs decodes in {fast['median_s'] / ref['median_s']:.2f}x the reference's time; its "
                   f"error vs float32 is max {fast['max_vs_fp32']:.3g} / mean {fast['mean_vs_fp32']:.2g} against the "
                   f"reference bf16 decoder's {ref['max_vs_fp32']:.3g} / {ref['mean_vs_fp32']:.2g}: "
                   + ("as exact (within 1.5x): it can stay the CUDA default (models/wan/vae.py DEFAULT_DECODER)"
                      if exact and fast["stream_equals_whole"] else "NOT as exact: keep the reference default"))
        print(f"\nverdict: {verdict}")
        out["verdict"] = verdict
    h, w = Dev.latent
    table(f"The VAE decoder alone: {Dev.frames} latents {h}x{w} -> {1 + 4 * (Dev.frames - 1)} frames "
          f"{8 * h}x{8 * w}, pushed in chunks of 3 "
          f"({Dev.dtype}, median of {repeats})",
          ["decoder", "time", "frames/s", "max / mean abs diff vs float32 reference",
           "max / mean abs diff vs bf16 reference", "streamed == whole decode (bitwise)"], rows)
    RESULTS["sections"]["decoder-compile" if compile_only else "decoder"] = out


# ----------------------------------------------------------------------------------------------------------
# 3. Long videos with a window


def section_long(m: Models, lengths: list[int], config: str = "fast") -> None:
    from models.common.rollout import RolloutGraphs

    decoder, overlap, last, prio = CONFIGS[config]
    kw = dict(decoder=decoder, overlap=overlap, last_context_pass=last, priority=prio)
    base = m.model.config
    m.model.config = base.replace(local_attn_size=Dev.window[0], sink_size=Dev.window[1])
    RolloutGraphs.eager_first = False  # every kernel of these shapes was compiled by the 21-frame runs
    rows, out = [], {}
    try:
        for n in lengths:
            if elapsed() > BUDGET:
                rows.append([n, "skipped (time budget)"] + [""] * 7)
                continue
            t = time.perf_counter()
            pipeline(m, n, **kw)  # records this shape's graphs
            warm = time.perf_counter() - t
            Dev.reset_peak()
            r = pipeline(m, n, **kw)
            peak = Dev.peak_gib()
            dit, dec = r["dit_ms"], r["decode_ms"]
            # random weights can drive a long video's activations out of range; a frame of inf/NaN costs the GPU
            # less power and so runs at a higher clock: say where the frames and latents stop being finite
            finite = torch.isfinite(r["video"]).flatten(3).all(dim=3).all(dim=(0, 1))  # [T] per frame
            bad = (~finite).nonzero()
            frames_ok = "all" if len(bad) == 0 else f"NOT from frame {int(bad[0])}"
            latents_ok = bool(torch.isfinite(r["latents"]).all())
            full_from = Dev.window[0] // 3  # the first chunk that finds the window full
            full = dit[full_from:] if len(dit) > full_from else dit
            rows.append([n, r["frames"], f"{r['wall']:.2f} s", f"**{r['fps']:.1f}**", f"{r['first_ms'] / 1000:.3f} s",
                         f"{peak:.2f} GiB", ", ".join(f"{x:.0f}" for x in dit[:8]),
                         f"{statistics.mean(full):.0f} / {min(full):.0f} / {max(full):.0f} / {dit[-1]:.0f} ms",
                         f"{statistics.mean(dec[1:]):.0f} / {max(dec[1:]):.0f} ms",
                         f"{frames_ok} / {'all' if latents_ok else 'NOT all'}"])
            out[n] = dict(wall=r["wall"], fps=r["fps"], first_ms=r["first_ms"], peak_gib=peak, record_run_s=warm,
                          frames_finite=frames_ok, latents_finite=latents_ok,
                          dit_chunk_ms=[round(x, 1) for x in dit], decode_chunk_ms=[round(x, 1) for x in dec],
                          power=sampler.describe([r["span"]]))
            print(f"# {n} latent frames: record run {warm:.1f} s; chunk rollout ms {out[n]['dit_chunk_ms']}; "
                  f"timed run: {out[n]['power']}; finite frames: {frames_ok}, latents: {latents_ok}")
            del r
            Dev.empty_cache()
    finally:
        m.model.config = base
        RolloutGraphs.eager_first = True
    table(f"Long videos, window {Dev.window[0]} + sink {Dev.window[1]}, config `{config}` (one timed run after the "
          "recording run; without a side stream a chunk's time includes its decode)",
          ["latent frames", "frames", "wall", "FPS", "first chunk", "peak", "rollout per chunk, chunks 0-7 (ms)",
           "rollout per chunk once the window is full: mean / min / max / last", "decode per chunk: mean / max",
           "finite: frames / latents"],
          rows)
    RESULTS["sections"]["long"] = out
    RESULTS["sections"]["long_config"] = config


# ----------------------------------------------------------------------------------------------------------
# 4. Profile

CATEGORIES = [  # (name, pattern on the lower-cased kernel name), first match wins
    ("attention", r"fmha|flash|sdpa|attn|attention|fort_native|_assemble_kernel"),
    ("VAE convs (cuDNN)", r"conv|fprop|implicit|winograd|dgrad|nhwc|ndhwc"),
    ("GEMM", r"gemm|nvjet|cutlass|xmma|cublas|matmul|sm90_"),
    ("norms / RoPE", r"norm|rope|rms"),
    ("copies / fills", r"copy|cat|fill|memset|memcpy|index"),
]


def categorize(name: str) -> str:
    low = name.lower()
    for cat, pat in CATEGORIES:
        if re.search(pat, low):
            return cat
    return "other (elementwise, ...)"


def gpu_kernels(prof) -> list:
    """The profiler's CUDA kernel events (with a duration)."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and e.time_range.end > e.time_range.start]


def busy_span(kernels) -> tuple[float, float]:
    """(seconds the GPU ran at least one of `kernels`: the union of their intervals, seconds from the first
    kernel's start to the last one's end)."""
    ivs = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, cur_s, cur_e = 0.0, None, None
    for s, e in ivs:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy / 1e6, ((ivs[-1][1] - ivs[0][0]) / 1e6 if ivs else 0.0)


def kernel_breakdown(prof, wall_s: float) -> tuple[list[list], dict]:
    """Kernel time per (category, stream), the union of busy intervals, host gaps and overlap."""
    kernels = gpu_kernels(prof)
    by: dict = {}
    streams: dict = {}
    for e in kernels:
        sid = getattr(e, "device_resource_id", 0)
        streams.setdefault(sid, 0.0)
        t = (e.time_range.end - e.time_range.start) / 1e6
        streams[sid] += t
        key = (categorize(e.name), sid)
        by[key] = by.get(key, 0.0) + t
    busy, span = busy_span(kernels)
    total = sum(by.values())
    order = sorted(streams, key=lambda s: -streams[s])
    names = {sid: f"stream {sid}" + (" (most work)" if i == 0 else "") for i, sid in enumerate(order)}
    rows = []
    for cat in [c for c, _ in CATEGORIES] + ["other (elementwise, ...)"]:
        per = [by.get((cat, sid), 0.0) for sid in order]
        if sum(per):
            rows.append([cat] + [f"{x * 1000:.1f} ms" for x in per] + [f"{sum(per) * 1000:.1f} ms",
                                                                      f"{100 * sum(per) / total:.1f}%"])
    rows.append(["**all kernels**"] + [f"{streams[s] * 1000:.1f} ms" for s in order] + [f"{total * 1000:.1f} ms",
                                                                                      "100%"])
    rows.append(["GPU busy (union over streams)"] + [""] * len(order) + [f"{busy * 1000:.1f} ms", ""])
    rows.append(["overlap (kernel time - busy)"] + [""] * len(order) + [f"{(total - busy) * 1000:.1f} ms", ""])
    rows.append(["host gaps (idle between first and last kernel)"] + [""] * len(order) +
                [f"{(span - busy) * 1000:.1f} ms", f"of a {span * 1000:.1f} ms span"])
    rows.append(["wall (host, incl. profiler overhead)"] + [""] * len(order) + [f"{wall_s * 1000:.1f} ms", ""])
    header = ["category"] + [names[s] for s in order] + ["total", "share"]
    top = {}
    for e in kernels:
        top[e.name] = top.get(e.name, 0.0) + (e.time_range.end - e.time_range.start) / 1e3
    return [header] + rows, dict(total_s=total, busy_s=busy, span_s=span, wall_s=wall_s,
                                 by={f"{c}|{s}": v for (c, s), v in by.items()},
                                 top=sorted(top.items(), key=lambda kv: -kv[1])[:25])


# 2 x multiply-adds of every Conv2d/Conv3d of the Wan2.1 decoder for 21 latents of 60x104 (480x832), counted
# with forward hooks on diffusers' decoder run on the meta device: 96.6 TF in the 192-channel and 96.6 TF in the
# 96-channel 3x3x3 convolutions, 51.2 TF in the 384-channel ones, 22.8 TF in the upsamplers' 2D convolutions.
VAE_CONV_TFLOP_21 = 274.1


def dit_tflop(config, frames: int, fsl: int, last_context_pass: bool, text_len: int = 512) -> dict:
    """Matmul FLOPs of a few-step rollout (4 steps + context pass per chunk of 3): linear layers and attention."""
    d, ffn, L, n = config.dim, config.ffn_dim, config.num_layers, 3 * fsl
    window = frames if config.local_attn_size == -1 else config.local_attn_size
    gemm = attn = 0.0
    chunks = frames // 3
    for c in range(chunks):
        forwards = 5 if (last_context_pass or c < chunks - 1) else 4
        keys = min(3 * (c + 1), window) * fsl
        gemm += forwards * L * 2 * n * (6 * d * d + 2 * d * ffn)  # q k v o, cross q o, FFN
        attn += forwards * L * 4 * n * d * (keys + text_len)  # QK^T and PV, self + cross
    return dict(gemm=gemm / 1e12, attention=attn / 1e12)


def section_profile(m: Models) -> None:
    from torch.profiler import ProfilerActivity, profile

    from models.common.rollout import RolloutGraphs, sample

    out = {}
    g = torch.Generator(device=Dev.device).manual_seed(0)
    noise = torch.randn(1, Dev.frames, 16, *Dev.latent, generator=g, device=Dev.device).to(Dev.dtype)
    context = torch.randn(1, m.encoder.text_len, m.model.config.text_dim, generator=g, device=Dev.device).to(Dev.dtype)
    rollout = lambda: sample(m.model, "causal_few_step", noise, context, generator=g)  # noqa: E731
    e2e = lambda: pipeline(m, Dev.frames, decoder="fast", overlap=True, last_context_pass=False)  # noqa: E731
    n = Dev.frames
    jobs = [(f"one graphed rollout (DiT only, {n} frames, {n // 3 * 5} forwards)", rollout),
            (f"one pipeline run, config `fast` ({n} frames)", e2e)]
    for title, fn in jobs:
        RolloutGraphs.eager_first = False  # every kernel is compiled by now: record at once
        try:
            fn()  # records this graph key (the model holds one at a time)
            fn()
        finally:
            RolloutGraphs.eager_first = True
        Dev.sync()
        activities = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if Dev.cuda() else [ProfilerActivity.CPU]
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            fn()
            Dev.sync()
            wall = time.perf_counter() - t
        rows, data = kernel_breakdown(prof, wall)
        table(f"Profile: {title}", rows[0], rows[1:])
        h, w = Dev.latent
        flops = dit_tflop(m.model.config, Dev.frames, (h // 2) * (w // 2), last_context_pass=fn is rollout)
        cat = lambda c: sum(v for k, v in data["by"].items() if k.startswith(c + "|"))  # noqa: E731
        rates = [("DiT linear layers", flops["gemm"], "GEMM"), ("attention", flops["attention"], "attention")]
        if fn is e2e and Dev.frames == 21 and Dev.latent == (60, 104):
            rates.append(("VAE convolutions", VAE_CONV_TFLOP_21, "VAE convs (cuDNN)"))
        for what, tflop, category in rates:
            secs = cat(category)
            print(f"  rate: {what}: {tflop:.1f} TFLOP in {secs:.3f} s of {category} kernels = "
                  f"{tflop / secs if secs else float('nan'):.0f} TFLOP/s")
        data["rates"] = {what: dict(tflop=tflop, seconds=cat(category)) for what, tflop, category in rates}
        print("\ntop kernels (ms, all streams):")
        for name, ms in data["top"][:15]:
            print(f"  {ms:9.1f}  [{categorize(name)}]  {name[:110]}")
        out[title] = data
    RESULTS["sections"]["profile"] = out


def section_text(m: Models) -> None:
    """The prompt encode alone, bf16 (used above) and float32 (what generate loads today)."""
    from bench_vae_t5 import draw_on_gpu

    from models.wan.text_encoder import TextEncoder

    rows = []
    for dtype, enc in ((str(m.encoder.dtype), m.encoder), ("torch.float32", None)):
        if enc is None:
            if elapsed() > BUDGET or m.t5_specs is None:
                rows.append([dtype, "skipped (time budget or --smoke)"])
                continue
            enc = TextEncoder.from_state_dict(draw_on_gpu(m.t5_specs, torch.float32, seed=0), m.tokenizer,
                                              device=Dev.device, dtype=torch.float32)
        n_tokens = enc.encode([PROMPT]).lengths[0]
        times = []
        for _ in range(3):
            Dev.sync()
            t = time.perf_counter()
            enc.encode([PROMPT])
            Dev.sync()
            times.append(time.perf_counter() - t)
        rows.append([dtype, f"{statistics.median(times) * 1000:.1f} ms"])
        if enc is not m.encoder:
            del enc
            Dev.empty_cache()
    table(f"umT5-XXL encode of one prompt ({n_tokens} tokens, padded to {m.encoder.text_len} rows after the "
          "encoder), median of 3", ["dtype", "time"], rows)


# ----------------------------------------------------------------------------------------------------------

BUDGET = 330.0


def main(argv=None) -> int:
    global BUDGET
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench_e2e"), help="folder for the log and json "
                    "(default: $OUT, else %(default)s)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per configuration (median reported)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="the e2e section's configurations, in this order "
                    "(the first compiles; latents are compared with its): comma list of %(default)s")
    ap.add_argument("--long", default="84,168", help="latent frame counts of the windowed runs ('' for none)")
    ap.add_argument("--long-config", default="fast", choices=list(CONFIGS),
                    help="the configuration of the long runs (default: %(default)s; fast-seq: the decode on the "
                         "rollout's stream, so each chunk's time is its denoising plus its decode, in turn)")
    ap.add_argument("--profile", action="store_true", help="add the torch.profiler breakdowns")
    ap.add_argument("--decoder-compile", action="store_true", help="also time torch.compile of the fast step "
                    "(last: its compile time is unknown)")
    ap.add_argument("--skip", default="", help="sections to skip: comma list of e2e, long, decoder, profile, text, "
                    "decoder-compile")
    ap.add_argument("--budget", type=float, default=BUDGET,
                    help="seconds after which the remaining sections are skipped (default: %(default)s)")
    ap.add_argument("--watchdog", type=float, default=240.0,
                    help="seconds without a finished chunk after which a pipeline run is taken as hung: every "
                    "thread's stack goes to the log and the process exits (0: off; default: %(default)s)")
    ap.add_argument("--attention-kernel", default="auto", choices=ATTENTION_KERNELS,
                    help="the DiT's attention kernel choice (models/common/attention_kernels.py; default: %(default)s)")
    ap.add_argument("--smoke", action="store_true", help="the embedded tiny models on the CPU (6 latent frames of "
                    "6x8, window 6 + sink 1, a long run of 12 frames): checks this script, measures nothing")
    args = ap.parse_args(argv)
    if hasattr(signal, "SIGUSR1"):  # `timeout -s USR1 N` (or kill -USR1) prints every thread's stack: where a run hangs
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    if args.smoke:
        Dev.device, Dev.dtype, Dev.latent, Dev.window = "cpu", torch.float32, (6, 8), (6, 1)
        Dev.frames, Dev.smoke = 6, True
        args.long = "12" if args.long == "84,168" else args.long
        torch.set_num_threads(1)
    try:
        lengths = [int(x) for x in args.long.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--long must be a comma list of latent frame counts, got {args.long!r}")
    bad = [n for n in lengths if n % 3 or n < 3]
    if bad or args.repeats < 1:
        ap.error(f"--long: {bad} are not multiples of 3; --repeats must be >= 1")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not configs or set(configs) - set(CONFIGS):
        ap.error(f"--configs: unknown {sorted(set(configs) - set(CONFIGS)) or 'none given'}; "
                 f"allowed: {', '.join(CONFIGS)}")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"e2e", "decoder", "long", "text", "profile", "decoder-compile"}
    if unknown:
        ap.error(f"--skip: unknown sections {sorted(unknown)}")
    if not torch.cuda.is_available() and not args.smoke:
        print("this benchmark needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    BUDGET = args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "bench_e2e.log", "w")
    sys.stdout, sys.stderr = Tee(log, sys.stdout), Tee(log, sys.stderr)
    WATCHDOG.update(seconds=args.watchdog, file=log)

    import diffusers
    import transformers
    import triton

    print("# bench_e2e")
    print(f"date     {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    print(f"command  python3 {' '.join(sys.argv)}")
    gpu = "none (--smoke)"
    if Dev.cuda():
        sampler.start()  # the SM clock and power over each timed run (the 1.3B rollout is power-limited)
        props = torch.cuda.get_device_properties(0)
        gpu = props.name
        print(f"gpu      {props.name}  {props.total_memory / GIB:.1f} GiB, {props.multi_processor_count} SMs  "
              f"(cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()})")
    print(f"software python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"transformers {transformers.__version__}, diffusers {diffusers.__version__}")
    from models.common.attention_kernels import describe

    print(f"settings attention backend {describe(Dev.device, Dev.dtype, args.attention_kernel)}, repeats "
          f"{args.repeats}, configs {configs}, long {lengths}, profile {args.profile}, budget {BUDGET:.0f} s")
    RESULTS.update(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   gpu=gpu, torch=torch.__version__, command=" ".join(sys.argv))
    m = Models()
    m.model.attention_kernel = args.attention_kernel
    sections = [("e2e", lambda: section_e2e(m, args.repeats, configs)),
                ("long", lambda: section_long(m, lengths, args.long_config) if lengths else None),
                ("decoder", lambda: section_decoder(m, args.repeats)),
                ("profile", lambda: section_profile(m) if args.profile else None),
                ("text", lambda: section_text(m)),
                ("decoder-compile", lambda: section_decoder(m, args.repeats, True) if args.decoder_compile else None)]
    status = 0
    for name, fn in sections:
        if name in skip:
            continue
        if elapsed() > BUDGET:
            print(f"\n### {name}: skipped (time budget {BUDGET:.0f} s reached at {elapsed():.0f} s)")
            continue
        t = time.perf_counter()
        try:
            fn()
        except Exception:
            traceback.print_exc()
            print(f"\n### {name}: FAILED (traceback above)")
            status = 1
        print(f"# section {name}: {time.perf_counter() - t:.1f} s (total {elapsed():.0f} s)")
    (out / "bench_e2e.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print(f"\nwrote {out / 'bench_e2e.log'} and {out / 'bench_e2e.json'} ({elapsed():.0f} s)")
    return status


if __name__ == "__main__":
    sys.exit(main())
