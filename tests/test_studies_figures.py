"""studies.figures: every figure builds from a store on the CPU, shows the store's numbers, and labels its axes
with the store's names."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from studies import compare, figures, load_store, metrics, synthetic
from models.video import mp4_available
from workbench.errors import WorkbenchError

needs_mp4 = pytest.mark.skipif(not mp4_available(), reason="mp4 needs the video extra: pip install -e '.[video]'")


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    path = tmp_path_factory.mktemp("fig") / "causal.zarr"
    return load_store(synthetic.write_store(path, "causal", layers=(0, 3), num_heads=12, seeds=(1, 2), noise=0.1))


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    path = tmp_path_factory.mktemp("fig") / "wan.zarr"
    return load_store(synthetic.write_store(path, "bidirectional", layers=(0, 3), num_heads=12, seeds=(1, 2)))


def axis_titles(fig, axis: str) -> set[str]:
    """The titles of every x (or y) axis of the figure's subplots."""
    return {fig.layout[k].title.text for k in fig.layout if k.startswith(axis) and fig.layout[k].title.text}


def test_head_grid_is_the_researchers_3x4_grid(ds):
    fig = figures.head_grid(ds, 3, step=1)
    heatmaps = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert len(heatmaps) == 12
    assert [a.text for a in fig.layout.annotations] == [f"head {h}" for h in range(12)]
    assert {t.coloraxis for t in heatmaps} == {"coloraxis"}  # one shared colour scale
    assert fig.layout.coloraxis.cmin == 0
    assert fig.layout.yaxis.autorange is None or fig.layout.yaxis.autorange is True  # origin lower: not reversed
    assert axis_titles(fig, "xaxis") == {"key frame"} and axis_titles(fig, "yaxis") == {"query frame"}
    # rows 3 x cols 4: the last head sits on the 12th subplot axes
    assert heatmaps[-1].xaxis == "x12"
    expected = ds["attn_mass"].sel(layer=3, step=1, head=5).mean("sample").values
    np.testing.assert_allclose(np.array(heatmaps[5].z, dtype=float), expected, atol=1e-6)  # NaN kept as a gap
    assert "layer 3" in fig.layout.title.text and "t=937.5" in fig.layout.title.text


def test_head_grid_of_logits_is_symmetric_red_blue(ds):
    fig = figures.head_grid(ds, 0, var="attn_logit", sample="p0000-s2")
    assert fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax
    assert fig.layout.coloraxis.colorscale[0][1] == "rgb(5,48,97)"  # RdBu_r starts dark blue
    assert "p0000-s2" in fig.layout.title.text


def test_last_chunk_bars_carry_the_sink_statistic(ds):
    fig = figures.last_chunk_bars(ds, 0, step=0)
    bars = [t for t in fig.data if isinstance(t, go.Bar)]
    assert len(bars) == 12 and len([t for t in fig.data if isinstance(t, go.Scatter)]) == 12
    assert "sink_delta = v[0] - mean(v[1:-1])" in fig.layout.title.text
    assert "query frames 18-20" in fig.layout.title.text
    v = ds["attn_mass"].sel(layer=0, step=0, query_frame=[18, 19, 20]).mean(["sample", "query_frame"])
    for h, (bar, title) in enumerate(zip(bars, fig.layout.annotations)):
        vh = v.sel(head=h).values
        np.testing.assert_allclose(np.array(bar.y, dtype=float), vh, atol=1e-6)
        assert title.text == f"head {h}: sink_delta = {vh[0] - vh[1:-1].mean():.3g}"
    assert axis_titles(fig, "yaxis") == {"probability"}  # the store's units (3 rows: the long name ran together)
    assert "attn_mass of the last chunk" in fig.layout.title.text


def test_the_bars_of_a_logit_profile_do_not_call_v0_a_mass(ds):
    """sink_mass (the head table's mass on frame 0) is v[0] of the attn_mass profile only: the attn_logit bars (the
    researchers' own figure, notebook 04) said '(sink_mass: v[0])' of a mean logit."""
    assert "(sink_mass: v[0])" in figures.last_chunk_bars(ds, 0, step=0).layout.title.text
    title = figures.last_chunk_bars(ds, 0, step=0, var="attn_logit").layout.title.text
    assert "sink_delta = v[0] - mean(v[1:-1])" in title and "sink_mass" not in title, title


def test_step_slider_has_one_frame_per_step(ds, wan):
    fig = figures.step_slider(ds, 0)
    assert [f.name for f in fig.frames] == ["0", "1", "2", "3", "4"]
    labels = [s.label for s in fig.layout.sliders[0].steps]
    assert labels == ["0 · t=1000", "1 · t=937.5", "2 · t=833.3", "3 · t=625", "4 · t=0"]  # (as the Steps table)
    assert "context" in fig.frames[4].layout.title.text
    assert all(f.layout.title.text.endswith("mean over 2 samples") for f in fig.frames)  # as the first title
    z = np.array(fig.frames[2].data[7].z, dtype=float)
    np.testing.assert_allclose(z, ds["attn_mass"].sel(layer=0, step=2, head=7).mean("sample").values, atol=1e-6)
    fig_w = figures.step_slider(wan, 3, heads=[0, 1], steps=[0, 1])
    assert len(fig_w.data) == 2 and "uncond" in fig_w.frames[1].layout.title.text


