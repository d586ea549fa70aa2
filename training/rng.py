"""Counter-based randomness for training: every draw is keyed by what it is for.

A draw's generator is seeded from (run seed, train step, stream, global sample index), never from a running
RNG state. Consequences the tests check:
- a resumed run draws exactly what the uninterrupted run drew (there is no RNG state to save);
- 2 ranks x micro-batch 1 draw what 1 rank x 2 micro-batches (or one batch of 2) draw: a sample's noise does
  not depend on where it is computed;
- attention probes, which use their own generators (and restore the global RNG), cannot shift training.

Streams used by the trainer: "gen/rollout", "gen/score", "gen/exit", "critic/rollout", "critic/score",
"critic/exit", "ode", "diffusion", "prompts".
"""

from __future__ import annotations

import hashlib

import torch


def key(seed: int, step: int, stream: str, index: int = 0) -> int:
    """A 60-bit seed (15 hex digits of a SHA-256) for one (seed, step, stream, index)."""
    digest = hashlib.sha256(f"{seed}/{step}/{stream}/{index}".encode()).hexdigest()
    return int(digest[:15], 16)


def generator(seed: int, step: int, stream: str, index: int = 0, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(key(seed, step, stream, index))
    return g


def sample_generators(seed: int, step: int, stream: str, indices, device="cpu") -> list[torch.Generator]:
    """One generator per sample of a micro-batch, keyed by the samples' global indices."""
    return [generator(seed, step, stream, int(i), device) for i in indices]


def randn(gens: list[torch.Generator], shape, *, device, dtype=torch.float32) -> torch.Tensor:
    """[len(gens), *shape]: sample b drawn from gens[b] (in float32, then cast, as a plain randn would)."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device) for g in gens]).to(dtype)


def randint(gens: list[torch.Generator], low: int, high: int, *, device) -> torch.Tensor:
    """[len(gens)] int64, sample b drawn uniformly from [low, high) with gens[b]."""
    return torch.cat([torch.randint(low, high, (1,), generator=g, device=device) for g in gens])
