"""The report of an effects store (`workbench intervene`; variables defined in docs/store.md, "Effects stores"):
what each intervention or KV-cache policy changed in the video, ranked.

    build_effects_report(store, "effects.html")  the HTML page (plotly inlined, opens offline): the ranked table,
                                                 a layer x head map of single-head effects (sweeps), per-frame
                                                 effect curves (latents; pixels and the world's trajectory error
                                                 where decoded); with --capture, how each entry moved the
                                                 captured layers' attention (JS divergence from the baseline's
                                                 rows, and the query frame x key frame change of attn_mass)
                                                 and beside it effects.png: the per-frame curves of the top entries
                                                 and, for sweeps, effects_heads.png: the layer x head map

`workbench report STORE` calls it when the store's `store_kind` attribute is "effects". The PNGs are drawn with
PIL (no plotting library needed), so they can be pasted into notes and issues as they are.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import xarray as xr

from studies import metrics, no_window_words, unfinished_note, world_metrics
from studies.figures import layer_head_map
from studies.page import TABLE_ROWS, Page, html_out, number, write_atomic

TOP = 10  # entries drawn in the curves (the baseline is the zero line)
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def subset_note(ds: xr.Dataset, labels) -> str:
    """What a chart of `labels` leaves out (the per-frame charts draw the TOP entries of the ranking only): "the 10
    largest effects of 24 entries"; nothing ("") when they are every entry of the store but the baseline."""
    entries = [str(x) for x in ds.intervention.values if str(x) != "baseline"]
    shown = [x for x in labels if x != "baseline"]
    return "" if len(shown) >= len(entries) else f"the {len(shown)} largest effects of {len(entries)} entries"


def entry_labels(ds: xr.Dataset, labels) -> list[str]:
    """`labels` (one label or a list) checked against the effects store's entries; a WorkbenchError names the
    unknown ones and lists the store's."""
    from workbench.errors import WorkbenchError

    if "intervention" not in ds.dims:
        raise WorkbenchError("not an effects store (no intervention dim): these figures read `workbench intervene`'s "
                             "stores")
    labels = [labels] if isinstance(labels, str) else list(labels)
    have = [str(x) for x in ds.intervention.values]
    unknown = [x for x in labels if x not in have]
    if unknown:
        raise WorkbenchError(f"entries {unknown} are not in the store; it has {have}")
    return labels


def drift_table(ds: xr.Dataset, segment: int = 21) -> pd.DataFrame:
    """Per entry and per segment of `segment` latent frames (the trained length): the mean relative latent distance
    to the baseline, and the latent RMS of the last segment over the first (1 = no fading or blow-up), mean over
    samples."""
    entry_labels(ds, [])
    if isinstance(segment, bool) or not isinstance(segment, int) or segment < 1:
        from workbench.errors import WorkbenchError

        raise WorkbenchError(f"segment {segment!r}: give a positive number of latent frames")
    F = ds.sizes["frame"]
    bounds = [(a, min(a + segment, F)) for a in range(0, F, segment)]
    rel, rms = ds.latent_distance_rel.mean("sample"), ds.latent_rms.mean("sample") if "latent_rms" in ds else None
    table = pd.DataFrame(index=pd.Index(ds.intervention.values, name="intervention"))
    table["cache_frames"] = ds.cache_frames.values
    for a, b in bounds:
        table[f"effect {a}-{b - 1}"] = rel.isel(frame=slice(a, b)).mean("frame").values
    if rms is not None:
        first, last = bounds[0], bounds[-1]
        table["rms last/first"] = (rms.isel(frame=slice(*last)).mean("frame")
                                   / rms.isel(frame=slice(*first)).mean("frame")).values
    return table


def markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a markdown table (index first), numbers rounded: for bench/RESULTS.md and notes."""
    cols = [table.index.name or "", *map(str, table.columns)]
    cell = lambda v: number(v, f"{{:.{digits}f}}") if isinstance(v, (float, np.floating)) else str(v)  # noqa: E731
    rows = [f"| {' | '.join(cols)} |", f"|{'---|' * len(cols)}"]
    rows += [f"| {r[0]} | {' | '.join(cell(v) for v in r[1:])} |" for r in table.itertuples()]
    return "\n".join(rows)


def is_effects_store(ds: xr.Dataset) -> bool:
    return ds.attrs.get("store_kind") == "effects"


WORLD_COLUMNS = ("trajectory_error", "adherent", "speed", "confidence")
# the page's headers of those columns, with their units (adherent: the share of samples that are)
WORLD_HEADERS = {k: f"{k} ({world_metrics.mean_unit(k, share='share of samples')})" for k in WORLD_COLUMNS}


def display_ranking(table: pd.DataFrame) -> pd.DataFrame:
    """The ranked table as the page shows it: numbers to 4 significant digits, each world column with its change
    against the baseline in brackets ("8.06 (+6.08)") instead of a d_ column of its own, so it fits a page, and the
    layer and head left blank where the entry acts on no single one (the store's -1: the baseline, a knockout, a
    policy, an ablation of several; its label says what it acts on); the world columns' headers name their units
    (WORLD_HEADERS)."""
    shown = table.copy()
    for k in ("layer", "head"):
        if k in shown:
            shown[k] = ["" if int(v) == -1 else str(int(v)) for v in table[k]]
    for k in WORLD_COLUMNS:
        if k in shown and f"d_{k}" in shown:
            shown[k] = [f"{number(v)} ({number(d, '{:+.3g}')})" if np.isfinite(v) else "NaN"
                        for v, d in zip(table[k], table[f"d_{k}"])]
            shown = shown.drop(columns=f"d_{k}")
    if "missed" in shown:  # (an empty cell read as missing data: every check passed)
        shown["missed"] = [m or "none" for m in table["missed"]]
    return shown.rename(columns=WORLD_HEADERS)  # (their units in their headers)


def not_finite_entries(ds: xr.Dataset) -> dict[str, list[str]]:
    """The entries whose rollout was not finite (an edit that made the activations overflow: latent distances NaN
    or inf, docs/store.md), each with the samples where it was not."""
    bad = ~np.isfinite(ds.latent_distance).all("frame")  # [intervention, sample]
    return {str(e): [str(s) for s in ds.sample.values[bad.sel(intervention=e).values]]
            for e in ds.intervention.values if bool(bad.sel(intervention=e).any())}


def attention_change(ds: xr.Dataset, labels: list[str]) -> pd.DataFrame:
    """With --capture: per entry (rows, `labels`) and captured layer (columns), the Jensen-Shannon divergence in bits
    between the entry's attention rows (attn_mass over key frames, per sample, step, head and query frame) and the
    baseline's, averaged over those rows (studies/compare.py `js_divergence`: 0 = unchanged, 1 = disjoint). NaN
    where the entry has no capture (a head-wise cache policy) or its rollout was not finite (the mean of its few
    finite rows, before the NaN, would read as unchanged)."""
    from studies.compare import js_divergence

    labels = entry_labels(ds, labels)
    base = ds.attn_mass.sel(intervention="baseline")
    rows = {label: js_divergence(ds.attn_mass.sel(intervention=label), base)
            .mean(["sample", "step", "head", "query_frame"]).values for label in labels}  # one entry at a time
    for label in set(labels) & set(not_finite_entries(ds)):
        rows[label] = np.full_like(rows[label], np.nan)
    return pd.DataFrame.from_dict(rows, orient="index", columns=[f"layer {int(x)}" for x in ds.layer.values])


def attention_delta(ds: xr.Dataset, label: str) -> xr.DataArray:
    """attn_mass of an entry minus the baseline's, averaged over samples, steps and heads: [layer, query_frame,
    key_frame]; a frame the entry no longer attends counts as 0 mass (so a knocked-out frame shows its lost mass),
    NaN where neither attends (future frames)."""
    (label,) = entry_labels(ds, [label])
    a, b = ds.attn_mass.sel(intervention=label), ds.attn_mass.sel(intervention="baseline")
    diff = (a.fillna(0.0) - b.fillna(0.0)).mean(["sample", "step", "head"])
    return diff.where(~(a.isnull() & b.isnull()).all(["sample", "step", "head"])).transpose("layer", "query_frame",
                                                                                        "key_frame")


NOT_ATTENDED = "#9e9e9e"  # a difference map's cells that neither the entry nor the baseline attends


def attention_delta_figure(delta: xr.DataArray, label: str, top: float, cols: int = 4) -> go.Figure:
    """One entry's query frame x key frame change of attn_mass against the baseline (`delta`, what
    `attention_delta` returns: [layer, query_frame, key_frame]), a panel per captured layer, `cols` to a row (so
    that the figure and its colour bar fit a page); the symmetric red-blue scale runs from -top to top (red: more
    mass than the baseline), query frame 0 at the bottom as in the attention reports."""
    import math

    from plotly.subplots import make_subplots

    layers = [int(x) for x in delta.layer.values]
    cols = min(cols, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.05, vertical_spacing=0.3 / rows,
                        subplot_titles=[f"layer {layer}" for layer in layers])
    for n, layer in enumerate(layers):
        i, j = n // cols + 1, n % cols + 1
        z = delta.sel(layer=layer).values
        fig.add_trace(go.Heatmap(z=z.astype(np.float32), x=delta.key_frame.values, y=delta.query_frame.values,
                                 coloraxis="coloraxis", hovertemplate="query frame %{y}<br>key frame %{x}<br>change "
                                 f"%{{z:.4g}}<extra>layer {layer}</extra>"), row=i, col=j)
        fig.update_xaxes(title_text="key frame" if n + cols >= len(layers) else None, row=i, col=j)
        fig.update_yaxes(title_text="query frame" if j == 1 else None, row=i, col=j)
    # cells neither attends (future frames) in mid grey, off the red-blue scale (plotly's pale blue background
    # read as a small decrease), with no grid lines across the map
    fig.update_xaxes(showgrid=False, zeroline=False)
    fig.update_yaxes(showgrid=False, zeroline=False)
    fig.update_layout(title=f"{html.escape(label, quote=False)}<br><sup>attn_mass minus the baseline's (grey: "
                            "attended in neither)</sup>",  # (two lines: one panel's width cut it; a label as
                      plot_bgcolor=NOT_ATTENDED,  # written: plotly reads <b>, <br>, &amp; ... in it as markup)
                      coloraxis=dict(colorscale="RdBu_r", cmin=-top, cmax=top,
                                     colorbar=dict(title="change [probability]")),
                      height=270 * rows + 130, width=230 * cols + 230, margin=dict(t=100, r=120))
    return fig


def single_head_ablations(ds: xr.Dataset) -> list[str]:
    """The entries the layer x head maps show: one head zeroed in self-attention at every step and chunk (others of
    the same head, restricted to some steps or chunks, or in cross-attention, would share its cell: averaged in)."""
    specs = {str(e): json.loads(str(s)) for e, s in zip(ds.intervention.values, ds.intervention_spec.values)}
    return [e for e, sp in specs.items() if sp.get("kind") == "ablate" and sp.get("mode") == "zero"
            and sp.get("attention", "self") == "self" and len(sp.get("layers") or []) == 1
            and len(sp.get("heads") or []) == 1 and not sp.get("steps") and not sp.get("chunks")]


def _cache_words(ds: xr.Dataset) -> str:
    """'; the baseline's KV cache: a window of 12 latent frames, 3 of them sink frames' (attrs of stores made since
    they were recorded; a policy entry's own cache is in its spec)."""
    window, sink = ds.attrs.get("local_attn_size"), ds.attrs.get("sink_size")
    if window is None:
        return ""
    if int(window) == -1:
        sampler = ((ds.attrs.get("fingerprint_fields") or {}).get("layout") or {}).get("sampler")
        return f"; the baseline's KV cache: {no_window_words(sampler == 'bidirectional')}"
    return (f"; the baseline's KV cache (and every entry's but a policy's): a window of {int(window)} latent frames, "
            f"{int(sink or 0)} of them sink frames")


