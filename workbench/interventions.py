"""Interventions: edits of the attention calls they select, at the model's entry point (`models.attention.attend`).

An intervention selects calls as a probe does (a `CallFilter` on layer, kind, step, chunk, phase, CFG branch;
workbench/hooks.py) and edits what the kernel gets - q, k, v and the key frame mask (`edit_inputs`) - and what
comes out of it - a head's output (`edit_output`). It says which of these it may change (`edits`); `attend`
records its `label` in `call.edits` of every call it edited, and the observers attached at the same time see what
ran: the edited q, k, v, the edited call (its mask, its `edits`), the edited output, and the log-sum-exp of the
kernel that ran on the edited inputs. `attach(model, intervention, probe)` subscribes both kinds.

CUDA graphs (models/rollout.py `RolloutGraphs`): an intervention whose edits are GPU work on tensors at fixed
addresses sets `graph_safe = True` (the default here); a few-step rollout then replays recorded graphs with it, as
with a graph-safe probe. Its `key` (its settings) is part of the graphs' key, so a changed intervention records
new graphs and a removed one drops them.

What the interventions to come (heads, frames, sinks) will use this seam for:
- head ablation - zero, mean or resample a head's output: `edit_output` on the chosen heads (`heads`);
- key-frame knockout: `edit_inputs` returns the call with a frame mask [nqf, nkf] that leaves those key frames out
  (`dataclasses.replace(call, frame_mask=...)`); the kernel table runs masked calls exactly (FlexAttention on a
  GPU, SDPA elsewhere) and the statistics read the same mask;
- per-head temperature: scale a head's q in `edit_inputs` (its logits scale by the same factor);
- sink scaling (the attention of chosen key frames multiplied by c, then renormalised): an additive logit bias per
  (head, key frame), ln c, carried on the call beside the mask; docs/architecture.md says how the kernels and the
  log-sum-exp the probes need take it. Not built yet: no kernel takes a bias today.
"""

from __future__ import annotations

from typing import Iterable

from models.attention import AttentionCall
from workbench.hooks import CallFilter

EDITABLE = frozenset({"q", "k", "v", "mask", "out"})


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


class Identity(Intervention):
    """Changes nothing, through the whole edit path: it claims every edit (so `attend` runs the path an editing
    intervention takes: inputs, the output, observers after the edit) and returns what it was given. With it
    attached a model's outputs are bitwise those without it (tests/test_interventions.py)."""

    def __init__(self, filter: CallFilter | None = None, heads: Iterable[int] | None = None, label: str = "identity",
                 edits: Iterable[str] = EDITABLE):
        self.edits = frozenset(edits)
        super().__init__(filter, heads, label)
