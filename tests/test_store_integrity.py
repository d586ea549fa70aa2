"""Stores never lose or mix data (docs/store.md, Writing):

- the stress test: rounds of `workbench extract` processes started together on one store, the writer SIGKILLed at
  random points (before the lock, mid-sample, mid-write); a plain re-run then gives exactly the store of an
  uninterrupted run (xarray.testing.assert_identical), every sample once, and every process that was refused
  exited 2 with one line naming the store and the writer that held it;
- resume keeps samples by id: a store damaged as two unlocked writers left it (duplicates, unmarked entries,
  `completed` listing a sample with no arrays) is repaired, with a warning, to the uninterrupted store;
- a swap of a new store into place that was killed half way leaves the old store, which the next run finds;
- one model per store: --append (or a resume) with another checkpoint is refused before any weights load,
  naming the setting that differs; a store that mixes two models (an older --append) is refused by readers.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

import workbench.extract as extract_mod
from workbench.cli import main as cli_main
from workbench.store import StoreLock, _encoding, open_store

REPO = Path(__file__).resolve().parents[1]
# a small job of the embedded model: one layer, 6 frames (2 chunks), step 0 captured, 6 samples
ARGS = ["extract", "--layer", "0", "--frames", "6", "--steps", "0", "--seed", "0-5", "--out", "s.zarr", "--no-progress"]
IDS = [f"p0000-s{s}" for s in range(6)]
VOLATILE = ("created_utc", "working_dir", "runs")  # when and where the creating run started; the runs that resumed it


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """In-process runs compute with one thread, as the subprocesses do (OMP_NUM_THREADS=1 in `env`): their
    stores are compared with the reference bit for bit, whatever `-n` runs the tests."""


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # (tests/conftest.py put this tree on PYTHONPATH)


def start(cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workbench.cli", *ARGS], cwd=cwd, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def completed(store: Path) -> list:
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["completed"]
    except (OSError, ValueError, KeyError):
        return []


def loaded(store: Path) -> xr.Dataset:
    ds = xr.open_zarr(store, consolidated=False).load()
    for name in VOLATILE:
        ds.attrs.pop(name, None)
    return ds


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run: the same command, in a folder of its own (so `out` in config_yaml is the same), in
    this process on one thread (as the subprocesses compute: bit for bit their store)."""
    cwd, here, threads = tmp_path_factory.mktemp("reference"), Path.cwd(), torch.get_num_threads()
    os.chdir(cwd)
    torch.set_num_threads(1)
    try:
        assert cli_main(ARGS) == 0
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
    return cwd / "s.zarr"


REFUSED = re.compile(r"workbench extract: error: 's\.zarr' is being written by another process \(pid (\d+) on [^,]+, "
                     r"since [^:]+:\d\d:\d\d\+00:00: .*extract --layer 0 .*\); a store takes one writer at a time")


def test_racing_writers_killed_at_random_then_a_plain_resume_equal_an_uninterrupted_run(tmp_path, reference,
                                                                                       monkeypatch, capsys):
    rng = random.Random(13)
    store = tmp_path / "s.zarr"
    holder, first_write = tmp_path / ".s.zarr.lock.json", tmp_path / ".s.zarr.tmp"
    done = lambda k: lambda: len(completed(store)) >= k  # noqa: E731
    # when to kill the writer of each round: once it holds the lock (loading, encoding, mid-rollout), while its
    # first sample is being written, and after one or two more samples (mid-rollout or mid-append), each with a
    # random delay on top
    # (the first write's folder lives a tenth of a second or so: a poll that misses it, on a loaded machine, stops
    # the round at the first finished sample instead of letting the writer finish the store); the last two rounds
    # also wait for the two losers to be refused (on a loaded machine they may reach the lock late)
    rounds = [(holder.exists, 0.4, False), (lambda: first_write.exists() or done(1)(), 0.0, False),
              (done(2), 0.6, True), (done(4), 0.6, True)]
    refusals, kills = 0, 0
    for ready, jitter, settle in rounds:
        procs = []
        for _ in range(3):  # started together (a few ms apart)
            procs.append(start(tmp_path))
            time.sleep(rng.uniform(0.0, 0.05))
        deadline = time.time() + 300
        running = lambda: sum(p.poll() is None for p in procs)  # noqa: E731
        while time.time() < deadline and not (ready() and (not settle or running() <= 1)) and running():
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, jitter))
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                kills += 1
        pids = {p.pid for p in procs}
        for p in procs:
            out, err = p.communicate(timeout=60)
            if p.returncode in (-signal.SIGKILL, 0):
                continue
            lines = err.strip().splitlines()
            assert p.returncode == 75 and len(lines) == 1, err[-2000:]  # (try again later)
            m = REFUSED.match(lines[0])
            assert m, lines[0]
            assert int(m.group(1)) in pids - {p.pid}, lines[0]  # it names the process that held the store
            refusals += 1
    assert refusals >= 4 and kills >= 3
    # the plain re-run in this process (on one thread, as the reference): the lock and the store the killed
    # processes left are all it has to go on (no process start: its imports are the racers' cost, not the resume's)
    monkeypatch.chdir(tmp_path)
    assert cli_main(ARGS) == 0, capsys.readouterr().err[-2000:]
    got = loaded(store)
    assert list(got.sample.values) == IDS and got.attrs["completed"] == IDS  # every sample once, in order
    xr.testing.assert_identical(got, loaded(reference))
    assert not (tmp_path / ".s.zarr.tmp").exists() and not (tmp_path / ".s.zarr.old").exists()


