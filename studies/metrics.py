"""Per-head attention metrics and a head taxonomy, from a store's `attn_mass` (docs/store.md).

Every metric starts from one *row*: the attention of one query frame over key frames, `attn_mass[..., query_frame,
:]`, a probability distribution over the key frames the call attended. NaN means "not attended" (future chunk,
evicted, not captured): it counts as zero mass and is left out of the supports.

Row metrics (`row_metrics`, dims sample, step, layer, head, query_frame):

    sink_mass        mass on key frame 0
    sink_chunk_mass  mass on the first chunk (key_chunk == 0; every frame for the bidirectional sampler)
    own_chunk_mass   mass on the key frames of the query's own chunk (key_chunk == query_chunk)
    local_mass       mass on key frames with |query_frame - key_frame| < local_window (default: the store's
                     num_frame_per_block, else 3): recency that means the same for causal and bidirectional samplers;
                     NaN for a row that attended no key frame outside the window (in a video of no more frames than
                     the window, every head's would be 1, local or not; so with query frames `all` a causal store's
                     mean leaves its first chunk out, while every row of a bidirectional store counts)
    early_mass       mass on the oldest early_fraction (default 0.5) of the frames the row attended, the frame on
                     the boundary counted by its share inside (the frame of rank r, oldest 0, weighs
                     clip(early_fraction * n_attended - r, 0, 1)), so uniform attention gives early_fraction
                     exactly, for any number of frames: the "deep sink" of Deep Forcing lives there
    mean_distance    mass-weighted mean of query_frame - key_frame, in frames (normalised by the row's mass)
    mean_abs_distance  the same of |query_frame - key_frame|: how far a head looks, back or ahead (in a causal
                     rollout only the query's own chunk lies ahead; in a bidirectional one the signed mean can
                     cancel to 0 for a head that looks far both ways)
    entropy          -sum p ln p over the attended key frames, in nats (p = the row normalised to sum 1)
    entropy_norm     entropy / ln(n_attended): 1 for uniform attention, 0 for one frame (NaN if n_attended = 1)
    n_attended       number of attended (non-NaN) key frames
    uniform_mass     1 / n_attended: the mass uniform attention puts on each attended key frame (the share the sink
                     rule compares sink_mass with)

`head_metrics` averages the row metrics over a choice of query frames (default: the last chunk, the rows the
researchers plot as `last_block_frame_attention`) and over samples. `recency_profile` is the mean mass at each
frame distance; with a rolling window and sink frames, the distances past the window are reached only by the sink
frames, and its `sink_only` coordinate says which. `classify_heads` turns head metrics into a taxonomy, first rule
that holds wins:

    sink       sink_mass    >= sink_min            (default 0.5), and sink_mass > uniform_mass: above uniform
                                                   attention's share, row by row on average (in a video of one or
                                                   two frames every head reaches sink_min)
    local      local_mass   >= local_min           (default 0.5)
    deep_sink  early_mass   >= deep_min            (default 0.6; uniform attention gives 0.5)
    global     entropy_norm >= global_min_entropy  (default 0.85)
    mixed      none of the above
    no_values  (before every rule) no row of the head holds a number: attention that was not finite (a rollout
               whose activations overflowed stores NaN rows), which no rule may class

deep_sink comes before global: a head spread over the oldest frames can have a high entropy (uniform over the
first 9 of 21 frames, mixed 70:30 with uniform over all 21: entropy_norm 0.89, early_mass 0.86), yet it is not
uniform over the video; uniform attention stays below the deep_sink rule (early_mass 0.5 for any number of
attended frames), and a near-uniform head just past 0.6 is a borderline case either way (its metrics, beside its
class, say how far past).

Also here: the researchers' statistics (`sink_delta` = v[0] - mean(v[1:-1]), `researcher_stats` with the
diagonal and column-0 means the researchers' extraction notebook prints) and the store invariants the notebooks assert
(`row_sum_error`, `expected_attended`, `nan_pattern_mismatches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from workbench.errors import WorkbenchError

QUERY_FRAME_CHOICES = ("last_chunk", "history", "all")
CLASSES = ("sink", "local", "global", "deep_sink", "mixed", "no_values")


# ---------------------------------------------------------------------------------------------- selections
def attention_store(ds, *, extra_dims: bool = False):
    """What a study reads: an attention store as `open_store` gives it (or its `attn_mass`), or a store's path,
    opened here (studies.load_store). Unless `extra_dims` (the metrics, which keep any dim they do not reduce),
    an effects store or a training probe store is refused, naming what to select: a figure or a comparison would
    average their extra dim, intervention or train_step, into the samples."""
    if isinstance(ds, (str, Path)):
        from studies import load_store

        ds = load_store(ds)
    if not isinstance(ds, (xr.Dataset, xr.DataArray)):
        raise WorkbenchError(f"expected an attention store (a path, or the Dataset open_store returns), got a "
                             f"{type(ds).__name__}")
    if extra_dims:
        return ds
    if "intervention" in ds.dims:
        raise WorkbenchError("this is an effects store (dim intervention, from workbench intervene): `workbench "
                             "report STORE` renders it; in Python, select one entry first, e.g. "
                             "ds.sel(intervention='baseline'), or read it with studies.effects_report")
    if "train_step" in ds.dims:
        raise WorkbenchError("this is a training probe store (dim train_step): select one train step first, e.g. "
                             "ds.sel(train_step=0), or read it with studies.training")
    return ds


def one(value, dim: str):
    """`value` where a function shows one layer, step or sample: a list (which would be cut to its first entry) or a
    bool is refused, naming it."""
    if isinstance(value, (bool, np.bool_)) or not (np.isscalar(value) or isinstance(value, str)):
        raise WorkbenchError(f"{dim} {value!r}: give one {dim} (this shows one {dim} at a time; call it once per "
                             f"{dim})")
    return value


def select(ds: xr.Dataset, *, sample=None, layer=None, step=None) -> xr.Dataset:
    """`ds` restricted to a sample id, layer(s) and step(s), each checked against the store (None keeps all).
    A scalar keeps the dim with one entry, so downstream code sees the same dims."""
    for dim, value in (("sample", sample), ("layer", layer), ("step", step)):
        if value is None:
            continue
        wanted = [value] if np.isscalar(value) or isinstance(value, str) else list(value)
        if any(isinstance(v, (bool, np.bool_)) for v in wanted):
            raise WorkbenchError(f"{dim} {value!r} is not a {dim}: give {dim} ids, e.g. {dim}={ds[dim].values[0]!r}")
        have = [v.item() if hasattr(v, "item") else v for v in ds[dim].values]
        if dim != "sample" and any(isinstance(v, str) for v in wanted):  # (a widget's or a CLI string: "3")
            if not all(isinstance(v, str) and v.strip().isdigit() for v in wanted if isinstance(v, str)):
                raise WorkbenchError(f"{dim} {value!r}: give int {dim}s, e.g. {dim}={have[0]!r}")
            wanted = [int(v) if isinstance(v, str) else v for v in wanted]
        missing = [v for v in wanted if v not in have]
        if missing:
            raise WorkbenchError(f"{dim} {missing[0]!r} is not in the store; it has {dim}s {_short(have)}")
        ds = ds.sel({dim: wanted})
    return ds


def query_frames_for(ds: xr.Dataset, query_frames: str | Sequence[int] = "last_chunk") -> list[int]:
    """The query frames a summary averages over.

    `last_chunk`: frames of the highest chunk (18-20 for 21 frames in chunks of 3; every frame for the
    bidirectional sampler); `history`: frames whose chunk is not the first (every frame if there is one chunk);
    `all`; or an explicit list of frame indices (or one frame)."""
    frames = [int(f) for f in ds.query_frame.values]
    chunk = np.asarray(ds["query_chunk"].values) if "query_chunk" in ds.coords else np.zeros(len(frames), dtype=int)
    if np.isscalar(query_frames) and not isinstance(query_frames, str):
        query_frames = [query_frames]  # one frame
    if isinstance(query_frames, str):
        if query_frames == "all":
            return frames
        if query_frames == "last_chunk":
            return [f for f, c in zip(frames, chunk) if c == chunk.max()]
        if query_frames == "history":
            return [f for f, c in zip(frames, chunk) if c > chunk.min()] or frames
        raise WorkbenchError(f"query_frames {query_frames!r} is not one of {QUERY_FRAME_CHOICES} or a list of frames")
    wanted = [int(f) for f in query_frames]
    missing = [f for f in wanted if f not in frames]
    if missing or not wanted:
        raise WorkbenchError(f"query frames {missing or wanted} are not in the store; it has {_short(frames)}")
    return wanted


def num_chunks(ds: xr.Dataset) -> int:
    """How many chunks (generation blocks) the store's query frames span: 1 for the bidirectional sampler."""
    return len(np.unique(ds["query_chunk"].values)) if "query_chunk" in ds.coords else 1


