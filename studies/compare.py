"""Compare two stores (e.g. Wan's bidirectional sampler vs a Self-Forcing rollout): what changed, head by head.

Two stores rarely share step indices (Wan runs 50 steps with CFG, the few-step rollout 4 + a context pass), so
they are aligned on what the model saw:

    samples   pairs with the same (prompt text, seed); stores made with different seeds pair every sample of A
              with every sample of B of the same prompt (`pair_by="prompt"`, chosen by "auto" when no
              (prompt, seed) is shared); stores that share no prompt are refused
    steps     pairs of a step of A and a step of B with the nearest timesteps (same phase: denoise with
              denoise, context with context), |t_A - t_B| <= tolerance (default 20 timestep units, in
              [0, 1000]); one to one: the closest pairs are taken first and a step is in one pair at most, so
              a store with many steps near one timestep weighs it once, not once per step.
              A store with CFG contributes only the `cfg` branch chosen (default `cond`, the one that sees
              the prompt). `Comparison.steps` lists every match; unmatched steps are listed too.
    layers, heads, query frames   those both stores hold (query frames: the chosen selection of each,
              intersected; default the last chunk); key frames: the union, a frame missing from one store
              counting as not attended

Per matched step and head it reports each store's head metrics (`studies.metrics.head_metrics`), their
difference B - A (chunk-based metrics only when both stores have several chunks: the
bidirectional sampler has one chunk, where they are 1 by definition), and the Jensen-Shannon divergence between the two key-frame distributions of each query
row, **in bits** (log base 2, so 0 <= JS <= 1), averaged over sample pairs and query frames. `rank_heads`
orders heads by that divergence.

    from studies import load_store, compare
    c = compare.compare_stores(load_store("runs/wan.zarr"), load_store("runs/embedded.zarr"))
    c.steps                      # which steps matched
    compare.rank_heads(c).head() # the heads that changed most
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import xarray as xr

from studies import metrics
from workbench.errors import WorkbenchError
from workbench.statistics import DEFAULT_STATS

METRICS_COMPARED = ("sink_mass", "sink_chunk_mass", "own_chunk_mass", "local_mass", "early_mass", "mean_abs_distance",
                    "mean_distance",
                    "entropy_norm")
CHUNK_METRICS = ("sink_chunk_mass", "own_chunk_mass")  # compared only when both stores have several chunks


@dataclass
class Comparison:
    """The result of `compare_stores`. Everything indexed by `match` has coords step_a, step_b, timestep_a,
    timestep_b (one entry per matched step)."""

    name_a: str
    name_b: str
    pairs: pd.DataFrame  # prompt, seed_a, seed_b, sample_a, sample_b (see `match_samples`)
    steps: pd.DataFrame  # match, step_a, timestep_a, phase, cfg_a, step_b, timestep_b, cfg_b, abs_dt
    unmatched_a: pd.DataFrame  # steps of A (after the CFG filter) with no B step within tolerance
    unmatched_b: pd.DataFrame  # steps of B nobody matched
    metrics_a: xr.Dataset  # (match, layer, head)
    metrics_b: xr.Dataset
    diff: xr.Dataset  # metrics_b - metrics_a
    js_bits: xr.DataArray  # (match, layer, head)
    class_a: xr.DataArray  # (match, layer, head)
    class_b: xr.DataArray
    query_frames: list[int] = field(default_factory=list)
    tolerance: float = 20.0
    pair_by: str = "seed"  # how the samples were paired: "seed" (prompt and seed) or "prompt"
    thresholds: metrics.TaxonomyThresholds | None = None  # what class_a / class_b were classified with
    notes: list[str] = field(default_factory=list)  # what a reader should know: lengths that differ, layers left out


# --------------------------------------------------------------------------------------------------- samples
PAIR_BY = ("auto", "seed", "prompt")


def _samples_of(ds: xr.Dataset) -> list[tuple[str, int, str]]:
    return [(str(p), int(s), str(i)) for i, p, s in zip(ds.sample.values, ds["prompt"].values, ds["seed"].values)]


def _describe(samples) -> str:
    items = [f"({p[:40]!r}, seed {s})" for p, s, _ in samples[:6]]
    return ", ".join(items) + (f", ... ({len(samples)} in all)" if len(samples) > 6 else "")


def match_samples(a: xr.Dataset, b: xr.Dataset, pair_by: str = "auto") -> pd.DataFrame:
    """Sample pairs (prompt, seed_a, seed_b, sample_a, sample_b). `seed`: the samples with the same prompt and
    seed; `prompt`: every sample of A with every sample of B of the same prompt (stores made with different
    seeds; the divergence then includes the spread between seeds, which comparing a store with itself this
    way measures); `auto`: by seed when the stores share any (prompt, seed), else by prompt. The pairing used
    is `pairs.attrs["pair_by"]`; the samples in no pair (not compared) `pairs.attrs["unpaired_a"]` and
    `["unpaired_b"]`. WorkbenchError naming what each store has if nothing pairs."""
    if pair_by not in PAIR_BY:
        raise WorkbenchError(f"pair_by {pair_by!r}; use one of {list(PAIR_BY)}")
    sa, sb = _samples_of(a), _samples_of(b)
    by_seed = [(p, s, s, ia, ib) for p, s, ia in sa for q, t, ib in sb if (p, s) == (q, t)]
    if pair_by == "seed" or (pair_by == "auto" and by_seed):
        if not by_seed:
            raise WorkbenchError(f"the stores share no (prompt, seed): A has {_describe(sa)}; B has {_describe(sb)}. "
                                 "Extract both with the same prompts and seeds, or pair them by prompt alone "
                                 "(--pair-by prompt)")
        rows, used = by_seed, "seed"
    else:
        rows = [(p, s, t, ia, ib) for p, s, ia in sa for q, t, ib in sb if p == q]
        if not rows:
            raise WorkbenchError(f"the stores share no prompt: A has {_describe(sa)}; B has {_describe(sb)}. "
                                 "Extract both with the same prompts.")
        used = "prompt"
    pairs = pd.DataFrame(rows, columns=["prompt", "seed_a", "seed_b", "sample_a", "sample_b"])
    pairs.attrs["pair_by"] = used
    for side, samples, column in (("a", sa, "sample_a"), ("b", sb, "sample_b")):
        paired = set(pairs[column])
        pairs.attrs[f"unpaired_{side}"] = [sample for _, _, sample in samples if sample not in paired]
    return pairs


# ----------------------------------------------------------------------------------------------------- steps
def _step_table(ds: xr.Dataset, cfg: str) -> pd.DataFrame:
    n = ds.sizes["step"]
    table = pd.DataFrame({
        "step": [int(s) for s in ds.step.values],
        "timestep": [float(t) for t in ds["timestep"].values],
        "phase": [str(p) for p in ds["phase"].values] if "phase" in ds.coords else ["denoise"] * n,
        "cfg": [str(c) for c in ds["cfg"].values] if "cfg" in ds.coords else ["none"] * n,
    })
    return table[table.cfg.isin(["none", cfg])].reset_index(drop=True)


def match_steps(
    a: xr.Dataset, b: xr.Dataset, *, tolerance: float = 20.0, cfg: str = "cond", same_phase: bool = True
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(matched, unmatched_a, unmatched_b): one-to-one pairs of steps of A and B with the nearest timesteps (see
    the module docstring), in the order of A's steps. Raises WorkbenchError when nothing matches, listing both
    stores' timesteps."""
    if cfg not in ("cond", "uncond"):
        raise WorkbenchError(f"cfg {cfg!r} must be 'cond' or 'uncond' (the CFG branch to compare)")
    if not tolerance >= 0:
        raise WorkbenchError(f"tolerance {tolerance} must be a non-negative number of timestep units")
    ta, tb = _step_table(a, cfg), _step_table(b, cfg)
    # every pair within tolerance, closest first; a pair is taken when neither of its steps is taken yet, so each
    # step is in one pair at most (A's 40 steps near t = 1000 pair with B's one step there once, not 4 times)
    cands = sorted((abs(sb.timestep - sa.timestep), i, j) for i, sa in ta.iterrows() for j, sb in tb.iterrows()
                   if (sa.phase == sb.phase or not same_phase) and abs(sb.timestep - sa.timestep) <= tolerance)
    used_a, used_b, rows = set(), set(), []
    for dt, i, j in cands:
        if i in used_a or j in used_b:
            continue
        used_a.add(i)
        used_b.add(j)
        sa, sb = ta.loc[i], tb.loc[j]
        rows.append({"step_a": int(sa.step), "timestep_a": sa.timestep, "phase": sa.phase, "cfg_a": sa.cfg,
                     "step_b": int(sb.step), "timestep_b": sb.timestep, "cfg_b": sb.cfg, "abs_dt": float(dt)})
    rows.sort(key=lambda r: r["step_a"])
    unmatched = [ta.loc[i] for i in ta.index if i not in used_a]
    matched = pd.DataFrame(rows, columns=["step_a", "timestep_a", "phase", "cfg_a", "step_b", "timestep_b", "cfg_b",
                                          "abs_dt"])
    if matched.empty:
        show = lambda t: ", ".join(f"{r.step}:t={r.timestep:g}/{r.phase}" for r in t.itertuples())  # noqa: E731
        raise WorkbenchError(
            f"no step of A is within tolerance {tolerance:g} of a step of B (same phase, cfg {cfg!r}): "
            f"A has {show(ta)}; B has {show(tb)}. Raise --tolerance or check the samplers."
        )
    matched.index.name = "match"
    unmatched_a = pd.DataFrame(unmatched, columns=ta.columns).reset_index(drop=True)
    unmatched_b = tb[~tb.step.isin(matched.step_b)].reset_index(drop=True)
    return matched, unmatched_a, unmatched_b