def test_a_held_store_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """The lock is taken before the weights are hashed or loaded; the refusal names the store and the holder."""
    def refuse(*a, **kw):
        raise AssertionError("work started on a store another process holds")

    monkeypatch.setattr(extract_mod, "sha256_file", refuse)
    monkeypatch.setattr(extract_mod, "weights_sha256", refuse)
    monkeypatch.setattr(extract_mod, "load_wan", refuse)
    out = tmp_path / "held.zarr"
    with StoreLock(out):  # 75 (try again later), not bad input's 2: a batch script can tell them apart
        assert cli_main(["extract", "--layer", "0", "--out", str(out), "--no-progress"]) == 75
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{str(out)!r} is being written by this process itself (another call" in err
    assert f"; pid {os.getpid()} on " in err  # (a lock held in this process: a notebook cell, a thread)
    assert not out.exists() and not (tmp_path / ".held.zarr.lock.json").exists()  # the holder's record goes with it
    # the same store through a symlink (to the store, or to its folder) is the same store: one writer
    out.mkdir()
    (tmp_path / "link.zarr").symlink_to(out)
    (tmp_path / "folder").symlink_to(tmp_path)
    for alias in (tmp_path / "link.zarr", tmp_path / "folder" / "held.zarr"):
        with StoreLock(out):
            assert cli_main(["extract", "--layer", "0", "--out", str(alias), "--no-progress"]) == 75
        assert "is being written by this process itself" in capsys.readouterr().err


def test_every_writer_held_by_another_run_exits_75_and_bad_input_2(tmp_path, capsys):
    """A busy output is "try again later" (75, sysexits' EX_TEMPFAIL) for every command that writes one, bad input
    is 2: a batch script can retry the one and fix the other."""
    runs = {"intervene": ["intervene", "--frames", "6", "--world", "off", "--knockout", "0", "--no-progress"],
            "train": ["train", "--config", "configs/tiny_dmd.yaml", "--max-steps", "0", "--set", "device=cpu"]}
    for name, argv in runs.items():
        out = tmp_path / name
        option = "--logdir" if name == "train" else "--out"
        with StoreLock(out, option=option):
            assert cli_main([*argv, option, str(out)]) == 75, name
        assert "is being written by this process itself" in capsys.readouterr().err
        assert cli_main([*argv, option, str(out), "--frames" if name == "intervene" else "--max-steps", "-1"]) == 2
        assert capsys.readouterr().err.count("error:") == 1


def damaged_copy(reference: Path, path: Path, order: list[int], completed: list[str]) -> None:
    """A store holding the reference's samples at positions `order` (repeats allowed), `completed` as given:
    what two unlocked writers used to leave (issue 13: 19 entries with duplicate ids, 10 marked complete)."""
    ds = xr.open_zarr(reference, consolidated=False).load().isel(sample=order)
    for var in ds.variables.values():
        var.encoding = {}
    ds.attrs["completed"] = completed
    ds.to_zarr(path, mode="w-", zarr_format=3, consolidated=False, encoding=_encoding(ds))


def test_resume_keeps_samples_by_id_and_repairs_a_damaged_store(tmp_path, reference, monkeypatch, capsys):
    # entries s0 s1 s2 s0 s1 s3 s5; marked complete: s0 s1 s2 s3 s4 (s4 has no arrays, s5 is not marked)
    damaged_copy(reference, tmp_path / "s.zarr", [0, 1, 2, 0, 1, 3, 5], IDS[:5])
    # read before the repair: the finished samples, one copy each (a report would have shown two of s0 and s1)
    from models.errors import ModelInputWarning

    with pytest.warns(ModelInputWarning, match="left out 3 unfinished sample.s. past its 4 finished one"):
        seen = open_store(tmp_path / "s.zarr")
    assert seen.sample.values.tolist() == IDS[:4]
    xr.testing.assert_identical(seen.attn_mass.load(), open_store(reference).attn_mass.sel(sample=IDS[:4]).load())
    monkeypatch.chdir(tmp_path)
    written = []
    real_write = extract_mod.StoreWriter.write
    monkeypatch.setattr(extract_mod.StoreWriter, "write",
                        lambda self, ds, key=None, **kw: (written.append(str(ds.sample.values[0])),
                                                          real_write(self, ds, key, **kw)))
    assert cli_main(ARGS) == 0
    out = capsys.readouterr().out
    assert "warning: s.zarr held entries that are not whole samples of it: p0000-s0 (a second copy), p0000-s1 (a " \
           "second copy), p0000-s5 (not marked complete), p0000-s4 (marked complete, but its arrays are missing)" in out
    assert written == ["p0000-s4", "p0000-s5"]  # the finished samples were kept, by id
    xr.testing.assert_identical(loaded(tmp_path / "s.zarr"), loaded(reference))


def test_an_interrupted_swap_leaves_the_old_store(tmp_path, reference, monkeypatch, capsys):
    """Killed between moving the old store aside and moving the new one in: the next run puts the old one back."""
    shutil.copytree(reference, tmp_path / ".s.zarr.old")
    (tmp_path / ".s.zarr.tmp").mkdir()  # the new store, half written
    monkeypatch.chdir(tmp_path)
    assert cli_main(ARGS) == 0
    assert "all 6 samples are already there" in capsys.readouterr().out
    assert not (tmp_path / ".s.zarr.old").exists() and not (tmp_path / ".s.zarr.tmp").exists()
    xr.testing.assert_identical(loaded(tmp_path / "s.zarr"), loaded(reference))


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    """A Self-Forcing checkpoint of the embedded model with its weights nudged: another model of the same layout."""
    import torch

    from models.files import load_state_dict_file
    from models.wan.checkpoint import save_self_forcing
    from models.wan.embedded import EMBEDDED_DIR

    sd = load_state_dict_file(EMBEDDED_DIR / "diffusion_pytorch_model.safetensors")
    torch.manual_seed(0)
    nudged = {k: (v.float() + 1e-3 * torch.randn_like(v.float())).to(v.dtype) for k, v in sd.items()}
    path = tmp_path_factory.mktemp("ckpt") / "other.pt"
    save_self_forcing(path, generator=nudged, generator_ema=nudged)  # --use-ema as the default model (the DMD student)
    return path


def test_append_of_another_models_samples_is_refused(tmp_path, reference, other_checkpoint, capsys, monkeypatch):
    """One store, one model: --append (or a plain resume) with another checkpoint is refused before any weights
    load, naming the setting that differs with both values; the store is left as it was."""
    store = shutil.copytree(reference, tmp_path / "s.zarr")
    before = loaded(store)

    def refuse(*a, **kw):
        raise AssertionError("weights were loaded for a store that refuses them")

    monkeypatch.setattr(extract_mod, "load_wan", refuse)
    from models.files import sha256_file

    store_sha = str(before.checkpoint_sha256.values[0])
    for mode in (["--append"], []):
        argv = ["extract", "--layer", "0", "--frames", "6", "--steps", "0", "--seed", "6", "--checkpoint",
                str(other_checkpoint), "--use-ema", "--out", str(store), "--no-progress", *mode]
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0
        assert "holds samples of another model or sampler setting (model.weights: " in err
        assert f"{store_sha[:12]}... in the store, {sha256_file(other_checkpoint)[:12]}... in this run" in err
        assert f"; the store's samples: {before.checkpoint.values[0]} (generator_ema), this run's: " \
               f"{other_checkpoint} (generator_ema))" in err  # (the files, not only their hashes)
        assert "write these samples to another --out and compare the stores" in err
    xr.testing.assert_identical(loaded(store), before)


def test_a_refusal_names_the_layout_setting_that_differs(tmp_path, reference, capsys):
    store = shutil.copytree(reference, tmp_path / "s.zarr")
    for args, expected in ((["--layer", "1"], "layout.layers: [0] in the store, [1] in this run"),
                           (["--layer", "0", "--frames", "9"], "layout.geometry: [6, 12, 16] in the store, "
                                                                "[9, 12, 16] in this run"),
                           (["--layer", "0", "--dtype", "bfloat16"], "model.dtype: float32 in the store, bfloat16 in "
                                                                     "this run")):
        if "--frames" not in args:
            args = [*args, "--frames", "6"]
        assert cli_main(["extract", *args, "--steps", "0", "--out", str(store), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert expected in err, err


def test_a_store_that_mixes_two_models_is_refused_by_readers(tmp_path, reference, capsys, monkeypatch):
    """What --append of another checkpoint made before: readers refuse it rather than average two models."""
    ds = xr.open_zarr(reference, consolidated=False).load()
    sha = ds.checkpoint_sha256.values.copy()
    sha[3:] = "f" * 64
    ds = ds.assign_coords(checkpoint_sha256=("sample", sha))
    for var in ds.variables.values():
        var.encoding = {}
    ds.to_zarr(tmp_path / "mixed.zarr", zarr_format=3, consolidated=False, encoding=_encoding(ds))
    with pytest.raises(extract_mod.WorkbenchError, match=r"mixes the samples of 2 models .*p0000-s0, p0000-s1, "
                                                         r"p0000-s2; checkpoint_sha256 ffffffffffff...: p0000-s3"):
        open_store(tmp_path / "mixed.zarr")
    assert cli_main(["report", str(tmp_path / "mixed.zarr"), "--out", str(tmp_path / "r.html")]) == 2
    assert capsys.readouterr().err.startswith("workbench report: error: store ")
    # resuming it with the first model's weights finds the foreign samples and refuses too
    monkeypatch.chdir(tmp_path)
    shutil.move(tmp_path / "mixed.zarr", tmp_path / "s.zarr")
    assert cli_main(ARGS) == 2
    assert "holds samples of another model (checkpoint_sha256 of p0000-s3, p0000-s4, p0000-s5" in capsys.readouterr().err
    assert np.array_equal(xr.open_zarr(tmp_path / "s.zarr", consolidated=False).checkpoint_sha256.values, sha)


def _grow(store: Path, names=None, by: int = 1) -> None:
    """What a write stopped midway leaves: the arrays `names` (default: every array along `sample`) one entry
    longer, their new entry never written (fill values)."""
    import zarr

    for name, array in zarr.open_group(store, mode="r+").arrays():
        dims = array.metadata.dimension_names or ()
        if "sample" in dims and (names is None or name in names):
            shape = list(array.shape)
            shape[dims.index("sample")] += by
            array.resize(tuple(shape))


def test_readers_show_the_finished_samples_of_a_store_stopped_mid_write(tmp_path, reference, capsys):
    """A full disk or a kill during an append leaves some arrays a sample longer than others (xr.open_zarr
    refuses such a store) or every array longer than `completed` says: open_store, and so `workbench report` and
    the studies, show exactly the finished samples, with a warning that says why."""
    whole = open_store(reference).load()
    for case, names in (("some", {"attn_mass", "seed", "prompt"}), ("all", None), ("index", {"sample"}),
                        ("labels", {"sample", "seed", "prompt", "checkpoint"})):  # (no statistic longer: the
        # step and frame labels of that group opened as data variables, and the merge failed)
        store = tmp_path / f"{case}.zarr"
        shutil.copytree(reference, store)
        _grow(store, names)
        if names is not None:
            with pytest.raises(ValueError, match="conflicting sizes for dimension 'sample'"):
                xr.open_zarr(store, consolidated=False)
        with pytest.warns(UserWarning, match=r"left out 1 unfinished sample\(s\) past its 6 finished one\(s\)"):
            ds = open_store(store).load()
        xr.testing.assert_identical(ds, whole)
        capsys.readouterr()
        assert cli_main(["report", str(store), "--out", str(tmp_path / f"{case}.html")]) == 0
        assert "workbench report: warning: " in capsys.readouterr().err  # one line on the console


def test_an_append_that_fails_midway_is_taken_back(tmp_path, reference, monkeypatch, capsys):
    """A full disk while a sample is appended (some arrays grown, then ENOSPC): the writer cuts every array back
    before it reports the error, so even a plain xr.open_zarr reads the store, with the finished samples only."""
    shutil.copytree(reference, tmp_path / "s.zarr")
    real = xr.Dataset.to_zarr

    def full_disk(self, store, *args, mode=None, **kw):
        if mode == "a":  # half of the sample's arrays get appended, then the disk is full
            real(self[list(self.data_vars)[: len(self.data_vars) // 2]], store, *args, mode=mode, **kw)
            raise OSError(28, "No space left on device")
        return real(self, store, *args, mode=mode, **kw)

    monkeypatch.setattr(xr.Dataset, "to_zarr", full_disk)
    monkeypatch.chdir(tmp_path)
    assert cli_main(["0-6" if a == "0-5" else a for a in ARGS]) == 1  # one more seed: one sample appended
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.undo()
    xr.testing.assert_identical(loaded(tmp_path / "s.zarr"), loaded(reference))


def test_a_new_store_that_fails_midway_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys):
    """A full disk while the first sample is written (a new store goes to a temporary folder, then swaps in): the
    half-written folder goes with the error, so the space it held is free when the user is told to free space;
    no store is made."""
    real = xr.Dataset.to_zarr

    def full_disk(self, store, *args, mode=None, **kw):
        if mode == "w-":
            first = self[list(self.data_vars)[:1]]  # (the first array written)
            real(first, store, *args, mode=mode, **{**kw, "encoding": {k: kw["encoding"][k] for k in first.data_vars}})
            raise OSError(28, "No space left on device")
        return real(self, store, *args, mode=mode, **kw)

    monkeypatch.setattr(xr.Dataset, "to_zarr", full_disk)
    monkeypatch.chdir(tmp_path)
    assert cli_main(ARGS) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.zarr.lock"]  # (no .s.zarr.tmp, no store; the lock
    # file stays, as after every run)


def test_a_store_reached_through_a_symlink_is_replaced_where_it_lives(tmp_path, reference, monkeypatch):
    """runs/s.zarr a symlink to scratch space (clusters): --overwrite replaces the store in scratch and keeps the
    link (it made the link a new folder beside the old store and left a link .s.zarr.old that every later run
    failed on)."""
    scratch, home = tmp_path / "scratch", tmp_path / "home"
    scratch.mkdir()
    home.mkdir()
    shutil.copytree(reference, scratch / "s.zarr")
    (home / "s.zarr").symlink_to(scratch / "s.zarr")
    made = json.loads((scratch / "s.zarr" / "zarr.json").read_text())["attributes"]["created_utc"]
    monkeypatch.chdir(home)
    assert cli_main(ARGS + ["--overwrite"]) == 0
    assert (home / "s.zarr").is_symlink() and sorted(p.name for p in home.iterdir()) == ["s.zarr"]
    assert json.loads((scratch / "s.zarr" / "zarr.json").read_text())["attributes"]["created_utc"] != made
    assert sorted(p.name for p in scratch.iterdir()) == [".s.zarr.lock", "s.zarr"]
    assert cli_main(ARGS) == 0  # (a resume through the link: nothing to do)
    assert loaded(home / "s.zarr").equals(loaded(reference))


def test_a_resume_with_other_prompts_under_the_same_ids_is_refused(tmp_path, capsys):
    """Sample ids count the prompts in their order: a re-run with another first prompt would have taken the
    store's p0000-s42 (another prompt's) as done, or mixed prompts; refused, naming both prompts. A run that lists
    the store's prompt first and a new one after it resumes."""
    out = tmp_path / "p.zarr"
    run = ["extract", "--layer", "0", "--steps", "0", "--frames", "3", "--no-progress", "--out", str(out)]
    assert cli_main([*run, "--prompt", "a red square moving right"]) == 0
    assert cli_main([*run, "--prompt", "a blue circle moving up", "--prompt", "a red square moving right"]) == 2
    err = capsys.readouterr().err
    assert "p0000-s42 holds 'a red square moving right', this run's 'a blue circle moving up'" in err
    assert cli_main([*run, "--prompt", "a red square moving right", "--prompt", "a blue circle moving up"]) == 0
    assert list(open_store(out).prompt.values) == ["a red square moving right", "a blue circle moving up"]


def _rewrite_fingerprint(store: Path, edit) -> None:
    """Give a store the fingerprint fields `edit` makes of its own (and their fingerprint): a store as another
    version of the workbench, or another run, would have written it."""
    import zarr

    group = zarr.open_group(store, mode="r+")
    fields = json.loads(json.dumps(dict(group.attrs)["fingerprint_fields"]))
    edit(fields)
    group.attrs.update(fingerprint_fields=fields, fingerprint=extract_mod.fingerprint_of(fields))


def test_a_store_made_before_the_text_encoder_was_recorded_takes_more_samples(tmp_path, capsys):
    """Stores made before `text_encoder` joined the fingerprint (extract LATER_FIELDS) lack it: a run whose every
    other setting agrees appends to them (with a note), and they keep their fingerprint; a store that records
    another text encoder, or an old store with another setting, is refused, naming it."""
    out = tmp_path / "old.zarr"
    run = ["extract", "--layer", "0", "--steps", "0", "--frames", "3", "--no-progress", "--out", str(out)]
    assert cli_main([*run, "--seed", "0"]) == 0
    _rewrite_fingerprint(out, lambda f: f["model"].pop("text_encoder"))
    import zarr

    before = xr.open_zarr(out, consolidated=False).load()
    wanted = {name: dict(zarr.open_group(out, mode="r")[name].attrs) for name in ("sample", "seed", "key_frame")}
    for name in wanted:  # (older code wrote no attrs on some coordinates: train_step's in probe stores)
        zarr.open_group(out, mode="r+")[name].attrs.pop("long_name")
    capsys.readouterr()
    assert cli_main([*run, "--seed", "0,1"]) == 0
    text = capsys.readouterr().out
    assert "made by an older workbench that did not record its text encoder" in text
    after = xr.open_zarr(out, consolidated=False).load()
    assert list(after.sample.values) == ["p0000-s0", "p0000-s1"]
    xr.testing.assert_identical(after.attn_mass.sel(sample=["p0000-s0"]), before.attn_mass)
    assert after.attrs["fingerprint"] == before.attrs["fingerprint"]  # (the store's own, as made)
    assert "text_encoder" not in after.attrs["fingerprint_fields"]["model"]
    assert {name: dict(zarr.open_group(out, mode="r")[name].attrs) for name in wanted} == wanted  # (filled in)

    other = tmp_path / "other.zarr"
    shutil.copytree(out, other)
    _rewrite_fingerprint(other, lambda f: f["model"].update(text_encoder="umt5 of another folder"))
    assert cli_main([*run[:-1], str(other), "--seed", "2"]) == 2
    assert "model.text_encoder: umt5 of another folder in the store" in capsys.readouterr().err
    _rewrite_fingerprint(out, lambda f: f["model"].update(dtype="bfloat16"))  # old, and another dtype
    assert cli_main([*run, "--seed", "2"]) == 2
    err = capsys.readouterr().err
    assert "model.dtype: bfloat16 in the store, float32 in this run" in err and "another model" in err
    assert list(open_store(other).sample.values) == list(open_store(out).sample.values) == ["p0000-s0", "p0000-s1"]


def test_bf16_and_bfloat16_are_one_dtype_in_new_stores_and_old(tmp_path, capsys):
    """`--dtype bf16` is recorded as "bfloat16" (it was stored as typed, so a store of one refused a resume with
    the other); a store made so before (its fingerprint of "bf16") takes samples of either name and keeps its
    fingerprint, and still refuses another dtype, naming it."""
    out = tmp_path / "bf.zarr"
    run = ["extract", "--layer", "0", "--steps", "0", "--frames", "3", "--no-progress", "--out", str(out)]
    assert cli_main([*run, "--dtype", "bf16", "--seed", "0"]) == 0
    ds = open_store(out)
    assert ds.attrs["fingerprint_fields"]["model"]["dtype"] == ds.attrs["dtype"] == "bfloat16"
    assert cli_main([*run, "--dtype", "bfloat16", "--seed", "0,1"]) == 0
    assert list(open_store(out).sample.values) == ["p0000-s0", "p0000-s1"]

    _rewrite_fingerprint(out, lambda f: f["model"].update(dtype="bf16"))  # as the workbench made it before
    old = open_store(out).attrs["fingerprint"]
    capsys.readouterr()
    assert cli_main([*run, "--dtype", "bfloat16", "--seed", "0,1,2"]) == 0
    assert cli_main([*run, "--dtype", "bf16", "--seed", "0,1,2,3"]) == 0
    after = open_store(out)
    assert list(after.sample.values) == ["p0000-s0", "p0000-s1", "p0000-s2", "p0000-s3"]
    assert after.attrs["fingerprint"] == old
    assert cli_main([*run, "--dtype", "float32", "--seed", "4"]) == 2
    assert "model.dtype: bfloat16 in the store, float32 in this run" in capsys.readouterr().err  # (in today's word)
    assert cli_main([*run, "--dtype", "bf16", "--timestep-shift", "3", "--seed", "4"]) == 2  # (another setting:
    err = capsys.readouterr().err  # named alone, the dtype's two names being one)
    assert "layout.schedule (5 items in the store" in err and "dtype" not in err
    _rewrite_fingerprint(out, lambda f: f["model"].pop("text_encoder"))  # older still: no text encoder recorded
    assert cli_main([*run, "--dtype", "bfloat16", "--seed", "4"]) == 0
    assert "did not record its text encoder" in capsys.readouterr().out

    fx = tmp_path / "fx.zarr"  # an effects store the same way
    effects = ["intervene", "--ablate", "0:0", "--frames", "3", "--capture", "0", "--world", "off", "--no-progress",
               "--out", str(fx)]
    assert cli_main([*effects, "--dtype", "bf16"]) == 0
    _rewrite_fingerprint(fx, lambda f: f["model"].update(dtype="bf16"))
    assert cli_main([*effects, "--ablate", "0:1", "--dtype", "bfloat16"]) == 0
    assert list(open_store(fx).intervention.values)[-1] == "ablate-zero:L0.H1"


def test_a_store_of_another_model_and_other_settings_is_named_by_its_model_first(tmp_path, capsys):
    """Another zoo model (another sampler, schedule and weights): the refusal leads with the two models in words,
    then the settings, hashes cut to 12 digits (it was one line of schedule tuples and two whole sha256s)."""
    out = tmp_path / "s.zarr"
    run = ["extract", "--layer", "0", "--steps", "0", "--frames", "3", "--no-progress", "--out", str(out)]
    assert cli_main(run) == 0
    assert cli_main([*run, "--model", "teacher"]) == 2
    err = capsys.readouterr().err
    assert (f"'{out}' holds another model's samples (the store's samples: embedded:dmd (generator_ema), this "
            "run's: embedded:teacher), made with other settings too (layout.sampler: causal_few_step") in err
    assert re.search(r"model\.weights: [0-9a-f]{12}\.\.\. in the store, [0-9a-f]{12}\.\.\. in this run", err)
    assert "write this run to another --out (or pass --overwrite" in err


def test_stores_whose_text_encoder_was_hashed_with_hidden_tokenizer_files_resume(tmp_path, capsys):
    """The text encoder's identity leaves the tokenizer folder's hidden files out (an editor's swap file changed
    it); a store made before, when it hashed them, takes this run's samples and keeps its own fingerprint."""
    from models.wan.folder import wan_parts
    from models.wan.text_encoder import earlier_identities, encoder_identity, wan_dir_encoder_identity

    wan = tmp_path / "wan"
    shutil.copytree(REPO / "data" / "embedded", wan, ignore=shutil.ignore_patterns("checkpoints"))
    assert earlier_identities(wan) == {}
    parts = wan_parts(wan)
    (parts.tokenizer / ".gitattributes").write_text("*.json filter=lfs\n")
    now = wan_dir_encoder_identity(wan)
    old = encoder_identity(parts.text_encoder, parts.tokenizer, 512, hidden=True)
    assert old != now and earlier_identities(wan) == {old: now}
    out = tmp_path / "s.zarr"
    run = ["extract", "--wan-dir", str(wan), "--layer", "0", "--steps", "0", "--frames", "3", "--no-progress",
           "--out", str(out)]
    assert cli_main([*run, "--seed", "0"]) == 0
    _rewrite_fingerprint(out, lambda f: f["model"].update(text_encoder=old))  # as the workbench made it before
    assert cli_main([*run, "--seed", "0,1"]) == 0
    assert list(open_store(out).sample.values) == ["p0000-s0", "p0000-s1"]
    _rewrite_fingerprint(out, lambda f: f["model"].update(text_encoder="0" * 64))  # another encoder: refused
    assert cli_main([*run, "--seed", "2"]) == 2
    assert "model.text_encoder: 000" in capsys.readouterr().err


def test_readers_open_a_store_while_its_arrays_grow_one_by_one(tmp_path, reference):
    """An append lengthens the arrays one at a time: a reader opening the store meanwhile sees the finished samples
    every time (it failed now and then with a MergeError or 'conflicting sizes', lengths moving under its open:
    it opens again, after a short wait, when they moved)."""
    import threading
    import warnings

    import zarr

    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    names = [name for name, a in zarr.open_group(store, mode="r").arrays() if "sample" in (a.metadata.dimension_names or ())]
    stop = threading.Event()

    def writer():  # appends: every array one sample longer, one at a time in any order, then the next sample's work
        while not stop.is_set():
            for name in random.sample(names, len(names)):
                _grow(store, {name})
            time.sleep(0.3)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (each open warns of the unfinished samples it leaves out)
            seen = [list(open_store(store).sample.values) for _ in range(60)]
    finally:
        stop.set()
        thread.join()
    assert all(ids == IDS for ids in seen)


def test_a_reader_refuses_values_of_a_store_replaced_or_cut_after_it_opened(tmp_path, reference):
    """A lazily opened store read after another run replaced its folder (--overwrite) gave the new folder's values
    under its old labels, and after a resumed run cut its entries, NaN for samples it listed as finished: both are a
    StoreChanged error now; an append (entries past the ones shown) is read as before."""
    import zarr

    from workbench.store_guard import StoreChanged

    store = tmp_path / "s.zarr"
    shutil.copytree(reference, store)
    whole = open_store(reference).attn_mass.values
    ds = open_store(store)
    np.testing.assert_array_equal(ds.attn_mass.isel(sample=0).values, whole[0])
    _grow(store)  # an append going on: readers of the finished samples are not disturbed
    np.testing.assert_array_equal(ds.attn_mass.isel(sample=5).values, whole[5])
    group = zarr.open_group(store, mode="r+")
    group.attrs["completed"] = IDS[:4]  # a resumed run cut the last two, to compute them again
    with pytest.raises(StoreChanged, match=r"no longer lists 2 of the entries it showed when opened \(p0000-s4, "
                                           r"p0000-s5: a resumed run is computing them again\); open it again"):
        ds.attn_mass.isel(sample=1).values
    group.attrs["completed"] = IDS  # computed again: the same entries
    np.testing.assert_array_equal(ds.attn_mass.isel(sample=5).values, whole[5])
    os.replace(store, tmp_path / "old.zarr")  # another run's --overwrite swaps a new folder in
    with pytest.raises(StoreChanged, match="s.zarr is no longer there .moved, deleted, or in the middle of another"):
        ds.attn_mass.isel(sample=2).values  # (the moment between: not "replaced", which a moved store is not)
    shutil.copytree(reference, store)
    with pytest.raises(StoreChanged, match="was replaced after it was opened"):
        ds.attn_mass.isel(sample=2).values
    np.testing.assert_array_equal(open_store(store).attn_mass.values, whole)  # opened again: fine


def test_the_guard_follows_the_folder_opened_not_the_current_one(tmp_path, reference, monkeypatch):
    """A store opened by a relative path reads on after a change of folder (a notebook's %cd: every read was a
    false StoreChanged); a store made again in its place is refused even where the freed inode is reused (the run
    that made it, created_utc and fingerprint, is part of what the guard compares)."""
    import zarr

    from workbench.store_guard import StoreChanged

    shutil.copytree(reference, tmp_path / "s.zarr")
    monkeypatch.chdir(tmp_path)
    ds = open_store("s.zarr")
    monkeypatch.chdir(REPO)
    whole = open_store(reference).attn_mass.values
    np.testing.assert_array_equal(ds.attn_mass.values, whole)
    again = open_store(tmp_path / "s.zarr")
    zarr.open_group(tmp_path / "s.zarr", mode="r+").attrs["created_utc"] = "2030-01-01T00:00:00+00:00"  # (as a
    with pytest.raises(StoreChanged, match="was replaced after it was opened"):  # new run's store, same inode)
        again.attn_mass.isel(sample=0).values


def test_a_refusal_names_where_two_long_settings_part():
    """A long setting (a store's schedule of forwards) was cut to its first 77 characters on both sides, so a
    refusal showed two identical beginnings; it now names the first item that differs."""
    from workbench.store import describe_differences

    def steps(last):
        return [[i, t, 0, "denoise", "cond", i] for i, t in enumerate([999.0, 937.0, 833.0, last])]

    text = describe_differences({"layout": {"schedule": steps(625.0), "layers": [1]}},
                                {"layout": {"schedule": steps(624.0), "layers": [2]}})
    assert text == ("layout.layers: [1] in the store, [2] in this run; layout.schedule (4 items in the store, 4 in "
                    "this run), first differing at item 3: [3, 625.0, 0, 'denoise', 'cond', 3] in the store, "
                    "[3, 624.0, 0, 'denoise', 'cond', 3] in this run")


def test_a_store_holding_a_label_twice_is_refused_on_opening(tmp_path):
    """Labels select by value: a store concatenated by hand with a layer twice read as one layer, or failed deep in
    pandas in every study; it is refused, naming the dim and the label. (The synthetic writer refuses them too.)"""
    from studies import synthetic
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match=r"layers \[2, 2\] name a layer twice"):
        synthetic.write_store(tmp_path / "a.zarr", "causal", layers=[2, 2], num_heads=2)
    one = xr.open_zarr(synthetic.write_store(tmp_path / "b.zarr", "causal", layers=[2], num_heads=2),
                       consolidated=False)
    twice = xr.concat([one, one], "layer", combine_attrs="override")
    for var in twice.variables.values():
        var.encoding.clear()
    twice.to_zarr(tmp_path / "c.zarr", consolidated=False)
    with pytest.raises(WorkbenchError, match=r"the same label twice along a dim \(\{'layer': \[2\]\}\)"):
        open_store(tmp_path / "c.zarr")
    assert open_store(tmp_path / "b.zarr").sizes["layer"] == 1


def test_a_zipped_store_or_a_store_object_is_refused_saying_how_to_read_it(tmp_path, reference, capsys):
    """A store shared as a zip: the workbench said xarray could not read it (xarray can, through zarr's ZipStore);
    it names the way, and the studies take the Dataset xarray opens."""
    import zarr

    from studies import metrics
    from workbench.errors import WorkbenchError

    shutil.make_archive(str(tmp_path / "s"), "zip", reference)
    assert cli_main(["report", str(tmp_path / "s.zip")]) == 2
    assert "s.zip' is a zip file: unzip it and give the *.zarr folder" in capsys.readouterr().err
    zipped = zarr.storage.ZipStore(tmp_path / "s.zip", mode="r")
    with pytest.raises(WorkbenchError, match="open_store takes a store's path, not ZipStore"):
        open_store(zipped)
    ds = xr.open_zarr(zipped, consolidated=False)
    xr.testing.assert_identical(metrics.head_metrics(ds), metrics.head_metrics(open_store(reference)))


def test_weights_replaced_between_their_hash_and_their_load_are_refused(tmp_path, capsys, monkeypatch):
    """A run's labels hash its files (the checkpoint, the text encoder) before the weights load; a file replaced in
    between (a training run saving into the folder a run reads, a copy still going) made a store labelled with one
    file and filled from another. extract, intervene and generate now refuse it after the loads, before anything
    is written (models/files.py `file_stamps`, `check_unchanged`)."""
    import models.wan.checkpoint as checkpoint_mod

    zoo = REPO / "data" / "embedded" / "checkpoints"
    ck = tmp_path / "checkpoint_model_000100" / "model.pt"
    ck.parent.mkdir()
    real = checkpoint_mod.weights_sha256

    def hashed_then_replaced(path):
        sha = real(path)
        if Path(path) == ck:  # (an atomic replace, as training's checkpoint writes are)
            shutil.copy(zoo / "self_forcing_dmd.pt", tmp_path / "new.pt")
            (tmp_path / "new.pt").replace(ck)
        return sha

    monkeypatch.setattr(checkpoint_mod, "weights_sha256", hashed_then_replaced)
    monkeypatch.setattr(extract_mod, "weights_sha256", hashed_then_replaced)
    common = ["--frames", "3", "--checkpoint", str(ck), "--use-ema", "--no-progress"]
    runs = {"extract": (["--layer", "0", "--steps", "0", "--out", str(tmp_path / "x.zarr")], tmp_path / "x.zarr"),
            "intervene": (["--ablate", "0:0", "--world", "off", "--out", str(tmp_path / "i.zarr")],
                          tmp_path / "i.zarr"),
            "generate": (["--prompt", "a red square moving right", "--no-video", "--out", str(tmp_path / "g")],
                         tmp_path / "g" / "p0000-s0.safetensors")}
    for command, (argv, out) in runs.items():
        shutil.copy(zoo / "self_forcing_dmd.pt", ck)
        assert cli_main([command, *common, *argv]) == 2, command
        err = capsys.readouterr().err
        assert f"'{ck}' changed between the hashing of the" in err and "no result was written" in err, (command, err)
        assert not out.exists(), command
    shutil.copy(zoo / "ode_init.pt", ck)  # a training run's probe store labels its initial weights the same way
    assert cli_main(["train", "--config", "configs/tiny_dmd.yaml", "--logdir", str(tmp_path / "log"), "--max-steps",
                     "1", "--no-progress", "--set", f"generator_ckpt={ck}"]) == 2
    assert f"'{ck}' changed between the hashing of the probe store's labels" in capsys.readouterr().err
    monkeypatch.setattr(checkpoint_mod, "weights_sha256", real)
    monkeypatch.setattr(extract_mod, "weights_sha256", real)
    assert cli_main(["extract", *common, *runs["extract"][0]]) == 0  # (the same run, the file left alone)


def test_file_stamps_see_a_replace_and_a_rewrite_in_place_that_keeps_size_and_mtime(tmp_path):
    from models.errors import CheckpointError
    from models.files import check_unchanged, file_stamps

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 10)
    stamps = file_stamps(f, tmp_path / "gone.bin")
    check_unchanged(stamps, "while loading")  # (unchanged; a file still gone is unchanged too)
    st = f.stat()
    time.sleep(0.02)
    f.write_bytes(b"b" * 10)  # in place, the old size and mtime put back (as `cp -p` / `rsync -a` keep them)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CheckpointError, match=r"w\.bin' changed while loading"):
        check_unchanged(stamps, "while loading")


def test_a_change_of_metadata_alone_is_no_change_of_the_files(tmp_path, monkeypatch):
    """chmod, a hard link, `touch -a` or times set again move a file's ctime and nothing else: no refusal (the run
    was refused, blaming a replace) when its bytes are those stamped: a small file's sha256 is in its stamp, a large
    one's as `sha256_file` remembered it. A large file's bytes rewritten under its old size and mtime still count,
    and so does a large file never hashed (nothing says what its bytes were)."""
    from models.errors import CheckpointError
    from models.files import SMALL_FILE, changed_files, check_unchanged, file_stamps, sha256_file

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    small, big, unhashed = tmp_path / "config.json", tmp_path / "w.pt", tmp_path / "other.pt"
    small.write_text('{"dim": 64}')
    big.write_bytes(b"a" * (SMALL_FILE + 1))
    unhashed.write_bytes(b"c" * (SMALL_FILE + 1))
    sha256_file(big)  # (the labels' hash: remembered for these stamps)
    stamps = file_stamps(small, big, unhashed)

    def metadata_only():
        time.sleep(0.02)
        for f in (small, big, unhashed):
            os.chmod(f, 0o644 if f.stat().st_mode & 0o777 != 0o644 else 0o640)
        os.link(big, tmp_path / "w-link.pt")
        st = small.stat()
        os.utime(small, ns=(st.st_atime_ns, st.st_mtime_ns))

    metadata_only()
    assert all(file_stamps(f)[str(f)][3] != stamps[str(f)][3] for f in (small, big, unhashed))  # (ctimes moved)
    assert changed_files(stamps) == [str(unhashed)]
    check_unchanged({k: v for k, v in stamps.items() if k != str(unhashed)}, "while loading")
    st = big.stat()
    big.write_bytes(b"b" * (SMALL_FILE + 1))  # in place, its old size and mtime put back
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CheckpointError, match=r"w\.pt' changed while loading"):
        check_unchanged({k: v for k, v in stamps.items() if k != str(unhashed)}, "while loading")
    small.unlink()
    os.mkfifo(small)  # (a pipe under the name: changed, and never opened, which would wait for a writer)
    assert str(small) in changed_files(stamps)


def test_a_refusal_names_only_the_sections_both_fingerprints_record():
    """A store made before a section of settings was recorded (a probe store's `layout`) names no setting of it
    as '(not set)'; a setting left out of a section both record is named."""
    from workbench.store import describe_differences

    stored = {"model": {"weights": "a"}}
    wanted = {"layout": {"layers": [1]}, "model": {"weights": "b", "image": "c"}}
    assert describe_differences(stored, wanted) == ("model.weights: a in the store, b in this run; "
                                                    "model.image: (not set) in the store, c in this run")


def test_facts_a_run_learns_are_added_to_the_store_once_with_each_entry(tmp_path):
    """`StoreWriter.write(facts=)`: lines (attn_refused) learnt with an entry join the store's list with its mark,
    on the first write and on appends by the same or a later writer, each once; no facts, no attr."""
    from studies import synthetic
    from workbench.store import StoreWriter

    parts = synthetic.sample_datasets("causal", seeds=(1, 2, 3, 4), layers=(0,))
    path, fp = tmp_path / "s.zarr", parts[0].attrs["fingerprint"]
    with StoreWriter(path, fp, mode="overwrite") as writer:
        writer.write(parts[0], facts={"attn_refused": []})
        assert "attn_refused" not in zarr.open_group(str(path), mode="r").attrs
        writer.write(parts[1], facts={"attn_refused": ["a"]})
        writer.write(parts[2], facts={"attn_refused": ["a", "b"]})
    with StoreWriter(path, fp) as writer:  # (a later run appends)
        writer.write(parts[3], facts={"attn_refused": ["c", "a"]})
    attrs = zarr.open_group(str(path), mode="r").attrs
    assert attrs["attn_refused"] == ["a", "b", "c"] and len(attrs["completed"]) == 4
