"""Does each prompt word steer a model? Its flow-matching error on held-out world videos with the true prompt
against the same prompt with one word swapped.

How it fits: the zoo's `check` stage (training/zoo_check.py `check_models`) runs it for every model it loads,
logs one line per model and writes the numbers into check.json; docs/zoo.md says how to read them. It asks the
question the sampling check cannot separate: a sample of the wrong shape may come from a model that ignores the
shape word or from one that reads it but draws badly.

    held-out set   `videos` world videos of scenes no training item is drawn from (training/world_vae.py
                   `held_out_videos`), encoded by the model folder's VAE: x0 [N, F, 16, h, w]
    noising        exactly as training/losses.py `diffusion_loss`: t the grid timestep nearest each requested one
                   (models/common/scheduler.py FlowMatchScheduler with the model's timestep shift), the same for
                   every video (per frame, [N, F], for a causal model), x_t = add_noise(x0, noise, t), target
                   = noise - x0; one seeded noise for every variant and every timestep
    variants       the true prompt; the prompt with its colour (red <-> green, blue <-> yellow), shape
                   (square <-> circle) or direction (left <-> right, up <-> down) swapped (`swap_word`); and the
                   empty prompt ""
    error          mean over videos, frames, channels and pixels of (flow - target)^2, float32
    ratio          error(variant) / error(true prompt): 1.0 = the model ignores the word; a model that reads it
                   predicts worse with the wrong word, so its ratio is above 1

The result is a JSON-ready dict (`flow_word_errors`); `describe` gives the log line's words part. The zoo's check
encodes the held-out videos once for all its models (`held_out_latents`); `word_sensitivity(model, text_encoder,
vae)` is the same check of one model in one call (a notebook's).
"""

from __future__ import annotations

import re
import time
from typing import Callable

import torch

from models import world
from models.common.rollout import _from_model, _to_model
from models.common.scheduler import FlowMatchScheduler
from training.errors import TrainingError

KINDS = ("colour", "shape", "direction", "empty")  # the variants compared with the true prompt
SWAPS = {  # word kind -> word -> the word that replaces it (each swap is its own inverse)
    "colour": {"red": "green", "green": "red", "blue": "yellow", "yellow": "blue"},
    "shape": {"square": "circle", "circle": "square"},
    "direction": {"left": "right", "right": "left", "up": "down", "down": "up"},
}
DEFAULT_TIMESTEPS = (900.0, 700.0, 500.0)


def swap_word(prompt: str, kind: str) -> str:
    """`prompt` with its `kind` word (colour, shape or direction) replaced by its swap partner (`SWAPS`), the
    phrasing kept: "a red square moving left" -> "a red square moving right" for "direction"."""
    if kind not in SWAPS:
        raise TrainingError(f"unknown word kind {kind!r}; the swaps are for {', '.join(SWAPS)}")
    named = dict(zip(SWAPS, world.parse_prompt(prompt)))
    word = named[kind]
    return re.sub(rf"\b{word}\b", SWAPS[kind][word], prompt, flags=re.IGNORECASE)


def variant_prompts(prompts: list[str], kind: str) -> list[str]:
    """The prompts of one variant: `prompts` themselves ("true"), each with a word swapped, or "" ("empty")."""
    if kind == "true":
        return list(prompts)
    if kind == "empty":
        return [""] * len(prompts)
    return [swap_word(p, kind) for p in prompts]


@torch.no_grad()
def held_out_latents(vae, videos: int, latent_frames: int, *, batch: int = 4) -> tuple[list[str], torch.Tensor]:
    """(prompts, x0 [videos, latent_frames, 16, 12, 16] float32 on the VAE's device): held-out world videos
    (training/world_vae.py `held_out_videos`: scenes no training item is drawn from, prompts spread over the
    grid) encoded by `vae` (models.wan.vae.WanVAE)."""
    from models.wan.vae import pixel_frames
    from training.world_vae import held_out_videos

    if videos < 1:
        raise TrainingError(f"the word check needs at least 1 held-out video, got {videos}")
    prompts, pixels = held_out_videos(videos, pixel_frames(latent_frames))  # [N, 3, T, 96, 128]
    x0 = torch.cat([vae.encode(pixels[i:i + batch].to(vae.device, vae.dtype)).float()
                    for i in range(0, videos, batch)])
    return prompts, x0


