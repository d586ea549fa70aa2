"""Frame mass from the model's own attention kernel: the value tensor is widened with key-frame indicators.

With E [Lk, nkf] the 0/1 indicator of which key frame each key token lies in,

    softmax(q k^T * scale) @ [V | E] = [out | P E],   (P E)[i, kf] = sum_{j in kf} P[i, j]

so one call of the stock attention kernel (cuDNN on Hopper, SDPA elsewhere) returns the attention output
and, in the extra columns, each query token's probability mass on each key frame. cuDNN returns the same bits
in the first head_dim columns as in the plain call (tests/test_indicator.py on a GPU), which is why the capture
mode "indicator" belongs to that kernel in the kernel table (models/common/attention_kernels.py). `attn_mass` is then
the mean of those columns over the query tokens of a frame (float32). Cost: the P @ V product grows from D to
D + nkf (rounded up to a multiple of 16) columns, e.g. 128 -> 160 for 21 key frames, about +12% of the
attention FLOPs and no extra exponentials (bench/RESULTS.md measures what it costs on cuDNN).

Precision: the kernel rounds P to the input dtype before the product and writes its output in that dtype, so a
query token's frame mass carries bf16 rounding (relative 2^-9); the means over a frame's 1560 query tokens are
taken in float32. Unmasked calls only (the KV-cache rollout and the bidirectional sampler); masked calls (the
block-causal full-sequence forward) take the log-sum-exp path.
"""

from __future__ import annotations

import math

import torch

_ALIGN = 16  # value head dims the stock attention kernels accept are multiples of 8; 16 keeps rows 32-byte aligned


def widened_width(head_dim: int, key_frames: int) -> int:
    """Value head dim of the widened call: head_dim + key_frames rounded up to a multiple of 16."""
    return -(-(head_dim + key_frames) // _ALIGN) * _ALIGN


_SCRATCH: dict = {}  # widened buffers by call shape, reused across calls (no autograd); at most _KEEP shapes
_KEEP = 8  # kept buffers are never freed: a recorded CUDA graph may read them at their address


def widen_values(v: torch.Tensor, frame_seq_len: int) -> torch.Tensor:
    """v [B, Lk, H, D] -> [B, Lk, H, W] = [v | E | 0]: column D + kf is 1 on the key tokens of key frame kf.

    Without autograd one buffer per call shape (up to 8 shapes) is kept and reused (a rollout makes
    5 x num_layers calls per chunk with one shape; 7 shapes for 21 frames, 0.5 GiB at 1.3B size): only V is
    copied in, the indicator columns stay. While a CUDA graph is being recorded a missing buffer is made for that call alone (kept
    buffers must not come from a graph's memory pool)."""
    B, Lk, H, D = v.shape
    nkf = Lk // frame_seq_len
    key = (B, Lk, H, D, frame_seq_len, v.dtype, v.device)
    capturing = v.is_cuda and torch.cuda.is_current_stream_capturing()
    reuse = not (torch.is_grad_enabled() and v.requires_grad)
    wide = _SCRATCH.get(key) if reuse else None
    if wide is None:
        wide = v.new_zeros(B, nkf, frame_seq_len, H, widened_width(D, nkf))
        wide[..., D : D + nkf] = torch.eye(nkf, dtype=v.dtype, device=v.device)[None, :, None, None, :]
        wide = wide.view(B, Lk, H, -1)
        if reuse and not capturing and len(_SCRATCH) < _KEEP:
            _SCRATCH[key] = wide
    wide[..., :D] = v
    return wide


def attention_with_frame_mass_indicator(q, k, v, *, frame_seq_len: int, scale: float | None = None, kernel=None):
    """(out [B, Lq, H, D] in q's dtype, mass [B, H, nqf, nkf] float32) from one widened attention call.
    Lq and Lk must be whole frames (checked by the caller, see reference.check_frame_inputs).

    kernel: the kernel-table entry (models/common/attention_kernels.py) that computes this call's output in the model;
    None: the one the stock kernels other than the Gluon forward pick (cuDNN on a GPU in bf16/fp16, SDPA elsewhere). Returns None when that
    kernel refuses the widened shape (recorded for that shape; the caller then takes the exact path, so the
    output is still the model's own)."""
    from models.common.attention_kernels import run_or_refuse, select

    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, Lq, H, D = q.shape
    nqf, nkf = Lq // frame_seq_len, k.shape[1] // frame_seq_len
    # ("cudnn-balanced": the stock order without the Gluon forward, whose capture mode is "fused", not this one)
    kernel = kernel or select(q, k, v, frame_seq_len=frame_seq_len, kernel="cudnn-balanced")
    res = run_or_refuse(kernel, q, k, widen_values(v, frame_seq_len), scale)
    if res is None:
        return None
    wide = res[0]  # [B, Lq, H, W]
    per_token = wide[..., D : D + nkf].view(B, nqf, frame_seq_len, H, nkf)
    mass = per_token.mean(dim=2, dtype=torch.float32).permute(0, 2, 1, 3)  # [B, H, nqf, nkf]
    return wide[..., :D], mass
