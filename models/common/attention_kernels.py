"""The attention kernel table: every kernel that computes an attention output, registered once.

A `Kernel` says where it runs (devices, dtypes, masked or unmasked calls, shape rules), what it returns besides
the output (the row log-sum-exp, per-key-frame statistics) and which capture mode reads statistics from it
without changing its output bits. The model's `attention_kernel` setting is a *choice* (`CHOICES`): an order of
preference over the table. For each call `select` takes the first kernel of the order that takes the call, and
`compute` runs it; when the log-sum-exp is asked for and the kernel has none, an exact blockwise pass adds it
(`blockwise_lse`), so the output never depends on whether it was asked for. `attend` (models/common/attention.py),
the store's `attn_backend` attribute (`describe`) and the capture modes (workbench/capture.py) all read this
table, so they cannot disagree about which kernel ran.

    kernel       runs on                            calls      returns           capture mode
    flash-attn   CUDA fp16/bf16, when installed     unmasked   out, lse          -
    gluon        sm90 fp16/bf16, head_dim 128       unmasked   out, lse, frame   fused
    cudnn-balanced  Hopper fp16/bf16 (Triton)       unmasked   out, lse          indicator (V widened)
    cudnn        CUDA fp16/bf16                     unmasked   out, lse          indicator (V widened)
    flash        CUDA fp16/bf16                     unmasked   out, lse          -
    triton       CUDA fp16/bf16, whole frames       unmasked   out, lse, frame   fused
    flex         CUDA                               masked     out               -
    sdpa         anywhere                           both       out               -

Why each one is here (with the measurements in bench/RESULTS.md): docs/architecture.md.

A kernel that refuses a call (the CUDA library ops raise RuntimeError for shapes they do not take) is recorded
for that call's shape only, with a warning naming kernel, shape and reason; that shape runs the next kernel of
the order from then on, and every other shape keeps its kernel (`refused()` lists the records).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from models.errors import ModelInputError

HALF = (torch.bfloat16, torch.float16)

# --------------------------------------------------------------------------------------------------
# Masks and the exact log-sum-exp pass


def token_mask(frame_mask: torch.Tensor, q_len: int, k_len: int, frame_seq_len: int) -> torch.Tensor:
    """Expand a frame-level mask [nq, nk] to tokens [Lq, Lk] (bool, True = attended)."""
    return frame_mask.repeat_interleave(frame_seq_len, 0).repeat_interleave(frame_seq_len, 1)[:q_len, :k_len]


def is_masked(frame_mask) -> bool:
    """Whether a frame mask [nq, nk] leaves any pair out (an all-True mask is an unmasked call)."""
    return frame_mask is not None and not bool(frame_mask.all())


def blockwise_lse(q, k, *, frame_mask=None, frame_seq_len=1, scale=None, block: int = 1024) -> torch.Tensor:
    """Log-sum-exp of every query row over its attended keys, [B, H, Lq] float32, without an [Lq, Lk] tensor
    bigger than `block` query rows."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, Lq, H, _ = q.shape
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    kt = k.float().permute(0, 2, 3, 1)  # [B, H, D, Lk]
    for start in range(0, Lq, block):
        qb = q[:, start : start + block].float().transpose(1, 2)  # [B, H, b, D]
        s = (qb @ kt) * scale  # [B, H, b, Lk]
        if frame_mask is not None:
            m = token_mask(frame_mask, Lq, k.shape[1], frame_seq_len)[start : start + block].to(q.device)
            s = s.masked_fill(~m, float("-inf"))
        lse[:, :, start : start + block] = torch.logsumexp(s, dim=-1)
    return lse


# --------------------------------------------------------------------------------------------------
# The kernels: run(q, k, v, scale, frame_mask or None, frame_seq_len, lse) -> (out, lse or None)
# q [B, Lq, H, D], k/v [B, Lk, H, D] -> out [B, Lq, H, D]; lse [B, H, Lq] float32 natural log