def build_effects_report(store, out_html: str | Path) -> Path:
    from studies import load_store
    from workbench.intervene import ranking
    from workbench.store import named

    out_html = html_out(out_html)
    ds = load_store(store) if not isinstance(store, xr.Dataset) else store
    table = ranking(ds)
    page = Page(f"Effects: {named(str(store)).name}")
    if note := unfinished_note(ds.attrs):
        page.p(f"<b>Unfinished:</b> {html.escape(note)}")
    page.p(html.escape(f"{ds.sizes['intervention'] - 1} intervention(s) against the baseline, "
                       f"{ds.sizes['sample']} sample(s) (prompts: {', '.join(sorted(set(map(str, ds.prompt.values))))}; "
                       f"seeds {', '.join(map(str, sorted(set(ds.seed.values.tolist()))))}), "
                       f"{ds.sizes['frame']} latent frames{_cache_words(ds)}. command: {ds.attrs.get('command', '?')}"
                       + "".join(f"; then: {run['command']}" for run in ds.attrs.get("runs", [])
                                 if isinstance(run, dict) and run.get("command"))))
    for label, samples in not_finite_entries(ds).items():
        page.p(html.escape(f"Not finite: under {label} the rollout's latents were NaN or inf (its activations "
                           f"overflowed) in sample(s) {', '.join(samples)}: its effects are NaN, its world scores a "
                           "blank video's (the tracker finds nothing), its captured attention n/a."))
    page.p("effect = the RMS distance of the latents to the baseline's, divided by the baseline's RMS, averaged over "
           "samples and latent frames (effect_last_chunk: the last chunk's frames only); motion_change = the mean "
           "frame-to-frame latent change (latent_motion) over the baseline's, minus 1. "
           + ("The world columns are the miniature world's tracker on the decoded video, with in brackets the change "
              "against the baseline (docs/world_metrics.md); missed: which of adherent's three checks (colour, shape, "
              "direction) failed, in how many samples." if "world_trajectory_error" in ds else
              "No world metrics: the run was made with --world off." if ds.attrs.get("world_asked") == "off" else
              "No world metrics: the model or the prompts are not the miniature world's."))
    page.h("Ranked by effect")
    page.table(display_ranking(table), shown=TABLE_ROWS)
    if "intervention_detail" in ds.coords:  # (what a policy decided as it ran: a head-wise cache's static heads)
        decided = [(str(e), str(d)) for e, d in zip(ds.intervention.values, ds.intervention_detail.values) if str(d)]
        if decided:
            page.p("As they ran: " + "; ".join(html.escape(f"{e}: {d}") for e, d in decided) + ".")
    if ds.sizes["frame"] > 21:
        page.h("Drift over the rollout (segments of 21 latent frames)")
        page.p("effect a-b: the mean relative latent distance to the baseline over those latent frames; rms last/first: "
               "the latents' RMS in the last segment over the first (a rollout that fades or blows up moves it from 1).")
        page.table(drift_table(ds))
    heads = table.loc[single_head_ablations(ds)]
    grid = None
    if len(heads) > 1:
        grid = heads.pivot_table(index="layer", columns="head", values="effect")
        page.h("Single-head effects (layer x head)")
        page.figure(layer_head_map(_layer_head_array(grid, "effect", "ratio"), zmin=0,
                                   title="effect of zeroing one head (relative latent distance to the baseline)"),
                    "fig-heads")
        if "motion_change" in heads:
            motion = heads.pivot_table(index="layer", columns="head", values="motion_change")
            top = float(np.nanmax(np.abs(motion.values))) or 1.0
            page.p("motion_change of zeroing each head (red: the video changes more from frame to frame, blue: less):")
            page.figure(layer_head_map(_layer_head_array(motion, "motion_change", "ratio"), colorscale="RdBu_r",
                                       zmin=-top, zmax=top, title="motion_change of zeroing one head"),
                        "fig-heads-motion")
    top = [x for x in table.index if x != "baseline"][:TOP]
    if "attn_mass" in ds:
        _attention_section(page, ds, top)
    page.h("Per-frame effect")
    if note := subset_note(ds, top):
        page.p(f"The charts draw {note} (the first {len(top)} rows of the ranked table, which has "
               "them all).")
    curves = per_frame_curves(ds)
    for i, name in enumerate(curves):
        page.figure(per_frame_figure(ds, name, top, *curves[name]), f"fig-curve-{i}")
        if name == "world_curve_trajectory_error":
            page.p("Trajectory error per frame: the distance of the tracked object from the named motion fitted to "
                   "its first 81 frames (the length the models are trained on) and extrapolated beyond "
                   "(docs/world_metrics.md). An edit that changes frames within those 81 moves the fit, so frames "
                   "it left as they were can show a larger error too; past them (a long rollout) the fit, and so "
                   "`speed`, is the one of the first 81 frames.")
    _videos(page, ds, store, top)
    png = out_html.with_suffix(".png")
    write_png(stack_png([curve_png(ds, top, name=name, curve=curve) for name, curve in curves.items()]), png)
    pngs = [png.name]
    if grid is not None:
        write_png(grid_png(grid), out_html.with_name(out_html.stem + "_heads.png"))
        pngs.append(out_html.stem + "_heads.png")
    page.p("PNG copies: " + ", ".join(f"<code>{html.escape(n)}</code>" for n in pngs))
    return write_atomic(page.render(), out_html)


