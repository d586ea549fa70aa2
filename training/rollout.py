"""The Self-Forcing training rollout (their `SelfForcingTrainingPipeline.inference_with_trajectory`) and
ODE-pair generation with the bidirectional sampler.

Training rollout, for each chunk (`num_frame_per_block` frames; frame 0 alone first with the generator's
`independent_first_frame`, models/common/chunks.py) of latents [B, F, C, H, W]:

    x = the chunk's noise
    for k, t_k in enumerate(denoising steps):               # warped: 1000, 937.5, 833.3, 625
        if k < exit:   no_grad:  x0 = G(x, t_k); x = add_noise(x0, fresh noise, t_{k+1})
        else:          grad:     x0 = G(x, t_k); break      # the exit step: the only forward with gradient
    output[chunk] = x0
    no_grad: G(add_noise(x0, fresh noise, context_noise), context_noise)   # context pass, refreshes the cache

The exit index is drawn once per rollout (rank 0, broadcast) and shared by every chunk
(`same_step_across_blocks`), or one per chunk. Gradient reaches only the exit-step forwards: earlier steps and
context passes run under no_grad, and the exit forward sees the KV cache through `models.common.kv_cache.GradWindow`.
Two choices of the researchers' code are the defaults, each with an option (docs/training.md):
- `kv_gradient="inplace"`: a later chunk's exit forward sends gradient into the earlier chunks' exit-step
  keys/values (the cache is written in place with gradient), although the cache rows it reads hold the
  context pass's values; "detached" gives the cached context no gradient.
- `text_kv_gradient="follows_checkpointing"`: the cross-attention keys/values are computed by the first
  forward and reused (with gradient only when that forward is an exit step), except that with activation
  checkpointing every exit forward computes them afresh with gradient; "every_exit" / "first_forward" make
  that independent of checkpointing.
`add_noise` at context_noise 0 snaps to the grid's last timestep (4.98), so the context pass sees a tiny noise
that inference does not, as in the researchers' pipeline.

All re-noising draws come from per-sample generators (`training.rng`).
"""

from __future__ import annotations

import torch

from models.common.attention import ForwardLabels
from models.common.kv_cache import RolloutCache
from models.common.rollout import _from_model, _to_model, bidirectional, check_causal_geometry, check_initial_latent
from models.common.scheduler import FlowMatchScheduler
from training import rng


def frame_seq_len(model, latents: torch.Tensor) -> int:
    return model.config.tokens_per_frame(*latents.shape[-2:])  # latents [..., h, w]


def self_forcing_rollout(generator, noise: torch.Tensor, context: torch.Tensor, *, timesteps: torch.Tensor,
                         scheduler: FlowMatchScheduler, exit_indices: list[int], gens: list[torch.Generator],
                         context_noise: float = 0.0, grad: bool = True, kv_gradient: str = "inplace",
                         text_kv_gradient: str = "follows_checkpointing", initial_latent: torch.Tensor | None = None):
    """noise [B, F, C, H, W], context [B, text_len, text_dim] -> x0 [B, F, C, H, W].

    exit_indices: one index into `timesteps` for every chunk (all equal when shared across chunks).
    gens: one generator per sample (re-noising and context-noise draws). With grad=False nothing has gradient.
    kv_gradient, text_kv_gradient: the gradient semantics of the caches (module docstring).
    initial_latent [B, 1, C, H, W] (i2v; the independent_first_frame layout): chunk 0 is the image's latent, pushed
    into the cache by a no-grad forward at t = 0 (the researchers' pipeline), and frame 0 of the output."""
    B, Fr = noise.shape[:2]
    spans = check_causal_geometry(generator, Fr, Fr)
    check_initial_latent(generator, noise, initial_latent)
    if len(exit_indices) != len(spans):
        raise ValueError(f"{len(exit_indices)} exit indices for {len(spans)} chunks")
    device, dtype = noise.device, noise.dtype
    cache = RolloutCache.allocate(generator.config, B, Fr, frame_seq_len(generator, noise), dtype=dtype, device=device,
                                  kv_gradient=kv_gradient, text_kv_gradient=text_kv_gradient)
    steps = [float(t) for t in timesteps.tolist()]
    outputs = []
    for chunk, (start, n) in enumerate(spans):
        exit_k = exit_indices[chunk]
        if chunk == 0 and initial_latent is not None:  # i2v: the image is frame 0 and enters the cache at t = 0
            x0 = initial_latent.to(dtype)
            outputs.append(x0)
            with torch.no_grad():
                t = torch.zeros((B, 1), device=device, dtype=torch.float32)
                labels = ForwardLabels(step=len(steps), timestep=0.0, chunk=0, phase="context", denoise_index=-1)
                generator(_to_model(x0), t, context, cache=cache, start_frame=0, labels=labels)
            continue
        x = noise[:, start : start + n]
        for k, t_k in enumerate(steps):
            t = torch.full((B, n), t_k, device=device, dtype=torch.float32)
            labels = ForwardLabels(step=k, timestep=t_k, chunk=chunk, phase="train" if k == exit_k else "denoise",
                                   denoise_index=k)
            with torch.set_grad_enabled(grad and k == exit_k):
                flow = _from_model(generator(_to_model(x), t, context, cache=cache, start_frame=start, labels=labels))
                x0 = scheduler.x0_from_flow(flow, x, t)
            if k == exit_k:
                break
            with torch.no_grad():
                fresh = rng.randn(gens, x0.shape[1:], device=device, dtype=dtype)
                x = scheduler.add_noise(x0, fresh, torch.full((B, n), steps[k + 1], device=device))
        outputs.append(x0)
        with torch.no_grad():  # the context pass: rewrites this chunk's cache slots from the (re-noised) x0
            fresh = rng.randn(gens, x0.shape[1:], device=device, dtype=dtype)
            t = torch.full((B, n), float(context_noise), device=device, dtype=torch.float32)
            clean = scheduler.add_noise(x0.detach(), fresh, t)
            labels = ForwardLabels(step=len(steps), timestep=float(context_noise), chunk=chunk, phase="context",
                                   denoise_index=-1)
            generator(_to_model(clean), t, context, cache=cache, start_frame=start, labels=labels)
    return torch.cat(outputs, dim=1)