def _grid_timestep(scheduler: FlowMatchScheduler, t: float) -> float:
    """The training grid's timestep nearest to t (what diffusion_loss feeds the model)."""
    grid = scheduler.timesteps
    return float(grid[(grid - t).abs().argmin()])


@torch.no_grad()
def flow_word_errors(model, encode: Callable[[list[str]], torch.Tensor], prompts: list[str], x0: torch.Tensor, *,
                     timesteps=DEFAULT_TIMESTEPS, seed: int = 0, shift: float = 5.0) -> dict:
    """The word check of `model` (bidirectional or causal; called as model(x [B, C, F, H, W], t, context)) on
    clean latents x0 [N, F, C, H, W] of `prompts`; `encode` maps prompts to the model's context [N, L, D].

    Returns {"timesteps": {"700": {"t": grid timestep, "errors": {"true", "colour", "shape", "direction",
    "empty"}, "ratios": {"colour", "shape", "direction", "empty"}}, ...}, "videos", "frames", "shift", "seed",
    "seconds"}; keys are the requested timesteps as written by `_key`."""
    if len(prompts) != x0.shape[0]:
        raise TrainingError(f"{len(prompts)} prompts for {x0.shape[0]} latent videos")
    timesteps = [float(t) for t in timesteps]
    bad = [t for t in timesteps if not 0 < t <= 1000]
    if not timesteps or bad:
        raise TrainingError(f"word check timesteps {bad or timesteps}: give one or more in (0, 1000]")
    start = time.perf_counter()
    device = x0.device
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    scheduler = FlowMatchScheduler(shift)
    contexts = {kind: encode(variant_prompts(prompts, kind)).to(device, dtype) for kind in ("true",) + KINDS}
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(device)  # the same on every device
    x0 = x0.float()
    target = scheduler.training_target(x0, noise)  # [N, F, C, H, W]
    B, Fr = x0.shape[:2]
    out = {}
    for requested in timesteps:
        tv = _grid_timestep(scheduler, requested)
        t = torch.full((B, Fr), tv, dtype=torch.float32, device=device)  # [B, F], as diffusion_loss's t
        x_t = scheduler.add_noise(x0, noise, t).to(dtype)
        errors = {}
        for kind, context in contexts.items():
            flow = _from_model(model(_to_model(x_t), t if model.causal else t[:, 0], context))  # [B, F, C, H, W]
            errors[kind] = float(((flow.float() - target) ** 2).mean())
        ratios = {k: errors[k] / errors["true"] for k in KINDS}
        out[_key(requested)] = {"t": round(tv, 3), "errors": errors, "ratios": ratios}
    return {"timesteps": out, "videos": B, "frames": Fr, "shift": shift, "seed": seed,
            "seconds": round(time.perf_counter() - start, 2)}


def word_sensitivity(model, text_encoder, vae, *, videos: int = 12, frames: int = 21,
                     timesteps=DEFAULT_TIMESTEPS, seed: int = 0, shift: float = 5.0) -> dict:
    """`flow_word_errors` on `videos` held-out world videos of `frames` latent frames encoded by `vae`, the
    prompts encoded by `text_encoder` (models.wan.text_encoder.TextEncoder), on the VAE's device."""
    prompts, x0 = held_out_latents(vae, videos, frames)
    return flow_word_errors(model, lambda ps: text_encoder.encode(ps).context, prompts, x0,
                            timesteps=timesteps, seed=seed, shift=shift)


def _key(t: float) -> str:
    """A timestep as a check.json key: "700", or "712.5" when it has a fraction."""
    return f"{t:g}"


def describe(result: dict, t: float | None = None) -> str:
    """The log line's words part, at timestep t (default: 700 if checked, else the middle one):
    "colour x3.64, shape x1.01, direction x1.04, empty prompt x1.20 (flow error ratio with the word swapped,
    t=700)"."""
    keys = list(result["timesteps"])
    key = _key(t) if t is not None else ("700" if "700" in keys else keys[len(keys) // 2])
    if key not in result["timesteps"]:
        raise TrainingError(f"timestep {key} was not checked; the result has {', '.join(keys)}")
    r = result["timesteps"][key]["ratios"]
    words = ", ".join(f"{'empty prompt' if k == 'empty' else k} x{r[k]:.2f}" for k in KINDS)
    return f"{words} (flow error ratio with the word swapped, t={key})"
