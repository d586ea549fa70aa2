"""Samplers: the few-step causal rollout of Self-Forcing, the multi-step causal rollout with CFG, and the
bidirectional multi-step Wan sampler (the Wan baseline).

Latents here are [B, F, C, H, W] (Self-Forcing's layout); the model takes [B, C, F, H, W].

Few-step causal rollout (Self-Forcing's `CausalInferencePipeline.inference`), for each chunk
(`num_frame_per_block` frames; with the model's `independent_first_frame`, frame 0 is a chunk of its own first,
models/common/chunks.py):
    x = the chunk's noise
    for k, t_k in enumerate(warped steps):           # t = 1000, 937.5, 833.3, 625
        x0 = x - sigma(t_k) * G(x, t_k)              # KV cache: earlier frames (clean) + this chunk
        if k is not last: x = add_noise(x0, fresh noise, t_{k+1})
    output[chunk] = x0
    G(x0, context_noise)                             # the context pass: rewrites the chunk's cache slots
Per 21-frame video: 7 chunks x (4 + 1) = 35 DiT forwards.

Every forward gets `ForwardLabels` (step, timestep, chunk, phase, CFG branch) that reach the attention
observers, and `on_forward(labels, start_frame, num_frames)` is called before it (progress bars, logging).
`on_chunk(chunk, start_frame, x0)` is called once a chunk is finished, after its last forward (the context
pass included), with its clean latents x0 [B, n, C, H, W]: streaming decoders and live views start there.
Randomness comes only from `noise` and `generator`, so a seed reproduces a rollout.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import numpy as np
import torch

from models.common.attention import ForwardLabels
from models.common.graph_streams import capture_stream
from models.common.kv_cache import RolloutCache, check_policy
from models.common.labels import RunExtent
from models.common.scheduler import FlowMatchScheduler
from models.common.window import check_window_room
from models.errors import ModelInputError
from models.family import CACHE_FRAMES, check_fits_cache

OnForward = Callable[[ForwardLabels, int, int], None]
OnChunk = Callable[[int, int, torch.Tensor], None]


def _to_model(x):  # [B, F, C, H, W] -> [B, C, F, H, W]
    return x.permute(0, 2, 1, 3, 4)


def _from_model(x):
    return x.permute(0, 2, 1, 3, 4)


def nonfinite_frame(latents: torch.Tensor) -> int | None:
    """The first frame of latents [B, F, C, H, W] that holds NaN or inf in any sample (a rollout whose activations
    overflowed: every later frame attends to it through the KV cache), or None when all are finite."""
    bad = ~torch.isfinite(latents).flatten(2).all(dim=2).all(dim=0)  # [F]
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def seeded_noise(seed: int, shape, device, dtype) -> tuple[torch.Tensor, torch.Generator]:
    """(noise, generator): noise [B, F, C, h, w] drawn in float32 from a generator on `device` seeded with `seed`,
    then cast to `dtype`; the generator goes on to the sampler (the fresh noise between denoising steps). The one
    way extract, generate and the training probes draw a sample's noise (workbench/sample.py)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32).to(dtype), gen


def check_causal_geometry(model, num_frames: int, cache_frames: int) -> list[tuple[int, int]]:
    """Frame-count errors of a causal rollout, raised before any work; returns its chunks (start, count)."""
    spans = model.chunk_spans(num_frames)  # frames that do not fit the chunk layout (models/common/chunks.py)
    check_window_room(model.config.local_attn_size, model.config.sink_size, model.num_frame_per_block)
    check_fits_cache(num_frames, model.config.local_attn_size, cache_frames, remedy="set local_attn_size (a "
                     "rolling window, optionally with sink_size) or a larger cache_frames")
    if num_frames > 1024:
        raise ModelInputError(f"{num_frames} latent frames: RoPE positions past 1024 are not defined")
    return spans


def check_initial_latent(model, noise: torch.Tensor, initial_latent: torch.Tensor | None) -> None:
    """Image-to-video: the image's latent [B, 1, C, H, W] is frame 0, a chunk of its own (the model's
    independent_first_frame layout, as the researchers' I2V pipelines run it)."""
    if initial_latent is None:
        return
    if not model.independent_first_frame:
        raise ModelInputError("image-to-video puts the image's latent in a chunk of its own: the model needs "
                              "independent_first_frame (frames 1 + 3k)")
    want = (noise.shape[0], 1, *noise.shape[2:])
    if tuple(initial_latent.shape) != want:
        raise ModelInputError(f"initial latent of shape {tuple(initial_latent.shape)}; expected {list(want)} "
                              "(one latent frame of the video's size)")


