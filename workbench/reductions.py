"""Exact attention statistics, one function per statistic (definitions in docs/store.md).

Inputs are the q, k of one attention call as the kernel saw them (post RMSNorm and RoPE, keys = the cache
window): q [B, Lq, H, D] with Lq = nqf * fsl, k [B, Lk, H, D] with Lk = nkf * fsl (self-attention) or
text_len (cross-attention). Every function returns float32 on the input's device; nothing of size Lq x Lk is
ever built for a whole call (blockwise on the CPU, Triton kernels on CUDA, see workbench/kernels).

    attn_mass       [B, H, nqf, nkf]    frame_mass(q, k, lse, fsl, mask)
    attn_logit      [B, H, nqf, nkf]    mean_logit(q, k, fsl)        = mean_q . mean_k / sqrt(d), exact
    cross_mass      [B, H, nqf, T]      cross_mass(q, k, fsl)
    attn_key_token  [B, H, nqf, Lk]     key_token_mass(q, k, lse, fsl, mask)
    attn_frame_entropy [B, H, nqf]      frame_entropy(q, k, lse, fsl, mask)

The statistics registry (workbench/statistics.py) names which function makes which store variable; the same
functions serve the `extract` command, training probes and the nnsight recipe.
"""

from __future__ import annotations

import math

import torch

from models.common.triton_version import usable
from workbench.kernels import reference


def _scale(q) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


def frame_mass(q, k, lse, frame_seq_len: int, frame_mask=None) -> torch.Tensor:
    """attn_mass: per query token, softmax probability summed per key frame, averaged per query frame.
    lse [B, H, Lq] is the log-sum-exp of the call's rows (natural log). Masked pairs come back as 0."""
    if q.is_cuda and usable():
        from workbench.kernels import frame_attention

        return frame_attention.frame_mass_from_lse(q, k, lse, frame_seq_len=frame_seq_len, scale=_scale(q),
                                                   allowed=frame_mask)
    return reference.frame_mass_reference(q, k, frame_seq_len=frame_seq_len, scale=_scale(q), allowed=frame_mask,
                                          lse=lse)


def key_token_mass(q, k, lse, frame_seq_len: int, frame_mask=None) -> torch.Tensor:
    """attn_key_token: per query frame, the mean over its query tokens of the probability of each key token."""
    if q.is_cuda and usable():
        from workbench.kernels import frame_attention

        return frame_attention.key_token_mass_from_lse(q, k, lse, frame_seq_len=frame_seq_len, scale=_scale(q),
                                                       allowed=frame_mask)
    return reference.key_token_mass_reference(q, k, frame_seq_len=frame_seq_len, scale=_scale(q), allowed=frame_mask,
                                              lse=lse)


def frame_entropy(q, k, lse, frame_seq_len: int, frame_mask=None) -> torch.Tensor:
    """attn_frame_entropy [B, H, nqf] float32: per query token, the entropy (nats) of its softmax mass summed per
    key frame, averaged per query frame (docs/store.md). Blockwise torch on every device (one query frame and
    about 8192 key tokens of scores at a time); lse [B, H, Lq] as for `frame_mass`."""
    return reference.frame_entropy_reference(q, k, frame_seq_len=frame_seq_len, scale=_scale(q), allowed=frame_mask,
                                             lse=lse)


def mean_logit(q, k, frame_seq_len: int, means=None) -> torch.Tensor:
    """attn_logit [B, H, nqf, nkf] float32: the mean pre-softmax logit over the token pairs of two frames, exactly
    mean_q(qf) . mean_k(kf) / sqrt(d) by bilinearity (docs/store.md). Not masked: the caller NaNs masked pairs.
    The means and their dot products are taken in float64 (tiny tensors): the dot product of two mean vectors
    cancels, and float32 there loses ~1e-6 of the logit. means: the frame means (q_means [B, H, nqf, D],
    k_means [B, H, nkf, D]) when a kernel already made them (then only the dot products are float64)."""
    if means is None:
        means = (reference.frame_means_reference(q, frame_seq_len, dtype=torch.float64),
                 reference.frame_means_reference(k, frame_seq_len, dtype=torch.float64))
    qm, km = (m.double() for m in means)
    return (qm @ km.transpose(-1, -2) * _scale(q)).float()


def cross_mass(q, k, frame_seq_len: int, rows: int = 4096) -> torch.Tensor:
    """cross_mass: per query frame, the mean over its tokens of the softmax over the text tokens [B, H, nqf, T].
    Text is short (512 tokens), so blocks of `rows` query tokens are materialised and reduced at once."""
    B, Lq, H, _ = q.shape
    kt = k.float().permute(0, 2, 3, 1)  # [B, H, D, T]
    sums = torch.zeros(B, H, Lq // frame_seq_len, k.shape[1], dtype=torch.float32, device=q.device)
    for start in range(0, Lq, rows):
        qb = q[:, start : start + rows].float().transpose(1, 2)  # [B, H, r, D]
        p = torch.softmax(qb @ kt * _scale(q), dim=-1)  # [B, H, r, T]
        frame = torch.arange(start, start + qb.shape[2], device=q.device) // frame_seq_len
        sums.index_add_(2, frame, p)
    return sums / frame_seq_len
