"""The hook framework: probes that subscribe to attention calls of a model.

A model built by `models/` passes every attention call through `models.common.attention.attend` together with an
`AttentionCall` (layer, self/cross, step, timestep, chunk, phase, CFG branch, the absolute frames of its
queries and keys). A probe is any object with `wants(call)` and `observe(call, q, k, v, out, lse)` (and
`needs_lse = True` to get the log-sum-exp; lse is None without it); `attach(model, probe)` subscribes it for the
duration of a `with` block:

    probe = Probe(CallFilter(layers={3}, kinds={"self"}, steps={0}), heads=[0, 5], fn=my_function)
    with attach(model, probe):
        rollout(...)

With no probe attached the model runs exactly its plain attention path. Interventions
(workbench/interventions.py) select calls with the same `CallFilter` and attach the same way; they edit a call
before the kernel runs, and probes see what ran. `fn(call, q, k, v, out, lse)` gets
q [B, Lq, h, D], k/v [B, Lk, h, D] restricted to the chosen heads, out [B, Lq, h, D] and lse [B, h, Lq]
(only when the probe sets `needs_lse`).
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from models.common.attention import AttentionCall


# the values a filter's word-valued fields can take (a call's kind, phase and CFG branch)
FILTER_WORDS = {"kinds": ("self", "cross"), "phases": ("denoise", "context", "train"),
                "cfgs": ("cond", "uncond", "none")}


def _set(name: str, values) -> frozenset | None:
    """A filter field as a frozenset: ints for layers, steps and chunks (an int alone as a set of one), words from
    FILTER_WORDS for the others (a word alone likewise); anything else is a ModelInputError naming it."""
    from models.errors import ModelInputError

    if values is None:
        return None
    words = FILTER_WORDS.get(name)
    if isinstance(values, str) if words else isinstance(values, numbers.Integral) and not isinstance(values, bool):
        values = [values]  # one value alone
    if not hasattr(values, "__iter__"):
        raise ModelInputError(f"CallFilter {name}={values!r}: give a set of {'words' if words else 'ints'}")
    values = frozenset(values)
    if words:
        bad = sorted(str(v) for v in values if v not in words)
        allowed = f"one of {list(words)}"
    else:
        bad = sorted(str(v) for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0)
        allowed = "ints >= 0"
    if bad:
        raise ModelInputError(f"CallFilter {name}: {bad} not allowed; give {allowed}")
    return values


@dataclass(frozen=True)
class CallFilter:
    """Which calls a probe sees; None means any. Calls without rollout labels match only an all-None filter
    on steps, chunks, phases and cfgs."""

    layers: frozenset | None = None
    kinds: frozenset | None = None  # {"self", "cross"}
    steps: frozenset | None = None
    chunks: frozenset | None = None
    phases: frozenset | None = None  # {"denoise", "context", "train"}
    cfgs: frozenset | None = None  # {"cond", "uncond", "none"}

    def __post_init__(self):
        for name in ("layers", "kinds", "steps", "chunks", "phases", "cfgs"):
            object.__setattr__(self, name, _set(name, getattr(self, name)))

    def matches(self, call: AttentionCall) -> bool:
        if self.layers is not None and call.layer not in self.layers:
            return False
        if self.kinds is not None and call.kind not in self.kinds:
            return False
        labels = call.labels
        for name, value in (("steps", "step"), ("chunks", "chunk"), ("phases", "phase"), ("cfgs", "cfg")):
            allowed = getattr(self, name)
            if allowed is not None and (labels is None or getattr(labels, value) not in allowed):
                return False
        return True


class Probe:
    """A filter, a head selection and a function called with each matching call's tensors."""

    needs_lse = False

    def __init__(self, filter: CallFilter | None = None, heads: Iterable[int] | None = None,
                 fn: Callable | None = None, needs_lse: bool = False):
        self.filter = filter or CallFilter()
        self.heads = None if heads is None else list(heads)
        self.fn = fn
        self.needs_lse = needs_lse or self.needs_lse
        self._head_index: dict = {}

    def wants(self, call: AttentionCall) -> bool:
        return self.filter.matches(call)

    def check_run(self, extent) -> None:
        """Called by the sampler before its first forward (models/common/rollout.py): `check_run_extent`."""
        check_run_extent(self, extent)

    def head_index(self, q) -> torch.Tensor | None:
        """The chosen heads as an index tensor on q's device, or None when they are all of q's heads
        (q [B, L, H, D]). Made once per device and head list, never while a CUDA graph is being recorded."""
        if self.heads is None or self.heads == list(range(q.shape[2])):
            return None
        key = (q.device, tuple(self.heads))  # (the heads too: `probe.heads` set again selects the new ones)
        idx = self._head_index.get(key)
        if idx is None and q.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a probe's head index was first needed while recording a CUDA graph; run the "
                               "rollout once eagerly with the probe attached first")
        if idx is None:
            idx = self._head_index[key] = torch.tensor(self.heads, device=q.device)
        return idx

    def observe(self, call: AttentionCall, q, k, v, out, lse) -> None:
        idx = self.head_index(q)
        if idx is not None:  # a real subset: select it
            q, k, v, out = (t.index_select(2, idx) for t in (q, k, v, out))
            lse = None if lse is None else lse.index_select(1, idx)
        self.on_call(call, q, k, v, out, lse)

    def on_call(self, call: AttentionCall, q, k, v, out, lse) -> None:
        if self.fn is not None:
            self.fn(call, q, k, v, out, lse)