# ------------------------------------------------------------------------------------------------------
# Few-step causal rollout


CONTEXT_NOISE_MULTI_STEP = ("context_noise {:g} sets the few-step sampler's context passes (the researchers' "
                            "causal_inference.py); the multi-step CFG sampler's run at t = 0, as their "
                            "causal_diffusion_inference.py: leave context_noise at 0 for it")
IMAGE_CONTEXT_NOISE = ("an image with context_noise {:g}: the image's context pass runs at t = 0 (as the researchers' "
                       "pipeline) and the other chunks' at {:g}, while a store holds one timestep per step: capture "
                       "with context_noise 0, or run it without capture")


def image_labels(context: ForwardLabels) -> ForwardLabels:
    """The labels of an image's context pass (image-to-video: chunk 0), at t = 0 whatever context_noise, as the
    researchers' pipeline pushes the image (an observer refuses a step at two timesteps: IMAGE_CONTEXT_NOISE)."""
    return ForwardLabels(context.step, 0.0, 0, context.phase, context.cfg, context.denoise_index)


def check_run(model, schedule: list[ForwardLabels], chunks: int, frames: int, skipped=()) -> None:
    """Before a sampler's first forward: each attached observer or intervention with a `check_run` (the
    workbench's probes and interventions) gets the run's `RunExtent` (`schedule`: the labels of one chunk's
    forwards; `skipped`: the (chunk, phase) pairs the run leaves out) and refuses, with a ModelInputError, a step,
    chunk, frame, phase or CFG branch it selects that the run does not have: it would otherwise see or change
    nothing there, silently."""
    subscribers = (*getattr(model, "observers", ()), *getattr(model, "interventions", ()))
    extent = RunExtent.of(schedule, chunks, frames, skipped) if subscribers else None
    for sub in subscribers:
        if callable(check := getattr(sub, "check_run", None)):
            check(extent)


def skipped_forwards(chunks: int, last_context_pass: bool, initial_latent) -> list[tuple[int, str]]:
    """The (chunk, phase) pairs a causal rollout leaves out: the last chunk's context pass without
    last_context_pass, the denoising of chunk 0 (the image) in image-to-video."""
    skipped = [] if last_context_pass else [(chunks - 1, "context")]
    return skipped + [(0, "denoise")] if initial_latent is not None else skipped


def few_step_schedule(timesteps: torch.Tensor, context_noise: float) -> list[ForwardLabels]:
    labels = [ForwardLabels(step=k, timestep=float(t), chunk=0, phase="denoise", denoise_index=k)
              for k, t in enumerate(timesteps.tolist())]
    labels.append(ForwardLabels(step=len(labels), timestep=float(context_noise), chunk=0, phase="context",
                                denoise_index=-1))
    return labels


