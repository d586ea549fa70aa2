"""Exponential moving average of the generator (the researchers' EMA_FSDP): a float32 shadow of every
trainable parameter, shadow <- decay * shadow + (1 - decay) * param after each generator step.

The trainer creates it once step >= ema_start_step (from the parameters at that moment) and saves it as
`generator_ema` once step > ema_start_step. Under FSDP each rank keeps the shadow of its own shards.
"""

from __future__ import annotations

import torch

from training.distributed import full_tensor, like_param, local_tensor


class EMA:
    """named_params: (name, parameter) pairs as the optimiser holds them (the sharded parameters under FSDP)."""

    def __init__(self, named_params, decay: float):
        self.decay = decay
        self.params = [(n, p) for n, p in named_params if p.requires_grad]
        with torch.no_grad():
            self.shadow = {n: p.detach().clone().float() for n, p in self.params}
        self._shadows = [local_tensor(self.shadow[n]) for n, _ in self.params]  # updated in place, never replaced

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- d * shadow + (1 - d) * param, as the per-tensor mul_/add_ the researchers' EMA does, but in
        two foreach calls over the local shards (one dispatch instead of two per parameter: on the zoo's tiny
        models the per-parameter calls cost more than the whole forward). The parameters' local tensors are read
        each time (FSDP may swap a parameter's local tensor, e.g. when a state dict loads), without detach or
        to_local (no autograd here), and cast to float32 only if they are not (a float32 `.float()` is itself)."""
        d = self.decay
        params = [local_tensor(p).float() for _, p in self.params]
        torch._foreach_mul_(self._shadows, d)
        torch._foreach_add_(self._shadows, params, alpha=1.0 - d)

    def full_state_dict(self) -> dict:
        """{name: full float32 tensor on the CPU}; every rank must call it (it gathers shards)."""
        return {n: full_tensor(s).cpu() for n, s in self.shadow.items()}

    @torch.no_grad()
    def load_full(self, state_dict: dict) -> None:
        for n, s in self.shadow.items():
            s.copy_(like_param(state_dict[n].float(), s))