def _run_sdpa(q, k, v, scale, frame_mask, fsl, lse):
    mask = None if frame_mask is None else token_mask(frame_mask, q.shape[1], k.shape[1], fsl).to(q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=scale)  # SDPA wants [B, H, L, D]
    return out.transpose(1, 2), None


def _run_flex(q, k, v, scale, frame_mask, fsl, lse):
    from models.common.flex import flex_frame_attention

    return flex_frame_attention(q, k, v, frame_mask, fsl, scale), None


def _cuda_op(name: str):
    def run(q, k, v, scale, frame_mask, fsl, lse):
        from models.common import cuda_attention

        return getattr(cuda_attention, name)(q, k, v, scale)  # (out, lse): the LSE costs a few KB per call

    return run


def _run_triton(q, k, v, scale, frame_mask, fsl, lse):
    from models.common.triton_attention import frame_attention

    r = frame_attention(q, k, v, frame_seq_len=fsl, scale=scale, with_lse=lse)  # same output bits either way
    return r.out, r.lse


def _run_balanced(q, k, v, scale, frame_mask, fsl, lse):
    from models.common import cuda_attention
    from models.common.balanced_attention import balanced_attention

    return balanced_attention(q, k, v, scale, cuda_attention.cudnn, slots=_gpu(q.device)[0])


_GPUS: dict = {}  # device index -> (SM count, Hopper with Triton installed): asked once, read on every call


def _gpu(device) -> tuple[int, bool]:
    """(SMs, whether the balanced kernel can run: a Hopper GPU, compute capability 9.x, and Triton installed for
    its merge) of a CUDA device."""
    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    if idx not in _GPUS:
        from models.common.triton_version import usable

        has_triton = usable()  # (installed, at a version the kernels were tested with)
        props = torch.cuda.get_device_properties(idx)
        _GPUS[idx] = (props.multi_processor_count, has_triton and props.major == 9)
    return _GPUS[idx]


def _hopper(device) -> bool:
    """Whether `device` is a Hopper GPU with Triton installed (where the balanced kernel runs)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and _gpu(device)[1]


def _balanced_takes(q, k, v, fsl) -> bool:
    """Hopper, half precision, and no autograd: its merge is a Triton launch without a backward, so a call that
    needs gradients (training) runs one cuDNN call instead."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    return q.dtype in HALF and _hopper(q.device)


def _triton_takes(q, k, v, fsl) -> bool:
    from models.common.triton_version import usable

    if not usable():  # triton not installed (the "kernels" extra), or untested: the next kernel of the order
        return False
    from models.common import triton_attention

    return triton_attention.applies(q, k, v, fsl)  # (on CPU tensors under TRITON_INTERPRET=1 too: tests)


def _gluon_gpu(device) -> bool:
    """Whether `device` runs the Gluon forward (models/common/gluon_attention.py): sm90 with Triton's Gluon, unless
    WORKBENCH_GLUON=0."""
    if not _hopper(device):
        return False
    try:
        from models.common import gluon_attention
    except ImportError:
        return False
    import os

    return torch.cuda.get_device_capability(device) == (9, 0) and os.environ.get(gluon_attention.DISABLE_ENV) != "0"