def test_layer_head_and_taxonomy_maps(ds):
    hm = metrics.head_metrics(ds)
    fig = figures.layer_head_map(hm.sink_mass.sel(step=0))
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    assert list(fig.data[0].y) == ["0", "3"] and len(fig.data[0].x) == 12
    np.testing.assert_allclose(np.array(fig.data[0].z, dtype=float), hm.sink_mass.sel(step=0).values, atol=1e-6)
    # the title says what the map holds: the step, the samples, the query frames averaged
    assert "<sub>step 0 (t=1000) · mean of 2 samples · query frames 18-20</sub>" in fig.layout.title.text
    one = metrics.head_metrics(ds, sample="p0000-s2", query_frames=[20])
    assert "step 1 (t=937.5) · sample p0000-s2 · query frame 20" in \
        figures.layer_head_map(one.sink_mass.sel(step=1)).layout.title.text
    classes = metrics.classify_heads(hm).sel(step=0)
    tax = figures.taxonomy_map(classes)
    assert tax.data[0].text[0][0] == synthetic.planted_role(0, 0)
    with pytest.raises(WorkbenchError, match=r"select or average \['step'\]"):
        figures.layer_head_map(hm.sink_mass)
    with pytest.raises(WorkbenchError, match=r"needs an xarray DataArray with dims \(layer, head\), got Dataset"):
        figures.layer_head_map(hm)  # (the Dataset of every metric, not one of them)
    with pytest.raises(WorkbenchError, match=r"it lacks \['layer'\]"):
        figures.layer_head_map(hm.sink_mass.sel(step=0, layer=0))
    with pytest.raises(WorkbenchError, match=r"step 99 is not in the store; it has steps \[0, 1, 2, 3, 4\]"):
        metrics.step_label(ds, 99)


def test_a_layer_head_map_from_zero_starts_at_zero():
    """plotly ignores a zmin without a zmax (the colour scale stays the data's): the effects report's map of single-head
    effects, drawn with zmin=0, coloured its smallest effect as if it were none, unlike its PNG copy (0 to the max)."""
    import xarray as xr

    da = xr.DataArray([[0.32, 0.71], [0.5, 0.36]], dims=("layer", "head"), coords={"layer": [2, 3], "head": [0, 1]},
                      name="effect", attrs={"units": "ratio"})
    trace = figures.layer_head_map(da, zmin=0).data[0]
    assert (trace.zmin, trace.zmax) == (0, 0.71)
    trace = figures.layer_head_map(-da, zmax=0).data[0]  # (the other end alone, as well)
    assert (trace.zmin, trace.zmax) == (-0.71, 0)
    trace = figures.layer_head_map(-da, zmin=0).data[0]  # (a zmin above every value: a scale still low to high)
    assert (trace.zmin, trace.zmax) == (-0.32, 0)
    trace = figures.layer_head_map(da).data[0]  # (neither: the data's range, as before)
    assert trace.zmin is None and trace.zmax is None


def test_compare_maps_show_a_b_and_difference(ds, wan):
    c = compare.compare_stores(wan, ds)
    a, b = c.metrics_a.local_mass.sel(match=0), c.metrics_b.local_mass.sel(match=0)
    fig = figures.compare_maps(a, b, names=("wan", "sf"))
    top = float(np.abs((b - a).values).max())
    assert [t.text for t in fig.layout.annotations] == ["A: wan", "B: sf", f"B - A (largest |B - A|: {top:.3g})"]
    # the colour bars' titles stay short, so that they never run into the panel titles beside them
    assert (fig.layout.coloraxis.colorbar.title.text, fig.layout.coloraxis2.colorbar.title.text) == \
        ("A, B<br>[probability]", "B - A<br>[probability]")  # (the metric's unit on both)
    np.testing.assert_allclose(np.array(fig.data[2].z, dtype=float), (b - a).values, atol=1e-6)
    assert fig.data[2].coloraxis == "coloraxis2" and fig.layout.coloraxis2.cmin == -fig.layout.coloraxis2.cmax
    assert "not drawn" not in fig.layout.title.text
    fewer = figures.compare_maps(a, b.sel(layer=[3]))  # what is not in both is not drawn, and the title says so
    assert [list(t.y) for t in fewer.data] == [["3"]] * 3
    assert "not drawn, in one store only: A's layers [0]</sub>" in fewer.layout.title.text
    # each side's rows named: a bidirectional store's default is every frame, a causal one's the last chunk
    wan_hm, sf_hm = (metrics.head_metrics(x).sel(step=0).sink_mass for x in (wan, ds))
    sides = figures.compare_maps(wan_hm, sf_hm).layout
    assert "<sub>A: step 0" in sides.title.text and "query frames 0-20</sub><br><sub>B: step 0" in sides.title.text
    same = figures.compare_maps(wan_hm, wan_hm).layout  # (each title line more: the panels further down)
    assert sides.margin.t - same.margin.t == 26 and sides.title.yanchor == "top"
    with pytest.raises(WorkbenchError, match=r"share no \(layer, head\); A has layers \[0\], B \[3\]"):
        figures.compare_maps(a.sel(layer=[0]), b.sel(layer=[3]))
    shared = figures.compare_maps(a, b, zmin=0, zmax=1, colorscale="Greys", dmax=0.5)  # scales shared by figures
    assert (shared.layout.coloraxis.cmin, shared.layout.coloraxis.cmax) == (0, 1)
    assert shared.layout.coloraxis.colorscale[0][1] == "rgb(255,255,255)"  # Greys from white
    assert (shared.layout.coloraxis2.cmin, shared.layout.coloraxis2.cmax) == (-0.5, 0.5)
    # two nearly equal stores: rounding-sized differences stay white (they filled the scale, red and blue as for
    # a real change), and the panel says how far the colours reach
    near = figures.compare_maps(a, a + 1e-7 * np.sign(np.sin(np.arange(a.size))).reshape(a.shape))
    span, scale = float(np.abs(a.values).max()) * figures.DIFF_FLOOR, near.layout.coloraxis2
    assert scale.cmax == pytest.approx(span) and scale.cmin == -scale.cmax
    assert near.layout.annotations[2].text == f"B - A (largest |B - A|: 1e-07; the colours span ±{span:.3g})"