# ------------------------------------------------------------------------------------------------ divergence
def js_divergence(p: xr.DataArray, q: xr.DataArray, dim: str = "key_frame") -> xr.DataArray:
    """Jensen-Shannon divergence in bits between two distributions along `dim` (NaN = 0 mass; each side is
    normalised to sum 1 first). 0 for identical rows, 1 for rows with disjoint supports; NaN if a row is empty."""
    p, q = p.fillna(0.0).astype(np.float64), q.fillna(0.0).astype(np.float64)
    sp, sq = p.sum(dim), q.sum(dim)
    p, q = p / sp.where(sp > 0), q / sq.where(sq > 0)
    m = 0.5 * (p + q)

    def kl(x):
        return (x * np.log2(x.where(x > 0) / m.where(m > 0))).fillna(0.0).sum(dim)

    js = 0.5 * kl(p) + 0.5 * kl(q)
    return js.where((sp > 0) & (sq > 0))


# --------------------------------------------------------------------------------------------------- compare
def compare_stores(
    a: xr.Dataset,
    b: xr.Dataset,
    *,
    tolerance: float = 20.0,
    cfg: str = "cond",
    query_frames: str | Sequence[int] = "last_chunk",
    layers: Sequence[int] | None = None,
    thresholds: metrics.TaxonomyThresholds | None = None,
    name_a: str = "A",
    name_b: str = "B",
    pair_by: str = "auto",
) -> Comparison:
    """Align `a` and `b` (module docstring) and compare their attention head by head."""
    a, b = metrics.attention_store(a), metrics.attention_store(b)
    for name, ds in ((name_a, a), (name_b, b)):  # (the comparison is of attn_mass, head by head)
        if isinstance(ds, xr.Dataset) and "attn_mass" not in ds:
            raise WorkbenchError(f"store {name} has no attn_mass (its statistics: {sorted(ds.data_vars)}): the "
                                 "comparison reads it; extract both stores with attn_mass among --stats")
    pairs = match_samples(a, b, pair_by)
    steps, unmatched_a, unmatched_b = match_steps(a, b, tolerance=tolerance, cfg=cfg)

    la, lb = [int(x) for x in a.layer.values], [int(x) for x in b.layer.values]
    shared_layers = [x for x in la if x in lb]
    if layers is not None:
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise WorkbenchError(f"layers {layers!r}: give a list of ints, e.g. [2, 3]")
        bad = [x for x in layers if x not in shared_layers]
        if bad:
            raise WorkbenchError(f"layer {bad[0]} is not in both stores; A has layers {la}, B has {lb}")
        shared_layers = list(dict.fromkeys(int(x) for x in layers))  # (a layer named twice is compared once)
    if not shared_layers:
        raise WorkbenchError(f"the stores share no layer: A has layers {la}, B has {lb}")
    ha, hb = [int(x) for x in a["head"].values], [int(x) for x in b["head"].values]
    heads = [x for x in ha if x in hb]
    if not heads:
        raise WorkbenchError(f"the stores share no head: A has heads {ha}, B has {hb}")
    qa, qb = metrics.query_frames_for(a, query_frames), metrics.query_frames_for(b, query_frames)
    frames = [f for f in qa if f in qb]
    if not frames:
        raise WorkbenchError(f"no query frame is selected in both stores ({query_frames!r}): A {qa}, B {qb}; choose "
                             "frames both hold: --query-frames all (query_frames='all') compares every frame they "
                             "share")
    key_frames = sorted({int(k) for k in a.key_frame.values} | {int(k) for k in b.key_frame.values})
    notes = _notes(a, b, la, lb, ha, hb, shared_layers if layers is None else None, heads, pairs.attrs["pair_by"])

    match_coords = {
        "step_a": ("match", steps.step_a.to_numpy()), "step_b": ("match", steps.step_b.to_numpy()),
        "timestep_a": ("match", steps.timestep_a.to_numpy()), "timestep_b": ("match", steps.timestep_b.to_numpy()),
    }

    def prepare(ds, samples, step_list):
        sub = ds.sel(layer=shared_layers, head=heads, query_frame=frames)
        sub = sub.reindex(key_frame=key_frames)  # a frame one store lacks: NaN, i.e. not attended
        if "key_chunk" in sub.coords and bool(sub["key_chunk"].isnull().any()):
            sub = sub.assign_coords(key_chunk=sub["key_chunk"].fillna(-1).astype(int))
        mass = sub["attn_mass"].sel(sample=samples, step=step_list).astype(np.float64).load()
        mass = mass.assign_coords(sample=np.arange(len(samples)), step=np.arange(len(step_list)))
        mass = mass.rename(sample="pair", step="match")
        keep = {"query_chunk", "key_chunk", "query_frame", "key_frame", "layer", "head"}
        mass = mass.drop_vars([c for c in mass.coords if c not in keep])
        mass.attrs = dict(sub.attrs)
        return mass

    mass_a = prepare(a, list(pairs.sample_a), list(steps.step_a))
    mass_b = prepare(b, list(pairs.sample_b), list(steps.step_b))
    notes = _unseen_notes(mass_a, mass_b, query_frames) + notes
    window_a = metrics.default_local_window(a if a.attrs.get("num_frame_per_block") else b)

    def summarise(mass):
        rows = metrics.row_metrics(mass, local_window=window_a)  # one window for both: the same yardstick
        out = rows.mean(["pair", "query_frame"], skipna=True, keep_attrs=True)
        return out.assign_coords(match_coords)

    metrics_a, metrics_b = summarise(mass_a), summarise(mass_b)
    chunked = metrics.num_chunks(a) > 1 and metrics.num_chunks(b) > 1
    compared = [m for m in METRICS_COMPARED if chunked or m not in CHUNK_METRICS]
    diff = (metrics_b - metrics_a)[compared]
    js = js_divergence(mass_a, mass_b).mean(["pair", "query_frame"], skipna=True).assign_coords(match_coords)
    js.name = "js_bits"
    js.attrs.update(long_name="Jensen-Shannon divergence of key-frame distributions", units="bits")
    return Comparison(
        name_a=name_a, name_b=name_b, pairs=pairs, steps=steps, unmatched_a=unmatched_a, unmatched_b=unmatched_b,
        metrics_a=metrics_a, metrics_b=metrics_b, diff=diff, js_bits=js,
        class_a=metrics.classify_heads(metrics_a, thresholds), class_b=metrics.classify_heads(metrics_b, thresholds),
        query_frames=frames, tolerance=tolerance,
        pair_by=pairs.attrs["pair_by"], thresholds=thresholds, notes=notes,
    )


