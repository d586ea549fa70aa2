"""studies/effects_report.py on a small effects store made in memory: the per-frame charts say what they plot and
that it is a mean over samples, and a knockout's frames are shaded and named, their trajectory error marked as the
motion fit's where their pixels equal the baseline's; the ranked table writes no "-0"."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import xarray as xr

from studies import effects_report


def effects_store(samples: int = 2, frames: int = 6) -> xr.Dataset:
    """A baseline, an ablation and a knockout of latent frames 0-1 (history only: their pixels are the baseline's)."""
    labels = ["baseline", "ablate-zero:L0.H0", "knockout0-1:all"]
    specs = [{"kind": "baseline"}, {"kind": "ablate", "layers": [0], "heads": [0], "mode": "zero"},
             {"kind": "knockout", "frames": [0, 1], "history_only": True}]
    pixels = 1 + 4 * (frames - 1)
    rng = np.random.default_rng(0)
    pixel = rng.uniform(1, 2, (3, samples, pixels))
    pixel[0], pixel[2, :, :5] = 0, 0  # (the baseline; the knockout's pixel frames 0-4 = latent frames 0-1)
    latent = rng.uniform(0.1, 1, (3, samples, frames))
    latent[0], latent[2, :, :2] = 0, 0
    return xr.Dataset(
        dict(latent_distance_rel=(("intervention", "sample", "frame"), latent),
             pixel_distance=(("intervention", "sample", "pixel_frame"), pixel),
             world_curve_trajectory_error=(("intervention", "sample", "pixel_frame"),
                                           rng.uniform(0, 10, (3, samples, pixels)))),
        coords=dict(intervention=labels, intervention_spec=("intervention", [json.dumps(s) for s in specs]),
                    sample=[f"p0000-s{i}" for i in range(samples)], frame=np.arange(frames),
                    pixel_frame=np.arange(pixels)))


def test_per_frame_charts_are_titled_means_over_samples():
    ds = effects_store(samples=3)
    top = ["ablate-zero:L0.H0", "knockout0-1:all"]
    for name, words in [("latent_distance_rel", "Relative latent distance"), ("pixel_distance", "Pixel RMS distance"),
                        ("world_curve_trajectory_error", "Trajectory error")]:
        fig = effects_report.per_frame_figure(ds, name, top, "frame" if name.startswith("latent") else "pixel_frame",
                                              "frame", "value")
        title = fig.layout.title.text
        assert title.startswith(words) and title.endswith("mean over 3 samples"), title
        assert fig.layout.margin.t >= 60  # (room for it)
        np.testing.assert_allclose(fig.data[0].y, ds[name].sel(intervention=top[0]).mean("sample").values)


def test_a_knockouts_frames_are_shaded_and_their_trajectory_error_explained():
    ds = effects_store()
    assert effects_report.knockout_runs(ds, ["knockout0-1:all", "ablate-zero:L0.H0"]) == {
        "knockout0-1:all": ([(0, 1)], True)}
    latent = effects_report.per_frame_figure(ds, "latent_distance_rel", ["knockout0-1:all"], "frame", "f", "v")
    (band,) = latent.layout.shapes
    assert (band.x0, band.x1) == (-0.5, 1.5)
    assert "later frames do not see latent frames 0-1" in latent.layout.annotations[0].text
    traj = effects_report.per_frame_figure(ds, "world_curve_trajectory_error", ["knockout0-1:all"], "pixel_frame",
                                           "pixel frame", "px")
    (band,) = traj.layout.shapes
    assert (band.x0, band.x1) == (-0.5, 4.5)  # pixel frames 0-4
    (note,) = traj.layout.annotations
    assert "(pixel frames 0-4)" in note.text and effects_report.SAME_PIXELS in note.text
    knock = next(t for t in traj.data if t.name == "knockout0-1:all")  # (its hover says so frame by frame)
    assert all(effects_report.SAME_PIXELS in c for c in knock.customdata[:5])
    assert not any(c for c in knock.customdata[5:])
    assert not any(c for t in traj.data if t.name == "baseline" for c in t.customdata)


def test_a_label_with_markup_is_shown_as_written():
    """A spec's label is the user's text: plotly reads <b>, <br> and &amp; in a title or legend name as markup
    ("<b>x</b> A&amp;B" was drawn bold as "x A&B"), so the figures escape it, as their hover text does."""
    ds = effects_store()
    label = "<b>x</b> A&amp;B"
    ds = ds.assign_coords(intervention=["baseline", label, "knockout0-1:all"])
    fig = effects_report.per_frame_figure(ds, "latent_distance_rel", [label], "frame", "f", "v")
    assert fig.data[0].name == "&lt;b&gt;x&lt;/b&gt; A&amp;amp;B"
    delta = xr.DataArray(np.zeros((1, 2, 2)), dims=("layer", "query_frame", "key_frame"),
                         coords=dict(layer=[3], query_frame=[0, 1], key_frame=[0, 1]))
    title = effects_report.attention_delta_figure(delta, label, 1.0).layout.title.text
    assert title.startswith("&lt;b&gt;x&lt;/b&gt; A&amp;amp;B: attn_mass minus"), title


def test_the_ranked_table_writes_no_negative_zero():
    table = pd.DataFrame({"trajectory_error": [1.0, 2.0], "d_trajectory_error": [0.0, -0.0]}, index=["a", "b"])
    assert list(effects_report.display_ranking(table)["trajectory_error"]) == ["1 (+0)", "2 (+0)"]
    assert "-0.000" not in effects_report.markdown(pd.DataFrame({"x": [-1e-6]}))
