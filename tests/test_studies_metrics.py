"""studies.metrics on stores with planted heads (studies.synthetic): every expected value is worked out by hand
from the planted distributions, for 21 frames in chunks of 3 (last chunk = query frames 18, 19, 20)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import xarray as xr

from studies import load_store, metrics, synthetic
from workbench.errors import WorkbenchError

F = 21  # frames


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    return load_store(synthetic.write_store(tmp_path_factory.mktemp("m") / "causal.zarr", "causal"))


@pytest.fixture(scope="module")
def window(tmp_path_factory):
    return load_store(synthetic.write_store(tmp_path_factory.mktemp("m") / "window.zarr", "window"))


@pytest.fixture(scope="module")
def bidirectional(tmp_path_factory):
    return load_store(synthetic.write_store(tmp_path_factory.mktemp("m") / "bidi.zarr", "bidirectional"))


def head_of(role: str, layer: int = 0) -> int:
    return next(h for h in range(4) if synthetic.planted_role(layer, h) == role)


def test_synthetic_store_follows_the_spec(causal, window, bidirectional):
    assert causal.attrs["schema_version"] == 1
    assert causal["attn_mass"].dims == ("sample", "step", "layer", "head", "query_frame", "key_frame")
    np.testing.assert_allclose(causal["timestep"].values, [1000, 937.5, 833.3333, 625, 0], rtol=1e-6)
    assert [str(p) for p in causal["phase"].values] == ["denoise"] * 4 + ["context"]
    assert list(causal["denoise_index"].values) == [0, 1, 2, 3, -1]
    assert [str(c) for c in bidirectional["cfg"].values] == ["cond", "uncond"] * 8
    assert list(causal["query_chunk"].values) == [f // 3 for f in range(F)]
    assert str(causal.sample.values[0]) == "p0000-s42"
    for ds in (causal, window, bidirectional):
        assert metrics.row_sum_error(ds) < 1e-6
        assert metrics.nan_pattern_mismatches(ds) == 0
        assert metrics.logit_nan_matches_mass(ds)
    # block-causal staircase: query frame 4 (chunk 1) attends key frames 0..5, not 6..20
    row = causal["attn_mass"].isel(sample=0, step=0, layer=0, head=0).sel(query_frame=4).values
    assert np.isfinite(row[:6]).all() and np.isnan(row[6:]).all()
    # window of 9 frames with a 3-frame sink: query frame 20 keeps 0, 1, 2 and 15..20
    row = window["attn_mass"].isel(sample=0, step=0, layer=0, head=0).sel(query_frame=20).values
    assert list(np.flatnonzero(np.isfinite(row))) == [0, 1, 2, 15, 16, 17, 18, 19, 20]
    assert not bidirectional["attn_mass"].isnull().any()


@pytest.mark.parametrize("variant", ["causal", "window", "bidirectional"])
def test_taxonomy_recovers_planted_roles(variant, causal, window, bidirectional):
    ds = {"causal": causal, "window": window, "bidirectional": bidirectional}[variant]
    classes = metrics.classify_heads(metrics.head_metrics(ds))
    for layer in (0, 1):
        for head in range(4):
            assert str(classes.sel(step=0, layer=layer, head=head).values) == synthetic.planted_role(layer, head)
    assert set(np.unique(classes.values.astype(str))) == set(synthetic.HEAD_ROLES)  # the same at every step


def test_a_deep_sink_head_is_not_global_for_its_entropy():
    """A head spread over the oldest frames has a high normalised entropy once mixed with noise; it was classed
    global (the rule came first) though it keeps most of its mass on the oldest half."""
    ds = synthetic.make_dataset("causal", layers=tuple(range(8)), num_heads=4, noise=0.3)
    hm = metrics.head_metrics(ds).sel(step=0)
    classes = metrics.classify_heads(hm)
    planted = lambda role: [(l, h) for l in range(8) for h in range(4) if synthetic.planted_role(l, h) == role]  # noqa: E731
    both = [(l, h) for l, h in planted("deep_sink")
            if float(hm.entropy_norm.sel(layer=l, head=h)) >= 0.85 and float(hm.early_mass.sel(layer=l, head=h)) >= 0.6]
    assert len(both) >= 4  # (of 8: the noise lifts their entropy past the global rule's threshold)
    assert all(str(classes.sel(layer=l, head=h).values) == "deep_sink" for l, h in planted("deep_sink"))
    assert all(str(classes.sel(layer=l, head=h).values) == "global" for l, h in planted("global"))  # still global


def test_sink_and_chunk_masses_by_hand(causal):
    rows = metrics.row_metrics(causal).isel(sample=0, step=0, layer=0)
    chunk = np.arange(F) // 3
    sink, local, glob = head_of("sink"), head_of("local"), head_of("global")
    np.testing.assert_allclose(rows.sink_mass.sel(head=sink), 1.0, atol=1e-6)
    np.testing.assert_allclose(rows.sink_mass.sel(head=local).values, (np.arange(F) == 0).astype(float), atol=1e-6)
    # uniform over the 3 (c + 1) frames of chunks 0..c
    np.testing.assert_allclose(rows.sink_mass.sel(head=glob), 1 / (3 * (chunk + 1)), rtol=1e-5)
    np.testing.assert_allclose(rows.sink_chunk_mass.sel(head=glob), 1 / (chunk + 1), rtol=1e-5)
    np.testing.assert_allclose(rows.own_chunk_mass.sel(head=glob), 1 / (chunk + 1), rtol=1e-5)
    np.testing.assert_allclose(rows.own_chunk_mass.sel(head=local), 1.0, atol=1e-6)
    np.testing.assert_allclose(rows.n_attended.sel(head=glob), 3 * (chunk + 1))
    np.testing.assert_allclose(rows.uniform_mass.sel(head=local), 1 / (3 * (chunk + 1)))  # (whatever the head does)


def test_mean_distance_and_entropy_by_hand(causal):
    rows = metrics.row_metrics(causal).isel(sample=0, step=2, layer=0)
    qf = np.arange(F)
    end = 3 * (qf // 3) + 2  # last frame of the query's chunk
    sink, local, glob, deep = (head_of(r) for r in ("sink", "local", "global", "deep_sink"))
    np.testing.assert_allclose(rows.mean_distance.sel(head=sink), qf, atol=1e-5)  # everything on frame 0
    np.testing.assert_allclose(rows.mean_distance.sel(head=local), 0, atol=1e-6)
    np.testing.assert_allclose(rows.mean_distance.sel(head=glob), qf - end / 2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rows.entropy.sel(head=glob), np.log(end + 1), rtol=1e-5)
    np.testing.assert_allclose(rows.entropy_norm.sel(head=glob), 1.0, rtol=1e-5)
    np.testing.assert_allclose(rows.entropy.sel(head=sink), 0.0, atol=1e-6)
    # deep sink, last chunk: uniform over frames 0..8 -> ln 9 nats, ln 9 / ln 21 normalised, mean distance qf - 4
    last = rows.sel(head=deep, query_frame=[18, 19, 20])
    np.testing.assert_allclose(last.entropy, math.log(9), rtol=1e-5)
    np.testing.assert_allclose(last.entropy_norm, math.log(9) / math.log(21), rtol=1e-5)
    np.testing.assert_allclose(last.mean_distance, [14, 15, 16], rtol=1e-5)
    np.testing.assert_allclose(last.early_mass, 1.0, rtol=1e-5)  # frames 0..8 are among the oldest 11 of 21
    np.testing.assert_allclose(rows.mean_abs_distance.sel(head=sink), qf, atol=1e-5)  # frame 0 is never ahead
    ahead = (end - qf) * (end - qf + 1) / 2  # the global head also sees its chunk's later frames
    np.testing.assert_allclose(rows.mean_abs_distance.sel(head=glob), (qf * (qf + 1) / 2 + ahead) / (end + 1),
                               rtol=1e-5)


def test_mean_abs_distance_of_a_bidirectional_row_by_hand(bidirectional):
    """Attention that looks both ways: the signed mean distance cancels, the absolute one says how far it looks."""
    rows = metrics.row_metrics(bidirectional).isel(sample=0, step=0, layer=0)
    mass = bidirectional.attn_mass.isel(sample=0, step=0, layer=0).values.astype(np.float64)  # [head, q, k]
    m = np.nan_to_num(mass)
    d = np.arange(mass.shape[1])[:, None] - np.arange(mass.shape[2])[None, :]
    want = (m * np.abs(d)).sum(-1) / m.sum(-1)  # [head, q]
    np.testing.assert_allclose(rows.mean_abs_distance.values, want, rtol=1e-5)
    glob = head_of("global")
    qf = np.arange(F)
    np.testing.assert_allclose(rows.mean_abs_distance.sel(head=glob), (qf * (qf + 1) / 2 + (F - 1 - qf) * (F - qf) / 2)
                               / F, rtol=1e-5)  # uniform over all 21 frames: the mean of |q - k| over k
    assert float(abs(rows.mean_distance.sel(head=glob, query_frame=10))) < 1e-5  # centred: the signed mean is 0


def test_head_metrics_average_the_last_chunk(causal):
    hm = metrics.head_metrics(causal)
    assert hm.attrs["query_frames"] == [18, 19, 20]
    assert set(hm.dims) == {"step", "layer", "head"}
    glob = head_of("global")
    at = hm.sel(step=0, layer=0, head=glob)
    assert float(at.sink_mass) == pytest.approx(1 / 21, rel=1e-5)
    # |query - key| < 3 with keys 0..20: 5 frames for qf 18, 4 for 19, 3 for 20 -> mean 4/21
    assert float(at.local_mass) == pytest.approx(4 / 21, rel=1e-5)
    assert float(at.mean_distance) == pytest.approx(np.mean([8, 9, 10]), rel=1e-5)
    per_sample = metrics.head_metrics(causal, average_samples=False)
    assert "sample" in per_sample.dims
    assert metrics.query_frames_for(causal, "history") == list(range(3, F))
    assert metrics.query_frames_for(causal, [0, 5]) == [0, 5]


def test_recency_profile_by_hand(causal, bidirectional):
    prof = metrics.recency_profile(causal).isel(sample=0, step=0, layer=0)
    sink, local = head_of("sink"), head_of("local")
    d = np.arange(0, F)
    # sink head: of the 21 - d query frames with distance d available, only qf = d puts its mass there
    np.testing.assert_allclose(prof.sel(head=sink, distance=d), 1 / (F - d), rtol=1e-5)
    # without key frame 0 the sink head puts nothing anywhere else, and distance 20 (only frame 0) has no pair
    no_sink = metrics.recency_profile(causal, exclude_key_frames=[0]).isel(sample=0, step=0, layer=0)
    np.testing.assert_allclose(no_sink.sel(head=sink, distance=d[:-1]), 0.0, atol=1e-7)
    assert np.isnan(no_sink.sel(distance=F - 1)).all()
    np.testing.assert_allclose(no_sink.sel(head=local), prof.sel(head=local).where(prof.distance < F - 1), atol=1e-7)
    np.testing.assert_allclose(prof.sel(head=local, distance=0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(prof.sel(head=local, distance=d[1:]), 0.0, atol=1e-7)
    # within a chunk a query sees up to 2 frames ahead, never 3
    assert np.isfinite(prof.sel(distance=[-2, -1]).values).all()
    assert np.isnan(prof.sel(distance=slice(None, -3)).values).all()
    # bidirectional global head: uniform 1/21 at every distance
    prof_b = metrics.recency_profile(bidirectional).isel(sample=0, step=0, layer=0)
    np.testing.assert_allclose(prof_b.sel(head=head_of("global")), 1 / 21, rtol=1e-5)
    # query_frames picks the rows from a Dataset and from its attn_mass alike
    last = metrics.recency_profile(causal, query_frames="last_chunk")
    assert last.identical(metrics.recency_profile(causal.attn_mass, query_frames="last_chunk"))
    assert not last.identical(metrics.recency_profile(causal.attn_mass))


def test_recency_profile_names_the_distances_only_sink_frames_reach(window, causal):
    prof = metrics.recency_profile(window)
    pairs = window.attn_mass.isel(sample=0, step=0, layer=0, head=0).notnull().values  # [query_frame, key_frame]
    sink = int(window.sink_size[0])
    expected = []
    for d in prof.distance.values:  # by hand: the key frames attended at distance d
        keys = [k for q in range(F) for k in range(F) if q - k == d and pairs[q, k]]
        expected.append(bool(keys) and max(keys) < sink)
    assert prof.sink_only.values.tolist() == expected
    # the window of 9 keeps frames 0-2 and the 6 newest: past 5 frames back only the sink frames are left
    assert prof.distance.values[prof.sink_only.values].tolist() == list(range(6, F))
    assert "sink_only" not in metrics.recency_profile(causal).coords  # no window: frame 0 is a frame like any other
    assert "first_chunk_only" not in prof.coords  # (a window's sink frames are the marking there)
    first = metrics.recency_profile(causal)  # no window: the far distances reach the first chunk's frames only
    assert first.distance.values[first.first_chunk_only.values].tolist() == [F - 3, F - 2, F - 1]
    # a window that holds every frame evicts nothing: its far distances are frames like any other, not the sink's
    whole = synthetic.make_dataset("window", local_attn_size=F, sink_size=3)
    assert (whole.attn_mass.notnull() | (whole.key_frame > whole.query_frame)).all()  # every past frame attended
    assert "sink_only" not in metrics.recency_profile(whole).coords


def test_window_counts_evicted_frames_as_not_attended(window):
    rows = metrics.row_metrics(window).isel(sample=0, step=0, layer=0).sel(query_frame=[18, 19, 20])
    glob, deep = head_of("global"), head_of("deep_sink")
    np.testing.assert_allclose(rows.n_attended.sel(head=glob), 9)
    np.testing.assert_allclose(rows.sink_mass.sel(head=glob), 1 / 9, rtol=1e-5)
    np.testing.assert_allclose(rows.entropy.sel(head=glob), math.log(9), rtol=1e-5)
    # deep sink: frames 0..8 that survive are the sink frames 0, 1, 2
    np.testing.assert_allclose(rows.sink_chunk_mass.sel(head=deep), 1.0, rtol=1e-5)
    np.testing.assert_allclose(rows.entropy_norm.sel(head=deep), math.log(3) / math.log(9), rtol=1e-5)


def test_thresholds_are_parameters(causal):
    hm = metrics.head_metrics(causal)
    sink = head_of("sink")
    default = metrics.classify_heads(hm).sel(step=0, layer=0, head=sink)
    assert str(default.values) == "sink"
    # switch the sink rule off: frame 0 is the oldest attended frame, so the head reads as a deep sink
    strict = metrics.classify_heads(hm, metrics.TaxonomyThresholds(sink_min=1.01)).sel(step=0, layer=0, head=sink)
    assert str(strict.values) == "deep_sink"
    nothing = metrics.TaxonomyThresholds(sink_min=1.01, local_min=1.01, global_min_entropy=1.01, deep_min=1.01)
    assert set(np.unique(metrics.classify_heads(hm, nothing).values.astype(str))) == {"mixed"}
    with pytest.raises(WorkbenchError, match="sink_min"):
        metrics.TaxonomyThresholds(sink_min=-0.1)


def test_noise_keeps_the_classes(tmp_path):
    ds = load_store(synthetic.write_store(tmp_path / "noisy.zarr", "causal", noise=0.2, seeds=(1, 2, 3)))
    classes = metrics.classify_heads(metrics.head_metrics(ds))
    for step in range(5):
        for layer in (0, 1):
            found = [str(c) for c in classes.sel(step=step, layer=layer).values]
            assert found == [synthetic.planted_role(layer, h) for h in range(4)]
    assert metrics.row_sum_error(ds) < 1e-5


def test_researchers_sink_statistic():
    assert metrics.sink_delta(np.array([3.0, 1.0, 2.0, 0.0, 9.0])) == pytest.approx(3.0 - 1.0)
    assert metrics.sink_delta(np.array([3.0, np.nan, 1.0, 9.0])) == pytest.approx(2.0)  # NaN skipped
    profile = xr.DataArray([[3.0, 1.0, 2.0, 0.0, 9.0]], dims=("head", "key_frame"))  # the last value left out
    assert float(metrics.sink_delta(profile).sel(head=0)) == pytest.approx(3.0 - 1.0)
    assert np.isnan(metrics.sink_delta(np.array([1.0, 2.0])))  # mean(v[1:-1]) of nothing
    assert np.isnan(metrics.sink_delta(xr.DataArray([1.0], dims="key_frame"))).all()


def test_researcher_stats(causal):
    stats = metrics.researcher_stats(causal, layer=0, step=0, var="attn_mass")
    sink, local, glob = head_of("sink"), head_of("local"), head_of("global")
    assert float(stats.diag_mean.sel(head=local)) == pytest.approx(1.0)
    assert float(stats.diag_mean.sel(head=sink)) == pytest.approx(1 / 21)  # only query frame 0
    assert float(stats.col0_mean.sel(head=sink)) == pytest.approx(1.0)
    assert float(stats.sink.sel(head=sink)) == pytest.approx(1.0)  # v = (1, 0, ..., 0)
    assert float(stats.sink.sel(head=glob)) == pytest.approx(0.0, abs=1e-6)  # last chunk: uniform over 21
    assert float(stats["last"].sel(head=local)) == pytest.approx(1 / 3)  # key frame 20: one of 3 query rows


def test_invariant_checks_catch_broken_stores(causal):
    ds = causal.load().copy(deep=True)
    mass = ds["attn_mass"].values
    mass[0, 0, 0, 0, 4, 10] = 0.5  # a future key frame attended, and a row no longer summing to 1
    assert metrics.nan_pattern_mismatches(ds) == 1
    assert metrics.row_sum_error(ds) == pytest.approx(0.5, rel=1e-5)


def test_bad_input_is_named(causal):
    with pytest.raises(WorkbenchError, match="sample 'p9999-s1' is not in the store"):
        metrics.select(causal, sample="p9999-s1")
    with pytest.raises(WorkbenchError, match="layer 7 is not in the store; it has layers"):
        metrics.select(causal, layer=7)
    with pytest.raises(WorkbenchError, match="query_frames 'first'"):
        metrics.query_frames_for(causal, "first")
    with pytest.raises(WorkbenchError, match=r"query frames \[30\]"):
        metrics.query_frames_for(causal, [1, 30])
    with pytest.raises(WorkbenchError, match="unknown synthetic variant"):
        synthetic.make_dataset("sideways")


def test_studies_take_a_path_or_a_dataset_and_refuse_other_kinds_of_store(tmp_path, causal):
    """A store's path works where its Dataset does; an effects store (dim intervention) or a training probe store
    (dim train_step) given to a figure or a comparison is refused, naming what to select, instead of averaged into
    nonsense; the metrics keep such a dim."""
    import xarray as xr

    from studies import compare, figures

    path = synthetic.write_store(tmp_path / "c.zarr", "causal")
    by_path = metrics.head_metrics(path)
    assert by_path.equals(metrics.head_metrics(load_store(path)))
    probes = xr.concat([causal, causal], dim="train_step").assign_coords(train_step=[0, 2])
    effects = causal.expand_dims(intervention=["baseline"])
    for store, dim in ((probes, "train_step"), (effects, "intervention")):
        for call in (lambda s: figures.head_grid(s, 0), lambda s: compare.compare_stores(s, causal),
                     lambda s: figures.last_chunk_bars(s, 0)):
            with pytest.raises(WorkbenchError, match=f"dim {dim}"):
                call(store)
    assert metrics.head_metrics(probes).sizes["train_step"] == 2  # (the probe report's per-train-step metrics)
    with pytest.raises(WorkbenchError, match="layers '0': give a list of ints"):
        compare.compare_stores(causal, causal, layers="0")
    with pytest.raises(WorkbenchError, match="expected an attention store .* got a list"):
        metrics.head_metrics([1, 2])


@pytest.mark.parametrize("n", [2, 3, 5, 21])
def test_uniform_attention_has_early_mass_one_half_for_any_number_of_frames(n):
    """The frame on the boundary of the oldest half counts by its share inside: uniform rows gave 2/3 over 3
    frames and 3/5 over 5 (at the deep_sink threshold, which now comes before global)."""
    import xarray as xr

    mass = xr.DataArray(np.full((1, n), 1 / n), dims=("query_frame", "key_frame"),
                        coords={"query_frame": [n - 1], "key_frame": np.arange(n)})
    rows = metrics.row_metrics(mass)
    assert rows.early_mass.item() == pytest.approx(0.5)
    assert metrics.row_metrics(mass, early_fraction=0.25).early_mass.item() == pytest.approx(0.25)
    oldest = mass * 0 + (np.arange(n) == 0)  # all on the oldest frame: all early
    assert metrics.row_metrics(oldest).early_mass.item() == pytest.approx(1.0)


def test_excluding_key_frames_keeps_the_markings_of_what_was_attended():
    """Key frames left out of the profile are not 'evicted': a window that holds every frame keeps its
    first_chunk_only marking (it became an all-False sink_only)."""
    whole = synthetic.make_dataset("window", local_attn_size=F, sink_size=3)
    plain = metrics.recency_profile(whole)
    without = metrics.recency_profile(whole, exclude_key_frames=[0])
    assert "sink_only" not in without.coords
    assert without.first_chunk_only.values.tolist() == plain.first_chunk_only.values.tolist()


def test_a_layer_given_as_text_and_a_misspelt_statistic_get_plain_answers(causal, tmp_path):
    """A layer as a widget or a command line gives it ("0") selects it (it was 'not in the store' of layer 0); a
    statistic's name misspelt is named as no statistic, with the ones there are (the message advised extracting
    the misspelt name); a report whose output is a folder is refused before the work."""
    from studies import figures, report

    assert metrics.select(causal, layer="0").layer.values.tolist() == [0]
    with pytest.raises(WorkbenchError, match="layer 'x': give int layers, e.g. layer=0"):
        metrics.select(causal, layer="x")
    with pytest.raises(WorkbenchError, match=r"'attn_mas' is not in this store \(\["):
        figures.head_grid(causal, 0, var="attn_mas")
    with pytest.raises(WorkbenchError, match="the store has no 'attn_key_token'"):
        figures.head_grid(causal, 0, var="attn_key_token")
    with pytest.raises(WorkbenchError, match="is a folder; give the HTML file to write"):
        report.build_report(causal, tmp_path)
    assert "fig-steps-layer0" in report.build_report(causal, tmp_path / "r.html", layer="0").read_text()


def test_a_head_within_rounding_of_uniform_attention_is_no_sink():
    """Stored masses are exact to 1e-4-1e-3 in the indicator and fused capture modes (docs/store.md): a uniform
    head of a short video (uniform_mass 11/18, above sink_min) must not turn sink on that rounding; a head clearly
    above uniform attention's share is one."""
    uniform = 11 / 18
    sink = xr.DataArray([uniform + 1e-3, uniform + 2e-2], dims="head")
    hm = xr.Dataset({"sink_mass": sink, "uniform_mass": xr.full_like(sink, uniform),
                     "local_mass": xr.full_like(sink, np.nan), "early_mass": xr.full_like(sink, 0.5),
                     "entropy_norm": xr.full_like(sink, 0.99)})
    assert list(metrics.classify_heads(hm).values) == ["global", "sink"]


