"""FlexAttention for frame-masked attention on CUDA (the block-causal full-sequence forward).

A frame-level mask [nq, nk] becomes a `BlockMask` (built once per mask and reused by every layer), so no
dense [L, L] mask is ever made. The kernel is compiled once per process.
"""

from __future__ import annotations

import functools

import torch

_compiled = None


def _flex():
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


@functools.lru_cache(maxsize=8)
def _block_mask(mask_bytes: bytes, nq: int, nk: int, q_len: int, k_len: int, fsl: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    frame_mask = torch.frombuffer(bytearray(mask_bytes), dtype=torch.bool).reshape(nq, nk).to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return frame_mask[q_idx // fsl, kv_idx // fsl]

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=q_len, KV_LEN=k_len, device=device)


def flex_frame_attention(q, k, v, frame_mask: torch.Tensor, frame_seq_len: int, scale: float) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D], frame_mask [nq, nk] bool -> out [B, Lq, H, D]."""
    fm = frame_mask.detach().to("cpu", torch.bool).contiguous()
    block_mask = _block_mask(fm.numpy().tobytes(), fm.shape[0], fm.shape[1], q.shape[1], k.shape[1],
                             frame_seq_len, str(q.device))
    out = _flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale)
    return out.transpose(1, 2)
