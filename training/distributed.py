"""One training process per GPU (torchrun) or one CPU process (gloo), always through PyTorch FSDP2.

`setup()` joins the process group torchrun describes (env://), or makes a one-process group (gloo on the CPU,
NCCL on a GPU), so the trainer runs the same code everywhere. `shard()` applies `fully_shard` to every
transformer block and then to the model: parameters stay float32 (the optimiser's master copy) and, on a GPU
with `mixed_precision`, are gathered as bf16 for compute with gradients reduced in float32 (the researchers'
FSDP MixedPrecision). Inputs are not cast (`cast_forward_inputs=False`): timesteps like 937.5 are not bf16
numbers. The researchers' `sharding_strategy` (hybrid_full, full, ...) and `*_fsdp_wrap_strategy` values are
accepted; on one node every strategy shards over all ranks, block by block.

Full state dicts (for checkpoints) are gathered on rank 0 on the CPU; `load_full` puts a full state dict
(present on every rank) into the shards.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from training.errors import TrainingError

SHARDING_STRATEGIES = ("full", "hybrid_full", "hybrid_zero2", "no_shard")
WRAP_STRATEGIES = ("size", "transformer")


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_list(self, values: list[int]) -> list[int]:
        """Rank 0's values on every rank."""
        t = torch.tensor(values, dtype=torch.long, device=self.device)
        dist.broadcast(t, src=0)
        return t.tolist()

    def mean(self, value: float) -> float:
        """The mean of a float over ranks."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world


def setup(device: str | None = None) -> Dist:
    """Join (or make) the process group and pick this rank's device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {device!r}: CUDA is not available here; use device: cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def check_strategies(cfg) -> None:
    if cfg.sharding_strategy not in SHARDING_STRATEGIES:
        raise TrainingError(f"sharding_strategy {cfg.sharding_strategy!r}; use one of {list(SHARDING_STRATEGIES)}")
    for name in ("generator", "real_score", "fake_score", "text_encoder"):
        value = cfg[f"{name}_fsdp_wrap_strategy"]
        if value not in WRAP_STRATEGIES:
            raise TrainingError(f"{name}_fsdp_wrap_strategy {value!r}; use one of {list(WRAP_STRATEGIES)}")


def shard(model: torch.nn.Module, d: Dist, *, mixed_precision: bool) -> torch.nn.Module:
    """fully_shard every block (and every module the model lists in `fsdp_units`: modules it calls outside its
    own forward), then the model (in place; returns it)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision and d.device.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
    else:
        policy = MixedPrecisionPolicy(cast_forward_inputs=False)
    model.to(d.device)
    # the blocks return views (x.view(...).to(dtype)); nothing modifies them in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in [*model.blocks, *getattr(model, "fsdp_units", ())]:  # (fsdp_units: e.g. training/gan.py's branch)
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def reshard(model) -> None:
    """Free gathered parameters and register the shards again (a no-grad forward leaves the root gathered)."""
    from torch.distributed.fsdp import FSDPModule

    if model is not None:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def full_state_dict(model: torch.nn.Module) -> dict:
    """The whole model's state dict on rank 0 (CPU); empty on other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full(model: torch.nn.Module, state_dict: dict) -> None:
    """Load a full state dict that every rank holds into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=True))


def optimizer_state(named_params, optimizer) -> dict:
    """{"state": {name: {key: full tensor on the CPU}}, "param_groups": hyperparameters}: the optimiser's state
    by parameter name, shards gathered (every rank must call it). Parameters that never had a gradient have no
    state, and none is invented for them (so a resumed AdamW matches the uninterrupted one bitwise)."""
    state = {}
    for name, p in named_params:
        if p in optimizer.state and optimizer.state[p]:
            state[name] = {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(named_params, optimizer, saved: dict) -> None:
    """Put a state written by `optimizer_state` back (each rank takes its shards)."""
    for name, p in named_params:
        if name in saved["state"]:
            optimizer.state[p] = {k: (like_param(v, p) if torch.is_tensor(v) and v.dim() > 0 else
                                      (v.clone() if torch.is_tensor(v) else v))
                                  for k, v in saved["state"][name].items()}
    for group, hyper in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(hyper)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like_param(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out as `param` (the local shard of a DTensor parameter)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)
    return full.to(param.device)


def set_gradient_sync(model, enabled: bool) -> None:
    """Skip the gradient reduce-scatter on all but the last micro-batch of an accumulation."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
