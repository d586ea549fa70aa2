"""One training process per GPU (torchrun) or one CPU process (gloo), always through PyTorch FSDP2.

`setup()` joins the process group torchrun describes (env://), or makes a one-process group (gloo on the CPU,
NCCL on a GPU), so the trainer runs the same code everywhere. `shard()` applies `fully_shard` to every
transformer block and then to the model (on one rank: to the model only, see `shard`): parameters stay float32
(the optimiser's master copy) and, on a GPU with `mixed_precision`, are gathered as bf16 for compute with
gradients reduced in float32 (the researchers' FSDP MixedPrecision). Inputs are not cast
(`cast_forward_inputs=False`): timesteps like 937.5 are not bf16 numbers. The researchers' `sharding_strategy`
(hybrid_full, full, ...) and `*_fsdp_wrap_strategy` values are accepted; on one node every strategy shards over
all ranks, block by block.

`ShardAdamW` is torch's AdamW stepping the parameters' local shards as plain tensors (the same arithmetic
without DTensor's per-op dispatch); `Dist.mean` and `Dist.broadcast_list` skip the collective on one rank. These
three cut the host time of a step of the zoo's tiny DiTs (bench/bench_zoo_step.py) and change no number.

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
    owns_group: bool = False  # `setup` made the process group (a caller's own group is left to the caller)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mesh(self):
        """The 1-D device mesh of every rank on this rank's device type, for `fully_shard`. Without one, FSDP builds
        its mesh on the machine's accelerator whenever there is one, and a `device: cpu` run on a GPU machine had
        its weights moved to CUDA while its inputs stayed on the CPU."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world,))

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast_list(self, values: list[int]) -> list[int]:
        """Rank 0's values on every rank (one rank: the values, without a device round trip)."""
        if self.world == 1:
            return [int(v) for v in values]
        t = torch.tensor(values, dtype=torch.long, device=self.device)
        dist.broadcast(t, src=0)
        return t.tolist()

    def mean(self, value: float) -> float:
        """The mean of a float over ranks (one rank: the float itself, as the float64 all-reduce returns it)."""
        if self.world == 1:
            return float(value)
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world


