"""FSDP on the CPU: 2 gloo processes (torchrun, micro-batch 1 each) give the losses of 1 process accumulating
2 micro-batches (the same global batch of 2). The 2-process run also has activation checkpointing on and
attention probes (collective forwards on both ranks, rank 0 writes), neither of which may change the losses
(both runs take the text keys/values' gradient from the first forward only: with the researchers' default it
follows checkpointing, docs/training.md; the text parameters then get zero gradients, on sharded parameters
here, whenever the exit step is not 0). Run as a script, this file is the torchrun worker."""

import json
import os
import subprocess
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

    from models.wan.checkpoint import load_tensors

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
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


if __name__ == "__main__":
    worker(sys.argv[1])
