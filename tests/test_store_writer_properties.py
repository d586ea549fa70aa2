"""workbench/store.py and workbench/store_guard.py: what the writer promises about kills mid-write, repairs, the
lists of finished and requested entries, refusals of other models and other kinds of store, exact labels, fields
that later versions record, and the lock's holder. Each test builds tiny stores with `StoreWriter` and
`sample_dataset` directly (no model; CPU, well under a second)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import xarray as xr
import zarr

import workbench.store as store_mod
from models.common.labels import ForwardLabels
from workbench.errors import WorkbenchError
from workbench.store import StoreLayout, StoreLock, StoreWriter, open_store, sample_dataset

FP = "layoutfp:modelfp"


def layout(stats=("attn_mass",)) -> StoreLayout:
    """6 frames in chunks of 3, two steps (t = 1000 and 833.33..., as the released schedule), one layer, two heads,
    tokens of a 2 x 4 grid."""
    steps = [ForwardLabels(step=0, timestep=1000.0, chunk=0), ForwardLabels(step=1, timestep=2500 / 3, chunk=0)]
    return StoreLayout(steps=steps, layers=[3], heads=[0, 1], token_layers=[3], num_frames=6, num_frame_per_block=3,
                       frame_seq_len=8, grid=(2, 4), text_len=4, stats=list(stats), attrs={"created_utc": "t0"})


def entry(seed: int, lay: StoreLayout | None = None) -> xr.Dataset:
    """One sample whose attn_mass holds its seed everywhere (so a mixed-up sample shows)."""
    lay = lay or layout()
    S, L, H, F = len(lay.steps), len(lay.layers), len(lay.heads), lay.num_frames
    arrays = {"attn_mass": np.full((S, L, H, F, F), float(seed), np.float32)}
    if "attn_key_token" in lay.stats:
        arrays["attn_key_token"] = np.zeros((S, len(lay.token_layers), H, F, F * lay.frame_seq_len), np.float32)
    sample = dict(prompt_index=0, seed=seed, prompt="a red square moving right", checkpoint="ckpt",
                  checkpoint_sha256="0" * 64, model_family="self_forcing", sampler="causal_few_step",
                  local_attn_size=-1, sink_size=0, num_tokens=3, tokens=["a", "b", "c", ""])
    return sample_dataset(lay, sample, arrays)


def make_store(path, seeds) -> None:
    with StoreWriter(path, FP, log=lambda *a: None) as w:
        for s in seeds:
            w.write(entry(s))


def seeds_in(path) -> list[int]:
    ds = open_store(path)
    return [int(v) for v in ds.attn_mass.isel(step=0, layer=0, head=0, query_frame=0, key_frame=0).values]


def test_a_swap_killed_after_the_old_store_moved_aside_keeps_the_old_store(tmp_path, monkeypatch):
    """--overwrite swaps its first entry in by renames only: killed between moving the old store aside and moving
    the new one in, the old store is still on disk and the next writer puts it back (never deleted first); a reader
    meanwhile is told where it is, not "no store: run extract to make one"."""
    path = tmp_path / "s.zarr"
    make_store(path, [0, 1])
    real_replace = os.replace

    def killed_at_the_second_rename(src, dst):
        if str(src).endswith(".tmp"):
            raise KeyboardInterrupt  # (a kill: nothing after this line of _swap_in runs)
        real_replace(src, dst)

    monkeypatch.setattr(store_mod.os, "replace", killed_at_the_second_rename)
    w = StoreWriter(path, FP, mode="overwrite", log=lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        w.write(entry(7))
    w.close()
    monkeypatch.setattr(store_mod.os, "replace", real_replace)
    with pytest.raises(WorkbenchError, match=f"no store at '{path}', but its previous version is beside it as "
                                             f"'{tmp_path / '.s.zarr.old'}': a writer was stopped while replacing it"):
        open_store(path)
    StoreWriter(path, FP, log=lambda *a: None).close()  # the next run's _recover
    assert seeds_in(path) == [0, 1]


def test_an_entry_whose_mark_was_lost_is_replaced_not_kept_beside_its_recomputed_copy(tmp_path):
    """Killed between an entry's arrays and its mark: the resumed run drops those arrays and the entry is
    written once, with the values of the run that finished it (readers never see the unmarked copy)."""
    path = tmp_path / "s.zarr"
    make_store(path, [0, 1])
    stale = entry(2)
    stale["attn_mass"][:] = 99.0
    with StoreWriter(path, FP, log=lambda *a: None) as w:
        w.write(stale)
    zarr.open_group(path, mode="r+").attrs["completed"] = ["p0000-s0", "p0000-s1"]  # (the mark never came)
    with StoreWriter(path, FP, log=lambda *a: None) as w:
        assert w.completed == ["p0000-s0", "p0000-s1"]
        w.write(entry(2))
    assert zarr.open_group(path, mode="r")["attn_mass"].shape[0] == 3
    assert seeds_in(path) == [0, 1, 2]


def test_opening_unlists_finished_entries_whose_arrays_are_gone_before_any_append(tmp_path):
    """`completed` naming an entry without arrays is corrected when a writer opens the store, before it appends:
    a run killed mid-append then never leaves that entry listed as finished over partly written arrays."""
    path = tmp_path / "s.zarr"
    make_store(path, [0, 1])
    zarr.open_group(path, mode="r+").attrs["completed"] = ["p0000-s0", "p0000-s1", "p0000-s2"]
    with StoreWriter(path, FP, log=lambda *a: None) as w:
        assert w.completed == ["p0000-s0", "p0000-s1"]
        assert zarr.open_group(path, mode="r").attrs["completed"] == ["p0000-s0", "p0000-s1"]


def test_an_overwrite_leaves_no_copy_of_the_old_store_behind(tmp_path):
    """Once --overwrite's first entry is swapped in, the old store is gone from disk (no hidden `.NAME.old`
    holding its size), and so is a `.NAME.old` a killed run left beside a store that was swapped in whole."""
    path = tmp_path / "s.zarr"
    make_store(path, [0, 1])
    with StoreWriter(path, FP, mode="overwrite", log=lambda *a: None) as w:
        w.write(entry(5))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".s.zarr.lock") == ["s.zarr"]
    shutil.copytree(path, tmp_path / ".s.zarr.old")  # (killed after the new store moved in, before the rmtree)
    StoreWriter(path, FP, log=lambda *a: None).close()
    assert not (tmp_path / ".s.zarr.old").exists()
    assert seeds_in(path) == [5]


def test_step_and_token_labels_are_exact(tmp_path):
    """Labels of a sample as docs/store.md defines them: `timestep` keeps float32 precision (833.33 is not rounded
    to a half-precision 833.5), key_token = f * frame_seq_len + h * W + w, chunks of 3 frames."""
    lay = layout(stats=("attn_mass", "attn_key_token"))
    ds = entry(0, lay)
    assert ds.timestep.dtype == np.float32
    np.testing.assert_array_equal(ds.timestep.values, np.float32([1000.0, 2500 / 3]))
    tok = ds.key_token.values
    f, h, w = ds.key_token_frame.values, ds.key_token_h.values, ds.key_token_w.values
    np.testing.assert_array_equal(f * 8 + h * 4 + w, tok)
    assert h.max() == 1 and w.max() == 3 and f.max() == 5
    assert ds.query_chunk.values.tolist() == ds.key_chunk.values.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.key_frame.values.tolist() == ds.query_frame.values.tolist() == list(range(6))
    assert ds.attn_mass.dtype == np.float32
    assert ds.key_chunk.attrs["long_name"] == "chunk (generation block) of the key frame"
    assert ds.timestep.attrs["units"] == "timestep in [0, 1000]"


def test_a_damaged_store_with_a_partly_written_tail_is_repaired(tmp_path):
    """A store with an unmarked entry in the middle (a rewrite is needed) whose last append was also cut midway
    (one array a sample longer): the writer opens it, keeps the finished entries and readers show them."""
    path = tmp_path / "s.zarr"
    make_store(path, [0, 1, 2])
    group = zarr.open_group(path, mode="r+")
    group.attrs["completed"] = ["p0000-s0", "p0000-s2"]
    group["attn_mass"].resize((4, *group["attn_mass"].shape[1:]))  # (the killed append got this far)
    with StoreWriter(path, FP, log=lambda *a: None) as w:
        assert w.completed == ["p0000-s0", "p0000-s2"]
    assert seeds_in(path) == [0, 2]


def test_a_rewritten_store_lists_only_the_entries_it_holds(tmp_path):
    """The rewrite of a damaged store lists as finished exactly the entries it kept (not the damaged list)."""
    path = tmp_path / "s.zarr"
    make_store(path, [0, 1, 2])
    zarr.open_group(path, mode="r+").attrs["completed"] = ["p0000-s0", "p0000-s2", "p0000-s3"]  # s3: no arrays
    with StoreWriter(path, FP, log=lambda *a: None) as w:
        assert w.completed == ["p0000-s0", "p0000-s2"]
    assert zarr.open_group(path, mode="r").attrs["completed"] == ["p0000-s0", "p0000-s2"]


def test_an_append_killed_after_its_arrays_grew_shows_no_unfinished_entry(tmp_path, monkeypatch):
    """An entry is marked finished only after its arrays are written: killed once every array was lengthened but
    before the statistic's values were written, readers show the finished entries only (not a NaN sample)."""
    path = tmp_path / "s.zarr"
    make_store(path, [0, 1])

    def killed_mid_append(self, store, **kw):
        group = zarr.open_group(store, mode="r+")
        for name, n in store_mod.lengths_along(group, "sample").items():
            group[name].resize((n + 1, *group[name].shape[1:]))
        group["sample"][2] = "p0000-s2"
        raise KeyboardInterrupt

    w = StoreWriter(path, FP, log=lambda *a: None)
    monkeypatch.setattr(xr.Dataset, "to_zarr", killed_mid_append)
    monkeypatch.setattr(StoreWriter, "truncate", lambda self, n: None)  # (a kill: no clean-up runs)
    with pytest.raises(KeyboardInterrupt):
        w.write(entry(2))
    w.close()
    monkeypatch.undo()
    assert seeds_in(path) == [0, 1]