def test_a_figure_of_one_layer_or_step_refuses_a_list(ds):
    """A list where a figure or table shows one layer or step is refused (it was cut to its first entry, and the
    title named the whole list); one head or query frame may be given as an int."""
    calls = {"head_grid layer": lambda: figures.head_grid(ds, [0, 3]),
             "head_grid step": lambda: figures.head_grid(ds, 0, step=[1, 2]),
             "last_chunk_bars": lambda: figures.last_chunk_bars(ds, [0, 3]),
             "step_slider": lambda: figures.step_slider(ds, [0, 3]),
             "researcher_stats layer": lambda: metrics.researcher_stats(ds, layer=[0, 3]),
             "researcher_stats step": lambda: metrics.researcher_stats(ds, layer=0, step=[3, 1])}
    for name, call in calls.items():
        with pytest.raises(WorkbenchError, match=r"(layer|step) \[\d, \d\]: give one (layer|step)"):
            call()
    with pytest.raises(WorkbenchError, match="layer True is not a layer"):
        metrics.select(ds, layer=True)
    assert [a.text for a in figures.head_grid(ds, 0, heads=1).layout.annotations] == ["head 1"]
    with pytest.raises(WorkbenchError, match=r"heads \[True\]: give head ids"):
        figures.head_grid(ds, 0, heads=True)  # (True == 1: it passed as head 1, then failed inside xarray)
    assert metrics.query_frames_for(ds, 5) == [5]


def test_line_figures(ds):
    prof = metrics.recency_profile(ds).isel(sample=0, step=0, layer=0)
    fig = figures.recency_lines(prof)
    assert len(fig.data) == 12 and min(fig.data[0].x) == -2  # future distances of a causal store dropped
    assert "query frame - key frame" in fig.layout.xaxis.title.text
    # the mass axis from 0 with its unit, as the other line figures of masses (an autorange began at the smallest)
    assert fig.layout.yaxis.title.text == "mean attention mass [probability]"
    assert fig.layout.yaxis.range[0] <= 0 < fig.layout.yaxis.range[1]
    bare = prof.copy()
    del bare.attrs["units"]  # (a profile computed by hand: no fixed range, the axis still from 0)
    assert figures.recency_lines(bare).layout.yaxis.range is None
    assert figures.recency_lines(bare).layout.yaxis.rangemode == "tozero"
    # no window: distances 18-20 reach only the first chunk's frames (frame 0 as a sink lifts the tail there)
    assert prof.distance.values[prof.first_chunk_only.values].tolist() == [18, 19, 20]
    assert "sink_only" not in prof.coords
    assert [(s.x0, s.x1) for s in fig.layout.shapes] == [(17.5, 20.5)]
    assert [a.text for a in fig.layout.annotations] == ["first-chunk keys only"]
    note = fig.layout.annotations[0]  # above the plot, ending at the band's edge (inside, it sat on a head's line)
    assert (note.yref, note.y, note.yanchor, note.x, note.xanchor) == ("paper", 1, "bottom", 20.5, "right")
    assert {d for d, s in zip(fig.data[0].x, fig.data[0].marker.symbol) if s == "circle-open"} == {18, 19, 20}
    # a window with sink frames: the distances only they reach shaded, their points open
    win = synthetic.make_dataset("window", layers=(0,), num_heads=2)
    wprof = metrics.recency_profile(win).isel(sample=0, step=0, layer=0)
    wfig = figures.recency_lines(wprof)
    sink_only = wprof.distance.values[wprof.sink_only.values].tolist()  # 6..20 (test_studies_metrics.py)
    assert [(s.x0, s.x1) for s in wfig.layout.shapes] == [(sink_only[0] - 0.5, sink_only[-1] + 0.5)]
    symbols = dict(zip(wfig.data[0].x, wfig.data[0].marker.symbol))
    assert {d for d, s in symbols.items() if s == "circle-open"} == set(sink_only)
    assert [a.text for a in wfig.layout.annotations] == ["sink keys only"]
    rows = metrics.row_metrics(ds).isel(sample=0, step=0, layer=0)
    assert figures.metric_by_query_frame(rows.sink_mass).layout.xaxis.title.text == "query frame"
    by_step = figures.metric_by_step(metrics.head_metrics(ds).sink_mass.isel(layer=0))
    assert list(by_step.data[0].x)[-1] == "4 · t=0 (context)"
    assert list(by_step.data[0].x)[2] == "2 · t=833.3"  # (as the Steps table, not 833.333)


def test_bad_selections_are_named(ds):
    with pytest.raises(WorkbenchError, match="layer 5 is not in the store; it has layers"):
        figures.head_grid(ds, 5)
    with pytest.raises(WorkbenchError, match="head 12 is not in the store"):
        figures.head_grid(ds, 0, heads=[12])
    with pytest.raises(WorkbenchError, match="no .attn_frame_entropy. .its stats"):
        figures.head_grid(ds, 0, var="attn_frame_entropy")


