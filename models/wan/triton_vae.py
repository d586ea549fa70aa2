"""Two Triton kernels of the fast VAE decoder on CUDA: RMSNorm (+ SiLU) over channels-last activations, and the
sums that finish a convolution (its bias, the temporal taps, the residual).

The fast decoder (models/wan/vae_fast.py) keeps activations as rows of C contiguous channels (one row per pixel)
and writes each causal convolution's input straight into that convolution's buffer, so this kernel takes any
destination whose rows are contiguous: x, out [B, R, C] with stride(2) == 1, stride(1) == C and any batch
stride. Each program normalises ROWS rows: the same rounding steps as diffusers' `WanRMS_norm` + SiLU:
  n = x / max(||x||_2, 1e-12) in float32, cast to x's dtype; n * sqrt(C), cast; * gamma, cast;
  SiLU in float32 (y / (1 + exp(-y))), cast.
It reads x once and writes out once (the eager code makes a float32 copy and six passes). With `bias` it first
adds a convolution's bias, rounded as PyTorch's `x.add_(bias)` rounds, so the convolution before it runs without
one (PyTorch adds a cuDNN convolution's bias in a pass of its own, which for channels-last bf16 tensors is a
slow broadcast kernel: 12% of a decode on an H200, bench/RESULTS.md).

`combine_` is y <- (((y + parts...) + bias) + residual) in place over dense channels-last tensors, each addition
rounded to y's dtype as PyTorch's chain of `add_` calls rounds it: the same bits in one pass instead of several.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_silu_kernel(x_ptr, g_ptr, b_ptr, out_ptr, rows, x_bstride, out_bstride, scale, eps,
                     C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, SILU: tl.constexpr,
                     BIAS: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)  # batch index
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # rows of this program
    c = tl.arange(0, BLOCK_C)  # channels (BLOCK_C >= C)
    mask = (r < rows)[:, None] & (c < C)[None, :]
    offs = r.to(tl.int64)[:, None] * C + c[None, :]
    x = tl.load(x_ptr + b * x_bstride + offs, mask=mask, other=0.0)
    if BIAS:  # x + bias, rounded to x's dtype (PyTorch's add_)
        bias = tl.load(b_ptr + c, mask=c < C, other=0.0)
        x = (x.to(tl.float32) + bias.to(tl.float32)[None, :]).to(x.dtype)
    x32 = x.to(tl.float32)
    norm = tl.sqrt(tl.sum(x32 * x32, axis=1))  # [ROWS]
    y = (x32 / tl.maximum(norm, eps)[:, None]).to(x.dtype)
    y = (y.to(tl.float32) * scale).to(x.dtype)
    g = tl.load(g_ptr + c, mask=c < C, other=0.0)
    y = (y.to(tl.float32) * g.to(tl.float32)[None, :]).to(x.dtype)
    if SILU:
        y32 = y.to(tl.float32)
        y = (y32 / (1.0 + tl.exp(-y32))).to(x.dtype)
    tl.store(out_ptr + b * out_bstride + offs, y, mask=mask)


def _check_rows(t: torch.Tensor, name: str) -> None:
    if t.ndim != 3 or t.stride(2) != 1 or (t.shape[1] > 1 and t.stride(1) != t.shape[2]):
        raise ValueError(f"{name} must be [B, R, C] with contiguous rows of C channels; got shape "
                         f"{tuple(t.shape)}, strides {t.stride()}")


def rms_silu_into(out: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, scale: float, *, silu: bool = True,
                  eps: float = 1e-12, bias: torch.Tensor | None = None) -> torch.Tensor:
    """out [B, R, C] <- SiLU(RMSNorm(x + bias)) (or the norm alone with silu=False; no bias: of x); x [B, R, C],
    gamma [C] and bias [C] in x's dtype. Returns out."""
    _check_rows(x, "x")
    _check_rows(out, "out")
    B, R, C = x.shape
    if tuple(out.shape) != (B, R, C) or out.dtype != x.dtype or gamma.numel() != C or (
            bias is not None and bias.numel() != C):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype}, gamma {gamma.numel()}, bias "
                         f"{None if bias is None else bias.numel()} do not match x {tuple(x.shape)} {x.dtype}")
    block_c = triton.next_power_of_2(C)
    rows = max(1, 4096 // block_c)
    g = gamma.reshape(C).to(x.dtype).contiguous()
    _rms_silu_kernel[(triton.cdiv(R, rows), B)](
        x, g, g if bias is None else bias.reshape(C).to(x.dtype).contiguous(), out, R, x.stride(0), out.stride(0),
        float(scale), eps, C=C, BLOCK_C=block_c, ROWS=rows, SILU=silu, BIAS=bias is not None, num_warps=4)
    return out


@triton.jit
def _combine_kernel(y_ptr, p1_ptr, p2_ptr, b_ptr, h_ptr, n, C, PARTS: tl.constexpr, BIAS: tl.constexpr,
                    RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat element index, channels fastest
    mask = i < n
    y = tl.load(y_ptr + i, mask=mask)
    if PARTS >= 1:
        y = (y.to(tl.float32) + tl.load(p1_ptr + i, mask=mask).to(tl.float32)).to(y.dtype)
    if PARTS >= 2:
        y = (y.to(tl.float32) + tl.load(p2_ptr + i, mask=mask).to(tl.float32)).to(y.dtype)
    if BIAS:
        y = (y.to(tl.float32) + tl.load(b_ptr + i % C, mask=mask).to(tl.float32)).to(y.dtype)
    if RESIDUAL:
        y = (y.to(tl.float32) + tl.load(h_ptr + i, mask=mask).to(tl.float32)).to(y.dtype)
    tl.store(y_ptr + i, y, mask=mask)


def combine_(y: torch.Tensor, parts=(), bias: torch.Tensor | None = None,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """y <- (((y + parts[0]) + parts[1]) + bias) + residual in place, each sum rounded to y's dtype; y, the
    parts and the residual flat views [N * C] of tensors with the same layout (channels fastest), bias [C] with
    C = channels. At most two parts. Returns y."""
    n = y.numel()
    parts = list(parts)
    if len(parts) > 2 or any(p.shape != y.shape or p.dtype != y.dtype for p in parts + (
            [] if residual is None else [residual])) or y.ndim != 1:
        raise ValueError(f"combine_: y {tuple(y.shape)} {y.dtype} (flat), parts "
                         f"{[tuple(p.shape) for p in parts]} (at most 2), residual "
                         f"{None if residual is None else tuple(residual.shape)}: same flat shape and dtype")
    C = 1 if bias is None else bias.numel()
    b = y if bias is None else bias.reshape(C).to(y.dtype).contiguous()
    p1 = parts[0] if parts else y
    p2 = parts[1] if len(parts) > 1 else y
    block = 2048
    _combine_kernel[(triton.cdiv(n, block),)](
        y, p1, p2, b, y if residual is None else residual, n, C, PARTS=len(parts), BIAS=bias is not None,
        RESIDUAL=residual is not None, BLOCK=block, num_warps=8)
    return y