class RolloutGraphs:
    """Every DiT forward of a few-step rollout as CUDA graphs, recorded once per rollout shape and replayed by
    the later rollouts of that shape (the host then launches one graph per forward instead of ~40 kernels per
    block, which is what separates the eager rollout from the GPU's own time).

    Lives on the model (`model._rollout_graphs`, one shape at a time) with what the graphs read and write at
    fixed addresses: the KV cache, the cross-attention cache, the text context and each forward's input. The
    first rollout of a new shape warms up eagerly on that cache (it compiles and plans every kernel): its first
    full-size chunk (frames = the model's `num_frame_per_block`; with an independent first frame the image's chunk
    before it too) runs eagerly, and from the next chunk on each new graph is recorded and replayed right away,
    so a one-video run (`workbench generate` with one prompt and seed) already runs most of its forwards from
    graphs. With an observer or intervention attached the whole first rollout runs eagerly (they may act first at
    any chunk, and set up their buffers then), and should a recording in the first rollout still meet a kernel
    that cannot be set up inside it, that forward and the rest of the rollout run eagerly. Each graph is one
    (chunk, first forward of the chunk or not); later rollouts replay them and record those the first rollout ran
    eagerly. All share one memory pool although they are not recorded in the order they replay: a graph's
    temporaries may reuse another's, which is safe because graphs run one at a time and the only tensor that
    outlives a replay, its output buffer, is cloned right after it. They are recorded on the model's own capture
    stream (models/common/graph_streams.py), so their GEMMs' cuBLAS workspace is theirs alone: the VAE decoder's
    graphs replay beside them on the decode stream. The first forward of a chunk gets its own graph
    because it may evict from a windowed cache; the others overwrite the same slots (the context pass, which
    stops short, `cache_only`, has one of its own). Graphs are used only
    on CUDA, without gradients and while nothing outside the model watches its modules (a forward hook, nnsight:
    `_watched`), and are dropped when the model's parameters or config (its window, sink), the rollout's shape or
    the attached observers change. Replays run exactly the recorded kernels, so a graphed rollout equals the eager
    one bitwise (tests/test_rollout.py, on a GPU).

    Observers: graphs are used only when every attached observer is `graph_safe`, i.e. its per-call work is
    GPU work into buffers at fixed addresses, and it implements `begin_recording()`, `end_recording()` (the
    calls it saw while a graph was recorded) and `replay_recorded(calls)` (its host-side bookkeeping for a
    replay of those calls). Interventions: graphs are used only when every attached intervention is
    `graph_safe` (its edits are GPU work on tensors at fixed addresses); their `key`s (settings) are part of
    the graphs' key. With either attached every forward gets its own graph, keyed by that forward's labels, so
    a graph replays only for a forward labelled exactly as the one it recorded (what an observer or an
    intervention selects by)."""

    eager_first = True  # the first rollout of a shape warms up eagerly; False: record at once (every kernel of the
    # shape must already be compiled and planned, e.g. by a shorter rollout of the same model: benchmarks)
    warm_up_chunk = True  # the warm-up is the first full-size chunk (without subscribers); False: the whole rollout

    def __init__(self, key, model, batch: int, frames: int, fsl: int, context: torch.Tensor, dtype, policy=None):
        self.key = key
        self.cache = RolloutCache.allocate(model.config, batch, frames, fsl, dtype=dtype, device=context.device,
                                           policy=policy, chunk_frames=model.num_frame_per_block)
        self.context = torch.empty_like(context)
        self.pool = None
        self.graphs: dict = {}  # (chunk, first[, labels]) -> (graph, x, t, out, cache state after, observer calls,
        #                                                         the RoPE tables it reads)
        self.observers = tuple(model.observers)  # held, so that their buffers outlive the graphs that write them
        self.interventions = tuple(model.interventions)  # likewise (their tensors are read by the graphs)
        self.pool_bytes = 0  # what its recordings reserved for their pool (a forward's working memory, ~)
        self.rollouts = 0
        self.warm = False  # this rollout's eager warm-up is over (set once its first full-size chunk has run)
        self._warm_chunk = None  # the chunk whose eager forwards are the warm-up
        self._cold = False  # a recording of this rollout failed: the rest of it runs eagerly

    def begin(self, model, context: torch.Tensor, policy=None) -> None:
        """Start a rollout: new context and cross-attention keys/values, an empty cache (slots are rewritten
        before they are read), this rollout's cache policy (one of an equal key: its decisions are the same, and
        what it records of them, `describe()`, is its own)."""
        self.context.copy_(context)
        if policy is not None and policy is not self.cache.policy:  # (the allocation checked the first)
            check_policy(policy)
        self.cache.policy = policy
        for kv in self.cache.kv:
            kv.clear()
        self.rollouts += 1
        self.warm, self._warm_chunk, self._cold = self.rollouts > 1 or not self.eager_first, None, False
        if not self._eager():  # the eager warm-up rollout fills the cross cache; graphs read it in place
            model.fill_cross_cache(self.context, self.cache)

    def _eager(self) -> bool:
        """Whether this rollout (counted from 1 once begun) starts with the eager warm-up of the shape."""
        return self.eager_first and self.rollouts == 1

    def _warm_up(self, model, x, chunk: int) -> bool:
        """Whether this forward (x [B, C, F, H, W] of `chunk`) runs eagerly as part of the warm-up; notes when
        the warm-up is over."""
        if self.warm:
            return False
        if not self.warm_up_chunk or self.observers or self.interventions or self._cold:
            return True  # the whole first rollout
        if self._warm_chunk is None and x.shape[2] == model.num_frame_per_block:
            self._warm_chunk = chunk  # the first full-size chunk: its forwards are the last eager ones
        if self._warm_chunk is not None and chunk > self._warm_chunk:
            self.warm = True
            return False
        return True

    def forward(self, model, x, t, start: int, chunk: int, first: bool, labels: ForwardLabels,
                cache_only: bool = False):
        run = dict(cache=self.cache, start_frame=start, labels=labels, cache_only=cache_only)
        if self._warm_up(model, x, chunk):  # warm-up: eager on the graphs' cache
            return model(x, t, self.context, **run)
        key = (chunk, first, cache_only) + ((labels,) if self.observers or self.interventions else ())
        if key not in self.graphs:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            xs, ts = x.clone(), t.clone()
            # this forward's RoPE tables, computed now if new (not inside the recording) and held with the graph,
            # which reads them in place even after the model's own cache lets them go
            rope = model.rope_for(xs, start)
            graph = torch.cuda.CUDAGraph()
            before = [kv.state() for kv in self.cache.kv]
            for obs in self.observers:
                obs.begin_recording()
            # (the recording begins with empty_cache(): done first, so that the cached blocks it gives back are not
            # taken from what the pool adds)
            torch.cuda.empty_cache()
            reserved = torch.cuda.memory_reserved(xs.device)
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=capture_stream(model, xs.device)):
                    out = model(xs, ts, self.context, **run)
            except Exception:
                if self.rollouts > 1 or not self.eager_first:
                    raise  # every kernel ran in the warm-up: a real error
                # the first rollout met a kernel that its warm-up did not set up (e.g. one compiled for a key
                # length only later chunks have), which cannot be done inside a recording: no kernel of the
                # recording ran, so with the cache's bookkeeping put back this forward and the rest of the
                # rollout run eagerly
                torch.cuda.synchronize()
                for kv, kv_state in zip(self.cache.kv, before):
                    kv.restore(kv_state)
                self.warm, self._cold = False, True
                return model(x, t, self.context, **run)
            finally:
                seen = [obs.end_recording() for obs in self.observers]
            self.pool_bytes += max(0, torch.cuda.memory_reserved(xs.device) - reserved)
            state = [kv.state() for kv in self.cache.kv]
            self.graphs[key] = (graph, xs, ts, out, state, seen, rope)
            replayed = False  # the calls were seen (and their bookkeeping done) while recording
        else:
            replayed = True
        graph, xs, ts, out, state, seen, _ = self.graphs[key]
        xs.copy_(x)
        ts.copy_(t)
        graph.replay()
        for kv, kv_state in zip(self.cache.kv, state):
            kv.restore(kv_state)
        if replayed:
            for obs, calls in zip(self.observers, seen):
                obs.replay_recorded(calls)
        return None if out is None else out.clone()  # the graph's output buffer is rewritten by its next replay


