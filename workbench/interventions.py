"""Interventions: edits of the attention calls they select, at the model's entry point
(`models.common.attention.attend`).

An intervention selects calls as a probe does (a `CallFilter` on layer, kind, step, chunk, phase, CFG branch;
workbench/hooks.py) and edits what the kernel gets - q, k, v and the key frame mask (`edit_inputs`) - and what
comes out of it - a head's output (`edit_output`). It says which of these it may change (`edits`); `attend`
records its `label` in `call.edits` of every call it edited, and the observers attached at the same time see what
ran: the edited q, k, v, the edited call (its mask, its `edits`), the edited output, and the log-sum-exp of the
kernel that ran on the edited inputs. `attach(model, intervention, probe)` subscribes both kinds.

CUDA graphs (models/common/rollout.py `RolloutGraphs`): an intervention whose edits are GPU work on tensors at fixed
addresses sets `graph_safe = True` (the default here); a few-step rollout then replays recorded graphs with it, as
with a graph-safe probe. Its `key` (its settings) is part of the graphs' key, so a changed intervention records
new graphs and a removed one drops them.

The interventions (each a small configured object whose `label` names it in `call.edits` and in an effects store,
workbench/intervene.py):
- `HeadAblation`: a head's output replaced, after the kernel (`edit_output`), by zero, by its mean over a reference
  rollout (`HeadOutputs.mean`), or by the same call's output in a rollout of another prompt or seed
  (`HeadOutputs`, "resample");
- `KeyFrameKnockout`: chosen absolute key frames taken out of the softmax (the call's frame mask; for a subset of
  heads, those heads recomputed with the mask); the kernel table runs masked calls exactly;
- `HeadTemperature`: a head's logits divided by T (its q scaled by 1/T before the kernel: exact up to q's rounding);
- `SinkScaling`: the logits of chosen key frames multiplied by c (those frames' keys scaled by c, in a copy: the
  KV cache is never changed), for all or some heads.
Graph safety: ablation, temperature and sink scaling are slices and scalar products on tensors the call already
has (or recorded sources at fixed addresses), so they replay in CUDA graphs; a knockout builds its frame mask on
the host per call and says `graph_safe = False` (the rollout then runs eagerly).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from models.common.attention import AttentionCall
from workbench.hooks import EDITABLE, CallFilter, Probe, check_run_extent


class Intervention:
    """A filter, a head selection and a label; edits nothing. Subclasses override `edit_inputs` and/or
    `edit_output` and list what they change in `edits` (a subset of EDITABLE)."""

    edits: frozenset = frozenset()
    graph_safe = True

    def __init__(self, filter: CallFilter | None = None, heads: Iterable[int] | None = None, label: str | None = None):
        self.filter = filter or CallFilter()
        self.heads = None if heads is None else tuple(heads)
        self.label = label or type(self).__name__
        unknown = set(self.edits) - EDITABLE
        if unknown:
            raise ValueError(f"{self.label}: edits {sorted(unknown)}; an intervention edits {sorted(EDITABLE)}")

    def wants(self, call: AttentionCall) -> bool:
        return self.filter.matches(call)

    def check_run(self, extent) -> None:
        """Called by the sampler before its first forward: the steps, chunks, phases, CFG branches and key frames
        it selects are in the run (workbench/hooks.py `check_run_extent`)."""
        check_run_extent(self, extent)

    @property
    def key(self):
        """What the rollout's CUDA graphs are keyed by: the intervention's kind and settings."""
        return type(self).__name__, self.label, self.filter, self.heads, tuple(sorted(self.edits))

    def edit_inputs(self, call: AttentionCall, q, k, v):
        """(call, q, k, v) for the kernel: q [B, Lq, H, D], k/v [B, Lk, H, D], the mask on the call."""
        return call, q, k, v

    def edit_output(self, call: AttentionCall, q, k, v, out):
        """out [B, Lq, H, D] after the kernel."""
        return out

    def check_edits(self) -> None:
        """Refuse (at attach) a subclass that overrides an edit method but lists no edit (the class default), or
        overrides only `edit_output` without "out" (`attend` calls it only then): it would be attached to do nothing
        while `call.edits` recorded it."""
        from models.errors import ModelInputError

        own = [m for m in ("edit_inputs", "edit_output") if getattr(type(self), m) is not getattr(Intervention, m)]
        if own and (not self.edits or own == ["edit_output"] and "out" not in self.edits):
            raise ModelInputError(f"{self.label}: overrides {' and '.join(own)} but its edits {sorted(self.edits)} "
                                  f"name {'nothing' if not self.edits else 'no out'}: attend calls edit_output only "
                                  "with 'out' in edits, and records an edit by what edits says; list what it "
                                  "changes (q, k, v, mask, out)")


class Identity(Intervention):
    """Changes nothing, through the whole edit path: it claims every edit (so `attend` runs the path an editing
    intervention takes: inputs, the output, observers after the edit) and returns what it was given. With it
    attached a model's outputs are bitwise those without it (tests/test_interventions.py)."""

    def __init__(self, filter: CallFilter | None = None, heads: Iterable[int] | None = None, label: str = "identity",
                 edits: Iterable[str] = EDITABLE):
        self.edits = frozenset(edits)
        super().__init__(filter, heads, label)


