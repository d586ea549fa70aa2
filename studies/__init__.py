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

from workbench.inputs import REPO_ROOT, find_store, store_folders  # noqa: F401 (re-exported: they were here)


def load_store(path: str | Path):
    """`workbench.store.open_store` on `find_store(path)` (the schema check and error messages are its own; a
    relative path found nowhere says where it was looked for, one found above the working directory says where it
    was found)."""
    from workbench.errors import WorkbenchError
    from workbench.progress import shell_word
    from workbench.store import open_store

    found = find_store(path)
    if not found.is_absolute() and not found.exists():
        folders = store_folders()
        where = ", ".join(str(f) for f in folders[:4]) + (", ..." if len(folders) > 4 else "")
        raise WorkbenchError(f"no store at {str(path)!r}: looked in the working directory and the folders above it "
                             f"and the repository ({where}); make it first "
                             f"(`workbench extract --out {shell_word(path)}`; a "
                             "notebook names its command above the cell that opens it), or give an absolute path")
    if found != Path(path):
        print(f"opened {found}")  # (not the working directory's: a notebook names the store it shows)
    return open_store(found)


def no_window_words(bidirectional: bool) -> str:
    """A KV cache without a window in words, as every page says it: what such a model's queries attend."""
    return f"no KV window ({'every frame' if bidirectional else 'every earlier frame'} attended)"


def unfinished_note(attrs: dict) -> str:
    """A sentence when a store holds fewer samples (an effects store: entries) than its runs were asked for (attrs
    `requested` against `completed`, docs/store.md): the run was stopped midway, or is still writing; '' otherwise
    and for stores made before `requested` was recorded."""
    asked = list(attrs.get("requested") or [])
    done = set(attrs.get("completed") or [])
    missing = [k for k in asked if k not in done]
    if not missing:
        return ""
    what = "entries" if attrs.get("store_kind") == "effects" else "samples"
    shown = ", ".join(map(str, missing[:4])) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return (f"This store holds {len(asked) - len(missing)} of the {len(asked)} {what} its runs asked for (not there: "
            f"{shown}): a run was stopped midway, or is still writing; the command that asked for them, run again, "
            "finishes it (each run's command is in the store's attrs `command` and `runs`). A store kept as it is "
            "needs nothing: its finished entries are whole.")
