"""Plotly figures of a store: the researchers' plots and overviews, all built on the CPU from a store.

    head_grid        per-head query x key frame heatmaps (the researchers' 3x4 grid, origin lower, one colour
                     scale shared by every head: 0..max for mass, symmetric RdBu_r for logits as in their Fig. 1)
    head_pair        one head's heatmap in two stores side by side (A, B) on one colour scale
    last_chunk_bars  per-head bars + line of the last chunk's attention over key frames, titled with the
                     researchers' sink statistic, sink_delta = v[0] - mean(v[1:-1])
    step_slider      the head grid across steps (plotly frames and a slider, one frame per step)
    train_step_slider  the head grid of a training probe store across train steps
    metric_over_training  a head metric against the train step, a panel per layer, a line per head
    layer_head_map   layer x head heatmap of any metric (a DataArray with dims layer, head)
    taxonomy_map     layer x head map of the head classes
    compare_maps     the same metric for two stores and their difference B - A (stacked A, B, B - A)
    recency_lines    the recency profile (mean mass by query_frame - key_frame), one line per head
    metric_by_query_frame  a row metric against the query frame, one line per head
    metric_by_step   a head metric across steps (labelled with their timesteps), one line per head
    cross_tokens     per-head query frame x prompt token heatmaps of the cross-attention (token texts as labels),
                     or for many heads one head x token map of the mean over query frames
    key_token_maps   where inside each key frame one query frame's attention lands: an image per key frame

Axes carry the store's names (layer, head, query frame, key frame, step, timestep). Values are averaged over
samples unless a `sample` id is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from studies import metrics
from workbench.errors import WorkbenchError

# the researchers' sink statistic, named apart from the head table's sink_mass (v[0] alone, frame 0's share, when v
# is attn_mass: last_chunk_bars says so then; a logit profile's v[0] is no mass)
SINK_FORMULA = "sink_delta = v[0] - mean(v[1:-1]), the researchers' sink statistic"
CLASS_COLOURS = {"sink": "#d62728", "local": "#1f77b4", "global": "#2ca02c", "deep_sink": "#9467bd",
                 "mixed": "#7f7f7f", "no_values": "#e0e0e0"}


# -------------------------------------------------------------------------------------------------- helpers
NOTEBOOK_RENDERER = "plotly_mimetype+notebook"


def use_notebook_renderer() -> str:
    """Plotly's renderer for the study notebooks: the plotly mimetype (JupyterLab, VS Code) plus HTML carrying
    plotly.js, so that `jupyter nbconvert --to html` of an executed notebook shows the figures, offline too
    (plotly's own choice in a kernel is the mimetype alone, which nbconvert's HTML cannot draw).
    PLOTLY_RENDERER, when set, wins. Returns the renderer in use."""
    import os

    import plotly.io as pio

    pio.renderers.default = os.environ.get("PLOTLY_RENDERER") or NOTEBOOK_RENDERER
    return pio.renderers.default


def _round(a) -> np.ndarray:
    """float32 values for a trace: plotly stores numpy arrays as typed base64 arrays, so float32 halves the HTML;
    NaN (not attended) stays NaN and is drawn as a gap."""
    return np.asarray(a, dtype=np.float32)


def _frames(ds, var, layer, sample, steps=None):
    """ds[var] at one layer, averaged over samples unless one is named: [step, head, query_frame, key_frame]."""
    metrics.require_frame_pair(ds, var, "this figure (a head grid of query frame x key frame)")
    sub = metrics.select(ds, sample=sample, layer=metrics.one(layer, "layer"), step=steps)
    return sub[var].astype(np.float64).mean("sample", skipna=True).isel(layer=0).load()


def _pick_heads(data: xr.DataArray, heads) -> xr.DataArray:
    if heads is None:
        return data
    heads = [heads] if np.isscalar(heads) else list(heads)  # (one head)
    if any(isinstance(h, (bool, np.bool_)) for h in heads):
        raise WorkbenchError(f"heads {heads!r}: give head ids (ints), e.g. heads=[0, 1]")
    have = [int(h) for h in data["head"].values]
    bad = [h for h in heads if h not in have]
    if bad or not len(heads):
        raise WorkbenchError(f"head {bad[0] if bad else heads!r} is not in the store; it has heads {have}")
    return data.sel(head=list(heads))


def _colour(var: str, values: np.ndarray) -> dict:
    """The shared colour axis: symmetric RdBu_r for logits (the researchers' choice), 0..max viridis otherwise."""
    finite = values[np.isfinite(values)]
    top = float(np.abs(finite).max()) if finite.size else 1.0
    if "logit" in var:
        return dict(colorscale="RdBu_r", cmin=-top, cmax=top)
    return dict(colorscale="Viridis", cmin=0.0, cmax=top or 1.0)


def _scale(colour: dict, zmin: float | None, zmax: float | None, colorscale: str | None) -> dict:
    """`_colour`'s axis with the ends and colours a caller gave in its place."""
    given = dict(cmin=zmin, cmax=zmax, colorscale=colorscale)
    return colour | {k: v for k, v in given.items() if v is not None}


# Okabe and Ito's colours that a reader with a red-green colour deficiency still tells apart (their yellow left out:
# too pale a line on white); plotly's own put heads 0 and 3 (blue and purple) in one blue for such a reader
HEAD_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#000000")
HEAD_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "triangle-down", "star")
HEAD_DASHES = ("solid", "dash", "dot", "dashdot")