def _rollout_graphs(model, noise, context, cuda_graphs, extra_key, devices=("cuda",),
                    policy=None) -> RolloutGraphs | None:
    """The model's `RolloutGraphs` for this rollout's shape, or None when the rollout runs eagerly. (`devices`
    lets the CPU tests check which rollouts share graphs.)"""
    if cuda_graphs is None:
        cuda_graphs = os.environ.get("WORKBENCH_CUDA_GRAPHS", "1") == "1"
    if not cuda_graphs or noise.device.type not in devices or torch.is_grad_enabled():
        return None  # graphs need CUDA and no autograd
    if not all(getattr(sub, "graph_safe", False) for sub in (*model.observers, *model.interventions)):
        return None  # an observer or intervention that runs arbitrary Python per attention call
    if policy is not None and not policy.graph_safe:
        return None  # a cache policy whose decisions depend on the data
    from models.wan import fused
    from models.wan import model as wan

    if _watched(model, wan.watched):
        return None  # a replay would run none of the watchers' Python

    fsl = model.config.tokens_per_frame(*noise.shape[3:])  # noise [B, F, C, h, w]
    params = tuple(p.data_ptr() for p in model.parameters())
    compiled = tuple(getattr(b, "_compiled_call_impl", None) is not None for b in model.blocks)  # compile_blocks
    key = (tuple(noise.shape), noise.dtype, str(noise.device), tuple(context.shape), context.dtype, params,
           model.config, compiled,
           fused.GELU_EPILOGUE, fused.COMPILE, fused.NORM_KERNELS, fused.RESIDUAL_NORMS, wan.DIRECT_KV_WRITES,
           wan.CONTIGUOUS_TOKENS, wan.CACHE_ONLY_SKIPS_LAST_BLOCK,
           getattr(model, "attention_kernel", "auto"),
           tuple(iv.key for iv in model.interventions), model.num_frame_per_block, model.independent_first_frame,
           extra_key, None if policy is None else policy.key)
    current = getattr(model, "_rollout_graphs", None)
    same = current is not None and _same(current.observers, model.observers) and \
        _same(current.interventions, model.interventions)
    if current is None or current.key != key or not same:
        model._rollout_graphs = None  # free the old cache and pool first
        current = model._rollout_graphs = RolloutGraphs(key, model, noise.shape[0], noise.shape[1], fsl, context,
                                                        noise.dtype, policy)
    return current