def test_local_mass_is_nan_where_every_attended_frame_is_local(causal):
    """A first-chunk row attends only frames within the local window: its local_mass is undefined (NaN, not 1),
    and a head's mean over every query frame leaves those rows out rather than counting them as local."""
    rows = metrics.row_metrics(causal)
    assert bool(rows.local_mass.sel(query_frame=[0, 1, 2]).isnull().all())
    assert bool(rows.local_mass.sel(query_frame=range(3, F)).notnull().all())
    every = metrics.head_metrics(causal, query_frames="all")
    later = rows.local_mass.sel(query_frame=range(3, F)).mean(["sample", "query_frame"])
    assert np.allclose(every.local_mass, later, rtol=1e-12, atol=0)


def _heads(**columns) -> xr.Dataset:
    """Hand-made head metrics, one head per entry of each column (the others: nothing a rule takes)."""
    n = len(next(iter(columns.values())))
    base = dict(sink_mass=[0.0] * n, uniform_mass=[0.05] * n, local_mass=[0.0] * n, early_mass=[0.0] * n,
                entropy_norm=[0.0] * n)
    return xr.Dataset({name: xr.DataArray(np.array(columns.get(name, v), float), dims="head")
                       for name, v in base.items()})


@pytest.mark.parametrize("metric,edge,name", [("sink_mass", 0.5, "sink"), ("local_mass", 0.5, "local"),
                                              ("early_mass", 0.6, "deep_sink"), ("entropy_norm", 0.85, "global")])