def _gluon_takes(q, k, v, fsl) -> bool:
    """The Gluon forward's calls (unmasked, bf16/fp16, head_dim 128, frames of >= 128 tokens), without autograd
    (it has no backward: training calls run the next kernel)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if q.device.type != "cuda" or not _gluon_gpu(q.device) or not _triton_takes(q, k, v, fsl):
        return False
    from models.common import gluon_attention

    return gluon_attention.applies(q, k, v, fsl, False)


def _has_flash_attn() -> tuple[str, ...]:
    from models.common.cuda_attention import HAS_FLASH_ATTN

    return ("cuda",) if HAS_FLASH_ATTN else ()


@dataclass(frozen=True)
class Kernel:
    """One attention kernel. `devices` / `dtypes` say where it is meant to run (None: any dtype); `takes`, when
    given, decides per call instead (shape rules, the Triton interpreter)."""

    name: str  # what the store's `attn_backend` records
    run: Callable  # (q, k, v, scale, frame_mask | None, frame_seq_len, lse: bool) -> (out, lse | None)
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] | None
    calls: tuple[str, ...]  # "unmasked" and/or "masked" (a frame mask that leaves pairs out)
    returns: tuple[str, ...] = ()  # natively, besides the output: "lse", "frame_mass", "frame_means"
    capture_mode: str | None = None  # the capture mode that reads its statistics at no change to its output
    refuses: bool = False  # may raise RuntimeError for a shape it does not take (recorded per shape)
    takes: Callable | None = None  # (q, k, v, frame_seq_len) -> bool
    on_device: Callable | None = None  # (device) -> bool: a further rule on the device (a GPU architecture)

    def runs_on(self, device, dtype: torch.dtype) -> bool:
        return (torch.device(device).type in self.devices and (self.dtypes is None or dtype in self.dtypes)
                and (self.on_device is None or self.on_device(device)))


KERNELS: dict[str, Kernel] = {}
_CANDIDATES: dict[tuple, tuple[Kernel, ...]] = {}  # (choice, masked or not, device, dtype) -> kernels to try


def register(kernel: Kernel) -> Kernel:
    if kernel.name in KERNELS:
        raise ValueError(f"attention kernel {kernel.name!r} is registered already")
    KERNELS[kernel.name] = kernel
    _CANDIDATES.clear()
    return kernel


_LSE = ("lse",)
register(Kernel("flash-attn", _cuda_op("flash_attn"), _has_flash_attn(), HALF, ("unmasked",), _LSE, refuses=True))
# FlashAttention-3-style warp-specialised forward in Gluon, on sm90 (models/common/gluon_attention.py): the
# frame forward of "triton" takes it there, so its capture mode is "fused"; 0.77x cuDNN's time over a rollout's
# calls (bench/bench_gluon_attention.py)
register(Kernel("gluon", _run_triton, ("cuda",), HALF, ("unmasked",), ("lse", "frame_mass", "frame_means"),
                capture_mode="fused", takes=_gluon_takes, on_device=_gluon_gpu))
# cuDNN's kernel on a wave-balanced schedule (models/common/balanced_attention.py): the same math in two launches
# whose tiles fill the GPU's waves, merged exactly; on Hopper, where it was measured (bench/bench_balanced.py),
# and without autograd (calls that need gradients run the next kernel, one cuDNN call)
register(Kernel("cudnn-balanced", _run_balanced, ("cuda",), HALF, ("unmasked",), _LSE, capture_mode="indicator",
                refuses=True, takes=_balanced_takes, on_device=_hopper))
register(Kernel("cudnn", _cuda_op("cudnn"), ("cuda",), HALF, ("unmasked",), _LSE, capture_mode="indicator",
                refuses=True))
register(Kernel("flash", _cuda_op("flash_op"), ("cuda",), HALF, ("unmasked",), _LSE, refuses=True))
register(Kernel("triton", _run_triton, ("cuda",), HALF, ("unmasked",), ("lse", "frame_mass", "frame_means"),
                capture_mode="fused", takes=_triton_takes))
register(Kernel("flex", _run_flex, ("cuda",), None, ("masked",)))
# (the meta device: shape-only runs of full-size geometries, e.g. the 1.3B model's labels in the tests)
register(Kernel("sdpa", _run_sdpa, ("cuda", "cpu", "meta"), None, ("unmasked", "masked")))

# The model's `attention_kernel` choices: orders of preference over the table.
_STOCK = ("flash-attn", "gluon", "cudnn-balanced", "cudnn", "flash", "flex", "sdpa")
# "cudnn-balanced": the stock order before the Gluon forward; "cudnn": cuDNN's kernel as one call (the stock
# order before the balanced schedule); both for comparisons and for resuming stores they made
CHOICES: dict[str, tuple[str, ...]] = {"auto": _STOCK, "triton": ("triton", *_STOCK), "cudnn": _STOCK[3:],
                                       "cudnn-balanced": _STOCK[2:]}
ATTENTION_KERNELS = tuple(CHOICES)


def check_kernel(choice: str) -> str:
    """A valid `attention_kernel` choice, or a ModelInputError naming the allowed ones."""
    if choice not in CHOICES:
        raise ModelInputError(f"attention kernel {choice!r}; use one of {list(ATTENTION_KERNELS)}")
    return choice


# --------------------------------------------------------------------------------------------------
# Refusals, per shape

_REFUSED: dict[tuple, str] = {}


def _shape_key(kernel: Kernel, q, k, v) -> tuple:
    return kernel.name, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device.type


def refuse(kernel: Kernel, q, k, v, err: Exception) -> None:
    """Record that `kernel` refused this call shape (and say so once)."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    _REFUSED[_shape_key(kernel, q, k, v)] = reason
    warnings.warn(f"attention kernel {kernel.name!r} refused q {tuple(q.shape)}, k {tuple(k.shape)}, "
                  f"v {tuple(v.shape)} {q.dtype} ({reason}); calls of this shape run the next kernel of the order "
                  "from now on, other shapes keep theirs", RuntimeWarning, stacklevel=3)


