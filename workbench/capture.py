"""The statistics probe: per-layer, per-head, frame-by-frame attention of a rollout, in the store's layout.

`StatsProbe` subscribes to the calls a `CaptureSpec` chooses (layers, heads, steps, statistics), reduces
each call on its device right away (workbench.reductions), and writes the small result into a device buffer
laid out as the store is: [batch, step, layer, head, query_frame, key_frame]. Where a result goes is read
from the call's labels (its step, its layer, the absolute frames of its queries and keys), never from a
count of calls; two calls claiming the same cells, or a step whose chunks disagree on the timestep, are
errors. The buffers move to the host once, when the rollout ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.attention import AttentionCall, kernel_runs
from workbench import reductions
from workbench.errors import WorkbenchError
from workbench.hooks import Probe

STATS = ("attn_mass", "attn_logit", "cross_mass", "attn_key_token")
DEFAULT_STATS = ("attn_mass", "attn_logit")


@dataclass(frozen=True)
class CaptureSpec:
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    steps: tuple[int, ...]  # positions in the per-chunk schedule (the store's `step` coordinate)
    stats: tuple[str, ...] = DEFAULT_STATS
    token_layers: tuple[int, ...] = ()  # layers with per-key-token maps (attn_key_token)

    def __post_init__(self):
        unknown = [s for s in self.stats if s not in STATS]
        if unknown:
            raise WorkbenchError(f"unknown statistic(s) {unknown}; known: {list(STATS)}")
        if "attn_key_token" in self.stats and not self.token_layers:
            raise WorkbenchError("attn_key_token needs --token-layers (which layers get per-key-token maps)")
        stray = sorted(set(self.token_layers) - set(self.layers))
        if stray:
            raise WorkbenchError(f"token layers {stray} are not among the captured layers {list(self.layers)}")


@dataclass
class Geometry:
    batch: int
    num_frames: int
    frame_seq_len: int
    text_len: int


class StatsProbe(Probe):
    """How `attn_mass` is computed (the other statistics do not depend on the mode). In every mode the model's
    outputs are bitwise what they are without the probe:

    - "exact": the model's own kernel computes the output and the row log-sum-exp; a second blockwise pass
      recomputes q k^T and sums the probabilities per key frame (float32).
    - "indicator" (stock kernels, attention_kernel="auto", cuDNN): the model's own kernel runs once with the
      value tensor widened by key-frame indicator columns (workbench.kernels.indicator); the output's columns
      are the same numbers as without them, and the extra columns are the per-token frame masses. About +12%
      attention FLOPs instead of +50%; per-token masses carry the kernel's bf16 rounding. Off CUDA it is
      "exact" (no other kernel returns the same bits when widened).
    - "fused" (attention_kernel="triton"): the model's own Triton forward also returns the frame mass from the
      same pass (models.triton_attention; its output bits do not depend on what else it returns); with every
      head captured it also makes attn_logit's frame means and writes both statistics straight into this
      probe's buffer cells. Nearly free.
    - "auto": "fused" for the Triton kernel and "indicator" for the stock kernels on CUDA; "exact" elsewhere.

    Calls a mode cannot serve (masked calls, calls the Triton kernel does not take, layers with per-key-token
    maps) take the exact path.

    The probe is `graph_safe`: its per-call work is GPU work into its own buffers, so a few-step rollout with
    it attached runs from CUDA graphs (models.rollout.RolloutGraphs). To reuse those graphs, keep one probe
    for a series of rollouts of one shape and call `reset()` between them.
    """

    graph_safe = True

    def __init__(self, spec: CaptureSpec, geometry: Geometry, device, mode: str = "exact", kernel: str = "auto"):
        from workbench.hooks import CallFilter

        kinds = set()
        if {"attn_mass", "attn_logit", "attn_key_token"} & set(spec.stats):
            kinds.add("self")
        if "cross_mass" in spec.stats:
            kinds.add("cross")
        super().__init__(CallFilter(layers=spec.layers, steps=spec.steps, kinds=kinds), heads=spec.heads)
        mode = resolve_mode(mode, device, kernel)
        self.spec, self.geo, self.mode = spec, geometry, mode
        self.computes_output = mode != "exact"
        self._frames: dict = {}  # frame tuples -> device index tensors (no host-to-device copy per call)
        self.needs_lse = bool({"attn_mass", "attn_key_token"} & set(spec.stats))
        self.step_pos = {s: i for i, s in enumerate(spec.steps)}
        self.layer_pos = {l: i for i, l in enumerate(spec.layers)}
        self.token_pos = {l: i for i, l in enumerate(spec.token_layers)}
        B, S, L, H, F = geometry.batch, len(spec.steps), len(spec.layers), len(spec.heads), geometry.num_frames
        nan = float("nan")
        self.buffers: dict[str, torch.Tensor] = {}
        for stat in spec.stats:
            if stat in ("attn_mass", "attn_logit"):
                shape = (B, S, L, H, F, F)
            elif stat == "cross_mass":
                shape = (B, S, L, H, F, geometry.text_len)
            else:
                shape = (B, S, len(spec.token_layers), H, F, F * geometry.frame_seq_len)
            self.buffers[stat] = torch.full(shape, nan, dtype=torch.float32, device=device)
        self.timesteps: dict[int, float] = {}  # step -> timestep, as the calls reported it
        self.filled: set[tuple] = set()  # (kind, step, layer, query frame) cells written
        self._recording: list | None = None
        self._mass = self._means = None  # what a fused kernel computed for the call being observed
        self._written = False  # whether the fused kernel wrote the call's attn_mass / attn_logit cells itself

    def reset(self) -> None:
        """Forget the last rollout: NaN buffers (in place, at the same addresses), no claimed cells."""
        for buf in self.buffers.values():
            buf.fill_(float("nan"))
        self.timesteps.clear()
        self.filled.clear()

    # CUDA-graph protocol (models.rollout.RolloutGraphs): the calls seen while a forward is recorded are
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

    def _index(self, frames: tuple[int, ...], device) -> torch.Tensor:
        key = (frames, str(device))
        if key not in self._frames:
            if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise WorkbenchError(f"frame index {frames} first met while recording a CUDA graph; the eager "
                                     "warm-up rollout should have made it (a call the warm-up did not see)")
            self._frames[key] = torch.tensor(frames, device=device)
        return self._frames[key]

    def compute(self, call: AttentionCall, q, k, v):
        """Indicator and fused modes: one kernel call gives the output and the frame mass of every head of a
        self-attention call. Returns None (the entry point then takes the exact path) where the mode does not
        apply."""
        if call.kind != "self" or "attn_mass" not in self.buffers or call.layer in self.token_pos:
            return None  # cross-attention and key-token layers take the exact path
        # which kernel computes this call's output without the probe: the probe must compute the same bits
        runs = kernel_runs(q, k, v, frame_mask=call.frame_mask, frame_seq_len=call.frame_seq_len, kernel=call.kernel)
        if self.mode == "indicator":
            if not _unmasked(call) or runs != "auto" or not _cudnn_runs(q):
                return None
            from workbench.kernels.indicator import attention_with_frame_mass_indicator

            out, mass = attention_with_frame_mass_indicator(q, k, v, frame_seq_len=call.frame_seq_len)
            means = []
        elif self.mode != "fused" or runs != "triton":
            return None
        elif self._all_heads(q):
            # the kernel writes both statistics straight into this call's buffer cells
            from workbench.kernels.frame_attention import frame_attention_fused_into

            self._claim(call)  # before the kernel writes its cells
            s, l = self.step_pos[call.labels.step], self.layer_pos[call.layer]
            logit = self.buffers.get("attn_logit")
            out = frame_attention_fused_into(
                q, k, v, frame_seq_len=call.frame_seq_len, mass_out=self.buffers["attn_mass"][:, s, l],
                logit_out=None if logit is None else logit[:, s, l],
                query_index=self._index(call.query_frames, q.device), key_index=self._index(call.key_frames, q.device))
            self.observe(call, q, k, v, out, None, written=True)
            return out
        else:
            from workbench.kernels.frame_attention import frame_attention_fused

            out, mass, *means = frame_attention_fused(q, k, v, frame_seq_len=call.frame_seq_len,
                                                      frame_means="attn_logit" in self.buffers)
        if not self._all_heads(q):  # a real subset of the heads: select it
            heads = self._index(tuple(self.spec.heads), q.device)
            mass, *means = (t.index_select(1, heads) for t in (mass, *means))
        self.observe(call, q, k, v, out, None, mass=mass, means=means or None)
        return out

    def _all_heads(self, q) -> bool:
        return list(self.spec.heads) == list(range(q.shape[2]))

    def observe(self, call, q, k, v, out, lse, mass=None, means=None, written=False):
        self._mass, self._means, self._written = mass, means, written
        super().observe(call, q, k, v, out, lse)

    @torch.no_grad()  # statistics are observations: never part of an autograd graph (training forwards)
    def on_call(self, call: AttentionCall, q, k, v, out, lse) -> None:
        if not self._written:  # (the fused store path claimed the call before its kernel ran)
            self._claim(call)
        if self._recording is not None:
            self._recording.append(call)
        fsl = call.frame_seq_len
        s, l = self.step_pos[call.labels.step], self.layer_pos[call.layer]
        dev = q.device
        qf = self._index(call.query_frames, dev)
        if call.kind == "cross":
            self.buffers["cross_mass"][:, s, l][:, :, qf] = reductions.cross_mass(q, k, fsl)
            return
        kf = self._index(call.key_frames, dev)
        mask = call.frame_mask
        rows, cols = qf[:, None], kf[None, :]
        if not self._written:  # else the fused kernel wrote this call's attn_mass and attn_logit cells itself
            if "attn_mass" in self.buffers:
                mass = self._mass if self._mass is not None else reductions.frame_mass(q, k, lse, fsl, mask)
                self.buffers["attn_mass"][:, s, l][:, :, rows, cols] = _nan_outside(mass, mask)  # [B, h, nqf, nkf]
            if "attn_logit" in self.buffers:
                logit = reductions.mean_logit(q, k, fsl, means=self._means)
                self.buffers["attn_logit"][:, s, l][:, :, rows, cols] = _nan_outside(logit, mask)
        if "attn_key_token" in self.buffers and call.layer in self.token_pos:
            tok = reductions.key_token_mass(q, k, lse, fsl, mask)  # [B, h, nqf, nkf * fsl]
            tokens = (kf[:, None] * fsl + torch.arange(fsl, device=dev)).flatten()  # absolute key token index
            if mask is not None:
                tok = tok.masked_fill(~mask.to(dev).repeat_interleave(fsl, 1), float("nan"))
            self.buffers["attn_key_token"][:, s, self.token_pos[call.layer]][:, :, qf[:, None], tokens[None, :]] = tok

    def results(self) -> dict[str, np.ndarray]:
        """Host copies of the buffers: {stat: [B, S, L, H, F, F | text_len | F*fsl]} float32."""
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


CAPTURE_MODES = ("auto", "exact", "indicator", "fused")


def resolve_mode(mode: str, device, kernel: str = "auto") -> str:
    """The capture mode that runs for a model with this attention kernel: "auto" is "fused" for the Triton
    kernel and "indicator" for the stock kernels on CUDA, "exact" elsewhere. Pairs that would make the probe
    compute the output with another kernel than the model's are refused."""
    if mode not in CAPTURE_MODES:
        raise WorkbenchError(f"capture mode {mode!r}; use one of {list(CAPTURE_MODES)}")
    if mode == "auto":
        if torch.device(device).type != "cuda":
            return "exact"
        return "fused" if kernel == "triton" else "indicator"
    if mode == "indicator" and torch.device(device).type != "cuda":
        return "exact"  # the widened call is bitwise the plain one on cuDNN only; elsewhere it would not be
    if mode == "fused" and kernel != "triton":
        raise WorkbenchError("capture mode 'fused' reads the statistics of the model's Triton attention kernel; "
                             f"the model runs attention kernel {kernel!r}. Use --attention-kernel triton, or "
                             "capture mode 'indicator' or 'exact'")
    if mode == "indicator" and kernel == "triton":
        raise WorkbenchError("capture mode 'indicator' widens the value tensor of the stock attention kernels, but "
                             "the model runs attention kernel 'triton'; use capture mode 'fused' (or 'exact') "
                             "with it, or --attention-kernel auto")
    return mode


def _cudnn_runs(q) -> bool:
    """Whether the model's stock kernel for q is the cuDNN op, the one whose widened call is bitwise the plain
    one in its first head_dim columns (flash-attn, when installed, comes first and is another kernel)."""
    from models.cuda_attention import active_kernel

    return q.is_cuda and active_kernel(q.dtype) == "cudnn"


def _unmasked(call: AttentionCall) -> bool:
    """Whether every query frame of the call sees every key frame it was given."""
    return call.frame_mask is None or bool(call.frame_mask.all())


def _nan_outside(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """values [B, H, nqf, nkf] with masked (not attended) frame pairs set to NaN."""
    if mask is None:
        return values
    return values.masked_fill(~mask.to(values.device), float("nan"))
