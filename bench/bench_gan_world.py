"""GAN training on the miniature world (training/gan.py), a short CPU run that shows what it learns.

Real videos: 32 world renders (models/world.py) of 3 latent frames (9 pixel frames at 96 x 128), encoded by the
embedded VAE (data/embedded). Generator: the tiny causal Wan (tests/conftest.py's `tiny_model`); discriminator:
the tiny bidirectional Wan with the classification branch. 20 warm-up steps (only the branch trains), then one
generator update per `--ratio` steps. Every 100 steps it prints the mean discriminator loss (chance = 2 ln 2 =
1.386 with gan_d_weight 1), the mean generator loss, the mean real - fake logit gap, and how far 8 generated
videos' per-channel latent mean and std are from 8 real ones' (|diff| averaged over the 16 channels).

The sample grid (--grid, a PNG): one row per prompt (4 of them); columns: the real video's pixel frames 0, 4, 8;
its 3 latent frames; the generator's 3 latent frames before training; the same after. The tiny generator here
starts from random weights and a few hundred CPU steps leave its latents far from decodable videos (and the table
in bench/RESULTS.md was made when the embedded VAE was random too), so latents are shown, their
16 channels projected on the first 3 principal components of the real latents (fitted on all 32 videos' tokens)
as RGB, each component scaled by the real tokens' 1st-99th percentiles, upsampled x8 to the video's size.

    python3 bench/bench_gan_world.py [--steps 800] [--ratio 5] [--gen-lr 1e-4] [--grid bench/figures/gan_world_grid.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root), str(root / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--ratio", type=int, default=5, help="dfake_gen_update_ratio (default: %(default)s)")
    ap.add_argument("--gen-lr", type=float, default=1e-4, help="the generator's learning rate (default: %(default)s)")
    ap.add_argument("--grid", default=str(root / "bench" / "figures" / "gan_world_grid.png"),
                    help="the sample grid PNG to write (default: %(default)s)")
    args = ap.parse_args()
    if args.steps < 100 or args.ratio < 1:
        ap.error(f"--steps {args.steps} must be >= 100 and --ratio {args.ratio} >= 1")
    torch.set_num_threads(1)
    from models.common.rollout import causal_few_step
    from models.wan.embedded import EMBEDDED_DIR
    from models.wan.vae import WanVAE
    from test_gan import gan_trainer
    from training.data import LatentDataset
    from training.i2v import world_latents

    prompts, latents = world_latents(WanVAE.from_file(EMBEDDED_DIR / "Wan2.1_VAE.pth"), 32, seed=0, latent_frames=3)
    data = LatentDataset(prompts, latents, "latents", seed=7)
    tr = gan_trainer(Path(tempfile.mkdtemp()), data, "discriminator_warmup_steps=20", "gan_d_weight=1.0",
                     "gan_g_weight=1.0", "critic_lr=1e-3", f"gen_lr={args.gen_lr}", "critic_timestep_shift=1.0",
                     "beta1_critic=0.9", "beta1=0.9", f"dfake_gen_update_ratio={args.ratio}", "total_batch_size=2")

    @torch.no_grad()
    def generated():  # [8, 3, 16, 12, 16]: the generator's videos for the first 8 prompts, fixed noise
        outs = []
        for s in range(8):
            g = torch.Generator().manual_seed(100 + s)
            noise = torch.randn(1, 3, 16, 12, 16, generator=g)
            outs.append(causal_few_step(tr.generator, noise, tr.encode([prompts[s]]), timesteps=tr.timesteps,
                                        scheduler=tr.scheduler, generator=g))
        return torch.cat(outs)

    def distance(x):
        real, dims = latents[:8], (0, 1, 3, 4)
        return ((x.mean(dims) - real.mean(dims)).abs().mean().item(), (x.std(dims) - real.std(dims)).abs().mean().item())

    print(f"# bench_gan_world: {' '.join(sys.argv)}")
    print("| steps | D loss (mean of the last 100) | G loss | real - fake logit | latent mean / std distance to real |")
    print("|---|---|---|---|---|")
    before = generated()
    m, s = distance(before)
    print(f"| 0 | - | - | - | {m:.3f} / {s:.3f} |", flush=True)
    t0 = time.time()
    for end in range(100, args.steps + 1, 100):
        rows = tr.train(end, save_at_end=False)[-100:]
        d = np.mean([r["critic_loss"] for r in rows])
        g = [r["generator_loss"] for r in rows if "generator_loss" in r]
        gap = np.mean([r["gan_real_logit"] - r["gan_fake_logit"] for r in rows])
        after = generated()
        m, s = distance(after)
        print(f"| {end} | {d:.3f} | {np.mean(g) if g else float('nan'):.3f} | {gap:.2f} | {m:.3f} / {s:.3f} |",
              flush=True)
    print(f"# {time.time() - t0:.0f} s")
    write_grid(args.grid, prompts[:4], latents, before[:4], after[:4])
    print(f"# sample grid: {args.grid} (rows: {'; '.join(prompts[:4])})")


def write_grid(path, prompts, real_all, before, after):
    """The sample grid of the module docstring. real_all [N, 3, 16, h, w] (the first len(prompts) are shown),
    before / after [n, 3, 16, h, w]."""
    from models import world
    from models.files import atomic_write
    from PIL import Image

    tokens = real_all.permute(0, 1, 3, 4, 2).reshape(-1, 16).double()  # [N F h w, 16]
    mean = tokens.mean(0)
    basis = torch.linalg.svd(tokens - mean, full_matrices=False).Vh[:3].T  # [16, 3]
    proj = (tokens - mean) @ basis
    low, high = torch.quantile(proj, 0.01, dim=0), torch.quantile(proj, 0.99, dim=0)

    def rgb(lat):  # [3, 16, h, w] -> [3 frames, 8h, 8w, 3] uint8
        p = ((lat.permute(0, 2, 3, 1).double() - mean) @ basis - low) / (high - low)
        img = (p.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return img.repeat(8, axis=1).repeat(8, axis=2)

    rows = []
    for i, prompt in enumerate(prompts):
        pixels, _ = world.world_video(*world.dataset_item(i, 0), num_frames=9)  # [3, 9, H, W] in [-1, 1]
        real_px = np.round((pixels[:, [0, 4, 8]].transpose(1, 2, 3, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
        rows.append(np.concatenate([real_px, rgb(real_all[i]), rgb(before[i]), rgb(after[i])]))  # [12, H, W, 3]
    n, h, w = len(rows), rows[0].shape[1], rows[0].shape[2]
    pad = 4
    grid = np.full((n * h + (n - 1) * pad, 12 * w + 11 * pad + 3 * 2 * pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, frame in enumerate(row):
            x = c * (w + pad) + (c // 3) * 2 * pad  # wider gaps between the four groups of 3
            grid[r * (h + pad):r * (h + pad) + h, x:x + w] = frame
    atomic_write(Path(path), lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


if __name__ == "__main__":
    main()
