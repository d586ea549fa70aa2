"""The live stream folder: what `workbench generate --live` writes chunk by chunk and `workbench view` reads.

This module is the only place that knows the layout. In the generate output folder OUT:

    OUT/live.json                         the manifest, rewritten (atomically) after every chunk
    OUT/pPPPP-sS.live/chunk-CCC.npz       one finished chunk of one sample, written once (atomically):
        attn_mass  float32 [step, layer, head, query_frame, key_frame]   the chunk's query frames only
        frames     uint8   [t, H, W, 3]   the chunk's decoded pixel frames (absent with --no-video)

live.json:
    {"format": "workbench-live", "version": 1, "status": "running" | "done" | "failed",
     "num_frames": F, "pixel_frames": T, "fps": 16, "layers": [...], "heads": [...],
     "steps": [{"step", "timestep", "phase", "cfg", "denoise_index"}, ...],          # as the store's coords
     "samples": [{"sample": "p0000-s0", "prompt", "prompt_index", "seed", "done": bool,
                  "chunks": [{"chunk": c, "query_frames": [...], "pixel_frames": [first, stop], "file": ...}]}],
     "command", "created_utc", "updated_utc", "image": the image-to-video image (frame 0) or null}

A chunk's `chunk` and `query_frames` are the rollout's own labels (the `on_chunk` callback of models/common/rollout.py),
the pixel range is what the streaming VAE decoder returned for it. A chunk file is in place before the manifest
names it, and both are written to a temporary file and renamed, so a reader never sees half a file. The
attention numbers are the store's `attn_mass` (docs/store.md), from the same probe `workbench extract` uses.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

from models.files import atomic_write_bytes
from workbench.errors import WorkbenchError

MANIFEST = "live.json"
FORMAT = "workbench-live"
VERSION = 1


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def is_stream(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def step_labels(steps) -> list[dict]:
    """ForwardLabels of the captured steps -> the manifest's `steps` (the store's step coords)."""
    return [dict(step=int(s.step), timestep=float(s.timestep), phase=s.phase, cfg=s.cfg,
                 denoise_index=int(s.denoise_index)) for s in steps]


class StreamWriter:
    """Writes one live stream folder. Use: begin_sample, write_chunk per finished chunk, end_sample; close."""

    def __init__(self, out, *, num_frames: int, pixel_frames: int, fps: int, layers, heads, steps, command: str,
                 image: str | None = None):
        self.out = Path(out)
        self.manifest = dict(format=FORMAT, version=VERSION, status="running", num_frames=int(num_frames),
                             pixel_frames=int(pixel_frames), fps=int(fps), layers=[int(v) for v in layers],
                             heads=[int(v) for v in heads], steps=step_labels(steps), samples=[], command=command,
                             created_utc=_now(), image=image)  # (image-to-video: the image that is frame 0)
        self._save()

    def _save(self) -> None:
        self.manifest["updated_utc"] = _now()
        atomic_write_bytes(self.out / MANIFEST, json.dumps(self.manifest, indent=1).encode())

    def _sample(self, sample: str) -> dict:
        for entry in self.manifest["samples"]:
            if entry["sample"] == sample:
                return entry
        raise WorkbenchError(f"sample {sample!r} was not begun in {self.out / MANIFEST}")

    def begin_sample(self, sample: str, *, prompt: str, prompt_index: int, seed: int) -> None:
        folder = self.out / f"{sample}.live"
        if folder.exists():  # chunks of an earlier run of the same sample
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        self.manifest["samples"] = [s for s in self.manifest["samples"] if s["sample"] != sample]
        self.manifest["samples"].append(dict(sample=sample, prompt=prompt, prompt_index=int(prompt_index),
                                             seed=int(seed), done=False, chunks=[]))
        self._save()

    def write_chunk(self, sample: str, chunk: int, query_frames, attn_mass: np.ndarray,
                    frames: np.ndarray | None, pixel_start: int) -> None:
        """attn_mass [step, layer, head, len(query_frames), F] float32; frames uint8 [t, H, W, 3] or None."""
        query_frames = [int(f) for f in query_frames]
        F = self.manifest["num_frames"]
        want = (len(self.manifest["steps"]), len(self.manifest["layers"]), len(self.manifest["heads"]),
                len(query_frames), F)
        if tuple(attn_mass.shape) != want:
            raise WorkbenchError(f"chunk {chunk} attention has shape {tuple(attn_mass.shape)}, expected {want} "
                                 "(steps, layers, heads, query frames, key frames)")
        name = f"{sample}.live/chunk-{chunk:03d}.npz"
        arrays = {"attn_mass": attn_mass.astype(np.float32)}
        t = 0
        if frames is not None:
            arrays["frames"] = np.ascontiguousarray(frames, dtype=np.uint8)
            t = frames.shape[0]
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(self.out / name, buffer.getvalue())
        self._sample(sample)["chunks"].append(dict(chunk=int(chunk), query_frames=query_frames,
                                                   pixel_frames=[int(pixel_start), int(pixel_start + t)], file=name))
        self._save()

    def end_sample(self, sample: str) -> None:
        self._sample(sample)["done"] = True
        self._save()

    def close(self, status: str = "done") -> None:
        self.manifest["status"] = status
        self._save()


def read_manifest(folder) -> dict:
    """The manifest of a stream folder, checked for format and version."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkbenchError(f"{str(folder)!r} has no {MANIFEST}: not a folder written by `workbench generate --live`") \
            from None
    except ValueError as err:
        raise WorkbenchError(f"{str(path)!r} is not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise WorkbenchError(f"{str(path)!r} is not a {FORMAT} manifest of version {VERSION} "
                             f"(format {manifest.get('format')!r}, version {manifest.get('version')!r})")
    return manifest


def chunk_path(folder, entry: dict) -> Path:
    """The file of one chunk named by a manifest entry, refused unless its name stays inside the stream's folder
    and it is a regular file (a live.json from elsewhere named files outside it, or a pipe, whose read hung the
    viewer); a chunk that is a link (`cp -rs` of a stream) is followed to an .npz file (a zip) only."""
    folder = Path(folder).absolute()
    path = Path(os.path.normpath(folder / str(entry.get("file", ""))))
    inside = path.is_relative_to(folder) and (not path.is_symlink() or _is_zip(path.resolve()))
    if not inside or (path.exists() and not path.resolve().is_file()):
        raise WorkbenchError(f"{folder / 'live.json'} names the chunk file {entry.get('file')!r}, which is not a "
                             "file inside that folder; a stream's chunks are its own pPPPP-sS.live/chunk-CCC.npz")
    return path


def _is_zip(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def read_chunk(folder, entry: dict) -> dict[str, np.ndarray]:
    """The arrays of one chunk named by a manifest entry: attn_mass and, when decoded, frames."""
    with np.load(chunk_path(folder, entry)) as data:
        return {name: data[name] for name in data.files}