def default_layer(ds: xr.Dataset) -> int:
    """The first captured layer."""
    return int(ds.layer.values[0])


def default_step(ds: xr.Dataset) -> int:
    """The first captured denoising step (step 0, t = 1000, the researchers' choice, when it was captured); the
    first captured step when every one is a context pass."""
    steps = np.asarray(ds.step.values)
    denoising = steps[np.asarray(ds.phase.values) == "denoise"] if "phase" in ds.coords else steps
    return int((denoising if len(denoising) else steps)[0])


def span_text(what: str, first: int, last: int) -> str:
    """'query frames 18-20', or 'query frame 0' for one (not 'frames 0-0'); `what` is singular."""
    return f"{what} {first}" if first == last else f"{what}s {first}-{last}"


def timestep_text(t) -> str:
    """A timestep as the pages write it: to one decimal, as the Steps table (833.3, not 833.333; 1000, 937.5)."""
    return f"{round(float(t), 1):g}"


def step_label(ds: xr.Dataset, step: int) -> str:
    """'step 0 (t=1000, denoise)' with the CFG branch when there is one."""
    steps = [int(v) for v in ds.step.values]
    if step not in steps:
        raise WorkbenchError(f"step {step!r} is not in the store; it has steps {steps}")
    s = ds.sel(step=step)
    cfg = str(s.cfg.values) if "cfg" in ds.coords else "none"
    phase = str(s.phase.values) if "phase" in ds.coords else "denoise"
    extra = "" if cfg == "none" else f", {cfg}"
    return f"step {step} (t={timestep_text(s.timestep.values)}, {phase}{extra})"