def per_frame_curves(ds: xr.Dataset) -> dict[str, tuple[str, str, str]]:
    """The page's per-frame charts: {variable: (its frame dim, the x axis's name, the y axis's name and unit)}."""
    curves = {"latent_distance_rel": ("frame", "latent frame", "relative latent distance (ratio)")}
    if "pixel_distance" in ds:
        curves["pixel_distance"] = ("pixel_frame", "pixel frame", "pixel RMS distance (RGB in [-1, 1])")
    if "world_curve_trajectory_error" in ds:
        curves["world_curve_trajectory_error"] = ("pixel_frame", "pixel frame", "trajectory error (px)")
    return curves


CURVE_TITLES = {  # each per-frame chart's title: what is plotted, per what frame
    "latent_distance_rel": "Relative latent distance to the baseline per latent frame",
    "pixel_distance": "Pixel RMS distance to the baseline per pixel frame (RGB in [-1, 1]: 2 is black to white)",
    "world_curve_trajectory_error": "Trajectory error per pixel frame (px; black: the baseline)",
}
SAME_PIXELS = "same pixels as the baseline there: the error moved with the motion fit"  # (the paragraph below)


def per_frame_figure(ds: xr.Dataset, name: str, labels: list[str], dim: str, xlabel: str, ylabel: str) -> go.Figure:
    """The per-frame chart of variable `name` (over `dim`): a line per entry of `labels` (and the baseline, black,
    for a world curve), each the mean over samples, as its title says; the frames a knockout among them knocks out
    shaded and named (`knockout_runs`). A trajectory error on frames whose pixels equal the baseline's (a
    knockout's own frames, which only later frames stop seeing) is not the entry's doing: their hover and the band's
    name say so (SAME_PIXELS)."""
    fig = go.Figure()
    pixel = dim == "pixel_frame"
    same = _same_pixels(ds) if name == "world_curve_trajectory_error" else {}
    drawn: dict[str, np.ndarray] = {}
    for j, label in enumerate(labels + (["baseline"] if name.startswith("world") else [])):
        y = ds[name].sel(intervention=label).mean("sample").values
        note = ["<br>" + SAME_PIXELS if label in same and same[label][k] else "" for k in range(len(y))]
        # a curve equal to one drawn before would hide it (or be hidden): dotted, its legend naming the other
        twin = next((other for other, y2 in drawn.items() if np.array_equal(y, y2, equal_nan=True)), None)
        drawn[label] = y
        fig.add_trace(go.Scatter(x=ds[dim].values, y=y, mode="lines", customdata=note,
                                 name=html.escape(label if twin is None else f"{label} (= {twin})", quote=False),
                                 hovertemplate=f"{xlabel} %{{x}}<br>{ylabel} %{{y:.4g}}%{{customdata}}<extra>"
                                               f"{html.escape(label)}</extra>",
                                 line=dict(color=COLOURS[j % len(COLOURS)] if label != "baseline" else "black",
                                           dash="dot" if twin is not None else None,
                                           width=3 if twin is not None else 2)))
    lines = 0  # (the bands' names, a line each above the plot, the last one's first)
    for label, x0, x1, hidden in knockout_bands(ds, labels, pixel):
        text = hidden + (f" ({metrics.span_text('pixel frame', x0, x1)})" if pixel else "")
        if label in same and same[label][x0:x1 + 1].all():
            text += f";\n{SAME_PIXELS}"
        fig.add_vrect(x0=x0 - 0.5, x1=x1 + 0.5, fillcolor="grey", opacity=0.15, line_width=0, layer="below")
        fig.add_annotation(x=x0 - 0.5, xref="x", xanchor="left", y=1, yref="paper", yanchor="bottom",
                           yshift=2 + 15 * lines, text=html.escape(text).replace("\n", "<br>"),
                           showarrow=False, align="left", font=dict(size=11, color="#555"))
        lines += 1 + text.count("\n")
    n = ds.sizes["sample"]
    title = f"{CURVE_TITLES.get(name, name)}, mean over {n} sample{'s' if n != 1 else ''}"
    fig.update_layout(title=dict(text=title, font=dict(size=15)), xaxis_title=xlabel, yaxis_title=ylabel,
                      height=420 + 15 * lines, margin=dict(t=60 + 15 * lines),
                      legend=dict(font=dict(size=10), title=dict(text=subset_note(ds, labels))))
    fig.update_yaxes(rangemode="tozero")  # (distances and errors: from 0, so that a small one looks small)
    return fig


