"""Exact frame-aggregated attention: blockwise torch references (CPU path) and Triton kernels (GPU path).

`reference` is plain torch and always importable. `frame_attention` needs triton and is imported lazily on
first use of one of its names (so that TRITON_INTERPRET=1, when wanted, can be set before the kernels are
decorated). `attention_with_frame_mass(q, k, v, ...)` picks the Triton frame forward on CUDA and the reference elsewhere.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

from models.common.triton_version import usable
from workbench.kernels.reference import (
    check_frame_inputs,
    frame_attention_reference,
    frame_mass_reference,
    frame_means_reference,
    key_token_mass_reference,
    row_lse_reference,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None

_KERNEL_NAMES = (
    "frame_forward_with_stats",
    "frame_mass_from_lse",
    "key_token_mass_from_lse",
    "lse_from_sdpa",
)


def __getattr__(name):
    if name in _KERNEL_NAMES:
        if not HAS_TRITON:
            raise ImportError(f"workbench.kernels.{name} needs triton (pip install triton); the torch reference "
                              "functions in workbench.kernels.reference work without it")
        module = importlib.import_module("workbench.kernels.frame_attention")
        return getattr(module, name)
    raise AttributeError(f"module 'workbench.kernels' has no attribute {name!r}")


def attention_with_frame_mass(q, k, v, *, frame_seq_len, scale=None, allowed=None, frame_means=False):
    """(out [B, Lq, H, D], mass [B, H, nqf, nkf] float32): the Triton frame forward for bf16/fp16 CUDA
    tensors, the blockwise torch reference otherwise. frame_means: also return the per-frame mean vectors
    (q_means [B, H, nqf, D], k_means [B, H, nkf, D] float32; the Triton frame forward makes them on the way)."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and usable():
        from workbench.kernels.frame_attention import frame_forward_with_stats

        return frame_forward_with_stats(q, k, v, frame_seq_len=frame_seq_len, scale=scale, allowed=allowed,
                                     frame_means=frame_means)
    out, mass = frame_attention_reference(q, k, v, frame_seq_len=frame_seq_len, scale=scale, allowed=allowed)
    if not frame_means:
        return out, mass
    return out, mass, frame_means_reference(q, frame_seq_len), frame_means_reference(k, frame_seq_len)


__all__ = [
    "HAS_TRITON",
    "check_frame_inputs",
    "attention_with_frame_mass",
    "frame_attention_reference",
    "frame_mass_reference",
    "frame_means_reference",
    "key_token_mass_reference",
    "row_lse_reference",
    *_KERNEL_NAMES,
]
