"""studies.compare: alignment on (prompt, seed) and on timestep (not step index), Jensen-Shannon divergence in
bits against hand-computed values, ranking, and clear refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from studies import compare, load_store, metrics, synthetic
from workbench.errors import WorkbenchError


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    write = lambda name, variant, **kw: load_store(synthetic.write_store(root / f"{name}.zarr", variant, **kw))  # noqa: E731
    return {
        "sf": write("sf", "causal", seeds=(42, 7)),
        "wan": write("wan", "bidirectional", seeds=(7, 42, 3)),
        "sf_changed": write("sf_changed", "causal", seeds=(42,), roles={(0, 0): "global"}),
        "other_seed": write("other_seed", "causal", seeds=(5,)),
        "other_prompt": write("other_prompt", "causal", seeds=(42,), prompts=("A lake in the mist",)),
        "coarse": write("coarse", "bidirectional", timesteps=[1000, 990, 940, 830, 600]),
        "layers_23": write("layers_23", "causal", layers=(2, 3)),
    }


def test_steps_align_on_timestep_not_index(stores):
    c = compare.compare_stores(stores["sf"], stores["wan"])
    # few-step t = 1000, 937.5, 833.3, 625 are Wan's 8-step (shift 5) denoise indices 0, 2, 4, 6; the cond forward
    # of denoise index i is step 2i
    assert list(c.steps.step_a) == [0, 1, 2, 3]
    assert list(c.steps.step_b) == [0, 4, 8, 12]
    assert (c.steps.cfg_b == "cond").all() and (c.steps.abs_dt < 1e-3).all()
    assert list(c.unmatched_a.step) == [4]  # the context pass (t = 0) has no counterpart in Wan's sampler
    assert list(c.unmatched_b.step) == [2, 6, 10, 14]  # t = 972.2, 892.9, 750, 416.7
    assert list(c.js_bits.timestep_b.values) == pytest.approx([1000, 937.5, 833.3333, 625], rel=1e-6)
    unc = compare.compare_stores(stores["sf"], stores["wan"], cfg="uncond")
    assert list(unc.steps.step_b) == [1, 5, 9, 13]


def test_nearest_timestep_within_tolerance(stores):
    c = compare.compare_stores(stores["sf"], stores["coarse"], tolerance=20)
    # B (cond) has t = 1000, 990, 940, 830, 600 at steps 0, 2, 4, 6, 8: 937.5 -> 940 (not 990, the next index)
    assert list(c.steps.step_b) == [0, 4, 6]
    assert list(c.steps.abs_dt) == pytest.approx([0.0, 2.5, 10 / 3], abs=1e-3)
    assert list(c.unmatched_a.timestep) == pytest.approx([625.0, 0.0])  # 625 is 25 from 600
    wide = compare.compare_stores(stores["sf"], stores["coarse"], tolerance=30)
    assert list(wide.steps.step_b) == [0, 4, 6, 8]
    tight = compare.compare_stores(stores["sf"], stores["coarse"], tolerance=1)
    assert list(tight.steps.step_a) == [0]


def test_a_relative_store_is_found_from_a_folder_below(tmp_path, monkeypatch):
    """A notebook copied to nb/ next to runs/ finds runs/x.zarr; a path found nowhere says where it looked."""
    from studies import find_store

    synthetic.write_store(tmp_path / "runs" / "x.zarr", "causal")
    (tmp_path / "nb").mkdir()
    monkeypatch.chdir(tmp_path / "nb")
    assert find_store("runs/x.zarr") == tmp_path / "runs" / "x.zarr"
    assert load_store("runs/x.zarr").sizes["layer"] > 0
    said = (r"no store at 'runs/none.zarr': looked in the working directory and the folders above it and the "
            rf"repository \({tmp_path / 'nb'}, {tmp_path}")
    with pytest.raises(WorkbenchError, match=said):
        load_store("runs/none.zarr")


def test_steps_pair_one_to_one(stores):
    """A store with more steps than the other (Wan's 8 cond steps against the rollout's 4 denoise steps) pairs each
    step once: the closest pairs are taken first, the rest stay unmatched, however wide the tolerance."""
    c = compare.compare_stores(stores["wan"], stores["sf"], tolerance=400)
    assert list(c.steps.step_a) == [0, 4, 8, 12] and list(c.steps.step_b) == [0, 1, 2, 3]
    assert (c.steps.abs_dt < 1e-3).all()
    assert list(c.unmatched_a.step) == [2, 6, 10, 14]  # each within 400 of a B step, but that step is taken
    assert c.steps.step_b.is_unique and c.steps.step_a.is_unique


def test_samples_pair_on_prompt_and_seed(stores):
    c = compare.compare_stores(stores["sf"], stores["wan"])
    assert c.pair_by == "seed" and (c.pairs.seed_a == c.pairs.seed_b).all()
    assert sorted(zip(c.pairs.seed_a, c.pairs.sample_a, c.pairs.sample_b)) == [
        (7, "p0000-s7", "p0000-s7"), (42, "p0000-s42", "p0000-s42")]
    # B's third seed pairs with nothing: named, in the terminal summary and on the page
    assert (c.pairs.attrs["unpaired_a"], c.pairs.attrs["unpaired_b"]) == ([], ["p0000-s3"])
    from studies.report import compare_summary

    line = compare_summary(c, compare.rank_heads(c), "sf", "wan").splitlines()[0]
    assert "2 sample pair(s) paired by prompt and seed (not compared: 1 sample(s) of B with no partner in A " \
           "(p0000-s3)), 4 matched step(s)" in line


def test_refuses_stores_without_shared_samples(stores):
    with pytest.raises(WorkbenchError, match=r"share no \(prompt, seed\).*seed 42.*seed 5.*--pair-by prompt"):
        compare.compare_stores(stores["sf_changed"], stores["other_seed"], pair_by="seed")
    with pytest.raises(WorkbenchError, match="share no prompt.*A lake in the mist"):
        compare.compare_stores(stores["sf_changed"], stores["other_prompt"])
    with pytest.raises(WorkbenchError, match="pair_by 'sample'"):
        compare.compare_stores(stores["sf"], stores["sf"], pair_by="sample")


def test_stores_of_different_seeds_pair_by_prompt(stores):
    """No (prompt, seed) in common: every sample of A meets every sample of B of its prompt. The planted heads do
    not depend on the seed, so only the head whose role changed diverges (and by the JS of its two roles)."""
    c = compare.compare_stores(stores["sf_changed"], stores["sf"])  # seeds 42 vs 42, 7: auto pairs by seed
    assert c.pair_by == "seed" and list(c.pairs.sample_b) == ["p0000-s42"]
    c = compare.compare_stores(stores["sf_changed"], stores["other_seed"])  # seeds 42 vs 5
    assert c.pair_by == "prompt"
    assert list(zip(c.pairs.seed_a, c.pairs.seed_b)) == [(42, 5)]
    js = c.js_bits.mean("match")
    assert float(js.sel(layer=0, head=0)) > 0.1
    changed = (js.layer == 0) & (js["head"] == 0)
    assert float(abs(js.where(~changed)).max()) < 1e-9
    self_pairs = compare.compare_stores(stores["sf"], stores["sf"], pair_by="prompt")  # 2 seeds: 4 pairs
    assert self_pairs.pair_by == "prompt" and len(self_pairs.pairs) == 4
    assert float(self_pairs.js_bits.max()) < 1e-9  # planted stores do not vary with the seed


def test_refuses_when_nothing_matches(stores):
    with pytest.raises(WorkbenchError, match="no step of A is within tolerance 0.1.*B has"):
        compare.compare_stores(stores["sf"], stores["coarse"].sel(step=[2, 3]), tolerance=0.1)
    with pytest.raises(WorkbenchError, match=r"share no layer: A has layers \[0, 1\], B has \[2, 3\]"):
        compare.compare_stores(stores["sf"], stores["layers_23"])
    with pytest.raises(WorkbenchError, match="cfg"):
        compare.compare_stores(stores["sf"], stores["wan"], cfg="both")


def test_js_divergence_by_hand(stores):
    c = compare.compare_stores(stores["sf"], stores["sf_changed"])
    # layer 0 head 0: a sink (all mass on frame 0) in A, uniform over the 21 frames of the last chunk's rows in B
    m0, mk = (1 + 1 / 21) / 2, (1 / 21) / 2
    expected = 0.5 * math.log2(1 / m0) + 0.5 * ((1 / 21) * math.log2((1 / 21) / m0) + (20 / 21) * math.log2((1 / 21) / mk))
    js = c.js_bits.sel(layer=0, head=0)
    np.testing.assert_allclose(js, expected, rtol=1e-5)
    others = c.js_bits.where((c.js_bits.layer != 0) | (c.js_bits["head"] != 0))
    assert float(np.nanmax(others)) < 1e-6
    np.testing.assert_allclose(c.diff.sink_mass.sel(layer=0, head=0), 1 / 21 - 1, rtol=1e-5)
    assert str(c.class_a.sel(match=0, layer=0, head=0).values) == "sink"
    assert str(c.class_b.sel(match=0, layer=0, head=0).values) == "global"


def test_js_divergence_bounds():
    p = xr.DataArray([[1.0, 0.0, np.nan], [0.5, 0.5, np.nan]], dims=("row", "key_frame"))
    q = xr.DataArray([[0.0, 1.0, np.nan], [0.5, 0.5, np.nan]], dims=("row", "key_frame"))
    np.testing.assert_allclose(compare.js_divergence(p, q), [1.0, 0.0], atol=1e-12)


def test_rank_heads_puts_the_changed_head_first(stores):
    c = compare.compare_stores(stores["sf"], stores["sf_changed"])
    ranking = compare.rank_heads(c)  # (ranked from 1, as the report's page and CSV show it)
    assert (ranking.layer[1], ranking["head"][1]) == (0, 0) and list(ranking.index) == list(range(1, 9))
    assert len(ranking) == 8 and ranking.js_bits.is_monotonic_decreasing and ranking.index.name == "rank"
    by_sink = compare.rank_heads(c, by="sink_mass")
    assert (by_sink.layer[1], by_sink["head"][1]) == (0, 0)
    with pytest.raises(WorkbenchError, match="cannot rank by 'speed'"):
        compare.rank_heads(c, by="speed")
    with pytest.raises(WorkbenchError, match=r"match 9 is not a matched step pair; the comparison has matches \[0, "):
        compare.rank_heads(c, match=9)


def test_chunk_metrics_left_out_against_one_chunk_sampler(stores):
    c = compare.compare_stores(stores["sf"], stores["wan"])
    assert "own_chunk_mass" not in c.diff and "local_mass" in c.diff
    assert "own_chunk_mass" in compare.compare_stores(stores["sf"], stores["sf_changed"]).diff


def test_rank_heads_classes_are_those_of_the_step_averaged_metrics(stores):
    """The ranking's class columns describe the same thing as its other columns, the matched steps' average (they
    were the first matched step's: a head that is a sink at that step only was listed as a sink beside averages)."""
    c = compare.compare_stores(stores["sf"], stores["sf_changed"])
    assert c.metrics_a.sizes["match"] >= 4
    before = str(c.class_a.sel(match=1, layer=1, head=1).values)
    assert before != "sink"
    sink = c.metrics_a.sink_mass.copy()
    sink.loc[dict(match=0, layer=1, head=1)] = 1.0  # a sink at the first matched step only
    c.metrics_a = c.metrics_a.assign(sink_mass=sink)
    c.class_a = metrics.classify_heads(c.metrics_a)
    assert str(c.class_a.sel(match=0, layer=1, head=1).values) == "sink"
    row = compare.rank_heads(c).set_index(["layer", "head"]).loc[(1, 1)]
    assert row.class_a == before
    assert compare.rank_heads(c, match=0).set_index(["layer", "head"]).loc[(1, 1)].class_a == "sink"


def test_means_over_steps_leave_the_context_passes_out(stores):
    """The ranking, classes and maps average the matched denoising steps: a context pass (t = 0, clean frames
    written into the cache) is another kind of forward (docs/store.md), and mixed in it made compare call heads
    other classes than the report and the extract summary did."""
    c = compare.compare_stores(stores["sf"], stores["sf_changed"])
    phases = list(c.steps["phase"])
    assert "context" in phases and "denoise" in phases
    denoise = [m for m, p in enumerate(phases) if p == "denoise"]
    assert compare.averaged_matches(c) == denoise
    js = c.js_bits.sel(match=denoise).mean("match")
    table = compare.rank_heads(c).set_index(["layer", "head"])
    for (layer, head), row in table.iterrows():
        assert row.js_bits == pytest.approx(float(js.sel(layer=layer, head=head)), abs=1e-12)
    context = c.metrics_a.sink_mass.copy()
    context.loc[dict(match=phases.index("context"))] = 1.0  # every head a sink at the context pass alone
    c.metrics_a = c.metrics_a.assign(sink_mass=context)
    ours = compare.mean_classes(c)[0]
    assert (ours == metrics.classify_heads(c.metrics_a.sel(match=denoise).mean("match"))).all()
    kept = compare.over_steps(c, c.metrics_a.sink_mass)
    np.testing.assert_array_equal(kept.values, c.metrics_a.sink_mass.sel(match=denoise).mean("match").values)
    assert float((c.metrics_a.sink_mass.mean("match") - kept).max()) > 0.1  # (what averaging it in would add)
    assert compare.over_steps_words(c) == f"mean of {len(denoise)} matched denoising steps"
    assert compare.over_steps_words(c, short=False).endswith("denoising steps, not the 1 context pass")


def test_a_note_says_when_one_side_attends_frames_the_other_cannot(stores):
    """A bidirectional store's queries before the video's end attend frames after their chunk, which a causal store
    never sees: compared there (--query-frames all), the divergences are mostly that, and a note says how much; on
    the last chunk both attend the same frames and no note is made."""
    every = compare.compare_stores(stores["wan"], stores["sf"], query_frames="all")
    note = next(n for n in every.notes if n.startswith("A puts "))
    share = float(note.split()[2].rstrip("%")) / 100
    a = stores["wan"].attn_mass.sel(sample=list(every.pairs.sample_a), step=list(every.steps.step_a))
    unseen = stores["sf"].attn_mass.isel(sample=0, step=0).isnull()  # (by hand: the causal side's unattended keys)
    future = a.where(unseen)
    assert share == pytest.approx(float(future.sum("key_frame").mean()), abs=0.006)  # (printed as a whole percent)
    assert "the divergences include that; --query-frames last_chunk compares" in note
    assert not any(n.startswith(("A puts", "B puts")) for n in compare.compare_stores(stores["wan"], stores["sf"]).notes)


def test_the_ranking_and_the_mean_classes_agree(stores):
    c = compare.compare_stores(stores["wan"], stores["sf"])
    ranking = compare.rank_heads(c).set_index(["layer", "head"])
    class_a, class_b = compare.mean_classes(c)
    for (layer, head), row in ranking.iterrows():
        assert (row.class_a, row.class_b) == (str(class_a.sel(layer=layer, head=head).values),
                                              str(class_b.sel(layer=layer, head=head).values))


def test_a_store_without_attn_mass_is_named_not_a_key_error(tmp_path):
    """The comparison reads attn_mass: a store extracted without it (e.g. --stats attn_logit, or a plugin's
    statistic alone) is refused naming the store and its statistics (a KeyError came out of the alignment)."""
    a = load_store(synthetic.write_store(tmp_path / "a.zarr", "causal"))
    b = a.drop_vars("attn_mass")
    with pytest.raises(WorkbenchError, match=r"store B has no attn_mass \(its statistics: \['attn_logit', "
                       r"'cross_mass'\]\): the comparison reads it"):
        compare.compare_stores(a, b)


def test_frame_pair_figures_name_a_statistic_without_key_frames(tmp_path):
    """A head grid, step slider or last-chunk profile draws [query_frame, key_frame]: a statistic per query frame
    only (attn_frame_entropy, a plugin's) is refused naming its dims and the figures that draw it (an
    AttributeError on key_frame came out)."""
    from studies import figures

    ds = load_store(synthetic.write_store(tmp_path / "a.zarr", "causal"))
    ds["per_frame"] = ds.attn_mass.sum("key_frame")
    for draw in (figures.head_grid, figures.step_slider, figures.last_chunk_bars):
        with pytest.raises(WorkbenchError, match=r"per_frame has dims \('sample', 'step', 'layer', 'head', "
                           r"'query_frame'\): draw it with figures.metric_by_query_frame"):
            draw(ds, int(ds.layer.values[0]), var="per_frame")
    assert figures.head_grid(ds, int(ds.layer.values[0])).data  # (attn_mass as before)


def test_a_note_names_the_statistics_chosen_besides_the_defaults(tmp_path):
    """The comparison reads attn_mass only: statistics a run chose besides the defaults (cross_mass, a plugin's)
    are named with the side that holds them, so that nobody takes the page for a comparison of them."""
    a = load_store(synthetic.write_store(tmp_path / "a.zarr", "causal"))
    b = a.copy()
    b["per_frame"] = b.attn_mass.sum("key_frame")
    b.attrs["stats"] = [*a.attrs["stats"], "per_frame"]
    notes = [n for n in compare.compare_stores(a, b).notes if n.startswith("not compared")]
    assert notes == ["not compared: cross_mass (both), per_frame (B only); the comparison reads attn_mass only (open a "
                     "store with studies.load_store to read the others)"]
    plain = a.drop_vars("cross_mass")
    plain.attrs["stats"] = ["attn_mass", "attn_logit"]
    assert not any(n.startswith("not compared") for n in compare.compare_stores(plain, plain).notes)


def test_js_divergence_normalises_each_row_and_leaves_empty_rows_out():
    """Rows are normalised first ([0.2, 0.2] is [0.5, 0.5]: JS 0, as with a row of key frames left out), and a row
    with no mass on one side is NaN, not a divergence."""
    p = xr.DataArray([[0.2, 0.2], [np.nan, np.nan], [0.3, 0.0]], dims=("row", "key_frame"))
    q = xr.DataArray([[0.5, 0.5], [1.0, 0.0], [0.0, 0.6]], dims=("row", "key_frame"))
    got = compare.js_divergence(p, q).values
    assert got[0] == pytest.approx(0.0, abs=1e-12) and np.isnan(got[1]) and got[2] == pytest.approx(1.0, abs=1e-12)


def test_a_step_exactly_tolerance_away_is_matched(stores):
    """|t_A - t_B| <= tolerance: 625 and 600, 25 apart, match at tolerance 25 and not at 24.9."""
    steps, _, _ = compare.match_steps(stores["sf"], stores["coarse"], tolerance=25)
    assert 625.0 in list(steps.timestep_a)
    steps, _, _ = compare.match_steps(stores["sf"], stores["coarse"], tolerance=24.9)
    assert 625.0 not in list(steps.timestep_a)


def test_pairs_and_rows_are_compared_each_with_its_own_and_averaged(tmp_path):
    """Samples that differ (noise): a store against itself diverges nowhere (each sample of A meets its own in B,
    not another), and js_bits is the mean over sample pairs and query rows of each row's divergence (not their
    largest), checked against the rows by hand."""
    a = synthetic.make_dataset("causal", seeds=(42, 7, 3), noise=0.3)
    b = synthetic.make_dataset("causal", seeds=(42, 7, 3), noise=0.3, roles={(0, 0): "global"})
    itself = compare.compare_stores(a, a)
    assert float(abs(itself.js_bits).max()) < 1e-12
    c = compare.compare_stores(a, b)
    rows = [int(f) for f in c.query_frames]
    per_row = compare.js_divergence(a.attn_mass.sel(query_frame=rows), b.attn_mass.sel(query_frame=rows))
    want = per_row.sel(step=c.steps.step_a.tolist()).mean(["sample", "query_frame"]).values
    assert np.allclose(c.js_bits.values, want, rtol=1e-9, atol=1e-12)
    assert float(c.js_bits.max()) > 0.01


def test_steps_match_only_within_their_phase_and_are_listed_in_a_order(stores):
    """A context pass (t = 0) does not pair with a denoising step of the same timestep, and the matches are listed
    in the order of A's steps whatever their distances (the closest pairs are taken first)."""
    a = stores["sf"]
    relabelled = a.assign_coords(phase=("step", ["denoise"] * a.sizes["step"]))
    steps, unmatched_a, _ = compare.match_steps(a, relabelled)
    assert list(steps.step_a) == [0, 1, 2, 3] and list(unmatched_a.phase) == ["context"]
    shifted = a.assign_coords(timestep=("step", a.timestep.values + np.array([10.0, 0, 0, 0, 0])))
    steps, _, _ = compare.match_steps(a, shifted)
    assert list(steps.step_a) == [0, 1, 2, 3, 4] and list(steps.abs_dt) == pytest.approx([10, 0, 0, 0, 0])


def test_both_sides_are_measured_with_a_window_and_rows_of_undefined_metrics_are_skipped(stores):
    """The local window is A's chunk size (B's only when A has none), the same for both sides; rows whose metric
    is undefined (local_mass of first-chunk rows) are skipped in the means, not turned into NaN heads."""
    a = stores["sf"].copy()
    a.attrs["num_frame_per_block"] = 4
    c = compare.compare_stores(a, stores["sf"], query_frames="all")
    assert c.metrics_a.attrs["local_window"] == 4 and c.metrics_b.attrs["local_window"] == 4
    assert bool(c.metrics_a.local_mass.notnull().all()) and bool(c.metrics_b.local_mass.notnull().all())
