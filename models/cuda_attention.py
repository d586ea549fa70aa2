"""Unmasked attention on CUDA through one kernel that can also return the log-sum-exp.

`attend` must give the same output whether or not a probe asked for the log-sum-exp, so on CUDA both cases
call the same kernel (the LSE output is a few KB per call). Order of preference: flash-attn (when
installed), the cuDNN SDPA op, the flash SDPA op, then plain SDPA plus a blockwise LSE pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:
    _flash_attn_func = None

_BROKEN: set[str] = set()  # ops that raised once on this machine (unsupported shape or dtype)


def _cudnn(q, k, v, scale):
    # aten op on [B, H, L, D]: returns (out, logsumexp [B, H, L(, 1)], ...)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False, scale=scale
    )
    out, lse = res[0], res[1]  # lse [B, H, Lq, 1]
    return out.transpose(1, 2), lse.reshape(lse.shape[0], lse.shape[1], -1)[:, :, : q.shape[1]].float()


def _flash_op(q, k, v, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, False, scale=scale
    )
    return res[0].transpose(1, 2), res[1][:, :, : q.shape[1]].float()  # lse [B, H, Lq]


def _flash_attn(q, k, v, scale):
    out, lse, _ = _flash_attn_func(q, k, v, softmax_scale=scale, return_attn_probs=True)
    return out, lse.float()


def kernel_order(dtype: torch.dtype) -> list[str]:
    order = []
    if dtype in (torch.float16, torch.bfloat16):
        if _flash_attn_func is not None:
            order.append("flash-attn")
        order += ["cudnn", "flash"]
    return [name for name in order if name not in _BROKEN]


_KERNELS = {"flash-attn": _flash_attn, "cudnn": _cudnn, "flash": _flash_op}


def sdpa_with_lse(q, k, v, scale: float):
    """(out [B, Lq, H, D], lse [B, H, Lq] float32, natural log) for unmasked attention on CUDA."""
    for name in kernel_order(q.dtype) if q.is_cuda else ():
        try:
            return _KERNELS[name](q, k, v, scale)
        except RuntimeError:
            _BROKEN.add(name)
    from models.attention import blockwise_lse

    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2), blockwise_lse(q, k, scale=scale)


def active_kernel(dtype: torch.dtype) -> str:
    order = kernel_order(dtype)
    return order[0] if order else "sdpa+blockwise-lse"


def attention_any_value_dim(q, k, v, scale: float) -> torch.Tensor:
    """out [B, Lq, H, Dv] for unmasked attention whose value head dim may differ from q's (Dv != D): the cuDNN
    op when it accepts the shapes, else PyTorch SDPA's choice (memory-efficient kernel). No log-sum-exp."""
    if q.dtype in (torch.float16, torch.bfloat16) and ("cudnn", "any-dv") not in _BROKEN:
        try:
            return _cudnn(q, k, v, scale)[0]
        except RuntimeError:
            _BROKEN.add(("cudnn", "any-dv"))  # recorded apart from the square case, which keeps its kernel
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)