def _call_key(call: AttentionCall) -> tuple:
    """What identifies a call across two rollouts of the same shape: (layer, kind, step, chunk, phase, cfg)."""
    lab = call.labels
    return (call.layer, call.kind) + ((None,) * 4 if lab is None else (lab.step, lab.chunk, lab.phase, lab.cfg))


def _frames_of(frames: frozenset, history_only: bool, call: AttentionCall) -> set:
    """The call's key frames among `frames`; `history_only`: those before the call's first query frame only (the
    frames' own chunk, and any before it, left as they ran)."""
    first = min(call.query_frames) if history_only else None
    return {f for f in call.key_frames if f in frames and (first is None or f < first)}


def _heads_of(iv: Intervention, call: AttentionCall) -> tuple[int, ...]:
    heads = tuple(range(call.num_heads)) if iv.heads is None else iv.heads
    bad = [h for h in heads if not 0 <= h < call.num_heads]
    if bad:
        raise ValueError(f"{iv.label}: heads {bad} out of range: layer {call.layer} has heads 0-{call.num_heads - 1}")
    return heads


class HeadOutputs(Probe):
    """Records the attention output of every call it selects (out [B, Lq, H, D], a detached copy) by
    `_call_key`: the source of a "resample" ablation, and of the per-head mean of a "mean" ablation.
    Attach it to a reference rollout (another prompt, another seed, or a batch of them) with the same shape."""

    def __init__(self, filter: CallFilter | None = None, keep_calls: bool = True):
        super().__init__(filter)
        self.keep_calls = keep_calls  # False: only the running sums of `mean` (a reference batch of any size)
        self.by_call: dict[tuple, torch.Tensor] = {}  # call key -> out [B, Lq, H, D]
        self._sum: dict[tuple, torch.Tensor] = {}  # (layer, kind) -> float64 [H, D] sum over batch and tokens
        self._count: dict[tuple, int] = {}

    def observe(self, call, q, k, v, out, lse) -> None:
        if self.keep_calls:
            self.by_call[_call_key(call)] = out.detach().clone()
        lk = (call.layer, call.kind)
        s = out.detach().double().sum(dim=(0, 1))  # [H, D]
        self._sum[lk] = self._sum.get(lk, 0) + s
        self._count[lk] = self._count.get(lk, 0) + out.shape[0] * out.shape[1]

    def mean(self) -> dict[tuple, torch.Tensor]:
        """(layer, kind) -> [H, D] float32: each head's output averaged over every selected call, query token and
        batch entry of the rollouts it saw."""
        return {lk: (s / self._count[lk]).float() for lk, s in self._sum.items()}