# ----------------------------------------------------------------------------------------------- row metrics
def _mass(ds_or_mass: xr.Dataset | xr.DataArray) -> xr.DataArray:
    if isinstance(ds_or_mass, xr.Dataset):
        require_var(ds_or_mass, "attn_mass")
        ds_or_mass = ds_or_mass["attn_mass"]
    return ds_or_mass.astype(np.float64).load()


def require_var(ds: xr.Dataset, var: str) -> None:
    """WorkbenchError naming the store's statistics if `var` is not one of them (and, for a name that is no
    statistic at all, the ones there are)."""
    if var not in ds:
        from workbench.statistics import STATISTICS

        if var not in STATISTICS:
            raise WorkbenchError(f"{var!r} is not in this store ({list(ds.data_vars)}) nor a built-in statistic "
                                 f"(`workbench extract --stats` takes {sorted(STATISTICS)}; a plugin's is in the "
                                 "stores made with it)")
        raise WorkbenchError(f"the store has no {var!r} (its stats: {list(ds.data_vars)}); "
                             f"extract with `--stats {var},...` to get it")


def require_frame_pair(ds: xr.Dataset, var: str, what: str) -> None:
    """WorkbenchError unless `var` is in the store with query_frame and key_frame dims (what `what` draws)."""
    require_var(ds, var)
    if not {"query_frame", "key_frame"} <= set(ds[var].dims):
        raise WorkbenchError(f"{what} draws a statistic per query frame and key frame (attn_mass, attn_logit); "
                             f"{var} has dims {ds[var].dims}: draw it with figures.metric_by_query_frame or "
                             "figures.layer_head_map (its mean per layer and head)")