def _head_style(i: int, n: int) -> dict:
    """How the i-th of n heads' line looks: a colour and a marker of its own among the first seven, then the same
    seven dashed, dotted, dash-dotted (28 heads: the 1.3B model's 12 and more); above 28 heads (the 14B model's
    40) colours evenly spaced along Turbo, dashes cycling. Colour, marker and dash together: no two heads alike, in
    grey print too. {"color", "symbol", "dash"}."""
    from plotly.colors import sample_colorscale, sequential

    k = len(HEAD_COLOURS)
    colour = HEAD_COLOURS[i % k] if n <= k * len(HEAD_DASHES) else sample_colorscale(sequential.Turbo, [i / (n - 1)])[0]
    return dict(color=colour, symbol=HEAD_SYMBOLS[i % k], dash=HEAD_DASHES[(i // k) % len(HEAD_DASHES)])


def _head_line(i: int, n: int) -> dict:
    """Scatter keywords of the i-th of n heads' line (`_head_style`)."""
    s = _head_style(i, n)
    return dict(line=dict(color=s["color"], dash=s["dash"]), marker=dict(color=s["color"], symbol=s["symbol"]))


def _grid(n: int, cols: int) -> tuple[int, int]:
    cols = max(1, min(cols, n))
    return math.ceil(n / cols), cols


def _units(ds, var) -> str:
    attrs = ds[var].attrs
    return f"{attrs.get('long_name', var)} [{attrs.get('units', '')}]"


def samples_label(ds, sample=None) -> str:
    """What a figure of `ds` shows: the one `sample` named (or the store's only one), or the mean over its samples."""
    if sample is None and ds.sizes["sample"] == 1:
        sample = f"sample {ds['sample'].values[0]}"
    return sample if sample is not None else f"mean over {ds.sizes['sample']} samples"


def _colorbar(title: str) -> dict:
    """A colour bar titled `title` along its right side: written across its top, a long units name ("self-attention
    mass per key frame [probability]", 280 px) took that much width from the heatmaps beside it."""
    return dict(title=dict(text=title, side="right"))


def _heatmap(z, x, y, name, coloraxis="coloraxis"):
    return go.Heatmap(z=_round(z), x=list(x), y=list(y), coloraxis=coloraxis, name=name,
                      hovertemplate="query frame %{y}<br>key frame %{x}<br>value %{z:.4g}<extra>" + name + "</extra>")


def _head_subplots(heads, cols, titles, shared=True, vertical_spacing=None):
    rows, cols = _grid(len(heads), cols)
    return make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_xaxes=shared, shared_yaxes=shared,
                         horizontal_spacing=0.04, vertical_spacing=vertical_spacing or min(0.08, 0.3 / rows)), cols


def _label_axes(fig, rows, cols, x_title, y_title):
    for c in range(1, cols + 1):
        fig.update_xaxes(title_text=x_title, row=rows, col=c)
    for r in range(1, rows + 1):
        fig.update_yaxes(title_text=y_title, row=r, col=1)
    # frame axes of a short video: a tick per frame (plotly's own ticks fell on half frames, -0.5, 0, 0.5, ...)
    for title, axis, update in ((x_title, "x", fig.update_xaxes), (y_title, "y", fig.update_yaxes)):
        values = [v for tr in fig.data if getattr(tr, axis, None) is not None for v in getattr(tr, axis)]
        if title.endswith("frame") and values and len(set(values)) <= 15:
            update(tick0=0, dtick=1)


# ------------------------------------------------------------------------------------------ the head grid
def head_grid(
    ds: xr.Dataset,
    layer: int,
    *,
    step: int = 0,
    sample: str | None = None,
    var: str = "attn_mass",
    heads: Sequence[int] | None = None,
    cols: int = 4,
    zmin: float | None = None,
    zmax: float | None = None,
    colorscale: str | None = None,
) -> go.Figure:
    """Per-head query frame x key frame heatmaps of `var` at one layer and step; origin lower (query frame 0 at
    the bottom), one colour scale for all heads, NaN (not attended) left blank. `zmin`, `zmax`, `colorscale`: the
    colour scale's ends and colours (default: 0 to the largest value drawn, Viridis; a logit symmetric RdBu_r), so
    that figures of several layers or stores can share one."""
    ds = metrics.attention_store(ds)
    data = _frames(ds, var, layer, sample, metrics.one(step, "step")).isel(step=0)  # [head, query_frame, key_frame]
    data = _pick_heads(data, heads)
    head_list = [int(h) for h in data["head"].values]
    fig, cols = _head_subplots(head_list, cols, [f"head {h}" for h in head_list])
    rows = math.ceil(len(head_list) / cols)
    for i, h in enumerate(head_list):
        z = data.sel(head=h)
        fig.add_trace(_heatmap(z.values, z.key_frame.values, z.query_frame.values, f"head {h}"),
                      row=i // cols + 1, col=i % cols + 1)
    _label_axes(fig, rows, cols, "key frame", "query frame")
    fig.update_layout(
        title=f"{var} · layer {layer} · {metrics.step_label(ds, step)} · {samples_label(ds, sample)}",
        coloraxis=dict(**_scale(_colour(var, data.values), zmin, zmax, colorscale),
                       colorbar=_colorbar(_units(ds, var))),
        height=260 * rows + 120, width=max(700, 240 * cols + 160),
    )
    return fig


def head_pair(
    a: xr.Dataset,
    b: xr.Dataset,
    layer: int,
    head: int,
    *,
    step_a: int = 0,
    step_b: int = 0,
    names: tuple[str, str] = ("A", "B"),
    var: str = "attn_mass",
    zmin: float | None = None,
    zmax: float | None = None,
    colorscale: str | None = None,
) -> go.Figure:
    """One head's query frame x key frame heatmap in two stores side by side (A left, B right), each averaged over
    its samples, on one colour scale so that the two can be compared by eye; each panel names its store and step.
    `zmin`, `zmax`, `colorscale` as `head_grid`'s."""
    a, b = metrics.attention_store(a), metrics.attention_store(b)
    maps = [_pick_heads(_frames(ds, var, layer, None, metrics.one(step, "step")).isel(step=0),
                        [metrics.one(head, "head")]).sel(head=head)
            for ds, step in ((a, step_a), (b, step_b))]  # [query_frame, key_frame] each
    titles = [f"{name}<br><sub>{metrics.step_label(ds, step)} · {samples_label(ds)}</sub>"  # two lines: never overlap
              for name, ds, step in ((names[0], a, step_a), (names[1], b, step_b))]
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles, horizontal_spacing=0.12)
    for col, (z, name) in enumerate(zip(maps, names), start=1):
        fig.add_trace(_heatmap(z.values, z.key_frame.values, z.query_frame.values, name), row=1, col=col)
    _label_axes(fig, 1, 2, "key frame", "query frame")
    fig.update_yaxes(title_text="query frame", row=1, col=2)
    fig.update_layout(
        title=f"{var} · layer {layer} head {head}",
        coloraxis=dict(**_scale(_colour(var, np.concatenate([m.values.ravel() for m in maps])), zmin, zmax,
                                colorscale), colorbar=_colorbar(_units(a, var))),
        height=520, width=1100, margin=dict(t=130),
    )
    return fig


# ------------------------------------------------------------------------------------------ last-chunk bars
def last_chunk_bars(
    ds: xr.Dataset,
    layer: int,
    *,
    step: int = 0,
    sample: str | None = None,
    var: str = "attn_mass",
    heads: Sequence[int] | None = None,
    cols: int = 4,
) -> go.Figure:
    """Per head, the last chunk's attention over key frames (v = the mean of the last chunk's query rows, the
    researchers' `last_block_frame_attention`) as bars plus a line, each titled with their sink statistic,
    sink_delta = v[0] - mean(v[1:-1]) (the head table's sink_mass is v[0] alone). Each y axis is named by the unit
    alone: the long name ran into the next row's, or off a single row's plot (the title has it)."""
    ds = metrics.attention_store(ds)
    sub = metrics.select(ds, sample=sample, layer=metrics.one(layer, "layer"), step=metrics.one(step, "step"))
    v = metrics.frame_profile(sub, var=var).mean("sample", skipna=True).isel(layer=0, step=0)  # [head, key_frame]
    v = _pick_heads(v, heads)
    sink = metrics.sink_delta(v)  # [head]
    head_list = [int(h) for h in v["head"].values]
    short = v.sizes["key_frame"] < 3  # (then sink is the mean of nothing: said once, in the figure's title)
    titles = [f"head {h}: sink_delta = {float(sink.sel(head=h)):.3g}" if not short else f"head {h}: sink_delta n/a"
              for h in head_list]
    fig, cols = _head_subplots(head_list, cols, titles, shared=False)
    rows = math.ceil(len(head_list) / cols)
    x = [int(k) for k in v.key_frame.values]
    for i, h in enumerate(head_list):
        y = _round(v.sel(head=h).values)
        r, c = i // cols + 1, i % cols + 1
        fig.add_trace(go.Bar(x=x, y=y, name=f"head {h}", marker_color="#4c78a8", showlegend=False,
                             hovertemplate="key frame %{x}<br>%{y:.4g}<extra>head " + str(h) + "</extra>"), row=r, col=c)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", line=dict(color="#e45756", width=1),
                                 marker=dict(size=3), showlegend=False, hoverinfo="skip"), row=r, col=c)
    _label_axes(fig, rows, cols, "key frame", ds[var].attrs.get("units", var))
    frames = metrics.query_frames_for(sub, "last_chunk")
    fig.update_layout(  # (two lines: one ran off the figure)
        title=dict(text=f"{var} of the last chunk ({metrics.span_text('query frame', frames[0], frames[-1])}) over key "
                        "frames · layer "
                        f"{layer} · {metrics.step_label(ds, step)}<br><sup>{SINK_FORMULA}"
                        + (" (sink_mass: v[0])" if var == "attn_mass" else "")
                        + (" (n/a under 3 key frames)" if short else "") + "</sup>"),
        height=220 * rows + 140, width=max(700, 260 * cols + 100), bargap=0.15, margin=dict(t=110),
    )
    fig.update_annotations(font_size=12)  # (the panel titles: at a narrow window's width, 15 px ran into each other)
    return fig