def denoised_timestep_range(exit_index: int, timesteps: torch.Tensor, scheduler: FlowMatchScheduler) -> tuple[int, int]:
    """(from, to) of a rollout whose chunks all exit at `exit_index`, as the researchers' pipeline returns them
    for `ts_schedule`: n - (grid index of the exit step's timestep) and the same for the next step (0 after the
    last), with n = num_train_timesteps. Warped [1000, 750, 500, 250]: (1000, 750), (750, 500), (500, 250),
    (250, 0) for exits 0..3. The nearest grid point is found in float32, as theirs."""
    n = scheduler.num_train_timesteps
    grid = scheduler.timesteps.float()

    def level(t) -> int:
        return n - int((grid - float(t)).abs().argmin())

    last = exit_index == len(timesteps) - 1
    return level(timesteps[exit_index]), 0 if last else level(timesteps[exit_index + 1])


def draw_exit_indices(seed: int, step: int, stream: str, num_chunks: int, num_steps: int, *, shared: bool,
                      last_step_only: bool) -> list[int]:
    """The exit step of every chunk: uniform over the denoising steps (the last one with last_step_only), one
    draw shared by all chunks when `shared`. Callers broadcast the result from rank 0."""
    g = rng.generator(seed, step, stream)
    draws = torch.randint(0, num_steps, (num_chunks,), generator=g).tolist()
    if last_step_only:
        draws = [num_steps - 1] * num_chunks
    return [draws[0]] * num_chunks if shared else draws


# ------------------------------------------------------------------------------------------------------
# ODE pairs (researchers' scripts/generate_ode_pairs.py; CausVid 4.3)


@torch.no_grad()
def make_ode_pairs(teacher, contexts: torch.Tensor, negative: torch.Tensor, *, shape, steps: int = 48,
                   shift: float = 8.0, guidance_scale: float = 6.0, keep=(0, 12, 24, 36), seed: int = 0,
                   first_index: int = 0, batch_size: int = 1, on_forward=None) -> torch.Tensor:
    """Trajectories of the bidirectional teacher: Euler on the shift-`shift` grid with CFG (v = v_u + g (v_c - v_u)).

    contexts [N, text_len, text_dim], negative [1, text_len, text_dim], shape = (F, C, H, W) of one latent.
    Returns [N, len(keep) + 1, F, C, H, W]: the latents before the steps `keep`, then the final clean latent.
    Pair i's noise is drawn from the generator keyed (seed, "ode_pairs", first_index + i), so a pair does not
    depend on `batch_size` (the pairs sampled together) beyond the float rounding of batched kernels."""
    if teacher.causal:
        raise ValueError("ODE pairs come from the bidirectional teacher (causal=False)")
    keep = list(keep)
    if keep != sorted(set(keep)) or not all(0 <= k < steps for k in keep):
        raise ValueError(f"keep {keep}: steps in [0, {steps}), increasing, each once (the trajectory comes in step "
                         "order)")
    out = []
    for first in range(0, contexts.shape[0], batch_size):
        idx = range(first, min(first + batch_size, contexts.shape[0]))
        noise = torch.stack([
            torch.randn(tuple(shape), generator=rng.generator(seed, 0, "ode_pairs", first_index + i, device=contexts.device),
                        device=contexts.device) for i in idx]).to(contexts.dtype)  # [b, F, C, H, W]
        final, trajectory = bidirectional(teacher, noise, contexts[first:first + len(idx)],
                                          negative.expand(len(idx), -1, -1), steps=steps, shift=shift,
                                          guidance_scale=guidance_scale, solver="euler", on_forward=on_forward,
                                          return_trajectory=list(keep))
        out.append(torch.stack(trajectory + [final], dim=1))
    return torch.cat(out)
