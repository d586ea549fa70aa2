"""Text-image pairs (image-to-video training) and text-video latents (GAN training) from the miniature world
(models/world.py), encoded by a Wan VAE.

How it fits: a score-distillation config with `i2v: true` (configs/world_i2v_dmd.yaml) reads `data_path` as a
latent dataset of kind "image_latents" (training/data.py's format): prompts and the VAE latents of their first
frames, [N, 1, 16, h, w]. The trainer's rollout starts from each image's latent (frame 0, pushed into the KV cache
at t = 0) and generates the rest, as the researchers' I2V training does with their text-image pairs.

    item i     (prompt, scene seed) = models.world.dataset_item(i, seed)
    image      pixel frame 0 of that scene (models.world.world_video), 96 x 128, in [-1, 1]
    latent     `models.wan.vae.WanVAE.encode(image[None, :, None])` (the posterior mean, normalised): [1, 16, 12, 16]

    python -m training.i2v --vae data/embedded/Wan2.1_VAE.pth --num 256 --out runs/world_images.pt

With `--frames F` (F > 1) the whole first 1 + 4 (F - 1) pixel frames are encoded instead: a latent dataset of
kind "latents" [N, F, 16, h, w], the real videos of `trainer: gan` (configs/world_gan.yaml).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models import world


@torch.no_grad()
def world_latents(vae, num: int, seed: int = 0, latent_frames: int = 1, batch: int = 16) -> tuple[list[str], torch.Tensor]:
    """(prompts, latents [num, latent_frames, 16, H/8, W/8] float32 on the CPU): the first 1 + 4 (F - 1) pixel
    frames of world items 0..num-1 (just frame 0 for F = 1), encoded by the `models.wan.vae.WanVAE` `vae`."""
    from models.wan.vae import pixel_frames

    items = [world.dataset_item(i, seed) for i in range(num)]
    out = []
    for first in range(0, num, batch):
        videos = [torch.from_numpy(world.world_video(p, s, num_frames=pixel_frames(latent_frames))[0])
                  for p, s in items[first:first + batch]]
        out.append(vae.encode(torch.stack(videos).to(vae.device, vae.dtype)).float().cpu())  # [b, F, 16, h, w]
    return [p for p, _ in items], torch.cat(out)


def make_world_image_pairs(out, vae_path, num: int, seed: int = 0, device="cpu", latent_frames: int = 1) -> Path:
    """Write the text-image pair set (kind "image_latents"), or with latent_frames > 1 the text-video set (kind
    "latents"), atomically to `out`."""
    from models.files import sha256_file
    from models.wan.vae import WanVAE
    from training.data import save_latent_dataset

    vae = WanVAE.from_file(vae_path, device=device)
    prompts, latents = world_latents(vae, num, seed, latent_frames)
    kind = "image_latents" if latent_frames == 1 else "latents"
    save_latent_dataset(out, prompts, latents, kind, source="models.world", vae=str(vae_path),
                        vae_sha256=sha256_file(vae_path), seed=seed)
    return Path(out)


def main(argv=None) -> int:
    from workbench.help_text import HelpFormatter  # (--help fitted to the terminal)

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--vae", required=True, help="a Wan VAE file (Wan2.1_VAE.pth)")
    ap.add_argument("--num", type=int, default=256, help="pairs (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="the .pt file to write (data_path of an i2v config)")
    ap.add_argument("--frames", type=int, default=1,
                    help="latent frames: 1 (default) for text-image pairs, more for text-video latents (GAN)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.num < 1 or args.frames < 1:
        ap.error(f"--num {args.num} and --frames {args.frames} must be >= 1")
    if not Path(args.vae).is_file():
        ap.error(f"--vae {args.vae!r} does not exist")
    path = make_world_image_pairs(args.out, args.vae, args.num, args.seed, args.device, args.frames)
    what = "their first frames" if args.frames == 1 else f"their first {args.frames} latent frames"
    print(f"wrote {path}: {args.num} world prompts with the VAE latents of {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
