"""A frame-tiled FlashAttention forward in Triton: the model's optional attention kernel, with statistics on the side.

`frame_attention(q, k, v, frame_seq_len=...)` computes softmax(q k^T * scale) v for an unmasked (or frame-masked)
call whose query and key lengths are whole frames, as the model's other kernels do
(models/common/attention_kernels.py). It is the kernel behind `attention_kernel="triton"` (WanModel), and it can
also return, from the same pass and without changing one bit of the output:
- `row_mass` [B, H, nkf, Lq]: per query row, the softmax probability summed over each key frame, divided by
  frame_seq_len (so that a sum over a query frame's rows is that frame's mean mass);
- `q_means` [B, H, nqf, D] / `k_means` [B, H, nkf, D]: the mean q and k vector of every frame (float32);
- `lse` [B, H, Lq]: the row log-sum-exp (natural log).
The workbench's probes ask for these; the output bits are the same whether or not they do.

How it works: models/common/triton_attention_kernels.py (the kernels; FlashAttention-2's online softmax with
the frame sums beside it, split tiles merged by a second kernel).

Layouts: q [B, Lq, H, D], k and v [B, Lk, H, D] (last dim contiguous), allowed [nqf, nkf] bool. D a power of
two (Wan: 128). bf16/fp16 use tensor cores; fp32 uses exact fp32 dots ("ieee", slow; for tests).

Public API (what the rest of the repository uses): `frame_attention` and its result `FrameAttention`,
`applies` (whether it takes a call) and `runs_on` (where it runs); launch helpers: models/common/triton_common.py
(also for CPU testing under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import triton

from models.common.triton_attention_kernels import (_frame_attn_fwd_kernel, _frame_attn_merge_kernel,
                                                     _frame_means_finish_kernel, _frame_row_sums_kernel)
from models.common.triton_attention_plan import default_config, resident_programs, split_plan
from models.common.triton_common import (FLOAT_DTYPES, INTERPRET, LOG2E, TensorDescriptor, allowed_arg,
                                         check_device_and_dtype, int32_ok, last_dim_contiguous, on_device,
                                         scratch_from_torch, tma_usable)
from models.errors import ModelInputError

try:  # the Hopper forward in Gluon (triton >= 3.5); frame_attention runs it where it applies
    from models.common import gluon_attention
except ImportError:  # pragma: no cover
    gluon_attention = None

WS_GPU_ENV = "WORKBENCH_EXPERIMENTAL_WS"  # WS=True on a GPU only with this set to 1 (the launcher says why)

__all__ = ["FrameAttention", "applies", "frame_attention", "runs_on"]


def runs_on(device: str, dtype: torch.dtype) -> bool:
    """bf16/fp16 on a GPU; under the interpreter any float dtype on the CPU (tests)."""
    if INTERPRET:
        return device == "cpu" and dtype in FLOAT_DTYPES
    return device == "cuda" and dtype in (torch.bfloat16, torch.float16)


# frame_means_into's tiling: the fastest of 48 at the 1.3B rollout's shapes (bench/bench_frame_means.py, H200,
# CUDA graphs): 29 ms of GPU time per rollout for q and k, 2.6 TB/s (torch's mean 43 ms, session 19's 64-row
# blocks 45 ms; bench/RESULTS.md session 20)
MEANS_TILE = dict(block_r=512, block_c=128, sub=64, num_warps=4)
# The frame means of q and k computed before the attention kernel rather than after it: q and the chunk's keys were
# just written by the q/k kernel and may still be in L2, which the attention's sweep over the whole KV window
# evicts (the same bits either way; bench/bench_flag_ab.py --capture --flag
# models.common.triton_attention:MEANS_FIRST times the two orders)
MEANS_FIRST = True
MEANS_PAIRED = True  # frame_means_many_into runs two tensors to a launch (False: one each; the same bits)


def frame_means_into(x: torch.Tensor, frame_seq_len: int, out: torch.Tensor, tile: dict | None = None,
                     first_frame: int = 0) -> torch.Tensor:
    """out[:, :, first_frame + f] = the mean vector of frame f of x [B, L, H, D] (last dim contiguous, L a
    multiple of frame_seq_len), out [B, H, >= first_frame + L / frame_seq_len, D] float32 contiguous: blocks of
    tile["block_r"] rows summed in float32 (tile["sub"] rows at a time), then the blocks' sums added in order.
    A frame's mean depends on its own rows only (rows counted from the frame's start), so a frame's mean is the
    same bits whichever frames are averaged with it. tile: `MEANS_TILE` updated by these keys
    (bench/bench_frame_means.py times the choices)."""
    frame_means_many_into([(x, out, first_frame)], frame_seq_len, tile)
    return out


def frame_means_many_into(jobs, frame_seq_len: int, tile: dict | None = None) -> None:
    """`frame_means_into(x, frame_seq_len, out, tile, first_frame)` for each (x, out, first_frame) of jobs, two
    tensors to a launch (a capture's q and the new frames of its k: one pass over both, half the launches), every
    frame's mean the same bits as alone. Every job is checked before any work."""
    t = {**MEANS_TILE, **(tile or {})}
    if tile and (set(t) != set(MEANS_TILE) or t["sub"] > t["block_r"]
                 or not all(isinstance(v, int) and v > 0 and not v & (v - 1) for v in t.values())):
        raise ModelInputError(f"frame_means_into tile {tile}: allowed keys are {sorted(MEANS_TILE)}, each a power of "
                              f"two, sub <= block_r")
    fsl = int(frame_seq_len)
    for x, out, first_frame in jobs:
        B, L, H, D = x.shape
        nf = L // fsl
        if (out.dim() != 4 or tuple(out.shape[:2]) != (B, H) or out.shape[3] != D or not 0 <= first_frame
                or first_frame + nf > out.shape[2] or not out.is_contiguous() or out.dtype != torch.float32):
            raise ModelInputError(f"frame_means_into out {out.dtype} {tuple(out.shape)} (contiguous: "
                                  f"{out.is_contiguous()}) for frames {first_frame}..{first_frame + nf - 1} of x "
                                  f"{tuple(x.shape)}: allowed is a contiguous float32 "
                                  f"[{B}, {H}, >= {first_frame + nf}, {D}]")
        check_device_and_dtype(x, D)
        x0 = jobs[0][0]
        if x.shape[2:] != x0.shape[2:] or x.device != x0.device or x.dtype != x0.dtype:
            raise ModelInputError(f"frame_means_many_into: x {x.dtype} {tuple(x.shape)} on {x.device} beside "
                                  f"{x0.dtype} {tuple(x0.shape)} on {x0.device}: allowed are tensors of one dtype "
                                  "and [heads, head_dim] on one device")
    step = 2 if MEANS_PAIRED else 1
    for i in range(0, len(jobs), step):
        _frame_means_launch(jobs[i], jobs[i + 1] if step == 2 and i + 1 < len(jobs) else None, fsl, t)


def _frame_means_launch(job, job2, fsl: int, t: dict) -> None:
    """The two passes of `frame_means_many_into` for one or two checked jobs."""
    (x, out, f0), (x2, out2, f02) = job, job2 or job
    B, L, H, D = x.shape
    nf, nf2 = L // fsl, (x2.shape[1] // fsl if job2 else 0)
    nbf1, nbf = B * nf, B * nf + x2.shape[0] * nf2
    # column blocks: the largest power of two dividing both block_c and the H * D columns
    block_r, block_c, sub = t["block_r"], math.gcd(t["block_c"], H * D), t["sub"]
    n_r = triton.cdiv(fsl, block_r)
    part = torch.empty((nbf, n_r, H * D), dtype=torch.float32, device=x.device)
    with on_device(x):
        _frame_row_sums_kernel[(nbf, n_r, H * D // block_c)](
            x, x2, part, x.stride(0), x.stride(1), x.stride(2), x2.stride(0), x2.stride(1), x2.stride(2), nf,
            max(nf2, 1), nbf1, FSL=fsl, HEAD_DIM=D, BLOCK_R=block_r, BLOCK_C=block_c, SUB=sub, num_warps=t["num_warps"])
        fin_c = math.gcd(128, H * D)
        _frame_means_finish_kernel[(nbf, H * D // fin_c)](
            part, out, out2, H, nf, max(nf2, 1), nbf1, n_r, out.shape[2], out2.shape[2], int(f0), int(f02), FSL=fsl,
            HEAD_DIM=D, BLOCK_C=fin_c, num_warps=4)


def applies(q, k, v, frame_seq_len: int) -> bool:
    """Whether `frame_attention` takes this call (else the model uses its stock kernel): same-shape k and v,
    whole frames, a power-of-two head_dim, and bf16/fp16 on a GPU (any float dtype under the interpreter)."""
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        return False
    D, fsl, Lq, Lk = q.shape[3], int(frame_seq_len), q.shape[1], k.shape[1]
    if fsl < 1 or Lq == 0 or Lk == 0 or Lq % fsl or Lk % fsl or D < 16 or D > 256 or D & (D - 1):
        return False
    return runs_on(q.device.type, q.dtype) and q.dtype == k.dtype == v.dtype


@dataclass
class FrameAttention:
    """What one `frame_attention` call computed; the extras are None unless asked for."""

    out: torch.Tensor  # [B, Lq, H, D] q.dtype
    row_mass: torch.Tensor | None = None  # [B, H, nkf, Lq] float32: row's mass on key frame f, divided by fsl
    q_means: torch.Tensor | None = None  # [B, H, nqf, D] float32
    k_means: torch.Tensor | None = None  # [B, H, nkf, D] float32
    lse: torch.Tensor | None = None  # [B, H, Lq] float32, natural log


def frame_attention(q, k, v, *, frame_seq_len, scale=None, allowed=None, with_mass=False, frame_means=False,
                    with_lse=False, config=None, use_tma=None) -> FrameAttention:
    """softmax(q k^T * scale) v over whole frames, plus the extras asked for (see `FrameAttention`).

    q [B, Lq, H, D], k/v [B, Lk, H, D] with Lq, Lk multiples of frame_seq_len; allowed [nqf, nkf] bool or None
    (a frame mask; masked calls are never split). config: None (the GPU family's fixed config) or a dict with
    BLOCK_M, BLOCK_N and optionally num_warps, num_stages, split (None: from the GPU's resident programs, see
    `split_plan`; 1: never split; k: split tiles into k segments) and n_full (with an explicit split: the tiles
    before it run whole; default half), and WS (True: the opt-in warp-specialised plain forward, see
    `FUSED_WS_CANDIDATES` in models/common/triton_attention_plan.py; unmasked, TMA, no mass or means; its bits
    differ from WS=False by rounding), GLUON (None: the Gluon forward of models/common/gluon_attention.py where
    it applies; False: never; True: required), MEANS (the Gluon path's frame means: "triton", the default since
    bench/RESULTS.md's session 20: `frame_means_into`, or "torch": torch's mean; the same numbers to float32
    rounding) and MEANS_TILE (a dict updating `MEANS_TILE`).
    use_tma: None = on where usable (sm90+), or force False/True.
    """
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:]:
        raise ModelInputError(f"frame_attention needs q [B, Lq, H, D] and k, v [B, Lk, H, D]; got "
                              f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Lq, H, D = q.shape
    Lk, fsl = k.shape[1], int(frame_seq_len)
    if fsl < 1 or Lq == 0 or Lk == 0 or Lq % fsl or Lk % fsl:
        raise ModelInputError(f"query length {Lq} and key length {Lk} must be positive multiples of "
                              f"frame_seq_len={frame_seq_len}")
    nqf, nkf = Lq // fsl, Lk // fsl
    check_device_and_dtype(q, D)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = last_dim_contiguous(q, k, v)
    int32_ok(q, k, v)
    if use_tma is None:
        use_tma = tma_usable(k, v)
    elif use_tma and not (INTERPRET or tma_usable(k, v)):
        raise ModelInputError("use_tma=True needs contiguous k and v on an sm90+ GPU (or the interpreter)")
    if use_tma and not (k.is_contiguous() and v.is_contiguous()):
        k, v = k.contiguous(), v.contiguous()
    cfg = default_config(q.device)
    cfg.update(config or {})
    split = cfg.pop("split", None)
    ws = bool(cfg.pop("WS", False))
    gluon = cfg.pop("GLUON", None)  # None: where it applies; False: never; True: required
    means = cfg.pop("MEANS", "triton")  # the Gluon path's frame means: "triton" (frame_means_into) or "torch"
    means_tile = cfg.pop("MEANS_TILE", None)  # frame_means_into's tiling (None: MEANS_TILE)
    if means not in ("torch", "triton"):
        raise ModelInputError(f"config MEANS={means!r}: allowed are 'torch' and 'triton'")
    if gluon is not False and not ws and not INTERPRET and gluon_attention is not None:
        if gluon_attention.applies(q, k, v, fsl, allowed is not None):
            gluon = True
        elif gluon:
            raise ModelInputError("config GLUON=True: the Gluon forward does not take this call (it needs an sm90 "
                                  "GPU, bf16/fp16, head_dim 128, no mask, frames of >= 128 tokens)")
    gluon = bool(gluon) and not ws
    if gluon:
        cfg.update(BLOCK_M=gluon_attention.BLOCK_M, BLOCK_N=gluon_attention.BLOCK_N)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if ws and (allowed is not None or with_mass or frame_means or not use_tma):
        raise ModelInputError("config WS=True (warp specialisation) runs the plain unmasked forward through TMA "
                              f"only; got allowed={'a mask' if allowed is not None else None}, with_mass={with_mass}, "
                              f"frame_means={frame_means}, use_tma={bool(use_tma)}")
    if ws and q.is_cuda and os.environ.get(WS_GPU_ENV) != "1":
        raise ModelInputError(f"config WS=True is experimental on GPUs: on the H200 (2026-12-02) it gave wrong "
                              f"outputs (errors up to 0.17 and NaN rows at the rollout's call shapes; "
                              f"bench/RESULTS.md, issue 16), and the Gluon forward replaced it as the fast kernel; "
                              f"set {WS_GPU_ENV}=1 to run it anyway (for kernel development)")
    if ws and (not q.is_contiguous() or q.data_ptr() % 16):  # the kernel's q descriptor: rows of H * D, 16-byte base
        q = q.clone(memory_format=torch.contiguous_format)

    f32 = dict(dtype=torch.float32, device=q.device)
    f32_any = torch.empty(0, **f32)  # the pointer of every output a variant never touches
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    if with_mass:
        rs = torch.empty((B, H, nkf, Lq), **f32)  # per-row frame sums -> row mass
        rm = torch.empty_like(rs)  # running max each frame sum is relative to
    else:
        rs = rm = f32_any
    lse = torch.empty((B, H, Lq), **f32) if with_lse else f32_any
    allowed_t, has_mask = allowed_arg(allowed, f32_any)
    if frame_means:
        qsum, ksum = torch.empty((B, H, nqf, D), **f32), torch.empty((B, H, nkf, D), **f32)
    else:
        qsum = ksum = f32_any
    pad = max(16, triton.next_power_of_2(nkf)) if allowed is not None else 16  # only the masked key-range search uses it
    ieee = q.dtype == torch.float32
    dot_f32 = INTERPRET and q.dtype == torch.bfloat16
    if use_tma:
        desc_k = TensorDescriptor(k, [B * Lk, H * D], [H * D, 1], [bn, D])
        desc_v = TensorDescriptor(v, [B * Lk, H * D], [H * D, 1], [bn, D])
    else:
        desc_k, desc_v = k, v  # unused placeholders
    # WS: q through TMA too, from a descriptor the kernel builds (one per batch, [Lq, H * D]; the kernels' module
    # says why not here), so its launch needs global scratch
    n_tiles = triton.cdiv(Lq, bm) * B * H
    meta = dict(FSL=fsl, HEAD_DIM=D, NKF_PAD=pad, EPI_F=32, HAS_MASK=has_mask, USE_TMA=bool(use_tma),
                DOT_F32=dot_f32, IEEE=ieee, WITH_MASS=bool(with_mass), WITH_SUMS=bool(frame_means),
                WITH_LSE=bool(with_lse), WS=ws)

    def args(rs_, rm_, pacc, pm, pl, qsum_, ksum_, lse_, n_full, n_split):
        return (
            q, k, v, out, rs_, rm_, allowed_t, desc_k, desc_v, pacc, pm, pl, qsum_, ksum_, lse_,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            H, Lq, Lk, nkf, scale * LOG2E, n_full, n_split,
        )

    with on_device(q):
        if has_mask:
            n_full, split = n_tiles, 1  # masked calls sweep per-block key ranges: never split
        elif split is None:
            if INTERPRET:
                n_full, split = n_tiles, 1
            elif gluon:
                n_full, split = split_plan(n_tiles, gluon_attention.resident_programs(q.device), nkf, fsl / bn)
            else:  # the canonical variant's residency (every extra output's pointer a placeholder)
                slots = resident_programs(_frame_attn_fwd_kernel, args(*(f32_any,) * 8, n_tiles, 1), meta, cfg, q.device)
                n_full, split = split_plan(n_tiles, slots, nkf, fsl / bn)
        else:  # explicit: split the last n_tiles - n_full tiles (default: half of them)
            split = max(1, min(int(split), nkf))
            n_full = n_tiles if split == 1 else min(n_tiles, int(cfg.pop("n_full", n_tiles // 2)))
        n_seg = (n_tiles - n_full) * split
        if n_seg:
            pacc = torch.empty((n_seg, bm, D), **f32)
            pm = torch.empty((n_seg, bm), **f32)
            pl = torch.empty_like(pm)
        else:
            pacc = pm = pl = f32_any
        if gluon:
            # the Gluon forward has no frame means: two passes over q and k together (no float32 temporary as
            # torch's mean's, copied transposed: 0.12 GiB less peak in all-layer capture)
            means_jobs = [(q, qsum, 0), (k, ksum, 0)] if frame_means and means == "triton" else []
            if MEANS_FIRST and means_jobs:
                frame_means_many_into(means_jobs, fsl, means_tile)
            gluon_attention.launch(q, k, v, out, lse, rs, rm, pacc, pm, pl, scale, n_full, split, nkf, fsl,
                                   with_mass, with_lse)
            if means_jobs and not MEANS_FIRST:
                frame_means_many_into(means_jobs, fsl, means_tile)
            elif frame_means and not means_jobs:  # torch's mean over the middle dim
                qsum.copy_(q.reshape(B, nqf, fsl, H, D).mean(2, dtype=torch.float32).transpose(1, 2))
                ksum.copy_(k.reshape(B, nkf, fsl, H, D).mean(2, dtype=torch.float32).transpose(1, 2))
        else:
            with scratch_from_torch(q.device) if ws else contextlib.nullcontext():
                _frame_attn_fwd_kernel[(n_full + n_seg,)](
                    *args(rs, rm, pacc, pm, pl, qsum, ksum, lse, n_full, split), **meta, BLOCK_M=bm, BLOCK_N=bn,
                    num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
        if n_seg:
            sub = min(bm, 32)  # rows per merge program: 4 programs a tile of 128 rows
            _frame_attn_merge_kernel[((n_tiles - n_full) * (bm // sub),)](
                out, rs, rm, allowed_t, pacc, pm, pl, lse, out.stride(0), out.stride(1), out.stride(2),
                H, Lq, nkf, n_full, split, FSL=fsl, HEAD_DIM=D, EPI_F=32, WITH_MASS=bool(with_mass),
                WITH_LSE=bool(with_lse), BLOCK_M=bm, SUB=sub, num_warps=4)
    return FrameAttention(out, rs if with_mass else None, qsum if frame_means else None,
                          ksum if frame_means else None, lse if with_lse else None)
