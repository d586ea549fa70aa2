"""Training losses against the formulas of Self-Forcing's `model/dmd.py`, `model/sid.py` and
`model/ode_regression.py`, with stand-in score networks whose predictions are known exactly."""

import pytest
import torch

from models.common.scheduler import FlowMatchScheduler
from training import rng
from training.losses import (critic_flow_loss, diffusion_loss, dmd_loss, ode_regression_loss, predict_x0,
                             real_score, score_timestep, sid_loss)

SCHED = FlowMatchScheduler(5.0)
B, F, C, H, W = 2, 6, 4, 2, 2


pytestmark = pytest.mark.usefixtures("one_thread")


class Linear(torch.nn.Module):
    """A 'score network' whose flow prediction is a * x + b * (context mean): x0 is then known in closed form."""

    def __init__(self, a: float, b: float = 0.0, causal=False):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b = b
        self.causal, self.num_frame_per_block = causal, 3
        self.seen_t = []

    def forward(self, x, t, context):  # x [B, C, F, H, W]
        self.seen_t.append(t)
        return self.a * x + self.b * context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)


def draws(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, C, H, W, generator=g)
    x[1] *= 3  # two samples of different scale: the normaliser is per sample
    noise = torch.randn(B, F, C, H, W, generator=g)
    t = torch.tensor([[400.0] * F, [900.0] * F])
    cond, uncond = torch.ones(B, 3, 5), -torch.ones(B, 3, 5)
    return x, noise, t, cond, uncond


def test_score_timestep_shift_and_clamp():
    """Uniform int in [0, 1000), shift 5, clamp [20, 980]: t in [908, 999] saturates at 980 (9.2% of draws),
    t in [0, 4] maps to 20 (0.5%) (DMD's timestep draw)."""
    ints = torch.arange(1000, dtype=torch.float32)
    table = (5.0 * (ints / 1000) / (1 + 4.0 * (ints / 1000)) * 1000).clamp(20, 980)  # every value a draw can give
    assert int((table == 980).sum()) == 92 and int((table == 20).sum()) == 5
    many = torch.cat([score_timestep([rng.generator(1, s, "t", i)], 3, shift=5.0) for s in range(50) for i in range(40)])
    assert many.shape == (2000, 3) and (many[:, 0:1] == many).all()  # the same t for every frame
    assert many.min() >= 20 and many.max() <= 980
    assert set(torch.unique(many[:, 0]).tolist()) <= set(table.tolist())
    assert abs(float((many[:, 0] == 980).float().mean()) - 0.092) < 0.025
    low = torch.cat([score_timestep([rng.generator(2, s, "t", 0)], 1, min_timestep=990, shift=5.0) for s in range(20)])
    assert (low == 980).all()  # min_score_timestep bounds the draw from below


def test_real_score_cfg_form():
    """x_real = c + g (c - u) with g = guidance_scale 3.0, i.e. standard CFG 4.0 written u + s (c - u)."""
    x, noise, t, cond, uncond = draws()
    teacher = Linear(0.5, b=1.0)
    x_t = SCHED.add_noise(x, noise, t)
    c = predict_x0(teacher, x_t, t, cond, SCHED)
    u = predict_x0(teacher, x_t, t, uncond, SCHED)
    real = real_score(teacher, x_t, t, cond, uncond, SCHED, 3.0)
    torch.testing.assert_close(real, c + 3.0 * (c - u))
    torch.testing.assert_close(real, u + 4.0 * (c - u))
    assert torch.equal(teacher.seen_t[0], t[:, 0])  # the bidirectional model gets one t per sample


