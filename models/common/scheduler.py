"""The flow-matching schedule of Wan / Self-Forcing (their `utils/scheduler.py`).

Training grid: s_i = 1 - i/1000 for i = 0..999, sigma_i = shift * s_i / (1 + (shift - 1) * s_i),
t_i = 1000 * sigma_i. With shift 5: t_0 = 1000, t_999 = 4.98 (the grid never reaches 0). The grid is computed
in float32, in the researchers' order of operations (their `FlowMatchScheduler.set_timesteps`), and kept as
float64 (an exact widening): with shift 5, 464 of the 1000 timesteps differ by one float32 step from the
exactly rounded float64 formula, and training and inference use the researchers' values.

- x_t = (1 - sigma) x0 + sigma * noise; the model predicts the flow v = noise - x0; x0 = x_t - sigma * v.
- `add_noise` and the x0 / flow conversions take sigma at the grid timestep nearest to t, as the
  researchers' wrapper does.
- Warped denoising steps: [1000, 750, 500, 250] -> grid indices 1000 - step = [0, 250, 500, 750]
  -> t = [1000.0, 937.5, 833.333, 625.0].
"""

from __future__ import annotations

import torch

from models.errors import ModelInputError


class FlowMatchScheduler:
    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        if shift <= 0:
            raise ModelInputError(f"timestep shift {shift} must be positive")
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        s = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
        sigmas = shift * s / (1 + (shift - 1) * s)  # float32, as the researchers' scheduler computes it
        self.sigmas = sigmas.double()  # [1000] float64 holding the float32 values
        self.timesteps = (sigmas * num_train_timesteps).double()  # [1000] float64 holding the float32 values
        self._on_device: dict = {}

    def warp(self, denoising_step_list) -> torch.Tensor:
        """Self-Forcing's `warp_denoising_step`: config steps -> grid timesteps (float32, as the DiT sees them).
        Step s is grid point 1000 - s; step 0 is the 0 appended after the grid, as their code appends it (their
        training pipeline then drops a trailing 0; their inference runs it, a forward at t = 0)."""
        steps = torch.as_tensor(list(denoising_step_list), dtype=torch.long)
        n = self.num_train_timesteps
        if ((steps < 0) | (steps > n)).any():
            raise ModelInputError(f"denoising steps {steps.tolist()} must lie in 0..{n} to be warped")
        grid = torch.cat([self.timesteps, torch.zeros(1, dtype=torch.float64)])
        return grid[n - steps].to(torch.float32)

    def denoising_timesteps(self, denoising_step_list, warp: bool = True) -> torch.Tensor:
        """The few-step sampler's timesteps from a config's `denoising_step_list`: warped onto the shifted grid
        (`warp_denoising_step: true`, every Self-Forcing config) or, unwarped, the steps themselves as timesteps
        (float32 [S])."""
        if warp:
            return self.warp(denoising_step_list)
        steps = torch.as_tensor(list(denoising_step_list), dtype=torch.float32)
        if ((steps < 0) | (steps > self.num_train_timesteps)).any():
            raise ModelInputError(f"denoising steps {steps.tolist()} must lie in 0..{self.num_train_timesteps}")
        return steps

    def _grid(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) on a device, copied once (a host-to-device copy per call would stall the GPU)."""
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = (self.timesteps.to(device), self.sigmas.to(device))
        return self._on_device[key]

    def sigma(self, t) -> torch.Tensor:
        """sigma at the grid timestep nearest to each t (float64, same shape as t, on t's device)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        timesteps, sigmas = self._grid(t.device)
        idx = (timesteps[None, :] - t.reshape(-1, 1)).abs().argmin(dim=1)
        return sigmas[idx].reshape(t.shape)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma noise; t is a scalar or has the leading dims of x0 ([B] or [B, F])."""
        sigma = _expand(self.sigma(_on(t, x0)), x0)
        return ((1 - sigma) * x0.double() + sigma * noise.double()).to(x0.dtype)

    def x0_from_flow(self, flow: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        sigma = _expand(self.sigma(_on(t, x_t)), x_t)
        return (x_t.double() - sigma * flow.double()).to(x_t.dtype)

    def flow_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        sigma = _expand(self.sigma(_on(t, x_t)), x_t)
        return ((x_t.double() - x0.double()) / sigma).to(x_t.dtype)

    @staticmethod
    def training_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def training_weight(self, t) -> torch.Tensor:
        """The diffusion trainer's Gaussian bump over the grid, normalised to mean 1 (max about 2.076)."""
        n = self.num_train_timesteps
        bump = torch.exp(-2 * ((self.timesteps - n / 2) / n) ** 2)  # over the timestep values, as upstream
        weights = bump - bump.min()
        weights = weights * (n / weights.sum())
        t = torch.as_tensor(t, dtype=torch.float64)
        idx = (self.timesteps[None, :] - t.reshape(-1, 1)).abs().argmin(dim=1)
        return weights[idx].reshape(t.shape)


def _on(t, like: torch.Tensor) -> torch.Tensor:
    """t as a float64 tensor on the device of `like`."""
    return torch.as_tensor(t, dtype=torch.float64, device=like.device)


def _expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast sigma ([], [B] or [B, F]) over the trailing dims of `like` ([B, F, C, H, W] or [B, C, F, H, W])."""
    return sigma.reshape(sigma.shape + (1,) * (like.ndim - sigma.ndim))
