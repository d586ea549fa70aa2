"""Rollouts that are not finite (activations that overflowed: every row of attn_mass NaN for that sample), where a
user looks: the summary `workbench extract` prints, the checks and maps of `workbench report`, `workbench view`'s
maps, the head classes, the effects report, `export-legacy` and `workbench generate --live`. (generate, intervene and
evaluate on a diverging checkpoint: their own test files.)"""

import numpy as np

from studies import synthetic
from workbench.store import StoreWriter
from workbench.summary import summary_table


def _store(path, nan_samples):
    parts = synthetic.sample_datasets("causal", layers=(0,), num_heads=4, seeds=(0, 1))
    with StoreWriter(path, parts[0].attrs["fingerprint"], mode="overwrite") as writer:
        for i, part in enumerate(parts):
            if i in nan_samples:
                part = part.copy()
                for name in ("attn_mass", "attn_logit"):
                    part[name] = part[name] * np.nan
            writer.write(part)
    return path


def _rows(text):
    return {tuple(int(v) for v in line.split()[:2]): [float(v) for v in line.split()[2:]]
            for line in text.splitlines() if line.split()[:1] and line.split()[0].isdigit()}


def test_a_store_of_nan_attention_gets_no_table_of_zeros(tmp_path):
    """It printed 0.000 for every mass (NaN-skipped sums of nothing), nan distances, and named heads from them."""
    text = summary_table(_store(tmp_path / "n.zarr", {0, 1}))
    assert "every counted row of attn_mass is NaN" in text
    assert "most local" not in text and "0.000" not in text


def test_the_reports_checks_fail_on_rows_of_nan(tmp_path):
    """'attn_mass rows sum to 1' held (max |sum - 1| = 0) when no row held a number."""
    from studies.report import checks_table
    from workbench.store import open_store

    checks = checks_table(open_store(_store(tmp_path / "n.zarr", {0, 1}))).set_index("check")["holds"]
    assert not checks["attn_mass rows sum to 1 (max |sum - 1|)"]
    assert not checks["NaN exactly outside the expected key window (entries that differ)"]
    clean = checks_table(open_store(_store(tmp_path / "c.zarr", set()))).set_index("check")["holds"]
    assert clean["attn_mass rows sum to 1 (max |sum - 1|)"]


def test_a_diverged_sample_is_flagged_and_left_out_of_the_means(tmp_path):
    """One of two seeds diverged: its rows counted as 0 mass, halving the sink head's frame 0 share."""
    text = summary_table(_store(tmp_path / "h.zarr", {1}))
    clean = _rows(summary_table(_store(tmp_path / "c.zarr", set())))
    assert "counted rows of attn_mass are NaN" in text
    rows = _rows(text)
    for key, values in clean.items():
        np.testing.assert_allclose(rows[key], values, atol=1e-3)


def test_the_reading_never_names_a_head_of_nan():
    """numpy's argmax takes the first NaN: a head whose rows were all NaN was named the most local and widest."""
    from workbench.summary import reading

    first, same, distance = (np.array([[np.nan, v]]) for v in (0.2, 0.3, 4.0))
    text = reading([3], [0, 1], first, same, distance, uniform=0.1)
    assert "most local layer 3 head 1 (0.30" in text and "widest layer 3 head 1 (keys 4.0" in text
    assert "most drawn to frame 0: layer 3 head 1 (0.20" in text


def test_the_viewer_says_rows_of_nan_are_not_finite_not_unattended(tmp_path):
    """A diverged sample's maps were all grey, 'not attended', with nothing said: every query frame attends its own
    chunk, so a row NaN for every head is attention that was not finite."""
    from workbench.view.server import attn_payload
    from workbench.view.sources import StoreSource

    source = StoreSource(_store(tmp_path / "n.zarr", {1}))
    bad = attn_payload(source, "p0000-s1", 0, 0)
    assert bad["vmax"] is None and bad["not_finite"] == list(range(21))
    good = attn_payload(source, "p0000-s0", 0, 0)
    assert good["not_finite"] == [] and good["vmax"] > 0