def knockout_bands(ds: xr.Dataset, labels: list[str], pixel: bool) -> list[tuple[str, int, int, str]]:
    """(entry, first, last frame on the chart's axis, what it hides) for each run of frames a knockout among
    `labels` hides (`knockout_runs`): latent frames, or their pixel frames where `pixel`."""
    from workbench.view.sources import pixel_span  # (latent frame -> its pixel frames, as the viewer shows them)

    out = []
    for label, (runs, later) in knockout_runs(ds, labels).items():
        for a, b in runs:
            frames = metrics.span_text("latent frame", a, b)
            out.append((label, *((pixel_span(a)[0], pixel_span(b)[1] - 1) if pixel else (a, b)),
                        f"{label}: later frames do not see {frames}" if later else f"{label}: {frames} knocked out"))
    return out


def knockout_runs(ds: xr.Dataset, labels: list[str]) -> dict[str, tuple[list[tuple[int, int]], bool]]:
    """{label: ([(first, last) latent frame of each run of consecutive frames it knocks out], history_only)} for
    the knockouts among `labels` (their stored specs; history_only: only later frames stop seeing them)."""
    out = {}
    for label, spec in zip(map(str, ds.intervention.values), map(str, ds.intervention_spec.values)):
        spec = json.loads(spec)
        if label in labels and spec.get("kind") == "knockout" and spec.get("frames"):
            runs = []
            for f in sorted(int(x) for x in spec["frames"]):
                if runs and f == runs[-1][1] + 1:
                    runs[-1] = (runs[-1][0], f)
                else:
                    runs.append((f, f))
            out[label] = runs, bool(spec.get("history_only", True))
    return out