def test_default_thresholds_by_hand(metric, edge, name):
    """Each default threshold of the taxonomy (docs: sink 0.5, local 0.5, deep_sink 0.6, global 0.85) decides
    between a head at it and one just under it."""
    hm = _heads(**{metric: [edge, edge - 0.01, edge + 0.01]})
    assert list(metrics.classify_heads(hm).values) == [name, "mixed", name]


def test_older_head_metrics_count_a_sink_above_uniform_by_n_attended():
    """Head metrics without uniform_mass (older code) hold n_attended: a sink's mass must be above 1/n of it
    (0.25 of 4 frames is uniform attention's share, no sink)."""
    hm = _heads(sink_mass=[0.25, 0.26]).drop_vars("uniform_mass")
    hm["n_attended"] = xr.DataArray([4.0, 4.0], dims="head")
    th = metrics.TaxonomyThresholds(sink_min=0.2)
    assert list(metrics.classify_heads(hm, th).values) == ["mixed", "sink"]


def test_default_local_window_is_three_frames_without_the_chunk_size(causal):
    plain = causal.attn_mass.copy()
    plain.attrs = {k: v for k, v in plain.attrs.items() if k != "num_frame_per_block"}
    assert metrics.default_local_window(plain) == 3
    assert metrics.row_metrics(plain).attrs["local_window"] == 3


