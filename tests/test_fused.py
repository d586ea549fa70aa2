"""The fused pointwise pieces of a block: the Triton q/k RMSNorm + RoPE kernel equals the PyTorch code and the
one-pass LayerNorm row kernels are as close to float64 as PyTorch's functions (each run under Triton's interpreter
on the CPU, compiled on a GPU), and the PyTorch pieces equal the textbook formulas."""

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import run_triton_check
from models.wan import fused
from models.wan.rope import RopeTable, rope_cos_sin

CHECK = textwrap.dedent("""
    import os, sys, torch
    import models.wan.triton_rope as tr
    from models.wan.fused import _qk_norm_rope
    from models.wan.rope import RopeTable, rope_cos_sin
    device = sys.argv[1]
    torch.manual_seed(0)
    B, L, H, D = 2, 12, 3, 16
    q, k = torch.randn(B, L, H * D, device=device), torch.randn(B, L, H * D, device=device)
    wq, wk = torch.rand(H * D, device=device) + 0.5, torch.rand(H * D, device=device) + 0.5
    cos, sin = rope_cos_sin(RopeTable((8, 4, 4)).angles(2, 2, 3, start_frame=5), device)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        if device == "cpu" and dtype != torch.float32:
            continue  # the interpreter rounds bf16 differently; compiled runs check bf16
        a = _qk_norm_rope(q.to(dtype), k.to(dtype), wq.to(dtype), wk.to(dtype), cos, sin, H, 1e-6)
        b = tr.qk_norm_rope(q.to(dtype), k.to(dtype), wq.to(dtype), wk.to(dtype), cos, sin, H, 1e-6)
        err = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))
        assert a[0].shape == b[0].shape == (B, L, H, D), b[0].shape
        assert err <= tol, (dtype, err)
    print("ok")
""")


def test_triton_qk_norm_rope_matches_pytorch_in_interpreter():
    run_triton_check(CHECK, "cpu")


@pytest.mark.gpu
def test_triton_qk_norm_rope_matches_pytorch_on_gpu():
    run_triton_check(CHECK, "cuda")


NORMS = textwrap.dedent("""
    import sys, torch
    import models.wan.triton_norms as tn
    from models.wan import fused
    device = sys.argv[1]
    torch.manual_seed(0)
    B, F, fsl, C = 2, 3, 5, 200  # C not a power of two: the row is masked
    for dtype in ((torch.float32,) if device == "cpu" else (torch.float32, torch.bfloat16)):
        x = (torch.randn(B, F * fsl, C, device=device) * 3 + 1).to(dtype)
        y = torch.randn(B, F * fsl, C, device=device).to(dtype)
        mod = torch.randn(B, F, 6, 1, C, device=device)  # the block's layout: shift/scale/gate are strided views
        shift, scale, gate = mod[:, :, 0], mod[:, :, 1], mod[:, :, 2]
        w, b = (torch.rand(C, device=device) + 0.5).to(dtype), torch.randn(C, device=device).to(dtype)
        cases = [
            ("norm_modulate", tn.norm_modulate(x, shift, scale, 1e-6), fused.norm_modulate.eager(x, shift, scale, 1e-6),
             fused.norm_modulate.eager(x.double(), shift.double(), scale.double(), 1e-6)),
            ("layer_norm_affine", tn.layer_norm_affine(x, w, b, 1e-6), fused.layer_norm_affine.eager(x, w, b, 1e-6),
             fused.layer_norm_affine.eager(x.double(), w.double(), b.double(), 1e-6)),
        ]
        total, h = tn.add_norm_modulate(x, y, shift, scale, 1e-6)
        want_total, want_h = fused.add_norm_modulate.eager(x, y, shift, scale, 1e-6)
        assert torch.equal(total, want_total), "the residual sum must be x + y rounded as PyTorch rounds it"
        ref = fused.norm_modulate.eager(want_total.double(), shift.double(), scale.double(), 1e-6)
        cases.append(("add_norm_modulate", h, want_h, ref))
        # the gated residuals (x + y * gate, rounded as models/wan/fused.py's gated_residual rounds it: compiled on a
        # GPU, eager on the CPU) with the norm after them, modulated or affine
        want_total = fused.gated_residual(x, y, gate)
        for name, (total, h), ref in (
                ("gated_residual_norm_modulate", tn.gated_residual_norm_modulate(x, y, gate, shift, scale, 1e-6),
                 fused.norm_modulate.eager(want_total.double(), shift.double(), scale.double(), 1e-6)),
                ("gated_residual_norm_affine", tn.gated_residual_norm_affine(x, y, gate, w, b, 1e-6),
                 fused.layer_norm_affine.eager(want_total.double(), w.double(), b.double(), 1e-6))):
            assert torch.equal(total, want_total), (name, dtype, (total.double() - want_total.double()).abs().max())
            eager = (fused.norm_modulate.eager(want_total, shift, scale, 1e-6) if "modulate" in name
                     else fused.layer_norm_affine.eager(want_total, w, b, 1e-6))
            cases.append((name, h, eager, ref))
        gate_copy = gate.contiguous()  # other strides than shift/scale: all three made contiguous
        total, h = tn.gated_residual_norm_modulate(x, y, gate_copy, shift, scale, 1e-6)
        assert torch.equal(h, tn.gated_residual_norm_modulate(x, y, gate, shift, scale, 1e-6)[1])
        for name, got, eager, ref in cases:
            assert got.shape == eager.shape and got.dtype == dtype, (name, got.shape, got.dtype)
            err = (got.double() - ref).abs().max().item()
            eager_err = (eager.double() - ref).abs().max().item()
            # float32: both within float32 rounding of float64; bf16: the kernel rounds no worse than PyTorch
            assert err <= (1e-5 if dtype == torch.float32 else 1.5 * eager_err + 1e-6), (name, dtype, err, eager_err)
    print("ok")
""")