def _same_pixels(ds: xr.Dataset) -> dict[str, np.ndarray]:
    """{entry: [pixel_frame] True where its pixels equal the baseline's in every sample (pixel_distance 0)}."""
    same = (ds.pixel_distance == 0).all("sample")
    return {str(e): same.sel(intervention=e).values for e in ds.intervention.values if str(e) != "baseline"}


def _layer_head_array(grid: pd.DataFrame, name: str, units: str) -> xr.DataArray:
    return xr.DataArray(grid.values, dims=("layer", "head"),
                        coords=dict(layer=grid.index.values, head=grid.columns.values), name=name,
                        attrs=dict(long_name=name, units=units))


def _attention_section(page: Page, ds: xr.Dataset, top: list[str], drawn: int = 3) -> None:
    """--capture: how much each entry moved the captured layers' attention, and where (the top `drawn` entries)."""
    layers = ", ".join(str(int(x)) for x in ds.layer.values)
    page.h(f"Attention under each entry (captured layers {layers})")
    page.p("JS divergence in bits between each entry's attention rows (attn_mass over key frames) and the baseline's, "
           "averaged over samples, steps, heads and query frames: 0 = unchanged, 1 = disjoint. The capture reads "
           "what ran: a knocked-out frame has no mass; an ablated head still attends (its output is what changed), "
           "so the layers after it change in the same forward, and every layer can change through what later steps "
           "and chunks see (the changed latents, through the KV cache). n/a: no capture (a head-wise cache policy), "
           "or a rollout that was not finite.")
    change = attention_change(ds, top)
    page.table(change.map(lambda v: f"{v:.3g}" if np.isfinite(v) else "n/a"))
    shown = [label for label in top if np.isfinite(change.loc[label].values).any()][:drawn]
    if shown:
        page.p("Where the mass moved: each entry's attn_mass minus the baseline's, averaged over samples, steps and "
               "heads, on one colour scale for every entry (red: more than the baseline; a frame the entry no "
               "longer attends counts as 0; grey: a key frame neither attends, e.g. a later one).")
        deltas = {label: attention_delta(ds, label).load() for label in shown}
        top_change = max([float(np.nanmax(np.abs(d.values))) for d in deltas.values() if np.isfinite(d.values).any()]
                         + [0.0]) or 1.0
        for n, (label, delta) in enumerate(deltas.items()):
            page.figure(attention_delta_figure(delta, label, top_change), f"fig-attention-delta-{n}")


def _videos(page: Page, ds: xr.Dataset, store, top: list[str], samples: int = 2) -> None:
    """The saved frame grids (`intervene --save-videos`) of the baseline and the top entries, one row each."""
    import base64

    from workbench.intervene import saved_videos, video_file, videos_dir

    if "videos_dir" not in ds.attrs or isinstance(store, xr.Dataset):
        return
    page.h("Videos (nine pixel frames, evenly spaced; the baseline first)")
    folder = videos_dir(store, ds.attrs)
    if not folder.is_dir():
        own = f"{Path(store).stem}_videos"
        where = (f"and there is no {own}/ beside {Path(store).name} now" if ds.attrs["videos_dir"] == own else
                 f"and neither that folder nor {own}/ is beside {Path(store).name} now")
        page.p(html.escape(f"No videos: the run saved them in {ds.attrs['videos_dir']}/ beside the store, {where} (a "
                           "store copied without its videos?)."))
        return
    for sample in list(map(str, ds.sample.values))[:samples]:
        page.p(html.escape(f"sample {sample}"))
        unsaved, gone = [], []  # (said, not left out unseen: no video beside the others reads as a broken page)
        for label in ["baseline", *top[:5]]:
            path = video_file(store, label, sample, attrs=ds.attrs)
            if not saved_videos(ds.attrs, label):
                unsaved.append(label)
            elif not path.is_file():
                gone.append(label)
            else:
                data = base64.b64encode(path.read_bytes()).decode()
                alt = html.escape(f"{label}, sample {sample}: nine pixel frames, first to last", quote=True)
                page.parts.append(f'<div><code>{html.escape(label)}</code><br>'
                                  f'<img src="data:image/png;base64,{data}" alt="{alt}" style="max-width:100%"></div>')
        if unsaved:
            page.p(html.escape(f"No video of {', '.join(unsaved)}: made by a run without --save-videos."))
        if gone:
            page.p(html.escape(f"No video of {', '.join(gone)}: saved as {Path(folder).name}/LABEL/{sample}.png, "
                               "which is no longer there (moved or deleted)."))


