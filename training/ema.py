"""Exponential moving average of the generator (the researchers' EMA_FSDP): a float32 shadow of every
trainable parameter, shadow <- decay * shadow + (1 - decay) * param after each generator step.

The trainer creates it once step >= ema_start_step (from the parameters at that moment) and saves it as
`generator_ema` once step > ema_start_step. Under FSDP each rank keeps the shadow of its own shards.
"""

from __future__ import annotations

import torch

from training.distributed import full_tensor, like_param


class EMA:
    """named_params: (name, parameter) pairs as the optimiser holds them (the sharded parameters under FSDP)."""

    def __init__(self, named_params, decay: float):
        self.decay = decay
        self.params = [(n, p) for n, p in named_params if p.requires_grad]
        with torch.no_grad():
            self.shadow = {n: p.detach().clone().float() for n, p in self.params}

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- d * shadow + (1 - d) * param, as the per-tensor mul_/add_ the researchers' EMA does, but in
        two foreach calls over the local shards (one dispatch instead of two per parameter: on the zoo's tiny
        models the per-parameter calls cost more than the whole forward)."""
        d = self.decay
        shadows = [_local(self.shadow[n]) for n, _ in self.params]
        params = [_local(p.detach()).float() for _, p in self.params]
        torch._foreach_mul_(shadows, d)
        torch._foreach_add_(shadows, params, alpha=1.0 - d)

    def full_state_dict(self) -> dict:
        """{name: full float32 tensor on the CPU}; every rank must call it (it gathers shards)."""
        return {n: full_tensor(s).cpu() for n, s in self.shadow.items()}

    @torch.no_grad()
    def load_full(self, state_dict: dict) -> None:
        for n, s in self.shadow.items():
            s.copy_(like_param(state_dict[n].float(), s))


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters and their shadows), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