def _watched(model, blocks_watched) -> bool:
    """Whether something outside the model watches it: a forward hook or pre-hook on it or on a module in it, a
    `forward` set on an instance (nnsight, a monkeypatch), or what `blocks_watched` (models/wan/model.py
    `watched`) finds in a block or the head. A graph's replay runs none of their Python, so such a rollout runs
    eagerly."""
    if any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in model.modules()):
        return True
    return any(blocks_watched(m) for m in (*model.blocks, model.head))


def _same(held: tuple, attached) -> bool:
    attached = tuple(attached)
    return len(held) == len(attached) and all(a is b for a, b in zip(held, attached))


def release_graphs(model) -> None:
    """Free the recorded rollout graphs of a model and their cache (they are rebuilt when needed)."""
    model._rollout_graphs = None


def eager_cache(model, device: torch.device, allocate: Callable[[], RolloutCache], devices=("cuda",),
                room: Callable[[], int] | None = None) -> RolloutCache:
    """The cache of a rollout on `device` that runs eagerly, from `allocate()`. The model's recorded graphs
    (`model._rollout_graphs`: a rollout's cache and the graphs' memory pool, ~6 GiB for the 1.3B model at 21
    latent frames) stay for the next graphed rollout to replay while the GPU has room for this rollout beside
    them; they are let go first (recorded again when next needed) when it has not: when this cache does not fit,
    or when what is free after it is less than the graphs' pool (about a forward's working memory). `room()`:
    the bytes this rollout's forwards can still allocate (default: the device's; the CPU tests give their own)."""
    held = getattr(model, "_rollout_graphs", None)
    if held is None or held.context.device != device or device.type not in devices:
        return allocate()
    pool_bytes = held.pool_bytes
    del held  # (no reference here may keep the graphs alive once they are let go)
    try:
        cache = allocate()
    except torch.cuda.OutOfMemoryError:
        cache = None  # (retried below, outside this block: its traceback holds the failed call's frames)
    if cache is None or (room() if room else _room(device, pool_bytes)) < pool_bytes:
        release_graphs(model)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # (the graphs' pool and cache go back to the device)
    return allocate() if cache is None else cache


def _room(device, pool_bytes: int) -> int:
    """The bytes an eager forward on `device` can still allocate: the device's free memory (within a memory
    fraction set for this process) and what the allocator holds unused outside the graphs' pool."""
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda device: 1.0)(device)  # (not in all)
    limit = int(fraction * total) - reserved  # (cut, as the allocator cuts it)
    return min(free, max(0, limit)) + max(0, reserved - torch.cuda.memory_allocated(device) - pool_bytes)