# ------------------------------------------------------------------------------------------------------- PNGs
def write_png(image, path: Path) -> Path:
    """`image` (PIL) as a PNG at `path`, atomically (its folder made if need be)."""
    from models.files import atomic_write

    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def nice_ticks(top_value: float, n: int = 5) -> list[float]:
    """Ticks from 0 a person would pick for values up to `top_value`: about `n` steps of 1, 2, 2.5 or 5 times a
    power of ten, the last at or just above the top value."""
    if not np.isfinite(top_value) or top_value <= 0:  # (nothing to scale: all zero or NaN)
        return [0, 1]
    raw = top_value / n
    power = 10 ** np.floor(np.log10(raw))
    step = float(power * next(m for m in (1, 2, 2.5, 5, 10) if m * power >= raw))
    return [round(k * step, 12) for k in range(int(np.ceil(top_value * 1.02 / step)) + 1)]


def curve_png(ds: xr.Dataset, labels: list[str], size=(1100, 620), name: str = "latent_distance_rel",
              curve: tuple[str, str, str] = ("frame", "latent frame", "relative latent distance")):
    """A per-frame chart of the page as a PNG: variable `name` (mean over samples) of `labels`, one coloured line
    each (and the baseline, black, for a world curve, as on the page), with a legend; `curve`: (its frame dim, the
    x axis's name, the y axis's name with its unit); its title the page's (CURVE_TITLES); text 15 pixels high
    (Pillow's 10-pixel bitmap font was too small to read in a shared copy). A NaN (a frame where the tracker
    found nothing) breaks the line."""
    from PIL import Image, ImageDraw

    from models.video import font_for  # (labels are the user's: a font that has their letters)

    labels = entry_labels(ds, labels)
    dim, xlabel, ylabel = curve
    labels = labels + (["baseline"] if name.startswith("world") and "baseline" in ds.intervention.values else [])
    W, H = size
    left, right, top, bottom = 96, 320, 44, 64
    font = font_for("0123456789.e-+ " + ylabel + xlabel, 15)
    # the legend as wide as its longest label (to 640 pixels; a longer one loses its middle, not its end)
    fonts = {lab: font_for(lab, 15) for lab in labels}
    shown = {lab: _fit(lab, fonts[lab], LEGEND_MAX_PX) for lab in labels}
    wide = max([fonts[lab].getlength(shown[lab]) for lab in labels] + [0])
    grow = max(0, int(wide) + 60 - right)
    W, right = W + grow, right + grow
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x = ds[dim].values
    ys = {lab: ds[name].sel(intervention=lab).mean("sample").values for lab in labels}
    ticks = nice_ticks(max([float(np.nanmax(v)) for v in ys.values() if np.isfinite(v).any()] + [1e-6]))
    ymax = ticks[-1]
    px = lambda f: left + (f - x[0]) / max(1, x[-1] - x[0]) * (W - left - right)  # noqa: E731
    py = lambda v: H - bottom - v / ymax * (H - top - bottom)  # noqa: E731
    # the frames a knockout among `labels` hides, shaded as on the page (per_frame_figure), named under the title
    bands = knockout_bands(ds, [x for x in labels if x != "baseline"], dim == "pixel_frame") \
        if "intervention_spec" in ds.coords else []
    for _, x0, x1, _ in bands:
        d.rectangle([max(left, px(x0 - 0.5)), top, min(W - right, px(x1 + 0.5)), H - bottom], fill="#e4e4e4")
    if bands:
        text = "grey: " + "; ".join(hidden for *_, hidden in bands)
        d.text((left + 6, top + 4), text, fill="#555555", font=font_for(text, 13))  # (inside the plot's top)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for v in ticks:
        d.line([left - 5, py(v), left, py(v)], fill="black")
        d.text((left - 8, py(v)), f"{v:.4g}", fill="black", font=font, anchor="rm")
    label = Image.new("RGB", (H - top - bottom, 20), "white")  # the y axis's name, written upright
    ImageDraw.Draw(label).text((label.width // 2, 10), ylabel, fill="black", font=font, anchor="mm")
    img.paste(label.rotate(90, expand=True), (8, top))
    for f in x[:: max(1, len(x) // 10)]:
        d.line([px(f), H - bottom, px(f), H - bottom + 5], fill="black")
        d.text((px(f), H - bottom + 8), str(int(f)), fill="black", font=font, anchor="mt")
    d.text((left + (W - left - right) // 2, H - 10), xlabel, fill="black", font=font, anchor="mb")
    n = ds.sizes["sample"]
    title = f"{CURVE_TITLES.get(name, name)}, mean over {n} sample{'s' if n != 1 else ''}"
    d.text((left, 12), title, fill="black", font=font_for(title, 17))
    note = subset_note(ds, labels)  # (a legend header when the chart leaves entries out)
    if note:
        d.text((W - right + 14, top + 16), note, fill="black", font=font_for(note, 13), anchor="lm")
    for j, (lab, y) in enumerate(ys.items()):
        c = COLOURS[j % len(COLOURS)] if lab != "baseline" or not name.startswith("world") else "black"
        run = []  # (the points since the last NaN: one line each)
        for f, v in [*zip(x, y), (None, np.nan)]:
            if np.isfinite(v):
                run.append((px(f), py(v)))
                continue
            if len(run) > 1:
                d.line(run, fill=c, width=3)
            elif run:
                d.ellipse([run[0][0] - 2, run[0][1] - 2, run[0][0] + 2, run[0][1] + 2], fill=c)
            run = []
        row = top + 16 + 24 * (j + bool(note))
        d.line([W - right + 14, row, W - right + 38, row], fill=c, width=4)
        d.text((W - right + 46, row), shown[lab], fill="black", font=fonts[lab], anchor="lm")
    return img


LEGEND_MAX_PX = 640


def stack_png(images: list):
    """PIL images one above the other, on white, as wide as the widest: the page's charts in one PNG copy."""
    from PIL import Image

    out = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for image in images:
        out.paste(image, (0, y))
        y += image.height
    return out


def _fit(text: str, font, width: float) -> str:
    """text, or its start and end around an ellipsis, in at most `width` pixels of `font`."""
    if font.getlength(text) <= width:
        return text
    keep = len(text)
    while keep > 2 and font.getlength(text[: keep // 2] + "..." + text[len(text) - (keep - keep // 2):]) > width:
        keep -= 1
    return text[: keep // 2] + "..." + text[len(text) - (keep - keep // 2):]


def grid_png(grid: pd.DataFrame, cell: int = 72):
    """A layer x head map of single-head effects, the value written in each cell, in the report's colours (viridis
    from 0 to the largest effect, a scale strip below), the last layer on top as in the report's map; its text 14
    pixels high."""
    from PIL import Image, ImageDraw
    from plotly.colors import sample_colorscale

    from models.video import font_for

    rows, cols = grid.shape
    left, top = 64, 56
    font, small = font_for("0123456789.-Lh", 14), font_for("0123456789.-", 13)
    title = "effect of zeroing one head (rows: layers, columns: heads)"
    title_font = font_for(title, 16)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(left + cols * cell + 24, int(measure.textlength(title, font=title_font)) + 24)
    img = Image.new("RGB", (width, top + rows * cell + 96), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black", font=title_font)
    vmax = float(np.nanmax(grid.values)) or 1.0

    def colour(v):  # (0-255 RGB; NaN: light grey)
        if not np.isfinite(v):
            return (226, 226, 222)
        rgb = sample_colorscale("Viridis", [min(max(v / vmax, 0.0), 1.0)], colortype="tuple")[0]
        return tuple(round(255 * c) for c in rgb)

    def ink(rgb):  # (black on the light end of viridis, white on the dark)
        return "black" if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else "white"

    for i, layer in enumerate(grid.index[::-1]):  # the last layer in the first row
        values = grid.loc[layer].values
        d.text((left - 10, top + i * cell + cell // 2), f"L{layer}", fill="black", font=font, anchor="rm")
        for j, head in enumerate(grid.columns):
            v, box = values[j], [left + j * cell, top + i * cell, left + (j + 1) * cell - 2, top + (i + 1) * cell - 2]
            fill = colour(v)
            d.rectangle(box, fill=fill)
            d.text(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2), f"{v:.3f}" if np.isfinite(v) else "-",
                   fill=ink(fill), font=small, anchor="mm")
            if i == 0:
                d.text((left + j * cell + cell // 2, top - 8), f"h{head}", fill="black", font=font, anchor="mb")
    y = top + rows * cell + 16  # the scale: 0 to the largest effect
    for x in range(left, width - 70):
        d.line([(x, y), (x, y + 12)], fill=colour(vmax * (x - left) / max(1, width - 71 - left)))
    d.text((left, y + 18), "0", fill="black", font=font)
    d.text((width - 70, y + 18), f"{vmax:.3f}", fill="black", font=font, anchor="ra")
    label = "relative latent distance to the baseline [ratio]"  # (the page's map: its title and colour bar)
    d.text((left, y + 40), label, fill="black", font=font_for(label, 13))
    return img