def test_dropping_every_entry_leaves_no_store(tmp_path):
    """keep_only of nothing (a training run resumed before its first probe) removes the store, so that no reader
    shows the probes of the abandoned run."""
    path = tmp_path / "s.zarr"
    make_store(path, [0, 1])
    with StoreWriter(path, FP, log=lambda *a: None) as w:
        w.keep_only([])
        assert w.completed == []
    assert not path.exists()


def test_dropped_entries_leave_the_finished_list_before_their_arrays(tmp_path):
    """keep_only lists only the kept entries on disk (a reader holding the store then sees the others go)."""
    path = tmp_path / "s.zarr"
    make_store(path, [0, 1, 2])
    with StoreWriter(path, FP, log=lambda *a: None) as w:
        w.keep_only(["p0000-s0"])
    assert zarr.open_group(path, mode="r").attrs["completed"] == ["p0000-s0"]
    assert seeds_in(path) == [0]


def test_settings_that_agree_under_another_fingerprint_are_refused(tmp_path):
    """Without a `same_values` mapping, a store whose fingerprint differs is refused even when its recorded
    settings equal this run's (made by another version's hashing: nothing says the two are the same model)."""
    path = tmp_path / "s.zarr"
    fields = {"layout": {"layers": [3]}, "model": {"weights": "0" * 64}}
    with StoreWriter(path, FP, fields=fields, log=lambda *a: None) as w:
        w.write(entry(0))
    with pytest.raises(WorkbenchError, match="fingerprints do not"):
        StoreWriter(path, "layoutfp:otherfp", fields=fields, log=lambda *a: None)


