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
        assert fig.layout.yaxis.rangemode == "tozero"  # (a distance or error from 0: a small one looks small)
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
    assert title.startswith("&lt;b&gt;x&lt;/b&gt; A&amp;amp;B<br><sup>attn_mass minus"), title


def test_the_ranked_table_writes_no_negative_zero():
    table = pd.DataFrame({"trajectory_error": [1.0, 2.0], "d_trajectory_error": [0.0, -0.0]}, index=["a", "b"])
    shown = effects_report.display_ranking(table)
    assert list(shown.columns) == ["trajectory_error (px)"]  # (its unit in its header; the change in brackets)
    assert list(shown["trajectory_error (px)"]) == ["1 (+0)", "2 (+0)"]
    assert "-0.000" not in effects_report.markdown(pd.DataFrame({"x": [-1e-6]}))


def test_the_png_copy_holds_every_per_frame_chart_with_its_units():
    """The report's PNG copy held the relative latent distance alone, beside a page of three charts: it now stacks
    the page's charts (the world curve with the baseline's line, black), each axis named with its unit."""
    ds = effects_store(samples=2)
    curves = effects_report.per_frame_curves(ds)
    assert [c[2] for c in curves.values()] == ["relative latent distance (ratio)",
                                                "pixel RMS distance (RGB in [-1, 1])", "trajectory error (px)"]
    top = ["ablate-zero:L0.H0", "knockout0-1:all"]
    panels = [effects_report.curve_png(ds, top, name=name, curve=curve) for name, curve in curves.items()]
    png = np.asarray(effects_report.stack_png(panels))
    assert png.shape == (3 * 620, 1100, 3)
    black = lambda a: ((a[47:-67, 99:-323] < 40).all(axis=-1)).sum()  # noqa: E731 (dark line pixels in the plot)
    assert black(png[2 * 620:]) > 200 and black(png[:620]) < 50  # the baseline's line on the world chart alone
    for i in range(3):  # each panel's own lines: the knockout's red where its values are not 0
        assert (png[i * 620 + 44:(i + 1) * 620 - 64, 96:-320] != 255).any(axis=-1).sum() > 500
    assert "pixel_distance" not in effects_report.per_frame_curves(ds.drop_vars(["pixel_distance"]))
    # (pixel distances without the tracker's curve: no world chart, which would read a variable the store lacks)
    assert list(effects_report.per_frame_curves(ds.drop_vars(["world_curve_trajectory_error"]))) == [
        "latent_distance_rel", "pixel_distance"]


def test_a_curve_equal_to_another_is_dotted_and_named_with_it():
    """Two entries with the same effect (sink:9:3 and attention:9:3, which has no frame to choose) drew one line
    over the other: the legend named two entries, the chart showed one."""
    ds = effects_store(samples=2)
    ds["latent_distance_rel"].loc[dict(intervention="knockout0-1:all")] = \
        ds["latent_distance_rel"].sel(intervention="ablate-zero:L0.H0").values
    fig = effects_report.per_frame_figure(ds, "latent_distance_rel", ["ablate-zero:L0.H0", "knockout0-1:all"],
                                          "frame", "latent frame", "relative latent distance")
    assert [t.name for t in fig.data] == ["ablate-zero:L0.H0", "knockout0-1:all (= ablate-zero:L0.H0)"]
    assert [t.line.dash for t in fig.data] == [None, "dot"]
    apart = effects_report.per_frame_figure(ds, "pixel_distance", ["ablate-zero:L0.H0", "knockout0-1:all"],
                                            "pixel_frame", "pixel frame", "pixel RMS distance")
    assert [t.line.dash for t in apart.data] == [None, None]  # (their pixel curves differ)


def test_the_png_breaks_a_curve_where_it_has_no_value():
    """A world curve is NaN where the tracker found nothing: the PNG joined the points on either side, drawing a
    line across frames that have no value (the page's plotly line breaks there)."""
    frames = 6
    ds = effects_store(samples=1, frames=frames)
    ds["latent_distance_rel"].loc[dict(intervention="ablate-zero:L0.H0")] = [[1.0, 1.0, np.nan, np.nan, 1.0, 1.0]]
    png = np.asarray(effects_report.curve_png(ds, ["ablate-zero:L0.H0"]).convert("L"))
    x = lambda f: 96 + f / (frames - 1) * (1100 - 96 - 320)  # noqa: E731 (the chart's frame -> pixel column)
    inside = png[47:620 - 67]
    assert (inside[:, int(x(0)) + 3:int(x(1)) - 3] < 250).any()  # the line between frames 0 and 1
    assert not (inside[:, int(x(1)) + 3:int(x(4)) - 3] < 250).any()  # nothing across frames 2 and 3


