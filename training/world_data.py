"""Latent training sets from the miniature world: world videos rendered on the device and encoded by a Wan VAE.

How it fits: a diffusion config with `data_path: world` (configs/zoo_teacher.yaml, zoo_df.yaml) trains on these
latents; `training.build.world_data` calls `make_world_dataset`. The set is a pure function of the VAE file and the
config's `world:` section, and is cached as a latent dataset file (training/data.py's format, kind "latents")
under `world.cache_dir`, so the teacher and the diffusion-forcing student read the same file and a second run
starts at once.

    item i       (prompt, scene seed) = models.world.dataset_item(i, world.seed): the prompts cycle through every
                 colour x shape x direction in every phrasing, each item has a scene of its own
    pixels       the scene's first 1 + 4 (F - 1) frames at 96 x 128 (F = the config's latent frames), drawn by
                 `render_scenes` (models.world.render in torch, batched on the training device)
    latents      `models.wan.vae.WanVAE.encode` (the posterior mean, normalised): [N, F, 16, 12, 16], float32
    cache file   <cache_dir>/world-<key>.pt, key = sha256 of the VAE file's sha256, N, seed, F and the format
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from models import world

FORMAT = 1  # bump when what a cached file holds changes


# ------------------------------------------------------------------------------------------------------
# Rendering: models.world.render, batched in torch


def scene_arrays(scenes: list[world.Scene], device) -> dict[str, torch.Tensor]:
    """The numbers `render_scenes` needs, one row per scene, float64 on `device`."""
    def t(rows):
        return torch.tensor(rows, dtype=torch.float64, device=device)

    return dict(start=t([s.start for s in scenes]),  # [S, 2] (y, x)
                step=t([[d * s.speed for d in world.DIRECTIONS[s.direction]] for s in scenes]),  # [S, 2]
                half=t([s.size / 2 for s in scenes]),  # [S]
                square=t([s.shape == "square" for s in scenes]),  # [S] 1.0 / 0.0
                colour=t([world.COLOURS[s.colour] for s in scenes]),  # [S, 3]
                bg0=t([s.background[0] for s in scenes]), bg1=t([s.background[1] for s in scenes]),  # [S, 3]
                angle=t([s.background_angle for s in scenes]))  # [S]


def render_scenes(scenes: list[world.Scene], num_frames: int, device="cpu", height: int = world.HEIGHT,
                  width: int = world.WIDTH, first_frames: list[int] | None = None) -> torch.Tensor:
    """float32 [S, 3, T, H, W] in [-1, 1]: `models.world.render(scene, num_frames, first_frame=f)` of every scene
    (f = first_frames[i], default 0; equal to it up to float32 rounding), computed in float64 on `device`."""
    a = scene_arrays(scenes, device)
    S = len(scenes)
    # background: a linear gradient between the two colours along the angle
    ys, xs = torch.meshgrid(torch.linspace(-0.5, 0.5, height, dtype=torch.float64, device=device),
                            torch.linspace(-0.5, 0.5, width, dtype=torch.float64, device=device), indexing="ij")
    ramp = (0.5 + ys[None] * torch.sin(a["angle"])[:, None, None]
            + xs[None] * torch.cos(a["angle"])[:, None, None]).clamp(0, 1)[:, None]  # [S, 1, H, W]
    bg = (1 - ramp) * a["bg0"][:, :, None, None] + ramp * a["bg1"][:, :, None, None]  # [S, 3, H, W]
    # the object's coverage per frame, on the torus
    first = torch.tensor(first_frames or [0] * S, dtype=torch.float64, device=device)
    t = first[:, None] + torch.arange(num_frames, dtype=torch.float64, device=device)[None]  # [S, T]
    centre = a["start"][:, None, :] + t[:, :, None] * a["step"][:, None, :]  # [S, T, 2]
    cy = torch.remainder(centre[..., 0], height)[:, :, None, None]  # [S, T, 1, 1]
    cx = torch.remainder(centre[..., 1], width)[:, :, None, None]
    py = (torch.arange(height, dtype=torch.float64, device=device) + 0.5)[None, None, :, None]
    px = (torch.arange(width, dtype=torch.float64, device=device) + 0.5)[None, None, None, :]
    dy = torch.abs(torch.remainder(py - cy + height / 2, height) - height / 2)  # [S, T, H, 1]
    dx = torch.abs(torch.remainder(px - cx + width / 2, width) - width / 2)  # [S, T, 1, W]
    sq = a["square"][:, None, None, None]
    signed = sq * torch.maximum(dy, dx) + (1 - sq) * torch.sqrt(dy ** 2 + dx ** 2) - a["half"][:, None, None, None]
    cover = torch.clamp(0.5 - signed, 0.0, 1.0)[:, None]  # [S, 1, T, H, W]
    frames = (1 - cover) * bg[:, :, None] + cover * a["colour"][:, :, None, None, None]  # [S, 3, T, H, W]
    return (frames * 2 - 1).to(torch.float32).reshape(S, 3, num_frames, height, width)


# ------------------------------------------------------------------------------------------------------
# The latent set


def cache_key(vae_sha: str, num_videos: int, seed: int, latent_frames: int) -> str:
    what = dict(vae=vae_sha, num_videos=num_videos, seed=seed, latent_frames=latent_frames, height=world.HEIGHT,
                width=world.WIDTH, format=FORMAT, world=world.VERSION)
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def make_world_latents(vae, num_videos: int, seed: int, latent_frames: int, *, batch: int = 16,
                       progress: bool = True) -> tuple[list[str], torch.Tensor]:
    """(prompts, latents [N, F, 16, 12, 16] float32 on the CPU): items 0..N-1 of the world set, encoded by the
    `models.wan.vae.WanVAE` `vae` on its device."""
    from models.wan.vae import pixel_frames
    from workbench.progress import progress_bar

    T = pixel_frames(latent_frames)
    items = [world.dataset_item(i, seed) for i in range(num_videos)]
    out = torch.empty((num_videos, latent_frames, 16, world.HEIGHT // 8, world.WIDTH // 8), dtype=torch.float32)
    with progress_bar(total=num_videos, desc="world latents", unit="video", disable=not progress) as bar:
        for first in range(0, num_videos, batch):
            chunk = items[first:first + batch]
            scenes = [world.scene_for(p, s) for p, s in chunk]
            pixels = render_scenes(scenes, T, device=vae.device).to(vae.dtype)  # [b, 3, T, H, W]
            out[first:first + len(chunk)] = vae.encode(pixels).float().cpu()
            bar.update(len(chunk))
    return [p for p, _ in items], out


def world_dataset_path(vae_path, num_videos: int, seed: int, latent_frames: int, cache_dir) -> Path:
    """Where the latent set of these settings is cached (whether or not it exists yet)."""
    from models.files import sha256_file

    return Path(cache_dir) / f"world-{cache_key(sha256_file(vae_path), num_videos, seed, latent_frames)}.pt"


def make_world_dataset(path: Path, vae_path, num_videos: int, seed: int, latent_frames: int, *, device="cpu",
                       batch: int = 16, progress: bool = True, log=print) -> Path:
    """Render, encode and write (atomically) the latent set to `path`, unless it is there already."""
    from models.files import sha256_file
    from models.wan.vae import WanVAE
    from training.data import save_latent_dataset

    if path.is_file():
        return path
    vae = WanVAE.from_file(vae_path, device=device)
    prompts, latents = make_world_latents(vae, num_videos, seed, latent_frames, batch=batch, progress=progress)
    save_latent_dataset(path, prompts, latents, "latents", source="models.world", vae=str(vae_path),
                        vae_sha256=sha256_file(vae_path), seed=seed, num_videos=num_videos)
    std = latents.std(dim=(0, 1, 3, 4))
    log(f"wrote {path}: {num_videos} world videos as latents {tuple(latents.shape[1:])}, per-channel std "
        f"{float(std.min()):.2f}-{float(std.max()):.2f}, mean |mean| {float(latents.mean(dim=(0, 1, 3, 4)).abs().mean()):.3f}")
    return path