def test_entries_of_another_checkpoint_are_refused_by_entry_coords(tmp_path):
    """`entry_coords` must hold for every kept entry: a store whose samples carry another checkpoint_sha256 is
    refused, naming the samples."""
    path = tmp_path / "s.zarr"
    make_store(path, [0, 1])
    with pytest.raises(WorkbenchError, match=r"another model \(checkpoint_sha256 of p0000-s0, p0000-s1"):
        StoreWriter(path, FP, entry_coords={"checkpoint_sha256": "1" * 64}, log=lambda *a: None)


def test_a_store_of_another_kind_is_refused_as_such(tmp_path):
    """A store that lists its entries under another attr (a training probe store opened by a sample writer) is
    refused with a WorkbenchError naming that, even under the same fingerprint (not a KeyError)."""
    path = tmp_path / "s.zarr"
    make_store(path, [0])
    group = zarr.open_group(path, mode="r+")
    group.attrs["completed_train_steps"] = group.attrs["completed"]
    del group.attrs["completed"]
    with pytest.raises(WorkbenchError, match="another kind of store"):
        StoreWriter(path, FP, log=lambda *a: None)


def test_a_run_that_appends_several_entries_is_listed_once_in_runs(tmp_path):
    """Each later run that appends is listed once under `runs`, however many entries it adds; the creating run
    not at all."""
    path = tmp_path / "s.zarr"
    make_store(path, [0, 1])
    later = layout()
    later.attrs = {"created_utc": "t1", "command": "workbench extract --seed 2-3"}
    with StoreWriter(path, FP, log=lambda *a: None) as w:
        w.write(entry(2, later))
        w.write(entry(3, later))
    runs = zarr.open_group(path, mode="r").attrs["runs"]
    assert runs == [{"created_utc": "t1", "command": "workbench extract --seed 2-3"}]
    assert seeds_in(path) == [0, 1, 2, 3]


