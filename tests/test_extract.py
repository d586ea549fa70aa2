"""`workbench extract` end to end on the embedded default (6 layers, 4 heads, 21 frames of 48 tokens):

- the store's values equal a dense float64 reference of the q, k the model really used (float32 and
  bfloat16; global attention and sink + window), with the coordinates docs/store.md defines;
- resume: a run killed mid-way (a real SIGKILL, and a kill between a sample's arrays and its `completed`
  mark) and restarted gives the same store as an uninterrupted run;
- torchrun with 2 CPU processes (gloo) gives the same store as one process;
- bad requests fail with one clear line before any weights are loaded.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from models.wan.embedded import default_model
import workbench.extract as extract_mod
from attention_reference import AttendRecorder, dense_frame_stats, expected_key_frames
from two_ranks import report, torchrun
from workbench.cli import main as cli_main
from workbench.errors import WorkbenchError
from workbench.extract import ExtractConfig, run_extract
from workbench.store import StoreWriter, open_store

REPO = Path(__file__).resolve().parents[1]
F, FSL, NFPB, STEPS, HEADS, LAYERS = 21, 48, 3, 5, 4, 6
PROMPTS = ["a red fox running through fresh snow", "a small blue boat on a misty lake"]


def config(out, **kw) -> ExtractConfig:
    """The library's config of a CLI run without model arguments: for causal samplers the zoo's default model (the
    DMD student: ExtractConfig's own default too; named, as `workbench extract` names it in the store's config)."""
    kw.setdefault("layers", [3])
    default = default_model()
    if default is not None and kw.get("sampler", "causal_few_step") != "bidirectional" and "wan_dir" not in kw:
        kw = {"model": default.name, **kw}
    return ExtractConfig(out=str(out), progress=False, **kw)


def quiet(*_args, **_kw):
    pass


def store_contents(path):
    """Every variable and coordinate as numpy, and the attrs that do not depend on when or where it ran."""
    ds = xr.open_zarr(path, consolidated=False).load()
    values = {name: ds[name].values for name in ds.variables}
    attrs = dict(ds.attrs)
    for volatile in ("created_utc", "command", "working_dir", "runs"):  # `runs`: the provenance of resuming runs
        attrs.pop(volatile, None)
    attrs["config_yaml"] = "\n".join(l for l in attrs["config_yaml"].splitlines() if not l.strip().startswith("out:"))
    return values, attrs


def assert_same_store(a, b):
    (va, aa), (vb, ab) = store_contents(a), store_contents(b)
    assert sorted(va) == sorted(vb)
    for name in va:
        x, y = va[name], vb[name]
        if x.dtype.kind == "f":
            assert np.array_equal(x, y, equal_nan=True), name
        else:
            assert np.array_equal(x, y), name
    assert aa == ab


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Reference store: 2 prompts x 2 seeds of layer 3, run in one go."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_extract(config(out, prompts=PROMPTS, seeds=[1, 2]), log=quiet)
    return out


# ------------------------------------------------------------------------------------------------------
# Values and coordinates


def test_the_order_of_stats_is_no_setting(tmp_path):
    """A store resumed or appended with the same statistics in another order takes the run (it was refused as
    another layout, offering only --overwrite); the store keeps its order. Other statistics are still refused."""
    out = tmp_path / "s.zarr"
    run_extract(config(out, num_frames=6, steps=[0], stats=["attn_mass", "attn_logit"]), log=quiet)
    run_extract(config(out, num_frames=6, steps=[0], stats=["attn_logit", "attn_mass"], seeds=[42, 7]), log=quiet)
    ds = open_store(out)
    assert ds.sizes["sample"] == 2 and ds.attrs["stats"] == ["attn_mass", "attn_logit"]
    with pytest.raises(WorkbenchError, match="layout.stats"):
        run_extract(config(out, num_frames=6, steps=[0], stats=["attn_logit"], seeds=[3]), log=quiet)


def test_a_kernel_that_refuses_a_shape_at_run_time_is_recorded(tmp_path, monkeypatch):
    """A kernel of the order that refuses a call shape at run time (as the CUDA library ops do; here a stand-in on
    the CPU) is named with the shape in the store's `attn_refused`, once however many samples meet it; those calls
    ran the next kernel (the numbers are the plain run's). `attn_backend` alone named the refusing kernel."""
    from models.common import attention_kernels as K

    sdpa = K.KERNELS["sdpa"]

    def fussy(q, k, v, scale, mask, fsl, lse):
        if k.shape[1] == 6 * FSL:  # (the second chunk's self-attention is refused)
            raise RuntimeError("no kernel for this shape (stand-in)")
        return sdpa.run(q, k, v, scale, mask, fsl, lse)

    plain = tmp_path / "plain.zarr"
    run_extract(config(plain, num_frames=6, steps=[0]), log=quiet)
    assert "attn_refused" not in open_store(plain).attrs
    monkeypatch.setitem(K.KERNELS, "fussy", K.Kernel("fussy", fussy, ("cpu",), None, ("unmasked",), refuses=True))
    monkeypatch.setitem(K.CHOICES, "auto", ("fussy", *K.CHOICES["auto"]))
    monkeypatch.setattr(K, "_REFUSED", {})
    monkeypatch.setattr(K, "_CANDIDATES", {})
    out = tmp_path / "s.zarr"
    with pytest.warns(RuntimeWarning, match="attention kernel 'fussy' refused q"):
        run_extract(config(out, num_frames=6, steps=[0], seeds=[42, 7]), log=quiet)
    ds = open_store(out)
    shape = lambda frames: f"[1, {frames * FSL}, {HEADS}, 32]"  # noqa: E731
    line = (f"fussy refused q {shape(3)}, k {shape(6)}, v {shape(6)} (no kernel for this shape (stand-in)); those "
            "calls ran the next kernel of the order ['fussy', ")
    assert ds.attrs["attn_backend"] == "fussy" and len(ds.attrs["attn_refused"]) == 1
    assert ds.attrs["attn_refused"][0].startswith(line)
    run_extract(config(out, num_frames=6, steps=[0], seeds=[42, 7, 3]), log=quiet)  # (appended: still one line)
    assert open_store(out).attrs["attn_refused"] == ds.attrs["attn_refused"]
    first = open_store(plain).attn_mass.sel(sample="p0000-s42")
    assert np.array_equal(first.values, ds.attn_mass.sel(sample="p0000-s42").values, equal_nan=True)


def test_a_float64_run_stores_every_statistic(tmp_path):
    """Every statistic in a float64 run (the reference runs): stored as float32 cells like any other run's, and
    close to the float32 run's (attn_frame_entropy's float64 values failed to enter its float32 cells)."""
    from workbench.statistics import STATISTICS

    stats = sorted(STATISTICS)
    runs = {}
    for dtype in ("float64", "float32"):
        run_extract(config(tmp_path / f"{dtype}.zarr", layers=[0], steps=[0, 4], num_frames=6, dtype=dtype, stats=stats,
                           token_layers=[0]), log=quiet)
        runs[dtype] = open_store(tmp_path / f"{dtype}.zarr")
    for stat in stats:
        a, b = runs["float64"][stat], runs["float32"][stat]
        assert a.dtype == np.float32 and np.array_equal(np.isnan(a.values), np.isnan(b.values)), stat
        assert float(abs(a - b).max()) <= 1e-4, stat


@pytest.mark.parametrize("dtype,window", [("float32", {}), ("bfloat16", {}),
                                          ("float32", dict(local_attn_size=9, sink_size=3))],
                         ids=["float32-global", "bfloat16-global", "float32-sink_window"])
def test_store_equals_float64_reference(tmp_path, monkeypatch, dtype, window):
    layers = [0, 5]
    recorders = []
    load = extract_mod.load_wan

    def load_and_record(*args, **kw):  # the very model run_extract uses, hooked by module path
        model = load(*args, **kw)
        recorders.append(AttendRecorder(model, layers))
        return model

    monkeypatch.setattr(extract_mod, "load_wan", load_and_record)
    out = tmp_path / "s.zarr"
    run_extract(config(out, layers=layers, dtype=dtype, **window), log=quiet)
    ds = open_store(out)
    # coordinates (docs/store.md)
    assert list(ds.sample.values) == ["p0000-s42"]
    assert ds.step.values.tolist() == [0, 1, 2, 3, 4] and ds.layer.values.tolist() == layers
    assert ds["head"].values.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(ds.timestep.values, [1000.0, 937.5, 833.3333, 625.0, 0.0], atol=1e-3)
    assert ds.phase.values.tolist() == ["denoise"] * 4 + ["context"]
    assert ds.denoise_index.values.tolist() == [0, 1, 2, 3, -1] and ds.cfg.values.tolist() == ["none"] * 5
    assert ds.query_chunk.values.tolist() == [f // 3 for f in range(F)] == ds.key_chunk.values.tolist()
    assert (ds.attrs["frame_seq_len"], ds.attrs["num_heads"], ds.attrs["num_layers"]) == (FSL, HEADS, LAYERS)
    assert ds.attrs["dtype"] == dtype and ds.local_attn_size.values.tolist() == [window.get("local_attn_size", -1)]
    assert ds.attn_mass.dims == ("sample", "step", "layer", "head", "query_frame", "key_frame")

    (rec,) = recorders
    local, sink = window.get("local_attn_size", -1), window.get("sink_size", 0)
    tol = 1e-6 if dtype == "float32" else 1e-3
    prev = None
    for li, layer in enumerate(layers):
        calls = rec.records[layer]
        assert len(calls) == 7 * STEPS  # 7 chunks x (4 steps + context): 35 calls per layer
        exp_mass, exp_logit = np.full((2, STEPS, HEADS, F, F), np.nan)
        for visit, (q, k, _) in enumerate(calls):
            chunk, step = divmod(visit, STEPS)
            qf = np.arange(chunk * NFPB, (chunk + 1) * NFPB)[:, None]
            kf = np.array(expected_key_frames(chunk, NFPB, local, sink))[None, :]
            mass, logit = dense_frame_stats(q, k, FSL)
            exp_mass[step][:, qf, kf], exp_logit[step][:, qf, kf] = mass[0].numpy(), logit[0].numpy()
        got_mass = ds.attn_mass.isel(sample=0, layer=li).values
        got_logit = ds.attn_logit.isel(sample=0, layer=li).values
        for got, exp, rel in ((got_mass, exp_mass, False), (got_logit, exp_logit, True)):
            assert np.array_equal(np.isnan(got), np.isnan(exp))  # NaN exactly outside the key windows
            ok = ~np.isnan(exp)
            scale = np.maximum(1.0, np.abs(exp[ok])) if rel and dtype == "float32" else 1.0
            assert (np.abs(got[ok] - exp[ok]) / scale).max() <= tol
        np.testing.assert_allclose(np.nansum(got_mass, axis=-1), 1.0, atol=1e-3)
        # the reference separates the two layers, so swapped layers could not pass
        if prev is not None:
            assert np.nanmax(np.abs(exp_mass - prev)) > 100 * tol
        prev = exp_mass
    if local != -1:  # the last chunk sees the 3 sink frames and frames 15-20 only
        last = ds.attn_mass.isel(sample=0, step=0, layer=0, head=0, query_frame=20).values
        assert np.flatnonzero(~np.isnan(last)).tolist() == [0, 1, 2] + list(range(15, 21))


def test_bidirectional_store_labels_and_values(tmp_path, monkeypatch):
    """The Wan baseline sampler: one chunk of 21 frames, CFG branches as steps, every pair attended; the text keys
    of cross_mass's uncond rows are the negative prompt's tokens, labelled as such."""
    recorders = []
    load = extract_mod.load_wan

    def load_and_record(*args, **kw):
        model = load(*args, **kw)
        assert kw["causal"] is False
        recorders.append(AttendRecorder(model, [2]))
        return model

    monkeypatch.setattr(extract_mod, "load_wan", load_and_record)
    out = tmp_path / "b.zarr"
    run_extract(config(out, layers=[2], sampler="bidirectional", num_inference_steps=2,
                       negative_prompt="a blurry video", stats=["attn_mass", "attn_logit", "cross_mass"]), log=quiet)
    ds = open_store(out)
    words = lambda tokens, n: "".join(tokens[:n]).replace("\u2581", " ").strip()  # noqa: E731 (sentencepiece's space)
    assert words(ds.token.values[0], int(ds.num_tokens[0])) == f"{ds.prompt.values[0]}</s>"
    assert words(ds.uncond_token.values[0], int(ds.uncond_num_tokens[0])) == "a blurry video</s>"
    assert ds.step.values.tolist() == [0, 1, 2, 3] and ds.cfg.values.tolist() == ["cond", "uncond"] * 2
    assert ds.denoise_index.values.tolist() == [0, 0, 1, 1] and ds.phase.values.tolist() == ["denoise"] * 4
    assert ds.timestep.values[0] == ds.timestep.values[1] > ds.timestep.values[2] == ds.timestep.values[3]
    assert (ds.query_chunk.values == 0).all() and ds.sampler.values.tolist() == ["bidirectional"]
    (rec,) = recorders
    assert len(rec.records[2]) == 4
    for visit, (q, k, call) in enumerate(rec.records[2]):
        assert call.query_frames == call.key_frames == tuple(range(F)) and call.labels.step == visit
        mass, logit = dense_frame_stats(q, k, FSL)
        got = ds.isel(sample=0, layer=0, step=visit)
        assert np.abs(got.attn_mass.values - mass[0].numpy()).max() <= 1e-6  # no NaN anywhere
        assert (np.abs(got.attn_logit.values - logit[0].numpy()) / np.maximum(1, np.abs(logit[0].numpy()))).max() <= 1e-6
    assert np.abs(ds.attn_mass.isel(step=0).values - ds.attn_mass.isel(step=1).values).max() > 1e-3  # cond != uncond


# ------------------------------------------------------------------------------------------------------
# Resume


def test_killed_run_resumes_to_the_same_store(tmp_path, uninterrupted):
    """A real kill: start the CLI, SIGKILL it once the first sample is marked complete, run it again."""
    out = tmp_path / "killed.zarr"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = ["extract", "--layer", "3", "--prompts", str(prompts), "--seed", "1,2", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "workbench.cli", *argv], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    completed = []
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            completed = json.loads((out / "zarr.json").read_text())["attributes"]["completed"]
        except (OSError, ValueError, KeyError):
            completed = []
        if completed:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 1 <= len(completed) < 4
    assert cli_main(argv) == 0  # the same command resumes
    assert_same_store(out, uninterrupted)


def test_kill_between_arrays_and_completed_mark_resumes(tmp_path, monkeypatch, uninterrupted):
    """The worst moment: the third sample's arrays are appended but its `completed` mark is not yet written.
    The next run must keep the two finished samples, drop the partial third and recompute it."""
    import zarr

    out = tmp_path / "partial.zarr"
    real_to_zarr, real_open_group = xr.Dataset.to_zarr, zarr.open_group
    appended = []

    def to_zarr(ds, *args, **kw):  # (a failed append is taken back: the kill comes after it, at the mark)
        result = real_to_zarr(ds, *args, **kw)
        if kw.get("append_dim"):
            appended.append(str(ds["sample"].values[0]))
        return result

    def open_group(*args, mode=None, **kw):
        if mode == "r+" and appended[-1:] == ["p0001-s1"]:
            raise KeyboardInterrupt("killed after the arrays, before the mark")
        return real_open_group(*args, mode=mode, **kw)

    monkeypatch.setattr(xr.Dataset, "to_zarr", to_zarr)
    monkeypatch.setattr(zarr, "open_group", open_group)
    with pytest.raises(KeyboardInterrupt):
        run_extract(config(out, prompts=PROMPTS, seeds=[1, 2]), log=quiet)
    monkeypatch.setattr(xr.Dataset, "to_zarr", real_to_zarr)
    monkeypatch.setattr(zarr, "open_group", real_open_group)
    on_disk = xr.open_zarr(out, consolidated=False)
    assert on_disk.sizes["sample"] == 3 and on_disk.attrs["completed"] == ["p0000-s1", "p0000-s2"]
    first = store_contents(out)[0]["attn_mass"][:2].copy()
    with StoreWriter(out, on_disk.attrs["fingerprint"]) as writer:  # what a resuming run opens: the partial goes
        assert writer.completed == ["p0000-s1", "p0000-s2"]
    assert xr.open_zarr(out, consolidated=False).sizes["sample"] == 2
    written = []
    real_write = StoreWriter.write
    monkeypatch.setattr(StoreWriter, "write", lambda self, ds, **kw: (written.append(str(ds["sample"].values[0])),
                                                                       real_write(self, ds, **kw)))
    said = []
    run_extract(config(out, prompts=PROMPTS, seeds=[1, 2]), log=said.append)
    assert written == ["p0001-s1", "p0001-s2"]  # only the unfinished samples were recomputed
    assert f"resuming: 2 of 4 samples are already in {out}; computing the other 2" in said
    assert np.array_equal(store_contents(out)[0]["attn_mass"][:2], first, equal_nan=True)
    assert_same_store(out, uninterrupted)
    messages = []
    run_extract(config(out, prompts=PROMPTS, seeds=[1, 2]), log=messages.append)  # nothing left to do
    assert "nothing to do" in messages[0]


def test_append_adds_samples_of_a_compatible_configuration(tmp_path, uninterrupted):
    out = tmp_path / "appended.zarr"
    run_extract(config(out, prompts=PROMPTS, seeds=[1]), log=quiet)
    with pytest.raises(extract_mod.WorkbenchError, match="another configuration"):
        run_extract(config(out, prompts=PROMPTS, seeds=[2], layers=[2]), log=quiet)
    run_extract(config(out, prompts=PROMPTS, seeds=[2], mode="append"), log=quiet)
    ds = open_store(out)
    assert list(ds.sample.values) == ["p0000-s1", "p0001-s1", "p0000-s2", "p0001-s2"]
    ref = open_store(uninterrupted)
    for sid in ds.sample.values:
        assert np.array_equal(ds.attn_mass.sel(sample=sid).values, ref.attn_mass.sel(sample=sid).values, equal_nan=True)


# ------------------------------------------------------------------------------------------------------
# torchrun


def test_torchrun_two_cpu_processes_give_the_single_process_store(tmp_path, one_thread, capsys):
    """`python -m torch.distributed.run --nproc_per_node=2` (gloo): 3 samples dealt over 2 ranks, written by
    rank 0 in the single-process order. Both runs use one thread per process (torchrun's default; the single
    process is this one)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS + ["a steam train crossing a bridge"]) + "\n")
    common = ["extract", "--layers", "1,4", "--prompts", str(prompts), "--seed", "7", "--no-progress"]
    dist = torchrun(["-m", "workbench.cli", *common, "--out", tmp_path / "dist.zarr"], fresh=[tmp_path / "dist.zarr"],
                    cwd=tmp_path)
    assert dist.returncode == 0, report(dist)
    assert cli_main([*common, "--out", str(tmp_path / "one.zarr")]) == 0
    capsys.readouterr()
    assert_same_store(tmp_path / "dist.zarr", tmp_path / "one.zarr")
    assert list(open_store(tmp_path / "dist.zarr").sample.values) == ["p0000-s7", "p0001-s7", "p0002-s7"]
    assert "wrote" in dist.stdout and dist.stdout.count("attention mass per layer and head") == 1  # rank 0 reports once


def test_torchrun_refuses_an_incompatible_store_on_every_rank(tmp_path):
    """Rank 0's refusal reaches every rank (no rank left waiting in a collective)."""
    out = tmp_path / "s.zarr"
    run_extract(config(out, layers=[3]), log=quiet)
    r = torchrun(["-m", "workbench.cli", "extract", "--layer", "2", "--out", out, "--no-progress"], cwd=tmp_path,
                 timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("was made with another configuration") == 2, report(r)


def test_each_rank_takes_its_own_gpu(monkeypatch):
    """Under torchrun a bare 'cuda' means cuda:LOCAL_RANK (not every rank on GPU 0); explicit devices stay."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert extract_mod._rank_device("cuda", 2) == torch.device("cuda", 1)
    assert extract_mod._rank_device("cuda:0", 2) == torch.device("cuda", 0)
    assert extract_mod._rank_device("cuda", 1) == torch.device("cuda")
    assert extract_mod._rank_device("cpu", 2) == torch.device("cpu")


# ------------------------------------------------------------------------------------------------------
# Errors before work


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if extraction gets as far as loading weights."""
    def refuse(*a, **kw):
        raise AssertionError("weights were loaded before the request was validated")

    monkeypatch.setattr(extract_mod, "load_wan", refuse)
    monkeypatch.setattr(extract_mod, "sha256_file", refuse)
    monkeypatch.setattr(extract_mod, "weights_sha256", refuse)


@pytest.mark.parametrize("args,message", [
    (["--layer", "6"], "layer [6] out of range: the model has layers 0-5"),
    (["--layers", "0,7-8"], "layer [7, 8] out of range: the model has layers 0-5"),
    (["--heads", "0,4"], "head [4] out of range: the model has heads 0-3"),
    (["--stats", "attn_mass,attn_entropy"], "unknown statistic(s) ['attn_entropy']"),
    (["--stats", ""], "no statistic to capture"),
    (["--layers", "3-1"], "layer '3-1': the range 3-1 is empty; write it low to high (1-3)"),
    (["--steps", "5"], "step [5] out of range: the causal_few_step schedule has steps 0-4"),
    (["--frames", "20"], "--frames 20 does not divide into chunks of 3; use a multiple of 3 (e.g. 18 or 21)"),
    (["--frames", "10", "--num-frame-per-block", "4"], "use a multiple of 4 (e.g. 8 or 12)"),  # (not "e.g. 21")
    (["--local-attn-size", "1", "--sink-size", "1"],  # (the flags named, not the model folder's config.json)
     "--local-attn-size 1: the window must hold the sink (1 frame) and a chunk (3 frames): at least 4"),
    (["--frames", "24"], "more than the KV cache holds"),
    (["--layers", "x"], "use a number, a range like 0-29"),
    (["--stats", "attn_key_token"], "attn_key_token needs --token-layers"),
])
def test_bad_requests_fail_before_work(tmp_path, capsys, no_work, args, message):
    assert cli_main(["extract", *args, "--out", str(tmp_path / "x.zarr"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("workbench extract: error: ") and message in err, err
    assert not (tmp_path / "x.zarr").exists()


def test_empty_prompt_file_fails_before_work(tmp_path, capsys, no_work):
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n   \n\n")
    assert cli_main(["extract", "--prompts", str(empty), "--out", str(tmp_path / "x.zarr")]) == 2
    assert "has no prompts" in capsys.readouterr().err


def test_repeated_prompt_extracts_every_prompt(tmp_path, monkeypatch):
    """--prompt given twice reaches the extraction as two prompts, in order (not only the last)."""
    seen = {}

    def record(cfg, **kw):
        seen["prompts"], seen["command"] = list(cfg.prompts), kw["command"]
        return 0

    monkeypatch.setattr(extract_mod, "run_extract", record)
    argv = ["extract", "--layer", "0", "--prompt", "a red square moving left", "--prompt", "a blue circle moving up",
            "--out", str(tmp_path / "x.zarr"), "--no-progress"]
    assert cli_main(argv) == 0
    assert seen["prompts"] == ["a red square moving left", "a blue circle moving up"]
    assert seen["command"] == ["workbench", *argv]  # the store's command: what main was given, not sys.argv


def test_incompatible_existing_store_fails_before_weights(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s.zarr"
    run_extract(config(out, layers=[3]), log=quiet)

    def refuse(*a, **kw):
        raise AssertionError("weights were loaded before the store was checked")

    monkeypatch.setattr(extract_mod, "load_wan", refuse)
    for args, why in ((["--layer", "2"], "another configuration (layout.layers: [3] in the store, [2] in this run)"),
                      (["--layer", "3", "--heads", "0,1"], "layout.heads: [0, 1, 2, 3] in the store, [0, 1] in this run"),
                      (["--layer", "3", "--stats", "attn_mass"],
                       "layout.stats: ['attn_mass', 'attn_logit'] in the store, ['attn_mass'] in this run"),
                      (["--layer", "3", "--local-attn-size", "9"],  # the model's attention window: another model
                       "another model or sampler setting (model.config.local_attn_size: -1 in the store, 9 in this run)")):
        assert cli_main(["extract", *args, "--out", str(out), "--no-progress"]) == 2
        assert why in capsys.readouterr().err
    not_a_store = tmp_path / "folder"
    (not_a_store / "sub").mkdir(parents=True)
    assert cli_main(["extract", "--layer", "3", "--out", str(not_a_store), "--no-progress"]) == 2
    assert "is not a store (it holds sub); choose another --out" in capsys.readouterr().err
    (not_a_store / "thesis.tex").write_text("years of work")  # --overwrite replaces stores only (it replaced this)
    assert cli_main(["extract", "--layer", "3", "--out", str(not_a_store), "--overwrite", "--no-progress"]) == 2
    assert "never another folder" in capsys.readouterr().err and (not_a_store / "thesis.tex").exists()
    import zarr

    foreign = zarr.open_group(tmp_path / "theirs.zarr", mode="w")  # another program's zarr group: not ours to replace
    foreign.create_array("data", shape=(3,), dtype="f4")[:] = 1.0
    assert cli_main(["extract", "--layer", "3", "--out", str(tmp_path / "theirs.zarr"), "--overwrite",
                     "--no-progress"]) == 2
    assert "never another folder" in capsys.readouterr().err and (tmp_path / "theirs.zarr" / "data").is_dir()
    from workbench.store import StoreWriter

    (tmp_path / "empty").mkdir()
    StoreWriter(tmp_path / "empty", "fp", mode="overwrite").close()  # (an empty folder is replaced)
    # the same request resumes (nothing to do) and --overwrite replaces
    assert cli_main(["extract", "--layer", "3", "--out", str(out), "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_zoo_model_by_name_samples_as_its_table_says_in_python_too():
    """ExtractConfig(model="teacher") ran the teacher's weights in the students' 4-step sampler under the label
    embedded:teacher (only the CLI filled the zoo's sampler in); now the settings left unset are the model's own, and
    the ones given stay."""
    from models.wan.embedded import ZOO

    for name in ("teacher", "df", "dmd"):
        c = extract_mod.plan(ExtractConfig(model=name)).cfg
        z = ZOO[name]
        assert (c.sampler, c.num_inference_steps, c.guidance_scale) == (z.sampler, z.num_inference_steps,
                                                                         z.guidance_scale)
    c = extract_mod.plan(ExtractConfig(model="teacher", sampler="causal_few_step", guidance_scale=3.0)).cfg
    assert (c.sampler, c.num_inference_steps, c.guidance_scale) == ("causal_few_step", 40, 3.0)
    c = extract_mod.plan(ExtractConfig(wan_dir=str(extract_mod.require_embedded_dir()))).cfg  # (no zoo model)
    assert (c.sampler, c.num_inference_steps, c.guidance_scale) == ("causal_few_step", 50, 5.0)


def test_a_python_run_records_what_it_was_called_with(tmp_path):
    """The store's `command`: a string as a shell splits it (it was recorded letter by letter), and with none the
    program and the API function (it was the process's arguments: a Jupyter kernel's connection file)."""
    words = extract_mod.command_words
    assert words("analysis notebook", "f") == ["analysis", "notebook"]
    assert words(["workbench", "extract", "--prompt", "a b"], "f") == ["workbench", "extract", "--prompt", "a b"]
    assert words(None, "workbench.extract.run_extract")[:2] == ["workbench.extract.run_extract", "from"]
    assert words("my notebook's run", "f") == ["my notebook's run"]  # (an unbalanced quote: as given)
    out = tmp_path / "s.zarr"
    run_extract(ExtractConfig(layers=[0], steps=[0], num_frames=3, out=str(out), progress=False), log=quiet)
    assert xr.open_zarr(out, consolidated=False).attrs["command"].startswith("workbench.extract.run_extract from ")


def test_appending_runs_keep_the_creating_run_and_are_listed(tmp_path):
    out = tmp_path / "s.zarr"
    run_extract(ExtractConfig(layers=[0], steps=[0], prompts=["a"], seeds=[1], out=str(out), progress=False),
                command=["workbench", "extract", "--prompt", "a"], log=quiet)
    run_extract(ExtractConfig(layers=[0], steps=[0], prompts=["a"], seeds=[1, 2], out=str(out), progress=False),
                command=["workbench", "extract", "--prompt", "a red kite", "--seed", "1,2"], log=quiet)
    attrs = xr.open_zarr(out, consolidated=False).attrs
    # each command as a shell takes it back: a prompt with spaces stays one quoted argument
    assert attrs["command"] == "workbench extract --prompt a"
    assert [r["command"] for r in attrs["runs"]] == ["workbench extract --prompt 'a red kite' --seed 1,2"]
    assert attrs["completed"] == ["p0000-s1", "p0000-s2"]
    # where each ran: what their relative paths (a --checkpoint's, the config's wan_dir) start from
    assert attrs["working_dir"] == attrs["runs"][0]["working_dir"] == os.getcwd()


def test_one_model_keeps_one_checkpoint_label_in_a_store(tmp_path):
    """The zoo's DMD student by name, then by its file: the same weights (the store's fingerprint), so the second
    run's sample keeps the store's label (two labels split one model in a groupby), and says so."""
    from models.wan.embedded import EMBEDDED_DIR, ZOO

    out, notes = tmp_path / "s.zarr", []
    small = dict(layers=[0], steps=[0], prompts=["a"], num_frames=3, out=str(out), progress=False)
    run_extract(ExtractConfig(seeds=[1], **small), log=quiet)
    by_file = ExtractConfig(seeds=[1, 2], **small, wan_dir=str(EMBEDDED_DIR),
                            checkpoint=str(ZOO["dmd"].checkpoint_path()), use_ema=True)
    run_extract(by_file, log=notes.append)
    ds = open_store(out)
    assert list(ds.checkpoint.values) == ["embedded:dmd", "embedded:dmd"]
    assert any("labels these weights 'embedded:dmd'" in str(n) for n in notes)


def test_capture_mode_is_chosen_recorded_and_checked(tmp_path, capsys, uninterrupted, no_work):
    """--capture-mode reaches the probe and the store's attrs (and fingerprint); on the CPU `auto` is exact; an
    unknown mode is refused before work. (Values of every mode against the float64 reference:
    tests/test_capture.py; on the GPU: tests/test_indicator.py.)"""
    assert xr.open_zarr(uninterrupted, consolidated=False).attrs["capture_mode"] == "exact"
    with pytest.raises(WorkbenchError, match=r"capture mode 'fast'; use one of \['auto', 'exact', 'indicator'"):
        run_extract(config(tmp_path / "bad.zarr", capture_mode="fast"), log=quiet)
    assert not (tmp_path / "bad.zarr").exists()
    # argparse's own check of the choices: its usage line and status 2, returned by main([...]) (not SystemExit,
    # which a notebook shows as an exception)
    assert cli_main(["extract", "--layer", "3", "--capture-mode", "fast", "--out", str(tmp_path / "x.zarr")]) == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    assert cli_main(["extract", "--bogus"]) == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert cli_main(["extract", "--help"]) == 0 and "examples:" in capsys.readouterr().out
    from workbench import __version__

    assert cli_main(["--version"]) == 0 and capsys.readouterr().out.startswith(f"workbench {__version__} (git commit ")


def test_cpu_indicator_request_runs_and_records_exact(tmp_path, uninterrupted):
    """On the CPU no widened call returns the plain call's bits, so --capture-mode indicator runs (and records)
    "exact": the store equals the exact store, fingerprint included (it resumes and appends as one).
    --attention-kernel triton on the CPU runs the stock kernel (the Triton one needs a GPU) but is its own
    configuration: refused as a resume of the stock-kernel store, and recorded in the fingerprint."""
    out = tmp_path / "ind.zarr"
    assert cli_main(["extract", "--layer", "3", "--prompt", PROMPTS[0], "--seed", "1", "--capture-mode", "indicator",
                     "--out", str(out), "--no-progress"]) == 0
    ind = xr.open_zarr(out, consolidated=False).load()
    ref = xr.open_zarr(uninterrupted, consolidated=False).load().isel(sample=[0])
    assert ind.attrs["capture_mode"] == "exact" and ind.attrs["fingerprint"] == ref.attrs["fingerprint"]
    np.testing.assert_array_equal(ind.attn_mass.values, ref.attn_mass.values)
    np.testing.assert_array_equal(ind.attn_logit.values, ref.attn_logit.values)
    tri = ["extract", "--layer", "3", "--prompt", PROMPTS[0], "--seed", "1", "--attention-kernel", "triton",
           "--no-progress"]
    assert cli_main([*tri, "--out", str(out)]) == 2  # another configuration: not a resume of the stock-kernel store
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # (tests/test_kernels.py sets it)
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", *tri, "--out", str(tmp_path / "tri.zarr")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tri_ds = xr.open_zarr(tmp_path / "tri.zarr", consolidated=False).load()
    assert tri_ds.attrs["fingerprint"].split(":")[0] == ref.attrs["fingerprint"].split(":")[0]
    assert tri_ds.attrs["fingerprint"] != ref.attrs["fingerprint"]
    np.testing.assert_array_equal(tri_ds.attn_mass.values, ref.attn_mass.values)  # the same kernel ran


def test_the_api_reads_a_researchers_values_or_names_the_bad_one():
    """ExtractConfig from Python: a prompt or a seed alone is a list of one (not a prompt per character), layers and
    heads are sorted without repeats (a repeated layer made a store with a NaN copy); strings, bools and floats where
    ints belong, empty seeds and a window smaller than a chunk are refused before any work, each named."""
    p = extract_mod.plan(ExtractConfig(prompts="a red square moving right", seeds=7, layers=[3, 3, 1], heads=[2, 0],
                                       stats="attn_mass", num_frames=6))
    assert p.cfg.prompts == ["a red square moving right"] and p.cfg.seeds == [7] and p.cfg.stats == ["attn_mass"]
    assert p.spec.layers == (1, 3) and p.spec.heads == (0, 2)
    every = dict(stats=["attn_mass", "attn_key_token"], num_frames=6, token_layers=None)  # (--token-layers all)
    assert extract_mod.plan(ExtractConfig(layers=[1, 3], **every)).spec.token_layers == (1, 3)
    assert extract_mod.plan(ExtractConfig(**every)).spec.token_layers == tuple(range(6))
    numpy = extract_mod.plan(ExtractConfig(warp_denoising_step=np.True_, height=np.int64(96), num_frames=6)).cfg
    assert numpy.warp_denoising_step is True and type(numpy.height) is int  # (numpy's as Python's)
    for kw, message in [(dict(layers="3"), "layers '3': give a list of ints"),
                        (dict(layers=[True]), r"layers \[True\]: \[True\] is not an int"),
                        (dict(seeds=[]), r"seeds \[\]: give one or more ints"),
                        (dict(seeds=[1.5]), r"\[1.5\] is not"),
                        (dict(num_frames="6"), "num_frames '6': give a positive int"),
                        (dict(prompts=[1]), "prompts \\[1\\]: give a list of strings"),
                        (dict(denoising_step_list=[]), "denoising_step_list is empty"),
                        (dict(guidance_scale=float("nan")), "guidance_scale nan: give a finite number"),
                        (dict(num_inference_steps="40", sampler="bidirectional"), "num_inference_steps '40': give"),
                        (dict(context_noise="0"), "context_noise '0': give a number"),
                        (dict(denoising_step_list="1000,750"), "denoising_step_list '1000,750': give a list"),
                        (dict(out=None), "out None: give the store's path"),
                        (dict(height="96"), "height '96': give an int"),
                        (dict(timestep_shift="5"), "timestep_shift '5': give a number"),
                        (dict(local_attn_size="6"), "local_attn_size '6': give an int"),
                        (dict(sink_size=None), "sink_size None: give an int"),
                        (dict(warp_denoising_step="no"), "warp_denoising_step 'no': give True or False"),
                        (dict(image=3), "image 3: give the path"),
                        (dict(num_frames=6, local_attn_size=2), "--local-attn-size 2: the window must hold")]:
        with pytest.raises(WorkbenchError, match=message):
            extract_mod.plan(ExtractConfig(**kw))


def test_a_cfg_sample_appends_to_a_store_made_before_the_uncond_token_labels(tmp_path, monkeypatch):
    """A CFG store made before `uncond_token` existed takes new samples without those labels (appending them to a
    store that lacks them crashed half-way and left it unreadable until the next run)."""
    from workbench.store import LATER_LABELS

    out = tmp_path / "old.zarr"
    run = lambda seed: run_extract(config(out, layers=[2], sampler="bidirectional", num_inference_steps=2,  # noqa: E731
                                          seeds=[seed], stats=["attn_mass", "cross_mass"], mode="append"), log=quiet)
    made = extract_mod.sample_dataset
    monkeypatch.setattr(extract_mod, "sample_dataset",
                        lambda *a: made(*a).drop_vars(list(LATER_LABELS), errors="ignore"))
    run(1)  # (the store as an older workbench wrote it)
    monkeypatch.undo()
    run(2)
    ds = open_store(out)
    assert ds.sample.values.tolist() == ["p0000-s1", "p0000-s2"] and "uncond_token" not in ds
    assert ds.cross_mass.notnull().all()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_stopped_or_failed_extract_closes_its_progress_bar(tmp_path, monkeypatch, stop, one_thread):
    """run_extract stopped midway (Ctrl-C; a notebook's stop button) or failing closes its progress bar: a bar left
    open is drawn again under every later output of the session. `main([...])` closes the bars its command left open,
    and only those: a notebook's own bar around its calls goes on."""
    from tqdm import tqdm

    def stopped(model, p, emb, negative, seed, device, dtype, bar, *rest):
        bar.update(1)
        raise stop("stopped")

    monkeypatch.setattr(extract_mod, "_one_sample", stopped)
    cfg = config(tmp_path / "a.zarr", num_frames=3)
    cfg.progress = True
    before = set(tqdm._instances)
    with pytest.raises(stop) as caught:  # (kept, with its frames, as Jupyter keeps the last one: sys.last_value)
        run_extract(cfg, log=lambda *a: None)
    assert set(tqdm._instances) == before, caught
    sweep = tqdm(total=2, desc="my sweep")
    try:
        argv = ["extract", "--frames", "3", "--out", str(tmp_path / "b.zarr")]
        if stop is KeyboardInterrupt:
            assert cli_main(argv) == 130
        else:  # (an error of the code, not of the input: its traceback)
            with pytest.raises(stop):
                cli_main(argv)
        sweep.update(1)
        assert not sweep.disable and sweep in tqdm._instances and sweep.n == 1
    finally:
        sweep.close()


def test_under_torchrun_each_rank_describes_its_kernel_on_its_own_gpu(monkeypatch):
    """`describe` makes a small tensor for the kernels' shape rules: under torchrun a bare 'cuda' is this rank's
    GPU (LOCAL_RANK), not GPU 0 (every rank opened a context there)."""
    import dataclasses

    seen = []
    monkeypatch.setattr(extract_mod, "describe", lambda device, *a, **k: seen.append(torch.device(device)) or "sdpa")
    p = extract_mod.plan(ExtractConfig(layers=[3]))
    p = dataclasses.replace(p, cfg=dataclasses.replace(p.cfg, device="cuda"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    extract_mod.fingerprint_fields(p, "sha")
    extract_mod._attrs(p, "fp", ["workbench", "extract"])
    assert seen == [torch.device("cuda", 1)] * 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert extract_mod.rank_device("cuda") == torch.device("cuda") and extract_mod.rank_device("cpu").type == "cpu"


@pytest.mark.parametrize("extra, forwards", [([], 3 * (4 + 1)),  # 3 chunks of 4 steps and a context pass each
                                              (["--image", "IMAGE"], 1 + 2 * (4 + 1))])  # chunk 0: its context only
def test_the_extract_bar_ends_at_the_forwards_it_ran(extra, forwards, tmp_path, capsys, monkeypatch):
    """The bar's total is the run's DiT forwards: with --image chunk 0 (the image) is not denoised (it ended at
    11/15)."""
    from PIL import Image

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "first.png")
    extra = [str(tmp_path / "first.png") if a == "IMAGE" else a for a in extra]
    frames = "7" if extra else "9"
    assert cli_main(["extract", "--layer", "0", "--frames", frames, "--height", "32", "--width", "32", "--prompt",
                     "a red kite", "--out", str(tmp_path / "s.zarr"), *extra]) == 0
    bars = [line for line in capsys.readouterr().err.splitlines() if line.startswith("extract: ")]
    assert bars and bars[-1].startswith("extract: 100%") and f"| {forwards}/{forwards} " in bars[-1], bars