def default_local_window(ds: xr.Dataset | xr.DataArray) -> int:
    """The store's `num_frame_per_block` (frames per chunk), or 3 (the released config's) when it is missing
    or 0."""
    return int(ds.attrs.get("num_frame_per_block") or 3)


def distance(mass: xr.DataArray) -> xr.DataArray:
    """[query_frame, key_frame] query_frame - key_frame, in frames (positive: the key is in the past)."""
    return mass.query_frame - mass.key_frame


def row_metrics(
    ds: xr.Dataset | xr.DataArray,
    *,
    local_window: int | None = None,
    early_fraction: float = 0.5,
) -> xr.Dataset:
    """The row metrics of the module docstring, one value per (sample, step, layer, head, query_frame).

    `ds` is a store (or its `attn_mass`), whole or selected; `local_window` defaults to the store's
    `num_frame_per_block` (3 if the attribute is missing)."""
    ds = attention_store(ds, extra_dims=True)
    if not 0.0 < early_fraction <= 1.0:
        raise WorkbenchError(f"early_fraction {early_fraction} must be in (0, 1]")
    mass = _mass(ds)  # [..., query_frame, key_frame]
    if local_window is None:
        local_window = default_local_window(ds)
    if local_window < 1:
        raise WorkbenchError(f"local_window {local_window} must be at least 1 frame")
    attended = mass.notnull()
    captured = attended.any("key_frame")  # rows with any attended key frame
    m = mass.fillna(0.0)
    total = m.sum("key_frame")
    dist = distance(mass)

    def on(cond):  # mass on the key frames where cond holds, NaN for rows never captured
        return m.where(cond, 0.0).sum("key_frame").where(captured)

    n = attended.sum("key_frame")
    rank = attended.cumsum("key_frame") - 1  # 0 for the oldest attended key frame of the row
    p = m / total.where(total > 0)
    plogp = (p * np.log(p.where(p > 0))).fillna(0.0)
    entropy = -plogp.sum("key_frame")
    out = xr.Dataset({
        "sink_mass": on(mass.key_frame == 0),
        "sink_chunk_mass": on(mass["key_chunk"] == 0) if "key_chunk" in mass.coords else np.nan,
        "own_chunk_mass": on(mass["key_chunk"] == mass["query_chunk"]) if "query_chunk" in mass.coords else np.nan,
        "local_mass": on(abs(dist) < local_window).where((attended & (abs(dist) >= local_window)).any("key_frame")),
        "early_mass": (m * (early_fraction * n - rank).clip(0, 1).where(attended, 0.0)).sum("key_frame")
        .where(captured),  # (the boundary frame by its share: uniform rows give early_fraction exactly)
        "mean_distance": ((m * dist).sum("key_frame") / total.where(total > 0)).where(captured),
        "mean_abs_distance": ((m * abs(dist)).sum("key_frame") / total.where(total > 0)).where(captured),
        "entropy": entropy.where(captured),
        "entropy_norm": (entropy / np.log(n.where(n > 1))).where(captured),
        "n_attended": n.where(captured),
        "uniform_mass": (1.0 / n.where(n > 0)).where(captured),
    })
    for name, (long_name, units) in ROW_METRIC_INFO.items():  # (its own attrs: not attn_mass's, which `on` kept)
        out[name].attrs = dict(long_name=long_name, units=units,
                               description=f"{long_name}, of each row of attn_mass (one query frame's attention "
                                           "over key frames; studies/metrics.py row_metrics)")
    out["local_mass"].attrs["long_name"] = (f"mass on keys less than {local_window} frames from the query "
                                            f"(|query - key| < {local_window})")
    out.attrs.update(local_window=local_window, early_fraction=early_fraction)
    return out