UNSEEN_NOTE = 0.02  # a side's mass on key frames the other does not attend, above which a note says so


def _unseen_notes(mass_a: xr.DataArray, mass_b: xr.DataArray, query_frames) -> list[str]:
    """A note for each side that puts a share of its mass on key frames the other side's same row does not attend
    (a bidirectional model's frames after a causal one's chunk; frames outside a window): the divergences then
    measure that as much as a change of attention."""
    notes = []
    for side, m, other, name in (("A", mass_a, mass_b, "B"), ("B", mass_b, mass_a, "A")):
        rows = m.notnull().any("key_frame") & other.notnull().any("key_frame")  # (rows both captured)
        share = float(m.where(other.isnull()).sum("key_frame").where(rows).mean())
        if share > UNSEEN_NOTE:
            notes.append(f"{side} puts {share:.0%} of its mass (mean over the compared rows) on key frames {name} "
                         f"does not attend in the same rows (frames after the query's chunk of a causal model, or "
                         f"outside a window): the divergences include that"
                         + ("; --query-frames last_chunk compares the rows where both see the same frames"
                            if query_frames != "last_chunk" else ""))
    return notes


def averaged_matches(c: Comparison) -> list[int]:
    """The matched step pairs that means over steps take: the denoising steps' (a context pass, the clean frames
    written into the cache at t = 0, is another kind of forward, as docs/store.md says), or every match when none
    is a denoising step."""
    denoise = [m for m, phase in enumerate(c.steps["phase"]) if phase == "denoise"]
    return denoise or list(range(len(c.steps)))


