"""Studies: read attention stores (docs/store.md) and turn them into metrics, comparisons, figures and reports.

Nothing here runs a model. Every function takes a store opened with `workbench.store.open_store` (or the
`load_store` below, which first finds a relative path from the notebook folder too) and returns labelled
xarray objects, plotly figures or HTML.

    from studies import load_store, metrics, figures
    ds = load_store("runs/embedded.zarr")
    hm = metrics.head_metrics(ds)            # (step, layer, head) sink / local / recency / entropy metrics
    metrics.classify_heads(hm).sel(step=0)   # sink, local, global, deep_sink or mixed per (layer, head)
    figures.head_grid(ds, layer=0)           # the researchers' per-head query x key frame heatmaps

Modules: `metrics` (per-head statistics and the head taxonomy), `compare` (two stores aligned on prompt,
seed and timestep), `figures` (plotly), `report` (self-contained HTML, built with `page`), `effects_report`
(the page of an effects store of `workbench intervene`), `training` (attention across training, from a training
probe store), `synthetic` (stores with planted heads, for tests and demos), `commands` (`workbench report` and
`workbench compare`). For the miniature world
(models/world.py) two modules read decoded pixels instead of stores: `world_metrics` (a tracker and the scores of
a video against its prompt, numpy only) and `world_report` (tables, drift curves and the comparison of two models
for `workbench evaluate`).
This file stays light: it imports neither xarray nor plotly, so `workbench --help` is quick.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_store(path: str | Path) -> Path:
    """Resolve a store path: as given (absolute, or relative to the working directory), else relative to the
    repository root, so a notebook run from `notebooks/` finds `runs/embedded.zarr` too."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    candidate = REPO_ROOT / path
    return candidate if candidate.exists() else path


def load_store(path: str | Path):
    """`workbench.store.open_store` on `find_store(path)` (the schema check and error messages are its own)."""
    from workbench.store import open_store

    return open_store(find_store(path))
