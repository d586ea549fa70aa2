"""The CUDA library attention ops that also return the row log-sum-exp: cuDNN, the flash SDPA op, flash-attn.

Each takes q [B, Lq, H, D], k [B, Lk, H, D], v [B, Lk, H, Dv] and a softmax scale, and returns
(out [B, Lq, H, Dv] in q's dtype, lse [B, H, Lq] float32, natural log), unmasked. They raise RuntimeError for
shapes and dtypes they do not take; the kernel table (models/common/attention_kernels.py) records that per shape and
runs the next kernel of its order for that shape. Nothing here chooses between them.
"""

from __future__ import annotations

import torch

try:
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:
    _flash_attn_func = None

HAS_FLASH_ATTN = _flash_attn_func is not None


def cudnn(q, k, v, scale: float):
    """The cuDNN SDPA op (the model's attention on an H200). Also takes a value head dim other than q's: the
    indicator capture mode widens V and reads the same bits in its first head_dim columns."""
    # aten op on [B, H, L, D]: returns (out, logsumexp [B, H, L(, 1)], ...)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False, scale=scale
    )
    out, lse = res[0], res[1]  # lse [B, H, Lq, 1]
    return out.transpose(1, 2), lse.reshape(lse.shape[0], lse.shape[1], -1)[:, :, : q.shape[1]].float()


def flash_op(q, k, v, scale: float):
    """PyTorch's flash SDPA op."""
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, False, scale=scale
    )
    return res[0].transpose(1, 2), res[1][:, :, : q.shape[1]].float()  # lse [B, H, Lq]


def flash_attn(q, k, v, scale: float):
    """The flash-attn package's kernel (the `flash` extra); RuntimeError when it is not installed."""
    if _flash_attn_func is None:
        raise RuntimeError("flash-attn is not installed")
    out, lse, _ = _flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
    return out, lse.float()