def test_head_pair_puts_two_stores_on_one_colour_scale(ds, wan):
    """One head of two stores side by side: each panel the store's own mean over samples, one colour axis whose
    top is the larger of the two maxima, panel titles naming store and step."""
    fig = figures.head_pair(wan, ds, 3, 5, step_a=0, step_b=1, names=("wan.zarr", "sf.zarr"))
    heatmaps = [t for t in fig.data if isinstance(t, go.Heatmap)]
    assert len(heatmaps) == 2 and {t.coloraxis for t in heatmaps} == {"coloraxis"}
    a = wan["attn_mass"].sel(layer=3, step=0, head=5).mean("sample").values
    b = ds["attn_mass"].sel(layer=3, step=1, head=5).mean("sample").values
    np.testing.assert_allclose(np.array(heatmaps[0].z, dtype=float), a, atol=1e-6)
    np.testing.assert_allclose(np.array(heatmaps[1].z, dtype=float), b, atol=1e-6)
    assert fig.layout.coloraxis.cmax == pytest.approx(max(np.nanmax(a), np.nanmax(b)), rel=1e-6)
    titles = [t.text for t in fig.layout.annotations]
    assert titles[0].startswith("wan.zarr<br><sub>step 0") and titles[1].startswith("sf.zarr<br><sub>step 1 (t=937.5")
    assert "layer 3 head 5" in fig.layout.title.text


def test_metrics_in_the_unit_interval_get_an_axis_from_zero(wan, ds):
    """A bidirectional store's own-chunk mass is 1 up to float32 rounding: its axis runs from 0 past 1, so the
    rounding is not drawn as a signal; small masses keep their detail (the axis ends near their maximum); metrics in
    frames keep plotly's autorange."""
    rows = metrics.row_metrics(wan).isel(sample=0, step=0, layer=0)
    lo, hi = figures.metric_by_query_frame(rows.own_chunk_mass).layout.yaxis.range
    assert lo < 0 < 1 < hi <= 1.05
    sink = metrics.row_metrics(ds).isel(sample=0, step=0, layer=0).sink_mass.sel(query_frame=slice(3, None))
    sink = sink.sel(head=sink.max("query_frame") < 0.3)  # after chunk 0, the heads with small masses on frame 0
    top = float(sink.max())
    assert sink.sizes["head"] >= 2
    assert figures.metric_by_query_frame(sink).layout.yaxis.range[1] == pytest.approx(1.05 * max(top, 0.05))
    assert figures.metric_by_query_frame(rows.mean_distance).layout.yaxis.range is None
    assert figures.metric_by_step(metrics.head_metrics(ds).entropy_norm.isel(layer=0)).layout.yaxis.range is not None


