"""The example plugins in docs/examples (a statistic and an intervention of one's own) do what their docstrings and
docs/architecture.md say, run by the commands those give: the statistic equals a dense float64 reference, the
intervention scaled by 0 equals the built-in zero ablation bitwise."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import intervene_entries as ie
from workbench import statistics as S
from workbench.cli import main as cli_main

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"


@pytest.fixture
def examples(monkeypatch):
    """docs/examples on the path (the docs' PYTHONPATH=docs/examples); the registries left as the other tests know
    them."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(ie, "OWN_KINDS", {})
    for module in ("my_stats", "my_edits"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    yield
    S.STATISTICS.pop("attn_key_max", None)


def test_the_example_statistic_equals_a_float64_reference(examples, monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_PLUGINS", "my_stats")
    out = tmp_path / "mine.zarr"
    assert cli_main(["extract", "--layers", "3", "--frames", "6", "--stats", "attn_mass,attn_key_max",
                     "--out", str(out), "--no-progress"]) == 0
    from workbench.store import open_store

    ds = open_store(out)
    assert ds.attrs["command"].startswith("WORKBENCH_PLUGINS=my_stats workbench extract --layers 3 ")  # (found by QA)
    assert ds.attn_key_max.dims == ("sample", "step", "layer", "head", "query_frame")
    assert ds.attn_key_max.attrs["long_name"] == "largest key-token probability"
    got = ds.attn_key_max.values
    assert np.isfinite(got).all() and (got > 0).all() and (got <= 1).all()
    # the reduce itself against a dense float64 softmax, on random q, k with a frame mask
    import my_stats

    g = torch.Generator().manual_seed(0)
    B, fsl, nqf, nkf, H, D = 2, 5, 2, 4, 3, 8
    q = torch.randn(B, nqf * fsl, H, D, generator=g) * 2
    k = torch.randn(B, nkf * fsl, H, D, generator=g)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    s = q.double().transpose(1, 2) @ k.double().permute(0, 2, 3, 1) / math.sqrt(D)  # [B, H, Lq, Lk]
    s = s.masked_fill(~mask.repeat_interleave(fsl, 0).repeat_interleave(fsl, 1), -math.inf)
    lse = torch.logsumexp(s, dim=-1).float()  # [B, H, Lq], as the kernel gives it
    want = torch.softmax(s, dim=-1).amax(dim=-1).reshape(B, H, nqf, fsl).mean(dim=-1)
    got = my_stats.key_max(S.CallTensors(q, k, lse, fsl, mask))
    assert (got.double() - want).abs().max() < 1e-6


def test_the_example_intervention_runs_its_spec(examples, monkeypatch, tmp_path, capsys):
    from workbench.store import open_store

    monkeypatch.setenv("WORKBENCH_PLUGINS", "my_edits")
    out = tmp_path / "mine.zarr"
    assert cli_main(["intervene", "--spec", str(EXAMPLES / "my_spec.yaml"), "--frames", "9", "--world", "off",
                     "--out", str(out), "--no-progress"]) == 0
    assert open_store(out).attrs["command"].startswith("WORKBENCH_PLUGINS=my_edits workbench intervene --spec ")
    d = open_store(out).latent_distance.isel(sample=0)
    assert float(d.sel(intervention="ablate-zero:L2.H3").max()) > 0
    zero = d.sel(intervention="ablate-zero:L2.H3")
    np.testing.assert_array_equal(d.sel(intervention="head_scale(factor=0):L2.H3"), zero)
    half = d.sel(intervention="head_scale(factor=0.5):L2.H3")
    assert 0 < float(half.max()) and not np.array_equal(half, zero)