def test_requested_entries_of_earlier_runs_are_kept(tmp_path):
    """`requested` lists what every run asked for (the report names those not there yet): a later run that asks
    for other entries adds them, keeping the earlier runs' requests."""
    path = tmp_path / "s.zarr"
    with StoreWriter(path, FP, log=lambda *a: None) as w:
        w.requested = ["p0000-s0", "p0000-s1", "p0000-s2"]
        w.write(entry(0))
    with StoreWriter(path, FP, log=lambda *a: None) as w:
        w.requested = ["p0000-s3"]
        w.write(entry(3))
    assert zarr.open_group(path, mode="r").attrs["requested"] == ["p0000-s0", "p0000-s1", "p0000-s2", "p0000-s3"]


def test_a_store_of_another_schema_version_is_refused_by_readers(tmp_path):
    """open_store refuses a store whose schema_version it does not know (docs/store.md), naming the version."""
    path = tmp_path / "s.zarr"
    make_store(path, [0])
    zarr.open_group(path, mode="r+").attrs["schema_version"] = 2
    with pytest.raises(WorkbenchError, match="has schema_version 2"):
        open_store(path)


LATER = {"model.own_stats": "the definition and code of its own (plugins') statistics"}


def _write(path, fp, fields, seed, log=lambda *a: None):
    with StoreWriter(path, fp, fields=fields, later=LATER, log=log) as w:
        w.write(entry(seed))


def test_a_store_recording_part_of_a_later_field_is_refused_not_joined(tmp_path):
    """own_stats {A} in the store, {A, B} in this run: refused (B was not "unrecorded", the store's run had no B);
    a store without own_stats at all joins, with the note."""
    old = {"layout": {"x": 1}, "model": {"w": 1, "own_stats": {"A": {"code": "a1"}}}}
    new = {"layout": {"x": 1}, "model": {"w": 1, "own_stats": {"A": {"code": "a1"}, "B": {"code": "b1"}}}}
    _write(tmp_path / "part.zarr", "l:old", old, 0)
    notes = []
    with pytest.raises(WorkbenchError):
        _write(tmp_path / "part.zarr", "l:new", new, 1, log=notes.append)
    assert not any("older workbench" in str(n) for n in notes)
    _write(tmp_path / "none.zarr", "l:older", {"layout": {"x": 1}, "model": {"w": 1}}, 0)
    _write(tmp_path / "none.zarr", "l:new", new, 1, log=notes.append)
    assert any("older workbench that did not record the definition and code" in str(n) for n in notes)


def test_a_holder_file_of_an_ended_process_names_no_holder(tmp_path):
    """holder() of a holder file whose pid (on this host) has ended is "holder unknown"; of this process, its pid."""
    lock = StoreLock(tmp_path / "s.zarr")
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    me = dict(host=socket.gethostname(), since="t0", command="workbench extract")
    lock.holder_file.write_text(json.dumps(dict(me, pid=ended.pid)))
    assert lock.holder(wait=0.0) == "holder unknown"
    lock.holder_file.write_text(json.dumps(dict(me, pid=os.getpid())))
    assert lock.holder(wait=0.0).startswith(f"pid {os.getpid()} on {socket.gethostname()}")


def test_a_holder_that_has_not_written_its_file_yet_is_waited_for(tmp_path):
    """A holder that has just taken the lock writes its file a moment later: holder(wait) waits for it and names it
    rather than answering "holder unknown" at once (the file still names an ended process, or is not there yet)."""
    lock = StoreLock(tmp_path / "s.zarr")
    me = dict(pid=os.getpid(), host=socket.gethostname(), since="t0", command="workbench extract")
    timer = threading.Timer(0.2, lambda: lock.holder_file.write_text(json.dumps(me)))
    timer.start()
    try:
        assert lock.holder(wait=3.0).startswith(f"pid {os.getpid()} on ")
    finally:
        timer.join()
