"""What the trainers read: prompt files (DMD / SiD are data-free), latent datasets (ODE pairs, clean latents
for diffusion training) and a synthetic latent dataset for training a small teacher on a CPU.

Every batch is a pure function of (seed, batch id, global sample indices): an epoch is a seeded permutation
of the dataset, and global sample g of the run is item perm_epoch[g mod N] with epoch = g // N. Nothing is
consumed from an iterator, so a resumed run and a run on another number of ranks read the same samples.

Latent dataset file (`.pt`, written atomically, read with weights_only=True):
    {"prompts": [N strings], "latents": Tensor, "kind": "ode_pairs" | "latents", ...metadata}
    ode_pairs: latents [N, S, F, C, H, W], the trajectory at S-1 noise levels then the clean latent (last)
    latents:   latents [N, F, C, H, W], clean
"""

from __future__ import annotations

from pathlib import Path

import torch

from training import rng
from training.errors import TrainingError


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=rng.generator(seed, epoch, "epoch"))


def item_indices(seed: int, n: int, global_indices) -> list[int]:
    """Dataset item of each global sample index."""
    out, cache = [], {}
    for g in global_indices:
        epoch, pos = divmod(int(g), n)
        if epoch not in cache:
            cache[epoch] = epoch_order(seed, epoch, n)
        out.append(int(cache[epoch][pos]))
    return out


class PromptSource:
    """A prompt file (one prompt per line), read in seeded epochs."""

    def __init__(self, prompts: list[str], seed: int):
        if not prompts:
            raise TrainingError("the prompt list is empty")
        self.prompts, self.seed = list(prompts), seed

    @classmethod
    def from_file(cls, path, seed: int) -> "PromptSource":
        from models.video import read_prompts

        try:
            return cls(read_prompts(path), seed)
        except Exception as err:  # ModelInputError: missing or empty file
            raise TrainingError(f"data_path: {err}") from err

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, global_indices) -> list[str]:
        return [self.prompts[i] for i in item_indices(self.seed, len(self.prompts), global_indices)]


class LatentDataset:
    """Prompts with latents (ODE pairs or clean latents), read in seeded epochs."""

    def __init__(self, prompts: list[str], latents: torch.Tensor, kind: str, seed: int):
        if len(prompts) != latents.shape[0] or not prompts:
            raise TrainingError(f"latent dataset has {len(prompts)} prompts and {latents.shape[0]} latents")
        self.prompts, self.latents, self.kind, self.seed = list(prompts), latents, kind, seed

    @classmethod
    def from_file(cls, path, seed: int, kind: str) -> "LatentDataset":
        path = Path(path)
        if not path.is_file():
            raise TrainingError(f"data_path {str(path)!r} does not exist")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "latents" not in blob or "prompts" not in blob:
            raise TrainingError(f"{path} is not a latent dataset (a dict with 'prompts' and 'latents')")
        if blob.get("kind") != kind:
            raise TrainingError(f"{path} holds {blob.get('kind')!r} latents; this trainer needs {kind!r}")
        return cls(blob["prompts"], blob["latents"], kind, seed)

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, global_indices) -> tuple[list[str], torch.Tensor]:
        idx = item_indices(self.seed, len(self.prompts), global_indices)
        return [self.prompts[i] for i in idx], self.latents[idx]

    def to(self, device) -> "LatentDataset":
        """Keep the latents on `device` (in place; returns self): `batch` then gathers there, without a host copy
        and a host-to-device transfer of every batch (132 MB a step for the zoo's world latents at batch 512).
        The values are the same: a gather is exact, and the trainer's cast to its compute dtype follows either way."""
        self.latents = self.latents.to(device)
        return self


def save_latent_dataset(path, prompts: list[str], latents: torch.Tensor, kind: str, **meta) -> None:
    """Write a latent dataset atomically (temp file in the same folder, then rename)."""
    from models.files import atomic_torch_save

    blob = {"prompts": list(prompts), "latents": latents.contiguous().cpu(), "kind": kind, **meta}
    atomic_torch_save(blob, path)


# ------------------------------------------------------------------------------------------------------
# Synthetic data: a blob moving across the frame, one direction per prompt

DIRECTIONS = {"right": (0.0, 1.0), "left": (0.0, -1.0), "down": (1.0, 0.0), "up": (-1.0, 0.0)}


def synthetic_latents(num: int, frames: int, channels: int, height: int, width: int, seed: int = 0):
    """(prompts, latents [num, F, C, H, W]): sample i is a Gaussian blob with a fixed channel profile that moves
    one pixel a frame in the direction its prompt names, from a random start. Values are about unit scale."""
    g = torch.Generator().manual_seed(seed)
    profile = torch.randn(channels, generator=g)  # [C]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    names = list(DIRECTIONS)
    prompts, videos = [], []
    for i in range(num):
        name = names[i % len(names)]
        dy, dx = DIRECTIONS[name]
        y0 = float(torch.rand((), generator=g)) * height
        x0 = float(torch.rand((), generator=g)) * width
        frames_out = []
        for f in range(frames):
            cy, cx = (y0 + dy * f) % height, (x0 + dx * f) % width
            d2 = torch.minimum((ys - cy).abs(), height - (ys - cy).abs()) ** 2 + \
                torch.minimum((xs - cx).abs(), width - (xs - cx).abs()) ** 2
            blob = torch.exp(-d2 / (2 * (0.15 * min(height, width)) ** 2))  # [H, W]
            frames_out.append(profile[:, None, None] * (2 * blob[None] - 0.5))
        prompts.append(f"a bright blob moving {name}")
        videos.append(torch.stack(frames_out))
    return prompts, torch.stack(videos)