class HeadAblation(Intervention):
    """Replace the output of `heads` in the selected calls: mode "zero" (0), "mean" (`source`: the dict of
    `HeadOutputs.mean()`, (layer, kind) -> [H, D], or a function returning it) or "resample" (`source`: a
    `HeadOutputs` of another rollout of the same shape; the same call's output there). A mean is read from the
    source at the first call of its layer that this ablation edits and held (CUDA graphs read it in place): for the
    means of another reference, make another HeadAblation."""

    edits = frozenset({"out"})
    MODES = ("zero", "mean", "resample")

    def __init__(self, filter: CallFilter | None = None, heads: Iterable[int] | None = None, mode: str = "zero",
                 source=None, label: str | None = None):
        if mode not in self.MODES:
            raise ValueError(f"head ablation mode {mode!r}; use one of {list(self.MODES)}")
        if mode != "zero" and source is None:
            raise ValueError(f"head ablation mode {mode!r} needs a source (workbench.interventions.HeadOutputs)")
        self.mode, self.source = mode, source
        self._mean_on: dict = {}  # (layer, kind, device, dtype) -> [H, D] on the output's device
        super().__init__(filter, heads, label or f"ablate:{mode}")

    @property
    def key(self):
        # the graphs read a resample source's outputs in place: one recorded again (new tensors) is new settings
        held = tuple((k, out.data_ptr()) for k, out in self.source.by_call.items()) if self.mode == "resample" else ()
        return super().key + (self.mode, id(self.source), held)

    def edit_output(self, call, q, k, v, out):
        heads = _heads_of(self, call)
        out = out.clone()  # [B, Lq, H, D]; the kernel's buffer stays as it was
        if self.mode == "resample":
            src = self.source.by_call.get(_call_key(call))
            if src is None or src.shape != out.shape:
                raise ValueError(f"{self.label}: the resample source has no call {_call_key(call)} of shape "
                                 f"{tuple(out.shape)} (record it from a rollout of the same shape)")
            src = src.to(out.device, out.dtype)
        elif self.mode == "mean":
            src = self._mean(call, out)
        for h in heads:  # basic slices: no index tensor, so a CUDA graph may record it
            if self.mode == "zero":
                out[:, :, h] = 0
            else:
                out[:, :, h] = src[:, :, h] if self.mode == "resample" else src[h]
        return out

    def _mean(self, call, out):
        k = (call.layer, call.kind, out.device, out.dtype)
        if k not in self._mean_on:
            means = self.source() if callable(self.source) else self.source
            if (call.layer, call.kind) not in means:
                raise ValueError(f"{self.label}: the mean source has no {call.kind}-attention of layer {call.layer}")
            self._mean_on[k] = means[(call.layer, call.kind)].to(out.device, out.dtype)
        return self._mean_on[k]


class KeyFrameKnockout(Intervention):
    """Take absolute key frames `frames` out of the softmax of the selected self-attention calls (all heads: the
    call's frame mask, which observers read; a subset of `heads`: those heads recomputed with the mask, the others
    as they ran). `history_only`: only for calls whose query frames all come after the frame (the frame is still
    generated and attends to itself; later chunks never see it). A query frame left with no key frame is an error."""

    graph_safe = False  # the mask is built on the host per call

    def __init__(self, frames: Iterable[int], filter: CallFilter | None = None, heads: Iterable[int] | None = None,
                 label: str | None = None, history_only: bool = False):
        self.frames = frozenset(int(f) for f in frames)
        self.history_only = bool(history_only)
        self.edits = frozenset({"mask"}) if heads is None else frozenset({"out"})
        # some heads only: those heads are recomputed with the mask, which the call (one mask for all heads) does
        # not carry, so an observer cannot read what they attended to (`attend` refuses observers then)
        self.observed_exactly = heads is None
        super().__init__(filter, heads, label or f"knockout:{','.join(map(str, sorted(self.frames)))}")

    @property
    def key(self):
        return super().key + (tuple(sorted(self.frames)), self.history_only)

    def _gone(self, call: AttentionCall) -> set:
        return _frames_of(self.frames, self.history_only, call)

    def wants(self, call: AttentionCall) -> bool:
        return call.kind == "self" and call.key_frames is not None and bool(self._gone(call)) and \
            self.filter.matches(call)

    def mask(self, call: AttentionCall) -> torch.Tensor:
        """[nqf, nkf] bool: the call's mask (all True when None) without the knocked-out key frames."""
        mask = torch.ones(len(call.query_frames), len(call.key_frames), dtype=torch.bool) \
            if call.frame_mask is None else call.frame_mask.clone().cpu()
        gone = self._gone(call)
        mask[:, [j for j, f in enumerate(call.key_frames) if f in gone]] = False
        empty = [call.query_frames[i] for i in torch.nonzero(~mask.any(1)).flatten().tolist()]
        if empty:
            raise ValueError(f"{self.label}: query frames {empty} of layer {call.layer} would attend to no key frame")
        return mask

    def edit_inputs(self, call, q, k, v):
        if self.heads is None:
            call = dataclasses.replace(call, frame_mask=self.mask(call))
        return call, q, k, v

    def edit_output(self, call, q, k, v, out):
        from models.common.attention_kernels import compute

        heads = list(_heads_of(self, call))
        sub = [t[:, :, heads] for t in (q, k, v)]
        masked = compute(*sub, frame_mask=self.mask(call), frame_seq_len=call.frame_seq_len, kernel=call.kernel)[0]
        out = out.clone()
        for i, h in enumerate(heads):
            out[:, :, h] = masked[:, :, i]
        return out