def test_frame_profile_is_the_nan_skipping_mean_over_the_chosen_rows(window):
    """frame_profile (the researchers' last_block_frame_attention) averages each key frame over the query rows
    that attend it: evicted cells (NaN) are skipped, not turned into NaN columns."""
    got = metrics.frame_profile(window, query_frames="all")
    values = window.attn_mass.astype(np.float64).values  # [sample, step, layer, head, query_frame, key_frame]
    axis = window.attn_mass.dims.index("query_frame")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (a key frame no chosen row attends: its mean is NaN)
        want = np.nanmean(values, axis=axis)
    assert np.allclose(got.values, want, equal_nan=True, rtol=1e-12, atol=0)
    assert bool(got.notnull().any()) and bool(window.attn_mass.isnull().any())


def test_rows_that_do_not_sum_to_one_are_normalised_for_entropy_and_distance():
    """A row whose stored masses do not sum to 1 (key frames left out of a selection): its entropy and mean
    distance are those of the normalised row ([0.2, 0.2] -> ln 2, entropy_norm 1, distance 1.5)."""
    mass = xr.DataArray(np.array([[[0.2, 0.2, np.nan]]]), dims=("sample", "query_frame", "key_frame"),
                        coords={"query_frame": [2], "key_frame": [0, 1, 2]})
    rows = metrics.row_metrics(mass, local_window=1)
    assert rows.entropy.item() == pytest.approx(math.log(2), rel=1e-12)
    assert rows.entropy_norm.item() == pytest.approx(1.0, rel=1e-12)
    assert rows.mean_distance.item() == pytest.approx(1.5, rel=1e-12)