class RecordingProbe(Probe):
    """Keeps a detached host copy of every matching call as `records`: (call, q, k, out), out None unless
    `keep_out` - for small models, tests, notebooks."""

    def __init__(self, filter: CallFilter | None = None, heads=None, keep_out: bool = False):
        super().__init__(filter, heads)
        self.keep_out = keep_out
        self.records: list[tuple[AttentionCall, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def on_call(self, call, q, k, v, out, lse):
        def copy(t):  # a copy also on the CPU, where .cpu() is the same tensor: k is a view of the KV cache
            return t.detach().to("cpu", copy=True)

        self.records.append((call, copy(q), copy(k), copy(out) if self.keep_out else None))


def check_subscribers(model, subscribers) -> None:
    """Each subscriber's filter layers and heads exist in the model (a ModelInputError naming them otherwise): a
    probe or an edit aimed at layer 99 of a 6-layer model would otherwise see or change nothing, silently."""
    from models.errors import ModelInputError

    for sub in subscribers:
        check_kind(sub)
    config = getattr(model, "config", None)
    if config is None:
        return
    for sub in subscribers:
        layers, heads = getattr(getattr(sub, "filter", None), "layers", None), getattr(sub, "heads", None)
        for what, values, n in (("layers", layers, config.num_layers), ("heads", heads, config.num_heads)):
            if not isinstance(values, (set, frozenset, list, tuple)):
                continue  # (none chosen: all)
            bad = sorted(v for v in values if not (isinstance(v, numbers.Integral) and 0 <= v < n))
            if bad:
                raise ModelInputError(f"{type(sub).__name__}: {what} {bad} out of range: the model has {what} "
                                      f"0-{n - 1}")


def check_run_extent(sub, extent) -> None:
    """What a subscriber selects - its filter's steps, chunks, phases and CFG branches, an intervention's key
    `frames` - exists in the run about to start (`extent`: models/common/labels.py `RunExtent`), and its filter's
    choices meet in at least one forward; a ModelInputError naming what does not, before any work. (The layers and
    heads were checked at attach, `check_subscribers`.)"""
    from models.errors import ModelInputError

    name = getattr(sub, "label", None) or type(sub).__name__
    does = "change" if hasattr(sub, "edits") else "see"
    filt, frames = getattr(sub, "filter", None), getattr(sub, "frames", None)
    chosen = {what: getattr(filt, what, None) for what in ("chunks", "steps", "phases", "cfgs")}  # (a forward's order)
    for what, pick, have in (("steps", chosen["steps"], extent.steps),
                             ("chunks", chosen["chunks"], range(extent.chunks)),
                             ("phases", chosen["phases"], extent.phases), ("cfgs", chosen["cfgs"], extent.cfgs),
                             ("frames", frames if isinstance(frames, (set, frozenset, list, tuple)) else None,
                              range(extent.frames))):
        bad = [] if pick is None else sorted(set(pick) - set(have))  # (ints, or words: one sort a field)
        if bad:
            from workbench.summary import format_int_list

            allowed = ", ".join(sorted(have)) if what in ("phases", "cfgs") else format_int_list(have)
            raise ModelInputError(f"{name}: {what} {bad} not in this rollout, whose {what} are {allowed}: it would "
                                  f"{does} nothing there")
    if not any(all(pick is None or v in pick for v, pick in zip(f, chosen.values())) for f in extent.forwards):
        # each choice is in the run, but no forward has them together (a forward the run skips)
        from workbench.summary import format_int_list

        def runs(c: int) -> str:  # e.g. 'chunk 3: denoise step(s) 0-3'
            return f"chunk {c}: " + ", ".join(
                f"{ph} step(s) {format_int_list(sorted(f[1] for f in extent.forwards if f[0] == c and f[2] == ph))}"
                for ph in sorted({f[2] for f in extent.forwards if f[0] == c}))

        picked = ", ".join(f"{what} {sorted(pick)}" for what, pick in chosen.items() if pick is not None)
        shown = sorted(chosen["chunks"] or range(extent.chunks))[:3]
        raise ModelInputError(f"{name}: {picked} select no forward of this rollout ({'; '.join(map(runs, shown))}): "
                              f"it would {does} nothing there")


EDITABLE = frozenset({"q", "k", "v", "mask", "out"})  # what an intervention may change (workbench/interventions.py)


def check_kind(sub) -> None:
    """A subscriber is a probe (`wants` and `observe`) or an intervention (`wants`, `edits`, `label`, `edit_inputs`
    and `edit_output`; `key` where it is `graph_safe`: the rollout graphs' key), whose `edits` name only what may be
    edited; one with a `check_edits` (workbench/interventions.py's `Intervention`) also checks its edit methods
    against its `edits`."""
    from models.errors import ModelInputError, check_takes

    if isinstance(sub, type):
        raise ModelInputError(f"{sub.__name__} is a class; attach an instance of it (e.g. {sub.__name__}(...) with "
                              "its filter and settings)")
    name = getattr(sub, "label", None) or type(sub).__name__
    probe_or_edit = hasattr(sub, "edits") or callable(getattr(sub, "observe", None))
    if not callable(getattr(sub, "wants", None)) or not probe_or_edit:
        raise ModelInputError(f"{name}: neither a probe (wants, observe: workbench.hooks.Probe) nor an intervention "
                              "(wants, edits, edit_inputs / edit_output: workbench.interventions.Intervention)")
    for method, args in (("wants", "call"), ("observe", "call, q, k, v, out, lse"), ("edit_inputs", "call, q, k, v"),
                         ("edit_output", "call, q, k, v, out")):
        if callable(fn := getattr(sub, method, None)):
            check_takes(fn, args, f"{name}: {type(sub).__name__}.{method}", "models/common/attention.py `attend`")
    if not hasattr(sub, "edits"):
        return
    lacks = [a for a in ("label", "edit_inputs", "edit_output") if not hasattr(sub, a)]
    lacks += ["key"] if getattr(sub, "graph_safe", False) and not hasattr(sub, "key") else []
    if lacks:
        raise ModelInputError(f"{name}: an intervention (it has edits) without {lacks}; attend and the rollout use "
                              "them (subclass workbench.interventions.Intervention: it has them all)")
    edits = set(sub.edits)
    if edits - EDITABLE:
        raise ModelInputError(f"{name}: edits {sorted(edits - EDITABLE)}; an intervention edits {sorted(EDITABLE)}")
    if callable(getattr(sub, "check_edits", None)):
        sub.check_edits()


@contextlib.contextmanager
def attach(model, *probes):
    """Subscribe probes (observers) and interventions (workbench/interventions.py: anything with `edits`) to a
    model's attention calls for the duration of the block. Interventions edit a call before observers see it."""
    check_subscribers(model, probes)
    handles = [(model.interventions if hasattr(p, "edits") else model.observers).add(p) for p in probes]
    try:
        yield probes[0] if len(probes) == 1 else probes
    finally:
        for h in handles:
            h.remove()
