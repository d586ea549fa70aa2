"""What every Triton kernel of the repository shares: interpreter mode and the input checks of a launch.

The model's frame-attention forward (models/common/triton_attention.py) and the workbench's statistics kernels
(workbench/kernels/frame_attention.py) launch with these, so both check inputs, and run under the
interpreter, the same way.

CPU testing: with TRITON_INTERPRET=1 set before the kernel modules are imported, the kernels run on CPU tensors
in Triton's interpreter (`INTERPRET`). The interpreter (triton 3.6) multiplies bfloat16 operands of tl.dot as
raw uint16 and rounds fp32->bf16 casts by truncation, so under the interpreter bf16 tiles are upcast to fp32
before the dots (the kernels' constexpr DOT_F32, never set on a GPU).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

from models.errors import ModelInputError

try:  # host-side TMA descriptors (triton >= 3.2); used on Hopper and newer
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None
try:  # the allocator triton asks for a launch's global scratch (a ContextVar in triton 3.6)
    from triton.runtime._allocation import _allocator as _SCRATCH_ALLOCATOR
except ImportError:  # pragma: no cover
    _SCRATCH_ALLOCATOR = None

# Read once: triton.jit decides at decoration time whether a kernel is interpreted.
INTERPRET = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else \
    os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

LOG2E = 1.4426950408889634
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _patch_interpreter_for_numpy2():
    """triton 3.6's interpreter turns a scalar into a Python int with int(array of shape (1,)), which
    numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"), so every loop with a runtime bound
    fails. Re-point tensor.__index__ at .item() (interpreter only; compiled kernels are untouched)."""
    from triton.runtime import interpreter as _interp

    if getattr(_interp, "_wb_index_patched", False) or not hasattr(_interp, "_patch_lang_tensor"):
        return
    original = _interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = patched
    _interp._wb_index_patched = True


if INTERPRET:
    _patch_interpreter_for_numpy2()


def check_device_and_dtype(q, D):
    """ModelInputError unless q's dtype, head dim D and device suit the frame kernels (before any work)."""
    if q.dtype not in FLOAT_DTYPES:
        raise ModelInputError(f"triton frame kernels take bfloat16, float16 or float32; got {q.dtype}")
    if D < 16 or D > 256 or D & (D - 1):
        raise ModelInputError(f"triton frame kernels need head_dim a power of two in [16, 256]; got {D}")
    if q.device.type != "cuda" and not INTERPRET:
        raise ModelInputError(
            f"triton frame kernels need CUDA tensors (got {q.device}); on CPU use the torch reference "
            "or set TRITON_INTERPRET=1 before importing models.common.triton_attention"
        )
    if INTERPRET and q.device.type != "cpu":
        raise ModelInputError(f"under TRITON_INTERPRET=1 the kernels take CPU tensors; got {q.device}")


def last_dim_contiguous(*ts):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def int32_ok(*ts):
    for t in ts:
        if t.numel() >= 2**31:
            raise ModelInputError(f"tensor of {t.numel()} elements is too large for int32 indexing in the kernel")


def allowed_arg(allowed, like):
    """(pointer tensor, has_mask) for a frame mask [nqf, nkf] bool or None (then any tensor: never read)."""
    if allowed is None:
        return like, False
    return allowed.to(device=like.device, dtype=torch.int8).contiguous(), True


def tma_usable(k, v):
    if INTERPRET or TensorDescriptor is None or k.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    # the 2-D view [B * Lk, H * D] needs heads packed in the last dim and batches back to back
    return all(t.is_contiguous() for t in (k, v))


def on_device(t: torch.Tensor):
    """A context that makes t's GPU the current one for a launch (nothing on the CPU)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def scratch_from_torch(device):
    """Within it, a launch that needs global scratch (a TMA descriptor built in the kernel: 128 bytes a program)
    gets it from torch's caching allocator on `device`: ordered on the launch's stream, and inside a CUDA-graph
    capture taken from the graph's pool. The allocator set before (triton.set_allocator) is restored after."""

    def alloc(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    if _SCRATCH_ALLOCATOR is None:  # pragma: no cover  (another triton: set it for the process)
        triton.set_allocator(alloc)
        yield
        return
    token = _SCRATCH_ALLOCATOR.set(alloc)
    try:
        yield
    finally:
        _SCRATCH_ALLOCATOR.reset(token)
