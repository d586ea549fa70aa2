"""`workbench intervene` end to end on the embedded default (CPU, short rollouts): the effects store's entries
and numbers (the baseline at distance 0; window + sink as a policy at distance exactly 0 from a baseline with that
window; an ablation's distance equal to an independent rollout's), resuming, the report's table and PNGs, and
bad input as one line before any work."""

import json
import re
import shlex

import numpy as np
import pytest
import torch

from studies import synthetic
from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.intervene_entries import parse_entry, parse_flag


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def test_entries_parse_and_bad_values_are_named():
    e = parse_entry(parse_flag("ablate", "3:0-1:mean"), 6, 4)
    assert (e.kind, e.layers, e.heads, e.mode, e.label) == ("ablate", [3], [0, 1], "mean", "ablate-mean:L3.H0-1")
    assert parse_entry(parse_flag("policy", "deepsink:21"), 6, 4).sink_frames == 10  # half the window
    assert parse_entry(parse_flag("sink", "0.5"), 6, 4).frames == [0]
    assert parse_entry(dict(kind="ablate", layers=2, heads=1), 6, 4).target == (2, 1)
    for d, message in [(dict(kind="erase"), "kind 'erase'"), (dict(kind="ablate", layers=7), r"layer \[7\] out of range"),
                       (dict(kind="ablate", mode="noise"), "mode 'noise'"), (dict(kind="ablate", colour=1), "unknown keys"),
                       (dict(kind="temperature", value=0), "positive"), (dict(kind="knockout"), "needs frames"),
                       (dict(kind="policy", policy="lru"), "policy 'lru'"),
                       (dict(kind="policy", policy="sink", window=4, sink_frames=4), "sink_frames < window"),
                       (dict(kind="ablate", mode="resample"), "resample_prompt")]:
        with pytest.raises(WorkbenchError, match=message):
            parse_entry(d, 6, 4)
    with pytest.raises(WorkbenchError, match="use LAYERS:HEADS:T"):
        parse_flag("temperature", "3:1")
    # with the rollout's bounds (frames, steps of the per-chunk schedule, chunks): an entry no call could match
    rollout = dict(num_frames=21, num_steps=5, num_chunks=7)
    for d, message in [(dict(kind="knockout", frames=21), r"frame \[21\] out of range: the rollout has frames 0-20"),
                       (dict(kind="temperature", value=2, steps=9), r"step \[9\] out of range: the per-chunk schedule"),
                       (dict(kind="ablate", chunks=[2, 50]), r"chunk \[50\] out of range: the rollout has chunks 0-6"),
                       (dict(kind="temperature", value="hot"), "temperature 'hot': give a number"),
                       (dict(kind="policy", policy="fifo", window="ten"), "policy window 'ten': give an integer")]:
        with pytest.raises(WorkbenchError, match=message):
            parse_entry(d, 6, 4, **rollout)
    last = parse_entry(dict(kind="knockout", frames="0-20", steps=4, chunks=6), 6, 4, **rollout)  # the last of each
    assert (last.frames, last.steps, last.chunks) == (list(range(21)), [4], [6])


def test_a_headwise_policy_reads_an_attention_store_only(tmp_path):
    """The headwise policy splits heads by an extract store's attn_mass; a training probe store (or an effects
    store) is refused when the entry is read, before any rollout."""
    from test_reports import probe_store

    probes = probe_store(tmp_path / "probes.zarr")
    with pytest.raises(WorkbenchError, match="has a train_step dim .* a headwise policy splits the heads"):
        parse_entry(dict(kind="policy", policy="headwise", store=str(probes)), 6, 4)
    # static_recent under a chunk: a static head saw its whole chunk anyway (3 frames where 2 were asked for)
    attention = synthetic.write_store(tmp_path / "a.zarr", "causal", layers=[0, 1], num_heads=4)
    spec = dict(kind="policy", policy="headwise", store=str(attention), window=9, sink_frames=1, static_recent=2)
    with pytest.raises(WorkbenchError, match="static_recent 2 is less than a chunk of 3 frames"):
        parse_entry(spec, 6, 4, chunk_frames=3)
    assert parse_entry({**spec, "static_recent": 3}, 6, 4, chunk_frames=3).static_recent == 3


