"""A store of a rollout whose attention was not finite (activations that overflowed: every row of attn_mass NaN for
that sample): the summary `workbench extract` prints, and the checks of `workbench report`."""

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