def refused() -> dict[tuple, str]:
    """{(kernel, q shape, k shape, v shape, dtype, device): reason} of every refusal so far."""
    return dict(_REFUSED)


def refusals(kernel: str, device, dtype: torch.dtype, *, heads: int, head_dim: int) -> list[str]:
    """One line per refusal so far in this process (earlier runs' and training forwards' included) that a model of
    this geometry running the choice `kernel` on this device and dtype meets: a kernel of its order refused a call of
    its heads and head_dim; such calls ran the next kernel of the order. (A store's `attn_refused`: `describe` names
    the kernel meant for its calls.)"""
    order = CHOICES[check_kernel(kernel)]
    return [f"{name} refused q {list(q)}, k {list(k)}, v {list(v)} ({reason}); those calls ran the next kernel of the "
            f"order {list(order)}"
            for (name, q, k, v, dt, dev), reason in _REFUSED.items()
            if name in order and dev == torch.device(device).type and dt == dtype and q[2:] == (heads, head_dim)]


def run_or_refuse(kernel: Kernel, q, k, v, scale: float):
    """(out, lse | None) of an unmasked call on this kernel, or None when it refuses the shape (recorded)."""
    try:
        return kernel.run(q, k, v, scale, None, q.shape[1], False)
    except RuntimeError as err:
        if not kernel.refuses:
            raise
        refuse(kernel, q, k, v, err)
        return None


# --------------------------------------------------------------------------------------------------
# Choosing and running


def select(q, k, v, *, frame_mask=None, frame_seq_len=1, kernel="auto") -> Kernel:
    """The kernel that computes this call's output for the choice `kernel`: the first of its order that takes
    the call (masked or not, device, dtype, shape) and has not refused this shape."""
    call = "masked" if is_masked(frame_mask) else "unmasked"
    static = (kernel, call, q.device.type, q.dtype)
    candidates = _CANDIDATES.get(static)
    if candidates is None:  # the kernels of the order that take such calls on this device and dtype at all
        candidates = _CANDIDATES[static] = tuple(
            KERNELS[name] for name in CHOICES[check_kernel(kernel)]
            if call in KERNELS[name].calls and (KERNELS[name].takes or KERNELS[name].runs_on(*static[2:])))
    for kern in candidates:
        if (kern.takes is None or kern.takes(q, k, v, frame_seq_len)) and not (
                _REFUSED and _shape_key(kern, q, k, v) in _REFUSED):
            return kern
    raise ModelInputError(f"no attention kernel of {kernel!r} takes q {tuple(q.shape)} {q.dtype} on {q.device}")