def test_intervene_writes_an_effects_store_and_resumes(tmp_path, capsys):
    import xarray as xr

    out = tmp_path / "fx.zarr"
    args = ["intervene", "--frames", "12", "--local-attn-size", "6", "--sink-size", "3", "--world", "off",
            "--seeds", "0,1", "--out", str(out), "--no-progress", "--ablate", "2:1", "--policy", "sink:6:3"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "3 entries (baseline included) x 2 sample(s) x 12 latent frames" in printed
    ds = xr.open_zarr(out, consolidated=False).load()
    assert list(ds.intervention.values) == ["baseline", "ablate-zero:L2.H1", "policy-sink6+sink3"]
    assert ds.latent_distance.dims == ("intervention", "sample", "frame") and ds.sizes["sample"] == 2
    motion = ds.latent_motion.sel(intervention="ablate-zero:L2.H1", sample="p0000-s1").values
    assert np.isnan(motion[0]) and (motion[1:] > 0).all()
    assert float(abs(ds.latent_distance.sel(intervention="baseline")).max()) == 0
    assert float(abs(ds.latent_distance.sel(intervention="policy-sink6+sink3")).max()) == 0  # bitwise the window
    assert float(ds.latent_distance.sel(intervention="ablate-zero:L2.H1").min()) > 0
    assert ds.attrs["store_kind"] == "effects" and list(ds.cache_frames.values) == [6, 6, 6]
    assert json.loads(str(ds.intervention_spec.values[1]))["heads"] == [1]

    # the ablation's numbers equal an independent rollout of the same intervention
    from models.wan.text_encoder import TextEncoder
    from workbench.extract import ExtractConfig, load_model, plan, sample_rollout
    from workbench.hooks import CallFilter, attach
    from workbench.interventions import HeadAblation

    p = plan(ExtractConfig(prompts=["a red square moving right"], seeds=[1], num_frames=12, local_attn_size=6,
                           sink_size=3))
    model = load_model(p, torch.device("cpu"), torch.float32)
    emb = TextEncoder.from_wan_dir(p.wan_dir).encode(["a red square moving right"])
    base = sample_rollout(model, p, emb, None, 1, "cpu", torch.float32)
    with attach(model, HeadAblation(CallFilter(layers={2}, kinds={"self"}), heads=[1])):
        x = sample_rollout(model, p, emb, None, 1, "cpu", torch.float32)
    expected = (x - base).double()[0].pow(2).mean(dim=(1, 2, 3)).sqrt().numpy()
    np.testing.assert_allclose(ds.latent_distance.sel(intervention="ablate-zero:L2.H1", sample="p0000-s1"),
                               expected, rtol=1e-5)
    step = (x[0, 1:] - x[0, :-1]).double().pow(2).mean(dim=(1, 2, 3)).sqrt().numpy()
    np.testing.assert_allclose(motion[1:], step, rtol=1e-5)

    assert main(args + ["--temperature", "1:0:2"]) == 0  # resumes: only the new entry runs
    printed = capsys.readouterr().out
    assert "4 entries" in printed and f"resuming: 3 of 4 entries (baseline included) are already in {out}" in printed
    again = xr.open_zarr(out, consolidated=False)
    np.testing.assert_array_equal(again.latent_distance.isel(intervention=slice(0, 3)), ds.latent_distance)

    html_path = tmp_path / "new" / "fx.html"  # (its folder made, the PNGs' too)
    assert main(["report", str(out), "--out", str(html_path)]) == 0
    text = html_path.read_text()
    assert "Ranked by effect" in text and "temperature2:L1.H0" in text and html_path.with_suffix(".png").stat().st_size
    assert "--policy sink:6:3; then: workbench intervene" in text and "--temperature 1:0:2" in text  # (both runs)
    capsys.readouterr()
    assert main(["report", str(out), "--layer", "9", "--step", "0", "--out", str(tmp_path / "no.html")]) == 2
    assert "--layer, --step: an effects store's report" in capsys.readouterr().err  # (not silently ignored)
    assert main(["report", str(out), "--query-frames", "history", "--out", str(tmp_path / "no.html")]) == 2
    assert "--query-frames: an effects store's report" in capsys.readouterr().err
    assert main(["export-legacy", str(out)]) == 2
    assert "is an effects store" in capsys.readouterr().err
    rows = re.findall(r"<t[hd]>(ablate-zero:L2.H1|baseline|policy-sink6\+sink3|temperature2:L1.H0)</t[hd]>", text)
    assert rows[-1] in ("baseline", "policy-sink6+sink3")  # ranked: the zero-effect entries last


def test_a_sweep_ranks_every_head(tmp_path, capsys):
    import xarray as xr

    out = tmp_path / "sweep.zarr"
    assert main(["intervene", "--frames", "6", "--world", "off", "--sweep-heads", "5", "--out", str(out),
                 "--no-progress"]) == 0
    ds = xr.open_zarr(out, consolidated=False)
    assert list(ds.target_head.values) == [-1, 0, 1, 2, 3] and set(ds.target_layer.values[1:]) == {5}
    capsys.readouterr()
    assert main(["report", str(out), "--out", str(tmp_path / "sweep.html")]) == 0
    assert (tmp_path / "sweep_heads.png").is_file()
    said = capsys.readouterr().out  # (every file it wrote: the PNGs were written without a word)
    assert all(f"wrote {tmp_path / name}" in said for name in ("sweep.html", "sweep.png", "sweep_heads.png"))


@pytest.mark.parametrize("argv,message", [
    (["--ablate", "9:0"], r"layer \[9\] out of range"),
    (["--ablate", "3"], "use LAYERS:HEADS"),
    ([], "no intervention to run"),
    (["--policy", "fifo:21", "--frames", "7"], "do(es)? not divide into chunks"),
    (["--ablate", "1:0", "--ablate", "1:0"], "used twice"),
    (["--world", "on", "--prompt", "an eagle", "--ablate", "1:0"], "--world on needs the miniature world"),
    (["--knockout", "30"], r"frame \[30\] out of range: the rollout has frames 0-20"),
    (["--sink", "0.5:40", "--frames", "6"], r"frame \[40\] out of range: the rollout has frames 0-5"),
])
def test_bad_input_is_one_line_before_any_work(argv, message, tmp_path, capsys):
    assert main(["intervene", "--out", str(tmp_path / "x.zarr"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "x.zarr").exists()


def test_capture_under_intervention_holds_the_edited_attention(tmp_path):
    """--capture: attn_mass per entry; the baseline's equals extract's store of the same rollout bitwise, and a
    knockout of frame 0 takes it out of the later chunks' rows (NaN: not attended, docs/store.md), whose other
    frames then carry all the mass."""
    import xarray as xr

    out = tmp_path / "cap.zarr"
    assert main(["intervene", "--frames", "9", "--world", "off", "--capture", "1", "--knockout", "0", "--out", str(out),
                 "--no-progress", "--prompt", "a red square moving right"]) == 0
    ds = xr.open_zarr(out, consolidated=False).load()
    assert "a red square moving right" in shlex.split(ds.attrs["command"])  # the command as a shell takes it back
    assert ds.attn_mass.dims == ("intervention", "sample", "step", "layer", "head", "query_frame", "key_frame")
    assert main(["extract", "--layer", "1", "--frames", "9", "--seed", "0", "--prompt", "a red square moving right",
                 "--out", str(tmp_path / "x.zarr"), "--no-progress"]) == 0
    x = xr.open_zarr(tmp_path / "x.zarr", consolidated=False)
    ref = x.attn_mass.sel(sample="p0000-s0").values
    np.testing.assert_array_equal(ds.attn_mass.sel(intervention="baseline", sample="p0000-s0").values, ref)
    # labelled as an attention store's (steps with their timesteps and phases, frames with their chunks), every
    # variable with its units, and the fingerprint in its two halves
    for name in ("timestep", "phase", "cfg", "denoise_index", "query_chunk", "key_chunk"):
        np.testing.assert_array_equal(ds[name].values, x[name].values)
    assert all(ds[v].attrs.get("units") and ds[v].attrs.get("long_name") for v in ds.data_vars)
    assert {c for c in ds.coords if not ds[c].attrs.get("long_name")} == set()  # (the coordinates too)
    assert ds.attn_mass.attrs == x.attn_mass.attrs and ds.attrs["stats"] == ["attn_mass"]
    layout_half, model_half = ds.attrs["fingerprint"].split(":")
    assert layout_half != model_half
    knocked = ds.attn_mass.sel(intervention="knockout0:all", sample="p0000-s0")
    assert bool(knocked.sel(query_frame=slice(3, None), key_frame=0).isnull().all())
    np.testing.assert_allclose(knocked.sel(query_frame=slice(3, None)).sum("key_frame"), 1, atol=1e-5)
    assert float(knocked.sel(query_frame=slice(0, 2), key_frame=0).min()) > 0  # chunk 0 still sees its own frame
    # a cache whose heads keep different frames (heads_differ) takes no observer: its entry's attention is NaN
    spec = tmp_path / "headwise.yaml"
    spec.write_text("interventions:\n  - {kind: policy, policy: headwise, window: 8, sink_frames: 2, "
                    "static_recent: 3, static_heads: [[1, 0]]}\n")
    assert main(["intervene", "--frames", "9", "--world", "off", "--capture", "1", "--spec", str(spec), "--out",
                 str(out), "--no-progress", "--prompt", "a red square moving right"]) == 0
    ds = xr.open_zarr(out, consolidated=False).load()
    label = str(ds.intervention.values[-1])
    assert label.startswith("policy-headwise") and bool(ds.attn_mass.sel(intervention=label).isnull().all())
    assert float(ds.latent_distance.sel(intervention=label).max()) > 0

    # the report: how far the knockout moved the captured attention, and where
    from studies.effects_report import attention_change, attention_delta

    delta = attention_delta(ds, "knockout0:all").sel(layer=1)  # [query_frame, key_frame]
    base = ds.attn_mass.sel(intervention="baseline").mean(["sample", "step", "head"]).sel(layer=1)
    np.testing.assert_allclose(delta.sel(query_frame=slice(3, None), key_frame=0),  # its whole mass, lost
                               -base.sel(query_frame=slice(3, None), key_frame=0), rtol=1e-6)
    np.testing.assert_allclose(delta.sum("key_frame"), 0, atol=1e-5)  # rows still sum to 1: the mass moved
    assert bool(delta.sel(query_frame=0, key_frame=slice(3, None)).isnull().all())  # the future: never attended
    js = attention_change(ds, ["knockout0:all"])
    assert list(js.columns) == ["layer 1"] and 0 < js.iloc[0, 0] <= 1
    assert main(["report", str(out), "--out", str(tmp_path / "cap.html")]) == 0
    text = (tmp_path / "cap.html").read_text()
    assert "Attention under each entry (captured layers 1)" in text and 'id="fig-attention-delta-0"' in text


def test_a_spec_file_and_flags_make_the_same_entries(tmp_path):
    from workbench.cli import build_parser
    from workbench.commands.intervene import entries_from_args

    spec = tmp_path / "spec.yaml"
    spec.write_text("""
interventions:
  - {kind: ablate, layers: 3, heads: 0-1, mode: mean}
  - {kind: ablate, layers: 3, heads: 2, mode: resample, resample_prompt: "a blue circle moving up", steps: 0}
  - {kind: temperature, layers: 2, heads: 0, value: 2.0, attention: cross, chunks: 1-2, label: hot-cross}
  - {kind: policy, policy: deepsink, window: 21, sink_frames: 10}
sweep: {layers: 5}
""")
    args = build_parser().parse_args(["intervene", "--spec", str(spec), "--knockout", "0-2:1", "--sink", "2:0:4"])
    entries = entries_from_args(args, 6, 4)
    labels = [e.label for e in entries]
    assert labels == ["ablate-mean:L3.H0-1", "ablate-resample:L3.H2.s0", "hot-cross", "policy-deepsink21+sink10",
                      "ablate-zero:L5.H0", "ablate-zero:L5.H1", "ablate-zero:L5.H2", "ablate-zero:L5.H3",
                      "knockout0-2:L1", "sink0x2:L4"]
    hot = entries[2]
    assert (hot.attention, hot.chunks, hot.value, hot.target) == ("cross", [1, 2], 2.0, (2, 0))
    bad = tmp_path / "bad.yaml"
    bad.write_text("interventions:\n  - {kind: knockout, frames: 0, attention: cross}\n")
    with pytest.raises(WorkbenchError, match="attention must be self"):
        entries_from_args(build_parser().parse_args(["intervene", "--spec", str(bad)]), 6, 4)


def test_saved_videos_are_shown_beside_the_baseline(tmp_path):
    out = tmp_path / "v.zarr"
    assert main(["intervene", "--frames", "3", "--world", "off", "--save-videos", "--ablate", "0:0", "--out", str(out),
                 "--no-progress"]) == 0
    grids = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("v_videos/*/*.png"))
    assert grids == ["v_videos/ablate-zero_L0.H0/p0000-s0.png", "v_videos/baseline/p0000-s0.png"]
    assert main(["report", str(out), "--out", str(tmp_path / "v.html")]) == 0
    assert (tmp_path / "v.html").read_text().count('<img src="data:image/png;base64,') == 2
    # the store renamed, its folder not: found by the store's attr videos_dir (the report showed a heading and no video)
    out.rename(tmp_path / "v_first_try.zarr")
    assert main(["report", str(tmp_path / "v_first_try.zarr"), "--out", str(tmp_path / "w.html")]) == 0
    assert (tmp_path / "w.html").read_text().count('<img src="data:image/png;base64,') == 2
    import shutil

    shutil.rmtree(tmp_path / "v_videos")  # and without it: the page says so
    assert main(["report", str(tmp_path / "v_first_try.zarr"), "--out", str(tmp_path / "x.html")]) == 0
    assert ("the run saved them in v_videos/ beside the store, and neither that folder nor v_first_try_videos/ is "
            "beside v_first_try.zarr now") in (tmp_path / "x.html").read_text()


def test_the_effect_curve_png_has_round_ticks_ending_on_the_axis_top():
    """The PNG copy of the per-frame effect: ticks at 1, 2, 2.5 or 5 times a power of ten, the top tick at or just
    above the largest value (not 1.05 x it, which gave ticks like 0.346, 0.692)."""
    from studies.effects_report import curve_png, nice_ticks

    assert nice_ticks(1.73) == [0, 0.5, 1.0, 1.5, 2.0] and nice_ticks(0.07) == [0, 0.02, 0.04, 0.06, 0.08]
    assert nice_ticks(1.0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2] and nice_ticks(4.9) == [0, 1, 2, 3, 4, 5]
    assert nice_ticks(0.0) == nice_ticks(float("nan")) == [0, 1]  # nothing to scale
    import xarray as xr

    values = np.array([[[0.0, 0.5, 1.65, 1.0]], [[0.3, 0.4, 0.5, 0.6]]])  # [intervention, sample, frame]
    ds = xr.Dataset({"latent_distance_rel": (("intervention", "sample", "frame"), values)},
                    coords={"intervention": ["a", "b"], "frame": np.arange(4)})
    img = np.asarray(curve_png(ds, ["a", "b"]).convert("L"))
    assert img.shape == (620, 1100) and (img[:, 8:28] < 128).any()  # the upright axis name left of the tick labels
    title = np.flatnonzero((img[:40, 96:600] < 128).any(axis=1))  # (Pillow's bitmap font was 10 pixels high:
    assert title.max() - title.min() >= 13  # too small to read in a shared copy)
    # a long label widens the legend and is shown whole (labels were cut at 30 characters: a plugin's kind with its
    # settings, policy-first_newest6+sink0(fir); past 640 pixels its middle gives way, not its end
    from models.video import font_for
    from studies.effects_report import LEGEND_MAX_PX, _fit

    long = "head_scale(factor=0.25,sizes=1-2):L1.H0-1"
    ds = ds.assign_coords(intervention=[long, "b"])
    wide = curve_png(ds, [long, "b"])
    font = font_for(long, 15)
    assert wide.size[0] >= 1100 - 320 + font.getlength(long) + 46 and _fit(long, font, LEGEND_MAX_PX) == long
    legend = np.asarray(wide.convert("L"))[44:80, wide.size[0] - 60:]
    assert (legend < 128).any()  # (the label's end, drawn near the right edge)
    cut = _fit("L" * 40 + "middle" * 40 + "END", font, LEGEND_MAX_PX)
    assert cut.startswith("LLLL") and cut.endswith("END") and "..." in cut and font.getlength(cut) <= LEGEND_MAX_PX


def test_the_api_takes_spec_dicts_and_the_cfg_samplers(tmp_path):
    """run_intervene in Python: entries as a --spec file's dicts (checked against the model: a layer it lacks is
    named), Entry objects checked the same way (a key frame past the video would knock out nothing), and the
    teacher's bidirectional CFG sampler (both branches under the same edit)."""
    import xarray as xr

    from workbench.extract import ExtractConfig
    from workbench.intervene import run_intervene
    from workbench.intervene_entries import Entry

    cfg = ExtractConfig(model="teacher", sampler="bidirectional", num_inference_steps=2, num_frames=3, seeds=[0],
                        out=str(tmp_path / "fx.zarr"), progress=False)
    with pytest.raises(WorkbenchError, match=r"layer \[9\]"):
        run_intervene(cfg, [dict(kind="ablate", layers=9, heads=0)], world="off", log=lambda *a: None)
    with pytest.raises(WorkbenchError, match=r"frame \[5\] out of range: the rollout has frames 0-2"):
        run_intervene(cfg, [Entry(kind="knockout", label="k", frames=[0, 5])], world="off", log=lambda *a: None)
    assert not (tmp_path / "fx.zarr").exists()
    run_intervene(cfg, [dict(kind="ablate", layers=1, heads=0)], world="off", log=lambda *a: None)
    ds = xr.open_zarr(tmp_path / "fx.zarr", consolidated=False)
    effect = ds.latent_distance_rel.mean(["sample", "frame"])
    assert list(ds.intervention.values) == ["baseline", "ablate-zero:L1.H0"]
    assert float(effect.sel(intervention="baseline")) == 0 and float(effect.sel(intervention="ablate-zero:L1.H0")) > 0


def test_an_attention_guided_window_with_little_room_keeps_what_fits(tmp_path):
    """attention:6:1 with chunks of 3: the next chunk leaves room for 3 frames, the sink takes 1, so only 2 of the
    newest stay (a full chunk of 3 beside the sink overflowed the window before, after the baseline had run)."""
    import xarray as xr

    out = tmp_path / "pol.zarr"
    assert main(["intervene", "--frames", "9", "--seeds", "0", "--policy", "attention:6:1", "--world", "off",
                 "--out", str(out), "--no-progress"]) == 0
    ds = xr.open_zarr(out, consolidated=False)
    assert int(ds.cache_frames.sel(intervention="policy-attention6+sink1")) == 6
    assert float(ds.latent_distance_rel.sel(intervention="policy-attention6+sink1").isel(frame=slice(6, 9)).mean()) > 0


def test_effect_figures_name_an_entry_the_store_lacks():
    """The effects report's helpers in Python: an unknown entry label (or one label given as a string) and a
    non-positive drift segment are named, not xarray KeyErrors."""
    import xarray as xr

    from studies.effects_report import curve_png, drift_table

    values = np.zeros((2, 1, 4))
    ds = xr.Dataset({"latent_distance_rel": (("intervention", "sample", "frame"), values),
                     "latent_rms": (("intervention", "sample", "frame"), values + 1)},
                    coords={"intervention": ["baseline", "a"], "frame": np.arange(4)})
    with pytest.raises(WorkbenchError, match=r"entries \['b'\] are not in the store; it has \['baseline', 'a'\]"):
        curve_png(ds, ["a", "b"])
    assert curve_png(ds, "a").size == (1100, 620)  # one label alone
    with pytest.raises(WorkbenchError, match="segment 0: give a positive number"):
        drift_table(ds, segment=0)


def test_every_kind_runs_from_flags_a_spec_and_entry_objects(tmp_path, capsys):
    """One entry of every kind from the command line, the help's spec entries, and the same as `Entry` objects
    through the API: all run (a sink entry was refused from session 29 on: the API's re-check of an Entry read its
    default history_only, a knockout setting, as given)."""
    import xarray as xr
    import yaml

    from workbench.extract import ExtractConfig
    from workbench.intervene import run_intervene

    flags = ["--ablate", "1:0", "--knockout", "0-2", "--temperature", "1:0:2", "--sink", "0.5", "--policy", "fifo:3"]
    out = tmp_path / "fx.zarr"
    assert main(["intervene", "--frames", "6", "--world", "off", "--no-progress", "--out", str(out), *flags]) == 0
    labels = ["baseline", "ablate-zero:L1.H0", "knockout0-2:all", "temperature2:L1.H0", "sink0x0.5:all",
              "policy-fifo3"]
    assert list(xr.open_zarr(out, consolidated=False).intervention.values) == labels
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"interventions": [{"kind": "sink", "frames": 0, "value": 0.5},
                                                      {"kind": "knockout", "frames": "0-2", "history_only": True}]}))
    assert main(["intervene", "--frames", "6", "--world", "off", "--no-progress", "--out", str(tmp_path / "s.zarr"),
                 "--spec", str(spec)]) == 0
    entries = [parse_entry(parse_flag(k.removeprefix("--"), t), 6, 4) for k, t in zip(flags[::2], flags[1::2])]
    cfg = ExtractConfig(num_frames=6, seeds=[0], out=str(tmp_path / "api.zarr"), progress=False)  # (the CLI's seed)
    run_intervene(cfg, entries, world="off", log=lambda *a: None)
    api = xr.open_zarr(tmp_path / "api.zarr", consolidated=False)
    assert list(api.intervention.values) == labels
    np.testing.assert_array_equal(api.latent_distance.values,
                                  xr.open_zarr(out, consolidated=False).latent_distance.values)


