"""The flow-matching scheduler of models/common/scheduler.py against its grid written out: the researchers' float32
grid, sigma at the nearest grid timestep, add_noise and the x0/flow conversions rounded once from float64, the
training weight at every grid timestep."""

import numpy as np
import torch

from models.common.scheduler import FlowMatchScheduler


def numpy_grid(shift: float):
    """(timesteps, sigmas) of the researchers' float32 grid (their `set_timesteps`: torch.linspace in float32),
    written out, as float64 numpy arrays."""
    s = torch.linspace(1.0, 0.0, 1001, dtype=torch.float32)[:-1]
    sig = shift * s / (1 + (shift - 1) * s)
    assert sig.dtype == torch.float32
    return (sig * 1000).double().numpy(), sig.double().numpy()


def test_sigma_takes_the_nearest_grid_timestep_off_the_grid():
    """Score timesteps (DMD, SiD, critic) are off the grid: sigma is that of the NEAREST grid timestep, on either
    side (not the grid point at or below t, nor above)."""
    s = FlowMatchScheduler(5.0)
    ts, sig = numpy_grid(5.0)
    k = np.arange(100, 990, 37)
    below = ts[k] - 0.3 * (ts[k] - ts[k + 1])  # nearer grid point k (above t)
    above = ts[k + 1] + 0.3 * (ts[k] - ts[k + 1])  # nearer grid point k + 1 (below t)
    t = np.concatenate([below, above, [400.0, 900.0, 123.4]])
    expected = sig[np.abs(ts[None, :] - t[:, None]).argmin(1)]
    got = s.sigma(torch.tensor(t)).numpy()
    np.testing.assert_array_equal(got, expected)
    assert (got[: len(k)] == sig[k]).all() and (got[len(k): 2 * len(k)] == sig[k + 1]).all()


def test_the_grid_is_the_float32_one_not_the_float64_formula():
    """The module's claim: the grid is computed in float32 (464 of 1000 shift-5 timesteps differ by one float32 step
    from the exactly rounded float64 formula)."""
    s = FlowMatchScheduler(5.0)
    ts, sig = numpy_grid(5.0)
    np.testing.assert_array_equal(s.timesteps.numpy(), ts)
    np.testing.assert_array_equal(s.sigmas.numpy(), sig)
    u = 1.0 - np.arange(1000) / 1000.0
    exact = (5.0 * u / (1 + 4.0 * u) * 1000).astype(np.float32).astype(np.float64)
    assert int((s.timesteps.numpy() != exact).sum()) > 100


def test_add_noise_and_conversions_round_once_in_bf16():
    """bf16 latents (the training dtype): x_t, x0 and the flow are the float64 formulas rounded once to bf16 (a bf16
    sigma would move x_t by up to ~0.4%)."""
    s = FlowMatchScheduler(5.0)
    ts, sig = numpy_grid(5.0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 16, 8, generator=g).bfloat16(), torch.randn(3, 2, 16, 8, generator=g).bfloat16()
    t = torch.tensor([[937.5, 937.5], [400.0, 400.0], [30.0, 30.0]])
    sg = torch.tensor(sig[np.abs(ts[None, :] - t.reshape(-1, 1).numpy()).argmin(1)]).reshape(3, 2, 1, 1)
    expected = ((1 - sg) * x0.double() + sg * noise.double()).bfloat16()
    xt = s.add_noise(x0, noise, t)
    assert xt.dtype == torch.bfloat16 and torch.equal(xt, expected)
    flow = (noise.double() - x0.double()).bfloat16()
    assert torch.equal(s.x0_from_flow(flow, xt, t), (xt.double() - sg * flow.double()).bfloat16())
    assert torch.equal(s.flow_from_x0(x0, xt, t), ((xt.double() - x0.double()) / sg).bfloat16())


def test_training_weight_is_the_normalised_bump_at_every_grid_timestep():
    """w(t_i) = (b_i - min b) * 1000 / sum(b - min b), b_i = exp(-2 ((t_i - 500) / 1000)^2), at every grid index
    (t = 1000, the bump's minimum, included: weight exactly 0)."""
    s = FlowMatchScheduler(5.0)
    ts, _ = numpy_grid(5.0)
    b = np.exp(-2 * ((ts - 500) / 1000) ** 2)
    w = (b - b.min()) * 1000 / (b - b.min()).sum()
    got = s.training_weight(torch.tensor(ts)).numpy()
    np.testing.assert_allclose(got, w, rtol=1e-12, atol=1e-12)
    assert got[0] == 0.0 and abs(got.mean() - 1) < 1e-12