def over_steps(c: Comparison, x: xr.DataArray | xr.Dataset, **kw):
    """`x` averaged over the matched steps the means take (`averaged_matches`)."""
    return x.sel(match=averaged_matches(c)).mean("match", **kw)


def over_steps_words(c: Comparison, short: bool = True) -> str:
    """'mean of 4 matched denoising steps', for titles; `short=False` adds what it leaves out ('..., not the 1
    context pass'), for the page's text."""
    n, total = len(averaged_matches(c)), len(c.steps)
    kind = "denoising " if n < total else ""
    what = f"mean of {n} matched {kind}steps" if n > 1 else f"the matched {kind}step"
    left = total - n
    return what + (f", not the {left} context pass{'es' if left > 1 else ''}" if left and not short else "")


def mean_classes(c: Comparison) -> tuple[xr.DataArray, xr.DataArray]:
    """The head classes of A and B (layer, head) from their metrics averaged over the matched denoising steps
    (`over_steps`): what the ranking (`rank_heads`), the report's maps and the console show."""
    return tuple(metrics.classify_heads(over_steps(c, hm), c.thresholds) for hm in (c.metrics_a, c.metrics_b))


def _notes(a, b, la, lb, ha, hb, shared_layers, heads, pair_by: str) -> list[str]:
    """What the comparison leaves out or cannot hold equal: rollouts of different lengths (the same seed then
    draws different noise from the first re-noising on), layers or heads only one store holds (`shared_layers`
    None: the caller chose the layers)."""
    notes = []
    fa, fb = a.sizes["query_frame"], b.sizes["query_frame"]
    if fa != fb:
        notes.append(f"the rollouts have different lengths (A {fa} latent frames, B {fb})"
                     + (": the same seed draws the same noise for the first frames only, and different noise from "
                        "the first re-noising on, so the divergences include that" if pair_by == "seed" else ""))
    ga, gb = latent_grid(a), latent_grid(b)
    if ga and gb and ga != gb:
        notes.append(f"the rollouts have different latent frame sizes (A {ga[0]} x {ga[1]}, B {gb[0]} x "
                     f"{gb[1]}: different --height/--width)"
                     + (": the same seed draws different noise at another size, so the divergences include that"
                        if pair_by == "seed" else ""))
    for what, xa, xb, shared in (("layer", la, lb, shared_layers), ("head", ha, hb, heads)):
        if shared is not None and (set(xa) - set(shared) or set(xb) - set(shared)):
            notes.append(f"{what}s compared: {shared}, the ones both stores hold (A has {xa}, B has {xb})")
    return notes + _other_stats_note(a, b)


