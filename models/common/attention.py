"""The attention entry point: every self- and cross-attention call of the Wan models goes through `attend`.

Each call carries what it is, as an `AttentionCall`:
- from the rollout (`ForwardLabels`): denoising step, timestep, chunk, phase (denoise / context), CFG branch;
- from the model: layer index and kind (self / cross);
- from the KV cache: the absolute latent frame of every query frame and key frame (after sink and window
  eviction the key frames are not contiguous, e.g. 0-2 then 12-20), each key frame's stamp (`KeyStamps`: it
  changes whenever the cache writes or re-rotates that frame's keys), and which (query, key) frame pairs are
  attended when a mask applies (block-causal full-sequence forward).

Two kinds of subscribers are passed in by the model (`WanModel.observers`, `WanModel.interventions`); `models/`
never imports them (the workbench's probes and interventions implement the protocols below):
- an **intervention** (`AttentionIntervention`) edits the calls it selects: q, k, v and the key frame mask
  before the kernel (`edit_inputs`), a head's output after it (`edit_output`). Each call it edits carries its
  label in `call.edits`, so what ran is recorded;
- an **observer** (`AttentionObserver`) reads what ran: the edited q, k, v, the edited call (its mask), the
  edited output and, when it asks, the row log-sum-exp of the kernel that ran. Observers never change outputs.
With no subscriber interested in a call, `attend` is exactly the kernel call.

Kernels: `call.kernel` is the model's `attention_kernel` choice ("auto" or "triton"); which kernel of the table
runs a call is decided in one place, models/common/attention_kernels.py, whose `compute` gives the same output bits
whether or not the log-sum-exp is asked for, so observing never changes outputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Hashable, Protocol, Sequence

import torch

from models.common.attention_kernels import compute
from models.common.kv_cache import KeyStamps
from models.common.labels import ForwardLabels  # noqa: F401 (re-exported: the labels every AttentionCall carries)

# --------------------------------------------------------------------------------------------------
# Labels


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """The identity of one attention call. Frames are absolute latent frame indices."""

    layer: int
    kind: str  # "self" | "cross"
    labels: ForwardLabels | None
    query_frames: tuple[int, ...]  # one entry per query frame, in token order
    key_frames: tuple[int, ...] | None  # one entry per key frame in token order; None for cross-attention
    frame_seq_len: int  # tokens per latent frame
    grid: tuple[int, int]  # (height, width) of a frame's token grid
    frame_mask: torch.Tensor | None = None  # [n_query_frames, n_key_frames] bool, True = attended; None = all
    num_heads: int = 0
    head_dim: int = 0
    kernel: str = "auto"  # the model's attention kernel choice (models.common.attention_kernels.CHOICES)
    edits: tuple[str, ...] = ()  # labels of the interventions that edited this call, in the order they ran
    head_mask: torch.Tensor | None = None  # [num_heads, n_key_frames] bool: a head-wise cache policy's key frames
    key_stamps: KeyStamps | None = None  # the KV cache's stamp of each key frame (equal stamps, equal keys) and
    # which k tensor they describe; None without a cache. An observer may reuse what it computed from a key frame
    # while its stamp holds and `key_stamps.valid_for(k)` (an edited k is not the cache's)

    @property
    def step(self) -> int | None:
        return None if self.labels is None else self.labels.step

    @property
    def timestep(self) -> float | None:
        return None if self.labels is None else self.labels.timestep

    @property
    def chunk(self) -> int | None:
        return None if self.labels is None else self.labels.chunk


class AttentionObserver(Protocol):
    """What the model needs from an observer (the workbench's probes implement this)."""

    needs_lse: bool  # ask the entry point for the log-sum-exp of every query row (an observer without it: False)

    def wants(self, call: AttentionCall) -> bool: ...

    def observe(self, call: AttentionCall, q, k, v, out, lse) -> None:
        """q [B, Lq, H, D], k/v [B, Lk, H, D] as the kernel saw them; out [B, Lq, H, D];
        lse [B, H, Lq] float32 (natural log) or None."""

    # Optional: an observer with `computes_output = True` gets `compute(call, q, k, v)` instead of `observe`
    # and returns the attention output (or None to let the entry point compute it and call `observe`).


class AttentionIntervention(Protocol):
    """What the model needs from an intervention (workbench/interventions.py implements this)."""

    label: str  # what it does, recorded in `call.edits` of every call it edits
    edits: frozenset  # which of "q", "k", "v", "mask", "out" it may change
    graph_safe: bool  # its edits are GPU work on tensors at fixed addresses (CUDA graphs may record them)
    key: Hashable  # its settings: a rollout's CUDA graphs are recorded anew when this changes

    def wants(self, call: AttentionCall) -> bool: ...

    def edit_inputs(self, call: AttentionCall, q, k, v) -> tuple[AttentionCall, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
        """(call, q, k, v) the kernel gets: q [B, Lq, H, D], k/v [B, Lk, H, D], each of its shape as given; a
        changed key frame mask is a call with another `frame_mask` [nqf, nkf] (e.g. `dataclasses.replace(call,
        frame_mask=m)`). k and v may be the KV cache's own memory: edit copies (`attend` refuses an in-place edit)."""

    def edit_output(self, call: AttentionCall, q, k, v, out) -> torch.Tensor:
        """out [B, Lq, H, D] after the kernel (e.g. one head's output zeroed)."""


# --------------------------------------------------------------------------------------------------
# The entry point


def attend(q, k, v, call: AttentionCall, observers: Sequence[AttentionObserver] = (), *,
           interventions: Sequence[AttentionIntervention] = ()) -> torch.Tensor:
    """Every attention call of the model. q [B, Lq, H, D]; k, v [B, Lk, H, D] -> out [B, Lq, H, D]."""
    if call.head_mask is not None:
        return _attend_by_head_groups(q, k, v, call, observers, interventions)
    editing = [iv for iv in interventions if iv.wants(call)] if interventions else ()
    for iv in editing:  # in order: each edit sees the one before it
        before = q, k, v, _version(k), _version(v)
        edited = iv.edit_inputs(call, q, k, v)
        if not (isinstance(edited, tuple) and len(edited) == 4):
            _refuse(iv, f"edit_inputs returned {_described(edited)}; it returns (call, q, k, v)")
        call, q, k, v = edited
        _check_edit(iv, "edit_inputs", before, (q, k, v))
    if editing:
        call = dataclasses.replace(call, edits=call.edits + tuple(iv.label for iv in editing))
    interested = [obs for obs in observers if obs.wants(call)] if observers else ()
    needs_lse = any(getattr(obs, "needs_lse", False) for obs in interested)
    if needs_lse and any(not getattr(iv, "observed_exactly", True) for iv in editing):
        from models.errors import ModelInputError  # (statistics from the log-sum-exp read the call's mask)

        raise ModelInputError(f"layer {call.layer}: {', '.join(iv.label for iv in editing)} changes what some heads "
                              "attend to beyond what the call's one key frame mask says; attention statistics would "
                              "read the mask, not those heads' attention: capture without it")
    mask, fsl, kernel = call.frame_mask, call.frame_seq_len, call.kernel
    if not interested and not editing:
        return compute(q, k, v, frame_mask=mask, frame_seq_len=fsl, kernel=kernel)[0]
    out = computed_by = lse = None
    if not any("out" in iv.edits for iv in editing):  # (else every observer must see the edited output)
        out, computed_by = _computed_by_observer(interested, call, q, k, v)
    if out is None:
        out, lse, _ = compute(q, k, v, frame_mask=mask, frame_seq_len=fsl, kernel=kernel, lse=needs_lse)
    for iv in editing:
        if "out" in iv.edits:
            shape = out.shape
            out = iv.edit_output(call, q, k, v, out)
            if not isinstance(out, torch.Tensor) or out.shape != shape:
                _refuse(iv, f"edit_output returned {_described(out)}; it returns the output's shape {list(shape)}")
    for obs in interested:
        if obs is not computed_by:
            obs.observe(call, q, k, v, out, lse)
    return out


def _check_edit(iv, what: str, before, after) -> None:
    """An intervention's edit_inputs leaves k and v as they were (they are the KV cache's or the text cache's
    memory: an in-place edit would change every later call's keys) and keeps the shapes of q, k, v (a key frame is
    taken out with the call's frame mask, not by slicing k and v: observers read the call's key frames)."""
    q0, k0, v0, k_version, v_version = before
    if _version(k0) != k_version or _version(v0) != v_version:
        name = "k" if _version(k0) != k_version else "v"
        _refuse(iv, f"{what} changed {name} in place ({name} may be the KV cache's own memory, which every later "
                    f"call reads): edit a copy ({name} = {name} * c, or {name}.clone() first)")
    for name, old, new in zip("qkv", (q0, k0, v0), after):
        if not isinstance(new, torch.Tensor) or new.shape != old.shape:
            _refuse(iv, f"{what} returned as {name} {_described(new)}; it keeps {name}'s shape {list(old.shape)} (take "
                        "key frames out with the call's frame_mask: dataclasses.replace(call, frame_mask=m))")


def _version(t):
    """t's in-place write counter (None for a tensor made under torch.inference_mode, which keeps none)."""
    return None if t.is_inference() else t._version


def _described(x) -> str:
    return f"a tensor of shape {list(x.shape)}" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"


def _refuse(iv, message: str) -> None:
    from models.errors import ModelInputError

    raise ModelInputError(f"intervention {getattr(iv, 'label', type(iv).__name__)!r}: {message}")


def _attend_by_head_groups(q, k, v, call: AttentionCall, observers, interventions) -> torch.Tensor:
    """A call whose heads attend to different key frames (a head-wise KV-cache policy): one masked call per group
    of heads with the same key frames, outputs put back in head order. Observers and interventions would see
    per-group calls, not the layer's, so they are refused here (the head-wise policy's own note says so)."""
    if any(obs.wants(call) for obs in observers) or any(iv.wants(call) for iv in interventions):
        from models.errors import ModelInputError

        raise ModelInputError("attention capture and interventions do not run under a head-wise cache policy yet; "
                              "use a policy that keeps the same frames for every head")
    nqf, fsl = len(call.query_frames), call.frame_seq_len
    out = torch.empty_like(q)  # [B, Lq, H, D]
    groups: dict[tuple, list[int]] = {}
    for h, row in enumerate(call.head_mask.tolist()):
        groups.setdefault(tuple(row), []).append(h)
    for row, heads in groups.items():
        idx = slice(heads[0], heads[-1] + 1) if heads == list(range(heads[0], heads[-1] + 1)) else heads
        qg, kg, vg = q[:, :, idx], k[:, :, idx], v[:, :, idx]
        if call.frame_mask is None:  # every query frame sees the same key frames: keep only those (unmasked call)
            tokens = _group_tokens(row, fsl, k.device)
            kg, vg = kg.index_select(1, tokens), vg.index_select(1, tokens)
            sub = compute(qg, kg, vg, frame_seq_len=fsl, kernel=call.kernel)[0]
        else:
            mask = torch.tensor(row, dtype=torch.bool)[None, :].expand(nqf, -1) & call.frame_mask.cpu()
            sub = compute(qg, kg, vg, frame_mask=mask, frame_seq_len=fsl, kernel=call.kernel)[0]
        out[:, :, idx] = sub
    return out


_GROUP_TOKENS: dict = {}


def _group_tokens(row: tuple, fsl: int, device) -> torch.Tensor:
    """The key token indices [n * fsl] of the key frames a head group keeps (row: one bool per key frame), kept on
    the device per (row, fsl): the same few rows come back in every layer and forward."""
    key = (row, fsl, str(device))
    if key not in _GROUP_TOKENS:
        if len(_GROUP_TOKENS) > 256:
            _GROUP_TOKENS.clear()
        frames = torch.tensor(row, dtype=torch.bool)
        _GROUP_TOKENS[key] = torch.arange(len(row) * fsl).view(len(row), fsl)[frames].flatten().to(device)
    return _GROUP_TOKENS[key]


def _computed_by_observer(interested, call, q, k, v):
    """(out, observer) when an observer computes the output itself (a kernel that also returns its statistics;
    it observes the call on the way), else (None, None). Not when another observer needs the log-sum-exp."""
    for obs in interested:
        if not getattr(obs, "computes_output", False):
            continue
        if any(other.needs_lse for other in interested if other is not obs):
            return None, None
        out = obs.compute(call, q, k, v)
        if out is not None:
            return out, obs
    return None, None


class Attend(torch.nn.Module):
    """A parameter-free module around `attend`, so that hook-based tools (nnsight, forward hooks) see the
    exact q, k, v of every call as this module's inputs: `blocks[3].self_attn.attend.inputs` = (q, k, v, call,
    observers) before any intervention's edit (the interventions come as a keyword argument). A torch.compile'd
    block runs it eagerly, inside the attention that models/wan/accel.py leaves eager: its kernels and observers
    are Python-dispatched."""

    def forward(self, q, k, v, call: AttentionCall, observers: Sequence[AttentionObserver] = (), *,
                interventions: Sequence[AttentionIntervention] = ()):
        return attend(q, k, v, call, observers, interventions=interventions)


@dataclass
class ObserverList:
    """The subscribers of one kind attached to one model: `WanModel.observers` and `WanModel.interventions`."""

    items: list = field(default_factory=list)

    def add(self, subscriber) -> "ObserverHandle":
        self.items.append(subscriber)
        return ObserverHandle(self, subscriber)

    def __iter__(self):
        return iter(self.items)

    def __bool__(self):
        return bool(self.items)

    def __len__(self):
        return len(self.items)


@dataclass
class ObserverHandle:
    owner: ObserverList
    observer: object

    def remove(self) -> None:
        if self.observer in self.owner.items:
            self.owner.items.remove(self.observer)

    def __enter__(self):
        return self.observer

    def __exit__(self, *exc):
        self.remove()
