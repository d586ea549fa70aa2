"""workbench/intervene.py: an effects store's per-entry labels and numbers from a short run: each entry's kind (not
its label), its target layer and head in that order, an Entry object's own label, the relative latent distance
divided by the baseline's RMS (not the entry's own), the ranking with the largest effect first, a mean ablation of
every layer, and each entry's saved video decoded from its own latents."""

import numpy as np
import pytest
import xarray as xr
from PIL import Image

from workbench.cli import main
from workbench.extract import ExtractConfig
from workbench.intervene import ranking, run_intervene
from workbench.intervene_entries import Entry


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Tiny models run fastest on one thread."""


def test_an_effects_store_names_each_entrys_kind_target_and_relative_distance(tmp_path):
    """intervention_kind is the entry's kind, target_layer/target_head its (layer, head), an Entry object keeps its
    label, latent_distance_rel = latent_distance / the baseline's latent_rms, and ranking() puts the largest effect
    first (the baseline, at 0, last)."""
    cfg = ExtractConfig(prompts=["a red square moving right"], seeds=[1], num_frames=3,
                        out=str(tmp_path / "fx.zarr"), progress=False)
    run_intervene(cfg, [Entry(kind="ablate", label="mine", layers=[2], heads=[1])], world="off", log=lambda *a: None)
    ds = xr.open_zarr(tmp_path / "fx.zarr", consolidated=False).load()
    assert list(ds.intervention.values) == ["baseline", "mine"]
    assert list(ds.intervention_kind.values) == ["baseline", "ablate"]
    assert list(ds.target_layer.values) == [-1, 2] and list(ds.target_head.values) == [-1, 1]
    base_rms, d = ds.latent_rms.sel(intervention="baseline"), ds.sel(intervention="mine")
    assert float(d.latent_distance.min()) > 0
    np.testing.assert_allclose(d.latent_distance_rel, d.latent_distance / base_rms, rtol=1e-5)
    assert not np.allclose(d.latent_rms, base_rms, rtol=1e-3)  # (so the test tells the two RMS apart)
    table = ranking(ds)
    assert list(table.effect) == sorted(table.effect, reverse=True) and table.index[-1] == "baseline"


def test_a_mean_ablation_of_every_layer_runs_from_the_baselines_means(tmp_path):
    """A mean ablation without layers (every layer) gets the per-head means the baseline recorded for every layer,
    and moves the latents (it failed on a layer whose mean was not recorded)."""
    cfg = ExtractConfig(prompts=["a red square moving right"], seeds=[1], num_frames=3,
                        out=str(tmp_path / "fx.zarr"), progress=False)
    run_intervene(cfg, [dict(kind="ablate", heads=0, mode="mean")], world="off", log=lambda *a: None)
    ds = xr.open_zarr(tmp_path / "fx.zarr", consolidated=False)
    assert float(ds.latent_distance.sel(intervention="ablate-mean:H0").min()) > 0


def test_an_entrys_saved_video_is_its_own(tmp_path):
    """--save-videos of an ablation of every head of layer 0: the entry's PNG grid differs from the baseline's."""
    out = tmp_path / "v.zarr"
    assert main(["intervene", "--frames", "3", "--world", "off", "--save-videos", "--ablate", "0:0-3", "--out",
                 str(out), "--no-progress"]) == 0
    entry = [p for p in tmp_path.glob("v_videos/*/p0000-s0.png") if p.parent.name != "baseline"]
    assert len(entry) == 1
    def frames(path):  # the grid below its title (the title names the entry)
        a = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
        return a[a.shape[0] // 2:]

    ours, base = frames(entry[0]), frames(tmp_path / "v_videos" / "baseline" / "p0000-s0.png")
    assert ours.shape == base.shape and np.abs(ours - base).max() > 0