def test_the_frame_after_the_sink_frames_is_no_sink_frame():
    """sink_only marks the distances where every attended key is one of the sink_size sink frames (key frame <
    sink_size): frame 1 of a one-frame sink, attended far back, is not a sink's."""
    one = synthetic.make_dataset("window", sink_size=1)
    mass = one.attn_mass.copy()
    mass.loc[dict(query_frame=F - 1, key_frame=1)] = 0.01  # (frame 1, attended 19 frames back)
    prof = metrics.recency_profile(one.assign(attn_mass=mass))
    assert not bool(prof.sink_only.sel(distance=F - 2)) and bool(prof.sink_only.sel(distance=F - 1))


def test_researcher_stats_by_hand():
    """researcher_stats against numpy on a window store without sink frames (frame 0 evicted from later rows:
    col0_mean averages the rows that attended it, as the fork's "non-zero column-0 mean"): diag, col0, and the
    last chunk's profile v's first, mid = mean(v[1:-1]), last = v[-1], sink = first - mid."""
    ds = synthetic.make_dataset("window", sink_size=0, noise=0.3)  # (noise: no two key frames alike)
    assert bool(ds.attn_mass.sel(key_frame=0, query_frame=F - 1).isnull().all())  # (frame 0 evicted there)
    for var in ("attn_mass", "attn_logit"):
        got = metrics.researcher_stats(ds, layer=0, step=0, var=var)
        x = ds[var].sel(layer=0, step=0).astype(np.float64).values  # [sample, head, query_frame, key_frame]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            full = np.nanmean(x, axis=0)  # [head, query_frame, key_frame]
            diag = np.nanmean(np.diagonal(full, axis1=1, axis2=2), axis=-1)
            col0 = np.nanmean(full[:, :, 0], axis=1)
            v = np.nanmean(np.nanmean(x[:, :, F - 3 :, :], axis=2), axis=0)  # [head, key_frame]
            mid = np.nanmean(v[:, 1:-1], axis=1)
        for name, want in (("diag_mean", diag), ("col0_mean", col0), ("first", v[:, 0]), ("mid", mid),
                           ("last", v[:, -1]), ("sink", v[:, 0] - mid)):
            assert np.allclose(got[name].values, want, rtol=1e-9, atol=1e-12, equal_nan=True), (var, name)