def latent_grid(ds: xr.Dataset) -> tuple[int, int] | None:
    """(height, width) of a latent frame (pixels / 8), from the store's fingerprint (None if unrecorded)."""
    geometry = ((ds.attrs.get("fingerprint_fields") or {}).get("layout") or {}).get("geometry")
    return None if not geometry or len(geometry) < 3 else (int(geometry[1]), int(geometry[2]))


def _other_stats_note(a: xr.Dataset, b: xr.Dataset) -> list[str]:
    """A note naming the statistics a run chose besides the default ones (a plugin's, or a built-in such as
    attn_frame_entropy), which the comparison does not read, and which side holds each."""
    held = [[s for s in ds.attrs.get("stats", list(ds.data_vars)) if s not in DEFAULT_STATS and s in ds.data_vars]
            for ds in (a, b)]
    names = list(dict.fromkeys(held[0] + held[1]))
    if not names:
        return []
    listed = ", ".join(f"{s} ({'both' if s in held[0] and s in held[1] else 'A only' if s in held[0] else 'B only'})"
                       for s in names)
    return [f"not compared: {listed}; the comparison reads attn_mass only (open a store with studies.load_store to "
            f"read the others)"]


def unpaired(c: Comparison) -> str:
    """'24 sample(s) of B with no partner in A (p0000-s1, ...)' (both sides, when both have some), or '' when every
    sample is in a pair."""
    return "; ".join(f"{len(ids)} sample(s) of {side.upper()} with no partner in {other} ({_ids(ids)})"
                     for side, other in (("a", "B"), ("b", "A")) if (ids := c.pairs.attrs.get(f"unpaired_{side}")))


