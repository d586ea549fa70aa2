"""The statistics probe: per-layer, per-head, frame-by-frame attention of a rollout, in the store's layout.

`StatsProbe` subscribes to the calls a `CaptureSpec` chooses (layers, heads, steps, statistics), reduces
each call on its device right away (each statistic's `reduce`, workbench/statistics.py), and writes the small
result into a device buffer laid out as the store is: [batch, step, layer, head, query_frame(, key dim)].
Where a result goes is read from the call's labels (its step, its layer, the absolute frames of its queries
and keys) and from the statistic's dims, never from a count of calls; two calls claiming the same cells, or
a step whose chunks disagree on the timestep, are errors. The buffers move to the host once, when the rollout
ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.common.attention import AttentionCall
from models.common.attention_kernels import CHOICES, capture_mode_of, check_kernel, describe, select
from workbench.errors import WorkbenchError
from workbench.hooks import CallFilter, Probe
from workbench.statistics import BUILT_IN, DEFAULT_STATS, STATISTICS, CallTensors, check_stats

CAPTURE_MODES = ("auto", "exact", "indicator", "fused")
FORWARD_STORE_STATS = ("attn_mass", "attn_logit")  # the cells `frame_forward_into_store` writes itself


@dataclass(frozen=True)
class CaptureSpec:
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    steps: tuple[int, ...]  # positions in the per-chunk schedule (the store's `step` coordinate)
    stats: tuple[str, ...] = DEFAULT_STATS
    token_layers: tuple[int, ...] = ()  # layers of the statistics with a token_layer dim (attn_key_token)

    def __post_init__(self):
        check_stats(self.stats, self.token_layers, self.layers)
        from workbench.store import COORD_ATTRS

        if taken := [s for s in self.stats if s in COORD_ATTRS]:  # (a plugin's name may be a store's coordinate's)
            raise WorkbenchError(f"statistic(s) {taken} share a name with a store coordinate; register it under "
                                 "another")


@dataclass
class Geometry:
    batch: int
    num_frames: int
    frame_seq_len: int
    text_len: int
    heads: int | None = None  # the model's heads and head_dim: which kernel runs a call depends on them (the Gluon
    head_dim: int | None = None  # forward takes head_dim 128 only); None: where the kernel is meant to run


class StatsProbe(Probe):
    """How a call's statistics are computed (the mode, `resolve_mode`). In every mode the model's outputs are
    bitwise what they are without the probe:

    - "exact": the model's own kernel computes the output and the row log-sum-exp; each statistic's reduction
      recomputes q k^T blockwise (float32).
    - "indicator" (stock kernels, attention_kernel="auto", cuDNN): the model's own kernel runs once with the
      value tensor widened by key-frame indicator columns (workbench.kernels.indicator); the output's columns
      are the same numbers as without them, and the extra columns are the per-token frame masses. About +12%
      attention FLOPs instead of +50%; per-token masses carry the kernel's bf16 rounding. Off CUDA it is
      "exact" (no other kernel returns the same bits when widened).
    - "fused" (attention_kernel="triton"): the model's own Triton forward also returns the frame mass from the
      same pass (models.common.triton_attention; its output bits do not depend on what else it returns); with every
      head captured it also makes attn_logit's frame means and writes both statistics straight into this
      probe's buffer cells. Nearly free.
    - "auto": the mode of the model's kernel in the kernel table (models/common/attention_kernels.py): "fused" for
      the Triton kernel and "indicator" for cuDNN on CUDA; "exact" elsewhere.

    A call takes the mode's path only where the kernel that computes it in the model is the one the mode reads
    (`Kernel.capture_mode`) and that pass gives every statistic of the call that needs the log-sum-exp
    (`Statistic.from_kernel`); other calls (masked calls, calls the Triton kernel does not take, layers with
    per-key-token maps, statistics only `exact` makes) take the exact path.

    The probe is `graph_safe`: its per-call work is GPU work into its own buffers, so a few-step rollout with
    it attached runs from CUDA graphs (models.common.rollout.RolloutGraphs). To reuse those graphs, keep one probe
    for a series of rollouts of one shape and call `reset()` between them.
    """

    graph_safe = True
    reuse_key_means = True  # the fused store path keeps each key frame's mean between calls (`_kept_key_means`)

    def __init__(self, spec: CaptureSpec, geometry: Geometry, device, mode: str = "exact", kernel: str = "auto",
                 dtype: torch.dtype = torch.bfloat16):
        self.stats = [STATISTICS[name] for name in spec.stats]
        kinds = {s.kind for s in self.stats}
        super().__init__(CallFilter(layers=spec.layers, steps=spec.steps, kinds=kinds), heads=spec.heads)
        mode = resolve_mode(mode, device, kernel, dtype=dtype, **geometry_of(geometry))
        self.spec, self.geo, self.mode = spec, geometry, mode
        self.computes_output = mode != "exact"
        self.needs_lse = any(s.needs_lse for s in self.stats)
        self._frames: dict = {}  # frame tuples -> device index tensors (no host-to-device copy per call)
        self.step_pos = {s: i for i, s in enumerate(spec.steps)}
        self.layer_pos = {l: i for i, l in enumerate(spec.layers)}
        self.token_pos = {l: i for i, l in enumerate(spec.token_layers)}
        F, fsl = geometry.num_frames, geometry.frame_seq_len
        sizes = dict(step=len(spec.steps), layer=len(spec.layers), token_layer=len(spec.token_layers),
                     head=len(spec.heads), query_frame=F, key_frame=F, key_token=F * fsl, text_token=geometry.text_len)
        self.buffers: dict[str, torch.Tensor] = {
            s.name: torch.full((geometry.batch, *(sizes[d] for d in s.dims[1:])), float("nan"), dtype=torch.float32,
                               device=device) for s in self.stats}  # [B, S, L, H, F(, key dim)]
        self.timesteps: dict[int, float] = {}  # step -> timestep, as the calls reported it
        self.filled: set[tuple] = set()  # (kind, step, layer, query frame) cells written
        self._recording: list | None = None
        self.last_path: str | None = None  # how the last call was captured: exact, indicator, fused, fused-store
        self._key_means: dict[int, torch.Tensor] = {}  # layer -> [B, H, F, D] float32: every key frame's mean
        self._key_stamps: dict[tuple[int, int], int] = {}  # (layer, frame) -> the KV-cache stamp its mean is of

    def check_run(self, extent) -> None:
        """Before the sampler's first forward: the run has the probe's frames (its buffers are the geometry's) and
        the steps it captures (workbench/hooks.py `check_run_extent`)."""
        from models.errors import ModelInputError

        if extent.frames != self.geo.num_frames:
            raise ModelInputError(f"StatsProbe: made for {self.geo.num_frames} latent frames (its Geometry), but this "
                                  f"rollout has {extent.frames}: make the probe with the rollout's geometry")
        super().check_run(extent)

    def reset(self) -> None:
        """Forget the last rollout: NaN buffers (in place, at the same addresses), no claimed cells."""
        for buf in self.buffers.values():
            buf.fill_(float("nan"))
        self.timesteps.clear()
        self.filled.clear()
        self._key_stamps.clear()  # (stamps are never reused; this only lets the held entries go)

    # CUDA-graph protocol (models.common.rollout.RolloutGraphs): the calls seen while a forward is recorded are
    # claimed again, in the same order, each time that forward's graph replays.
    def begin_recording(self) -> None:
        self._recording = []

    def end_recording(self) -> list:
        calls, self._recording = self._recording, None
        return calls

    def replay_recorded(self, calls) -> None:
        for call in calls:
            self._claim(call)

    def _claim(self, call: AttentionCall) -> None:
        step, t = call.labels.step, call.labels.timestep
        if self.timesteps.setdefault(step, t) != t:
            raise WorkbenchError(
                f"step {step} ran at timestep {t} in chunk {call.labels.chunk} but at {self.timesteps[step]} before; "
                "the store's `timestep(step)` needs one timestep per step"
            )
        for qf in call.query_frames:
            cell = (call.kind, step, call.layer, qf)
            if cell in self.filled:
                raise WorkbenchError(f"two attention calls claim {call.kind} layer {call.layer} step {step} frame {qf} "
                                     "(a probe reused for another rollout needs reset() first)")
            self.filled.add(cell)
        if self._recording is not None:
            self._recording.append(call)

    def _index(self, frames: tuple[int, ...], device) -> torch.Tensor:
        key = (frames, str(device))
        if key not in self._frames:
            if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise WorkbenchError(f"frame index {frames} first met while recording a CUDA graph; the eager "
                                     "warm-up rollout should have made it (a call the warm-up did not see)")
            self._frames[key] = torch.tensor(frames, device=device)
        return self._frames[key]

    def _stats_of(self, call: AttentionCall) -> list:
        """The statistics this call feeds: its kind, and the token-layer ones only on token layers."""
        return [s for s in self.stats if s.kind == call.kind and (s.layer_dim == "layer" or call.layer in self.token_pos)]

    def compute(self, call: AttentionCall, q, k, v):
        """Indicator and fused modes: one kernel call gives the output and the statistics the mode's kernel pass
        makes, for every head of a self-attention call. Returns None (the entry point then takes the exact path
        and calls `observe`) where the mode does not apply."""
        here = self._stats_of(call)
        lse_stats = [s for s in here if s.needs_lse]
        if call.kind != "self" or not lse_stats or any(self.mode not in s.from_kernel for s in lse_stats):
            return None  # nothing needs the log-sum-exp pass this would replace, or the kernel pass cannot serve
        kernel = select(q, k, v, frame_mask=call.frame_mask, frame_seq_len=call.frame_seq_len, kernel=call.kernel)
        if kernel.capture_mode != self.mode:
            return None  # the model computes this call with another kernel: the probe must compute the same bits
        fsl, heads = call.frame_seq_len, self.head_index(q)
        if self.mode == "indicator":
            from workbench.kernels.indicator import attention_with_frame_mass_indicator

            res = attention_with_frame_mass_indicator(q, k, v, frame_seq_len=fsl, kernel=kernel)
            if res is None:
                return None  # the kernel refused the widened shape (recorded): the exact path
            out, given = res[0], {"attn_mass": res[1]}
        elif heads is None and {s.name for s in here} <= set(FORWARD_STORE_STATS):
            # the kernel writes the statistics straight into this call's buffer cells
            from workbench.kernels.frame_attention import frame_forward_into_store

            self._claim(call)  # before the kernel writes its cells
            s, l = self.step_pos[call.labels.step], self.layer_pos[call.layer]
            logit = self.buffers.get("attn_logit")
            key_means, fresh, stamps = self._kept_key_means(call, q, k) if logit is not None else (None, (), {})
            out = frame_forward_into_store(
                q, k, v, frame_seq_len=fsl, mass_out=self.buffers["attn_mass"][:, s, l],
                logit_out=None if logit is None else logit[:, s, l],
                query_index=self._index(call.query_frames, q.device), key_index=self._index(call.key_frames, q.device),
                key_means=key_means, fresh=fresh)
            self._key_stamps.update(stamps)  # (once the means are computed: a refused call leaves none behind)
            self.last_path = "fused-store"
            return out
        else:
            from workbench.kernels.frame_attention import frame_forward_with_stats

            out, mass, *means = frame_forward_with_stats(q, k, v, frame_seq_len=fsl,
                                                      frame_means="attn_logit" in self.buffers)
            given = {"attn_mass": mass, **({"frame_means": tuple(means)} if means else {})}
        if heads is not None:  # a real subset of the heads: select it ([B, H, ...] statistics, [B, L, H, D] inputs)
            given = {name: _select(x, heads) for name, x in given.items()}
            q, k = q.index_select(2, heads), k.index_select(2, heads)
        self._claim(call)
        self._place(call, CallTensors(q, k, None, fsl, call.frame_mask, given, call.query_frames, call.key_frames),
                    here)
        self.last_path = self.mode
        return out

    def _kept_key_means(self, call: AttentionCall, q, k):
        """(key_means [B, H, F, D], fresh runs, {(layer, frame): stamp} to hold after the call) for the store path's
        attn_logit, or (None, (), {}) where the call's key means are all computed afresh. Each layer keeps every key
        frame's mean vector with the KV cache's stamp of the keys it came from (`KeyStamps`); a call recomputes
        only the frames whose stamp differs (in a rollout: the chunk it just wrote; after a cache policy moved a
        frame's RoPE position: that frame), so the means read q and the new keys, not the whole cache, and are
        the same bits (a frame's mean depends on its own rows only). Never when the call's k is not the cache's
        as stamped (an intervention or a hook replaced or edited it)."""
        st, layer = call.key_stamps, call.layer
        if (not self.reuse_key_means or st is None or len(st.stamps) != len(call.key_frames) or not st.valid_for(k)
                or q.shape[0] != self.geo.batch or max(call.key_frames) >= self.geo.num_frames):
            return None, (), {}
        buf = self._key_means.get(layer)
        B, _, H, D = q.shape
        if buf is None or tuple(buf.shape) != (B, H, self.geo.num_frames, D) or buf.device != q.device:
            if q.is_cuda and torch.cuda.is_current_stream_capturing():
                return None, (), {}  # (allocated by the eager warm-up rollout, not inside a graph)
            buf = self._key_means[layer] = torch.zeros((B, H, self.geo.num_frames, D), dtype=torch.float32,
                                                       device=q.device)
            self._key_stamps = {key: v for key, v in self._key_stamps.items() if key[0] != layer}
        fresh, stamps = [], {}
        for i, (frame, stamp) in enumerate(zip(call.key_frames, st.stamps)):
            if self._key_stamps.get((layer, frame)) == stamp:
                continue
            stamps[(layer, frame)] = stamp
            if fresh and fresh[-1][1] == i and fresh[-1][2] + i - fresh[-1][0] == frame:
                fresh[-1][1] = i + 1  # extends the run: the next position and the next absolute frame
            else:
                fresh.append([i, i + 1, frame])
        return buf, tuple(tuple(r) for r in fresh), stamps

    def on_call(self, call: AttentionCall, q, k, v, out, lse) -> None:
        """The exact path (`Probe.observe` selected the heads)."""
        self._claim(call)
        given = self.given(call, q, k, lse)
        self._place(call, CallTensors(q, k, lse, call.frame_seq_len, call.frame_mask, given, call.query_frames,
                                      call.key_frames), self._stats_of(call))
        self.last_path = "exact"

    def given(self, call: AttentionCall, q, k, lse) -> dict:
        """Statistics of an exact-path call computed some other way, {name: value} (none here; benches and
        tests override it to compare another computation through the same placement)."""
        return {}

    @torch.no_grad()  # statistics are observations: never part of an autograd graph (training forwards)
    def _place(self, call: AttentionCall, t: CallTensors, stats) -> None:
        """Reduce the call to each statistic and write it into its cells, by the statistic's dims."""
        s, dev, fsl, mask = self.step_pos[call.labels.step], t.q.device, call.frame_seq_len, call.frame_mask
        qf = self._index(call.query_frames, dev)
        for stat in stats:
            layer = self.layer_pos[call.layer] if stat.layer_dim == "layer" else self.token_pos[call.layer]
            cells = self.buffers[stat.name][:, s, layer]  # [B, H, F(, key dim)]
            try:
                values = stat.reduce(t)  # [B, h, nqf(, n)]
            except Exception as err:
                if stat.name in BUILT_IN:
                    raise
                raise WorkbenchError(f"statistic {stat.name!r} (a plugin's): its reduce raised {type(err).__name__}: "
                                     f"{err} (layer {call.layer}'s {call.kind}-attention call, step "
                                     f"{call.labels.step}, chunk {call.labels.chunk}); what the run finished before "
                                     "is kept: mend it and run the command again") from err
            _check_values(stat, values, call, t)
            if stat.key_dim in (None, "text_token"):  # every column of the query frames' rows
                cells[:, :, qf] = values.to(cells.dtype)  # (a float64 run: float32 cells)
                continue
            kf = self._index(call.key_frames, dev)
            if stat.key_dim == "key_frame":
                cols, allowed = kf, None if mask is None else mask.to(dev)
            else:  # key_token: the absolute key token index of every key of the call
                cols = (kf[:, None] * fsl + torch.arange(fsl, device=dev)).flatten()
                allowed = None if mask is None else mask.to(dev).repeat_interleave(fsl, 1)
            if allowed is not None:  # pairs the call did not attend are NaN
                values = values.masked_fill(~allowed, float("nan"))
            cells[:, :, qf[:, None], cols[None, :]] = values.to(cells.dtype)  # (a float64 run: float32 cells)

    def results(self) -> dict[str, np.ndarray]:
        """Host copies of the buffers: {stat: [B, S, L, H, F(, key dim)]} float32."""
        return {stat: buf.cpu().numpy() for stat, buf in self.buffers.items()}

    def missing_steps(self, expected_frames: int, from_frame: int = 0) -> list[tuple]:
        """(kind, step, layer) triples whose query frames from `from_frame` on were not all captured (a
        schedule/label mismatch). Image-to-video checks from frame 1: frame 0, the image, is never denoised."""
        kinds = {c[0] for c in self.filled} or {"self"}
        out = []
        for kind in kinds:
            for step in self.spec.steps:
                for layer in self.spec.layers:
                    got = sum((kind, step, layer, f) in self.filled for f in range(from_frame, expected_frames))
                    if got != expected_frames - from_frame:
                        out.append((kind, step, layer))
        return out


def _check_values(stat, values, call: AttentionCall, t: CallTensors) -> None:
    """A reduction's result has the shape its dims say, [B, heads, query frames(, keys)], or a clear error (a
    plugin's statistic: a wrong shape would be broadcast into the cells, or fail in the placement)."""
    (B, Lq, h), Lk = t.q.shape[:3], t.k.shape[1]  # (keys: the call's key tokens, or text tokens)
    keys = {None: (), "key_frame": (Lk // t.frame_seq_len,), "key_token": (Lk,), "text_token": (Lk,)}[stat.key_dim]
    want = (B, h, Lq // t.frame_seq_len, *keys)
    if tuple(getattr(values, "shape", ())) != want:
        raise WorkbenchError(f"statistic {stat.name!r}: its reduce returned {type(values).__name__} of shape "
                             f"{tuple(getattr(values, 'shape', ()))} for layer {call.layer}'s {call.kind}-attention "
                             f"call; its dims {stat.dims} want [B, heads, query frames(, keys)] = {list(want)}")


def _select(x, heads):
    """The chosen heads of a kernel-given statistic: a tensor [B, H, ...] or a tuple of them."""
    return tuple(t.index_select(1, heads) for t in x) if isinstance(x, tuple) else x.index_select(1, heads)


# --------------------------------------------------------------------------------------------------
# Which mode runs

_MODE_READS = {"fused": "the model's own Triton forward", "indicator": "the stock cuDNN kernel with a widened value tensor"}


def geometry_of(geo: Geometry) -> dict:
    """The model geometry `describe` picks a call's kernel by ({} when the heads are not given)."""
    if geo.heads is None or geo.head_dim is None:
        return {}
    return dict(heads=geo.heads, head_dim=geo.head_dim, frame_seq_len=geo.frame_seq_len)


def resolve_mode(mode: str, device, kernel: str = "auto", *, dtype: torch.dtype = torch.bfloat16, **geometry) -> str:
    """The capture mode that runs for a model with this attention kernel choice. "auto" is the mode of the
    kernel that runs the choice's calls in the kernel table ("fused" for "triton" and "gluon", "indicator" for the
    stock kernels' cuDNN) on CUDA, and "exact" on the CPU, where "indicator" is "exact" too. `dtype` and the model's
    geometry (heads, head_dim, frame_seq_len: `describe`) say which kernel that is: a small model's head_dim is not
    the Gluon forward's, and float32 runs SDPA. A mode that reads another kernel than the model's is refused,
    naming the fix."""
    if mode not in CAPTURE_MODES:
        raise WorkbenchError(f"capture mode {mode!r}; use one of {list(CAPTURE_MODES)}")
    if mode == "exact":
        return mode
    on_gpu = torch.device(device).type == "cuda"
    if not on_gpu and mode in ("auto", "indicator"):
        return "exact"  # the widened call is bitwise the plain one on cuDNN only; elsewhere it would not be
    # (off CUDA: the kernel the choice runs on a GPU in bf16, where no tensor can be made for its shape rules)
    here, geometry = ((device, dtype), geometry) if on_gpu else (("cuda", torch.bfloat16), {})
    served = capture_mode_of(check_kernel(kernel), *here, **geometry)
    if not on_gpu and served == "indicator":
        served = "exact"  # (the stock kernels off CUDA: their statistics come by the exact path)
    if mode == "auto":
        return served or "exact"
    if mode != served:
        needed = next((c for c in CHOICES if capture_mode_of(c) == mode), None)
        runs = f", whose statistics come with capture mode {served!r}" if served else \
            f" ({describe(*here, kernel, **geometry)}: no capture mode reads it)"
        fix = f"--attention-kernel {needed}, or " if needed else ""
        raise WorkbenchError(f"capture mode {mode!r} reads the statistics of {_MODE_READS[mode]}"
                             + (f" (--attention-kernel {needed})" if needed else "")
                             + f"; the model runs attention kernel {kernel!r}{runs}. Use {fix}capture mode "
                             + (f"{served!r} or 'exact'" if served not in (None, "exact") else "'exact'"))
    return mode
