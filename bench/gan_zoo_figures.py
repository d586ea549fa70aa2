"""The GAN student's figures for bench/RESULTS.md: its loss curve as a table and a sample grid before/after.

Inputs: a GAN run's log folder (its `losses.csv`, one row per step, read by training/logger.py `read_losses`) and a `workbench evaluate --save-videos`
folder that scored the ODE student (the GAN's starting point) and the GAN student on the same prompts and seeds.
Outputs: a markdown table of the curve (means over windows of steps: discriminator loss, real - fake logit gap,
generator loss) on stdout, and a PNG: for each prompt two rows, the ODE student's video and the GAN student's,
pixel frames 0, 10, ..., 80, each row labelled with the model and what the tracker read (adherent or not, and
the trajectory error in px).

    python3 bench/gan_zoo_figures.py --logdir runs/gan_cpu/logs/gan --eval runs/gan_eval \\
        --before ode --after gan --out bench/figures/gan_zoo_grid.png
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def curve_table(rows: list[dict], window: int) -> list[str]:
    """Markdown rows: per window of steps, the mean discriminator loss, real - fake logit gap and generator loss
    (rows as `read_losses` gives them: floats, a step's missing values absent)."""
    out = ["| steps | D loss | real - fake logit | G loss (generator steps) |", "|---|---|---|---|"]
    for start in range(0, len(rows), window):
        part = rows[start:start + window]
        d = [r["critic_loss"] for r in part]
        gap = [r["gan_real_logit"] - r["gan_fake_logit"] for r in part if "gan_real_logit" in r]
        g = [r["generator_loss"] for r in part if "generator_loss" in r]
        out.append(f"| {part[0]['step']:.0f}-{part[-1]['step']:.0f} | {np.mean(d):.3f} | {np.mean(gap):.2f} | "
                   + (f"{np.mean(g):.3f} ({len(g)})" if g else "- (warm-up)") + " |")
    return out


def sample_grid(eval_dir: Path, before: str, after: str, out: Path, frames: int = 21, max_prompts: int = 8) -> Path:
    """Two rows per prompt (before, after) of the saved PNG grids, with a label strip on the left."""
    from PIL import Image, ImageDraw

    with open(eval_dir / "videos.csv", newline="") as f:
        videos = list(csv.DictReader(f))  # evaluate's rows, model by model, each in its prompt order
    by = {(v["model"], int(v["latent_frames"]), v["prompt"], int(v["seed"])): v for v in videos}
    prompts = list(dict.fromkeys(v["prompt"] for v in videos))[:max_prompts]
    seed = min(int(v["seed"]) for v in videos)
    rows = []
    for i, prompt in enumerate(prompts):
        for label in (before, after):
            png = eval_dir / "videos" / label / f"f{frames}" / f"p{i:04d}-s{seed}.png"
            v = by[(label, frames, prompt, seed)]
            verdict = "adherent" if float(v["adherent"]) == 1.0 else "not adherent"
            text = f"{label}: {prompt}\n{verdict}, traj. error {float(v['trajectory_error']):.1f} px"
            rows.append((Image.open(png).convert("RGB"), text))
    label_w, pad = 260, 4
    w = label_w + max(im.width for im, _ in rows)
    h = sum(im.height + pad for im, _ in rows)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for im, text in rows:
        canvas.paste(im, (label_w, y))
        draw.multiline_text((6, y + im.height // 2 - 12), text, fill=(0, 0, 0))
        y += im.height + pad
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logdir", required=True, help="the GAN run's log folder (its losses.csv)")
    ap.add_argument("--eval", required=True, help="a workbench evaluate --save-videos folder")
    ap.add_argument("--before", default="ode", help="the model label before GAN training (default: %(default)s)")
    ap.add_argument("--after", default="gan", help="the GAN student's label (default: %(default)s)")
    ap.add_argument("--window", type=int, default=40, help="steps per row of the curve table (default: %(default)s)")
    ap.add_argument("--out", default="bench/figures/gan_zoo_grid.png")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from training.logger import read_losses

    print("\n".join(curve_table(read_losses(args.logdir), args.window)))
    print(f"wrote {sample_grid(Path(args.eval), args.before, args.after, Path(args.out))}")


if __name__ == "__main__":
    main()