@torch.no_grad()
def causal_few_step(model, noise: torch.Tensor, context: torch.Tensor, *, timesteps: torch.Tensor,
                    scheduler: FlowMatchScheduler, context_noise: float = 0.0, generator: torch.Generator | None = None,
                    cache_frames: int = CACHE_FRAMES, last_context_pass: bool = True,
                    on_forward: OnForward | None = None, cuda_graphs: bool | None = None,
                    on_chunk: OnChunk | None = None, initial_latent: torch.Tensor | None = None,
                    cache_policy=None):
    """noise [B, F, C, H, W], context [B, text_len, text_dim] -> clean latents [B, F, C, H, W].

    initial_latent [B, 1, C, H, W] (image-to-video; the model's independent_first_frame layout): chunk 0 is not
    denoised: the image's latent is frame 0 of the output and only its context pass runs, at t = 0 whatever
    context_noise (the researchers' pipeline pushes the image into the cache at t = 0).

    timesteps: the warped denoising steps (float32, e.g. [1000, 937.5, 833.33, 625]). cuda_graphs: replay the
    forwards from CUDA graphs recorded by an earlier rollout of the same shape (`RolloutGraphs`; CUDA, no
    observers; None: the WORKBENCH_CUDA_GRAPHS setting, on unless it is "0"). cache_policy: a KV-cache policy
    (models/common/kv_cache.py `CachePolicy`, workbench/kv_policies.py) applied to every layer's cache after each chunk;
    None: the model's window and sink."""
    B, Fr = noise.shape[:2]
    # (a policy sizes its own cache)
    spans = check_causal_geometry(model, Fr, cache_frames if cache_policy is None else Fr)
    check_initial_latent(model, noise, initial_latent)
    fsl = model.config.tokens_per_frame(*noise.shape[3:])  # noise [B, F, C, h, w]
    schedule = few_step_schedule(timesteps, context_noise)
    check_run(model, schedule, len(spans), Fr, skipped=skipped_forwards(len(spans), last_context_pass, initial_latent))
    graphs = _rollout_graphs(model, noise, context, cuda_graphs,
                             (tuple(timesteps.tolist()), float(context_noise), last_context_pass, cache_frames,
                              initial_latent is not None),
                             policy=cache_policy)
    if graphs is None:
        allocate = functools.partial(RolloutCache.allocate, model.config, B, Fr, fsl, dtype=noise.dtype,
                                     device=noise.device, policy=cache_policy, chunk_frames=model.num_frame_per_block)
        cache = eager_cache(model, noise.device, allocate)
    else:
        graphs.begin(model, context, cache_policy)
        cache = graphs.cache
    output = torch.zeros_like(noise)
    for chunk, (start, n) in enumerate(spans):
        x = noise[:, start : start + n]

        def forward(x_in, t, labels, start=start, n=n):
            if on_forward:
                on_forward(labels, start, n)
            cache_only = labels.phase == "context"  # (its flow feeds nothing: the model may stop short)
            if graphs is not None:  # step 0 is the chunk's first forward, the one that places it in the cache
                return graphs.forward(model, x_in, t, start, chunk, labels.step == 0, labels, cache_only)
            return model(x_in, t, context, cache=cache, start_frame=start, labels=labels, cache_only=cache_only)

        if chunk == 0 and initial_latent is not None:  # image-to-video: frame 0 is the image's latent
            x0 = initial_latent.to(noise.dtype)
            t = torch.zeros((B, 1), device=noise.device, dtype=torch.float32)  # at 0 whatever context_noise, as theirs
            forward(_to_model(x0), t, image_labels(schedule[-1]))  # its context pass only
        else:
            for k, base in enumerate(schedule[:-1]):
                t = torch.full((B, n), base.timestep, device=noise.device, dtype=torch.float32)
                flow = _from_model(forward(_to_model(x), t, _with_chunk(base, chunk)))
                x0 = scheduler.x0_from_flow(flow, x, t)
                if k + 1 < len(timesteps):
                    # a float64 run draws float32's noise (its randn is another stream), so that it is the float32
                    # run's reference; other dtypes draw in their own, as the researchers' pipeline does
                    draw = torch.float32 if x0.dtype == torch.float64 else x0.dtype
                    fresh = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=draw).to(x0.dtype)
                    x = scheduler.add_noise(x0, fresh, torch.full((B, n), schedule[k + 1].timestep, device=x0.device))
            if last_context_pass or chunk < len(spans) - 1:
                t = torch.full((B, n), float(context_noise), device=noise.device, dtype=torch.float32)
                forward(_to_model(x0), t, _with_chunk(schedule[-1], chunk))
        output[:, start : start + n] = x0
        if cache_policy is not None:
            cache.after_chunk(chunk, spans[chunk + 1][1] if chunk + 1 < len(spans) else 0)  # the next chunk's frames
        if on_chunk:
            on_chunk(chunk, start, x0)
    return output


def _with_chunk(labels: ForwardLabels, chunk: int) -> ForwardLabels:
    return ForwardLabels(labels.step, labels.timestep, chunk, labels.phase, labels.cfg, labels.denoise_index)


# ------------------------------------------------------------------------------------------------------
# Multi-step samplers (CFG)


