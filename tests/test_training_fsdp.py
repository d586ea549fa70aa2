"""FSDP on the CPU: 2 gloo processes (torchrun, micro-batch 1 each) give the losses of 1 process accumulating
2 micro-batches (the same global batch of 2). The 2-process run also has activation checkpointing on and
attention probes (collective forwards on both ranks, rank 0 writes), neither of which may change the losses
(both runs take the text keys/values' gradient from the first forward only: with the researchers' default it
follows checkpointing, docs/training.md; the text parameters then get zero gradients, on sharded parameters
here, whenever the exit step is not 0). Run as a script, this file is the torchrun worker.

One process also takes a faster path (training/distributed.py: the model as one FSDP unit, AdamW on the local
shards, no collectives for logged means): after a few DMD and diffusion steps its weights, EMA and optimiser
state equal bit for bit those of the per-block units with torch's AdamW on the DTensor parameters."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

OVERRIDES = ["dfake_gen_update_ratio=1", "total_batch_size=2", "batch_size=1", "ema_start_step=1", "log_iters=100",
             "text_kv_gradient=first_forward"]
STEPS = 3


def test_two_process_fsdp_matches_one_process(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_training import losses, make
    from two_ranks import report, torchrun

    from models.wan.checkpoint import load_tensors

    # (tests/conftest.py put this tree first on PYTHONPATH; two_ranks runs each rank on one thread)
    done = torchrun([__file__, tmp_path / "two"], fresh=[tmp_path / "two"], timeout=600,
                    cwd=Path(__file__).parents[1])
    assert done.returncode == 0, report(done)
    two = json.loads((tmp_path / "two" / "history.json").read_text())
    assert two["world"] == 2 and two["accum"] == 1
    from workbench.store import open_store

    assert open_store(tmp_path / "two" / "probes.zarr")["train_step"].values.tolist() == [0, 2]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = make(tmp_path / "one", *OVERRIDES)
        assert one.plan.accum == 2 and one.d.world == 1
        one.train(STEPS)
    finally:
        torch.set_num_threads(threads)
    rows_one, rows_two = losses(one.history), two["history"]
    assert [r.keys() for r in rows_one] == [r.keys() for r in rows_two]
    for r1, r2 in zip(rows_one, rows_two):
        for key in r1:
            assert r2[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-7), (r1["step"], key)
    a = load_tensors(tmp_path / "one" / f"checkpoint_model_{STEPS:06d}" / "model.pt")
    b = load_tensors(tmp_path / "two" / f"checkpoint_model_{STEPS:06d}" / "model.pt")
    for key in ("generator", "critic", "generator_ema"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-4, atol=1e-6, msg=f"{key} {name}")


def reference_path(monkeypatch) -> None:
    """The path before the single-rank speed-ups: every block its own FSDP unit, torch's AdamW on DTensors."""
    from functools import partial

    from training import distributed as fsdp

    monkeypatch.setattr(fsdp, "shard", partial(fsdp.shard, per_block=True))
    monkeypatch.setattr(fsdp, "ShardAdamW", lambda params, impl, **hyper: torch.optim.AdamW(params, **hyper))


def trained_state(tr) -> dict:
    """{model/name: full tensor} of the generator, critic, EMA and both optimisers' states, after training."""
    from training import distributed as fsdp

    out = {}
    fsdp.reshard(tr.generator)
    for key, model in (("generator", tr.generator), ("critic", tr.critic)):
        if model is not None:
            out.update({f"{key}/{n}": v for n, v in fsdp.full_state_dict(model).items()})
    out.update({f"ema/{n}": v for n, v in tr.ema.full_state_dict().items()})
    for key, params, opt in (("gen_opt", tr.gen_params, tr.gen_opt), ("critic_opt", tr.critic_params, tr.critic_opt)):
        if opt is not None:
            state = fsdp.optimizer_state(params, opt)["state"]
            out.update({f"{key}/{n}/{k}": v for n, s in state.items() for k, v in s.items()})
    return out