ROW_METRIC_INFO = {
    "sink_mass": ("mass on key frame 0", "probability"),
    "sink_chunk_mass": ("mass on the first chunk", "probability"),
    "own_chunk_mass": ("mass on the query's own chunk", "probability"),
    "local_mass": ("mass within the local window", "probability"),
    "early_mass": ("mass on the oldest half of the attended frames", "probability"),
    "mean_distance": ("mass-weighted mean query_frame - key_frame", "frames"),
    "mean_abs_distance": ("mass-weighted mean |query_frame - key_frame|", "frames"),
    "entropy": ("entropy over key frames", "nats"),
    "entropy_norm": ("entropy / ln(attended key frames): 0 one key frame, 1 uniform", "ratio"),
    "n_attended": ("attended key frames", "frames"),
    "uniform_mass": ("1 / attended key frames: uniform attention's mass on each", "probability"),
}


def head_metrics(
    ds: xr.Dataset,
    *,
    query_frames: str | Sequence[int] = "last_chunk",
    sample: str | None = None,
    average_samples: bool = True,
    local_window: int | None = None,
    early_fraction: float = 0.5,
) -> xr.Dataset:
    """Row metrics averaged over the chosen query frames (see `query_frames_for`) and over samples (every
    sample, or only the named `sample`): dims (step, layer, head). `average_samples=False` keeps the `sample`
    dim instead (ignored when a `sample` is named)."""
    ds = attention_store(ds, extra_dims=True)
    frames = query_frames_for(ds, query_frames)
    ds = select(ds, sample=sample).sel(query_frame=frames)
    rows = row_metrics(ds, local_window=local_window, early_fraction=early_fraction)
    dims = ["query_frame"] + (["sample"] if average_samples or sample is not None else [])
    out = rows.mean(dims, skipna=True, keep_attrs=True)
    what = dict(query_frames=frames, samples=[str(s) for s in ds.sample.values])
    out.attrs.update(what)
    for var in out.data_vars:  # (also on each metric, so that one taken out still says what it averages)
        out[var].attrs.update(what)
    return out


def recency_profile(ds: xr.Dataset | xr.DataArray, *, query_frames: str | Sequence[int] = "all",
                    exclude_key_frames: Sequence[int] = ()) -> xr.DataArray:
    """Mean attention mass at each frame distance d = query_frame - key_frame: for each (sample, step, layer,
    head), the mean of attn_mass[qf, qf - d] over the query frames where that key frame was attended.
    NaN where no query frame has distance d available. New dim `distance` (int, frames), with the bool coordinate
    `sink_only` when the samples kept sink frames in a rolling window that evicted frames: True at the distances
    where every attended key frame is a sink frame (key_frame < sink_size; the frames between them and the window
    were evicted), so that a far point there is the sink, not recall of the frames that far back. Otherwise, in a
    store of several chunks, the bool coordinate `first_chunk_only`: True at the distances reached only from the
    last frames to the first chunk's (frame 0 as a sink lifts the tail there).
    `exclude_key_frames`: key frames left out, as if not attended (e.g. (0,): the decay with distance without the
    sink frame, which at distance d is one of the 21 - d pairs averaged yet lifts their mean where a head sinks)."""
    ds = attention_store(ds, extra_dims=True)
    ds = ds.sel(query_frame=query_frames_for(ds, query_frames))
    whole = _mass(ds)  # (what was attended and evicted: the markings below read the store, not the exclusion)
    mass = whole.where(~whole.key_frame.isin(list(exclude_key_frames))) if len(exclude_key_frames) else whole
    dist = distance(mass)
    values = np.unique(dist.values)
    onehot = (dist == xr.DataArray(values, dims="distance", coords={"distance": values})).astype(np.float64)
    valid = mass.notnull().astype(np.float64)
    pair_dims = ["query_frame", "key_frame"]
    total = xr.dot(mass.fillna(0.0), onehot, dim=pair_dims)
    count = xr.dot(valid, onehot, dim=pair_dims)
    out = (total / count.where(count > 0)).drop_vars([c for c in ("chunk", "key_chunk") if c in total.coords], errors="ignore")
    sink_only = _sink_only(whole, dist, values)
    if sink_only is not None:
        out = out.assign_coords(sink_only=("distance", sink_only))
        out["sink_only"].attrs.update(long_name="every key frame attended at this distance is a sink frame")
    elif (first := _first_chunk_only(whole, dist, values)) is not None:
        out = out.assign_coords(first_chunk_only=("distance", first))
        out["first_chunk_only"].attrs.update(long_name="every key frame attended at this distance is in the first "
                                                       "chunk")
    out.name = "recency_profile"
    out.attrs.update(long_name="mean attention mass at distance query_frame - key_frame", units="probability")
    out["distance"].attrs.update(long_name="query_frame - key_frame", units="frames")
    return out