@pytest.fixture(scope="module")
def tokens_path(tmp_path_factory):
    """The embedded model's store with cross_mass and attn_key_token (layer 3), two samples of one prompt."""
    from workbench.cli import main as cli_main

    out = tmp_path_factory.mktemp("tok") / "tok.zarr"
    assert cli_main(["extract", "--layer", "3", "--steps", "0", "--frames", "6", "--seed", "0,1", "--stats",
                     "attn_mass,cross_mass,attn_key_token", "--token-layers", "3", "--out", str(out),
                     "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def tokens_store(tokens_path):
    return load_store(tokens_path)


def test_cross_tokens_shows_the_prompts_tokens_and_the_padding(tokens_store):
    ds = tokens_store
    fig = figures.cross_tokens(ds, 3, step=0)
    n = int(ds.num_tokens[0])
    words = [str(t).replace("\u2581", "") for t in ds.token.values[0][:n]]
    assert list(fig.data[0].x) == [f"{i} {w}" for i, w in enumerate(words[:-1])] + [f"{n - 1} &lt;/s&gt;", "padding"]
    mass = ds.cross_mass.sel(layer=3, step=0).mean("sample")  # [head, query_frame, text_token]
    z = np.array(fig.data[1].z, dtype=float)  # head 1
    np.testing.assert_allclose(z[:, :n], mass.sel(head=1).values[:, :n], atol=1e-6)
    np.testing.assert_allclose(z[:, n], mass.sel(head=1).values[:, n:].sum(-1), atol=1e-5)
    np.testing.assert_allclose(z.sum(-1), 1.0, atol=1e-5)  # every text key counted once
    assert "the prompt's tokens" in fig.layout.title.text and "mean over 2 sample(s) of the prompt" in \
        fig.layout.title.text
    assert fig.layout.width <= 1200 and fig.layout.coloraxis.cmax == pytest.approx(
        float(mass.values[..., :n].max()), rel=1e-5)  # (the tokens' scale: the summed padding would flatten them)
    with pytest.raises(WorkbenchError, match="cross_mass"):
        figures.cross_tokens(ds.drop_vars("cross_mass"), 3)


def test_cross_tokens_of_many_heads_is_one_head_by_token_map(ds, tokens_store):
    """Panels that would take more than three rows (12 heads, or a long prompt's one panel a row) become one
    head x token map of the mean over query frames; the small model's four heads keep their panels."""
    assert len(figures.cross_tokens(ds, 3, step=0).data) == 12  # a short prompt: 3 rows of 4 panels
    fig = figures.cross_tokens(ds, 3, step=0, cols=3)  # 4 rows
    mass = ds.cross_mass.sel(layer=3, step=0).astype(np.float64).mean("sample")  # [head, query_frame, text_token]
    n = int(ds.num_tokens[0])
    assert len(fig.data) == 1 and list(fig.data[0].y) == [f"head {h}" for h in range(12)]
    z = np.array(fig.data[0].z, dtype=float)  # [head, token]
    np.testing.assert_allclose(z[:, :n], mass.mean("query_frame").values[:, :n], atol=1e-6)
    np.testing.assert_allclose(z.sum(-1), 1.0, atol=1e-5)
    assert "mean over query frames" in fig.layout.title.text and fig.layout.height < 700
    # the synthetic prompt fills all of its store's text tokens (no padding): words past them would have been cut
    assert f"the prompt fills all {n} text tokens" in fig.layout.title.text
    assert "fills all" not in figures.cross_tokens(tokens_store, 3, step=0).layout.title.text
    assert len(figures.cross_tokens(ds, 3, step=0, cols=3, per_head=True).data) == 12
    assert len(figures.cross_tokens(tokens_store, 3, step=0).data) == 4


def test_a_prompt_in_a_title_is_shown_as_written(ds):
    """Plotly reads <b>, <br> and &...; as markup in titles: a prompt holding them is escaped, so that the title
    shows what was typed (it showed 'red' in bold and the tags gone)."""
    odd = ds.assign_coords(prompt=("sample", ['<b>red</b> & "x" <br>'] * ds.sizes["sample"]))
    title = figures.cross_tokens(odd, 3, step=0, per_head=True).layout.title.text
    assert """of the prompt '&lt;b&gt;red&lt;/b&gt; &amp; "x" &lt;br&gt;'""" in title


def test_a_few_outlying_token_cells_do_not_set_the_colour_scale(ds):
    """One cell far above the rest (a head's query frame 0 on one token) saturates instead of darkening every other
    cell; the subtitle says where the scale ends and how many cells lie above it."""
    plain = figures.cross_tokens(ds, 3, step=0, per_head=True)
    n = int(ds.num_tokens[0])
    spiked = ds.copy(deep=True)
    spiked["cross_mass"].loc[dict(layer=3, step=0, head=1, query_frame=0, text_token=0)] = 0.9  # (every sample)
    fig = figures.cross_tokens(spiked, 3, step=0, per_head=True)
    cells = np.concatenate([np.array(t.z, dtype=float)[:, :n].ravel() for t in fig.data])
    assert fig.layout.coloraxis.cmax == pytest.approx(np.percentile(cells, 99), rel=1e-5)
    assert fig.layout.coloraxis.cmax < 0.9 / 1.5
    assert "the colour scale ends at the tokens' 99th percentile" in fig.layout.title.text and "up to 0.9" in \
        fig.layout.title.text
    assert plain.layout.coloraxis.cmax == pytest.approx(cells[cells < 0.5].max(), rel=1e-5)
    assert "99th percentile" not in plain.layout.title.text


def test_key_token_maps_sum_to_the_key_frames_mass(tokens_store):
    ds = tokens_store
    fig = figures.key_token_maps(ds, 3, query_frame=5, step=0, head=1)
    mass = ds.attn_mass.sel(layer=3, step=0, head=1, query_frame=5).mean("sample")  # [key_frame]
    attended = [int(f) for f in mass.key_frame.values if np.isfinite(mass.sel(key_frame=f))]
    assert [a.text.split(":")[0] for a in fig.layout.annotations] == [f"frame {f}" for f in attended]
    assert fig.layout.width <= 1200  # (within the report's column, its colour bar too)
    for trace, f in zip(fig.data, attended):
        z = np.array(trace.z, dtype=float)  # [latent rows, columns]
        assert z.shape == (int(ds.key_token_h.max()) + 1, int(ds.key_token_w.max()) + 1)
        assert np.nansum(z) == pytest.approx(float(mass.sel(key_frame=f)), abs=1e-5)
    # within each frame: every image sums to 1 and keeps its pattern (the raw image over its frame's mass)
    shares = figures.key_token_maps(ds, 3, query_frame=5, step=0, head=1, within_frame=True)
    assert [a.text for a in shares.layout.annotations] == [a.text for a in fig.layout.annotations]
    for raw, share, f in zip(fig.data, shares.data, attended):
        z = np.array(share.z, dtype=float)
        assert np.nansum(z) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(z * float(mass.sel(key_frame=f)), np.array(raw.z, dtype=float), rtol=1e-4,
                                   atol=1e-7)
    assert shares.layout.coloraxis.cmax > fig.layout.coloraxis.cmax and "shares" in shares.layout.title.text
    with pytest.raises(WorkbenchError, match=r"token layer 2 is not in the store; it has token layers \[3\]"):
        figures.key_token_maps(ds, 2, query_frame=5)


def test_key_token_maps_subtitle_fits_the_figure(tokens_store):
    """The subtitle (what each image shows) is broken into lines that fit the figure's width: plotly clips a long one
    at the edge, and in a report it ran past the figure ("... over each key frame'")."""
    import re

    fig = figures.key_token_maps(tokens_store, 3, query_frame=5, step=0, within_frame=True)
    lines = [re.sub(r"<[^>]+>", "", x) for x in fig.layout.title.text.split("<br>")[1:]]
    assert " ".join(x.strip() for x in lines).endswith("summing to 1"), lines
    widths = [len(x.strip()) for x in lines]  # (a broken line's trailing space takes no room)
    assert all(n * 6.6 <= fig.layout.width - 120 for n in widths), (fig.layout.width, widths)


def test_key_token_maps_over_the_frames_pictures(tokens_store):
    """`frames` puts each key frame's picture under its map: the picture as an image trace, the map over it with
    each token's cell covering its pixels (16 x 16 for the embedded model's 96 x 128 video of 6 x 8 tokens)."""
    ds = tokens_store.isel(sample=[0])  # (pictures are one sample's)
    h, w = int(ds.key_token_h.max()) + 1, int(ds.key_token_w.max()) + 1
    pictures = np.random.default_rng(0).integers(0, 256, (ds.sizes["key_frame"], 16 * h, 16 * w, 3), dtype=np.uint8)
    plain = figures.key_token_maps(ds, 3, query_frame=5, step=0, head=1)
    fig = figures.key_token_maps(ds, 3, query_frame=5, step=0, head=1, frames=pictures)
    images, maps = fig.data[0::2], fig.data[1::2]
    assert len(images) == len(maps) == len(plain.data) and all(isinstance(t, go.Image) for t in images)
    for image, heat, raw, note in zip(images, maps, plain.data, fig.layout.annotations):
        f = int(note.text.split(":")[0].split()[1])
        np.testing.assert_array_equal(np.array(image.z, dtype=np.uint8), pictures[f])
        np.testing.assert_array_equal(np.array(heat.z, dtype=float), np.array(raw.z, dtype=float))
        assert (heat.x0, heat.dx, heat.y0, heat.dy) == (7.5, 16, 7.5, 16) and 0 < heat.opacity < 1
        assert (image.xaxis, image.yaxis) == (heat.xaxis, heat.yaxis)
    assert "over each key frame's picture" in fig.layout.title.text
    with pytest.raises(WorkbenchError, match=r"frames of shape \(6, 91, 128, 3\) do not fit"):
        figures.key_token_maps(ds, 3, query_frame=5, frames=pictures[:, :91])


@needs_mp4
def test_a_report_draws_the_samples_pictures_under_its_key_token_maps(tokens_path, tmp_path):
    """The report finds a sample's video as `workbench view` does (STORE/pPPPP-sS.mp4) and puts its frames under
    the key-token maps; without one it says how to make it, and a video of another run is not drawn."""
    import html
    import re
    import shlex
    import shutil

    from studies.report import build_report
    from workbench.cli import main as cli_main

    store = tmp_path / "tok.zarr"
    shutil.copytree(tokens_path, store)
    text = build_report(store, tmp_path / "none.html", sample="p0000-s0").read_text()
    hint = re.search(r"make the sample's video: `workbench (generate [^`]*)`", text).group(1)
    assert "--frames 6" in hint and "--seed 0 --out" in hint and "--stats" not in hint  # (extract's options only)
    assert "--sample ID draws one sample" in build_report(store, tmp_path / "mean.html").read_text()
    assert cli_main([*shlex.split(html.unescape(hint)), "--no-progress"]) == 0  # (the hint, followed as written)
    text = build_report(store, tmp_path / "r.html", sample="p0000-s0").read_text()
    assert "Under each map, the key frame's picture" in text and "p0000-s0.mp4" in text
    assert text.count('"type":"image"') == ds_frames(store)  # one picture per attended key frame of query frame 5
    assert cli_main(["generate", "--seed", "1", "--frames", "6", "--out", str(tmp_path / "tok"), "--no-progress"]) == 0
    # seed 1's video under seed 0's name: left out with the reason, or an error when named
    for suffix in (".mp4", ".safetensors"):
        shutil.copy(tmp_path / "tok" / f"p0000-s1{suffix}", tmp_path / "tok" / f"p0000-s0{suffix}")
    text = build_report(store, tmp_path / "other.html", sample="p0000-s0").read_text()
    assert '"type":"image"' not in text and "is not this store's sample" in text
    with pytest.raises(WorkbenchError, match="was not made by this store's run of sample p0000-s0"):
        build_report(store, tmp_path / "named.html", sample="p0000-s0", video=tmp_path / "tok" / "p0000-s0.mp4")
    with pytest.raises(WorkbenchError, match="name the video's sample with --sample"):
        build_report(store, tmp_path / "mean.html", video=tmp_path / "tok")
    (tmp_path / "one").mkdir()  # (a folder of sample p0000-s0's video only)
    shutil.copy(tmp_path / "tok" / "p0000-s1.mp4", tmp_path / "one" / "p0000-s0.mp4")
    with pytest.raises(WorkbenchError, match=r"--video .*one' holds no p0000-s1.mp4, the video of sample p0000-s1"):
        build_report(store, tmp_path / "e.html", sample="p0000-s1", video=tmp_path / "one")
    shutil.copy(tmp_path / "tok" / "p0000-s1.mp4", tmp_path / "tok.mp4")  # (STORE.mp4: no latents file to check)
    text = build_report(store, tmp_path / "u.html", sample="p0000-s1").read_text()
    assert "tok.mp4 (sample p0000-s1; not checked against the store's run: no tok.safetensors beside it" in text


def ds_frames(store) -> int:
    mass = load_store(store).attn_mass.sel(layer=3, step=0, query_frame=5).isel(sample=0, head=0)
    return int(np.isfinite(mass).sum())


def test_a_report_draws_the_token_statistics_it_has(tokens_store, tmp_path):
    from studies.report import build_report

    text = build_report(tokens_store, tmp_path / "r.html").read_text()
    assert 'id="fig-cross-layer3"' in text and 'id="fig-key-tokens-layer3"' in text
    assert "denoise) \\u00b7 every query frame" in text  # (the recency title; plotly JSON escapes the dot)
    # a store of two token layers, --layer picking one: that one's maps only (30 layers drew 30 figures)
    two = tokens_store.isel(layer=[0, 0], token_layer=[0, 0])
    two = two.assign_coords(layer=[2, 3], token_layer=[2, 3])
    text = build_report(two, tmp_path / "one.html", layer=3).read_text()
    assert 'id="fig-key-tokens-layer3"' in text and 'id="fig-key-tokens-layer2"' not in text
    assert "of layers [2], not detailed" in text
    text = build_report(two.isel(token_layer=[0]), tmp_path / "none.html", layer=3).read_text()
    assert "fig-key-tokens" not in text and "key-token maps (attn_key_token) of layers [2], not detailed" in text


def test_every_coordinate_says_what_it_is(tokens_store):
    """A store read by xarray alone names each coordinate (long_name; units where it has some), as its data
    variables (docs/store.md): an extract with every kind of coordinate (CFG's aside)."""
    ds = tokens_store
    assert {c for c in ds.coords if not ds[c].attrs.get("long_name")} == set()
    assert ds.query_frame.attrs["units"] == ds.local_attn_size.attrs["units"] == "frames"
    assert all(ds[v].attrs.get("long_name") and ds[v].attrs.get("units") for v in ds.data_vars)


@pytest.mark.parametrize("n", [4, 12, 40])
def test_every_head_of_a_layer_gets_a_line_of_its_own(n):
    """(with plotly's ten colours, the 1.3B model's heads 10 and 11 took heads 0 and 1's; with 24, the 14B's 40)"""
    styles = [tuple(figures._head_style(i, n).values()) for i in range(n)]
    assert len(set(styles)) == n


def test_the_first_heads_differ_for_a_reader_with_a_red_green_colour_deficiency():
    """Plotly's palette drew heads 0 and 3 (#636EFA, #AB63FA) in one blue under a deuteranope's or protanope's
    simulated vision. The first seven heads' colours, so simulated (Machado et al. 2009, severity 1), stay apart
    by at least 0.1 in linear RGB distance; their markers differ besides."""
    import numpy as np

    machado = {"deuteranopia": [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                                [-0.011820, 0.042940, 0.968881]],
               "protanopia": [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                              [-0.003882, -0.048116, 1.051998]]}

    def linear(colour):
        rgb = np.array([int(colour[k:k + 2], 16) / 255 for k in (1, 3, 5)])
        return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)

    colours = [figures._head_style(i, 12)["color"] for i in range(7)]
    for matrix in machado.values():
        seen = [np.clip(np.array(matrix) @ linear(c), 0, 1) for c in colours]
        gaps = [np.linalg.norm(a - b) for j, a in enumerate(seen) for b in seen[j + 1:]]
        assert min(gaps) > 0.1, (matrix, min(gaps))
    assert len({figures._head_style(i, 12)["symbol"] for i in range(7)}) == 7


def test_a_video_of_another_window_schedule_or_image_is_not_the_stores(tokens_path, tmp_path):
    """The check of a video against the store (workbench view, report) read prompt, seed, sampler and weights; a
    video that `workbench generate` made with another KV window, few-step schedule or first image passed, and the
    report drew another rollout's frames under the maps."""
    import json

    from safetensors.numpy import save_file

    from workbench.view.sources import video_mismatch

    ds = load_store(tokens_path)
    schedule = dict(denoising_step_list=[1000, 750, 500, 250], warp=True, shift=5.0, context_noise=0,
                    num_frame_per_block=3)
    base = dict(prompt=str(ds.prompt.values[0]), seed=str(int(ds.seed.values[0])), window="-1+sink0",
                schedule=json.dumps(schedule), image_sha256="")

    def why(**changed):
        save_file({"latents": np.zeros(1, np.float32)}, str(tmp_path / "v.safetensors"), metadata={**base, **changed})
        return video_mismatch(ds, str(ds.sample.values[0]), tmp_path / "v.mp4")

    assert why() is None  # (the store's own settings: extract's defaults)
    assert "window '9+sink3' (the store's: '-1+sink0')" in why(window="9+sink3")
    assert "schedule" in why(schedule=json.dumps(dict(schedule, denoising_step_list=[1000, 500])))
    assert "chunks of 3" in why(schedule=json.dumps(dict(schedule, num_frame_per_block=1)))
    assert "image_sha256" in why(image_sha256="ab" * 32)


def test_a_video_for_a_report_without_key_token_maps_is_refused(tmp_path, tokens_path):
    """--video only goes under key-token maps: a report that draws none (the store has no attn_key_token, or --layer
    leaves its token layers out) said nothing and drew nothing."""
    from studies.report import build_report

    plain = synthetic.write_store(tmp_path / "p.zarr", "causal", layers=(0,), num_heads=4)
    with pytest.raises(WorkbenchError, match="--video .* the store has no attn_key_token"):
        build_report(plain, tmp_path / "p.html", video=tmp_path / "v.mp4")
    two = load_store(tokens_path).isel(layer=[0, 0]).assign_coords(layer=[2, 3])  # (token layer 3 only)
    with pytest.raises(WorkbenchError, match=r"its key-token layers \[3\] are not among the layers shown \(\[2\]\)"):
        build_report(two, tmp_path / "t.html", layer=2, video=tmp_path / "v.mp4")


def test_pictures_from_a_whole_video_or_of_another_sample(tokens_store):
    """The obvious call, the mp4's every frame as `frames`, put pixel frame f under latent frame f (the object a
    token and more away); it takes latent frame f's own picture, pixel frame 4f. Pictures are one sample's: under a
    mean over samples they are refused."""
    ds = tokens_store.isel(sample=[0])
    F = ds.sizes["key_frame"]
    video = np.zeros((1 + 4 * (F - 1), 96, 128, 3), np.uint8)
    video[:, 0, 0, 0] = np.arange(video.shape[0])  # (each pixel frame marked with its index)
    fig = figures.key_token_maps(ds, 3, query_frame=5, step=0, frames=video)
    marks = [int(np.array(t.z)[0, 0, 0]) for t in fig.data if isinstance(t, go.Image)]
    titles = [int(a.text.split(":")[0].split()[1]) for a in fig.layout.annotations]
    assert marks == [4 * f for f in titles] and "sample p0000-s0" in fig.layout.title.text
    with pytest.raises(WorkbenchError, match="frames are one sample's pictures and the maps a mean over 2 samples"):
        figures.key_token_maps(tokens_store, 3, query_frame=5, frames=video)
    assert figures.key_token_maps(tokens_store, 3, query_frame=5, frames=video, sample="p0000-s1").data
    with pytest.raises(WorkbenchError, match=r"want \[6, H, W, 3\] .* or the whole video \[21, H, W, 3\]"):
        figures.key_token_maps(ds, 3, query_frame=5, frames=video[:20])


def test_the_generate_hint_is_made_from_the_runs_own_settings(tokens_store):
    """The hint rebuilds generate's flags from the store's resolved config (config_yaml): a Python-made store (whose
    command is no command line) of the teacher with 2 steps, a window and a sink got a hint of its prompts alone, and
    the video it made was another model's."""
    import yaml

    from workbench.view.sources import generate_command

    ds = tokens_store.copy()
    c = yaml.safe_load(ds.attrs["config_yaml"])
    c["extract"].update(model="teacher", sampler="bidirectional", num_inference_steps=2, guidance_scale=4.0,
                        local_attn_size=9, sink_size=3, checkpoint=None)
    ds.attrs.update(config_yaml=yaml.safe_dump(c), command="workbench.extract.run_extract from notebook.py")
    hint = generate_command(ds, 1, "runs/tok")
    assert hint.startswith("workbench generate --model teacher --num-inference-steps 2 --local-attn-size 9 "
                           "--sink-size 3 --frames 6 --prompt ")
    assert hint.endswith(f"--seed {int(ds.seed.values[1])} --out runs/tok") and "--sampler" not in hint  # (the zoo's)


def test_the_generate_hint_takes_a_folder_or_path_that_starts_with_a_dash(tokens_store):
    """A store named -x.zarr (relative) has its videos in -x: `--out -x` is refused by argparse ('expected one
    argument'), so such a value is written --out=-x (as a prompt that starts with '-' is); the view's note printed
    ./-x before the note took this command."""
    import shlex

    import yaml

    from workbench.cli import build_parser
    from workbench.view.sources import generate_command

    ds = tokens_store.copy()
    c = yaml.safe_load(ds.attrs["config_yaml"])
    c["extract"].update(model=None, checkpoint="-ckpt.pt")
    ds.attrs.update(config_yaml=yaml.safe_dump(c))
    hint = generate_command(ds, 0, "-x")
    assert hint.endswith("--out=-x") and "--checkpoint=-ckpt.pt" in hint, hint
    args = build_parser().parse_args(shlex.split(hint)[1:])
    assert (args.out, args.checkpoint) == ("-x", "-ckpt.pt")


def test_head_grids_take_a_colour_scale_to_share(ds):
    """Two layers' grids (or two stores') on one scale, for figures side by side in a paper: zmin, zmax and
    colorscale replace the default 0 .. largest value drawn."""
    own = figures.head_grid(ds, 0, step=0).layout.coloraxis
    fig = figures.head_grid(ds, 0, step=0, zmin=0.0, zmax=1.0, colorscale="Greys")
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == (0.0, 1.0) and own.cmax != 1.0
    assert fig.layout.coloraxis.colorscale[0][1] != own.colorscale[0][1]  # (Greys, not Viridis)
    pair = figures.head_pair(ds, ds, 0, 1, zmax=0.5)
    assert pair.layout.coloraxis.cmax == 0.5 and pair.layout.coloraxis.cmin == 0.0


def test_the_png_of_single_head_effects_names_its_colour_scale():
    """The PNG copy of a sweep's layer x head map (report's *_heads.png) labels its scale strip with the quantity and
    unit, as the page's colour bar does; it had only the numbers 0 and the largest effect."""
    import pandas as pd

    from studies.effects_report import grid_png

    grid = pd.DataFrame([[0.361, 0.321, 0.554, 0.586], [0.347, 0.711, 0.505, 0.359]], index=[2, 3], columns=range(4))
    px = np.asarray(grid_png(grid, cell=72).convert("L"))
    below_numbers = 56 + 2 * 72 + 54  # (top margin, the cells, then the strip and its numbers)
    assert (px[below_numbers:below_numbers + 20] < 128).sum() > 50  # a line of text under the strip


def test_a_wrapped_title_keeps_the_space_it_breaks_at():
    """A title broken into lines read "keys less than 3 frames from thequery" when copied or read aloud (plotly
    draws each line as its own text element): the space stays at the end of the broken line."""
    text = "local_mass: mass on keys less than 3 frames from the query (|query - key| < 3)"
    title = figures.wrap_title(text, 400)
    assert "<br>" in title and "<br>" not in title.replace(" <br>", "")
    assert title.replace(" <br>", " ") == text
