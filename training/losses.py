"""The training losses (DMD, SiD, ODE regression and the diffusion loss, with the formulas of Self-Forcing's
`model/dmd.py`, `model/sid.py` and `model/ode_regression.py`), on latents [B, F, C, H, W] (Self-Forcing's layout).

Score timestep (DMD, SiD, critic): t ~ uniform int in [low, high) per sample, the same for every frame (low =
min_score_timestep, or with `ts_schedule` the rollout's denoised_timestep_to; high = 1000, or with
`ts_schedule_max` its denoised_timestep_from); then t <- 1000 * s u / (1 + (s - 1) u) with u = t / 1000 and
s = timestep_shift (when s > 1); then clamped to [20, 980] (0.02 and 0.98 x num_train_timestep).

Two schedulers: `scheduler` (the generator's grid) makes x_t and the critic's flow target; `score_scheduler`
converts the score networks' flow predictions to x0. The researchers build their score networks without the
config's model_kwargs, so that conversion uses sigma on the wrapper's default shift-8 grid (nearest grid
timestep to t) while x_t uses the shift-5 grid (docs/training.md).

DMD (generator):  x_t = add_noise(x, eps, t)                                     (no gradient)
                  fake = critic(x_t) (cond, + g_f (cond - uncond) when fake_guidance_scale g_f is used),
                  real = c + g (c - u)  with c, u = teacher(x_t, cond / negative)
                  grad = nan_to_num((fake - real) / mean_{F,C,H,W} |x - real|)   (per-sample normaliser)
                  loss = 0.5 * mse(x, (x - grad).detach()) in float64             (so dloss/dx = grad / numel)
Critic (flow):    x_t = add_noise(x, eps, t) with x from a no-grad rollout;  v = (x_t - critic_x0(x_t)) / sigma
                  (sigma on the generator's grid, critic_x0 from the score scheduler's);
                  loss = mean((v - (eps - x))^2)
SiD (generator):  x_t = add_noise(x, eps, t) (with gradient); loss = mean[(real - fake) ((real - x) - alpha (real - fake))
                  / mean|x - real|] in float64, the normaliser without gradient
ODE regression:   per chunk a random index into the denoising steps; the causal generator (block-causal
                  full-sequence forward, per-frame t) predicts x0 from that trajectory point; mse against the
                  clean latent over frames with t != 0
Diffusion:        t = grid timestep at a uniform index (per sample; per chunk for a causal model);
                  loss = mean over frames of w(t) * mean_{C,H,W}(v - (eps - x0))^2 with the trainer's weight w
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.common.chunks import block_sizes
from models.common.rollout import _from_model, _to_model
from models.common.scheduler import FlowMatchScheduler
from training import rng


def predict_x0(model, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
               scheduler: FlowMatchScheduler) -> torch.Tensor:
    """x0 from a flow prediction (float64 conversion, cast back). The bidirectional model gets t[:, 0]."""
    flow = _from_model(model(_to_model(x_t), t if model.causal else t[:, 0], context))
    return scheduler.x0_from_flow(flow, x_t, t)


def score_timestep(gens: list[torch.Generator], num_frames: int, *, min_timestep: int = 0,
                   max_timestep: int | None = None, num_train_timestep: int = 1000, shift: float = 5.0,
                   device="cpu") -> torch.Tensor:
    """t [B, F] float32 for the score networks: uniform int in [min_timestep, max_timestep) (default
    num_train_timestep), shifted, clamped to [20, 980]."""
    high = num_train_timestep if max_timestep is None else max_timestep
    t = rng.randint(gens, min_timestep, high, device=device).float()  # [B]
    if shift > 1:  # float32, in the researchers' order of operations
        t = shift * (t / 1000) / (1 + (shift - 1) * (t / 1000)) * 1000
    t = t.clamp(int(0.02 * num_train_timestep), int(0.98 * num_train_timestep))
    return t[:, None].expand(-1, num_frames).contiguous()


def real_score(teacher, x_t, t, cond, uncond, scheduler, guidance_scale: float) -> torch.Tensor:
    """CFG in the researchers' form: c + g (c - u) (= u + (1 + g)(c - u))."""
    c = predict_x0(teacher, x_t, t, cond, scheduler)
    u = predict_x0(teacher, x_t, t, uncond, scheduler)
    return c + (c - u) * guidance_scale


def dmd_loss(x: torch.Tensor, *, teacher, critic, cond, uncond, scheduler, t, noise, guidance_scale: float,
             fake_guidance_scale: float = 0.0, score_scheduler: FlowMatchScheduler | None = None):
    """Distribution matching loss of the generated latents x (with gradient). Returns (loss, logs).
    score_scheduler: the score networks' flow -> x0 conversion (default: `scheduler`)."""
    score = score_scheduler or scheduler
    with torch.no_grad():
        x_t = scheduler.add_noise(x.detach(), noise, t)
        fake = predict_x0(critic, x_t, t, cond, score)
        if fake_guidance_scale != 0.0:
            fake_u = predict_x0(critic, x_t, t, uncond, score)
            fake = fake + (fake - fake_u) * fake_guidance_scale
        real = real_score(teacher, x_t, t, cond, uncond, score, guidance_scale)
        grad = fake - real
        normalizer = (x.detach() - real).abs().mean(dim=[1, 2, 3, 4], keepdim=True)  # [B, 1, 1, 1, 1]
        grad = torch.nan_to_num(grad / normalizer)
    loss = 0.5 * F.mse_loss(x.double(), (x.double() - grad.double()).detach(), reduction="mean")
    return loss, {"dmdtrain_gradient_norm": grad.abs().mean().detach()}


