"""GAN training on the miniature world (training/gan.py), a short CPU run that shows what it learns.

Real videos: 32 world renders (models/world.py) of 3 latent frames (9 pixel frames at 96 x 128), encoded by the
embedded VAE (data/embedded). Generator: the tiny causal Wan (tests/conftest.py's `tiny_model`); discriminator:
the tiny bidirectional Wan with the classification branch. 20 warm-up steps (only the branch trains), then one
generator update per `--ratio` steps. Every 100 steps it prints the mean discriminator loss (chance = 2 ln 2 =
1.386 with gan_d_weight 1), the mean generator loss, the mean real - fake logit gap, and how far 8 generated
videos' per-channel latent mean and std are from 8 real ones' (|diff| averaged over the 16 channels).

    python3 bench/bench_gan_world.py [--steps 800] [--ratio 5]
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
    args = ap.parse_args()
    torch.set_num_threads(1)
    from models.embedded import EMBEDDED_DIR
    from models.rollout import causal_few_step
    from models.vae import WanVAE
    from test_gan import gan_trainer
    from training.data import LatentDataset
    from training.i2v import world_latents

    prompts, latents = world_latents(WanVAE.from_file(EMBEDDED_DIR / "Wan2.1_VAE.pth"), 32, seed=0, latent_frames=3)
    data = LatentDataset(prompts, latents, "latents", seed=7)
    tr = gan_trainer(Path(tempfile.mkdtemp()), data, "discriminator_warmup_steps=20", "gan_d_weight=1.0",
                     "gan_g_weight=1.0", "critic_lr=1e-3", "gen_lr=1e-4", "critic_timestep_shift=1.0",
                     "beta1_critic=0.9", "beta1=0.9", f"dfake_gen_update_ratio={args.ratio}", "total_batch_size=2")

    def distance():
        outs = []
        with torch.no_grad():
            for s in range(8):
                g = torch.Generator().manual_seed(100 + s)
                noise = torch.randn(1, 3, 16, 12, 16, generator=g)
                outs.append(causal_few_step(tr.generator, noise, tr.encode([prompts[s]]), timesteps=tr.timesteps,
                                            scheduler=tr.scheduler, generator=g))
        x, real = torch.cat(outs), latents[:8]
        dims = (0, 1, 3, 4)
        return ((x.mean(dims) - real.mean(dims)).abs().mean().item(), (x.std(dims) - real.std(dims)).abs().mean().item())

    print(f"# bench_gan_world: {' '.join(sys.argv)}")
    print("| steps | D loss (mean of the last 100) | G loss | real - fake logit | latent mean / std distance to real |")
    print("|---|---|---|---|---|")
    print(f"| 0 | - | - | - | {distance()[0]:.3f} / {distance()[1]:.3f} |", flush=True)
    t0 = time.time()
    for end in range(100, args.steps + 1, 100):
        rows = tr.train(end, save_at_end=False)[-100:]
        d = np.mean([r["critic_loss"] for r in rows])
        g = [r["generator_loss"] for r in rows if "generator_loss" in r]
        gap = np.mean([r["gan_real_logit"] - r["gan_fake_logit"] for r in rows])
        m, s = distance()
        print(f"| {end} | {d:.3f} | {np.mean(g) if g else float('nan'):.3f} | {gap:.2f} | {m:.3f} / {s:.3f} |",
              flush=True)
    print(f"# {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
