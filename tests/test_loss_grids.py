"""training/losses.py against formulas written out in float64: the two-scheduler split (x_t and the critic's flow on
the generator's shift-5 grid, the score networks' flow -> x0 on the shift-8 grid), fake guidance, the score
timestep's bounds, the ODE and diffusion losses' draws, and SiD's NaN guard."""

import pytest
import torch

from models.common.scheduler import FlowMatchScheduler
from training import rng
from test_training_losses import Linear  # (a score network whose x0 is known in closed form)
from training.losses import critic_flow_loss, diffusion_loss, dmd_loss, ode_regression_loss, score_timestep, sid_loss

GEN, SCORE = FlowMatchScheduler(5.0), FlowMatchScheduler(8.0)
B, F, C, H, W = 2, 6, 4, 2, 2

pytestmark = pytest.mark.usefixtures("one_thread")


def grid_sigma(shift: float, t: torch.Tensor) -> torch.Tensor:
    """sigma at the nearest timestep of the float32 grid, written out: [B, F] -> [B, F, 1, 1, 1] float64."""
    s = torch.linspace(1.0, 0.0, 1001, dtype=torch.float32)[:-1]
    sig = (shift * s / (1 + (shift - 1) * s)).double()
    idx = (sig[None, :] * 1000 - t.double().reshape(-1, 1)).abs().argmin(1)
    return sig[idx].reshape(t.shape)[..., None, None, None]


def draws(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, C, H, W, generator=g, dtype=torch.float64)
    x[1] *= 3
    noise = torch.randn(B, F, C, H, W, generator=g, dtype=torch.float64)
    t = torch.tensor([[400.0] * F, [900.0] * F])
    return x, noise, t, torch.ones(B, 3, 5), -torch.ones(B, 3, 5)


def by_hand(x, noise, t, a_fake=0.7, a_real=0.3, g=3.0):
    """x_t on the generator's grid, x0 predictions with the score grid's sigma (float64)."""
    s5, s8 = grid_sigma(5.0, t), grid_sigma(8.0, t)
    x_t = (1 - s5) * x + s5 * noise
    fake = x_t - s8 * a_fake * x_t
    c = x_t - s8 * (a_real * x_t + 1.0)
    u = x_t - s8 * (a_real * x_t - 1.0)
    return x_t, fake, c + g * (c - u), s5, s8


