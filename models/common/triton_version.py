"""Whether the repository's Triton and Gluon kernels run here: triton installed, at a version they were tested with.

The kernels (models/common/triton_attention*.py, gluon_attention.py, triton_balanced_merge.py,
models/wan/triton_*.py, workbench/kernels/frame_attention.py) use triton APIs that move between releases (Gluon, TMA
descriptors, the interpreter), and were checked, bitwise and against float64, with triton 3.6 (the `kernels` extra;
the triton of torch 2.11, which the GPU tests ran). A torch that brings another triton (torch 2.15's triton 3.9:
its interpreter refuses one of the kernels' masks and its Gluon no longer compiles the forward; torch 2.7's triton
3.3 has no Gluon) runs the stock paths instead, with a warning once: cuDNN attention, PyTorch's norms and RoPE, the
blockwise statistics (slower; the same definitions, so a store's numbers differ only by rounding).
WORKBENCH_TRITON_UNTESTED=1 runs the kernels on any triton.

    usable()    True when the kernels run (decided once per process; `reset()` decides again)
"""

from __future__ import annotations

import os
import warnings

import torch

TESTED = ("3.6",)  # major.minor of the triton releases the kernels were tested with
ENV = "WORKBENCH_TRITON_UNTESTED"


def version() -> str | None:
    """The installed triton's version, or None when there is none."""
    try:
        import triton
    except ImportError:
        return None
    return str(getattr(triton, "__version__", "0"))


_USABLE: bool | None = None  # the answer, once decided


def usable() -> bool:
    """Whether the repository's Triton kernels run: triton is installed at a tested version (`TESTED`), or
    WORKBENCH_TRITON_UNTESTED=1. An untested version warns once, naming what runs instead."""
    global _USABLE
    if _USABLE is None:
        if torch.compiler.is_compiling():  # (met first inside torch.compile's trace: answered there without the
            return _decide(warn=False)     # warning, which not every torch's compiler traces; an eager call warns)
        _USABLE = _decide()
    return _USABLE


def reset() -> None:
    """Forget the answer: the next `usable()` decides again (tests)."""
    global _USABLE
    _USABLE = None


def _decide(warn: bool = True) -> bool:
    found = version()
    if found is None:
        return False
    if ".".join(found.split(".")[:2]) in TESTED or os.environ.get(ENV) == "1":
        return True
    if warn:
        _warn(found)
    return False


def _warn(found: str) -> None:
    warnings.warn(f"triton {found} is not a version the workbench's Triton kernels were tested with "
                  f"({', '.join(v + '.x' for v in TESTED)}): they are off, and the stock paths run (cuDNN attention, "
                  "PyTorch's norms and RoPE, blockwise statistics: slower, the same numbers up to rounding). Install "
                  f"triton {TESTED[-1]} (pip install -e \".[kernels]\", with a torch that takes it: 2.11), or set "
                  f"{ENV}=1 to run them on this one", RuntimeWarning, stacklevel=4)  # (usable()'s caller)