# ------------------------------------------------------------------------------------------ sliders
def step_slider(
    ds: xr.Dataset,
    layer: int,
    *,
    sample: str | None = None,
    var: str = "attn_mass",
    heads: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    cols: int = 4,
    start: int | None = None,
) -> go.Figure:
    """The head grid across steps: one plotly frame per step, a slider labelled 'step s · t=...', one colour
    scale over all steps so the frames are comparable; it opens at step `start` (default: the first)."""
    ds = metrics.attention_store(ds)
    data = _frames(ds, var, layer, sample, None if steps is None else list(steps))  # [step, head, qf, kf]
    labels = {int(s): metrics.step_label(ds, int(s)) for s in data.step.values}
    cfg = {s: str(ds["cfg"].sel(step=s).values) if "cfg" in ds.coords else "none" for s in labels}
    marks = {s: f"{s} · t={metrics.timestep_text(ds['timestep'].sel(step=s))}"
             + ("" if cfg[s] == "none" else f" {cfg[s]}")
             for s in labels}
    return _grid_slider(data, "step", labels, marks, start, heads, cols,
                        title=lambda s: f"{var} · layer {layer} · {labels[s]}", who=samples_label(ds, sample),
                        colorbar=_units(ds, var), var=var)


def train_step_slider(
    ds: xr.Dataset,
    layer: int,
    *,
    step: int = 0,
    sample: str | None = None,
    var: str = "attn_mass",
    heads: Sequence[int] | None = None,
    cols: int = 4,
) -> go.Figure:
    """The head grid of a training probe store at one step, across train steps (a slider over `train_step`,
    one colour scale over all of them); it opens at the last train step."""
    data = _frames(ds, var, layer, sample, metrics.one(step, "step")).isel(step=0)  # [train_step, head, qf, kf]
    values = [int(t) for t in data.train_step.values]
    labels = {t: f"train step {t} · {metrics.step_label(ds, step)}" for t in values}
    return _grid_slider(data, "train_step", labels, {t: str(t) for t in values}, values[-1], heads, cols,
                        title=lambda t: f"{var} · layer {layer} · {labels[t]}", who=samples_label(ds, sample),
                        colorbar=_units(ds, var), var=var)


