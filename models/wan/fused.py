"""The pointwise pieces of a Wan block, written once as plain functions and fused into single kernels on CUDA.

("Fused" in this repository names three different things; this module is the first: (1) pointwise fusion, several
elementwise ops compiled into one kernel (this module, `@one_kernel`); (2) the capture mode "fused", where the
model's own attention forward also writes the frame statistics (workbench/capture.py, the Triton frame forward
`frame_forward_with_stats` in workbench/kernels/frame_attention.py); (3) a fused attention kernel, one that
never materialises the softmax (cuDNN, flash, the Triton frame forward). docs/architecture.md keeps them apart.)

Eager PyTorch runs each of these as 4-8 kernels with float32 temporaries; on the 1.3B rollout that memory
traffic cost more GPU time than the linear layers (bench/RESULTS.md). On CUDA each function is compiled
with torch.compile into one kernel; on the CPU (tests, the embedded default) it runs eagerly, so the math
that tests check is exactly the math written here. `WORKBENCH_COMPILE=0` turns compilation off. The LayerNorms
of CUDA inference run one-pass Triton row kernels instead (models/wan/triton_norms.py: inductor's reach about half
the HBM rate at the model's width), and the q/k RMSNorm + RoPE one of models/wan/triton_rope.py.

Shapes: x [B, L, C] tokens in (frame, row, column) order; per-frame modulation [B, F, 1, C] float32, with
L = F * tokens_per_frame.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from models.common.triton_version import usable

COMPILE = os.environ.get("WORKBENCH_COMPILE", "1") != "0"
GELU_EPILOGUE = os.environ.get("WORKBENCH_GELU_EPILOGUE", "1") != "0"
NORM_KERNELS = True  # the LayerNorms as one-pass Triton row kernels on CUDA inference (models/wan/triton_norms.py)
# with them, a block's gated residuals added in the pass of the norm after each (models/wan/model.py: the
# self-attention's into norm3, the FFN's into the next block's norm1 or the head's norm)
RESIDUAL_NORMS = True


def gelu_epilogue_applies(x) -> bool:
    """Whether the FFN's tanh-GELU runs in the cuBLASLt epilogue of its first GEMM (CUDA, bf16/fp16, no
    autograd): saves a read and a write of the [L, ffn_dim] activation per block."""
    return GELU_EPILOGUE and COMPILE and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) \
        and not torch.is_grad_enabled()


def one_kernel(fn):
    """Compile `fn` for CUDA inputs (on first use), run it eagerly otherwise."""
    compiled = None

    def wrapper(*args):
        nonlocal compiled
        if COMPILE and args[0].is_cuda:
            if compiled is None:
                # one function meets several shapes (chunk, full video) and autograd modes (no-grad steps, training's
                # exit step, checkpoint recomputes): more than dynamo's default 8 compiled variants
                import torch._dynamo as dynamo

                dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)
                usable()  # (the kernels' version check settled, and said, before `fn` is traced)
                compiled = torch.compile(fn, fullgraph=True)
            return compiled(*args)
        return fn(*args)

    wrapper.__name__, wrapper.__doc__, wrapper.eager = fn.__name__, fn.__doc__, fn
    return wrapper


def norm_kernels(x):
    """models/wan/triton_norms.py, whose one-pass row kernels take the LayerNorms below for this x (CUDA,
    bf16/fp16, contiguous, no autograd), or None: the compiled functions (training; on the CPU: eager)."""
    if not (NORM_KERNELS and COMPILE and x.is_cuda and usable()):
        return None
    from models.wan import triton_norms

    return triton_norms if triton_norms.applies(x) else None


@one_kernel
def _norm_modulate(x, shift, scale, eps: float):
    """LayerNorm (no affine, float32) * (1 + scale) + shift, cast back: x [B, L, C] -> [B, L, C]."""
    B, L, C = x.shape
    frames = shift.shape[1]
    h = F.layer_norm(x.float(), (C,), eps=eps).view(B, frames, L // frames, C)
    return (h * (1 + scale) + shift).view(B, L, C).to(x.dtype)


@one_kernel
def _add_norm_modulate(x, y, shift, scale, eps: float):
    """(x + y, norm_modulate(x + y, ...)) in one pass: the cross-attention residual and the FFN's input."""
    x = x + y
    return x, _norm_modulate.eager(x, shift, scale, eps)


@one_kernel
def _layer_norm_affine(x, weight, bias, eps: float):
    """Affine LayerNorm computed in float32, cast back."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def norm_modulate(x, shift, scale, eps: float):
    """LayerNorm (no affine, float32) * (1 + scale) + shift, cast back: x [B, L, C]; shift, scale [B, F, 1, C]."""
    if kernels := norm_kernels(x):
        return kernels.norm_modulate(x, shift, scale, eps)
    return _norm_modulate(x, shift, scale, eps)


def add_norm_modulate(x, y, shift, scale, eps: float):
    """(x + y, norm_modulate(x + y, ...)) in one pass: the cross-attention residual and the FFN's input."""
    if (kernels := norm_kernels(x)) and norm_kernels(y):
        return kernels.add_norm_modulate(x, y, shift, scale, eps)
    return _add_norm_modulate(x, y, shift, scale, eps)


