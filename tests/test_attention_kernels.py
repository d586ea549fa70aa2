"""The kernel table (models/common/attention_kernels.py): one choice of kernel per call, read by everyone; the output is
the same bits whether or not the log-sum-exp is asked for; a kernel that refuses a shape is recorded for that
shape only (the next kernel runs it, every other shape keeps its kernel), and one that may not refuse fails
loudly."""

import math

import pytest
import torch

from models.common import attention_kernels as ak
from models.errors import ModelInputError


def qkv(lk, lq=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, lq, 2, 16, generator=g, dtype=dtype), torch.randn(1, lk, 2, 16, generator=g, dtype=dtype),
            torch.randn(1, lk, 2, 16, generator=g, dtype=dtype))


def test_where_each_choice_runs_and_which_capture_mode_reads_it():
    assert ak.describe("cpu", torch.float32, "auto") == ak.describe("cpu", torch.bfloat16, "triton") == "sdpa"
    assert ak.describe("cuda", torch.float32, "auto") == "sdpa"  # the CUDA library ops take fp16/bf16 only
    from models.common.cuda_attention import HAS_FLASH_ATTN

    balanced = "cudnn-balanced" if ak.KERNELS["cudnn-balanced"].runs_on("cuda", torch.bfloat16) else "cudnn"
    stock = "gluon" if ak.KERNELS["gluon"].runs_on("cuda", torch.bfloat16) else balanced  # sm90: the Gluon forward
    assert ak.describe("cuda", torch.bfloat16, "auto") == ("flash-attn" if HAS_FLASH_ATTN else stock)
    assert ak.describe("cuda", torch.bfloat16, "cudnn") == "cudnn"  # the one-call kernel, for comparisons
    assert ak.describe("cuda", torch.bfloat16, "cudnn-balanced") == balanced
    assert ak.describe("cuda", torch.bfloat16, "triton") == "triton"
    assert ak.capture_mode_of("triton") == ak.capture_mode_of("gluon" if stock == "gluon" else "triton") == "fused"
    assert ak.capture_mode_of("auto") == (None if HAS_FLASH_ATTN else "fused" if stock == "gluon" else "indicator")
    q, k, v = qkv(12)
    mask = torch.tensor([[True, False]])
    assert ak.select(q, k, v, frame_seq_len=6).name == "sdpa"
    assert ak.select(q, k, v, frame_mask=mask, frame_seq_len=6).name == "sdpa"
    assert ak.select(q, k, v, frame_mask=torch.ones(1, 2, dtype=torch.bool), frame_seq_len=6).name == "sdpa"
    with pytest.raises(ModelInputError, match=r"attention kernel 'cutlass'; use one of \['auto', 'triton', 'cudnn', 'cudnn-balanced'\]"):
        ak.select(q, k, v, kernel="cutlass")


@pytest.mark.parametrize("masked", [False, True])
def test_output_bits_do_not_depend_on_the_lse_and_the_lse_is_exact(masked):
    q, k, v = qkv(18, lq=12, seed=int(masked))
    mask = torch.tensor([[True, False, True], [True, True, True]]) if masked else None
    plain = ak.plain_attention(q, k, v, frame_mask=mask, frame_seq_len=6)
    out, lse = ak.attention_with_lse(q, k, v, frame_mask=mask, frame_seq_len=6)
    assert torch.equal(out, plain)
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / math.sqrt(16)
    if masked:
        s = s.masked_fill(~ak.token_mask(mask, 12, 18, 6), float("-inf"))
    assert (lse.double() - torch.logsumexp(s, -1)).abs().max() < 1e-5
    want = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double())
    assert (out.double() - want).abs().max() < 1e-5


def _picky(refuse_lk, refuses=True):
    def run(q, k, v, scale, mask, fsl, lse):
        if k.shape[1] == refuse_lk:
            raise RuntimeError("no plan for this shape\nmore detail")
        return ak._run_sdpa(q, k, v, scale, mask, fsl, lse)

    return ak.Kernel("picky", run, ("cpu",), None, ("unmasked",), refuses=refuses)


@pytest.fixture
def table(monkeypatch):
    """A kernel "picky" first in the "auto" order on the CPU, with fresh records."""
    def install(kernel):
        monkeypatch.setitem(ak.KERNELS, kernel.name, kernel)
        monkeypatch.setitem(ak.CHOICES, "auto", (kernel.name, *ak.CHOICES["auto"]))
        monkeypatch.setattr(ak, "_CANDIDATES", {})
        monkeypatch.setattr(ak, "_REFUSED", {})
    return install


def test_a_refusal_is_recorded_for_that_shape_only(table):
    table(_picky(refuse_lk=12))
    q, k12, v12 = qkv(12)
    _, k18, v18 = qkv(18)
    assert ak.select(q, k12, v12, frame_seq_len=6).name == "picky"  # before it refused
    with pytest.warns(RuntimeWarning, match=r"'picky' refused q \(1, 6, 2, 16\), k \(1, 12, 2, 16\).*no plan for "
                                            r"this shape\); calls of this shape run the next kernel"):
        out, _, kern = ak.compute(q, k12, v12, frame_seq_len=6)
    assert kern.name == "sdpa" and torch.equal(out, ak._run_sdpa(q, k12, v12, 0.25, None, 6, False)[0])
    assert ak.select(q, k12, v12, frame_seq_len=6).name == "sdpa"  # that shape, from now on
    assert ak.compute(q, k18, v18, frame_seq_len=6)[2].name == "picky"  # every other shape keeps its kernel
    assert ak.refused() == {("picky", (1, 6, 2, 16), (1, 12, 2, 16), (1, 12, 2, 16), torch.float32, "cpu"):
                            "no plan for this shape"}