@pytest.mark.parametrize("overrides,units", [
    (("dfake_gen_update_ratio=1", "total_batch_size=2"), 1),  # DMD (rollouts), 2 micro-batches: one unit
    (("trainer=diffusion", "causal=false", "total_batch_size=2", "batch_size=2"), 1),  # the zoo teacher's trainer
    (("dfake_gen_update_ratio=1", "total_batch_size=2", "gradient_checkpointing=true"), 1),
], ids=["dmd", "diffusion", "dmd-checkpointing"])
def test_single_rank_fast_path_equals_the_per_block_path_bitwise(tmp_path, monkeypatch, overrides, units):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_training import losses, make

    from training.data import LatentDataset, synthetic_latents
    from torch.distributed.fsdp import FSDPModule

    def run(name: str) -> tuple[dict, list]:
        data = None
        if "trainer=diffusion" in overrides:
            data = LatentDataset(*synthetic_latents(8, 6, 16, 4, 6, seed=0), "latents", seed=7)
        tr = make(tmp_path / name, "gradient_checkpointing=false", *overrides, "ema_start_step=1", "log_iters=100",
                  data=data)
        units = sum(isinstance(m, FSDPModule) for m in tr.generator.modules())
        tr.train(STEPS, save_at_end=False)
        return trained_state(tr), losses(tr.history), units

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fast, fast_rows, fast_units = run("fast")
        with monkeypatch.context() as m:
            reference_path(m)
            ref, ref_rows, ref_units = run("reference")
    finally:
        torch.set_num_threads(threads)
    assert (fast_units, ref_units) == (units, 1 + 2)  # tiny_model: 2 blocks
    assert fast_rows == ref_rows
    assert fast.keys() == ref.keys() and any(k.startswith("gen_opt/") for k in fast)
    for key in ref:
        assert torch.equal(fast[key], ref[key]), key
    first = next(k for k in ref if k.startswith("generator/"))
    assert not torch.equal(fast[first], fast[f"ema/{first.split('/', 1)[1]}"])  # they trained: the EMA lags


def test_adamw_foreach_and_fused_are_close_to_the_loop(tmp_path):
    """The opt-in multi-tensor and fused AdamW (adamw_impl) train to the loop's weights up to rounding."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_training import make, params

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for impl in ("loop", "foreach", "fused"):
            tr = make(tmp_path / impl, "dfake_gen_update_ratio=1", f"adamw_impl={impl}", "log_iters=100")
            tr.train(2, save_at_end=False)
            assert tr.gen_opt.param_groups[0]["foreach"] == (impl == "foreach")
            assert bool(tr.gen_opt.param_groups[0]["fused"]) == (impl == "fused")
            runs[impl] = params(tr.generator)
    finally:
        torch.set_num_threads(threads)
    start = params(make(tmp_path / "start").generator)
    for impl in ("foreach", "fused"):
        for name, ref in runs["loop"].items():
            torch.testing.assert_close(runs[impl][name], ref, rtol=1e-5, atol=1e-6, msg=f"{impl} {name}")
    assert any(not torch.equal(runs["loop"][n], start[n]) for n in start)


def worker(logdir: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).parent))
    from test_training import losses, make

    torch.set_num_threads(1)
    tr = make(Path(logdir), *OVERRIDES, "gradient_checkpointing=true", "probe.every=2", "probe.prompts=[a red car]",
              "probe.layers=[0]", probe=True)
    tr.train(STEPS)
    if tr.d.main:
        out = {"world": tr.d.world, "accum": tr.plan.accum, "history": losses(tr.history)}
        (Path(logdir) / "history.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()
    # out without the interpreter's teardown: once under a loaded CI machine a rank aborted there, after its work
    # ("terminate called without an active exception", a C++ thread of the gloo group still joinable); what this
    # test compares is written above
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    worker(sys.argv[1])


def test_single_rank_fast_path_checks_the_private_hook_before_use(monkeypatch):
    """`shard` uses one FSDP unit on one rank only where FSDP's private pre-forward method runs here (an identity
    forward and backward): a torch whose method is missing or reads other attributes keeps per-block units."""
    from training.distributed import _BlockInputs

    assert _BlockInputs.works()  # this torch: the identity node passes the gradient through

    def reads_other_attributes(group, args, kwargs):
        return group._training_state, kwargs

    monkeypatch.setattr(_BlockInputs, "hook", staticmethod(reads_other_attributes))
    assert not _BlockInputs.works()
    monkeypatch.setattr(_BlockInputs, "hook", None)
    assert not _BlockInputs.works()


# (only where CUDA is available is FSDP's default mesh on another device than the run's: without it, it can't fail)
@pytest.mark.gpu
@pytest.mark.parametrize("per_block", [False, True])
def test_shard_keeps_a_cpu_run_on_the_cpu(per_block):
    """`device: cpu` shards on a CPU mesh even where CUDA is available (FSDP's default mesh is the accelerator's:
    on the H200 the weights went to CUDA and the first attention failed with query and keys on two devices)."""
    from training import distributed as fsdp

    d = fsdp.setup("cpu")
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.Linear(3, 3) for _ in range(2)])
    fsdp.shard(model, d, mixed_precision=True, per_block=per_block)
    for name, p in model.named_parameters():
        assert p.device.type == "cpu" and p.device_mesh.device_type == "cpu", name