def compute(q, k, v, *, frame_mask=None, frame_seq_len=1, scale=None, kernel="auto", lse=False):
    """(out [B, Lq, H, D], lse [B, H, Lq] float32 or None, the Kernel that ran) = softmax(q k^T * scale) v over
    the attended keys. The output is the same bits whether or not `lse` is asked for."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = frame_mask if is_masked(frame_mask) else None
    while True:
        kern = select(q, k, v, frame_mask=mask, frame_seq_len=frame_seq_len, kernel=kernel)
        try:
            out, row_lse = kern.run(q, k, v, scale, mask, frame_seq_len, lse)
        except RuntimeError as err:
            if not kern.refuses:
                raise
            refuse(kern, q, k, v, err)
            continue
        if lse and row_lse is None:
            row_lse = blockwise_lse(q, k, frame_mask=frame_mask, frame_seq_len=frame_seq_len, scale=scale)
        return out, (row_lse if lse else None), kern


def plain_attention(q, k, v, *, frame_mask=None, frame_seq_len=1, scale=None, kernel="auto") -> torch.Tensor:
    """out [B, Lq, H, D] = softmax(q k^T * scale) v, over the attended keys only (`compute` without the LSE)."""
    return compute(q, k, v, frame_mask=frame_mask, frame_seq_len=frame_seq_len, scale=scale, kernel=kernel)[0]


def attention_with_lse(q, k, v, *, frame_mask=None, frame_seq_len=1, scale=None, kernel="auto"):
    """(out, lse): out exactly as `plain_attention` computes it, lse [B, H, Lq] float32 natural log."""
    out, lse, _ = compute(q, k, v, frame_mask=frame_mask, frame_seq_len=frame_seq_len, scale=scale, kernel=kernel,
                          lse=True)
    return out, lse


def describe(device="cpu", dtype: torch.dtype = torch.bfloat16, kernel: str = "auto", *, heads: int | None = None,
             head_dim: int | None = None, frame_seq_len: int | None = None) -> str:
    """The name of the kernel that runs unmasked calls for the choice `kernel` on this device and dtype. With a
    model's geometry (heads, head_dim, frame_seq_len) it is the kernel `select` picks for such a call, the kernels'
    shape rules applied (the store's `attn_backend`: e.g. `cudnn-balanced` where the Gluon forward does not take
    a small model's head_dim); without, it is where each kernel is meant to run (a store's fingerprint). A refusal
    that a CUDA library op makes at run time (`refuse`: warned) does not change it: `refusals` lists those."""
    dev = torch.device(device).type
    if head_dim is not None and frame_seq_len is not None:
        # one query frame against one key frame, as the model's calls are laid out (contiguous [B, L, heads, D]),
        # without autograd (the rollouts' calls; a training forward's run the next kernel, see `_balanced_takes`)
        with torch.no_grad():
            x = torch.empty(1, frame_seq_len, heads or 1, head_dim, dtype=dtype, device=device)
            try:
                return select(x, x, x, frame_seq_len=frame_seq_len, kernel=kernel).name
            except ModelInputError:
                return "sdpa"
    for name in CHOICES[check_kernel(kernel)]:
        kern = KERNELS[name]
        if "unmasked" in kern.calls and kern.runs_on(dev, dtype):
            return name
    return "sdpa"


def capture_mode_of(kernel: str, device="cuda", dtype: torch.dtype = torch.bfloat16, **geometry) -> str | None:
    """The capture mode that reads frame statistics from the kernel that runs the choice's unmasked calls (`describe`:
    for a model of this geometry when given), by default on a GPU in bf16, where capture modes matter: "indicator"
    for the stock kernels (cuDNN), "fused" for "triton" and "gluon"; None when none does."""
    return KERNELS[describe(device, dtype, kernel, **geometry)].capture_mode
