"""The repository's Triton kernels run only on a triton they were tested with (models/common/triton_version.py):
another version turns them off with one warning and the stock paths run; WORKBENCH_TRITON_UNTESTED=1 turns them
on. (torch 2.15 brings triton 3.9, whose interpreter refuses one of the kernels' masks and whose Gluon no longer
compiles the forward; torch 2.7 brings triton 3.3, without Gluon.)"""

import warnings

import pytest
import torch

from models.common import attention_kernels as ak
from models.common import triton_version
from conftest import tiny_model


@pytest.fixture
def triton_at(monkeypatch):
    """Pretend the installed triton is at a given version (None: not installed); the answer is read anew."""
    def at(found):
        monkeypatch.setattr(triton_version, "version", lambda: found)
        triton_version.reset()
    yield at
    triton_version.reset()


def test_an_untested_triton_turns_the_kernels_off_with_one_warning(triton_at, monkeypatch):
    monkeypatch.delenv(triton_version.ENV, raising=False)
    triton_at("3.9.0")
    with pytest.warns(RuntimeWarning, match=r"triton 3\.9\.0 is not a version the workbench's Triton kernels were "
                      r"tested with \(3\.6\.x\): they are off, and the stock paths run .* WORKBENCH_TRITON_UNTESTED=1"):
        assert not triton_version.usable()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not triton_version.usable()  # (once a process)
    monkeypatch.setenv(triton_version.ENV, "1")
    triton_at("3.9.0")
    assert triton_version.usable()


@pytest.mark.parametrize("found,usable", [("3.6.0", True), ("3.6.1+git123", True), ("3.3.1", False), (None, False)])
def test_which_versions_run_the_kernels(triton_at, monkeypatch, found, usable):
    monkeypatch.delenv(triton_version.ENV, raising=False)
    triton_at(found)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert triton_version.usable() is usable


def test_the_kernel_table_passes_the_triton_kernel_by_on_an_untested_triton(triton_at, monkeypatch):
    """The `triton` choice's calls go to the next kernel of its order (the stock ones) instead of failing inside
    a kernel that an untested triton cannot compile."""
    monkeypatch.delenv(triton_version.ENV, raising=False)
    triton_at("3.9.0")
    q = torch.randn(1, 32, 2, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert not ak._triton_takes(q, q, q, 16)
        monkeypatch.setattr(ak, "_CANDIDATES", {})
        assert ak.select(q, q, q, frame_seq_len=16, kernel="triton").name == "sdpa"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_an_untested_triton_runs_the_stock_paths(triton_at, monkeypatch):
    """On a GPU with an untested triton: `auto` runs cuDNN (not the Gluon forward or the balanced merge), and a
    bf16 rollout runs end to end on the stock paths (PyTorch norms and RoPE)."""
    from conftest import tiny_model
    from models.common.rollout import causal_few_step
    from models.common.scheduler import FlowMatchScheduler

    monkeypatch.delenv(triton_version.ENV, raising=False)
    triton_at("3.9.0")
    monkeypatch.setattr(ak, "_GPUS", {})
    monkeypatch.setattr(ak, "_CANDIDATES", {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert ak.describe("cuda", torch.bfloat16, "auto", heads=12, head_dim=128, frame_seq_len=1560) == "cudnn"
        model = tiny_model().cuda().to(torch.bfloat16)
        s = FlowMatchScheduler(5.0)
        g = torch.Generator(device="cuda").manual_seed(0)
        noise = torch.randn(1, 6, 16, 4, 6, generator=g, device="cuda", dtype=torch.bfloat16)
        ctx = torch.randn(1, 16, 32, generator=g, device="cuda", dtype=torch.bfloat16)
        out = causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g,
                              cuda_graphs=False)
    assert torch.isfinite(out.float()).all()


def test_the_answer_is_a_constant_inside_compiled_code():
    """The fused norms and RoPE ask `usable()` inside the blocks `generate --compile` compiles: the compiler takes
    its answer without a warning or a graph break, decided there or before (a cache wrapper around it warned)."""
    triton_version.reset()  # (undecided: the compiler meets the version check itself)
    step = torch.compile(lambda x: x + 1 if triton_version.usable() else x - 1, backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = float(step(torch.ones(1)))
    assert got == (2.0 if triton_version.usable() else 0.0)  # (an untested triton's warning comes here, eagerly)


def test_an_untested_triton_met_first_inside_compiled_code_warns_outside(triton_at, monkeypatch):
    """On an untested triton the check met first inside torch.compile's trace answers there without its warning
    (torch 2.12's compiler cannot trace warnings.warn: `generate --compile` broke), and the next eager call warns
    once; `compile_blocks` settles the check before it compiles."""
    import models.wan.accel as accel

    monkeypatch.delenv(triton_version.ENV, raising=False)
    triton_at("3.7.1")
    step = torch.compile(lambda x: x + 1 if triton_version.usable() else x - 1, backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(step(torch.ones(1))) == 0.0  # (the stock paths' answer, no warning in the trace)
    with pytest.warns(RuntimeWarning, match=r"triton 3\.7\.1 is not a version"):
        assert not triton_version.usable()
    triton_at("3.7.1")
    monkeypatch.setattr(accel, "leave_eager", lambda: None)  # (the model classes' attention stays as it is)
    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit), \
            pytest.warns(RuntimeWarning, match=r"triton 3\.7\.1 is not a version"):
        accel.compile_blocks(tiny_model(), backend="eager")
    assert triton_version._USABLE is False
