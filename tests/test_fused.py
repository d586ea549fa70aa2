"""The fused pointwise pieces of a block: the Triton q/k RMSNorm + RoPE kernel equals the PyTorch code
(run under Triton's interpreter on the CPU, compiled on a GPU), and the PyTorch pieces equal the textbook
formulas."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

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
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", CHECK, "cpu"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.gpu
def test_triton_qk_norm_rope_matches_pytorch_on_gpu():
    pytest.importorskip("triton")
    out = subprocess.run([sys.executable, "-c", CHECK, "cuda"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


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