def written_out_scores(x, noise, t):
    """(fake, real) x0 predictions at x_t = add_noise(x, noise, t), by hand, for the critic Linear(0.7) and the
    teacher Linear(0.3, b=1.0) (x0 = x_t - sigma * (a x_t + b * branch), branch +1 cond / -1 uncond), with the
    real score's CFG at guidance 3.0."""
    x_t = SCHED.add_noise(x, noise, t)
    sigma = SCHED.sigma(t)[..., None, None, None]
    fake = x_t - sigma * 0.7 * x_t
    c = x_t - sigma * (0.3 * x_t + 1.0)
    u = x_t - sigma * (0.3 * x_t - 1.0)
    return fake, c + 3.0 * (c - u)


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    x, noise, t, cond, uncond = draws()
    teacher, critic = Linear(0.3, b=1.0), Linear(0.7)
    x = x.requires_grad_(True)
    loss, logs = dmd_loss(x, teacher=teacher, critic=critic, cond=cond, uncond=uncond, scheduler=SCHED, t=t,
                          noise=noise, guidance_scale=3.0)
    assert loss.dtype == torch.float64
    loss.backward()
    with torch.no_grad():  # the formula, written out
        fake, real = written_out_scores(x, noise, t)
        norm = (x - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        grad = (fake - real) / norm
    assert norm[0] != norm[1]
    torch.testing.assert_close(x.grad, (grad / grad.numel()).float(), rtol=1e-5, atol=1e-9)  # dloss/dx = grad/N
    torch.testing.assert_close(loss, 0.5 * (grad.double() ** 2).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(logs["dmdtrain_gradient_norm"], grad.abs().mean().float(), rtol=1e-5, atol=0)
    assert teacher.a.grad is None and critic.a.grad is None  # scores are evaluated without gradient


def test_dmd_nan_guard():
    x, noise, t, cond, uncond = draws()
    real_equals_x = Linear(0.0)
    x0 = torch.zeros_like(x)  # normaliser |x - real| = 0 for the zero video: grad -> nan_to_num
    loss, _ = dmd_loss(x0.requires_grad_(True), teacher=real_equals_x, critic=Linear(0.1), cond=cond, uncond=uncond,
                       scheduler=SCHED, t=t, noise=torch.zeros_like(noise), guidance_scale=3.0)
    assert torch.isfinite(loss)


def test_critic_flow_loss():
    """mean((v - (eps - x))^2) with v = (x_t - x0_fake) / sigma; gradient reaches the critic, not x."""
    x, noise, t, cond, _ = draws()
    critic = Linear(0.9)
    x = x.requires_grad_(True)
    loss = critic_flow_loss(x, critic=critic, cond=cond, scheduler=SCHED, t=t, noise=noise)
    loss.backward()
    with torch.no_grad():
        x_t = SCHED.add_noise(x, noise, t)
        expected = ((0.9 * x_t - (noise - x)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert critic.a.grad is not None and x.grad is None


def test_sid_loss_formula():
    """mean[(r - f)((r - x) - alpha (r - f)) / mean|x - r|] in float64, the normaliser without gradient."""
    x, noise, t, cond, uncond = draws()
    teacher, critic = Linear(0.3, b=1.0), Linear(0.7)
    for alpha in (1.0, 0.5):
        xg = x.clone().requires_grad_(True)
        loss, _ = sid_loss(xg, teacher=teacher, critic=critic, cond=cond, uncond=uncond, scheduler=SCHED, t=t,
                           noise=noise, guidance_scale=3.0, alpha=alpha)
        assert loss.dtype == torch.float64
        gx, = torch.autograd.grad(loss, xg)

        def formula(xx, detach_norm=True):
            f, r = written_out_scores(xx, noise, t)
            n = (xx - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
            n = n.detach() if detach_norm else n
            return ((r.double() - f.double()) * ((r.double() - xx.double()) - alpha * (r.double() - f.double())) / n).mean()

        xr = x.clone().requires_grad_(True)
        expected = formula(xr)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-9)
        ref, = torch.autograd.grad(expected, xr)
        torch.testing.assert_close(gx, ref, rtol=1e-4, atol=1e-9)
        xn = x.clone().requires_grad_(True)
        with_norm_grad, = torch.autograd.grad(formula(xn, detach_norm=False), xn)
        assert not torch.allclose(gx, with_norm_grad, rtol=1e-3)  # the normaliser's gradient would matter


def test_ode_regression_loss_uses_one_index_per_chunk_and_masks_t0():
    S = 5
    ode = torch.randn(B, S, F, C, H, W, generator=torch.Generator().manual_seed(3))
    steps = torch.tensor([1000.0, 937.5, 833.3333, 625.0, 0.0])
    gen = Linear(0.0, causal=True)  # x0 = x_t: the loss is the distance of the chosen trajectory point to the end
    gens = [rng.generator(0, 0, "ode", i) for i in range(B)]
    loss = ode_regression_loss(gen, ode, torch.zeros(B, 3, 5), timesteps=steps, scheduler=SCHED, gens=gens)
    t = gen.seen_t[0]  # [B, F]: per-frame timesteps, constant within each chunk of 3
    assert t.shape == (B, F) and (t[:, :3] == t[:, :1]).all() and (t[:, 3:] == t[:, 3:4]).all()
    index = torch.stack([(steps[None, :] - t[b][:, None]).abs().argmin(1) for b in range(B)])  # [B, F]
    picked = torch.stack([ode[b, index[b], torch.arange(F)] for b in range(B)])  # [B, F, C, H, W]
    mask = t != 0
    expected = ((picked - ode[:, -1]) ** 2)[mask].mean() if mask.any() else torch.tensor(float("nan"))
    torch.testing.assert_close(loss, expected)
    gens = [rng.generator(0, s, "ode", 0) for s in range(60)]  # every index of the list is drawn
    seen = set()
    for g in gens:
        gen.seen_t.clear()
        ode_regression_loss(gen, ode[:1], torch.zeros(1, 3, 5), timesteps=steps, scheduler=SCHED, gens=[g])
        seen |= set(gen.seen_t[0].flatten().tolist())
    assert seen == set(steps.tolist())


def test_diffusion_loss_weighting():
    x0 = torch.randn(B, F, C, H, W, generator=torch.Generator().manual_seed(4))
    model = Linear(0.0)  # predicts zero flow: per-frame loss = mean((eps - x0)^2)
    gens = [rng.generator(0, 0, "diffusion", i) for i in range(B)]
    loss = diffusion_loss(model, x0, torch.zeros(B, 3, 5), scheduler=SCHED, gens=gens)
    t = model.seen_t[0]  # [B] (bidirectional: one t per sample)
    gens = [rng.generator(0, 0, "diffusion", i) for i in range(B)]
    torch.stack([torch.randint(0, 1000, (1,), generator=g) for g in gens])  # the index draw comes first
    noise = rng.randn(gens, x0.shape[1:], device="cpu")
    per_frame = ((noise - x0) ** 2).mean(dim=(2, 3, 4))
    w = SCHED.training_weight(t)[:, None].float()
    torch.testing.assert_close(loss, (per_frame * w).mean(), rtol=1e-5, atol=1e-7)
    assert set(t.tolist()) <= set(SCHED.timesteps.float().tolist())
    assert 2.0 < float(SCHED.training_weight(torch.tensor(500.0))) < 2.1  # the bump's maximum (about 2.076)


def test_score_timestep_without_shift():
    """timestep_shift <= 1 leaves the integer draw as it is, only clamped."""
    t = score_timestep([rng.generator(0, s, "t", 0) for s in range(200)], 2, shift=1.0)
    assert (t == t.round()).all() and t.min() >= 20 and t.max() <= 980 and t.max() > 900


def test_diffusion_loss_uniform_weighting_is_the_plain_mean():
    """weighting="uniform": the same draws as the bump's, every frame's MSE counted alike."""
    x0 = torch.randn(B, F, C, H, W, generator=torch.Generator().manual_seed(4))
    model = Linear(0.0)  # predicts zero flow: per-frame loss = mean((eps - x0)^2)
    gens = [rng.generator(0, 0, "diffusion", i) for i in range(B)]
    uniform = diffusion_loss(model, x0, torch.zeros(B, 3, 5), scheduler=SCHED, gens=gens, weighting="uniform")
    gens = [rng.generator(0, 0, "diffusion", i) for i in range(B)]
    torch.stack([torch.randint(0, 1000, (1,), generator=g) for g in gens])  # the index draw comes first
    noise = rng.randn(gens, x0.shape[1:], device="cpu")
    torch.testing.assert_close(uniform, ((noise - x0) ** 2).mean(dim=(2, 3, 4)).mean(), rtol=1e-5, atol=1e-7)
    gens = [rng.generator(0, 0, "diffusion", i) for i in range(B)]
    bump = diffusion_loss(model, x0, torch.zeros(B, 3, 5), scheduler=SCHED, gens=gens)
    assert abs(float(bump.detach()) - float(uniform.detach())) > 1e-4  # the bump weights the same draws otherwise
