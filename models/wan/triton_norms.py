"""One-pass Triton kernels for a Wan block's LayerNorms on CUDA: the modulated norms before self-attention and the
FFN (the former with the previous block's gated FFN residual in front, the latter with the cross-attention's residual
add) and the cross-attention's affine norm (with the self-attention's gated residual in front).

Each program takes one token row ([C] channels, contiguous; C <= BLOCK, a power of two, so the whole row sits in
registers), optionally adds the residual y, or y times the row's frame's gate (float32, [B, F, 1, C]), rounds the
sum to the input dtype (as PyTorch's x + y and models/wan/fused.py's gated_residual do) and stores it, then
computes the mean and the biased variance in float32 in two passes over the registers (no Welford), normalises,
applies the affine weight/bias or the frame's modulation h * (1 + scale) + shift (float32, [B, F, 1, C] with the
row's frame = (row % L) // rows_per_frame), and stores the result in the input dtype. It reads x (and y) once and
writes each output once; inductor's kernels for the same functions (models/wan/fused.py) reach about half the HBM
rate at C = 1536 (bench/RESULTS.md, session 22). `models.wan.fused` calls these for contiguous CUDA bf16/fp16
tensors without autograd and keeps its PyTorch functions as the reference everywhere else (tests/test_fused.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_WARPS = 8


@triton.jit
def _row_norm_kernel(x_ptr, y_ptr, sum_ptr, out_ptr, w_ptr, b_ptr, shift_ptr, scale_ptr, gate_ptr,
                     L, rows_per_frame, mod_sb, mod_sf, eps,
                     C: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr, AFFINE: tl.constexpr,
                     MODULATE: tl.constexpr, GATE: tl.constexpr):
    row = tl.program_id(0)  # token row in [B * L]
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    base = row.to(tl.int64) * C
    x = tl.load(x_ptr + base + cols, mask=mask, other=0.0)  # [BLOCK] input dtype
    # the row's frame's modulation and gate: [B, F, 1, C] float32 with strides (mod_sb, mod_sf, -, 1)
    m = (row // L) * mod_sb + ((row % L) // rows_per_frame) * mod_sf
    if ADD:  # the residual add (gated: x + y * gate in float32), rounded to the input dtype like PyTorch's
        y = tl.load(y_ptr + base + cols, mask=mask, other=0.0)
        if GATE:
            gate = tl.load(gate_ptr + m + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + y.to(tl.float32) * gate).to(x.dtype)
        else:
            x = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + base + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / C
    d = tl.where(mask, xf - mean, 0.0)
    var = tl.sum(d * d, axis=0) / C  # biased, as F.layer_norm
    h = d * tl.rsqrt(var + eps)
    if AFFINE:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        h = h * w + b
    if MODULATE:
        scale = tl.load(scale_ptr + m + cols, mask=mask, other=0.0)
        shift = tl.load(shift_ptr + m + cols, mask=mask, other=0.0)
        h = h * (1 + scale) + shift
    tl.store(out_ptr + base + cols, h.to(x.dtype), mask=mask)


def applies(x: torch.Tensor) -> bool:
    """Whether these kernels take x: a contiguous CUDA bf16/fp16 [..., C] tensor, C <= 8192, no autograd."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.is_contiguous() and x.shape[-1] <= 8192 \
        and not torch.is_grad_enabled()


def _launch(x, y, w, b, shift, scale, eps: float, gate=None):
    B, L, C = x.shape
    out = torch.empty_like(x)
    total = torch.empty_like(x) if y is not None else out
    mod_sb = mod_sf = rows_per_frame = 0
    per_frame = [t for t in (shift, scale, gate) if t is not None]  # one layout for all: [B, F, 1, C]
    if per_frame:
        frames = per_frame[0].shape[1]
        if any(t.shape != (B, frames, 1, C) for t in per_frame) or L % frames:
            raise ValueError(f"modulation of shapes {[tuple(t.shape) for t in per_frame]} for x of shape "
                             f"{tuple(x.shape)}; expected [{B}, F, 1, {C}] with F dividing {L}")
        if any(t.stride() != per_frame[0].stride() for t in per_frame) or per_frame[0].stride(-1) != 1:
            shift, scale, gate = (None if t is None else t.contiguous() for t in (shift, scale, gate))
            per_frame = [t for t in (shift, scale, gate) if t is not None]
        mod_sb, mod_sf, rows_per_frame = per_frame[0].stride(0), per_frame[0].stride(1), L // frames
    _row_norm_kernel[(B * L,)](
        x, x if y is None else y.contiguous(), total, out, x if w is None else w, x if b is None else b,
        x if shift is None else shift, x if scale is None else scale, x if gate is None else gate,
        L, max(rows_per_frame, 1), mod_sb, mod_sf, eps, C=C, BLOCK=triton.next_power_of_2(C), ADD=y is not None,
        AFFINE=w is not None, MODULATE=shift is not None, GATE=gate is not None, num_warps=NUM_WARPS)
    return total, out


def norm_modulate(x, shift, scale, eps: float):
    """LayerNorm (no affine) * (1 + scale) + shift: x [B, L, C]; shift, scale [B, F, 1, C] float32."""
    return _launch(x, None, None, None, shift.float(), scale.float(), eps)[1]


def add_norm_modulate(x, y, shift, scale, eps: float):
    """(x + y, norm_modulate(x + y, ...)): x, y [B, L, C]."""
    return _launch(x, y, None, None, shift.float(), scale.float(), eps)


def gated_residual_norm_modulate(x, y, gate, shift, scale, eps: float):
    """(x + y * gate, norm_modulate of it): x, y [B, L, C]; gate, shift, scale [B, F, 1, C] float32."""
    return _launch(x, y, None, None, shift.float(), scale.float(), eps, gate=gate.float())


def gated_residual_norm_affine(x, y, gate, weight, bias, eps: float):
    """(x + y * gate, affine LayerNorm of it): x, y [B, L, C]; gate [B, F, 1, C] float32; weight, bias [C]."""
    return _launch(x, y, weight.contiguous(), bias.contiguous(), None, None, eps, gate=gate.float())


def layer_norm_affine(x, weight, bias, eps: float):
    """Affine LayerNorm: x [..., C]; weight, bias [C]."""
    C = x.shape[-1]
    return _launch(x.view(1, -1, C), None, weight.contiguous(), bias.contiguous(), None, None, eps)[1].view(x.shape)