def setup(device: str | None = None) -> Dist:
    """Join (or make) the process group and pick this rank's device."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {device!r}: CUDA is not available here; use --device cpu (or device: cpu in "
                            "the config)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=owns)


def check_strategies(cfg) -> None:
    if cfg.sharding_strategy not in SHARDING_STRATEGIES:
        raise TrainingError(f"sharding_strategy {cfg.sharding_strategy!r}; use one of {list(SHARDING_STRATEGIES)}")
    for name in ("generator", "real_score", "fake_score", "text_encoder"):
        value = cfg[f"{name}_fsdp_wrap_strategy"]
        if value not in WRAP_STRATEGIES:
            raise TrainingError(f"{name}_fsdp_wrap_strategy {value!r}; use one of {list(WRAP_STRATEGIES)}")


def shard(model: torch.nn.Module, d: Dist, *, mixed_precision: bool, per_block: bool | None = None) -> torch.nn.Module:
    """fully_shard every block (and every module the model lists in `fsdp_units`: modules it calls outside its
    own forward), then the model (in place; returns it).

    per_block None: per block on several ranks, the model as one unit on one. On one rank a block's unit saves
    no memory (nothing is sharded) but costs host time in every forward and backward: hooks, a gather (a bf16
    cast with mixed precision) and a reduction per block, each a collective. As one unit the model's pre-forward
    gathers every parameter at once (the same float32 -> bf16 cast of each element), they stay gathered through
    the backward (the root unit does not reshard after its forward), and one reduction after the backward casts
    every bf16 gradient to float32 (the same cast, elementwise). What a block's unit did to the arithmetic is
    kept: its pre-forward passes the block's inputs that need gradient through one identity autograd node
    (FSDP's RegisterPostBackwardFunction), which sets the order in which the gradients several blocks send to one
    tensor (the text embedding's output) are summed; `_BlockInputs` puts the same node there, so the sums, and
    the weights, are bit for bit those of the per-block units (tests/test_training_fsdp.py checks weights, EMA
    and AdamW state after a few DMD and diffusion steps, with and without activation checkpointing).
    `fsdp_units` stay units of their own (their hooks gather them when they are called outside the forward)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if per_block is None:
        per_block = d.world > 1 or not _BlockInputs.works()
    policy = MixedPrecisionPolicy(cast_forward_inputs=False, **mixed_precision_dtypes(mixed_precision, d.device))
    model.to(d.device)
    mesh = d.mesh()
    # the blocks return views (x.view(...).to(dtype)); nothing modifies them in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    units = [*model.blocks] if per_block else []
    for unit in [*units, *getattr(model, "fsdp_units", ())]:  # (fsdp_units: e.g. training/gan.py's branch)
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    if not per_block:
        for block in model.blocks:
            block.register_forward_pre_hook(_BlockInputs.pre_forward, prepend=True, with_kwargs=True)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    init_now(model)
    return model


def mixed_precision_dtypes(mixed_precision: bool, device: torch.device) -> dict:
    """FSDP's compute and gradient-reduction dtypes: bf16 compute with float32 reductions on a GPU with
    `mixed_precision`; otherwise the parameters' own dtype."""
    if mixed_precision and device.type == "cuda":
        return {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32}
    return {}


def init_now(model: torch.nn.Module) -> None:
    """FSDP's lazy initialisation, now instead of at the first forward. It fixes each unit's gradient-reduction
    dtype from the parameters that require grad at that moment, and none does when they are frozen: a unit whose
    first forward ran frozen (the GAN trainer's discriminator step rolls the generator out with its weights
    frozen; its warm-up freezes the discriminator's backbone) later assigned bf16 gradients to float32 parameters
    and failed. Here every parameter is as the caller set it before sharding (trainable models: all). Private
    API (`_get_fsdp_state()._lazy_init`, idempotent); a torch without it keeps the lazy initialisation."""
    init = getattr(getattr(model, "_get_fsdp_state", lambda: None)(), "_lazy_init", None)
    if init is not None:
        init()


class _BlockInputs:
    """The identity autograd node a per-block FSDP unit puts on a block's inputs, without the unit.

    FSDP2's pre-forward passes the tensors among a unit's inputs that need gradient through one
    `RegisterPostBackwardFunction` node (whose backward reduces the unit's gradients). The node is an identity
    but a node of the graph: autograd sums the gradients a tensor receives from several blocks one block at a
    time through it, in another order than without it. `pre_forward` runs FSDP's own method (so its choice of
    tensors, which differs between torch versions, is kept) with a group whose post-backward does nothing: the
    model's one unit reduces every gradient after the backward. `hook` is None where this torch's FSDP has no
    such method; `shard` then keeps the per-block units."""

    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup as _Group

        hook = _Group._register_post_backward_hook
        del _Group
    except (ImportError, AttributeError):
        hook = None

    @staticmethod
    def post_backward(*_args, **_kwargs) -> None:
        """The node's backward: nothing (the gradients pass on; the model's unit reduces them later)."""

    @classmethod
    def pre_forward(cls, module, args, kwargs):
        return cls.hook(cls, args, kwargs)

    @classmethod
    def works(cls) -> bool:
        """Whether this torch's private method runs with this class as its group: one identity forward and
        backward on a scalar. A torch whose method reads other attributes of its group fails here, at shard time,
        and `shard` keeps the per-block units instead of failing in the first training step."""
        if cls.hook is None:
            return False
        try:
            x = torch.ones(2, requires_grad=True)
            (y,), _ = cls.pre_forward(None, (x,), {})
            (y * 3.0).sum().backward()
            return x.grad is not None and bool((x.grad == 3.0).all())
        except Exception:  # noqa: BLE001 - any failure means: do not use it
            return False


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


ADAMW_IMPLS = ("loop", "foreach", "fused")


class ShardAdamW(torch.optim.AdamW):
    """torch.optim.AdamW that steps the local shards of DTensor (FSDP2) parameters as plain tensors.

    AdamW is elementwise, so a step of a DTensor is the step of its local tensor: DTensor's dispatch runs each aten
    op on `_local_tensor` with the same scalars. Here the lists torch's `_init_group` collects (parameters,
    gradients, moments) are replaced by their local tensors before torch's own `adam` runs, which skips DTensor's
    Python dispatch of ~8 ops per parameter (on the zoo's DiTs, 177 parameters, a fifth of a step's host time).
    The state stays as torch makes it (DTensor moments keyed by the sharded parameters), so `optimizer_state` and
    checkpoints do not change.

    impl "loop" (the default): torch's per-tensor loop, which AdamW picks for DTensor parameters (they are not
    foreach-able), so the numbers are today's bit for bit on any device. "foreach" / "fused": torch's multi-tensor
    and fused kernels (far fewer launches on a GPU); on CUDA they may differ from the loop in the last bit
    (another order of the same operations), so they are opt-in (`adamw_impl`)."""

    def __init__(self, params, *, impl: str = "loop", **hyper):
        if impl not in ADAMW_IMPLS:
            raise TrainingError(f"adamw_impl {impl!r}; use one of {list(ADAMW_IMPLS)}")
        # foreach=False, not None: on plain CUDA tensors torch would default to foreach
        super().__init__(params, foreach=impl == "foreach", fused=True if impl == "fused" else None, **hyper)

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps):
        if group["fused"] or group["capturable"]:  # their step counters live on the device (a resume reads them
            for p in group["params"]:             # back onto the CPU: training/distributed.py load_optimizer_state)
                step = self.state.get(p, {}).get("step")
                if step is not None and step.device != p.device:
                    self.state[p]["step"] = step.to(p.device)
        has_complex = super()._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        for tensors in (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs):
            tensors[:] = [local_tensor(t) for t in tensors]
        return has_complex


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself, not a view made through autograd), else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


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