def test_invariant_checks_by_hand(causal):
    """row_sum_error is |sum - 1| (rows at 0.9 are 0.1 off, not -0.1); logit_nan_matches_mass fails on one cell
    where attn_logit alone is NaN; default_step is the first denoising step, not a context pass."""
    ds = causal.load().copy(deep=True)
    ds["attn_mass"] = ds.attn_mass * 0.9
    assert metrics.row_sum_error(ds) == pytest.approx(0.1, rel=1e-5)
    assert metrics.logit_nan_matches_mass(causal)
    logit = ds["attn_logit"].values
    logit[0, 0, 0, 0, 5, 0] = np.nan  # (attended: frame 5 sees frame 0)
    assert not metrics.logit_nan_matches_mass(ds)
    phases = [str(p) for p in causal.phase.values]
    assert metrics.default_step(causal) == int(causal.step.values[phases.index("denoise")])
    assert phases[-1] == "context" and metrics.default_step(causal.sel(step=causal.step.values[-1:])) == int(
        causal.step.values[-1])


def test_a_span_of_one_frame_is_named_as_one():
    """'query frames 0-0' (a one-frame video's last chunk, a knockout of frame 0) read as a typo."""
    assert metrics.span_text("query frame", 0, 0) == "query frame 0"
    assert metrics.span_text("latent frame", 18, 20) == "latent frames 18-20"