def test_the_png_draws_a_lone_value_and_beside_a_curve_with_none():
    """A frame with a value between two without is a dot (no line to draw); an entry with no value at all (a rollout
    that diverged: its pixel distance NaN throughout), listed first, left the axis without a scale and the other
    entries' lines undrawn."""
    frames = 6
    ds = effects_store(samples=1, frames=frames)
    ds["latent_distance_rel"].loc[dict(intervention="ablate-zero:L0.H0")] = [[np.nan, np.nan, 1.0, np.nan, np.nan,
                                                                              np.nan]]
    png = np.asarray(effects_report.curve_png(ds, ["ablate-zero:L0.H0"]).convert("L"))
    x = lambda f: 96 + f / (frames - 1) * (1100 - 96 - 320)  # noqa: E731 (the chart's frame -> pixel column)
    inside = png[47:620 - 67]
    assert (inside[:, int(x(2)) - 2:int(x(2)) + 3] < 250).any()  # the dot at frame 2
    ds["pixel_distance"].loc[dict(intervention="knockout0-1:all")] = np.nan
    curve = effects_report.per_frame_curves(ds)["pixel_distance"]
    drawn = [np.asarray(effects_report.curve_png(ds, labels, name="pixel_distance", curve=curve))
             for labels in (["ablate-zero:L0.H0", "knockout0-1:all"], ["knockout0-1:all", "ablate-zero:L0.H0"])]
    ink = [(a[44:-64, 96:-320] != 255).any(axis=-1).sum() for a in drawn]
    assert ink[0] > 2000 and abs(ink[1] - ink[0]) < 0.1 * ink[0]  # (the same line, whichever is listed first)


def test_per_frame_charts_of_the_top_entries_say_they_leave_the_others_out(monkeypatch):
    """A sweep's charts draw the TOP entries of the ranking only: the legend says how many of how many (it did not:
    a 24-head sweep showed 10 curves with nothing saying 14 were left out)."""
    ds = effects_store()
    every = ["ablate-zero:L0.H0", "knockout0-1:all"]
    full = effects_report.per_frame_figure(ds, "latent_distance_rel", every, "frame", "f", "v")
    assert not full.layout.legend.title.text
    part = effects_report.per_frame_figure(ds, "latent_distance_rel", every[:1], "frame", "f", "v")
    assert part.layout.legend.title.text == "the 1 largest effects of 2 entries"
    noted = np.asarray(effects_report.curve_png(ds, every[:1]).convert("L"))
    monkeypatch.setattr(effects_report, "subset_note", lambda ds, labels: "")
    plain = np.asarray(effects_report.curve_png(ds, every[:1]).convert("L"))
    swatch = slice(-320 + 20, -320 + 32)  # (the legend's colour swatch of the first entry: a row lower under a header)
    assert plain[44 + 16, swatch].max() < 250 and noted[44 + 16 + 24, swatch].max() < 250
    assert not (noted[44 + 8:44 + 24] == plain[44 + 8:44 + 24]).all()


def test_the_png_copy_shades_a_knockouts_frames_as_the_page_does():
    """The page shades and names the frames a knockout hides; its PNG copy drew the curves alone, a flat zero over
    those frames with nothing saying why."""
    ds = effects_store()
    shaded = np.asarray(effects_report.curve_png(ds, ["knockout0-1:all"]).convert("RGB"))
    plain = np.asarray(effects_report.curve_png(ds, ["ablate-zero:L0.H0"]).convert("RGB"))
    grey = lambda img: (img == 228).all(axis=-1)  # noqa: E731  (#e4e4e4)
    assert grey(shaded)[200].sum() > 20 and grey(plain)[200].sum() < 3
    assert (shaded[46:62, 110:400] < 128).any() and not (plain[46:62, 110:400] < 128).any()  # (the note naming it)
