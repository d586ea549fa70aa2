"""Rollouts that are not finite (activations that overflowed: every row of attn_mass NaN for that sample), where a
user looks: the summary `workbench extract` prints, the checks and maps of `workbench report`, `workbench view`'s
maps, the head classes, the effects report, `export-legacy` and `workbench generate --live`. (generate, intervene and
evaluate on a diverging checkpoint: their own test files.)"""

import numpy as np
import pytest
import torch

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
    from studies import figures  # (called from Python, the figure refuses it by name: a grid of no panels)
    from workbench.errors import WorkbenchError
    from workbench.store import open_store

    with pytest.raises(WorkbenchError, match="NaN everywhere: the attention was not finite"):
        figures.key_token_maps(open_store(store), 3, query_frame=2)


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


def test_nonfinite_frame_is_the_first_bad_frame_of_any_sample():
    """Any sample, not all of them; the first frame, not the last (a diverging checkpoint is NaN from frame 0 on in
    every frame, so the command tests could not tell)."""
    from models.common.rollout import nonfinite_frame

    latents = torch.zeros(2, 5, 2, 3, 3)
    assert nonfinite_frame(latents) is None
    latents[1, 2, 0, 1, 1] = float("nan")
    latents[1, 4] = float("inf")
    assert nonfinite_frame(latents) == 2


def test_a_diverged_video_draws_nan_black_and_clips_inf():
    from models.video import nan_drawn_black, to_uint8_frames

    video = np.zeros((3, 2, 2, 2), np.float32)
    same, note = nan_drawn_black(video)
    assert same is video and note == ""
    video[:, 0, 0, 0], video[:, 0, 0, 1], video[:, 0, 1, 0] = np.nan, np.inf, -np.inf
    drawn, note = nan_drawn_black(video)
    assert note == " · not finite: NaN drawn black"
    pixels = to_uint8_frames(drawn)  # [T, H, W, 3]
    assert (pixels[0, 0, 0] == 0).all() and (pixels[0, 0, 1] == 255).all() and (pixels[0, 1, 0] == 0).all()


def test_a_title_whose_only_odd_character_no_font_has_keeps_pillows_font():
    """Another font is taken only where it draws more of the missing characters: one that draws none of them is
    no better than Pillow's own."""
    import shutil

    from models.video import font_for

    if not shutil.which("fc-match"):
        pytest.skip("no fc-match")
    assert not isinstance(font_for("abc \U0010fffd", 14).path, str)


@pytest.mark.parametrize("model", ["dmd.pt", "self_forcing.safetensors", "ckpts/dmd"])
def test_model_given_a_file_points_to_checkpoint(model, capsys):
    """Either sign of a path (an extension, or a slash) is enough: the repo's test gives one with both."""
    from workbench.cli import main as cli_main

    assert cli_main(["extract", "--layer", "3", "--model", model]) == 2
    assert "a checkpoint file is --checkpoint PATH" in capsys.readouterr().err


def test_the_effects_report_names_an_entry_that_diverged(tmp_path, monkeypatch, capsys):
    """Its paragraph "Not finite: under LABEL ..." was untested: an intervene run whose entry's distances are made
    NaN, as a diverged rollout stores them."""
    from studies.effects_report import build_effects_report
    from workbench.cli import main as cli_main

    spec = tmp_path / "spec.yaml"
    spec.write_text("interventions:\n  - {kind: ablate, layers: 1, heads: 0}\n")
    out = tmp_path / "e.zarr"
    assert cli_main(["intervene", "--spec", str(spec), "--frames", "3", "--world", "off", "--out", str(out),
                     "--no-progress"]) == 0
    import zarr  # make the entry's latent distances NaN, as a diverged rollout stores them

    group = zarr.open_group(str(out), mode="r+")
    dist = group["latent_distance"]
    values = dist[...]
    values[1, 0, 1:] = np.nan
    dist[...] = values
    text = build_effects_report(out, tmp_path / "e.html").read_text()
    assert "Not finite: under ablate" in text and "in sample(s) p0000-s0" in text


def test_a_report_of_an_all_nan_store_says_why_its_maps_are_not_drawn(tmp_path):
    """The "Not drawn" paragraph gave a reason read from no rows ("no row attended a key ...")."""
    from studies.report import build_report

    text = build_report(_store(tmp_path / "n.zarr", {0, 1}), tmp_path / "n.html").read_text()
    assert "every row of attn_mass is NaN: the attention was not finite" in text
    assert "no row attended a key" not in text


def test_an_image_to_video_stores_frame_0_is_not_called_not_finite(tmp_path):
    """Frame 0 of an image-to-video run has its context pass only: NaN at the denoising steps by design, not a
    rollout that overflowed."""
    import zarr

    from workbench.view.server import attn_payload
    from workbench.view.sources import StoreSource

    parts = synthetic.sample_datasets("causal", layers=(0,), num_heads=2, seeds=(0,), independent_first_frame=True,
                                      num_frames=7)
    part = parts[0].copy()
    denoise = [int(s) for s, phase in zip(part.step.values, part.phase.values) if str(phase) != "context"]
    for name in ("attn_mass", "attn_logit"):
        part[name] = part[name].where(~(part.query_frame == 0) | ~part.step.isin(denoise))
    path = tmp_path / "i.zarr"
    with StoreWriter(path, part.attrs["fingerprint"], mode="overwrite") as writer:
        writer.write(part)
    assert attn_payload(StoreSource(path), "p0000-s0", denoise[0], 0)["not_finite"] == [0]  # (no image recorded)
    zarr.open_group(str(path), mode="r+").attrs.update(image="first.png", image_sha256="ab" * 32)
    source = StoreSource(path)
    assert source.image == "first.png" and attn_payload(source, "p0000-s0", denoise[0], 0)["not_finite"] == []


def test_a_head_with_one_metric_undefined_is_not_classed_no_values(tmp_path):
    """no_values is for heads whose metrics are all NaN (a diverged rollout); one NaN metric (e.g. no early key
    frame to put mass on) leaves the other rules to decide."""
    from studies import metrics
    from workbench.store import open_store

    hm = metrics.head_metrics(open_store(_store(tmp_path / "h.zarr", set())))
    for name in ("early_mass", "sink_mass"):
        one = hm.copy()
        one[name] = one[name].where(one["head"] != 0)
        classes = metrics.classify_heads(one)
        assert "no_values" not in set(np.unique(classes.sel(head=0).values.astype(str))), name
