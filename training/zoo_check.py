"""The zoo's quick check: every trained model samples the prompt grid and a quick pixel tracker reads colour,
shape and direction back (the `check` stage of training/zoo.py; studies/world_metrics.py has the full tracker
that `workbench evaluate` uses); the word check (training/word_check.py) measures whether each prompt word
steers the model's flow prediction at all.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from models import world


def quick_track(video: np.ndarray, threshold: float = 0.3) -> dict:
    """A decoded world video [3, T, H, W] in [-1, 1] -> the colour whose pixels it shows most (pixels within
    `threshold` of a vocabulary colour in RGB), the shape (share of the object's bounding box it fills: a square
    ~1, a circle ~pi/4) and the direction (the sum of the object's centroid steps, unwrapped on the torus).
    A quick check for the training log; studies/ holds the tested metrics."""
    rgb = (np.transpose(video, (1, 2, 3, 0)) + 1) / 2  # [T, H, W, 3]
    T, H, W, _ = rgb.shape
    masks = {c: np.linalg.norm(rgb - np.asarray(v), axis=-1) < threshold for c, v in world.COLOURS.items()}
    counts = {c: int(m.sum()) for c, m in masks.items()}
    colour = max(counts, key=counts.get)
    mask = masks[colour]  # [T, H, W]
    ys, xs = np.arange(H), np.arange(W)
    centres, fills = [], []
    for m in mask:
        if m.sum() < 8:
            centres.append(None)
            continue
        # circular means: the centroid on the torus
        cy = np.angle((m.sum(1) * np.exp(2j * np.pi * ys / H)).sum()) / (2 * np.pi) * H % H
        cx = np.angle((m.sum(0) * np.exp(2j * np.pi * xs / W)).sum()) / (2 * np.pi) * W % W
        centres.append((cy, cx))
        rolled = np.roll(np.roll(m, H // 2 - int(round(cy)), 0), W // 2 - int(round(cx)), 1)
        rows, cols = np.nonzero(rolled.any(1))[0], np.nonzero(rolled.any(0))[0]
        fills.append(m.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)))
    step = np.zeros(2)
    for a, b in zip(centres[:-1], centres[1:]):
        if a is not None and b is not None:
            d = np.array(b) - np.array(a)
            step += (d + np.array([H, W]) / 2) % np.array([H, W]) - np.array([H, W]) / 2
    axis = int(np.argmax(np.abs(step)))
    direction = ("up", "down")[int(step[0] > 0)] if axis == 0 else ("left", "right")[int(step[1] > 0)]
    shape = "square" if fills and np.median(fills) > 0.89 else "circle"
    return {"colour": colour, "shape": shape, "direction": direction, "visible_frames": len(fills),
            "motion_px": round(float(np.abs(step).max()), 1)}


@torch.no_grad()
def check_models(folder: Path, device: str, *, frames: int = 21, short: bool = False, seeds=(0,), log=print,
                 word_videos: int | None = None, shift: float = 5.0, extra=()) -> dict:
    """Each zoo model (and each of the `extra` ZooModels, e.g. the unshipped GAN student) found in `folder` samples every prompt of the grid (template 0) with its own sampler; the
    share of videos whose colour, shape and direction `quick_track` reads back as the prompt names them. Then
    the word check (training/word_check.py `flow_word_errors`) on `word_videos` held-out world videos (default
    12, 2 with `short`) at the timestep `shift` of the zoo configs: result["words"]."""
    from models.errors import CheckpointError
    from models.wan.checkpoint import load_wan
    from models.wan.embedded import ZOO
    from models.common.rollout import sample
    from models.wan.text_encoder import TextEncoder, prompt_cache_dir
    from models.wan.vae import WanVAE
    from training.word_check import describe, flow_word_errors, held_out_latents

    dev = torch.device(device)
    prompts = world.prompt_grid()
    if short:
        prompts = prompts[::11]
    encoder = TextEncoder.from_wan_dir(folder, device=dev, cache_dir=prompt_cache_dir())
    context = encoder.encode(prompts).context.to(dev)
    # the fast decoder on every device (CUDA's default; on a CPU 3x the reference's speed, equal to rounding)
    vae = WanVAE.from_file(folder / "Wan2.1_VAE.pth", device=dev, decoder="fast")
    word_prompts, word_x0 = held_out_latents(vae, word_videos or (2 if short else 12), frames)  # shared by all

    def encode(ps: list[str]) -> torch.Tensor:
        return encoder.encode(ps).context

    results = {}
    for entry in (*ZOO.values(), *extra):
        name, ckpt = entry.name, entry.checkpoint_path(folder)
        if ckpt is not None and not ckpt.is_file():
            continue
        try:
            model = load_wan(folder, checkpoint=ckpt, use_ema=entry.use_ema, causal=entry.sampler != "bidirectional",
                             device=dev)
        except CheckpointError as exc:  # e.g. a DMD run stopped before its EMA began: the other models still run
            log(f"[check] {name}: skipped: {exc}")
            results[name] = {"skipped": str(exc)}
            continue
        negative = encoder.encode([entry.negative_prompt]).context.to(dev).expand(len(prompts), -1, -1)
        steps = 4 if short else entry.num_inference_steps
        t0 = time.perf_counter()
        rows = []
        for seed in seeds:
            gen = torch.Generator(device=dev).manual_seed(seed)
            noise = torch.randn((len(prompts), frames, 16, 12, 16), generator=gen, device=dev)
            latents = sample(model, entry.sampler, noise, context, negative, generator=gen,
                             num_inference_steps=steps, guidance_scale=entry.guidance_scale)
            videos = torch.cat([vae.decode(latents[i:i + 8]) for i in range(0, len(prompts), 8)]).cpu().numpy()
            for p, v in zip(prompts, videos):
                got = quick_track(v)
                want = dict(zip(("colour", "shape", "direction"), world.parse_prompt(p)))
                rows.append({"prompt": p, "seed": seed, **{k: got[k] for k in got},
                             **{f"{k}_ok": got[k] == want[k] for k in want}})
        r = {k: round(float(np.mean([row[f"{k}_ok"] for row in rows])), 3) for k in ("colour", "shape", "direction")}
        r["all"] = round(float(np.mean([all(row[f"{k}_ok"] for k in ("colour", "shape", "direction")) for row in rows])), 3)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        r["per_video"] = rows
        results[name] = r
        log(f"[check] {name}: colour {r['colour']:.2f}, shape {r['shape']:.2f}, direction {r['direction']:.2f}, "
            f"all three {r['all']:.2f} over {len(rows)} videos ({r['seconds']} s)")
        r["words"] = flow_word_errors(model, encode, word_prompts, word_x0, shift=shift)
        log(f"[check] {name} words: {describe(r['words'])}")
        del model
    return results