class MultiStepSolver:
    """A fresh multi-step flow solver: 'unipc' (diffusers' UniPC in flow mode on Wan's sigmas) or 'euler'.

    Wan's own FlowUniPCMultistepScheduler (wan/utils/fm_solvers_unipc.py, which the researchers' multi-step
    pipelines and Wan's text2video run) spaces the unshifted sigmas as linspace(sigma_max, 0, N + 1)[:-1], sigma_max
    the largest of its 1000-step training grid (0.999 in float32), then shifts them; diffusers' default flow grid is
    linspace(1, 1/1000, N + 1)[:-1] (4 steps at shift 5: timesteps 999, 937, 833, 625 against Wan's 624). So the
    sigmas are given to diffusers' solver (the same UniPC update) as Wan makes them."""

    def __init__(self, kind: str, steps: int, shift: float, device="cpu"):
        if kind not in ("unipc", "euler"):
            raise ModelInputError(f"unknown solver {kind!r}; use 'unipc' or 'euler'")
        if steps < 1:
            raise ModelInputError(f"num_inference_steps {steps} must be >= 1")
        self.kind = kind
        if kind == "unipc":
            from diffusers import UniPCMultistepScheduler

            self._s = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                              use_flow_sigmas=True, flow_shift=shift)
            sigma_max = float(np.float32(1 - 1 / 1000))  # Wan's: 1 - alphas[0] of its grid, held in float32
            self._s.set_timesteps(device=device, sigmas=np.linspace(sigma_max, 0.0, steps + 1)[:-1])
            self.timesteps = [float(t) for t in self._s.timesteps]
        else:
            s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
            self.sigmas = shift * s / (1 + (shift - 1) * s)
            self.timesteps = [float(x) for x in self.sigmas[:-1] * 1000]

    def step(self, i: int, flow: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "unipc":
            return self._s.step(flow, self._s.timesteps[i], x, return_dict=False)[0]
        return (x.double() + (self.sigmas[i + 1] - self.sigmas[i]) * flow.double()).to(x.dtype)


def multistep_schedule(timesteps: list[float], cfg: bool, context_pass: bool):
    branches = ["cond", "uncond"] if cfg else ["none"]
    labels = []
    for i, t in enumerate(timesteps):
        for b in branches:
            labels.append(ForwardLabels(step=len(labels), timestep=t, chunk=0, phase="denoise", cfg=b, denoise_index=i))
    if context_pass:
        for b in branches:
            labels.append(ForwardLabels(step=len(labels), timestep=0.0, chunk=0, phase="context",
                                        cfg=b, denoise_index=-1))
    return labels


@torch.no_grad()
def causal_multi_step(model, noise, context, negative_context, *, steps: int = 50, shift: float = 5.0,
                      guidance_scale: float = 5.0, solver: str = "unipc",
                      cache_frames: int = CACHE_FRAMES, on_forward: OnForward | None = None,
                      on_chunk: OnChunk | None = None,
                      initial_latent: torch.Tensor | None = None):
    """Causal rollout with a multi-step solver and classifier-free guidance per chunk (separate positive and
    negative KV caches), v = v_u + g (v_c - v_u); after each chunk a context pass on both caches. With an
    initial latent (image-to-video) chunk 0 is the image: only its context passes run, as in `causal_few_step`."""
    B, Fr = noise.shape[:2]
    spans = check_causal_geometry(model, Fr, cache_frames)
    check_initial_latent(model, noise, initial_latent)
    fsl = model.config.tokens_per_frame(*noise.shape[3:])  # noise [B, F, C, h, w]
    check_run(model, multistep_schedule([0.0] * steps, True, True), len(spans), Fr,
              skipped=skipped_forwards(len(spans), True, initial_latent))
    caches = {b: RolloutCache.allocate(model.config, B, Fr, fsl, dtype=noise.dtype, device=noise.device)
              for b in ("cond", "uncond")}
    texts = {"cond": context, "uncond": negative_context}
    output = torch.zeros_like(noise)
    for chunk, (start, n) in enumerate(spans):
        x = noise[:, start : start + n]
        solve = MultiStepSolver(solver, steps, shift, noise.device)
        schedule = multistep_schedule(solve.timesteps, True, True)
        image = chunk == 0 and initial_latent is not None  # image-to-video: no denoising, x is the image
        if image:
            x = initial_latent.to(noise.dtype)
        for i in range(0 if image else steps):
            flows = {}
            for base in schedule[2 * i : 2 * i + 2]:
                labels = _with_chunk(base, chunk)
                t = torch.full((B, n), base.timestep, device=noise.device, dtype=torch.float32)
                if on_forward:
                    on_forward(labels, start, n)
                flows[base.cfg] = _from_model(model(_to_model(x), t, texts[base.cfg], cache=caches[base.cfg],
                                                    start_frame=start, labels=labels))
            flow = flows["uncond"] + guidance_scale * (flows["cond"] - flows["uncond"])
            x = solve.step(i, flow, x)
        output[:, start : start + n] = x
        for base in schedule[2 * steps :]:
            labels = _with_chunk(base, chunk)
            t = torch.zeros((B, n), device=noise.device, dtype=torch.float32)  # t = 0, as theirs (no context_noise)
            if on_forward:
                on_forward(labels, start, n)
            model(_to_model(x), t, texts[base.cfg], cache=caches[base.cfg], start_frame=start, labels=labels,
                  cache_only=True)
        if on_chunk:
            on_chunk(chunk, start, x)
    return output


@torch.no_grad()
def bidirectional(model, noise, context, negative_context=None, *, steps: int = 50, shift: float = 5.0,
                  guidance_scale: float = 5.0, solver: str = "unipc", on_forward: OnForward | None = None,
                  return_trajectory: list[int] | None = None, on_chunk: OnChunk | None = None):
    """The Wan baseline: every frame denoised together by the bidirectional model, CFG when a negative context
    is given. With `return_trajectory=[i, ...]` also returns the latents before those step indices (ODE pairs)."""
    if model.causal:
        raise ModelInputError("the bidirectional sampler needs the bidirectional model (causal=False)")
    B, Fr = noise.shape[:2]
    solve = MultiStepSolver(solver, steps, shift, noise.device)
    cfg = negative_context is not None
    schedule = multistep_schedule(solve.timesteps, cfg, False)
    check_run(model, schedule, 1, Fr)
    per_step = 2 if cfg else 1
    x, trajectory = noise, []
    for i in range(steps):
        if return_trajectory is not None and i in return_trajectory:
            trajectory.append(x)
        flows = {}
        for labels in schedule[per_step * i : per_step * (i + 1)]:
            t = torch.full((B,), labels.timestep, device=noise.device, dtype=torch.float32)
            if on_forward:
                on_forward(labels, 0, Fr)
            text = negative_context if labels.cfg == "uncond" else context
            flows[labels.cfg] = _from_model(model(_to_model(x), t, text, labels=labels))
        flow = flows["uncond"] + guidance_scale * (flows["cond"] - flows["uncond"]) if cfg else flows["none"]
        x = solve.step(i, flow, x)
    if on_chunk:  # one chunk: every frame
        on_chunk(0, 0, x)
    if return_trajectory is not None:
        return x, trajectory
    return x


# ------------------------------------------------------------------------------------------------------
# One entry for all samplers

SAMPLERS = ("causal_few_step", "causal_multi_step_cfg", "bidirectional")


def sample(model, sampler: str, noise, context, negative_context=None, *, generator=None,
           denoising_step_list=(1000, 750, 500, 250), timestep_shift: float = 5.0, context_noise: float = 0.0,
           warp_denoising_step: bool = True, num_inference_steps: int = 50, guidance_scale: float = 5.0,
           on_forward: OnForward | None = None, on_chunk: OnChunk | None = None,
           initial_latent: torch.Tensor | None = None, last_context_pass: bool = True, cache_policy=None):
    """Run the named sampler: `causal_few_step` (Self-Forcing inference), `causal_multi_step_cfg` (causal
    model, multi-step solver with CFG) or `bidirectional` (the Wan baseline). noise [B, F, C, H, W];
    initial_latent [B, 1, C, H, W]: image-to-video (causal samplers, independent_first_frame layout).
    last_context_pass=False skips the few-step rollout's context pass after its last chunk: it only writes the
    KV cache, so the latents are the same bits (one forward fewer, nothing of it to observe).
    warp_denoising_step=False: the few-step sampler's steps are its timesteps as given (FlowMatchScheduler
    `denoising_timesteps`)."""
    if initial_latent is not None and sampler == "bidirectional":
        raise ModelInputError("image-to-video runs the causal samplers (the image is the first chunk of the cache)")
    if sampler == "causal_few_step":
        sched = FlowMatchScheduler(timestep_shift)
        timesteps = sched.denoising_timesteps(denoising_step_list, warp_denoising_step)
        return causal_few_step(model, noise, context, timesteps=timesteps, scheduler=sched,
                               context_noise=context_noise, generator=generator, on_forward=on_forward,
                               on_chunk=on_chunk, initial_latent=initial_latent, last_context_pass=last_context_pass,
                               cache_policy=cache_policy)
    if cache_policy is not None:
        raise ModelInputError(f"KV-cache policies run with the causal_few_step sampler only, not {sampler!r}")
    if sampler not in SAMPLERS:
        raise ModelInputError(f"unknown sampler {sampler!r}; use one of {list(SAMPLERS)}")
    if negative_context is None:
        raise ModelInputError(f"the {sampler} sampler uses classifier-free guidance: give a negative context")
    if context_noise and sampler == "causal_multi_step_cfg":
        raise ModelInputError(CONTEXT_NOISE_MULTI_STEP.format(context_noise))
    if sampler == "causal_multi_step_cfg":
        return causal_multi_step(model, noise, context, negative_context, steps=num_inference_steps,
                                 shift=timestep_shift, guidance_scale=guidance_scale,
                                 on_forward=on_forward, on_chunk=on_chunk, initial_latent=initial_latent)
    return bidirectional(model, noise, context, negative_context, steps=num_inference_steps, shift=timestep_shift,
                         guidance_scale=guidance_scale, on_forward=on_forward, on_chunk=on_chunk)