def _grid_slider(data: xr.DataArray, dim: str, labels: dict, marks: dict, start, heads, cols, *, title, who,
                 colorbar: str, var: str) -> go.Figure:
    """Per-head heatmaps of data [dim, head, query_frame, key_frame], one plotly frame per value of `dim`."""
    data = _pick_heads(data, heads)
    head_list = [int(h) for h in data["head"].values]
    values = [int(v) for v in data[dim].values]
    if start is None:
        start = values[0]
    if start not in values:
        raise WorkbenchError(f"{dim} {start} is not among the slider's {dim}s {values}")
    fig, cols = _head_subplots(head_list, cols, [f"head {h}" for h in head_list])
    rows = math.ceil(len(head_list) / cols)

    def traces(v):
        return [_heatmap(data.sel({dim: v, "head": h}).values, data.key_frame.values, data.query_frame.values,
                         f"head {h}") for h in head_list]

    for i, trace in enumerate(traces(start)):
        fig.add_trace(trace, row=i // cols + 1, col=i % cols + 1)
    fig.frames = [go.Frame(data=traces(v), name=str(v), traces=list(range(len(head_list))),
                           layout=dict(title_text=f"{title(v)} · {who}")) for v in values]
    slider = dict(
        active=values.index(start), currentvalue=dict(prefix=f"{dim.replace('_', ' ')}: "), pad=dict(t=40),
        steps=[dict(label=marks[v], method="animate",
                    args=[[str(v)], dict(mode="immediate", frame=dict(duration=0, redraw=True), transition=dict(duration=0))])
               for v in values],
    )
    _label_axes(fig, rows, cols, "key frame", "query frame")
    fig.update_layout(
        title=f"{title(start)} · {who}",
        coloraxis=dict(**_colour(var, data.values), colorbar=_colorbar(colorbar)),
        sliders=[slider], height=260 * rows + 200, width=max(700, 240 * cols + 160),
    )
    return fig


def metric_over_training(da: xr.DataArray, *, title: str | None = None) -> go.Figure:
    """A head metric (dims train_step, layer, head) against the train step: a panel per layer, a line per head."""
    _needs_dims(da, ("train_step", "layer", "head"), "metric_over_training")
    layers = [int(v) for v in da.layer.values]
    fig = make_subplots(rows=1, cols=len(layers), shared_yaxes=True, subplot_titles=[f"layer {x}" for x in layers],
                        horizontal_spacing=0.03)
    x = [int(t) for t in da.train_step.values]
    n = da.sizes["head"]
    for col, layer in enumerate(layers, start=1):
        for i, h in enumerate(da["head"].values):
            fig.add_trace(go.Scatter(x=x, y=_round(da.sel(layer=layer, head=h).values), mode="lines+markers",
                                     name=f"head {int(h)}", legendgroup=f"head {int(h)}", showlegend=col == 1,
                                     **_head_line(i, n)), row=1, col=col)
        fig.update_xaxes(title_text="train step", row=1, col=col)
    fig.update_yaxes(title_text=f"{da.name} [{da.attrs.get('units', '')}]", row=1, col=1)
    fig.update_layout(title=title or f"{da.name}: {da.attrs.get('long_name', '')} across training", height=420,
                      width=max(800, 320 * len(layers) + 200))
    return fig


# ------------------------------------------------------------------------------------------ tokens
def _prompt_samples(ds: xr.Dataset, sample: str | None) -> tuple[list[str], str]:
    """The samples a token figure averages (their token labels must agree): `sample`, else every sample of the first
    sample's prompt; and how the title names them."""
    if sample is not None:
        return [sample], sample
    prompt = str(ds["prompt"].values[0])
    ids = [str(s) for s, p in zip(ds.sample.values, ds["prompt"].values) if str(p) == prompt]
    short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
    return ids, f"mean over {len(ids)} sample(s) of the prompt {_text(repr(short))}"


def _text(text: str) -> str:
    """Text for a plotly title or label as written: plotly reads <b>, <br>, &amp; ... as markup, so escape them."""
    import html

    return html.escape(text, quote=False)


def _piece(token: str) -> str:
    """A sentencepiece token as text for a tick label: its word-start mark as nothing ('\u2581red' -> 'red'), '<' and
    '>' escaped (plotly reads labels as HTML: '</s>' vanished)."""
    return _text(token.replace("\u2581", " ").strip() or token)


def cross_tokens(
    ds: xr.Dataset,
    layer: int,
    *,
    step: int = 0,
    sample: str | None = None,
    heads: Sequence[int] | None = None,
    cols: int = 4,
    per_head: bool | None = None,
) -> go.Figure:
    """Per head, how each query frame's cross-attention splits over the prompt (`cross_mass` at one layer and step):
    query frame x token heatmaps, the tokens named by their text (the negative prompt's on a CFG uncond step), the
    padding past the prompt summed into one last column; rows sum to 1. Averaged over the samples of one prompt
    (the first sample's), or one `sample`. `per_head=False` draws one head x token heatmap of the mean over query
    frames instead, every head in one panel; None (the default) chooses it when the per-head panels would take
    more than three rows (a long prompt's panels go one a row: 12 rows for the 1.3B model's heads)."""
    ds = metrics.attention_store(ds)
    metrics.require_var(ds, "cross_mass")
    ids, who = _prompt_samples(ds, sample)
    sub = metrics.select(ds, sample=ids, layer=metrics.one(layer, "layer"), step=metrics.one(step, "step"))
    uncond = "cfg" in sub.coords and str(sub["cfg"].values[0]) == "uncond"
    if uncond and "uncond_token" not in sub.coords:
        raise WorkbenchError(f"step {step} is a CFG uncond step, whose text keys are the negative prompt's tokens, "
                             "and this store (made before they were recorded) has no uncond_token labels: choose a "
                             "cond step, or extract again")
    token, count = ("uncond_token", "uncond_num_tokens") if uncond else ("token", "num_tokens")
    n = int(sub[count].values[0])
    mass = sub["cross_mass"].astype(np.float64).mean("sample").isel(layer=0, step=0)  # [head, query_frame, text_token]
    mass = _pick_heads(mass, heads)
    padding = mass.sizes["text_token"] > n
    z = np.concatenate([mass.values[..., :n], mass.values[..., n:].sum(-1, keepdims=True)], -1)[..., : n + padding]
    x = [f"{i} {_piece(str(t))}" for i, t in enumerate(sub[token].values[0][:n])] + ["padding"] * padding
    head_list = [int(h) for h in mass["head"].values]
    keys = "the negative prompt's tokens" if uncond else "the prompt's tokens"
    panel = 60 + 14 * len(x)  # px per head: 14 a token column (every token named, in 10 px type)
    rows, cols = _grid(len(head_list), max(1, min(cols, 1040 // panel)))
    if per_head is False or (per_head is None and rows > 3):
        return _cross_token_map(z.mean(1), x, head_list, n, ds, layer, step, keys, who)
    scale, note = _token_scale(z, n)
    gap = _label_room(x)  # under each row its token names, then the next row's title
    top, area = 130 + 34 * note.count("<sub>"), 200 * rows + gap * (rows - 1)
    fig, cols = _head_subplots(head_list, cols, [f"head {h}" for h in head_list], vertical_spacing=gap / area)
    for i, h in enumerate(head_list):
        fig.add_trace(go.Heatmap(z=_round(z[i]), x=x, y=[int(q) for q in mass.query_frame.values],
                                 coloraxis="coloraxis", name=f"head {h}",
                                 hovertemplate="query frame %{y}<br>token %{x}<br>mass %{z:.4g}<extra>head "
                                               + str(h) + "</extra>"), row=i // cols + 1, col=i % cols + 1)
    _label_axes(fig, rows, cols, "prompt token", "query frame")
    fig.update_xaxes(type="category", tickangle=-60, showticklabels=True, dtick=1,  # (each head's tokens, all of
                     tickfont=dict(size=10))  # them, named under it)
    fig.update_layout(
        title=f"cross_mass · layer {layer} · {metrics.step_label(ds, step)} · {keys}<br><sub>{who}</sub>{note}",
        coloraxis=dict(**scale, colorbar=dict(title=ds["cross_mass"].attrs.get("units", ""))),
        height=top + area + gap + 30, width=min(1200, max(700, panel * cols + 160)),
        margin=dict(t=top, b=gap + 30),
    )
    return fig


def _label_room(x: list[str]) -> int:
    """Pixels under a token axis for its names rotated -60 degrees (6 px a character of 10 px type) and 50 more
    (an axis title, or the next row's panel title)."""
    return int(6 * max(len(s) for s in x) * 0.87) + 50


def _token_scale(z: np.ndarray, n: int) -> tuple[dict, str]:
    """The colour scale of cross_tokens and what its subtitle says of it: the tokens' own (z[..., :n]; the summed
    padding, often most of the mass, would flatten them), ending at their 99th percentile when a few cells stand
    far above it (one cell of 0.9 left every other head dark), so that the rest keep their contrast."""
    scale = _colour("cross_mass", z[..., :n])
    cells = z[..., :n][np.isfinite(z[..., :n])]
    notes = []
    if cells.size:
        top, p99 = float(cells.max()), float(np.percentile(cells, 99))
        if p99 > 0 and top > 1.5 * p99:
            scale["cmax"] = p99
            notes.append(f"the colour scale ends at the tokens' 99th percentile ({p99:.3g}); "
                         f"{int((cells > p99).sum())} cells above it, up to {top:.3g}, saturate")
    if z.shape[-1] > n and np.nanmax(z[..., n:], initial=0) > scale["cmax"]:
        notes.append("the padding column (summed) saturates too" if notes else
                     "the colour scale is the tokens'; the padding column (summed) saturates above it")
    if z.shape[-1] == n:  # (no padding column: the prompt filled the encoder's text length)
        notes.append(f"the prompt fills all {n} text tokens: any words past them were cut (as Wan2.1 cuts them)")
    return scale, "".join(f"<br><sub>{text}</sub>" for text in notes)


def _cross_token_map(z: np.ndarray, x: list[str], head_list: list[int], n: int, ds: xr.Dataset, layer: int,
                     step: int, keys: str, who: str) -> go.Figure:
    """cross_tokens' one-panel form: z [head, token column], the mean over query frames; a row per head."""
    scale, note = _token_scale(z, n)
    fig = go.Figure(go.Heatmap(z=_round(z), x=x, y=[f"head {h}" for h in head_list], coloraxis="coloraxis",
                               hovertemplate="%{y}<br>token %{x}<br>mass %{z:.4g}<extra></extra>"))
    width = min(1200, max(700, 14 * len(x) + 260))
    every = max(1, math.ceil(14 * len(x) / (width - 260)))  # (a name every 14 px at most: they overlap closer)
    fig.update_xaxes(type="category", tickangle=-60, title_text="prompt token", dtick=every, tickfont=dict(size=10))
    fig.update_yaxes(type="category", autorange="reversed")
    title = wrap_title(f"cross_mass · layer {layer} · {metrics.step_label(ds, step)} · {keys}, mean over query "
                       "frames", width)
    top = 110 + 22 * title.count("<br>") + 34 * note.count("<sub>")
    labels = _label_room(x)  # (the names and the axis title under them)
    thinned = f"<br><sub>one token in {every} named (hover for each)</sub>" if every > 1 else ""
    fig.update_layout(
        title=f"{title}<br><sub>{who}</sub>{note}{thinned}",
        coloraxis=dict(**scale, colorbar=dict(title=ds["cross_mass"].attrs.get("units", ""))),
        height=top + 22 * len(head_list) + 60 + labels, width=width, margin=dict(t=top + 34 * (every > 1), b=labels),
    )
    return fig


def key_token_maps(
    ds: xr.Dataset,
    token_layer: int,
    *,
    query_frame: int,
    step: int = 0,
    sample: str | None = None,
    head: int | None = None,
    cols: int = 7,
    within_frame: bool = False,
    frames: np.ndarray | None = None,
) -> go.Figure:
    """Where inside each key frame one query frame's self-attention lands (`attn_key_token`): an image of the latent
    grid (token rows x columns) per key frame it attended, one colour scale; each image sums to that key frame's
    `attn_mass` (in its title). `within_frame=True` divides each image by that mass, so that it sums to 1: where
    inside a frame the attention lands, for frames of little mass too (beside a sink frame of most of it, they
    look flat otherwise). One `head`, or the mean over heads (None); averaged over samples unless a `sample` is
    named. `frames` draws each key frame's picture under its map, the map half transparent, so that one sees what
    the attended tokens show (a token covers H / rows x W / columns pixels): uint8 [key_frame, H, W, 3], one
    picture per latent frame (`studies.report.key_frame_pictures`), or the sample's whole video [1 + 4 (F - 1), H,
    W, 3] (read from its mp4), of which latent frame f's picture is pixel frame 4f, the last it decodes to. Pictures
    are one sample's: name it (`sample`) when the store holds several."""
    ds = metrics.attention_store(ds)
    metrics.require_var(ds, "attn_key_token")
    have = [int(t) for t in ds.token_layer.values]
    if metrics.one(token_layer, "token layer") not in have:
        raise WorkbenchError(f"token layer {token_layer!r} is not in the store; it has token layers {have}")
    queries = [int(f) for f in ds.query_frame.values]
    if metrics.one(query_frame, "query frame") not in queries:
        raise WorkbenchError(f"query frame {query_frame!r} is not in the store; it has {queries[0]}-{queries[-1]}")
    sub = metrics.select(ds, sample=sample, step=metrics.one(step, "step"))
    data = sub["attn_key_token"].astype(np.float64).sel(token_layer=token_layer, query_frame=query_frame)
    data = data.mean("sample").isel(step=0)  # [head, key_token]
    data = data.mean("head") if head is None else _pick_heads(data, [metrics.one(head, "head")]).sel(head=head)
    h, w = int(ds["key_token_h"].max()) + 1, int(ds["key_token_w"].max()) + 1
    per_frame = data.values.reshape(-1, h, w)  # [key_frame, h, w]: key_token = f * h * w + row * w + col
    if frames is not None:
        # (the VAE's frame rule, where the viewer reads it; imported here: it imports torch, which figures need not)
        from workbench.view.sources import pixel_span

        frames = np.asarray(frames)
        F, T = per_frame.shape[0], pixel_span(per_frame.shape[0] - 1)[1]  # latent frames, the pixel frames of them
        if sample is None and sub.sizes["sample"] > 1:
            raise WorkbenchError(f"frames are one sample's pictures and the maps a mean over {sub.sizes['sample']} "
                                 "samples: name the sample (sample=...)")
        whole = frames.ndim == 4 and frames.shape[0] == T and F > 1  # (a whole video: latent frame f's last)
        if whole:
            frames = frames[[pixel_span(f)[1] - 1 for f in range(F)]]
        if frames.ndim != 4 or frames.shape[0] != F or frames.shape[-1] != 3 \
                or frames.shape[1] % h or frames.shape[2] % w:
            raise WorkbenchError(f"frames of shape {tuple(frames.shape)} do not fit the store's key frames: want "
                                 f"[{F}, H, W, 3] (one picture per latent frame) or the whole video [{T}, H, W, 3], "
                                 f"with H a multiple of {h} token rows and W of {w} token columns")
        sy, sx = frames.shape[1] // h, frames.shape[2] // w  # pixels per token
    seen = [f for f in range(per_frame.shape[0]) if np.isfinite(per_frame[f]).any()]
    if not seen:  # (a grid of no panels divided by zero)
        raise WorkbenchError(f"attn_key_token of token layer {token_layer}, query frame {query_frame}, step {step} "
                             "is NaN everywhere: the attention was not finite (the rollout's activations overflowed)")
    rows, cols = _grid(len(seen), cols)
    frame_mass = np.array([np.nansum(per_frame[f]) for f in range(per_frame.shape[0])])  # [key_frame]
    titles = [f"frame {f}: {frame_mass[f]:.3f}" for f in seen]
    if within_frame:
        with np.errstate(invalid="ignore", divide="ignore"):
            per_frame = per_frame / np.where(frame_mass > 0, frame_mass, np.nan)[:, None, None]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles,
                        horizontal_spacing=0.02, vertical_spacing=min(0.08, 0.4 / rows))
    for i, f in enumerate(seen):
        place = dict(row=i // cols + 1, col=i % cols + 1)
        cells = {}
        if frames is not None:  # the picture, then the map over it: token (r, c) covers pixels r*sy.., c*sx..
            fig.add_trace(go.Image(z=frames[f], hoverinfo="skip", name=f"frame {f}"), **place)
            cells = dict(x0=(sx - 1) / 2, dx=sx, y0=(sy - 1) / 2, dy=sy, opacity=0.55)
        fig.add_trace(go.Heatmap(z=_round(per_frame[f]), coloraxis="coloraxis", name=f"key frame {f}",
                                 customdata=np.indices((h, w)).transpose(1, 2, 0), **cells,
                                 hovertemplate="row %{customdata[0]}, column %{customdata[1]}<br>mass %{z:.4g}"
                                               "<extra>key frame " + str(f) + "</extra>"), **place)
    fig.update_yaxes(autorange="reversed", showticklabels=False)  # (row 0 at the top, as the video's)
    fig.update_xaxes(showticklabels=False, constrain="domain")
    for k in range(1, len(seen) + 1):  # square latent cells: each panel's y axis scaled to its x axis
        fig.layout[f"yaxis{k if k > 1 else ''}"].update(scaleanchor=f"x{k if k > 1 else ''}", constrain="domain")
    fig.update_annotations(font_size=12)
    heads = "mean over heads" if head is None else f"head {head}"
    sums = ("each divided by that key frame's attn_mass (in its title): shares of the frame's mass, summing to 1"
            if within_frame else "each summing to that key frame's attn_mass (in its title)")
    if frames is not None:
        sums += "; over each key frame's picture" + (" (latent frame f: pixel frame 4f, the last it decodes to)"
                                                      if whole else "")
    panel = max(80, min(180, 1000 // cols))  # (the figure within the report's 1200 px column, colour bar included)
    width = panel * cols + 200
    # (the subtitle in lines that fit the figure: plotly clips a long one at its edge; ~6.6 px a character at <sub>)
    note = wrap_title(f"{samples_label(sub, sample)}; an image per key frame (latent rows x columns), {sums}", width,
                      px_per_char=6.6)
    extra = 16 * note.count("<br>")
    height = int(panel * h / w) * rows + 70 * rows + 140 + extra
    fig.update_layout(
        title=dict(text=f"attn_key_token · layer {token_layer} · {heads} · query frame {query_frame} · "
                        f"{metrics.step_label(ds, step)}<br><sub>{note.replace('<br>', '</sub><br><sub>')}</sub>",
                   y=1 - 28 / height, yref="container", yanchor="top"),  # (its top line in the figure, not cut)
        coloraxis=dict(**_colour("attn_key_token", per_frame),
                       colorbar=dict(title="share of <br>the frame" if within_frame
                                     else ds["attn_key_token"].attrs.get("units", ""))),
        height=height, width=width, margin=dict(t=110 + extra),
    )
    return fig


# ------------------------------------------------------------------------------------------ overviews
MIN_MAP_ROWS_PX = 220  # plot height of a layer x head map, at least: room for a colour bar or legend on one layer


def wrap_title(text: str, width_px: int, px_per_char: float = 9.0) -> str:
    """A figure title broken into lines (plotly's <br>) at spaces, so that none runs past `width_px` (plotly
    clips a long title at the figure's edge); `px_per_char` is the title font's mean advance (17 px font). Each
    broken line keeps its space (" <br>"): the title's text, copied or read aloud, was "from thequery"."""
    limit = max(20, int((width_px - 120) / px_per_char))  # less the left margin
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > limit:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return " <br>".join(lines + [line])


def _map_height(layers: int, per_layer: int = 28) -> int:
    """Figure height of a layer x head map: a row per layer, never so short that its colour bar is squashed."""
    return 140 + max(MIN_MAP_ROWS_PX, per_layer * layers) + 80


def _needs_dims(da, dims: tuple[str, ...], who: str) -> None:
    """A clear error unless `da` is a DataArray with exactly `dims` (in any order)."""
    want = f"an xarray DataArray with dims ({', '.join(dims)})"
    if not isinstance(da, xr.DataArray):
        raise WorkbenchError(f"{who} needs {want}, got {type(da).__name__}")
    extra, missing = [d for d in da.dims if d not in dims], [d for d in dims if d not in da.dims]
    if extra or missing:
        raise WorkbenchError(f"{who} needs {want}; it has {da.dims}: "
                             + (f"select or average {extra} first" if extra else f"it lacks {missing}"))


def _layer_head(da: xr.DataArray) -> xr.DataArray:
    _needs_dims(da, ("layer", "head"), "a layer x head map")
    return da.transpose("layer", "head")


def selection_label(da: xr.DataArray) -> str:
    """What a metric of `metrics.head_metrics` holds, from its coords and attrs: the step it was taken at (with its
    t and CFG branch), the samples and the query frames it averages ('' when it records none of these)."""
    parts = []
    if "step" in da.coords and da["step"].ndim == 0:
        t = f"t={metrics.timestep_text(da['timestep'])}" if "timestep" in da.coords and da["timestep"].ndim == 0 else ""
        cfg = str(da["cfg"].values) if "cfg" in da.coords and da["cfg"].ndim == 0 else "none"
        extra = ", ".join(x for x in (t, "" if cfg == "none" else cfg) if x)
        parts.append(f"step {int(da['step'])}" + (f" ({extra})" if extra else ""))
    samples = list(da.attrs.get("samples", []))
    if samples:
        parts.append(f"sample {samples[0]}" if len(samples) == 1 else f"mean of {len(samples)} samples")
    frames = [int(f) for f in da.attrs.get("query_frames", [])]
    if frames:
        contiguous = frames == list(range(frames[0], frames[-1] + 1))
        parts.append(f"query frames {frames[0]}-{frames[-1]}" if contiguous and len(frames) > 1
                     else f"query frame{'s' if len(frames) > 1 else ''} {', '.join(map(str, frames))}")
    return " · ".join(parts)


def layer_head_map(da: xr.DataArray, *, title: str | None = None, colorscale: str | None = None,
                   zmin: float | None = None, zmax: float | None = None, text: bool = True) -> go.Figure:
    """Layer x head heatmap of a metric (dims layer, head), values written in the cells when `text`; the default
    title names the metric and what it holds (step, samples, query frames: `selection_label`)."""
    what = selection_label(da)
    da = _layer_head(da)
    name = da.attrs.get("long_name", da.name or "value")
    units = da.attrs.get("units", "")
    if (zmin is None) != (zmax is None):  # plotly ignores a lone zmin or zmax: fill the other end from the data
        finite = da.values[np.isfinite(da.values)]
        if finite.size:
            zmin = float(finite.min()) if zmin is None else zmin
            zmax = float(finite.max()) if zmax is None else zmax
            zmin, zmax = min(zmin, zmax), max(zmin, zmax)
    fig = go.Figure(go.Heatmap(
        z=_round(da.values), x=[str(int(h)) for h in da["head"].values], y=[str(int(x)) for x in da.layer.values],
        colorscale=colorscale or "Viridis", zmin=zmin, zmax=zmax, colorbar=dict(title=f"{units}"),
        texttemplate="%{z:.3f}" if text else None,  # (3 places: 0.846 is not the 0.85 of a threshold)
        hovertemplate="layer %{y}<br>head %{x}<br>%{z:.4g}<extra></extra>",
    ))
    fig.update_xaxes(title_text="head", type="category")
    fig.update_yaxes(title_text="layer", type="category")
    width = max(640, 60 * da.sizes["head"] + 220)
    sub = f"<br><sub>{what}</sub>" if what and not title else ""
    fig.update_layout(title=wrap_title(title or f"{da.name or name}: {name}", width) + sub,
                      height=_map_height(da.sizes["layer"]) + (20 if sub else 0), width=width)
    return fig


def taxonomy_map(classes: xr.DataArray, *, title: str = "head classes") -> go.Figure:
    """Layer x head map of head classes (sink, local, global, deep_sink, mixed; no_values where a head's attention
    was not finite), one colour each, named in a legend (one entry per class, so the names never crowd each other,
    however few layers there are; no_values only where a head has it)."""
    classes = _layer_head(classes)
    names = list(CLASS_COLOURS)
    code = np.vectorize(lambda c: names.index(str(c)))(classes.values)
    n = len(names)
    scale = []
    for i, name in enumerate(names):
        scale += [[i / n, CLASS_COLOURS[name]], [(i + 1) / n, CLASS_COLOURS[name]]]
    fig = go.Figure(go.Heatmap(
        z=code, x=[str(int(h)) for h in classes["head"].values], y=[str(int(x)) for x in classes.layer.values],
        text=classes.values.astype(str), texttemplate="%{text}", colorscale=scale, zmin=-0.5, zmax=n - 0.5,
        showscale=False, hovertemplate="layer %{y}<br>head %{x}<br>%{text}<extra></extra>",
    ))
    shown = [c for c in names if c != "no_values" or bool((classes == c).any())]  # (no_values: only when there)
    for name in shown:  # legend entries only: a marker of each class colour, no data
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, showlegend=True, hoverinfo="skip",
                                 marker=dict(symbol="square", size=14, color=CLASS_COLOURS[name])))
    fig.update_xaxes(title_text="head", type="category")
    fig.update_yaxes(title_text="layer", type="category")
    width = max(640, 70 * classes.sizes["head"] + 220)
    text = wrap_title(title, width)
    fig.update_layout(title=text, height=_map_height(classes.sizes["layer"]) + 24 * text.count("<br>"),
                      margin=dict(t=80 + 24 * text.count("<br>")), width=width, legend=dict(title="class"))
    return fig


DIFF_FLOOR = 1e-3  # compare_maps' difference scale spans at least this fraction of the largest |value| drawn


def compare_maps(a: xr.DataArray, b: xr.DataArray, *, names: tuple[str, str] = ("A", "B"),
                 title: str | None = None, zmin: float | None = None, zmax: float | None = None,
                 colorscale: str = "Viridis", dmax: float | None = None) -> go.Figure:
    """A metric (dims layer, head) for two stores and the difference B - A, stacked (A, B, B - A from the top);
    A and B share one colour scale, the difference a symmetric red-blue one. Only the layers and heads both hold
    are drawn; the title says so when either holds more. `zmin`, `zmax`, `colorscale`: A and B's scale (default:
    the smallest to the largest value drawn, Viridis); `dmax`: the difference's scale runs from -dmax to dmax, so
    that several comparisons can share scales (default: the largest |B - A|, but at least `DIFF_FLOOR` of the
    largest |A| or |B|: rounding-sized differences of two nearly equal stores stay white, not filling the scale)."""
    given = dict(zip("AB", (_layer_head(a), _layer_head(b))))
    a, b = xr.align(given["A"], given["B"], join="inner")
    if not a.size:
        layers = {side: [int(v) for v in x.layer.values] for side, x in given.items()}
        raise WorkbenchError(f"compare_maps: A and B share no (layer, head); A has layers {layers['A']}, "
                             f"B {layers['B']}")
    left = [f"{side}'s {dim}s {sorted(gone)}" for side, x in given.items() for dim in ("layer", "head")
            if (gone := {int(v) for v in x[dim].values} - {int(v) for v in a[dim].values})]
    diff = b - a
    x = [str(int(h)) for h in a["head"].values]
    y = [str(int(v)) for v in a.layer.values]
    tags = [name if name == letter or name.startswith(f"{letter}: ") else f"{letter}: {name}"
            for letter, name in zip("AB", names)]  # panel titles; the colour bars say only A, B and B - A
    finite = diff.values[np.isfinite(diff.values)]
    top = float(np.abs(finite).max()) if finite.size else 0.0  # (the colour scale's end: it says how small a change is)
    both = np.concatenate([a.values.ravel(), b.values.ravel()])
    both = both[np.isfinite(both)]
    floor = DIFF_FLOOR * float(np.abs(both).max()) if both.size else 0.0
    end = dmax or max(top, floor) or 1.0
    said = f"largest |B - A|: {top:.3g}" + (f"; the colours span ±{end:.3g}" if end != top else "")
    fig = make_subplots(rows=3, cols=1, subplot_titles=[tags[0], tags[1], f"B - A ({said})"],
                        vertical_spacing=0.12)
    for row, (z, axis) in enumerate([(a, "coloraxis"), (b, "coloraxis"), (diff, "coloraxis2")], start=1):
        fig.add_trace(go.Heatmap(z=_round(z.values), x=x, y=y, coloraxis=axis, texttemplate="%{z:.3f}",
                                 hovertemplate="layer %{y}<br>head %{x}<br>%{z:.4g}<extra></extra>"), row=row, col=1)
        fig.update_xaxes(title_text="head" if row == 3 else None, type="category", row=row, col=1)
        fig.update_yaxes(title_text="layer", type="category", row=row, col=1)
    width = max(600, min(1300, 62 * a.sizes["head"] + 260))
    note = f"<br><sub>not drawn, in one store only: {'; '.join(left)}</sub>" if left else ""
    # what each side averages (head_metrics' attrs): once if the same, else both (a bidirectional store's default
    # rows are every frame, a causal one's the last chunk)
    picked = [selection_label(given[side]) for side in "AB"]
    if any(picked):
        note += (f"<br><sub>{picked[0]}</sub>" if picked[0] == picked[1] else
                 f"<br><sub>A: {picked[0] or 'not recorded'}</sub><br><sub>B: {picked[1] or 'not recorded'}</sub>")
    text = wrap_title(title or str(a.attrs.get("long_name", a.name or "metric")), width) + note
    units = f"<br>[{a.attrs['units']}]" if a.attrs.get("units") else ""
    lines = text.count("<br>")  # (each line more pushes the plots down: the first panel's title stays clear of it)
    fig.update_layout(  # (the title from the top down, its lines above the first panel's title)
        title=dict(text=text, y=1, yref="container", yanchor="top", pad=dict(t=14)), margin=dict(t=84 + 26 * lines),
        coloraxis=dict(colorscale=colorscale,
                       cmin=zmin if zmin is not None else float(both.min()) if both.size else 0,
                       cmax=zmax if zmax is not None else float(both.max()) if both.size else 1,
                       colorbar=dict(y=0.68, len=0.62, title="A, B" + units)),
        coloraxis2=dict(colorscale="RdBu_r", cmin=-end, cmax=end,
                        colorbar=dict(y=0.14, len=0.3, title="B - A" + units)),
        height=3 * (max(120, 26 * a.sizes["layer"]) + 110) + 80 + 24 * lines, width=width,
    )
    return fig


def recency_lines(profile: xr.DataArray, *, title: str | None = None) -> go.Figure:
    """One line per head of a recency profile (dims head, distance; select layer/step/sample first). Distances
    reached only by sink frames (the profile's `sink_only` coordinate, a rolling window's), or else only by the
    first chunk's frames (`first_chunk_only`), are shaded and their points drawn open: there the line is the sink's
    or the first frames' mass, not attention that far back in general."""
    _needs_dims(profile, ("head", "distance"), "recency_lines")
    profile = profile.dropna("distance", how="all")  # e.g. future distances of a causal store
    distances = [int(d) for d in profile.distance.values]
    marked = next((c for c in ("sink_only", "first_chunk_only") if c in profile.coords), None)
    sink_only = [bool(s) for s in profile[marked].values] if marked else [False] * len(distances)
    label = {"sink_only": "sink keys only", "first_chunk_only": "first-chunk keys only"}.get(marked, "")
    fig = go.Figure()
    for i, h in enumerate(profile["head"].values):
        y = profile.sel(head=h)
        style = _head_style(i, profile.sizes["head"])
        fig.add_trace(go.Scatter(x=distances, y=_round(y.values), mode="lines+markers", name=f"head {int(h)}",
                                 connectgaps=False, line=dict(color=style["color"], dash=style["dash"]),
                                 marker=dict(color=style["color"], symbol=[style["symbol"] + ("-open" if s else "")
                                                                           for s in sink_only])))
    runs = [d for i, d in enumerate(distances) if sink_only[i] and (i == 0 or not sink_only[i - 1])]
    for start in runs:  # each run of sink-only distances, shaded, the first one labelled
        end = start
        while end + 1 in distances and sink_only[distances.index(end + 1)]:
            end += 1
        fig.add_vrect(x0=start - 0.5, x1=end + 0.5, fillcolor="grey", opacity=0.15, line_width=0, layer="below")
        if start == runs[0]:  # (its name above the plot, ending at the band's right edge: inside, it sat on a line)
            fig.add_annotation(x=end + 0.5, xref="x", xanchor="right", y=1, yref="paper", yanchor="bottom",
                               text=label, showarrow=False, font=dict(size=11, color="#555"))
    fig.update_xaxes(title_text="distance = query frame - key frame (frames)")
    # (from 0, as the other line figures of masses: an autorange from the smallest mass made a flat profile, a
    # bidirectional head's, look like a strong preference)
    fig.update_yaxes(title_text=f"mean attention mass [{profile.attrs.get('units', 'probability')}]",
                     rangemode="tozero")
    if (y_range := _fixed_range(profile)) is not None:
        fig.update_yaxes(range=y_range)
    fig.update_layout(title=title or "recency profile", height=420, width=800)
    return fig


UNIT_INTERVAL = ("probability", "ratio")  # units of metrics in [0, 1] by definition


def _fixed_range(da: xr.DataArray) -> list[float] | None:
    """The y range of a metric in [0, 1] (units probability or ratio): from 0 to its largest value (at least 0.05,
    at most 1), so that float32 rounding of a constant (a bidirectional store's own-chunk mass is 1 everywhere) is
    never stretched into a signal while small masses keep their detail; None (plotly's autorange) for other units."""
    if da.attrs.get("units") not in UNIT_INTERVAL:
        return None
    finite = np.asarray(da.values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    top = 1.05 * min(1.0, max(float(finite.max()) if finite.size else 1.0, 0.05))
    return [-0.02 * top, top]


def metric_by_query_frame(rows: xr.DataArray, *, title: str | None = None) -> go.Figure:
    """A row metric (dims head, query_frame; select the rest first) against the query frame, one line per head."""
    _needs_dims(rows, ("head", "query_frame"), "metric_by_query_frame")
    fig = go.Figure()
    for i, h in enumerate(rows["head"].values):
        y = rows.sel(head=h)
        fig.add_trace(go.Scatter(x=[int(q) for q in y.query_frame.values], y=_round(y.values), mode="lines+markers",
                                 name=f"head {int(h)}", **_head_line(i, rows.sizes["head"])))
    fig.update_xaxes(title_text="query frame")
    fig.update_yaxes(title_text=f"{rows.name} [{rows.attrs.get('units', '')}]", range=_fixed_range(rows))
    fig.update_layout(title=title or f"{rows.name}: {rows.attrs.get('long_name', '')}", height=420, width=800)
    return fig


def metric_by_step(da: xr.DataArray, *, title: str | None = None) -> go.Figure:
    """A head metric (dims step, head; select the rest first) across steps, one line per head; the x axis lists
    each step with its timestep (and phase / CFG branch when not a plain denoising step)."""
    _needs_dims(da, ("step", "head"), "metric_by_step")
    labels = []
    for s in da.step.values:
        t = float(da["timestep"].sel(step=s)) if "timestep" in da.coords else float("nan")
        tags = [str(da[c].sel(step=s).values) for c in ("phase", "cfg") if c in da.coords]
        tags = [x for x in tags if x not in ("denoise", "none")]
        labels.append(f"{int(s)} · t={metrics.timestep_text(t)}" + (f" ({', '.join(tags)})" if tags else ""))
    fig = go.Figure()
    for i, h in enumerate(da["head"].values):
        fig.add_trace(go.Scatter(x=labels, y=_round(da.sel(head=h).values), mode="lines+markers", name=f"head {int(h)}",
                                 **_head_line(i, da.sizes["head"])))
    fig.update_xaxes(title_text="step · timestep", type="category")
    fig.update_yaxes(title_text=f"{da.name} [{da.attrs.get('units', '')}]", range=_fixed_range(da))
    fig.update_layout(title=title or f"{da.name} across steps", height=420, width=800)
    return fig