def test_a_kernel_that_may_not_refuse_fails_loudly(table):
    table(_picky(refuse_lk=12, refuses=False))
    q, k, v = qkv(12)
    with pytest.raises(RuntimeError, match="no plan for this shape"):
        ak.compute(q, k, v, frame_seq_len=6)
    assert ak.refused() == {}


def test_attend_runs_the_table_and_the_model_records_its_choice():
    from conftest import tiny_model
    from models.common.attention import AttentionCall, attend

    q, k, v = qkv(12)
    call = AttentionCall(0, "self", None, (1,), (0, 1), 6, (2, 3), torch.tensor([[True, False]]), 2, 16)
    assert torch.equal(attend(q, k, v, call), ak.plain_attention(q, k, v, frame_mask=call.frame_mask,
                                                                  frame_seq_len=6))
    model = tiny_model()
    model.attention_kernel = "triton"
    assert model.attention_kernel == "triton"
    with pytest.raises(ModelInputError, match="attention kernel 'flex'"):
        model.attention_kernel = "flex"  # a kernel of the table is not a choice


@pytest.mark.parametrize("takes_small", [False, True])
def test_the_store_names_the_kernel_that_runs_the_models_calls(table, tmp_path, takes_small):
    """`describe` with a model's geometry is the kernel `select` picks for its calls, the kernels' shape rules
    applied: a kernel meant for the device that does not take the model's head_dim is not the one the store names
    (the Gluon forward on sm90 takes head_dim 128 only: a small model's stores named it while cuDNN's ran them)."""
    import xarray as xr

    from workbench.extract import ExtractConfig, run_extract

    ran = []

    def run(q, k, v, scale, mask, fsl, lse):
        ran.append(q.shape[-1])
        return ak._run_sdpa(q, k, v, scale, mask, fsl, lse)

    wide = {32, 128} if takes_small else {128}  # (the embedded default model: 4 heads of 32)
    table(ak.Kernel("wide", run, ("cpu",), None, ("unmasked",), capture_mode="fused",
                    takes=lambda q, k, v, fsl: q.shape[-1] in wide))
    assert ak.describe("cpu", torch.float32, "auto") == "wide"  # where it is meant to run: a fingerprint's device
    small, big = dict(heads=4, head_dim=32, frame_seq_len=48), dict(heads=12, head_dim=128, frame_seq_len=1560)
    assert ak.describe("cpu", torch.float32, "auto", **big) == "wide"
    assert ak.describe("cpu", torch.float32, "auto", **small) == ("wide" if takes_small else "sdpa")
    assert ak.capture_mode_of("auto", "cpu", torch.float32, **small) == ("fused" if takes_small else None)
    out = tmp_path / "s.zarr"
    run_extract(ExtractConfig(layers=[0], steps=[0], num_frames=3, out=str(out), progress=False),
                log=lambda *a: None)
    assert xr.open_zarr(out, consolidated=False).attrs["attn_backend"] == ("wide" if takes_small else "sdpa")
    assert bool(ran) == takes_small and set(ran) <= {32}


@pytest.mark.gpu
def test_a_small_model_on_a_gpu_records_the_kernel_and_capture_mode_that_ran(tmp_path):
    """On a GPU the capture mode follows the kernel that runs the model's calls: a small model's head_dim is not
    the Gluon forward's, so on sm90 its calls run cuDNN (wave-balanced) and capture reads them in indicator mode
    (the store said gluon and fused, and every call took the exact path); float32 runs SDPA: exact."""
    import xarray as xr

    from workbench.capture import resolve_mode
    from workbench.extract import ExtractConfig, run_extract

    small, big = dict(heads=4, head_dim=32, frame_seq_len=48), dict(heads=12, head_dim=128, frame_seq_len=1560)
    backend = ak.describe("cuda", torch.bfloat16, "auto", **small)
    assert backend in ("cudnn-balanced", "cudnn", "flash-attn") and backend != "gluon"
    assert resolve_mode("auto", "cuda", "auto", dtype=torch.bfloat16, **small) == ak.KERNELS[backend].capture_mode
    assert resolve_mode("auto", "cuda", "auto", dtype=torch.float32, **small) == "exact"
    assert resolve_mode("auto", "cuda", "triton", dtype=torch.bfloat16, **small) == "fused"  # Triton takes 32
    if ak.KERNELS["gluon"].runs_on("cuda", torch.bfloat16):
        assert ak.describe("cuda", torch.bfloat16, "auto", **big) == "gluon"
        assert resolve_mode("auto", "cuda", "auto", dtype=torch.bfloat16, **big) == "fused"
    out = tmp_path / "s.zarr"
    run_extract(ExtractConfig(layers=[0], steps=[0], num_frames=3, out=str(out), progress=False, device="cuda",
                              dtype="bfloat16"),
                log=lambda *a: None)
    attrs = xr.open_zarr(out, consolidated=False).attrs
    assert attrs["attn_backend"] == backend and attrs["capture_mode"] == (ak.KERNELS[backend].capture_mode or "exact")