def _sink_only(mass: xr.DataArray, dist: xr.DataArray, values: np.ndarray) -> list[bool] | None:
    """Per distance in `values`: whether every attended (query frame, key frame) pair at that distance has a sink
    frame as its key; None unless some sample kept sink frames in a rolling window that evicted frames
    (sink_size > 0, local_attn_size > 0 and some key frame at or before its query frame not attended: without a
    window, or in one that held every frame, the first frames are attended like any other)."""
    if not {"sink_size", "local_attn_size"} <= set(mass.coords) or "sample" not in mass.dims:
        return None
    other = [d for d in mass.dims if d not in ("sample", "query_frame", "key_frame")]
    attended = mass.notnull().any(other)  # [sample, query_frame, key_frame]
    evicted = ((mass.key_frame <= mass.query_frame) & ~attended).any(["query_frame", "key_frame"])  # [sample]
    windowed = (mass["sink_size"] > 0) & (mass["local_attn_size"] > 0) & evicted  # [sample]
    if not bool(windowed.any()):
        return None
    sink = (mass.key_frame < mass["sink_size"]) & windowed  # [sample, key_frame]
    at = [dist == d for d in values]
    return [bool((attended & a).any()) and not bool((attended & ~sink & a).any()) for a in at]


def _first_chunk_only(mass: xr.DataArray, dist: xr.DataArray, values: np.ndarray) -> list[bool] | None:
    """Per distance in `values`: whether every attended pair at that distance (> 0) has a key frame of the first
    chunk (key_chunk 0); None for a store of one chunk or without key_chunk labels. The largest distances of a
    video are reached only from its last frames to its first: there the line is the first chunk's mass (frame 0
    often draws attention as a sink), not recency."""
    if "key_chunk" not in mass.coords or int(mass["key_chunk"].max()) < 1:
        return None
    other = [d for d in mass.dims if d not in ("query_frame", "key_frame")]
    attended = mass.notnull().any(other)  # [query_frame, key_frame]
    first = mass["key_chunk"] == 0  # [key_frame]
    return [bool(d > 0) and bool((attended & (dist == d)).any()) and not bool((attended & ~first & (dist == d)).any())
            for d in values]


# -------------------------------------------------------------------------------------------------- taxonomy
@dataclass(frozen=True)
class TaxonomyThresholds:
    """Thresholds of `classify_heads` (all on head metrics in [0, 1]); the first rule that holds wins."""

    sink_min: float = 0.5  # sink: sink_mass (frame 0) at least this
    local_min: float = 0.5  # local: local_mass (|distance| < local_window) at least this
    global_min_entropy: float = 0.85  # global: entropy_norm at least this
    deep_min: float = 0.6  # deep_sink: early_mass (oldest half of the attended frames) at least this

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.5:  # > 1 switches a rule off
                raise WorkbenchError(f"threshold {name}={value} must be in [0, 1] (or just above 1 to switch it off)")


SINK_MARGIN = 2e-3  # how far above uniform attention's share a sink's mass on frame 0 must be (rounding aside)


def _above_uniform(hm: xr.Dataset):
    """Where sink_mass is above uniform attention's share: mean(sink_mass - 1 / n_attended) > SINK_MARGIN over the
    rows the metrics average (a uniform head's difference is 0 up to the capture's rounding, 1e-4 to 1e-3 in
    indicator and fused modes: docs/store.md). Head metrics of older code hold n_attended only (the product of the
    two means, nearly the same), hand-made ones may hold neither."""
    if "uniform_mass" in hm:
        return hm.sink_mass - hm.uniform_mass > SINK_MARGIN
    return hm.sink_mass * hm.n_attended > 1 if "n_attended" in hm else True


