"""One Triton kernel for the VAE decoder's RMSNorm (+ SiLU) over channels-last activations, on CUDA.

The fast decoder (models/wan/vae_fast.py) keeps activations as rows of C contiguous channels (one row per pixel)
and writes each causal convolution's input straight into that convolution's buffer, so this kernel takes any
destination whose rows are contiguous: x, out [B, R, C] with stride(2) == 1, stride(1) == C and any batch
stride. Each program normalises ROWS rows: the same rounding steps as diffusers' `WanRMS_norm` + SiLU:
  n = x / max(||x||_2, 1e-12) in float32, cast to x's dtype; n * sqrt(C), cast; * gamma, cast;
  SiLU in float32 (y / (1 + exp(-y))), cast.
It reads x once and writes out once (the eager code makes a float32 copy and six passes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_silu_kernel(x_ptr, g_ptr, out_ptr, rows, x_bstride, out_bstride, scale, eps,
                     C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, SILU: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)  # batch index
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # rows of this program
    c = tl.arange(0, BLOCK_C)  # channels (BLOCK_C >= C)
    mask = (r < rows)[:, None] & (c < C)[None, :]
    offs = r.to(tl.int64)[:, None] * C + c[None, :]
    x = tl.load(x_ptr + b * x_bstride + offs, mask=mask, other=0.0)
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
                  eps: float = 1e-12) -> torch.Tensor:
    """out [B, R, C] <- SiLU(RMSNorm(x)) (or the norm alone with silu=False); x [B, R, C], gamma [C] in x's dtype.
    Returns out."""
    _check_rows(x, "x")
    _check_rows(out, "out")
    B, R, C = x.shape
    if tuple(out.shape) != (B, R, C) or out.dtype != x.dtype or gamma.numel() != C:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype}, gamma {gamma.numel()} do not match x "
                         f"{tuple(x.shape)} {x.dtype}")
    block_c = triton.next_power_of_2(C)
    rows = max(1, 4096 // block_c)
    _rms_silu_kernel[(triton.cdiv(R, rows), B)](
        x, gamma.reshape(C).to(x.dtype).contiguous(), out, R, x.stride(0), out.stride(0), float(scale), eps,
        C=C, BLOCK_C=block_c, ROWS=rows, SILU=silu, num_warps=4)
    return out