def test_dmd_uses_the_generator_grid_for_x_t_and_the_score_grid_for_x0():
    x, noise, t, cond, uncond = draws()
    assert not torch.equal(grid_sigma(5.0, t), grid_sigma(8.0, t))  # the two grids differ at these t
    xg = x.clone().requires_grad_(True)
    loss, _ = dmd_loss(xg, teacher=Linear(0.3, b=1.0), critic=Linear(0.7), cond=cond, uncond=uncond, scheduler=GEN,
                       score_scheduler=SCORE, t=t, noise=noise, guidance_scale=3.0)
    loss.backward()
    _, fake, real, _, _ = by_hand(x, noise, t)
    grad = (fake - real) / (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(xg.grad, grad / grad.numel(), rtol=1e-6, atol=1e-12)


def test_critic_flow_is_converted_back_on_the_generator_grid():
    """v = (x_t - x0_critic) / sigma_gen, x0_critic = x_t - sigma_score * (a x_t): v = a x_t sigma_score / sigma_gen."""
    x, noise, t, cond, _ = draws()
    loss = critic_flow_loss(x.float(), critic=Linear(0.9), cond=cond, scheduler=GEN, score_scheduler=SCORE, t=t,
                            noise=noise.float())
    x_t, _, _, s5, s8 = by_hand(x, noise, t)
    v = 0.9 * x_t * s8 / s5
    torch.testing.assert_close(loss.double(), ((v - (noise - x)) ** 2).mean(), rtol=1e-5, atol=0)


def test_sid_with_two_grids():
    x, noise, t, cond, uncond = draws()
    loss, _ = sid_loss(x, teacher=Linear(0.3, b=1.0), critic=Linear(0.7), cond=cond, uncond=uncond, scheduler=GEN,
                       score_scheduler=SCORE, t=t, noise=noise, guidance_scale=3.0, alpha=0.5)
    _, f, r, _, _ = by_hand(x, noise, t)
    expected = ((r - f) * ((r - x) - 0.5 * (r - f)) / (x - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_score_timestep_draw_excludes_its_upper_bound():
    """[low, high) as torch.randint: with ts_schedule_max the bound is the rollout's denoised_timestep_from, never
    drawn itself."""
    t = torch.cat([score_timestep([rng.generator(3, s, "t", 0)], 1, min_timestep=500, max_timestep=502, shift=1.0)
                   for s in range(60)])
    assert set(t.flatten().tolist()) == {500.0, 501.0}
    t5 = torch.cat([score_timestep([rng.generator(3, s, "t", 0)], 1, min_timestep=100, max_timestep=101, shift=5.0)
                    for s in range(20)])
    assert set(t5.flatten().tolist()) == {float(torch.tensor(5 * 0.1 / (1 + 4 * 0.1) * 1000, dtype=torch.float32))}


def test_dmd_fake_guidance_is_cfg_on_the_critic():
    """fake = f_c + g_f (f_c - f_u) (their fake_guidance_scale), the critic's two branches written out."""
    x, noise, t, cond, uncond = draws()
    xg = x.clone().requires_grad_(True)
    loss, _ = dmd_loss(xg, teacher=Linear(0.3, b=1.0), critic=Linear(0.7, b=0.5), cond=cond, uncond=uncond,
                       scheduler=GEN, t=t, noise=noise, guidance_scale=3.0, fake_guidance_scale=2.0)
    loss.backward()
    s5 = grid_sigma(5.0, t)
    x_t = (1 - s5) * x + s5 * noise
    fc, fu = x_t - s5 * (0.7 * x_t + 0.5), x_t - s5 * (0.7 * x_t - 0.5)
    c, u = x_t - s5 * (0.3 * x_t + 1.0), x_t - s5 * (0.3 * x_t - 1.0)
    fake, real = fc + 2.0 * (fc - fu), c + 3.0 * (c - u)
    grad = (fake - real) / (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(xg.grad, grad / grad.numel(), rtol=1e-6, atol=1e-12)


def test_ode_chunks_draw_their_indices_independently_and_t0_frames_are_masked():
    """Each chunk its own draw (not one per sample), and frames at t = 0 leave the mean."""
    S = 4
    steps = torch.tensor([1000.0, 937.5, 0.0])
    ode = torch.randn(1, S, F, C, H, W, generator=torch.Generator().manual_seed(3))
    gen = Linear(0.0, causal=True)
    differ, masked = False, False
    for s in range(30):
        gen.seen_t.clear()
        loss = ode_regression_loss(gen, ode, torch.zeros(1, 3, 5), timesteps=steps, scheduler=GEN,
                                   gens=[rng.generator(0, s, "ode", 0)])
        t = gen.seen_t[0][0]  # [F]
        differ |= bool(t[0] != t[3])
        index = (steps[None, :] - t[:, None]).abs().argmin(1)
        keep = t != 0
        if keep.any():
            picked = ode[0, index, torch.arange(F)]
            torch.testing.assert_close(loss, ((picked - ode[0, -1]) ** 2)[keep].mean())
            masked |= bool((~keep).any())
    assert differ and masked


def test_diffusion_draws_every_grid_timestep_including_the_first():
    x0 = torch.zeros(1, 1, 1, 1, 1)
    model, seen = Linear(0.0), set()
    for s in range(6000):
        diffusion_loss(model, x0, torch.zeros(1, 3, 5), scheduler=GEN, gens=[rng.generator(0, s, "d", 0)])
        seen.add(float(model.seen_t[-1][0]))
    assert 1000.0 in seen and len(seen) > 990 and seen <= set(GEN.timesteps.float().tolist())


def test_sid_nan_guard():
    """The zero video with real = x: normaliser 0, the SiD loss is finite (nan_to_num), as DMD's."""
    x, noise, t, cond, uncond = draws()
    loss, _ = sid_loss(torch.zeros_like(x).requires_grad_(True), teacher=Linear(0.0), critic=Linear(0.1), cond=cond,
                       uncond=uncond, scheduler=GEN, t=t, noise=torch.zeros_like(noise), guidance_scale=3.0)
    assert torch.isfinite(loss)