def test_an_entry_stores_the_settings_of_its_kind_and_older_specs_still_resume():
    """intervention_spec holds what the entry's kind means (a knockout carried a policy window of 21 and 0 sink
    frames, the baseline too, whatever the run's cache): the run's cache is in the store's attributes. A spec of an
    older store (every field) reads as the same entry, except a sink entry's: it scaled every call, the sink
    frames' own chunk's too, and is now history-only by default, so that store's entry is another's."""
    import dataclasses

    from workbench.intervene_entries import Entry, older_differs, same_settings

    knock = parse_entry(parse_flag("knockout", "0-2"), 6, 4, num_frames=6)
    sink = parse_entry(parse_flag("sink", "0"), 6, 4, num_frames=6)
    assert knock.spec() == dict(kind="knockout", label="knockout0-2:all", frames=[0, 1, 2], history_only=True,
                                attention="self")
    assert sink.spec()["history_only"] is True and "window" not in sink.spec()
    assert parse_entry(parse_flag("policy", "sink:6:2"), 6, 4).spec() == dict(
        kind="policy", label="policy-sink6+sink2", policy="sink", window=6, sink_frames=2)
    assert Entry(kind="baseline", label="baseline").spec() == dict(kind="baseline", label="baseline")
    old = lambda e: {k: v for k, v in dataclasses.asdict(e).items() if v is not None and k != "split"}  # noqa: E731
    assert same_settings(old(knock), knock) and same_settings(knock.spec(), knock)
    assert not same_settings(old(sink), sink) and same_settings(sink.spec(), sink)
    assert "a spec entry with history_only: false and label: sink0x0:all is that" in older_differs(old(sink), sink)
    every_call = parse_entry(dict(kind="sink", frames=0, value=0, history_only=False), 6, 4)
    assert every_call.label == "sink0x0:all.every-call"  # (not the default entry's label)
    as_old = parse_entry(dict(kind="sink", frames=0, value=0, history_only=False, label="sink0x0:all"), 6, 4)
    assert same_settings(old(sink), as_old)  # (what the old entry ran; its spec said history_only true)
    assert not same_settings(dict(knock.spec(), frames=[0]), knock)
    fifo = parse_entry(parse_flag("policy", "fifo:6"), 6, 4)
    assert same_settings(old(fifo), fifo) and older_differs(old(fifo), fifo) is None
    split = Entry(kind="policy", policy="headwise", window=6, store="s.zarr", sink_frames=1, label="h")
    assert not same_settings(old(split), split) and "head-wise split chose" in older_differs(old(split), split)
    unsplit = {k: v for k, v in split.spec().items() if k != "split"}  # (a spec of its kind, before `split`)
    assert not same_settings(unsplit, split) and older_differs(unsplit, split) and same_settings(split.spec(), split)
    import os  # a spec before static_heads: its store path, the same store named another way, is the same
    assert same_settings(dict(split.spec(), store=os.path.abspath("s.zarr")), split)
    assert not same_settings(dict(split.spec(), store=os.path.abspath("t.zarr")), split)
    # a deep sink of a store made before its rule (the sink alone beside the next chunk never moved) is another's
    deep = parse_entry(parse_flag("policy", "deepsink:6"), 6, 4, chunk_frames=3)
    assert deep.spec()["sink_rule"] == "sink_alone_moves" and "sink_rule" not in fifo.spec()
    before = {k: v for k, v in deep.spec().items() if k != "sink_rule"}
    assert not same_settings(before, deep) and "left the sink where it was" in older_differs(before, deep)
    assert same_settings(deep.spec(), deep)