def _ids(ids: list[str], n: int = 4) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def rank_heads(c: Comparison, *, by: str = "js_bits", match: int | None = None) -> pd.DataFrame:
    """Heads ordered by change, largest first, indexed by `rank` from 1: one row per (layer, head) with the JS
    divergence (bits) and the metric differences B - A, averaged over the matched denoising steps (`over_steps`; or
    at one `match`), and each side's class: that of its metrics averaged over the same steps, as the other columns
    are (or at `match`).
    `by` is 'js_bits' or a metric name (ranked by its absolute difference)."""
    if by != "js_bits" and by not in c.diff:
        raise WorkbenchError(f"cannot rank by {by!r}; choose 'js_bits' or one of {list(c.diff.data_vars)}")
    have = [int(m) for m in c.js_bits["match"].values]
    if match is not None and (isinstance(match, bool) or match not in have):
        raise WorkbenchError(f"match {match!r} is not a matched step pair; the comparison has matches {have} "
                             "(c.steps lists them)")
    pick = (lambda x: over_steps(c, x)) if match is None else (lambda x: x.sel(match=match))
    table = pick(c.js_bits).to_dataframe(name="js_bits")[["js_bits"]]
    for name in c.diff.data_vars:
        table[f"d_{name}"] = pick(c.diff[name]).to_dataframe(name="v")["v"]
    means = mean_classes(c) if match is None else (c.class_a.sel(match=match), c.class_b.sel(match=match))
    for side, cls in zip("ab", means):
        table[f"class_{side}"] = cls.to_dataframe(name="v")["v"]
    key = table["js_bits"] if by == "js_bits" else table[f"d_{by}"].abs()
    order = key.sort_values(ascending=False, kind="stable").index
    table = table.loc[order].reset_index()
    table.index = pd.RangeIndex(1, len(table) + 1, name="rank")  # (1 = the head that changed most, as the report)
    return table
