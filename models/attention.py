"""The attention entry point: every self- and cross-attention call of the Wan models goes through `attend`.

Each call carries what it is, as an `AttentionCall`:
- from the rollout (`ForwardLabels`): denoising step, timestep, chunk, phase (denoise / context), CFG branch;
- from the model: layer index and kind (self / cross);
- from the KV cache: the absolute latent frame of every query frame and key frame (after sink and window
  eviction the key frames are not contiguous, e.g. 0-2 then 12-20), and which (query, key) frame pairs are
  attended when a mask applies (block-causal full-sequence forward).

Observers (the workbench's probes, anything with `wants` and `observe`) are passed in by the model; `models/`
never imports them. With no observer interested in a call, `attend` is exactly the plain kernel call.
When an observer asks for the log-sum-exp it is computed by a kernel that returns it (CUDA) or a blockwise
pass (CPU), and the output is computed the same way as without observers, so capture never changes outputs.

Kernels (`attention_kernel`, a WanModel attribute carried by every call as `call.kernel`):
- "auto" (default): flash-attn when it imports (and inputs are fp16/bf16 on CUDA), the cuDNN / flash SDPA
  ops otherwise, PyTorch SDPA on the CPU.
- "triton": unmasked calls over whole frames run `models.triton_attention.frame_attention`, a frame-tiled
  FlashAttention forward that can also hand observers per-frame statistics from the same pass, at no change
  to the output. With it, the workbench's "fused" capture is bitwise neutral and nearly free. Other calls
  (masked, text cross-attention, CPU) use the "auto" kernels.
Frame-masked calls always use FlexAttention on CUDA and SDPA with a dense mask on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Labels


@dataclass(frozen=True)
class ForwardLabels:
    """What the rollout knows about one DiT forward. `step` is the position in the per-chunk schedule."""

    step: int  # 0..S-1: denoising steps in order, then the context pass
    timestep: float  # the timestep the DiT sees (for per-frame timesteps: that of the chunk being denoised)
    chunk: int  # generation block index; 0 for a bidirectional forward over every frame
    phase: str = "denoise"  # "denoise" | "context" | "train"
    cfg: str = "none"  # "cond" | "uncond" | "none"
    denoise_index: int = 0  # index into the denoising schedule; -1 for the context pass


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """The identity of one attention call. Frames are absolute latent frame indices."""

    layer: int
    kind: str  # "self" | "cross"
    labels: ForwardLabels | None
    query_frames: tuple[int, ...]  # one entry per query frame, in token order
    key_frames: tuple[int, ...] | None  # one entry per key frame in token order; None for cross-attention
    frame_seq_len: int  # tokens per latent frame
    grid: tuple[int, int]  # (height, width) of a frame's token grid
    frame_mask: torch.Tensor | None = None  # [n_query_frames, n_key_frames] bool, True = attended; None = all
    num_heads: int = 0
    head_dim: int = 0
    kernel: str = "auto"  # the model's attention kernel (ATTENTION_KERNELS); see `kernel_runs`

    @property
    def step(self) -> int | None:
        return None if self.labels is None else self.labels.step

    @property
    def timestep(self) -> float | None:
        return None if self.labels is None else self.labels.timestep

    @property
    def chunk(self) -> int | None:
        return None if self.labels is None else self.labels.chunk


class AttentionObserver(Protocol):
    """What the model needs from an observer (the workbench's probes implement this)."""

    needs_lse: bool  # ask the entry point for the log-sum-exp of every query row

    def wants(self, call: AttentionCall) -> bool: ...

    def observe(self, call: AttentionCall, q, k, v, out, lse) -> None:
        """q [B, Lq, H, D], k/v [B, Lk, H, D] as the kernel saw them; out [B, Lq, H, D];
        lse [B, H, Lq] float32 (natural log) or None."""

    # Optional: an observer with `computes_output = True` gets `compute(call, q, k, v)` instead of `observe`
    # and returns the attention output (or None to let the entry point compute it and call `observe`).


# --------------------------------------------------------------------------------------------------
# Kernels

ATTENTION_KERNELS = ("auto", "triton")


def check_kernel(kernel: str) -> str:
    if kernel not in ATTENTION_KERNELS:
        from models.errors import ModelInputError

        raise ModelInputError(f"attention kernel {kernel!r}; use one of {list(ATTENTION_KERNELS)}")
    return kernel


def backend_name(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                 kernel: str = "auto") -> str:
    """Which kernel runs for unmasked self-attention on this device and dtype (masked calls use FlexAttention
    on CUDA and SDPA with a dense mask on the CPU)."""
    if check_kernel(kernel) == "triton" and torch.device(device).type == "cuda" and dtype in (torch.bfloat16,
                                                                                              torch.float16):
        return "triton (models.triton_attention)"
    if torch.device(device).type == "cuda":
        from models.cuda_attention import active_kernel

        return active_kernel(dtype)
    return "sdpa (cpu)"


def token_mask(frame_mask: torch.Tensor, q_len: int, k_len: int, frame_seq_len: int) -> torch.Tensor:
    """Expand a frame-level mask [nq, nk] to tokens [Lq, Lk] (bool, True = attended)."""
    return frame_mask.repeat_interleave(frame_seq_len, 0).repeat_interleave(frame_seq_len, 1)[:q_len, :k_len]


def _sdpa(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    # SDPA wants [B, H, L, D]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _flex(q, k, v, frame_mask: torch.Tensor, frame_seq_len: int, scale: float) -> torch.Tensor:
    """Block-causal (or any frame-masked) attention on CUDA without a dense [L, L] mask."""
    from models.flex import flex_frame_attention

    return flex_frame_attention(q, k, v, frame_mask, frame_seq_len, scale)


def _masked(frame_mask) -> bool:
    return frame_mask is not None and not bool(frame_mask.all())


def kernel_runs(q, k, v, *, frame_mask=None, frame_seq_len=1, kernel="auto") -> str:
    """"triton" when the model's Triton forward computes this call, else "auto" (the stock kernels)."""
    if kernel != "triton" or _masked(frame_mask):
        return "auto"
    try:
        from models import triton_attention
    except ImportError:  # triton not installed (the "kernels" extra): the stock kernels
        return "auto"

    return "triton" if triton_attention.applies(q, k, v, frame_seq_len) else "auto"


def plain_attention(q, k, v, *, frame_mask=None, frame_seq_len=1, scale=None, kernel="auto") -> torch.Tensor:
    """out [B, Lq, H, D] = softmax(q k^T * scale) v, over the attended keys only."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if _masked(frame_mask):
        if q.is_cuda:
            return _flex(q, k, v, frame_mask, frame_seq_len, scale)
        return _sdpa(q, k, v, token_mask(frame_mask, q.shape[1], k.shape[1], frame_seq_len).to(q.device), scale)
    if kernel_runs(q, k, v, frame_seq_len=frame_seq_len, kernel=kernel) == "triton":
        from models.triton_attention import frame_attention

        return frame_attention(q, k, v, frame_seq_len=frame_seq_len, scale=scale).out
    if q.is_cuda:  # the same kernel as attention_with_lse, so capture never changes the output
        from models.cuda_attention import sdpa_with_lse

        return sdpa_with_lse(q, k, v, scale)[0]
    return _sdpa(q, k, v, None, scale)


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


def attention_with_lse(q, k, v, *, frame_mask=None, frame_seq_len=1, scale=None, kernel="auto"):
    """(out, lse): out exactly as `plain_attention` computes it, lse [B, H, Lq] float32 natural log."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if kernel_runs(q, k, v, frame_mask=frame_mask, frame_seq_len=frame_seq_len, kernel=kernel) == "triton":
        from models.triton_attention import frame_attention

        r = frame_attention(q, k, v, frame_seq_len=frame_seq_len, scale=scale, with_lse=True)
        return r.out, r.lse
    if q.is_cuda and frame_mask is None:
        from models.cuda_attention import sdpa_with_lse

        return sdpa_with_lse(q, k, v, scale)
    out = plain_attention(q, k, v, frame_mask=frame_mask, frame_seq_len=frame_seq_len, scale=scale)
    return out, blockwise_lse(q, k, frame_mask=frame_mask, frame_seq_len=frame_seq_len, scale=scale)


# --------------------------------------------------------------------------------------------------
# The entry point


def attend(q, k, v, call: AttentionCall, observers: Sequence[AttentionObserver] = ()) -> torch.Tensor:
    """Every attention call of the model. q [B, Lq, H, D]; k, v [B, Lk, H, D] -> out [B, Lq, H, D]."""
    interested = [obs for obs in observers if obs.wants(call)] if observers else ()
    mask, fsl, kernel = call.frame_mask, call.frame_seq_len, call.kernel
    if not interested:
        return plain_attention(q, k, v, frame_mask=mask, frame_seq_len=fsl, kernel=kernel)
    for obs in interested:  # an observer may compute the attention itself (a fused kernel with statistics)
        out = obs.compute(call, q, k, v) if getattr(obs, "computes_output", False) else None
        if out is not None:
            for other in interested:
                if other is not obs:
                    other.observe(call, q, k, v, out, None)
            return out
    if any(obs.needs_lse for obs in interested):
        out, lse = attention_with_lse(q, k, v, frame_mask=mask, frame_seq_len=fsl, kernel=kernel)
    else:
        out, lse = plain_attention(q, k, v, frame_mask=mask, frame_seq_len=fsl, kernel=kernel), None
    for obs in interested:
        obs.observe(call, q, k, v, out, lse)
    return out


class Attend(torch.nn.Module):
    """A parameter-free module around `attend`, so that hook-based tools (nnsight, forward hooks) see the
    exact q, k, v of every call as this module's inputs: `blocks[3].self_attn.attend.inputs`. A torch.compile'd
    block runs it eagerly (models/accel.py marks it so): its kernels and observers are Python-dispatched."""

    def forward(self, q, k, v, call: AttentionCall, observers: Sequence[AttentionObserver] = ()):
        return attend(q, k, v, call, observers)


@dataclass
class ObserverList:
    """The observers attached to one model; `WanModel.observers` is one of these."""

    items: list = field(default_factory=list)

    def add(self, observer) -> "ObserverHandle":
        self.items.append(observer)
        return ObserverHandle(self, observer)

    def __iter__(self):
        return iter(self.items)

    def __bool__(self):
        return bool(self.items)

    def __len__(self):
        return len(self.items)


@dataclass
class ObserverHandle:
    owner: ObserverList
    observer: object

    def remove(self) -> None:
        if self.observer in self.owner.items:
            self.owner.items.remove(self.observer)

    def __enter__(self):
        return self.observer

    def __exit__(self, *exc):
        self.remove()
