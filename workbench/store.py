"""Attention stores: labelled xarray Datasets in zarr v3, laid out as `docs/store.md` defines.

This module is the only place that knows the on-disk layout. Writers (the `extract` command, training
probes) hand it whole samples; readers (studies, notebooks) call `open_store`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from models.chunks import frame_chunks
from workbench.errors import WorkbenchError

SCHEMA_VERSION = 1


def open_store(path: str | Path) -> xr.Dataset:
    """Open a store lazily, check its schema version, and load the small non-index coords into memory
    (so `groupby("chunk")` and string selections work without dask)."""
    path = Path(path)
    if not path.exists():
        raise WorkbenchError(f"no store at {str(path)!r}: run `workbench extract --out {path}` to make one")
    try:
        ds = xr.open_zarr(path, consolidated=False)
    except Exception as err:  # zarr raises several types for "not a zarr group"
        raise WorkbenchError(f"{str(path)!r} is not a zarr store readable by xarray ({err})") from err
    version = ds.attrs.get("schema_version")
    if version != SCHEMA_VERSION:
        raise WorkbenchError(
            f"store {str(path)!r} has schema_version {version!r}; this workbench reads version {SCHEMA_VERSION} "
            "(see docs/store.md)"
        )
    small = [name for name, coord in ds.coords.items() if name not in ds.dims]
    return ds.assign_coords({name: ds[name].load() for name in small})


# ------------------------------------------------------------------------------------------------------
# Writing


STAT_ATTRS = {
    "attn_mass": dict(long_name="self-attention mass per key frame", units="probability",
                      description="(1/fsl) sum over the query tokens of query_frame of the softmax probability "
                                  "summed over the key tokens of key_frame; NaN where not attended"),
    "attn_logit": dict(long_name="mean pre-softmax logit per frame pair", units="logit",
                       description="mean over the token pairs of (query_frame, key_frame) of q.k/sqrt(head_dim) = "
                                   "mean_q . mean_k / sqrt(head_dim); NaN where not attended"),
    "cross_mass": dict(long_name="cross-attention mass per text token", units="probability",
                       description="(1/fsl) sum over the query tokens of query_frame of the softmax probability "
                                   "of each text token"),
    "attn_key_token": dict(long_name="self-attention mass per key token", units="probability",
                           description="(1/fsl) sum over the query tokens of query_frame of the softmax probability "
                                       "of each key token; NaN where not attended"),
}
STAT_DIMS = {
    "attn_mass": ("sample", "step", "layer", "head", "query_frame", "key_frame"),
    "attn_logit": ("sample", "step", "layer", "head", "query_frame", "key_frame"),
    "cross_mass": ("sample", "step", "layer", "head", "query_frame", "text_token"),
    "attn_key_token": ("sample", "step", "token_layer", "head", "query_frame", "key_token"),
}


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
    independent_first_frame: bool = False  # frame 0 is a chunk of its own (models/chunks.py)

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


def sample_dataset(layout: StoreLayout, sample: dict, arrays: dict[str, np.ndarray]) -> xr.Dataset:
    """One sample as a Dataset with a length-1 `sample` dim. `sample` holds the per-sample coords
    (prompt_index, seed, prompt, checkpoint, checkpoint_sha256, model_family, sampler, local_attn_size,
    sink_size, tokens (list of text_len strings), num_tokens); arrays are [S, L, H, F, ...] per statistic."""
    F = layout.num_frames
    data_vars = {}
    for stat, values in arrays.items():
        data_vars[stat] = xr.Variable(STAT_DIMS[stat], values[None].astype(np.float32), attrs=STAT_ATTRS[stat])
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
    if "cross_mass" in arrays:
        coords["text_token"] = np.arange(layout.text_len, dtype=np.int64)
        coords["token"] = (("sample", "text_token"), _strings(sample["tokens"]).reshape(1, -1))
    if "attn_key_token" in arrays:
        h, w = layout.grid
        tok = np.arange(F * layout.frame_seq_len)
        coords["token_layer"] = np.array(layout.token_layers, dtype=np.int64)
        coords["key_token"] = tok
        coords["key_token_frame"] = ("key_token", tok // layout.frame_seq_len)
        coords["key_token_h"] = ("key_token", (tok % layout.frame_seq_len) // w)
        coords["key_token_w"] = ("key_token", tok % w)
    attrs = {"schema_version": SCHEMA_VERSION, **layout.attrs, "stats": list(layout.stats), "completed": []}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


class StoreWriter:
    """Appends whole entries (samples; for training probes, train steps) to a store; resumable.

    The keys of the finished entries live in the store's attrs (`completed`) and are updated after an entry's
    arrays are written, so a run killed mid-write leaves at most one partial entry at the end, which the next
    open truncates away before resuming. A new store is first written to a temporary folder and renamed.
    Attrs are those of the run that created the store; each later run that appends is listed once in `runs`.
    """

    def __init__(self, path: str | Path, fingerprint: str, *, mode: str = "resume", append_dim: str = "sample",
                 completed_attr: str = "completed",
                 hint: str = "pass --overwrite to replace it, --append to add samples of a compatible "
                             "configuration, or choose another --out"):
        if mode not in ("resume", "append", "overwrite"):
            raise WorkbenchError(f"unknown store mode {mode!r}; use resume, append or overwrite")
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.append_dim, self.completed_attr, self.hint = append_dim, completed_attr, hint
        self.completed: list = []
        if self.path.exists():
            if mode == "overwrite":
                shutil.rmtree(self.path)
            else:
                self._open_existing(mode)

    def _open_existing(self, mode: str) -> None:
        import zarr

        try:
            group = zarr.open_group(self.path, mode="r+")
        except Exception as err:
            raise WorkbenchError(f"{str(self.path)!r} exists and is not a store; {self.hint}") from err
        attrs = dict(group.attrs)
        if attrs.get("schema_version") != SCHEMA_VERSION or self.completed_attr not in attrs:
            raise WorkbenchError(f"{str(self.path)!r} is not a store of schema_version {SCHEMA_VERSION} with "
                                 f"{self.completed_attr!r}; {self.hint}")
        if attrs.get("fingerprint") != self.fingerprint:
            if mode != "append" or attrs.get("layout_fingerprint") != self.fingerprint.split(":")[0]:
                raise WorkbenchError(
                    f"{str(self.path)!r} was made with another configuration (model, weights, sampler, layers, heads, "
                    f"steps or statistics); {self.hint}"
                )
        self.completed = list(attrs[self.completed_attr])
        self.truncate(len(self.completed))  # drop a partial entry left by a killed run

    def truncate(self, n: int) -> None:
        """Cut every array to the first n entries along the append dim."""
        import zarr

        for _, array in zarr.open_group(self.path, mode="r+").arrays():
            dims = array.metadata.dimension_names or ()
            if self.append_dim in dims and array.shape[dims.index(self.append_dim)] > n:
                shape = list(array.shape)
                shape[dims.index(self.append_dim)] = n
                array.resize(tuple(shape))

    def keep_first(self, n: int) -> None:
        """Forget every entry after the first n (a resumed run recomputes them); no entry left: no store."""
        import zarr

        if n >= len(self.completed):
            return
        if n == 0:
            shutil.rmtree(self.path)
        else:
            self.truncate(n)
            zarr.open_group(self.path, mode="r+").attrs[self.completed_attr] = self.completed[:n]
        self.completed = self.completed[:n]

    def done(self, key) -> bool:
        return key in self.completed

    def write(self, ds: xr.Dataset, key=None) -> None:
        """Append one entry: a Dataset with a length-1 append dim (a sample built by `sample_dataset`); its key
        defaults to that dim's coordinate."""
        import zarr

        key = str(ds[self.append_dim].values[0]) if key is None else key
        ds.attrs["fingerprint"] = self.fingerprint
        ds.attrs["layout_fingerprint"] = self.fingerprint.split(":")[0]
        if not self.completed:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            ds.attrs[self.completed_attr] = [key]
            ds.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False, encoding=_encoding(ds))
            if self.path.exists():
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
        else:
            # to_zarr(mode="a") replaces the group's attrs with ds.attrs: give it the store's own attrs with the
            # current `completed` list (a run killed between the arrays and the new mark leaves a partial entry that
            # the next open drops), and list this run once under `runs`
            attrs = dict(zarr.open_group(self.path, mode="r").attrs)
            run = {k: ds.attrs[k] for k in ("command", "created_utc", "git_commit") if k in ds.attrs}
            if run and run != {k: attrs.get(k) for k in run} and run not in attrs.get("runs", []):
                attrs["runs"] = attrs.get("runs", []) + [run]
            attrs[self.completed_attr] = list(self.completed)
            ds.attrs = attrs
            static = [name for name, v in ds.variables.items() if self.append_dim not in v.dims]
            ds.drop_vars(static).to_zarr(self.path, mode="a", append_dim=self.append_dim, consolidated=False)
            zarr.open_group(self.path, mode="r+").attrs[self.completed_attr] = self.completed + [key]
        self.completed.append(key)


def _encoding(ds: xr.Dataset) -> dict:
    """One chunk per (sample, layer): every step, head and frame of a layer in one object."""
    enc = {}
    for name, var in ds.data_vars.items():
        enc[name] = {"chunks": tuple(1 if d in ("sample", "layer", "token_layer") else n
                                     for d, n in zip(var.dims, var.shape))}
    return enc