class HeadTemperature(Intervention):
    """Divide the logits of `heads` by `temperature` in the selected calls (q scaled by 1 / T: T > 1 flattens a
    head's attention, T < 1 sharpens it)."""

    edits = frozenset({"q"})

    def __init__(self, temperature: float, filter: CallFilter | None = None, heads: Iterable[int] | None = None,
                 label: str | None = None):
        if not temperature > 0:
            raise ValueError(f"temperature {temperature}: use a positive number")
        self.temperature = float(temperature)
        super().__init__(filter, heads, label or f"temperature:{temperature:g}")

    @property
    def key(self):
        return super().key + (self.temperature,)

    def edit_inputs(self, call, q, k, v):
        q = q.clone()
        for h in _heads_of(self, call):
            q[:, :, h] *= 1.0 / self.temperature
        return call, q, k, v


class SinkScaling(Intervention):
    """Multiply the logits of absolute key frames `frames` (by default frame 0, the sink) by `factor` for `heads`
    in the selected self-attention calls: those frames' keys scaled by `factor` in a copy of k (the KV cache
    keeps its keys). factor 0 gives those frames logit 0; a factor > 1 sharpens what they already draw.
    `history_only` (as a knockout's): only for query frames after the frame, so the sink frames themselves are
    generated as in the baseline and the change is what later chunks make of them."""

    edits = frozenset({"k"})

    def __init__(self, factor: float, frames: Iterable[int] = (0,), filter: CallFilter | None = None,
                 heads: Iterable[int] | None = None, label: str | None = None, history_only: bool = False):
        self.factor, self.frames = float(factor), frozenset(int(f) for f in frames)
        self.history_only = bool(history_only)
        super().__init__(filter, heads, label or f"sink:{','.join(map(str, sorted(self.frames)))}x{factor:g}")

    @property
    def key(self):
        return super().key + (self.factor, tuple(sorted(self.frames)), self.history_only)

    def _scaled(self, call: AttentionCall) -> set:
        return _frames_of(self.frames, self.history_only, call)

    def wants(self, call: AttentionCall) -> bool:
        return call.kind == "self" and call.key_frames is not None and bool(self._scaled(call)) and \
            self.filter.matches(call)

    def edit_inputs(self, call, q, k, v):
        k = k.clone()  # [B, Lk, H, D]: k is a view of the KV cache
        fsl = call.frame_seq_len
        scaled = self._scaled(call)
        for j, f in enumerate(call.key_frames):
            if f in scaled:
                for h in _heads_of(self, call):
                    k[:, j * fsl : (j + 1) * fsl, h] *= self.factor
        return call, q, k, v
