"""Attention stores: labelled xarray Datasets in zarr v3, laid out as `docs/store.md` defines.

This module knows the attention store's on-disk layout (`sample_dataset`, `COORD_ATTRS`) and writes every store
(`StoreWriter`, one writer at a time: workbench/store_lock.py). Writers hand it whole samples: the `extract`
command, training probes (training/probes.py adds the `train_step` dim), `workbench intervene` (its effects
entries: workbench/intervene.py `entry_dataset`); readers (studies, notebooks) call `open_store`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from models.common.chunks import frame_chunks
from workbench.errors import WorkbenchError
from workbench.statistics import STATISTICS
from workbench.store_guard import GuardedStore
from workbench.store_lock import StoreLock

SCHEMA_VERSION = 1


def named(path: str | Path) -> Path:
    """`path` with a name of its own: `.` and `..` (a command run inside the store) made absolute, so that the
    files named after the store (its report, its videos' folder) can be found."""
    path = Path(path)
    return path.resolve() if path.name in ("", "..") else path


def beside(store: str | Path, suffix: str) -> Path:
    """A file or folder named after the store, beside it: runs/x.zarr + ".html" -> runs/x.html; a store named
    without .zarr keeps its whole name (runs/run.v1.5 -> runs/run.v1.5.html, not run.v1's)."""
    store = named(store)
    return store.with_name(store.name.removesuffix(".zarr") + suffix)


def open_store(path: str | Path) -> xr.Dataset:
    """Open a store lazily, check its schema version, and load the small non-index coords into memory
    (so `groupby("chunk")` and string selections work without dask). Only finished entries are shown: what a run
    that is writing, or was stopped while writing (a kill, a full disk), has added past them is left out with a
    note (`_finished_only`), however far that write got."""
    if not isinstance(path, (str, os.PathLike)):
        raise WorkbenchError(f"open_store takes a store's path, not {type(path).__name__}; a zarr store object opens "
                             "with xarray.open_zarr(store, consolidated=False), and the studies take that Dataset")
    path = Path(path)
    if not path.exists():
        from workbench.progress import shell_word

        old = path.with_name(f".{path.name}.old")  # (a writer killed between its two renames: StoreWriter._swap_in)
        if old.is_dir():
            raise WorkbenchError(f"no store at {str(path)!r}, but its previous version is beside it as {str(old)!r}: "
                                 "a writer was stopped while replacing it; the next run that writes the store puts it "
                                 f"back (or do so yourself: mv {shell_word(old)} {shell_word(path)})")
        raise WorkbenchError(f"no store at {str(path)!r}: run `workbench extract --out {shell_word(path)}` to make one")
    if path.is_file():
        import zipfile

        if zipfile.is_zipfile(path):
            raise WorkbenchError(f"{str(path)!r} is a zip file: unzip it and give the *.zarr folder (plain xarray "
                                 "reads a zipped store in place: xarray.open_zarr(zarr.storage.ZipStore(PATH, "
                                 "mode='r'), consolidated=False), a Dataset the studies take)")
        raise WorkbenchError(f"{str(path)!r} is a file, not a store: give a *.zarr folder written by `workbench "
                             "extract`, `intervene` or `train`")
    if path.is_dir() and not (path / "zarr.json").is_file() and not (path / ".zgroup").is_file():
        what = "a folder of `workbench generate` outputs" if any(path.glob("p*-s*.safetensors")) else "a folder"
        raise WorkbenchError(f"{str(path)!r} is {what}, not a store (no zarr.json): give a *.zarr folder written by "
                             "`workbench extract`, `intervene` or `train`")
    for attempt in range(OPEN_ATTEMPTS):  # (a writer appending meanwhile can change lengths under the open)
        guard = GuardedStore(path=path)  # (reads checked against a swap or cut of the folder: store_guard.py)
        try:
            try:
                ds = xr.open_zarr(guard, consolidated=False)
            except Exception as err:  # zarr raises several types for "not a zarr group"
                ds = _open_cut(path, guard, err, last=attempt == OPEN_ATTEMPTS - 1)
            break
        except _Moving:
            time.sleep(0.05 * (attempt + 1))
    ds.encoding["source"] = str(path)
    ds = _finished_only(ds, path)
    dim, attr = append_dim_of(ds.attrs)
    if attr in ds.attrs and dim in ds.coords:
        guard.watch.shown(attr, ds[dim].values.tolist())
    version = ds.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise WorkbenchError(
            f"store {str(path)!r} has schema_version {version!r}; this workbench reads version {SCHEMA_VERSION} "
            "(see docs/store.md)"
        )
    small = [name for name, coord in ds.coords.items() if name not in ds.dims]
    ds = ds.assign_coords({name: ds[name].load() for name in small})
    check_one_model(ds, path)  # (first: an older store appended by another model names its samples twice)
    twice = {dim: ds.indexes[dim][ds.indexes[dim].duplicated()].tolist()[:3]
             for dim in ds.dims if dim in ds.indexes and not ds.indexes[dim].is_unique}
    if twice:  # (labels select by value: a layer held twice would be read as one, or fail deep in pandas)
        raise WorkbenchError(f"store {str(path)!r} holds the same label twice along a dim ({twice}); it was not "
                             "written by the workbench's writer, or was concatenated by hand")
    return ds


def append_dim_of(attrs: dict) -> tuple[str, str]:
    """(the dim a store grows along, the attr listing its finished entries): samples of an attention store,
    interventions of an effects store, train steps of a training probe store."""
    if "completed_train_steps" in attrs:
        return "train_step", "completed_train_steps"
    return ("intervention" if attrs.get("store_kind") == "effects" else "sample"), "completed"


def lengths_along(group, dim: str) -> dict[str, int]:
    """{array name: its length along `dim`} for the arrays of a zarr group that have that dim."""
    lengths = {}
    for name, array in group.arrays():
        dims = array.metadata.dimension_names or ()
        if dim in dims:
            lengths[name] = array.shape[dims.index(dim)]
    return lengths


OPEN_ATTEMPTS = 8  # (waits 0.05, 0.1, ... s between: an append lengthens its arrays in a fraction of a second)


class _Moving(Exception):
    """The store's arrays changed length while they were opened (a writer is appending): open it again."""


def _open_cut(path: Path, guard, err: Exception, last: bool) -> xr.Dataset:
    """A store whose arrays disagree on the append dim's length (a write stopped midway, or going on: some arrays
    got the new entry, others not), which xr.open_zarr refuses: each group of arrays of one length opened on its
    own and cut to the length every array has. Lengths that move while it opens are `_Moving` (unless `last`);
    anything else unreadable is a WorkbenchError."""
    import zarr

    unreadable = WorkbenchError(f"{str(path)!r} is not a zarr store readable by xarray ({err})")
    try:
        group = zarr.open_group(path, mode="r")
        dim, _ = append_dim_of(dict(group.attrs))
        lengths = lengths_along(group, dim)
        # which arrays are coordinates: the data variables name them (a group of only coordinates, e.g. the
        # labels a killed append lengthened before any statistic, would otherwise open them as data variables)
        coords = {c for _, a in group.arrays() for c in str(a.attrs.get("coordinates", "")).split()}
    except Exception:
        raise unreadable from err
    if len(set(lengths.values())) < 2:  # lengths that agree: they moved since xarray read them, or the store is
        if not lengths or last:            # unreadable for another reason, which a second look tells
            raise unreadable from err
        try:
            return xr.open_zarr(guard, consolidated=False)
        except Exception:
            if lengths_along(zarr.open_group(path, mode="r"), dim) == lengths:
                raise unreadable from err
            raise _Moving from err
    n = min(lengths.values())
    try:
        parts = []
        for size in sorted(set(lengths.values())):
            part = xr.open_zarr(guard, consolidated=False, drop_variables=[k for k, v in lengths.items() if v != size])
            parts.append(part.set_coords([v for v in part.data_vars if v in coords]).isel({dim: slice(0, n)}))
        ds = xr.merge(parts, compat="override", join="outer", combine_attrs="override")
    except Exception as moved:
        if last:
            raise unreadable from moved
        raise _Moving from moved
    _warn_unfinished(path, dim, max(lengths.values()) - n, n)
    return ds


def _warn_unfinished(path, dim: str, left_out: int, kept: int) -> None:
    import warnings

    from models.errors import ModelInputWarning

    warnings.warn(f"{path}: left out {left_out} unfinished {dim}(s) past its {kept} finished one(s) (a run is "
                  "writing it or was stopped while writing; the same command, run again, finishes the store)",
                  ModelInputWarning, stacklevel=4)


def _finished_only(ds: xr.Dataset, path) -> xr.Dataset:
    """The store's finished entries: the first copy of each entry its finished list names (`completed`, or
    `completed_train_steps`), in store order; the rest (an entry a run is writing or was stopped writing) is left
    out with a warning. A store without that list is shown whole."""
    dim, attr = append_dim_of(ds.attrs)
    if attr not in ds.attrs or dim not in ds.dims or dim not in ds.coords:
        return ds
    wanted, keep, seen = {str(k) for k in ds.attrs[attr]}, [], set()
    for i, key in enumerate(str(k) for k in ds[dim].values.tolist()):
        if key in wanted and key not in seen:
            keep.append(i)
            seen.add(key)
    if len(keep) == ds.sizes[dim]:
        return ds
    _warn_unfinished(path, dim, ds.sizes[dim] - len(keep), len(keep))
    return ds.isel({dim: keep})


def check_one_model(ds: xr.Dataset, path) -> None:
    """A store holds the samples of one model (docs/store.md). `--append` of an older workbench could add another
    checkpoint's samples to a store; such a store is refused here, so that no report averages two models."""
    if "checkpoint_sha256" not in ds.coords or "sample" not in ds["checkpoint_sha256"].dims:
        return
    shas = [str(v) for v in ds["checkpoint_sha256"].values]
    models = list(dict.fromkeys(shas))
    if len(models) > 1:
        ids = [str(v) for v in ds["sample"].values]
        parts = "; ".join(f"checkpoint_sha256 {m[:12]}...: {_short([i for i, s in zip(ids, shas) if s == m], 3)}"
                          for m in models)
        raise WorkbenchError(
            f"store {str(path)!r} mixes the samples of {len(models)} models ({parts}); an older workbench's --append "
            "made it. Split it by model: ds = xarray.open_zarr(path, consolidated=False); "
            "ds.isel(sample=(ds.checkpoint_sha256 == SHA).values).to_zarr(NEW_PATH)")


# ------------------------------------------------------------------------------------------------------
# Writing


@dataclass
class StoreLayout:
    """Everything about a store that does not change from sample to sample."""

    steps: list  # ForwardLabels of each captured step, in order
    layers: list[int]
    heads: list[int]
    token_layers: list[int]
    num_frames: int
    num_frame_per_block: int  # 0 for the bidirectional sampler (one chunk)
    frame_seq_len: int
    grid: tuple[int, int]
    text_len: int
    stats: list[str]
    attrs: dict  # schema attrs: config_yaml, command, versions, fingerprint, ...
    independent_first_frame: bool = False  # frame 0 is a chunk of its own (models/common/chunks.py)

    def chunk_of(self, frames) -> np.ndarray:
        """The chunk of each frame (the store's query_chunk / key_chunk); all 0 for the bidirectional sampler."""
        frames = np.asarray(frames)
        if not self.num_frame_per_block:
            return np.zeros_like(frames)
        return np.asarray(frame_chunks(self.num_frames, self.num_frame_per_block,
                                       self.independent_first_frame))[frames]


def chunk_sizes(query_chunk) -> list[int]:
    """Frames per chunk, in frame order, from a store's `query_chunk` coordinate: [1, 3, 3, 3, 3, 3, 3] for 19
    frames with an independent first frame, [21] for the bidirectional sampler."""
    chunks = [int(c) for c in np.asarray(query_chunk)]
    sizes: list[int] = []
    for i, c in enumerate(chunks):
        if i == 0 or c != chunks[i - 1]:
            sizes.append(0)
        sizes[-1] += 1
    return sizes


def sample_id(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:04d}-s{seed}"


def _strings(values) -> np.ndarray:
    return np.array(list(values), dtype=object)


# each coordinate's attrs (long_name, and units where it has some): docs/store.md's tables, in the store itself
COORD_ATTRS = {
    "sample": dict(long_name="one video: p<prompt_index>-s<seed>"),
    "step": dict(long_name="kind of DiT forward in a chunk's schedule, in the order they run (see phase, cfg)"),
    "layer": dict(long_name="transformer block index"),
    "head": dict(long_name="attention head index"),
    "query_frame": dict(long_name="latent frame of the query tokens", units="frames"),
    "key_frame": dict(long_name="latent frame of the key tokens", units="frames"),
    "timestep": dict(long_name="diffusion timestep the DiT saw (the context pass: context_noise)",
                     units="timestep in [0, 1000]"),
    "phase": dict(long_name="denoise, or context (the pass that writes a finished chunk to the KV cache)"),
    "cfg": dict(long_name="classifier-free guidance branch: cond, uncond, or none (no CFG)"),
    "denoise_index": dict(long_name="index into the denoising schedule; -1 for the context pass"),
    "query_chunk": dict(long_name="chunk (generation block) of the query frame"),
    "key_chunk": dict(long_name="chunk (generation block) of the key frame"),
    "prompt": dict(long_name="prompt text"),
    "prompt_index": dict(long_name="index of the prompt among the run's prompts"),
    "seed": dict(long_name="seed of the noise"),
    "checkpoint": dict(long_name="the weights that ran (a zoo model, a checkpoint path as given, a weights file)"),
    "checkpoint_sha256": dict(long_name="sha256 of the weights file"),
    "model_family": dict(long_name="wan (base weights) or self_forcing (a Self-Forcing checkpoint)"),
    "sampler": dict(long_name="sampler: causal_few_step, causal_multi_step_cfg or bidirectional"),
    "local_attn_size": dict(long_name="KV-cache window (-1: global)", units="frames"),
    "sink_size": dict(long_name="sink frames kept at the front of the KV cache", units="frames"),
    "num_tokens": dict(long_name="the prompt's token count, </s> included", units="tokens"),
    "text_token": dict(long_name="position in the padded prompt token sequence"),
    "token": dict(long_name="text of each prompt token ('' past the prompt)"),
    "uncond_token": dict(long_name="text of each negative-prompt token (the keys of the cfg = uncond rows)"),
    "uncond_num_tokens": dict(long_name="the negative prompt's token count", units="tokens"),
    "token_layer": dict(long_name="transformer block index of attn_key_token"),
    "key_token": dict(long_name="key token index: key_token_frame * frame_seq_len + key_token_h * W + key_token_w"),
    "train_step": dict(long_name="completed training iterations when the probe ran (0: before any update)"),
    "key_token_frame": dict(long_name="latent frame of the key token", units="frames"),
    "key_token_h": dict(long_name="token row of the key token in its frame"),
    "key_token_w": dict(long_name="token column of the key token in its frame"),
}


def sample_dataset(layout: StoreLayout, sample: dict, arrays: dict[str, np.ndarray]) -> xr.Dataset:
    """One sample as a Dataset with a length-1 `sample` dim. `sample` holds the per-sample coords
    (prompt_index, seed, prompt, checkpoint, checkpoint_sha256, model_family, sampler, local_attn_size,
    sink_size, tokens (list of text_len strings), num_tokens, and with CFG the negative prompt's uncond_tokens and
    uncond_num_tokens); arrays are [S, L, H, F, ...] per statistic."""
    F = layout.num_frames
    data_vars = {}
    for stat, values in arrays.items():
        data_vars[stat] = xr.Variable(STATISTICS[stat].dims, values[None].astype(np.float32),  # (the registry's,
                                      attrs=STATISTICS[stat].attrs)                           # plugins' included)
    steps = layout.steps
    coords = {
        "sample": _strings([sample_id(sample["prompt_index"], sample["seed"])]),
        "step": np.array([s.step for s in steps], dtype=np.int64),
        "layer": np.array(layout.layers, dtype=np.int64),
        "head": np.array(layout.heads, dtype=np.int64),
        "query_frame": np.arange(F, dtype=np.int64),
        "key_frame": np.arange(F, dtype=np.int64),
        "timestep": ("step", np.array([s.timestep for s in steps], dtype=np.float32)),
        "phase": ("step", _strings(s.phase for s in steps)),
        "cfg": ("step", _strings(s.cfg for s in steps)),
        "denoise_index": ("step", np.array([s.denoise_index for s in steps], dtype=np.int64)),
        "query_chunk": ("query_frame", layout.chunk_of(np.arange(F))),
        "key_chunk": ("key_frame", layout.chunk_of(np.arange(F))),
    }
    for name in ("prompt", "checkpoint", "checkpoint_sha256", "model_family", "sampler"):
        coords[name] = ("sample", _strings([sample[name]]))
    for name in ("prompt_index", "seed", "local_attn_size", "sink_size", "num_tokens"):
        coords[name] = ("sample", np.array([sample[name]], dtype=np.int64))
    dims = {d for stat in arrays for d in STATISTICS[stat].dims}
    if "text_token" in dims:
        coords["text_token"] = np.arange(layout.text_len, dtype=np.int64)
        coords["token"] = (("sample", "text_token"), _strings(sample["tokens"]).reshape(1, -1))
        if "uncond_tokens" in sample:  # the keys of the cfg = uncond rows: the negative prompt's tokens
            coords["uncond_token"] = (("sample", "text_token"), _strings(sample["uncond_tokens"]).reshape(1, -1))
            coords["uncond_num_tokens"] = ("sample", np.array([sample["uncond_num_tokens"]], dtype=np.int64))
    if "token_layer" in dims:  # (a plugin's statistic may have it without key_token)
        coords["token_layer"] = np.array(layout.token_layers, dtype=np.int64)
    if "key_token" in dims:
        h, w = layout.grid
        tok = np.arange(F * layout.frame_seq_len)
        coords["key_token"] = tok
        coords["key_token_frame"] = ("key_token", tok // layout.frame_seq_len)
        coords["key_token_h"] = ("key_token", (tok % layout.frame_seq_len) // w)
        coords["key_token_w"] = ("key_token", tok % w)
    attrs = {"schema_version": SCHEMA_VERSION, **layout.attrs, "stats": list(layout.stats), "completed": []}
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    for name in ds.coords:
        ds[name].attrs.update(COORD_ATTRS.get(name, {}))
    return ds


def stats_in_store_order(path: str | Path, stats) -> list[str]:
    """`stats` in the order of the store at `path` when it holds the same ones (as given otherwise, or when there
    is no store): the order of a run's statistics is no setting, so the same ones in another order go on in the
    store's order (extract's --stats, training's probe.stats)."""
    stats = [str(s) for s in stats]
    if not (Path(path) / "zarr.json").exists():
        return stats
    try:
        import zarr

        stored = [str(s) for s in zarr.open_group(str(path), mode="r").attrs.get("stats") or []]
    except Exception:  # (not a store: the writer says so)
        return stats
    return stored if sorted(stored) == sorted(stats) else stats


class StoreWriter:
    """Appends whole entries (samples; for training probes, train steps) to a store; resumable; one writer at a
    time (`StoreLock`: taken before anything is read, or handed over already held; released by `close()`).

    The keys of the finished entries live in the store's attrs (`completed`) and are updated after an entry's
    arrays are written. Opening an existing store keeps exactly the entries whose key is listed there (the
    first copy of each) and drops everything else: the partial entry a killed run leaves at the end, and any
    duplicate or unlisted entry (a store written by two processes at once before stores were locked), each
    reported through `log`. A new store is written to a temporary folder and swapped in; so is a repaired one.
    Attrs are those of the run that created the store; each later run that appends is listed once in `runs`.
    `fields` (nested dicts of the settings the fingerprint hashes) are stored as `fingerprint_fields`, so that a
    refusal can name the setting that differs; `entry_coords` ({coord: value}) must hold for every kept entry.
    `later` ({flattened field name: in words}): fields added to the fingerprint after stores were made without
    them; such a store takes this run's entries when every field it did record equals this run's (its fingerprint
    may differ: an older workbench hashed them its way) and keeps its own, with a note of what is not checked.
    `absent` ({flattened field name: value}): what a field means where a fingerprint leaves it out (a setting
    recorded only when it is not at its default), so that a refusal names only the settings that differ.
    `same_values` ({flattened field name: {value: this run's value}}): values older stores recorded for what this
    run records another way (`--dtype bf16` as typed, now "bfloat16"); such a store takes this run's entries.
    """

    def __init__(self, path: str | Path, fingerprint: str, *, mode: str = "resume", append_dim: str = "sample",
                 completed_attr: str = "completed",
                 hint: str = "pass --overwrite to replace it, or choose another --out",
                 fields: dict | None = None, entry_coords: dict | None = None, lock: StoreLock | None = None,
                 log=print, made_by: str | None = None, later: dict[str, str] | None = None,
                 absent: dict | None = None, same_values: dict[str, dict] | None = None):
        if mode not in ("resume", "append", "overwrite"):
            raise WorkbenchError(f"unknown store mode {mode!r}; use resume, append or overwrite")
        # the real folder: a store reached through a symlink (to scratch space) is replaced there, the link kept
        # (replaced by path, the link became a new folder beside the old store, and a link left as .NAME.old);
        # other paths stay as given (the messages name them so)
        real = Path(path).resolve()
        self.path = real if real != Path(path).absolute() else Path(path)
        self.fingerprint, self.fields, self.later = fingerprint, fields, later or {}
        self.absent = absent or {}  # {flattened field: what it means where a fingerprint leaves it out}
        self.same_values = same_values or {}  # {flattened field: {an older store's value: this run's}}
        self.made_by = made_by  # this run's weights in words (a refusal names them beside the store's)
        self.append_dim, self.completed_attr, self.hint, self.log = append_dim, completed_attr, hint, log
        self.completed: list = []
        self.requested: list = []  # the entries this run was asked for (the store's `requested`, with earlier runs')
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._old = self.path.with_name(f".{self.path.name}.old")
        self.lock = StoreLock(self.path).acquire() if lock is None else lock
        try:
            self._recover()
            if self.path.exists():
                from models.files import ensure_writable_dir

                ensure_writable_dir(self.path)
                if mode != "overwrite":  # (appending writes in every array's folder, after the model work)
                    from models.files import check_writable_tree

                    check_writable_tree(self.path)
                if mode == "overwrite" and not _replaceable(self.path):  # (a mistyped --out: not someone's folder)
                    raise WorkbenchError(_not_a_store(self.path, self.hint))
                if mode != "overwrite":  # (overwrite: the old store goes when the first new entry is swapped in)
                    self._open_existing(entry_coords or {})
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the store's lock."""
        self.lock.release()

    def kept_note(self, what: str, mode: str) -> str:
        """What a run stopped midway leaves (the line `workbench` prints): the store's finished `what` (e.g.
        'sample(s)') and how to go on; with --overwrite, that the same command starts over, and before its first
        entry that the store is as it was (the old store goes when the first new entry is swapped in)."""
        n = len(self.completed)
        if not n:
            return (f"Nothing of this run was finished; {self.path} is as it was (--overwrite replaces it once this "
                    "run's first entry is done)." if mode == "overwrite" and self.path.exists()
                    else "Nothing was finished, so nothing is kept.")
        if mode == "overwrite":
            return (f"{self.path} holds this run's {n} finished {what}: the same command without --overwrite resumes "
                    "there (with it, it starts over).")
        return f"{self.path} holds {n} finished {what}: the same command, run again, resumes there."

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- opening -------------------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Finish or undo a swap a killed writer left half done (`_swap_in`), and drop its temporary folder."""
        if not self.path.exists() and self._old.exists():
            os.replace(self._old, self.path)
        for leftover in (self._old, self._tmp):
            if leftover.is_symlink():  # (left by a workbench that replaced a symlinked store as a folder)
                leftover.unlink()
            elif leftover.exists():
                shutil.rmtree(leftover)

    def _whose(self, group, attrs) -> str:
        """"the store's samples: CHECKPOINT (ENTRY), this run's: ..." when both are known and differ, else ''."""
        if self.made_by is None or "checkpoint" not in group or group["checkpoint"].shape[0] == 0:
            return ""
        key = ((attrs.get("fingerprint_fields") or {}).get("model") or {}).get("key")
        theirs = f"{np.asarray(group['checkpoint'][:1]).tolist()[0]}{ema_suffix(key == 'ema')}"
        return "" if theirs == self.made_by else f"the store's samples: {theirs}, this run's: {self.made_by}"

    def _unrecorded(self, stored: dict | None) -> str:
        """The `later` fields (in words) a store's fingerprint fields lack when all they hold equal this run's; ''
        when there are none, or when a field differs."""
        if not stored or self.fields is None:
            return ""
        a, b = self._as_now(stored), _flat(_plain(self.fields))

        def later(k):  # the `later` field that k is, or is inside (model.own_stats.NAME.code: model.own_stats)
            return next((p for p in self.later if k == p or k.startswith(p + ".")), None)

        lacking = [k for k in b if k not in a and later(k) and not any(later(x) == later(k) for x in a)]
        same = a == {k: v for k, v in b.items() if k not in lacking}
        return ", ".join(dict.fromkeys(self.later[later(k)] for k in lacking)) if lacking and same else ""

    def _as_now(self, stored: dict) -> dict:
        """A store's fingerprint fields, flattened, with the values `same_values` maps given as this run's."""
        flat = _flat(_plain(stored))
        return {k: self.same_values.get(k, {}).get(v, v) if isinstance(v, str) else v for k, v in flat.items()}

    def _open_existing(self, entry_coords: dict) -> None:
        import zarr

        if not _replaceable(self.path):
            raise WorkbenchError(_not_a_store(self.path, self.hint))
        try:
            group = zarr.open_group(self.path, mode="r+")
        except Exception as err:
            raise WorkbenchError(f"{str(self.path)!r} exists and is not a store; {self.hint}") from err
        attrs = dict(group.attrs)
        if attrs.get("schema_version") != SCHEMA_VERSION or self.completed_attr not in attrs:
            listed = next((k for k in ("completed", "completed_train_steps") if k in attrs), None)
            what = (f"schema_version {attrs.get('schema_version')}" if attrs.get("schema_version") != SCHEMA_VERSION
                    else f"its entries listed under {listed!r}: another kind of store" if listed else "no entry list")
            raise WorkbenchError(f"{str(self.path)!r} is not a store of schema_version {SCHEMA_VERSION} with "
                                 f"{self.completed_attr!r} ({what}); {self.hint}")
        stored = attrs.get("fingerprint_fields")
        agrees = attrs.get("fingerprint") == self.fingerprint or bool(
            self.same_values and stored and self.fields is not None
            and self._as_now(stored) == _flat(_plain(self.fields)))
        unrecorded = "" if agrees else self._unrecorded(stored)
        if unrecorded:
            self.log(f"note: {str(self.path)!r} was made by an older workbench that did not record {unrecorded}; "
                     "every setting it recorded agrees with this run's (the weights among them), so this run's "
                     "entries join it; that one is not checked")
        elif not agrees:
            what = describe_differences(self._as_now(stored) if isinstance(stored, dict) else stored, self.fields,
                                        self.absent)
            if self.append_dim == "sample" and attrs.get("layout_fingerprint") == self.fingerprint.split(":")[0]:
                whose = self._whose(group, attrs)  # (another model: named by its files too)
                what += f"; {whose}" if whose else ""
                raise WorkbenchError(
                    f"{str(self.path)!r} holds samples of another model or sampler setting ({what}); a store holds "
                    "one model, so that no report or comparison mixes two: write these samples to another --out and "
                    "compare the stores with `workbench compare` (or pass --overwrite to replace this one)")
            whose = self._whose(group, attrs)
            if whose:  # (another model, and other settings besides: the model first, in words)
                raise WorkbenchError(f"{str(self.path)!r} holds another model's samples ({whose}), "
                                     f"made with other settings too ({what}); a store holds one model: write this "
                                     f"run to another --out (or pass --overwrite to replace this store)")
            raise WorkbenchError(f"{str(self.path)!r} was made with another configuration ({what}); {self.hint}")
        lengths = lengths_along(group, self.append_dim)
        n = min(lengths.values(), default=0)  # entries that every array holds
        try:
            ids = np.asarray(group[self.append_dim][:n]).tolist()
        except Exception as err:
            raise WorkbenchError(f"{str(self.path)!r}: its {self.append_dim} labels cannot be read ({err}); "
                                 f"{self.hint}") from err
        completed = list(attrs[self.completed_attr])
        wanted, keep, seen, extra = set(completed), [], set(), []
        for i, key in enumerate(ids):
            if key in wanted and key not in seen:
                keep.append(i)
                seen.add(key)
            else:
                extra.append((i, key, "a second copy" if key in seen else "not marked complete"))
        for name, value in entry_coords.items():
            values = np.asarray(group[name][:n]).tolist()
            foreign = [ids[i] for i in keep if values[i] != value]
            if foreign:
                raise WorkbenchError(
                    f"{str(self.path)!r} holds {self.append_dim}s of another model ({name} of {_short(foreign)} "
                    f"differs from this run's {str(value)[:16]}); a store holds one model: {self.hint}")
        lost = [k for k in completed if k not in seen]
        unfinished = [key for i, key, why in extra if why == "not marked complete" and i > max(keep, default=-1)]
        damaged = [f"{key} ({why})" for i, key, why in extra] + \
                  [f"{key} (marked complete, but its arrays are missing)" for key in lost]
        if len(damaged) == len(unfinished):  # only what a killed run leaves at the end: no damage
            damaged = []
        self.completed = [ids[i] for i in keep]
        if keep == list(range(len(keep))):
            if self.completed != completed:  # (the list before the arrays, as keep_only does)
                zarr.open_group(self.path, mode="r+").attrs[self.completed_attr] = self.completed
            self.truncate(len(keep))
        else:
            self.truncate(n)
            self._rewrite(keep, self.completed)
        if damaged:
            self.log(f"warning: {self.path} held entries that are not whole {self.append_dim}s of it: "
                     f"{_short(damaged)}; kept the first copy of each finished {self.append_dim} and dropped the "
                     "rest, which this run recomputes")
        elif unfinished or max(lengths.values(), default=0) > n:
            what = f"the unfinished {self.append_dim} {_short(unfinished)}" if unfinished else \
                f"a partly written {self.append_dim}"
            self.log(f"note: {self.path}: dropped {what} that an interrupted run left")

    def truncate(self, n: int) -> None:
        """Cut every array to the first n entries along the append dim."""
        import zarr

        for _, array in zarr.open_group(self.path, mode="r+").arrays():
            dims = array.metadata.dimension_names or ()
            if self.append_dim in dims and array.shape[dims.index(self.append_dim)] > n:
                shape = list(array.shape)
                shape[dims.index(self.append_dim)] = n
                array.resize(tuple(shape))

    def _rewrite(self, keep: list[int], keys: list) -> None:
        """Replace the store by its entries at positions `keep` (whole-store copy; only a damaged store needs it)."""
        ds = xr.open_zarr(self.path, consolidated=False).isel({self.append_dim: keep}).load()
        for var in ds.variables.values():
            var.encoding = {}
        ds.attrs[self.completed_attr] = list(keys)
        self._write_tmp(ds)
        self._swap_in()

    def _write_tmp(self, ds: xr.Dataset) -> None:
        """`ds` as a new store in the temporary folder; a write that fails (a full disk, Ctrl-C) takes the folder
        with it, so that the space it held is free again (a kill leaves it to the next run's `_recover`)."""
        try:
            ds.to_zarr(self._tmp, mode="w-", zarr_format=3, consolidated=False, encoding=_encoding(ds))
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    def _swap_in(self) -> None:
        """Put the temporary folder in the store's place; a kill at any point leaves the old or the new store
        (`_recover` finishes the job)."""
        if self.path.exists():
            os.replace(self.path, self._old)
        os.replace(self._tmp, self.path)
        shutil.rmtree(self._old, ignore_errors=True)

    def keep_only(self, keys) -> None:
        """Forget every entry whose key is not in `keys` (a resumed run recomputes them); none left: no store."""
        keys = set(keys)
        keep = [i for i, key in enumerate(self.completed) if key in keys]
        if len(keep) == len(self.completed):
            return
        kept = [self.completed[i] for i in keep]
        if not keep:
            shutil.rmtree(self.path)
        elif keep == list(range(len(keep))):
            import zarr

            # the list first: a reader holding the store then sees entries it was shown go (store_guard.py) before
            # their arrays do, and a kill between the two leaves arrays longer than the list, which readers cut
            zarr.open_group(self.path, mode="r+").attrs[self.completed_attr] = kept
            self.truncate(len(keep))
        else:
            self._rewrite(keep, kept)
        self.completed = kept

    # --- writing -------------------------------------------------------------------------------------------

    def done(self, key) -> bool:
        return key in self.completed

    def stored(self, var: str) -> dict[str, str]:
        """{key: the value of the 1-D variable `var` along the append dim} of the finished entries, as text (a
        resumed run checks that an entry of the same key was made from the same request)."""
        if not self.completed:
            return {}
        ds = xr.open_zarr(self.path, consolidated=False)
        if var not in ds.variables:
            return {}
        keys = [str(x) for x in ds[self.append_dim].values]
        return {key: str(value) for key, value in zip(keys, ds[var].values) if key in self.completed}

    def write(self, ds: xr.Dataset, key=None, *, facts: dict[str, list[str]] | None = None) -> None:
        """Append one entry: a Dataset with a length-1 append dim (a sample built by `sample_dataset`); its key
        defaults to that dim's coordinate. `facts`: {attr: lines} that the run learnt while making the entry (the
        attention kernels' refusals, `attn_refused`), added to the store's lists of them with the entry's mark."""
        import zarr

        key = str(ds[self.append_dim].values[0]) if key is None else key

        def grown(attrs: dict) -> dict:  # the facts' attrs that this entry adds lines to, with their lines
            out = {}
            for name, lines in (facts or {}).items():
                held = [str(x) for x in attrs.get(name) or []]
                if new := [x for x in lines if x not in held]:
                    out[name] = held + new
            return out

        ds.attrs["fingerprint"] = self.fingerprint
        ds.attrs["layout_fingerprint"] = self.fingerprint.split(":")[0]
        if self.fields is not None:
            ds.attrs["fingerprint_fields"] = _plain(self.fields)
        if not self.completed:
            if self._tmp.exists():
                shutil.rmtree(self._tmp)
            ds.attrs[self.completed_attr] = [key]
            if self.requested:
                ds.attrs["requested"] = list(self.requested)
            ds.attrs.update(grown(ds.attrs))
            self._write_tmp(ds)
            self._swap_in()
        else:
            # to_zarr(mode="a") replaces the group's attrs with ds.attrs: give it the store's own attrs with the
            # current `completed` list (a run killed between the arrays and the new mark leaves a partial entry that
            # the next open drops), and list this run once under `runs`
            attrs = dict(zarr.open_group(self.path, mode="r").attrs)
            run = {k: ds.attrs[k] for k in ("command", "working_dir", "created_utc", "git_commit") if k in ds.attrs}
            if run and run != {k: attrs.get(k) for k in run} and run not in attrs.get("runs", []):
                attrs["runs"] = attrs.get("runs", []) + [run]
            attrs[self.completed_attr] = list(self.completed)
            asked = list(attrs.get("requested", []))
            ds.attrs = attrs
            static = [name for name, v in ds.variables.items() if self.append_dim not in v.dims]
            held = set(zarr.open_group(self.path, mode="r").array_keys())
            static += [name for name in LATER_LABELS if name in ds.variables and name not in held]  # (an older store)
            try:
                ds.drop_vars(static).to_zarr(self.path, mode="a", append_dim=self.append_dim, consolidated=False)
            except BaseException:  # a full disk, Ctrl-C: take back what got written (a kill is left to readers)
                with contextlib.suppress(Exception):
                    self.truncate(len(self.completed))
                raise
            marks = {self.completed_attr: self.completed + [key], **grown(attrs)}
            if self.requested:  # (with the mark: an append taken back leaves the attrs as they were)
                marks["requested"] = asked + [k for k in self.requested if k not in asked]
            group = zarr.open_group(self.path, mode="r+")
            for name in set(ds.coords) & held:  # (a store begun by older code: coordinate attrs added since)
                if missing := {k: v for k, v in ds[name].attrs.items() if k not in group[name].attrs}:
                    group[name].attrs.update(_plain(missing))
            group.attrs.update(marks)
        self.completed.append(key)


# Per-entry labels and numbers added after stores were first made: an entry appended to a store made before them
# goes in without them (the store keeps one layout; its earlier entries have none to give).
LATER_LABELS = ("uncond_token", "uncond_num_tokens", "world_colour_ok", "world_shape_ok", "intervention_detail")


def _replaceable(path: Path) -> bool:
    """Whether a writer may replace the folder `path`: a store of this workbench (a zarr group whose attrs hold a
    schema_version, of any version) or an empty folder; never another folder or zarr group, whatever the flags
    (`--overwrite` with a mistyped --out deleted a folder of papers)."""
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    import zarr

    try:
        return "schema_version" in zarr.open_group(path, mode="r").attrs
    except Exception:  # noqa: BLE001 - no zarr group there (or a damaged one): not this workbench's to replace
        return False


def _not_a_store(path: Path, hint: str) -> str:
    names = sorted(p.name for p in list(path.iterdir())[:50]) if path.is_dir() else []
    held = f" (it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
    how = ("choose another --out (--overwrite replaces a store, never another folder: to write there, move the "
           "folder away yourself)" if "--overwrite" in hint else hint)
    return f"{str(path)!r} exists and is not a store{held}; {how}"


def _plain(value):
    """`value` as JSON gives it back (tuples become lists, other objects their str), for attrs and comparisons."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def ema_suffix(use_ema: bool) -> str:
    """What a model's name gets when its weights are a checkpoint's EMA (`fingerprint_fields.model.key` "ema";
    "gen" is a checkpoint's generator or a folder's own DiT alike, so it adds nothing)."""
    return " (generator_ema)" if use_ema else ""


def image_of(attrs: dict) -> tuple[str, str] | None:
    """(path, sha256) of the image an image-to-video store's frame 0 is (attrs `image`, `image_sha256`; a store made
    before them holds the sha256 in its fingerprint's `model.image` and the path in its `command` attr as written);
    None otherwise."""
    sha = attrs.get("image_sha256") or ((attrs.get("fingerprint_fields") or {}).get("model") or {}).get("image")
    return (str(attrs.get("image") or _image_in_command(attrs.get("command")) or "(its path not recorded)"),
            str(sha)) if sha else None


def _image_in_command(command) -> str | None:
    """The path after `--image` (or `--image=`) in a command line as shlex.join wrote it, or None."""
    try:
        words = shlex.split(str(command or ""))
    except ValueError:
        return None
    for i, word in enumerate(words):
        if word == "--image" and i + 1 < len(words):
            return words[i + 1]
        if word.startswith("--image="):
            return word.split("=", 1)[1]
    return None


def describe_differences(stored: dict | None, wanted: dict | None, absent: dict | None = None) -> str:
    """'layers: [3] in the store, [2] in this run; ...' for the settings two fingerprints were made of. `absent`
    {flattened field: value}: what a field one of them leaves out means (a setting left out at its default), so
    that only the settings that differ are named."""
    if not stored or wanted is None:
        return ("the store records no setting by setting (made by an older workbench); its settings are in its "
                "attr config_yaml")
    a, b = _flat(_plain(stored)), _flat(_plain(wanted))
    # (the sections both record: a store made before a section was recorded names no setting of it as not set)
    both = {k.split(".")[0] for k in a} & {k.split(".")[0] for k in b}
    a, b = ({k: v for k, v in d.items() if k.split(".")[0] in both} for d in (a, b))
    a, b = {**_plain(absent or {}), **a}, {**_plain(absent or {}), **b}
    names = [k for k in dict.fromkeys([*a, *b]) if a.get(k, "(not set)") != b.get(k, "(not set)")]
    if not names:
        return "the settings agree but the fingerprints do not (made by another version of the workbench)"

    def under(d, p):  # the keys of flattened d at or under the dotted prefix p
        return [x for x in d if x == p or x.startswith(p + ".")]

    def whole(k):  # the section a setting is in that only one side records (named once, not field by field)
        parts = k.split(".")
        return next((p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if bool(under(a, p)) !=
                     bool(under(b, p))), k)

    names = list(dict.fromkeys(whole(k) for k in names))

    def show(v):
        if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v):  # (a sha256: its first 12 digits say which)
            return v[:12] + "..."
        text = str(v) if v != "" else '""'  # (an empty setting, shown as one)
        return text if len(text) <= 80 else text[:38] + "..." + text[-39:]  # (the end: e.g. a code's hash)

    def section(d, p):  # a section only one side records: the names in it
        inner = dict.fromkeys(x[len(p) + 1:].split(".")[0] for x in under(d, p))
        return ", ".join(inner) if inner else "(not set)"

    def differ(k):
        if k not in a and k not in b:  # (a section: whole(k))
            return f"{k}: {section(a, k)} in the store, {section(b, k)} in this run"
        x, y = a.get(k, "(not set)"), b.get(k, "(not set)")
        if isinstance(x, list) and isinstance(y, list) and len(str(x)) > 80:  # (long lists: where they part)
            i = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            at = (f"item {i}: {show(x[i]) if i < len(x) else '(none)'} in the store, "
                  f"{show(y[i]) if i < len(y) else '(none)'} in this run")
            return f"{k} ({len(x)} items in the store, {len(y)} in this run), first differing at {at}"
        return f"{k}: {show(x)} in the store, {show(y)} in this run"

    own = any(k.split(".")[1:2] == ["own_stats"] for k in names)
    return "; ".join(differ(k) for k in names) + (
        " (own_stats: statistics of a plugin, known by their definition and code: load the plugin code that made "
        "the store, WORKBENCH_PLUGINS, and give the same --stats)" if own else "")


def _short(values, n: int = 6) -> str:
    values = list(values)
    return ", ".join(str(v) for v in values[:n]) + (f", ... ({len(values)} in all)" if len(values) > n else "")


def _encoding(ds: xr.Dataset) -> dict:
    """One chunk per (sample, layer): every step, head and frame of a layer in one object."""
    enc = {}
    for name, var in ds.data_vars.items():
        enc[name] = {"chunks": tuple(1 if d in ("sample", "layer", "token_layer") else n
                                     for d, n in zip(var.dims, var.shape))}
    return enc
