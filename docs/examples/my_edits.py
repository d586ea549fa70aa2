"""An example plugin: an intervention of one's own, run by `workbench intervene` like the built-in ones
(docs/architecture.md, "Interventions and cache policies of your own").

    PYTHONPATH=docs/examples WORKBENCH_PLUGINS=my_edits workbench intervene \
        --spec docs/examples/my_spec.yaml --out runs/mine.zarr

`head_scale`: the chosen heads' attention outputs times `factor` (0: the head's zero ablation).
"""

from workbench.intervene_entries import EntryKind, register
from workbench.interventions import Intervention


class HeadScale(Intervention):
    edits = frozenset({"out"})  # what it changes: the heads' outputs

    def __init__(self, filter, heads, label, factor=1.0):
        super().__init__(filter, heads, label)
        self.factor = factor

    @property
    def key(self):  # its settings, part of the rollout graphs' key
        return super().key + (self.factor,)

    def edit_output(self, call, q, k, v, out):  # out [B, Lq, heads, head_dim]
        out = out.clone()  # (never in place)
        heads = list(self.heads) if self.heads is not None else slice(None)
        out[:, :, heads] = out[:, :, heads] * self.factor
        return out


register(EntryKind("head_scale", HeadScale, {"factor": 1.0}, about="heads' outputs times factor"))
