"""The per-video scores of `workbench evaluate`, kept on disk as each video is scored, so that a run that is killed,
interrupted or out of disk resumes where it stopped instead of starting over.

    OUT/scores/LABEL/fFRAMES/pPPPP-sS.json    one video (prompt index P, seed S): its key and its VideoScore
                                              (studies/world_metrics.py; NaN stored as null)

A score is reused only by a run whose key for it is the same: the prompt, the seed, and `run_key`, a hash of what
made the video and its numbers: extract's fingerprint of the rollout (weights sha256, model config, EMA or not,
sampler, schedule, dtype, window and sink; workbench/extract.py `fingerprint_fields`), the VAE file's sha256, and
the scorer's own source (studies/world_metrics.py: a changed tracker scores every video again). Anything else is
scored again and its file replaced. Each file is written atomically, so a kill leaves whole files or none.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from models.files import atomic_write_bytes
from models.wan.checkpoint import weights_sha256
from models.wan.folder import wan_parts

FOLDER = "scores"


def scorer_sha256() -> str:
    """The world scorer's identity: the sha256 of its source (studies/world_metrics.py), so that numbers of another
    version of the tracker or its rules are never taken for this one's (evaluate's kept scores, intervene's store)."""
    from studies import world_metrics

    return hashlib.sha256(Path(world_metrics.__file__).read_bytes()).hexdigest()


def run_key(p) -> str:
    """The key of one (model, length) plan of evaluate (a workbench/extract.py Plan)."""
    from workbench.extract import fingerprint_fields

    fields = dict(rollout=fingerprint_fields(p, weights_sha256(p.weights_file)),
                  vae=weights_sha256(wan_parts(p.wan_dir).vae), scorer=scorer_sha256())
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def score_path(out, label: str, frames: int, prompt_index: int, seed: int) -> Path:
    from workbench.store import sample_id

    return Path(out) / FOLDER / label / f"f{frames}" / f"{sample_id(prompt_index, seed)}.json"


def save(path: Path, key: str, prompt: str, seed: int, score) -> None:
    """Keep one video's VideoScore under its key (atomically)."""
    blob = dict(key=key, prompt=prompt, seed=seed, score=score.to_json())
    atomic_write_bytes(path, json.dumps(blob).encode())


def load(path: Path, key: str, prompt: str, seed: int):
    """The VideoScore kept at `path` when it was made with this key, prompt and seed; else None (no file, another
    run's, or unreadable: scored again)."""
    from studies.world_metrics import VideoScore

    try:
        blob = json.loads(path.read_text())
        if (blob["key"], blob["prompt"], blob["seed"]) != (key, prompt, seed):
            return None
        return VideoScore.from_json(blob["score"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
