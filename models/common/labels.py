"""What the rollout knows about one DiT forward (`ForwardLabels`), importable without torch.

Every DiT forward of a sampler carries these labels; `attend` (models/common/attention.py) puts them on each
`AttentionCall`, and the store places captured numbers by them (docs/store.md: step, chunk, phase, cfg).
studies/ builds schedules of them without importing the models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardLabels:
    """What the rollout knows about one DiT forward. `step` is the position in the per-chunk schedule."""

    step: int  # 0..S-1: denoising steps in order, then the context pass
    timestep: float  # the timestep the DiT sees (for per-frame timesteps: that of the chunk being denoised)
    chunk: int  # generation block index; 0 for a bidirectional forward over every frame
    phase: str = "denoise"  # "denoise" | "context" | "train"
    cfg: str = "none"  # "cond" | "uncond" | "none"
    denoise_index: int = 0  # index into the denoising schedule; -1 for the context pass


@dataclass(frozen=True)
class RunExtent:
    """What one rollout's forwards will carry, known before the first: the (chunk, step, phase, cfg) of each
    forward, its number of chunks and of latent frames. A sampler hands it to each attached observer or
    intervention that has `check_run(extent)` (models/common/rollout.py `check_run`), which can refuse a selection
    the run does not have before any work (workbench/hooks.py)."""

    forwards: frozenset  # (chunk, step, phase, cfg) of every forward the run takes
    chunks: int
    frames: int

    @classmethod
    def of(cls, schedule, chunks: int, frames: int, skipped=()) -> "RunExtent":
        """From the labels of the forwards one chunk (or the bidirectional run) takes; `skipped`: (chunk, phase)
        pairs of forwards the run leaves out (the last chunk's context pass with last_context_pass=False, the
        denoising of an image-to-video run's chunk 0)."""
        skipped = set(skipped)
        return cls(frozenset((c, lab.step, lab.phase, lab.cfg) for c in range(chunks) for lab in schedule
                             if (c, lab.phase) not in skipped), chunks, frames)

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(sorted({f[1] for f in self.forwards}))

    @property
    def phases(self) -> tuple[str, ...]:
        return tuple(sorted({f[2] for f in self.forwards}))

    @property
    def cfgs(self) -> tuple[str, ...]:
        return tuple(sorted({f[3] for f in self.forwards}))