def critic_flow_loss(x: torch.Tensor, *, critic, cond, scheduler, t, noise,
                     score_scheduler: FlowMatchScheduler | None = None):
    """The critic's denoising loss on generated latents x (no gradient into x), flow parametrisation: the critic's
    x0 (from `score_scheduler`) turned back into a flow on the generator's grid (`scheduler`), as theirs."""
    x = x.detach()
    x_t = scheduler.add_noise(x, noise, t)
    fake_x0 = predict_x0(critic, x_t, t, cond, score_scheduler or scheduler)
    flow = scheduler.flow_from_x0(fake_x0, x_t, t)
    return torch.mean((flow.float() - (noise.float() - x.float())) ** 2)


def sid_loss(x: torch.Tensor, *, teacher, critic, cond, uncond, scheduler, t, noise, guidance_scale: float,
             alpha: float = 1.0, score_scheduler: FlowMatchScheduler | None = None):
    """Score identity distillation loss of the generated latents x (gradient through x_t and both networks)."""
    score = score_scheduler or scheduler
    x_t = scheduler.add_noise(x, noise, t)
    fake = predict_x0(critic, x_t, t, cond, score)
    real = real_score(teacher, x_t, t, cond, uncond, score, guidance_scale)
    r, f, xd = real.double(), fake.double(), x.double()
    loss = (r - f) * ((r - xd) - alpha * (r - f))
    with torch.no_grad():
        normalizer = (x - real).abs().mean(dim=[1, 2, 3, 4], keepdim=True)
    loss = torch.nan_to_num(loss / normalizer).mean()
    return loss, {"dmdtrain_gradient_norm": torch.zeros((), device=x.device)}


def chunk_index(gens: list[torch.Generator], sizes: list[int], high: int, *, device) -> torch.Tensor:
    """[B, F] int64: one uniform draw in [0, high) per chunk (frames per chunk: `sizes`), the same for a chunk's
    frames (with an independent first frame, frame 0 gets a draw of its own, as the researchers' _get_timestep)."""
    per_chunk = torch.stack([torch.randint(0, high, (len(sizes),), generator=g, device=device) for g in gens])
    return per_chunk.repeat_interleave(torch.tensor(sizes, device=device), dim=1)


def model_chunks(model, num_frames: int) -> list[int]:
    """Frames per chunk of a causal model's block-causal forward; one chunk of every frame for a bidirectional one."""
    if not model.causal:
        return [num_frames]
    return block_sizes(num_frames, model.num_frame_per_block, getattr(model, "independent_first_frame", False))


def ode_regression_loss(generator, ode_latent: torch.Tensor, context, *, timesteps: torch.Tensor, scheduler,
                        gens: list[torch.Generator]):
    """ode_latent [B, S, F, C, H, W] (trajectory points, the clean latent last); timesteps [K] with K <= S - 1
    labels trajectory point k with timesteps[k] (the researchers' denoising list)."""
    B, S, Fr = ode_latent.shape[:3]
    index = chunk_index(gens, model_chunks(generator, Fr), len(timesteps), device=ode_latent.device)  # [B, F]
    gather = index[:, None, :, None, None, None].expand(-1, 1, -1, *ode_latent.shape[3:])
    noisy = torch.gather(ode_latent, 1, gather)[:, 0]  # [B, F, C, H, W]
    t = timesteps.to(ode_latent.device)[index].float()  # [B, F]
    x0 = predict_x0(generator, noisy, t, context, scheduler)
    mask = t != 0
    return F.mse_loss(x0[mask].float(), ode_latent[:, -1][mask].float())


def diffusion_loss(model, x0: torch.Tensor, context, *, scheduler: FlowMatchScheduler, gens: list[torch.Generator],
                   weighting: str = "bump"):
    """Flow-matching loss of a (bidirectional or causal) model on clean latents x0 [B, F, C, H, W]. Each frame's
    MSE is weighted by the scheduler's Gaussian bump over timesteps (`weighting="bump"`, the researchers' diffusion
    trainer) or not at all ("uniform")."""
    B, Fr = x0.shape[:2]
    index = chunk_index(gens, model_chunks(model, Fr), scheduler.num_train_timesteps, device=x0.device)  # [B, F]
    t = scheduler.timesteps.to(x0.device)[index].float()
    noise = rng.randn(gens, x0.shape[1:], device=x0.device, dtype=x0.dtype)
    x_t = scheduler.add_noise(x0, noise, t)
    flow = _from_model(model(_to_model(x_t), t if model.causal else t[:, 0], context))
    target = scheduler.training_target(x0, noise)  # the flow: noise - x0
    per_frame = F.mse_loss(flow.float(), target.float(), reduction="none").mean(dim=(2, 3, 4))  # [B, F]
    if weighting == "uniform":
        return per_frame.mean()
    weight = scheduler.training_weight(t.cpu()).to(per_frame)
    return (per_frame * weight).mean()