def test_entries_that_would_fail_midway_or_do_nothing_are_refused_up_front(tmp_path, capsys):
    """Found by trying the CLI: a policy window too small for a chunk, a knockout that leaves the first chunk
    nothing to attend to, a sink entry of frames no later chunk sees, fields past a flag's form (ignored), a fifo
    policy with a sink (ignored), a knockout of frames no later chunk sees (it changed nothing, silently), and
    --capture of a knockout of some heads (the capture read the call's mask, so
    the knocked-out heads' mass showed the frames they never saw): each one line, before the baseline runs."""
    out = tmp_path / "fx.zarr"
    base = ["intervene", "--frames", "6", "--world", "off", "--no-progress", "--out", str(out)]
    spec = tmp_path / "spec.yaml"
    cases = [
        (["--policy", "fifo:2"], "policy window 2: it must hold the 0 sink frame(s) and a chunk of 3: at least 3"),
        (["--policy", "sink:4:2"], "at least 5"),
        (["--policy", "fifo:6:1"], "a fifo policy keeps no sink (sink_frames 1); use the sink policy"),
        (["--ablate", "3:0:zero:extra"], "--ablate '3:0:zero:extra': use LAYERS:HEADS"),
        ("- {kind: knockout, frames: 0-2, history_only: false}", "the first chunk's query frames 0-2 would attend"),
        (["--policy", "deepsink:6:0"], "a deep sink of 0 sink frames is a fifo window"),
        ("- {kind: sink, frames: 3-5, value: 0}", "sink of frames 3-5 with history_only true changes nothing: it "
                                                  "scales a frame's logits in the chunks that start after it"),
        (["--knockout", "3-5"], "knockout of frames 3-5 with history_only true changes nothing: it hides a frame "
                                "from the chunks that start after it, and the last chunk (1) starts at frame 3"),
        ("- {kind: knockout, frames: 1, chunks: 0}", "the last chosen chunk (0) starts at frame 0"),
        (["--capture", "2", "--spec", str(spec)], "--capture with a knockout of some heads only"),
    ]
    for args, message in cases:
        if isinstance(args, str):
            spec.write_text("interventions:\n  " + args + "\n")
            args = ["--spec", str(spec)]
        else:
            spec.write_text("interventions:\n  - {kind: knockout, frames: 0-2, layers: 2, heads: 0}\n")
        assert main(base + args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("workbench intervene: error: ") and message in err, err
        assert not out.exists()


def test_an_entry_of_the_same_label_with_other_settings_is_refused(tmp_path, capsys):
    """A resample ablation's default label leaves out its source prompt: a re-run with another --resample-prompt
    took the store's entry as done; refused, naming it."""
    out = tmp_path / "fx.zarr"
    run = ["intervene", "--frames", "3", "--world", "off", "--no-progress", "--out", str(out), "--ablate",
           "1:0:resample"]
    assert main([*run, "--resample-prompt", "a blue circle moving up"]) == 0
    assert main([*run, "--resample-prompt", "a green square moving left"]) == 2
    assert "holds entries ['ablate-resample:L1.H0'] made with other settings" in capsys.readouterr().err
    assert main([*run, "--resample-prompt", "a blue circle moving up"]) == 0  # the same: nothing to do


def test_the_head_maps_take_each_heads_plain_ablation_only():
    """The report's layer x head maps show one head zeroed in self-attention at every step and chunk; ablations of
    the same head in cross-attention or at some steps or chunks only were averaged into its cell."""
    import json

    import xarray as xr

    from studies.effects_report import single_head_ablations
    from workbench.intervene_entries import Entry

    entries = [Entry("baseline", "baseline"), Entry("ablate", "a", layers=[4], heads=[3]),
               Entry("ablate", "b", layers=[4], heads=[3], attention="cross"),
               Entry("ablate", "c", layers=[4], heads=[3], steps=[0], chunks=[1]),
               Entry("ablate", "d", layers=[4], heads=[2], mode="mean"), Entry("ablate", "e", layers=[4], heads=[0, 1]),
               Entry("ablate", "f", layers=[2], heads=[1])]
    ds = xr.Dataset(coords={"intervention": [e.label for e in entries],
                            "intervention_spec": ("intervention", [json.dumps(e.spec()) for e in entries])})
    assert single_head_ablations(ds) == ["a", "f"]


def test_world_metrics_turned_off_by_a_prompt_are_named(tmp_path, capsys):
    """--world auto scores a run's prompts all or none: a prompt outside the miniature world turns the metrics off
    for the run, and a note names it (the report only said 'the model or the prompts are not the world's')."""
    import xarray as xr

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red kite\na green circle moving down\n")
    out = tmp_path / "fx.zarr"
    assert main(["intervene", "--ablate", "3:0", "--prompts", str(prompts), "--frames", "3", "--out", str(out),
                 "--no-progress"]) == 0
    assert ("note: no world metrics in this run: 1 of its 2 prompt(s) are not the miniature world's (one colour, "
            "shape and direction), e.g. 'a red kite'") in capsys.readouterr().out
    assert "trajectory_error" not in xr.open_zarr(out, consolidated=False)


def test_the_world_numbers_keep_the_parts_of_adherence(tmp_path):
    """adherent is the object shown in half the frames (detected) and colour_ok and shape_ok and direction_ok: the
    store keeps every part (direction_ok alone was kept, so a drop in adherence could not be explained); a store
    made before them takes new entries without."""
    import shutil

    import xarray as xr
    import zarr

    out = tmp_path / "fx.zarr"
    assert main(["intervene", "--frames", "6", "--ablate", "3:0", "--out", str(out), "--no-progress"]) == 0
    ds = xr.open_zarr(out, consolidated=False)
    parts = [ds[f"world_{k}"] for k in ("colour_ok", "shape_ok", "direction_ok")]
    shown = ds.world_detected >= 0.5
    np.testing.assert_array_equal(ds.world_adherent.values, (parts[0] * parts[1] * parts[2] * shown).values)
    assert ds.world_shape_ok.attrs["units"] == "0/1"
    import re

    from workbench.intervene import ranking, ranking_text  # (the printed table: units under the world columns)

    text = ranking_text(out).splitlines()
    header = next(i for i, line in enumerate(text) if line.startswith("intervention "))
    assert text[header + 1].startswith("(units) ")
    for name, unit in [("trajectory_error", "px"), ("d_trajectory_error", "px"), ("speed", "px/frame"),
                       ("adherent", "share"), ("effect", "")]:  # (each right-aligned under its column's name)
        start, end = re.search(rf"\b{name}\b", text[header]).span()
        below = text[header + 1][:end]
        assert below.endswith(f" {unit}") if unit else not below[start:].strip(), name

    missed = ranking(ds)["missed"]
    for label in ds.intervention.values:
        want = [f"{k} {int((ds[f'world_{k}_ok'].sel(intervention=label) < 1).sum())}/1"
                for k in ("colour", "shape", "direction") if ds[f"world_{k}_ok"].sel(intervention=label).item() < 1]
        want = ["shown 1/1"] * bool(ds.world_detected.sel(intervention=label).item() < 0.5) + want
        assert missed[label] == "; ".join(want), label
    edited = ds.load().copy(deep=True)
    edited["world_shape_ok"].loc[dict(intervention="baseline")] = 0.0
    edited["world_direction_ok"].loc[dict(intervention="baseline")] = 0.0
    assert ranking(edited)["missed"]["baseline"] == "shape 1/1; direction 1/1"
    edited["world_detected"].loc[dict(intervention="baseline")] = 0.3  # (a store scored before MIN_SHOWN: adherent)
    assert ranking(edited)["missed"]["baseline"] == "shape 1/1; direction 1/1"
    edited["world_adherent"].loc[dict(intervention="baseline")] = 0.0
    assert ranking(edited)["missed"]["baseline"] == "shown 1/1; shape 1/1; direction 1/1"
    for name in ("world_colour_ok", "world_shape_ok"):  # a store from before: without them
        shutil.rmtree(out / name)
    meta = zarr.open_group(out, mode="r").attrs.asdict()
    assert main(["intervene", "--frames", "6", "--ablate", "3:0", "--knockout", "0-2", "--out", str(out),
                 "--no-progress"]) == 0
    older = xr.open_zarr(out, consolidated=False)
    assert list(older.intervention.values)[-1] == "knockout0-2:all" and "world_shape_ok" not in older
    assert meta["completed"] == ["baseline", "ablate-zero:L3.H0"]


def test_world_numbers_of_another_scorer_are_not_mixed_in(tmp_path, capsys):
    """The store records the world scorer (studies/world_metrics.py's sha256): entries scored by another version of
    the tracker or its rules (adherence before MIN_SHOWN) are refused, not appended beside this one's; a store made
    before the record takes new entries with a note that says so."""
    import zarr

    from workbench.extract import fingerprint_of
    from workbench.scores import scorer_sha256

    out = tmp_path / "fx.zarr"
    run = ["intervene", "--frames", "6", "--ablate", "3:0", "--out", str(out), "--no-progress"]
    assert main(run) == 0
    group = zarr.open_group(out, mode="r+")
    fields = json.loads(json.dumps(dict(group.attrs)["fingerprint_fields"]))
    assert fields["model"]["world_scorer"] == scorer_sha256()[:16]
    fields["model"]["world_scorer"] = "0" * 16
    group.attrs.update(fingerprint_fields=fields, fingerprint=fingerprint_of(fields))
    capsys.readouterr()
    assert main(run + ["--knockout", "0-2"]) == 2
    assert "world_scorer" in capsys.readouterr().err
    del fields["model"]["world_scorer"]
    group.attrs.update(fingerprint_fields=fields, fingerprint=fingerprint_of(fields))
    assert main(run + ["--knockout", "0-2"]) == 0
    assert "did not record the world metrics' scorer (studies/world_metrics.py" in capsys.readouterr().out


def test_what_a_policy_decided_is_stored_and_reported(tmp_path, monkeypatch, capsys):
    """A head-wise cache's static heads (from its store) and a deep sink's moved positions are in the effects
    store (intervention_detail) and its report: they were only in a Python call or the code."""
    import xarray as xr

    from studies.report import build_report
    from workbench.kv_policies import static_heads_from_store

    heads = tmp_path / "heads.zarr"
    assert main(["extract", "--layers", "all", "--frames", "12", "--steps", "0", "--out", str(heads),
                 "--no-progress"]) == 0
    out = tmp_path / "fx.zarr"
    assert main(["intervene", "--frames", "12", "--world", "off", "--policy", f"headwise:9:1:{heads}",
                 "--policy", "deepsink:9:3", "--out", str(out), "--no-progress"]) == 0
    ds = xr.open_zarr(out, consolidated=False)
    detail = dict(zip(ds.intervention.values.tolist(), ds.intervention_detail.values.tolist()))
    static = static_heads_from_store(heads, 0.8, 6, sink_frames=1)
    want = "; ".join(f"layer {layer}: {', '.join(map(str, h))}" for layer, h in sorted(static.items())) or "none"
    assert detail["baseline"] == "" and detail[ds.intervention.values[1]].endswith(want)
    assert detail[ds.intervention.values[2]].startswith("sink frames 0-2 kept, their temporal RoPE positions moved")
    text = build_report(out, tmp_path / "fx.html").read_text()
    assert "As they ran: " in text and want in text
    # the entry is known by the static heads its store gave, not by the path that named the store: a copy of the
    # store, named relative to another folder, resumes it; another static_recent is refused, saying so
    import json
    import shutil

    spec = json.loads(str(ds.intervention_spec.values[1]))
    assert spec["static_heads"] == [[layer, h] for layer, hs in sorted(static.items()) for h in hs]
    shutil.copytree(heads, tmp_path / "moved" / "copy.zarr")
    monkeypatch.chdir(tmp_path / "moved")
    capsys.readouterr()
    assert main(["intervene", "--frames", "12", "--world", "off", "--policy", "headwise:9:1:copy.zarr",
                 "--policy", "deepsink:9:3", "--out", str(out), "--no-progress"]) == 0
    assert "all 3 entries of this run (baseline included) are already there; nothing to do" in capsys.readouterr().out
    spec_file = tmp_path / "t.yaml"
    spec_file.write_text(f"interventions:\n- {{kind: policy, policy: headwise, window: 9, sink_frames: 1, "
                         f"store: copy.zarr, static_recent: 3, label: {ds.intervention.values[1]}}}\n")
    assert main(["intervene", "--frames", "12", "--world", "off", "--spec", str(spec_file), "--out", str(out),
                 "--no-progress"]) == 2
    assert "static_recent: 6 in the store, 3 in this run" in capsys.readouterr().err
    # a split that changes nothing (static heads keeping every frame the window holds) is refused
    assert main(["intervene", "--frames", "12", "--world", "off", "--policy", "headwise:7:1:copy.zarr",
                 "--out", str(tmp_path / "none.zarr"), "--no-progress"]) == 2
    assert "static_recent 6 keeps every frame a window of 7 holds beside its 1 sink frame(s)" in \
        capsys.readouterr().err


def test_a_headwise_spec_round_trips_with_its_static_heads(tmp_path):
    """A stored headwise spec pasted into a --spec file parses (static_heads was an unknown key); static_heads alone
    is a hand-picked split; given beside a store, they must be the store's."""
    from studies import synthetic
    from workbench.intervene_entries import build_policy, parse_entry, static_heads_of
    from workbench.kv_policies import HeadWise

    store = synthetic.write_store(tmp_path / "s.zarr", "causal", layers=(0, 1), num_heads=4)
    made = parse_entry(dict(kind="policy", policy="headwise", window=9, sink_frames=1, store=str(store)), 6, 4)
    again = parse_entry(made.spec(), 6, 4)
    assert again.static_heads == made.static_heads and again.spec() == made.spec()
    hand = parse_entry(dict(kind="policy", policy="headwise", window=9, sink_frames=1, static_heads=[[2, 1], [0, 3]]),
                       6, 4)
    assert hand.static_heads == [[0, 3], [2, 1]] and static_heads_of(hand) == {0: [3], 2: [1]}
    assert isinstance(build_policy(hand), HeadWise)
    moved = dict(made.spec(), store=str(tmp_path / "gone.zarr"))  # (the store moved away: the heads suffice)
    assert parse_entry(moved, 6, 4).static_heads == made.static_heads
    pairs = "give \\[layer, head\\] pairs"
    for bad, message in (([[0, 3]], "differ from the heads store"), ([[6, 0]], r"static_heads \[\[6, 0\]\] out of "
                         "range"), ("0:3", pairs), ([[True, 0]], pairs)):  # (a boolean is no layer)
        with pytest.raises(WorkbenchError, match=message):
            parse_entry(dict(made.spec(), static_heads=bad), 6, 4)
    assert parse_entry(dict(hand.spec(), static_heads=[[np.int64(1), 2]]), 6, 4).static_heads == [[1, 2]]
    for other in (dict(kind="policy", policy="fifo", window=9), dict(kind="ablate", layers=0, heads=1)):
        with pytest.raises(WorkbenchError, match="static_heads is a headwise policy's setting"):
            parse_entry(dict(other, static_heads=[[0, 0]]), 6, 4)


def test_a_headwise_policy_whose_window_holds_every_frame_still_masks_its_static_heads():
    """A window + sink policy whose window holds every frame of the rollout changes nothing and is refused; a
    headwise one then still masks its static heads (they see the sink and the newest static_recent frames), so it
    runs, unless it has no static head or static_recent lets a static head see every frame the rollout holds. A
    split with no static head is the sink policy: said so."""
    import warnings

    from models.errors import ModelInputWarning
    from workbench.intervene_entries import parse_entry

    bounds = dict(num_layers=6, num_heads=4, num_frames=12, chunk_frames=3)
    hand = dict(kind="policy", policy="headwise", window=21, sink_frames=1, static_recent=3, static_heads=[[0, 1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_entry(hand, **bounds).static_heads == [[0, 1]]  # (window 21 > 12 frames: not refused)
    with pytest.raises(WorkbenchError, match=r"static_heads is empty, and cache policy headwise \(window 21, "
                       r"sink_frames 1\) holds 21 frames: all 12 frames of the rollout fit"):
        parse_entry(dict(hand, static_heads=[]), **bounds)
    with pytest.raises(WorkbenchError, match=r"static_recent 11 keeps every frame the rollout's 12 frames hold beside "
                       r"its 1 sink frame\(s\).*; give more --frames than 12 \(.*\), or static_recent below 11"):
        parse_entry(dict(hand, static_recent=11), **bounds)
    parse_entry(dict(hand, static_recent=10), **bounds)  # (a static head sees 11 of the 12)
    with pytest.raises(WorkbenchError, match=r"static_heads is empty, and cache policy headwise \(window 12, "):
        parse_entry(dict(hand, window=12, static_heads=[]), **bounds)  # (a window of exactly the rollout's frames)
    with pytest.raises(WorkbenchError, match=r"static_recent 3 keeps every frame a window of 4 holds beside its 1 "
                       r"sink frame\(s\).*; a --spec entry sets it\)$"):  # (no static_recent below 3: a chunk is 3)
        parse_entry(dict(hand, window=4), **bounds)
    with pytest.raises(WorkbenchError, match=r"every frame a window of 9 holds .*; give a window above 9 \("):
        parse_entry(dict(hand, window=9, static_recent=8), **bounds)
    with pytest.raises(WorkbenchError, match=r"every frame a window of 12 holds .*; give a window above 12 and more "
                       r"--frames than 12 \("):
        parse_entry(dict(hand, window=12, static_recent=11), **bounds)
    with pytest.warns(ModelInputWarning, match=r"static_heads is empty: this headwise policy is the sink policy "
                      r"sink:9:1; name some \[layer, head\] pairs in static_heads for a split"):
        parse_entry(dict(hand, window=9, static_heads=[]), **bounds)  # (an evicting window: it runs, as sink:9:1)


def test_the_command_line_says_an_entrys_warning_once(tmp_path, capsys):
    """`workbench intervene` checks its entries when it reads them and again when the run plans them: a warning
    (here: a head-wise split with no static head) is said once, not twice."""
    from workbench.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text("interventions:\n  - {kind: policy, policy: headwise, window: 6, sink_frames: 1, static_recent: 3, "
                    "static_heads: []}\n")
    assert main(["intervene", "--frames", "9", "--world", "off", "--spec", str(spec), "--out", str(tmp_path / "w.zarr"),
                 "--no-progress"]) == 0
    assert capsys.readouterr().err.count("this headwise policy is the sink policy sink:6:1") == 1


def test_entry_labels_name_video_folders_inside_the_videos_folder(tmp_path, capsys):
    """An entry's videos go to a folder named after its label: `..` wrote them beside the store (where generate's
    files of the same names live), `.x` into a hidden folder, and `a/b` and `a_b` shared one folder; now the first
    two stay inside, and labels sharing a folder are refused before any rollout."""
    from workbench.intervene import video_file, video_folder_name

    assert [video_folder_name(x) for x in (".", "..", ".x", "a/b", "ablate:3:0", "")] == \
        ["_", "_.", "_x", "a_b", "ablate_3_0", "_"]
    store = tmp_path / "fx.zarr"
    for label in (".", "..", "../../etc"):
        assert video_file(store, label, "p0000-s0").parent.parent == tmp_path / "fx_videos"
    spec = tmp_path / "spec.yaml"
    spec.write_text("interventions:\n  - {kind: ablate, layers: 0, heads: 0, label: a/b}\n"
                    "  - {kind: ablate, layers: 0, heads: 1, label: a_b}\n")
    assert main(["intervene", "--frames", "3", "--world", "off", "--save-videos", "--spec", str(spec),
                 "--out", str(store), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the labels [['a/b', 'a_b']] would keep their videos in one folder" in err and not store.exists()
    # videos an older workbench kept in a hidden folder (label .x) are still found there
    (tmp_path / "fx_videos" / ".x").mkdir(parents=True)
    (tmp_path / "fx_videos" / ".x" / "p0000-s0.png").write_bytes(b"png")
    assert video_file(store, ".x", "p0000-s0") == tmp_path / "fx_videos" / ".x" / "p0000-s0.png"
    assert video_file(store, ".y", "p0000-s0") == tmp_path / "fx_videos" / "_y" / "p0000-s0.png"
    (tmp_path / "secret.txt").write_text("a key")  # a store from elsewhere whose video is a link out of its folder
    (tmp_path / "fx_videos" / "l").mkdir()
    (tmp_path / "fx_videos" / "l" / "p0000-s0.png").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(WorkbenchError, match="is a link out of the videos folder .* which is no PNG file"):
        video_file(store, "l", "p0000-s0")
    (tmp_path / "annex.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))  # git-annex, cp -rs: links to videos
    (tmp_path / "fx_videos" / "l" / "p0000-s0.png").unlink()
    (tmp_path / "fx_videos" / "l" / "p0000-s0.png").symlink_to(tmp_path / "annex.png")
    assert video_file(store, "l", "p0000-s0") == tmp_path / "fx_videos" / "l" / "p0000-s0.png"
    (tmp_path / "elsewhere").mkdir()  # a link to the store itself: its videos beside the store
    (tmp_path / "elsewhere" / "fx.zarr").symlink_to(store)
    assert video_file(tmp_path / "elsewhere" / "fx.zarr", "l", "p0000-s0").parent.parent == tmp_path / "fx_videos"
    from workbench.intervene import videos_dir

    other = tmp_path / "renamed.zarr"  # a renamed store finds its folder by its attr, a folder beside it only
    assert videos_dir(other, {"videos_dir": "fx_videos"}) == tmp_path / "fx_videos"
    for given in ("/etc", "../elsewhere", "a/b", ".."):
        assert videos_dir(other, {"videos_dir": given}) == tmp_path / "renamed_videos"
    assert video_file(store, "a", "../../x") == tmp_path / "fx_videos" / "a" / "_._.._x.png"  # (a store's sample id)
    from workbench.view.sources import find_videos

    (tmp_path / "x.mp4").write_bytes(b"mp4")
    assert find_videos(tmp_path / "sub" / "s.zarr", None, ["../x", "p0000-s0"]) == {}  # (not followed out)
    # entries of the store saved without videos share no folder: a later run's videos are not refused for them
    assert main(["intervene", "--frames", "3", "--world", "off", "--spec", str(spec), "--out", str(store),
                 "--no-progress"]) == 0
    assert main(["intervene", "--frames", "3", "--world", "off", "--save-videos", "--ablate", "0:2", "--out",
                 str(store), "--no-progress"]) == 0
    spec.write_text("interventions:\n  - {kind: ablate, layers: 0, heads: 3, label: Ablate-zero_L0.H2}\n")
    capsys.readouterr()  # (one folder on a case-blind disk as the stored entry's, whose videos are there)
    assert main(["intervene", "--frames", "3", "--world", "off", "--save-videos", "--spec", str(spec), "--out",
                 str(store), "--no-progress"]) == 2
    assert "[['Ablate-zero_L0.H2', 'ablate-zero:L0.H2']]" in capsys.readouterr().err


def test_labels_with_escape_sequences_are_shown_not_obeyed(tmp_path, capsys):
    """The table intervene prints lists every entry of the store, a colleague's labels too: a label holding a
    terminal's escape sequences retitled and cleared the screen; it is printed with them escaped."""
    spec = tmp_path / "spec.yaml"
    spec.write_text('interventions:\n  - {kind: ablate, layers: 0, heads: 0, label: "\\e]0;PWNED\\a\\e[2Jred"}\n')
    assert main(["intervene", "--frames", "3", "--world", "off", "--spec", str(spec), "--out", str(tmp_path / "e.zarr"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;PWNED\\x07\\x1b[2Jred" in out
    from workbench.progress import printable

    assert printable("温度\u3000T=2, no\xa0break, é\n\u202e") == "温度\u3000T=2, no\xa0break, é\\n\\u202e"  # (spaces kept)


def test_the_table_keeps_its_columns_under_wide_labels(tmp_path, capsys):
    """A label in CJK letters takes two terminal columns a letter: padded by characters, its row's numbers stood
    left of the other rows'. Every row's number columns now end where the header's do, in terminal columns."""
    from workbench.progress import columns

    spec = tmp_path / "spec.yaml"
    spec.write_text("interventions:\n  - {kind: ablate, layers: 0, heads: 0, label: 温度を下げた頭}\n"
                    "  - {kind: ablate, layers: 0, heads: 1, label: plain}\n"
                    f"  - {{kind: ablate, layers: 0, heads: 2, label: {'長' * 30}}}\n")
    assert main(["intervene", "--frames", "3", "--world", "off", "--spec", str(spec), "--out", str(tmp_path / "w.zarr"),
                 "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("intervention "))):][:5]
    assert {columns(line) for line in table} == {columns(table[0])}, table
    assert any(line.startswith("温度を下げた頭 ") for line in table) and any("長" * 18 + " " in line for line in table)


def test_a_refusal_of_many_repeated_labels_names_ten():
    """A spec of 100,000 entries whose labels repeat: the refusal listed every label, 500 KB on one line."""
    from workbench.intervene_entries import Entry, check_entries

    entries = [Entry(kind="ablate", label=f"e{i % 500}") for i in range(1000)]
    words = r"labels \['e0', 'e1', 'e10', .*'e106'\] and 490 more are used twice"
    with pytest.raises(WorkbenchError, match=words) as err:
        check_entries(entries, "causal_few_step")
    assert len(str(err.value)) < 300


def test_a_refusal_names_only_the_schedule_setting_that_differs(tmp_path, capsys):
    """A store made at the default schedule records none of it; a run with --context-noise 50 was refused naming
    all four schedule settings as 'not set' in the store. A setting left out at its default is that default."""
    common = ["intervene", "--frames", "3", "--world", "off", "--ablate", "0:0", "--out", str(tmp_path / "fx.zarr"),
              "--no-progress"]
    assert main(common) == 0
    capsys.readouterr()
    assert main([*common, "--context-noise", "50"]) == 2
    err = capsys.readouterr().err
    assert "model.schedule.context_noise: 0.0 in the store, 50.0 in this run" in err, err
    assert "timestep_shift" not in err and "num_frame_per_block" not in err and "warp_denoising_step" not in err


def test_a_store_of_an_older_workbench_keeps_showing_its_videos(tmp_path):
    """A store made before the attr video_entries named its videos folder only (every entry saved its videos); a
    resumed run that lists its own entry there lists the older entries too, so theirs still show."""
    import zarr

    from workbench.intervene import saved_videos

    out = tmp_path / "fx.zarr"
    common = ["intervene", "--frames", "3", "--world", "off", "--save-videos", "--out", str(out), "--no-progress"]
    assert main([*common, "--ablate", "0:0"]) == 0
    group = zarr.open_group(out, mode="r+")
    assert group.attrs["video_entries"] == ["baseline", "ablate-zero:L0.H0"]
    del group.attrs["video_entries"]  # (as an older workbench left it)
    assert main([*common, "--ablate", "0:1"]) == 0
    attrs = dict(zarr.open_group(out, mode="r").attrs)
    assert attrs["video_entries"] == ["baseline", "ablate-zero:L0.H0", "ablate-zero:L0.H1"]
    assert all(saved_videos(attrs, label) for label in attrs["completed"])


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_stopped_or_failed_run_closes_its_progress_bar(tmp_path, monkeypatch, stop):
    """run_intervene stopped midway (Ctrl-C; a notebook's stop button) or failing closes its progress bar: a bar left
    open is drawn again under every later output of the session."""
    from tqdm import tqdm

    import workbench.extract as extract_mod
    from workbench.extract import ExtractConfig
    from workbench.intervene import run_intervene

    def stopped(*args, **kw):
        raise stop("stopped")

    monkeypatch.setattr(extract_mod, "sample_rollout", stopped)
    cfg = ExtractConfig(num_inference_steps=2, num_frames=3, seeds=[0], out=str(tmp_path / "fx.zarr"), progress=True)
    before = set(tqdm._instances)
    with pytest.raises(stop) as caught:  # (kept, with its frames, as Jupyter keeps the last one: sys.last_value)
        run_intervene(cfg, [dict(kind="ablate", layers=1, heads=0)], world="off", log=lambda *a: None)
    assert set(tqdm._instances) == before, caught


def test_the_page_leaves_layer_and_head_blank_for_entries_on_no_single_one():
    """The report's ranked table: the store's -1 (the baseline, a knockout, several layers) shows as a blank cell,
    a single layer and head as their numbers."""
    import pandas as pd

    from studies.effects_report import display_ranking

    table = pd.DataFrame({"kind": ["ablate", "knockout", "baseline"], "layer": [3, -1, -1], "head": [0, -1, -1],
                          "effect": [0.2, 0.5, 0.0], "missed": ["shape 1/2", "", ""]},
                         index=["ablate-zero:L3.H0", "knockout0-2:all", "baseline"])
    shown = display_ranking(table)
    assert shown["missed"].tolist() == ["shape 1/2", "none", "none"]  # (a blank read as missing data)
    assert shown["layer"].tolist() == ["3", "", ""] and shown["head"].tolist() == ["0", "", ""]
    assert table["layer"].tolist() == [3, -1, -1]  # (the table itself unchanged)


def test_an_entry_built_once_gives_each_sample_what_it_gives_alone(tmp_path, monkeypatch):
    """An entry's intervention is built once for all its samples (its CUDA graphs then replay) and a resample
    ablation's source of each sample is held in the first one's tensors: each sample's numbers are those of a run
    of that sample alone."""
    import xarray as xr

    import workbench.intervene as intervene_mod

    built = []
    monkeypatch.setattr(intervene_mod, "build", lambda e, sources, real=intervene_mod.build: built.append(e.label)
                        or real(e, sources))
    run = ["intervene", "--frames", "6", "--world", "off", "--no-progress", "--ablate", "1:0:resample", "--ablate",
           "2:1"]
    assert main([*run, "--seeds", "0-1", "--out", str(tmp_path / "both.zarr")]) == 0
    assert built == ["ablate-resample:L1.H0", "ablate-zero:L2.H1"]  # (once each, for both samples)
    assert main([*run, "--seeds", "1", "--out", str(tmp_path / "one.zarr")]) == 0
    both = xr.open_zarr(tmp_path / "both.zarr", consolidated=False).latent_distance_rel
    one = xr.open_zarr(tmp_path / "one.zarr", consolidated=False).latent_distance_rel
    assert both.sizes["sample"] == 2 and one.sizes["sample"] == 1
    np.testing.assert_array_equal(both.isel(sample=[1]).values, one.values)
    assert (both.isel(sample=1).values > 0).any()
