"""Text-image pairs for image-to-video training, from the miniature world (models/world.py).

How it fits: a score-distillation config with `i2v: true` (configs/world_i2v_dmd.yaml) reads `data_path` as a
latent dataset of kind "image_latents" (training/data.py's format): prompts and the VAE latents of their first
frames, [N, 1, 16, h, w]. The trainer's rollout starts from each image's latent (frame 0, pushed into the KV cache
at t = 0) and generates the rest, as the researchers' I2V training does with their text-image pairs.

    item i     (prompt, scene seed) = models.world.dataset_item(i, seed)
    image      pixel frame 0 of that scene (models.world.world_video), 96 x 128, in [-1, 1]
    latent     `models.vae.WanVAE.encode(image[None, :, None])` (the posterior mean, normalised): [1, 16, 12, 16]

    python -m training.i2v --vae data/embedded/Wan2.1_VAE.pth --num 256 --out runs/world_images.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from models import world


@torch.no_grad()
def world_image_latents(vae, num: int, seed: int = 0, batch: int = 32) -> tuple[list[str], torch.Tensor]:
    """(prompts, latents [num, 1, 16, H/8, W/8] float32 on the CPU): the first frames of world items 0..num-1,
    encoded by the `models.vae.WanVAE` `vae` on its device."""
    items = [world.dataset_item(i, seed) for i in range(num)]
    out = []
    for first in range(0, num, batch):
        frames = [torch.from_numpy(world.world_video(p, s, num_frames=1)[0]) for p, s in items[first:first + batch]]
        pixels = torch.stack(frames).to(vae.device, vae.dtype)  # [b, 3, 1, H, W]
        out.append(vae.encode(pixels).float().cpu())  # [b, 1, 16, h, w]
    return [p for p, _ in items], torch.cat(out)


def make_world_image_pairs(out, vae_path, num: int, seed: int = 0, device="cpu") -> Path:
    """Write the text-image pair set (kind "image_latents") atomically to `out`."""
    from models.files import sha256_file
    from models.vae import WanVAE
    from training.data import save_latent_dataset

    vae = WanVAE.from_file(vae_path, device=device)
    prompts, latents = world_image_latents(vae, num, seed)
    save_latent_dataset(out, prompts, latents, "image_latents", source="models.world first frames",
                        vae=str(vae_path), vae_sha256=sha256_file(vae_path), seed=seed)
    return Path(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", required=True, help="a Wan VAE file (Wan2.1_VAE.pth)")
    ap.add_argument("--num", type=int, default=256, help="pairs (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="the .pt file to write (data_path of an i2v config)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.num < 1:
        ap.error(f"--num {args.num} must be >= 1")
    if not Path(args.vae).is_file():
        ap.error(f"--vae {args.vae!r} does not exist")
    path = make_world_image_pairs(args.out, args.vae, args.num, args.seed, args.device)
    print(f"wrote {path}: {args.num} world prompts with the VAE latents of their first frames")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