def classify_heads(hm: xr.Dataset, thresholds: TaxonomyThresholds | None = None) -> xr.DataArray:
    """One class per head (and step, sample if present): sink, local, global, deep_sink or mixed, by the rules
    of the module docstring applied to `head_metrics` output; no_values for a head none of whose rows holds a
    number."""
    th = thresholds or TaxonomyThresholds()
    needed = ["sink_mass", "local_mass", "entropy_norm", "early_mass"]
    missing = [v for v in needed if v not in hm]
    if missing:
        raise WorkbenchError(f"classify_heads needs head_metrics output; missing {missing}")
    rules = [
        ("sink", (hm.sink_mass >= th.sink_min) & _above_uniform(hm)),
        ("local", hm.local_mass >= th.local_min),
        ("deep_sink", hm.early_mass >= th.deep_min),  # (before global: module docstring)
        ("global", hm.entropy_norm >= th.global_min_entropy),
    ]
    label = xr.full_like(hm.sink_mass, "mixed", dtype=object)
    for name, cond in reversed(rules):  # the first rule wins, so apply it last
        label = xr.where(cond, name, label)
    # (NaN fails every rule: such a head would read as mixed, a result it is not)
    label = xr.where(hm.sink_mass.isnull() & hm.early_mass.isnull(), "no_values", label)  # (NaN only uncaptured)
    label = label.astype(object)
    label.name = "head_class"
    label.attrs.update(long_name="head class", description=classify_heads.__doc__.split("\n")[0], **asdict(th))
    return label


# ------------------------------------------------------------------------------------------ researchers' stats
def frame_profile(
    ds: xr.Dataset,
    *,
    var: str = "attn_mass",
    query_frames: str | Sequence[int] = "last_chunk",
) -> xr.DataArray:
    """`var` averaged over the chosen query rows, per key frame (NaN skipped): with the last chunk this is the
    researchers' `last_block_frame_attention` [head, key_frame] (their `var` was the mean logit)."""
    ds = attention_store(ds, extra_dims=True)
    require_frame_pair(ds, var, "frame_profile")
    return ds[var].sel(query_frame=query_frames_for(ds, query_frames)).astype(np.float64).mean("query_frame", skipna=True)


def sink_delta(v: xr.DataArray | np.ndarray, dim: str = "key_frame"):
    """The researchers' sink statistic `v[0] - mean(v[1:-1])` along `dim` (NaN entries skipped in the mean). NaN
    where v has fewer than 3 values (a video of 1 or 2 key frames): mean(v[1:-1]) is then the mean of nothing."""
    if isinstance(v, xr.DataArray):
        n = v.sizes[dim]
        if n < 3:
            out = v.isel({dim: 0}).astype(np.float64) * np.nan
        else:
            out = v.isel({dim: 0}) - v.isel({dim: slice(1, n - 1)}).mean(dim, skipna=True)
        return out.drop_vars([c for c in out.coords if c not in out.dims], errors="ignore")
    v = np.asarray(v, dtype=np.float64)
    if v.shape[-1] < 3:
        return v[..., 0] * np.nan
    return v[..., 0] - np.nanmean(v[..., 1:-1], axis=-1)


def researcher_stats(
    ds: xr.Dataset, *, layer: int, step: int = 0, var: str = "attn_logit", sample: str | None = None
) -> xr.Dataset:
    """The statistics the researchers' extraction scripts print, for one layer and step, per head (mean over samples unless one
    is named): `diag_mean` (mean of the query_frame == key_frame entries), `col0_mean` (mean of key frame 0 over
    the query frames that attended it: the fork's "non-zero column-0 mean"), and of the last chunk's profile v:
    `first` = v[0], `mid` = mean(v[1:-1]), `last` = v[-1], `sink` = first - mid."""
    ds = attention_store(ds, extra_dims=True)
    require_var(ds, var)
    sub = select(ds, sample=sample, layer=one(layer, "layer"), step=one(step, "step"))
    full = sub[var].astype(np.float64).mean("sample", skipna=True).isel(layer=0, step=0)  # [head, query_frame, key_frame]
    diag = full.where(full.query_frame == full.key_frame).mean(["query_frame", "key_frame"], skipna=True)
    col0 = full.isel(key_frame=0).mean("query_frame", skipna=True)
    v = frame_profile(sub, var=var).mean("sample", skipna=True).isel(layer=0, step=0)  # [head, key_frame]
    n = v.sizes["key_frame"]
    first = v.isel(key_frame=0, drop=True)
    out = xr.Dataset({
        "diag_mean": diag,
        "col0_mean": col0,
        "first": first,
        "mid": v.isel(key_frame=slice(1, n - 1)).mean("key_frame", skipna=True) if n >= 3 else first * np.nan,
        "last": v.isel(key_frame=n - 1, drop=True),
        "sink": sink_delta(v),
    })
    out = out.drop_vars([c for c in out.coords if c not in out.dims])
    out.attrs.update(layer=layer, step=step, var=var, min=float(full.min()), max=float(full.max()))
    return out