def test_triton_norm_kernels_match_float64_in_interpreter():
    """The one-pass LayerNorm row kernels (models/wan/triton_norms.py), run by Triton's interpreter in float32:
    modulated (per-frame scale/shift from strided views), with the residual add first, and affine."""
    run_triton_check(NORMS, "cpu")


@pytest.mark.gpu
def test_triton_norm_kernels_match_float64_on_gpu():
    run_triton_check(NORMS, "cuda")


def test_norm_kernels_take_only_contiguous_cuda_inference_tensors():
    x = torch.randn(1, 6, 8, dtype=torch.bfloat16)
    assert fused.norm_kernels(x) is None  # CPU: the PyTorch functions the tests check
    tn = pytest.importorskip("models.wan.triton_norms")
    assert not tn.applies(x)  # not CUDA


def test_rope_rotates_pairs_by_position_angles():
    """Channel pair (2i, 2i+1) of a token at frame f is rotated by f * theta^(-2i/44) on the time axis."""
    table = RopeTable((44, 42, 42))
    cos, sin = rope_cos_sin(table.angles(1, 1, 1, start_frame=7), "cpu", torch.float64)
    x = torch.zeros(1, 1, 1, 128, dtype=torch.float64)
    x[..., 2] = 1.0  # pair 1, first channel
    out = fused.rope(x, cos, sin)
    angle = 7 * 10000 ** (-2 / 44)
    assert out[0, 0, 0, 2].item() == pytest.approx(math.cos(angle), abs=1e-12)
    assert out[0, 0, 0, 3].item() == pytest.approx(math.sin(angle), abs=1e-12)
    assert out[..., [0, 1] + list(range(4, 128))].abs().max() == 0


def test_norm_modulate_and_gated_residual_formulas():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    shift, scale, gate = (torch.randn(2, 3, 1, 8, generator=g) for _ in range(3))  # 3 frames of 2 tokens
    per_frame = lambda t: t.repeat_interleave(2, dim=1).squeeze(2)  # [B, F, 1, C] -> [B, L, C]
    want = F.layer_norm(x, (8,), eps=1e-6) * (1 + per_frame(scale)) + per_frame(shift)
    torch.testing.assert_close(fused.norm_modulate(x, shift, scale, 1e-6), want)
    torch.testing.assert_close(fused.gated_residual(x, y, gate), x + y * per_frame(gate))


def test_gelu_epilogue_is_off_on_the_cpu_and_under_autograd():
    x = torch.randn(2, 3, 8)
    assert not fused.gelu_epilogue_applies(x)  # the CPU path is the module's own Linear, GELU, Linear


@pytest.mark.gpu
def test_gpu_ffn_gelu_epilogue_matches_separate_gelu():
    """The cuBLASLt GELU epilogue is the tanh approximation: the FFN equals Linear -> GELU(tanh) -> Linear within
    bf16 rounding, and both are as close to a float64 evaluation."""
    from models.wan.model import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(256, 1024).cuda().bfloat16()
    x = torch.randn(2, 300, 256, device="cuda").bfloat16()
    with torch.no_grad():
        assert fused.gelu_epilogue_applies(x)
        fast = ffn(x).float()
        slow = ffn[2](ffn[1](ffn[0](x))).float()
        ref = torch.nn.Sequential(*ffn).double()(x.double()).float()
    assert (fast - slow).abs().max() <= 2e-2 * slow.abs().max()
    assert (fast - ref).abs().max() <= 2 * (slow - ref).abs().max() + 1e-3