def test_a_report_of_nan_key_token_maps_says_so_instead_of_failing(tmp_path):
    """`workbench report` of a diverged store with --token-layers stopped in key_token_maps (ZeroDivisionError: a
    grid of no panels)."""
    from conftest import diverging_checkpoint
    from workbench.cli import main as cli_main

    store = tmp_path / "n.zarr"
    assert cli_main(["extract", "--checkpoint", str(diverging_checkpoint(tmp_path / "d.pt")), "--layers", "3",
                     "--token-layers", "3", "--stats", "attn_mass,attn_key_token", "--frames", "3", "--seed", "0",
                     "--out", str(store), "--no-progress"]) == 0
    assert cli_main(["report", str(store), "--out", str(tmp_path / "n.html")]) == 0
    assert "Token layer 3: not drawn, every value of attn_key_token" in (tmp_path / "n.html").read_text()


def test_live_generate_of_a_diverging_model_names_the_sample_and_chunk(tmp_path, capsys):
    """It stopped with 'video contains NaN or infinite values', exit status 2 (bad input), naming nothing; generate
    without --live says which sample diverged, exit status 1."""
    from conftest import diverging_checkpoint
    from workbench.cli import main as cli_main

    status = cli_main(["generate", "--checkpoint", str(diverging_checkpoint(tmp_path / "d.pt")), "--live",
                       "--layers", "1", "--frames", "3", "--out", str(tmp_path / "live"), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "sample p0000-s0: the rollout is not finite (NaN or inf) in chunk 0" in err


def test_heads_of_nan_are_classed_no_values_not_mixed(tmp_path):
    """NaN fails every rule, so a diverged sample's heads read as mixed (in the report, its CSV and `compare`'s
    "deep_sink -> mixed"); the taxonomy map's legend names no_values only where a head has it."""
    from studies import figures, metrics
    from workbench.store import open_store

    ds = open_store(_store(tmp_path / "h.zarr", {1}))
    hm = metrics.head_metrics(ds.sel(sample=[str(ds.sample.values[1])]))
    classes = metrics.classify_heads(hm)
    assert set(np.unique(classes.values.astype(str))) == {"no_values"}
    clean = metrics.classify_heads(metrics.head_metrics(ds.sel(sample=[str(ds.sample.values[0])])))
    assert "no_values" not in set(np.unique(clean.values.astype(str)))
    legend = lambda c: [t.name for t in figures.taxonomy_map(c.isel(step=0)).data[1:]]  # noqa: E731
    assert "no_values" in legend(classes) and "no_values" not in legend(clean)


def test_an_effects_entry_that_diverged_is_named_and_its_attention_not_read_as_unchanged():
    """Its JS divergence was the NaN-skipped mean of its few finite rows: 0, "unchanged"."""
    import xarray as xr

    from studies import effects_report

    rng = np.random.default_rng(0)
    mass = rng.uniform(0.1, 1, (3, 2, 1, 1, 2, 3, 3))  # [intervention, sample, step, layer, head, qf, kf]
    mass /= mass.sum(-1, keepdims=True)
    mass[2] = mass[0]  # entry b: the baseline's attention where finite ...
    mass[2, 1, ..., 1:, :] = np.nan  # ... NaN from query frame 1 of sample 1 on
    dist = rng.uniform(0.1, 1, (3, 2, 3))
    dist[0], dist[2, 1, 1:] = 0, np.nan
    dims = ("intervention", "sample", "step", "layer", "head", "query_frame", "key_frame")
    ds = xr.Dataset(dict(latent_distance=(("intervention", "sample", "frame"), dist), attn_mass=(dims, mass)),
                    coords=dict(intervention=["baseline", "a", "b"], sample=["p0000-s0", "p0000-s1"], frame=[0, 1, 2],
                                step=[0], layer=[3], head=[0, 1], query_frame=[0, 1, 2], key_frame=[0, 1, 2]))
    assert effects_report.not_finite_entries(ds) == {"b": ["p0000-s1"]}
    change = effects_report.attention_change(ds, ["a", "b"])
    assert np.isnan(change.loc["b"].values).all() and (change.loc["a"].values > 0).all()


def test_export_legacy_keeps_rows_of_nan_and_says_so(tmp_path):
    """Their logits went to 0, "not attended", without a word."""
    import torch

    from workbench.legacy import export_legacy

    said = []
    store = _store(tmp_path / "n.zarr", {1})
    paths = export_legacy(store, tmp_path / "legacy", log=said.append)
    full = {p.parent.name: torch.load(p, weights_only=True)["full_frame_attention"] for p in paths}
    nan_sample, clean_sample = sorted(full)[1], sorted(full)[0]
    assert bool(full[nan_sample].isnan().all()) and not bool(full[clean_sample].isnan().any())
    assert any(s.startswith("note: 1 file(s) hold rows of NaN") and nan_sample in s for s in said), said
