"""Exact frame-aggregated attention: blockwise torch references (CPU path) and Triton kernels (GPU path).

`reference` is plain torch and always importable. `frame_attention` needs triton and is imported lazily on
first use of one of its names (so that TRITON_INTERPRET=1, when wanted, can be set before the kernels are
decorated). Captures pick between them through the kernel table (models/common/attention_kernels.py) and the
capture's modes (workbench/capture.py), not here.
"""

from __future__ import annotations

import importlib
import importlib.util

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


__all__ = [
    "HAS_TRITON",
    "check_frame_inputs",
    "frame_attention_reference",
    "frame_mass_reference",
    "frame_means_reference",
    "key_token_mass_reference",
    "row_lse_reference",
    *_KERNEL_NAMES,
]