def layer_norm_affine(x, weight, bias, eps: float):
    """Affine LayerNorm computed in float32, cast back: x [..., C]; weight, bias [C]."""
    if kernels := norm_kernels(x):
        return kernels.layer_norm_affine(x, weight, bias, eps)
    return _layer_norm_affine(x, weight, bias, eps)


norm_modulate.eager, add_norm_modulate.eager = _norm_modulate.eager, _add_norm_modulate.eager
layer_norm_affine.eager = _layer_norm_affine.eager


@one_kernel
def gated_residual(x, y, gate):
    """x + y * gate in float32, cast back: x, y [B, L, C], gate [B, F, 1, C]."""
    B, L, C = x.shape
    frames = gate.shape[1]
    out = x.float().view(B, frames, L // frames, C) + y.float().view(B, frames, L // frames, C) * gate
    return out.view(B, L, C).to(x.dtype)


def residual_norms(x) -> bool:
    """Whether the two functions below take one pass for this x (RESIDUAL_NORMS and models/wan/triton_norms.py's
    kernels apply); else they are the two functions they are made of, each its own pass."""
    return RESIDUAL_NORMS and norm_kernels(x) is not None


def gated_residual_norm_affine(x, y, gate, weight, bias, eps: float):
    """(x + y * gate, affine LayerNorm of it): the self-attention's residual and the cross-attention's input.
    x, y [B, L, C]; gate [B, F, 1, C] float32; weight, bias [C]."""
    if RESIDUAL_NORMS and (kernels := norm_kernels(x)) and norm_kernels(y):
        return kernels.gated_residual_norm_affine(x, y, gate, weight, bias, eps)
    x = gated_residual(x, y, gate)
    return x, layer_norm_affine(x, weight, bias, eps)


def gated_residual_norm_modulate(x, y, gate, shift, scale, eps: float):
    """(x + y * gate, norm_modulate of it): the previous block's FFN residual and this block's self-attention
    input (or the head's). x, y [B, L, C]; gate, shift, scale [B, F, 1, C] float32."""
    if RESIDUAL_NORMS and (kernels := norm_kernels(x)) and norm_kernels(y):
        return kernels.gated_residual_norm_modulate(x, y, gate, shift, scale, eps)
    x = gated_residual(x, y, gate)
    return x, norm_modulate(x, shift, scale, eps)


@one_kernel
def rms_norm(x, weight, eps: float):
    """RMSNorm over the last dim (all heads jointly) in float32, cast back, then the weight (Wan's order)."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def _rotate(x, cos, sin):
    """Rotate consecutive channel pairs of x [B, L, H, D] by angles with cos/sin [L, 1, D/2]."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    pairs = x.to(work).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(work), sin.to(work)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).to(x.dtype)


def _qk_norm_rope(q, k, wq, wk, cos, sin, heads: int, eps: float):
    q = (F.rms_norm(q.float(), (q.shape[-1],), eps=eps).to(q.dtype) * wq).unflatten(2, (heads, -1))
    k = (F.rms_norm(k.float(), (k.shape[-1],), eps=eps).to(k.dtype) * wk).unflatten(2, (heads, -1))
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def qk_norm_rope(q, k, wq, wk, cos, sin, heads: int, eps: float, k_out=None):
    """The self-attention q and k as the kernel sees them: RMSNorm over all heads, split into heads, RoPE.
    q, k [B, L, C] (linear outputs) -> [B, L, heads, C / heads]. On CUDA (bf16/fp16, no autograd) one Triton
    kernel per tensor (models/wan/triton_rope.py), which writes k into `k_out` when given (a contiguous
    [B, L, heads, C / heads] tensor: the KV cache's slots); elsewhere the PyTorch code above (k_out: None)."""
    if qk_norm_rope_kernel(q):
        from models.wan.triton_rope import qk_norm_rope as kernel

        return kernel(q, k, wq, wk, cos, sin, heads, eps, k_out)
    if k_out is not None:
        raise ValueError("qk_norm_rope: k_out needs the CUDA kernel (see qk_norm_rope_kernel)")
    return _qk_norm_rope(q, k, wq, wk, cos, sin, heads, eps)


def qk_norm_rope_kernel(q) -> bool:
    """Whether `qk_norm_rope` runs the Triton kernel for this q (and so takes k_out)."""
    return COMPILE and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled() \
        and usable()


qk_norm_rope.eager = _qk_norm_rope


@one_kernel
def rope(x, cos, sin):
    """RoPE alone: x [B, L, H, D] -> [B, L, H, D]."""
    return _rotate(x, cos, sin)