# -------------------------------------------------------------------------------------------------- invariants
def row_sum_error(ds: xr.Dataset) -> float:
    """max |sum over key frames of attn_mass - 1| over the captured rows (docs/store.md: 1 for every row); NaN
    when no row holds a number (attention that was not finite: no row sums to 1)."""
    mass = _mass(ds)
    captured = mass.notnull().any("key_frame")
    err = abs(mass.sum("key_frame", skipna=True) - 1.0).where(captured)
    return float(err.max(skipna=True)) if bool(captured.any()) else float("nan")


def expected_attended(ds: xr.Dataset) -> xr.DataArray:
    """[sample, query_frame, key_frame] bool: the key frames each query frame's call should have attended.

    Bidirectional sampler: every frame. Causal samplers: key_chunk <= chunk (the block-causal staircase); with a
    window (local_attn_size L != -1) and sink_size S, only frames [0, S) and the L - S most recent frames up to
    the end of the query's chunk (the cache of Self Forcing's `_forward_inference`, sinks kept at the front)."""
    qf, kf = ds.query_frame, ds.key_frame
    chunk_end = xr.DataArray(
        [int(qf.where(ds["query_chunk"] == c).max()) for c in ds["query_chunk"].values], dims="query_frame", coords={"query_frame": qf}
    )
    causal = (ds["key_chunk"] <= ds["query_chunk"])
    per_sample = []
    for s in ds.sample.values:
        sampler = str(ds.sampler.sel(sample=s).values) if "sampler" in ds.coords else "causal_few_step"
        if sampler == "bidirectional":
            mask = xr.ones_like(causal, dtype=bool)
        else:
            mask = causal
            window = int(ds.local_attn_size.sel(sample=s)) if "local_attn_size" in ds.coords else -1
            if window != -1:
                sink = int(ds.sink_size.sel(sample=s)) if "sink_size" in ds.coords else 0
                mask = mask & ((kf < sink) | (kf > chunk_end - (window - sink)))
        per_sample.append(mask.transpose("query_frame", "key_frame"))
    out = xr.concat(per_sample, dim=ds.sample)
    return out.drop_vars([c for c in out.coords if c not in out.dims])


def nan_pattern_mismatches(ds: xr.Dataset) -> int:
    """How many attn_mass entries are NaN where `expected_attended` says attended, or the other way round; in an
    image-to-video store the image's chunk (0) has its context pass only, so its rows of the other steps are NaN."""
    from workbench.store import image_of

    attended = ds["attn_mass"].notnull()
    expected = expected_attended(ds)
    if image_of(ds.attrs) is not None:
        expected = expected & ~((ds["phase"] != "context") & (ds["query_chunk"] == 0))
    return int((attended != expected).sum())


def logit_nan_matches_mass(ds: xr.Dataset) -> bool:
    """docs/store.md: attn_logit is NaN exactly where attn_mass is NaN."""
    if "attn_logit" not in ds:
        return True
    return bool((ds["attn_logit"].isnull() == ds["attn_mass"].isnull()).all())


def _short(values, n: int = 12) -> str:
    values = list(values)
    text = ", ".join(str(v) for v in values[:n])
    return f"[{text}{', ...' if len(values) > n else ''}]" + (f" ({len(values)} in all)" if len(values) > n else "")
