"""One Triton kernel for the self-attention's q/k preparation on CUDA: RMSNorm over all heads, then RoPE.

Each program takes one token row of q or k ([C] = heads x head_dim, contiguous), computes the RMS in float32,
normalises, casts to the input dtype and multiplies by the norm weight (Wan's order), then rotates each
channel pair (2i, 2i+1) of every head by the token's angles. The row is loaded and stored as one contiguous
vector and split into its even and odd channels in registers (bench/RESULTS.md, session 22; before, two stride-2
loads and stores moved the row at about 1.5 TB/s). It reads and writes each tensor once; `models.wan.fused` uses it
for CUDA tensors and the plain PyTorch version everywhere else (and as the reference in tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rows_per_batch, eps,
                         C: tl.constexpr, HALF_D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # token row in [B * L]
    pos = row % rows_per_batch  # token position: the RoPE tables are [L, HALF_D]
    offs = tl.arange(0, BLOCK)  # channel over all heads (BLOCK = C rounded up to a power of two)
    mask = offs < C
    base = row.to(tl.int64) * C
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0)  # [BLOCK], one contiguous load
    x32 = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x32 * x32, axis=0) / C + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = ((x32 * inv).to(x.dtype) * w).to(tl.float32)  # normalise in fp32, cast back, then the weight
    ye, yo = tl.split(tl.reshape(y, (BLOCK // 2, 2)))  # channel pairs (2i, 2i+1): [BLOCK // 2] each
    pair = tl.arange(0, BLOCK // 2)  # pair index over all heads: head = pair // HALF_D
    pmask = pair < C // 2
    c = tl.load(cos_ptr + pos * HALF_D + pair % HALF_D, mask=pmask, other=0.0)
    s = tl.load(sin_ptr + pos * HALF_D + pair % HALF_D, mask=pmask, other=0.0)
    out = tl.reshape(tl.join(ye * c - yo * s, ye * s + yo * c), (BLOCK,))  # pairs interleaved back
    tl.store(out_ptr + base + offs, out.to(x.dtype), mask=mask)


def qk_norm_rope(q, k, wq, wk, cos, sin, heads: int, eps: float, k_out: torch.Tensor | None = None):
    """q, k [B, L, C] -> [B, L, heads, C / heads], normalised and rotated; cos/sin [L, 1, head_dim / 2] fp32.
    k_out: where k's result goes (a contiguous [B, L, heads, C / heads] tensor, e.g. the KV cache's slots for
    the chunk), returned as k."""
    B, L, C = q.shape
    half = C // heads // 2
    cos2, sin2 = cos.reshape(L, half).contiguous(), sin.reshape(L, half).contiguous()
    outs = []
    for x, w, dst in ((q, wq, None), (k, wk, k_out)):
        x = x.contiguous()
        out = torch.empty_like(x) if dst is None else dst.view(B, L, C)
        _qk_norm_rope_kernel[(B * L,)](x, w.to(x.dtype).contiguous(), cos2, sin2, out, L, eps,
                                       C=C, HALF_D=half, BLOCK=triton.next_power_of_2(C))
        outs.append(out.view(B, L, heads, C // heads))
    return outs[0], outs[1]
