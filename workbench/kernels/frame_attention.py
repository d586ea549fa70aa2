"""Triton kernels for exact frame-aggregated attention that never materialise the probabilities.

Two methods (perf_anchors.md section 3), both drop-in replacements for the blockwise torch reference in
`reference.py` (same definitions, same shapes; see that module's docstring):

- Method E, `frame_attention_fused(q, k, v)` -> (out, mass): a FlashAttention-2 style forward (online
  softmax, tensor-core dots, fp32 accumulators) that also keeps, per query row, the running sum of the
  current key frame's probabilities (rescaled with the same exp(m_old - m_new) factor as the row sum l).
  When the key sweep passes the last key of a frame, that frame's sum and the running max it is relative to
  are written to a small [B, H, nkf, Lq] float32 scratch (one store per row per key frame; a key tile that
  straddles a frame edge is split with masked sums, inside a branch taken by ~1 tile in 12 at fsl=1560 with
  BLOCK_N=128). After the sweep the program turns its rows into r * 2^(m_flush - m_final) / (l * fsl) in
  place, and one torch sum over each query frame's rows gives the mass (deterministic: no atomics). No extra
  matmul and no extra exponential over a plain forward; on sm90 K/V tiles come through TMA descriptors.
  Block sizes are autotuned per (Lk, ...) among Hopper configs (first call of a new Lk: ~1 s).
- Method B, `frame_mass_from_lse(q, k, lse)` / `key_token_mass_from_lse(q, k, lse)`: given the row
  log-sum-exp of a stock attention kernel (`lse_from_sdpa`), recompute p = exp(s - lse) tile by tile.
  A program owns BLOCK_N key tokens and sweeps every query row, accumulating sum_i p_ij per query frame
  (the query axis is split at frame edges with masked sums); the frame mass is the key-token mass summed over
  the key frame's tokens (the same numbers as per-key-frame row sums averaged per query frame, organised so
  that no program needs atomics). The forward kernel stays untouched (bitwise-identical output).

Layouts: q [B, Lq, H, D], k and v [B, Lk, H, D] (last dim contiguous), lse [B, H, Lq] float32 natural log,
allowed [nqf, nkf] bool. D must be a power of two (Wan: 128). bf16/fp16 inputs use tensor cores; fp32
inputs use exact fp32 dots ("ieee", slow; for tests).

CPU testing: with TRITON_INTERPRET=1 set before this module is imported, the kernels run on CPU tensors in
Triton's interpreter. The interpreter (triton 3.6) multiplies bfloat16 operands of tl.dot as raw uint16 and
rounds fp32->bf16 casts by truncation, so under the interpreter bf16 tiles are upcast to fp32 before the
dots (constexpr DOT_F32, never set on a GPU).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from workbench.errors import WorkbenchError
from workbench.kernels.reference import check_frame_inputs

try:  # host-side TMA descriptors (triton >= 3.2); used on Hopper and newer
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

# Read once: triton.jit decides at decoration time whether a kernel is interpreted.
INTERPRET = bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else \
    os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


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

LOG2E = 1.4426950408889634
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: keeps fully masked rows free of NaN


# ----------------------------------------------------------------------------------------------------------
# Method E: fused forward with per-key-frame running sums
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_scores(q, k_base, desc_k, kv_row0, col_d0, n0, Lk, stride_kn, offs_n, offs_d,
                 LOAD_MASK: tl.constexpr, USE_TMA: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    """s = q k^T for the key tile [n0, n0 + BLOCK_N): [BM, BN] float32 (unscaled)."""
    cols = n0 + offs_n  # [BN] absolute key index
    if USE_TMA:
        k = desc_k.load([kv_row0 + n0, col_d0])  # [BN, D]; rows past this batch are masked in _tile_update
    elif LOAD_MASK:
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < Lk)[:, None], other=0.0)
    else:
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :])
    if DOT_F32:
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    elif IEEE:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    return qk


@triton.jit
def _tile_update(
    qk, acc, l_i, m_i, r_cur,  # s tile [BM, BN]; [BM, D] f32, [BM] f32, [BM] f32, [BM] f32 (current frame's sum)
    v_base, desc_v, kv_row0, col_d0,
    n0, Lk, NKF, qk_scale, stride_vn,
    offs_n, offs_d, row_ok, qf_row, rs_row, rm_row, Lq, Allowed,
    FSL: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_MASK: tl.constexpr,
    USE_TMA: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr, WITH_MASS: tl.constexpr,
):
    """Online-softmax update with the key tile [n0, n0 + BLOCK_N); keys >= Lk (MASKED) are left out."""
    NSEG: tl.constexpr = (BLOCK_N - 1) // FSL + 2  # most key frames one key tile can touch
    cols = n0 + offs_n  # [BN] absolute key index
    f_first = n0 // FSL  # key frame of the tile's first key
    # ---- online softmax (base 2: qk_scale = scale * log2(e))
    if MASKED:
        if HAS_MASK:
            # allowed[query frame of the row, key frame of the column]; this also drops cols >= Lk (frame >= NKF)
            valid = tl.zeros(qk.shape, dtype=tl.int1)
            for s in tl.static_range(NSEG):
                f = f_first + s
                a = tl.load(Allowed + qf_row * NKF + f, mask=row_ok & (f < NKF), other=0) != 0  # [BM]
                seg = (cols >= f * FSL) & (cols < (f + 1) * FSL)  # [BN]
                valid = valid | (a[:, None] & seg[None, :])
        else:
            valid = (cols < Lk)[None, :]
        qk = tl.where(valid, qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_new[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_new[:, None]
    p = tl.math.exp2(qk)  # [BM, BN]
    ps = tl.sum(p, 1)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + ps
    if WITH_MASS:
        # ---- per-key-frame sums: flush every frame whose last key lies in this tile
        r_cur = r_cur * alpha
        n_end = n0 + BLOCK_N
        if (f_first + 1) * FSL <= n_end:
            r_acc = r_cur
            for s in tl.static_range(NSEG):
                f = f_first + s
                seg = (cols >= f * FSL) & (cols < (f + 1) * FSL)
                r_acc += tl.sum(tl.where(seg[None, :], p, 0.0), 1)
                done = ((f + 1) * FSL <= n_end) & (f < NKF)
                # r_acc is relative to 2^m_new: store both, normalise in the epilogue
                tl.store(rs_row + f * Lq, r_acc, mask=row_ok & done)
                tl.store(rm_row + f * Lq, m_new, mask=row_ok & done)
                r_acc = tl.where(done, 0.0, r_acc)
            r_cur = r_acc
        else:
            r_cur = r_cur + ps
    # ---- acc = acc * alpha + p v
    acc = acc * alpha[:, None]
    if USE_TMA:
        v = desc_v.load([kv_row0 + n0, col_d0])  # [BN, D]
    elif MASKED:
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=(cols < Lk)[:, None], other=0.0)
    else:
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :])
    if DOT_F32:
        acc = tl.dot(p, v.to(tl.float32), acc)
    elif IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new, r_cur


@triton.jit
def _frame_attn_fwd_kernel(
    Q, K, V, Out, RS, RM, Allowed, desc_k, desc_v,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    H, Lq, Lk, NKF, qk_scale,
    FSL: tl.constexpr, HEAD_DIM: tl.constexpr, NKF_PAD: tl.constexpr, EPI_F: tl.constexpr,
    HAS_MASK: tl.constexpr, USE_TMA: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    WITH_MASS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(Lq, BLOCK_M), B * H). Q/Out [B, Lq, H, D]; K/V [B, Lk, H, D]; RS/RM scratch [B, H, NKF, Lq]
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)  # [BM] query rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    qf_row = tl.minimum(offs_m, Lq - 1) // FSL  # [BM] query frame of each row

    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # [BM, D], stays on chip
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    kv_row0 = b * Lk  # TMA: K/V are viewed as [B * Lk, H * D]
    col_d0 = h * HEAD_DIM
    scratch = pid_bh.to(tl.int64) * NKF * Lq
    rs_row = RS + scratch + offs_m  # + f * Lq: frame f of each row
    rm_row = RM + scratch + offs_m

    # key range: all keys, or (masked) the key frames allowed for any row of this block
    if HAS_MASK:
        fr = tl.arange(0, NKF_PAD)
        anyf = tl.zeros([NKF_PAD], dtype=tl.int32)
        qf_hi = (tl.minimum(m0 + BLOCK_M, Lq) - 1) // FSL
        for g in range(m0 // FSL, qf_hi + 1):
            anyf = anyf | tl.load(Allowed + g * NKF + fr, mask=fr < NKF, other=0).to(tl.int32)
        f_lo = tl.min(tl.where(anyf != 0, fr, NKF_PAD), 0)
        f_hi = tl.max(tl.where(anyf != 0, fr + 1, 0), 0)
        start = tl.minimum(f_lo, f_hi) * FSL  # empty range (0, 0) when nothing is allowed
        end = f_hi * FSL
    else:
        start = 0
        end = Lk

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG_BIG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_cur = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_stop = start + ((end - start) // BLOCK_N) * BLOCK_N  # full tiles in [start, n_stop), then a partial one
    for n0 in range(start, n_stop, BLOCK_N):
        qk = _tile_scores(q, k_base, desc_k, kv_row0, col_d0, n0, Lk, stride_kn, offs_n, offs_d,
                          False, USE_TMA, DOT_F32, IEEE)
        acc, l_i, m_i, r_cur = _tile_update(
            qk, acc, l_i, m_i, r_cur, v_base, desc_v, kv_row0, col_d0, n0, Lk, NKF, qk_scale, stride_vn,
            offs_n, offs_d, row_ok, qf_row, rs_row, rm_row, Lq, Allowed,
            FSL, BLOCK_N, HAS_MASK, HAS_MASK, USE_TMA, DOT_F32, IEEE, WITH_MASS,
        )
    if n_stop < end:  # the last, partial tile
        qk = _tile_scores(q, k_base, desc_k, kv_row0, col_d0, n_stop, Lk, stride_kn, offs_n, offs_d,
                          True, USE_TMA, DOT_F32, IEEE)
        acc, l_i, m_i, r_cur = _tile_update(
            qk, acc, l_i, m_i, r_cur, v_base, desc_v, kv_row0, col_d0, n_stop, end, NKF, qk_scale, stride_vn,
            offs_n, offs_d, row_ok, qf_row, rs_row, rm_row, Lq, Allowed,
            FSL, BLOCK_N, True, HAS_MASK, USE_TMA, DOT_F32, IEEE, WITH_MASS,
        )

    # ---- epilogue: output
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # a row with no allowed key gets output 0 and mass 0
    out = acc / l_safe[:, None]
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    if WITH_MASS:
        # ---- epilogue: per-row frame mass r * 2^(m_flush - m_final) / (l * fsl), in place of RS
        tl.debug_barrier()  # the flush stores above were made by other threads of this program
        inv_l = (1.0 / FSL) / l_safe  # the 1/fsl of the mean over the query frame's rows, folded in
        for f0 in range(0, NKF, EPI_F):
            fs = f0 + tl.arange(0, EPI_F)  # [EPI_F] key frames
            msk = row_ok[:, None] & (fs < NKF)[None, :]
            off = fs[None, :] * Lq
            if HAS_MASK:  # disallowed pairs may lie outside the swept range (never flushed): read only allowed
                a = tl.load(Allowed + qf_row[:, None] * NKF + fs[None, :], mask=msk, other=0)
                rd = msk & (a != 0)
            else:
                rd = msk
            rs = tl.load(rs_row[:, None] + off, mask=rd, other=0.0)  # [BM, EPI_F]
            rm = tl.load(rm_row[:, None] + off, mask=rd, other=0.0)
            w = rs * tl.math.exp2(tl.where(rd, rm - m_i[:, None], 0.0)) * inv_l[:, None]
            tl.store(rs_row[:, None] + off, w, mask=msk)


def _tma_pre_hook(nargs):
    if TensorDescriptor is not None and isinstance(nargs.get("desc_k"), TensorDescriptor):
        nargs["desc_k"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]
        nargs["desc_v"].block_shape = [nargs["BLOCK_N"], nargs["HEAD_DIM"]]


# Hopper (H100/H200) candidates: 128-row Q blocks with 8 warps (two warpgroups), and 64-row blocks with
# 4 warps (finer waves: 37 x 12 = 444 programs of 128 rows on 132 SMs is 3.4 waves; 64x64 with 2 stages needs
# ~82 KB of shared memory and ~210 registers a thread, so two of its CTAs fit on one SM). Compiled offline
# for sm_90 (tests/test_kernels.py): no register spills except 64x128 with pointer loads (~180 B).
_FUSED_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=_tma_pre_hook)
    for bm, bn, w, s in [
        (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
        (64, 64, 4, 2), (64, 128, 4, 2),
    ]
]
_frame_attn_fwd_tuned = triton.autotune(
    configs=_FUSED_CONFIGS, key=["Lk", "HEAD_DIM", "FSL", "NKF_PAD", "HAS_MASK", "USE_TMA", "IEEE", "WITH_MASS"]
)(_frame_attn_fwd_kernel)


# ----------------------------------------------------------------------------------------------------------
# Method B: key-token mass from the row log-sum-exp (the frame mass is its sum over a key frame's tokens)
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _key_token_kernel(
    Q, K, LSE, TOK, Allowed,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_lb, stride_lh,
    H, Lq, Lk, NQF, NKF, qk_scale,
    FSL: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (cdiv(Lk, BLOCK_N), B * H). TOK [B, H, NQF, Lk]: tok[b, h, g, j] = (1/FSL) sum_{i in g} p_ij
    NSEG: tl.constexpr = (BLOCK_M - 1) // FSL + 2  # most query frames one query tile can touch
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] key tokens owned by this program
    col_ok = cols < Lk
    offs_d = tl.arange(0, HEAD_DIM)
    offs_mm = tl.arange(0, BLOCK_M)
    k = tl.load(K + b.to(tl.int64) * stride_kb + h * stride_kh + cols[:, None] * stride_kn + offs_d[None, :],
                mask=col_ok[:, None], other=0.0)  # [BN, D]
    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    lse_base = LSE + b.to(tl.int64) * stride_lb + h * stride_lh
    tok_base = TOK + pid_bh.to(tl.int64) * NQF * Lk
    kf_col = tl.minimum(cols, Lk - 1) // FSL  # [BN] key frame of each column
    c_cur = tl.zeros([BLOCK_N], dtype=tl.float32)  # running column sum of the current query frame

    for m0 in range(0, Lq, BLOCK_M):
        rows = m0 + offs_mm
        row_ok = rows < Lq
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        # rows past Lq, and rows with no allowed key (lse = -inf), contribute p = 0
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        if DOT_F32:
            st = tl.dot(k.to(tl.float32), tl.trans(q.to(tl.float32)))
        elif IEEE:
            st = tl.dot(k, tl.trans(q), input_precision="ieee")
        else:
            st = tl.dot(k, tl.trans(q))  # [BN, BM] = scores transposed
        x = st * qk_scale - lse2[None, :]
        if HAS_MASK:  # disallowed pairs (zeroed at the flush) can exceed the lse; keep them finite
            x = tl.minimum(x, 1.0)
        pt = tl.math.exp2(x)  # [BN, BM]; <= 1 for allowed pairs
        g_first = m0 // FSL
        m_end = m0 + BLOCK_M
        if (g_first + 1) * FSL <= m_end:  # a query frame ends in this tile: split the rows at frame edges
            c_acc = c_cur
            for s in tl.static_range(NSEG):
                g = g_first + s
                seg = (rows >= g * FSL) & (rows < (g + 1) * FSL)
                c_acc += tl.sum(tl.where(seg[None, :], pt, 0.0), 1)
                done = ((g + 1) * FSL <= m_end) & (g < NQF)
                val = c_acc * (1.0 / FSL)
                if HAS_MASK:  # every row of query frame g shares its allowed key frames: mask at the flush
                    a = tl.load(Allowed + g * NKF + kf_col, mask=col_ok & done, other=0)
                    val = tl.where(a != 0, val, 0.0)
                tl.store(tok_base + g * Lk + cols, val, mask=col_ok & done)
                c_acc = tl.where(done, 0.0, c_acc)
            c_cur = c_acc
        else:
            c_cur += tl.sum(pt, 1)


_LSE_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (64, 128, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
    ]
]
_key_token_tuned = triton.autotune(configs=_LSE_CONFIGS, key=["Lq", "HEAD_DIM", "FSL", "HAS_MASK", "IEEE"])(
    _key_token_kernel
)


# ----------------------------------------------------------------------------------------------------------
# Python wrappers
# ----------------------------------------------------------------------------------------------------------


def _check_device_and_dtype(q, D):
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise WorkbenchError(f"triton frame kernels take bfloat16, float16 or float32; got {q.dtype}")
    if D < 16 or D > 256 or D & (D - 1):
        raise WorkbenchError(f"triton frame kernels need head_dim a power of two in [16, 256]; got {D}")
    if q.device.type != "cuda" and not INTERPRET:
        raise WorkbenchError(
            f"triton frame kernels need CUDA tensors (got {q.device}); on CPU use workbench.kernels.reference "
            "or set TRITON_INTERPRET=1 before importing workbench.kernels.frame_attention"
        )
    if INTERPRET and q.device.type != "cpu":
        raise WorkbenchError(f"under TRITON_INTERPRET=1 the kernels take CPU tensors; got {q.device}")


def _last_dim_contiguous(*ts):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def _int32_ok(*ts):
    for t in ts:
        if t.numel() >= 2**31:
            raise WorkbenchError(f"tensor of {t.numel()} elements is too large for int32 indexing in the kernel")


def _allowed_arg(allowed, like):
    if allowed is None:
        return like, False  # any tensor: the pointer is never read
    return allowed.to(device=like.device, dtype=torch.int8).contiguous(), True


def _tma_usable(k, v):
    if INTERPRET or TensorDescriptor is None or k.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    # the 2-D view [B * Lk, H * D] needs heads packed in the last dim and batches back to back
    return all(t.is_contiguous() for t in (k, v))


def _nkf_pad(nkf: int) -> int:
    return max(16, triton.next_power_of_2(nkf))


def _launch_fused(q, k, v, *, frame_seq_len, scale=None, allowed=None, config=None, use_tma=None,
                  with_mass=True):
    """frame_attention_fused with knobs for tests and benchmarks.

    config: None (autotune on a GPU; a small fixed config under the interpreter) or a dict with BLOCK_M,
    BLOCK_N and optionally num_warps, num_stages. use_tma: None = on where usable (sm90+), or force False/True.
    with_mass=False runs the same kernel without the frame bookkeeping (a plain Triton forward, for measuring
    what the bookkeeping costs) and returns mass None.
    Returns (out [B, Lq, H, D] q.dtype, mass [B, H, nqf, nkf] float32).
    """
    B, Lq, H, D, Lk, nqf, nkf = check_frame_inputs(q, k, v, frame_seq_len=frame_seq_len, allowed=allowed)
    _check_device_and_dtype(q, D)
    fsl = int(frame_seq_len)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k, v = _last_dim_contiguous(q, k, v)
    _int32_ok(q, k, v)
    if use_tma is None:
        use_tma = _tma_usable(k, v)
    elif use_tma and not (INTERPRET or _tma_usable(k, v)):
        raise WorkbenchError("use_tma=True needs contiguous k and v on an sm90+ GPU (or the interpreter)")
    if use_tma and not (k.is_contiguous() and v.is_contiguous()):
        k, v = k.contiguous(), v.contiguous()

    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    rs = torch.empty((B, H, nkf, Lq), dtype=torch.float32, device=q.device)  # per-row frame sums -> row mass
    rm = torch.empty_like(rs)  # running max each frame sum is relative to
    allowed_arg, has_mask = _allowed_arg(allowed, rs)
    nkf_pad = _nkf_pad(nkf) if allowed is not None else 16  # only the masked key-range search uses it
    ieee = q.dtype == torch.float32
    dot_f32 = INTERPRET and q.dtype == torch.bfloat16
    if use_tma:
        bn = config["BLOCK_N"] if config else 64  # the autotuner's pre-hook sets the block shape per config
        desc_k = TensorDescriptor(k, [B * Lk, H * D], [H * D, 1], [bn, D])
        desc_v = TensorDescriptor(v, [B * Lk, H * D], [H * D, 1], [bn, D])
    else:
        desc_k, desc_v = k, v  # unused placeholders
    args = (
        q, k, v, out, rs, rm, allowed_arg, desc_k, desc_v,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, Lq, Lk, nkf, scale * LOG2E,
    )
    meta = dict(FSL=fsl, HEAD_DIM=D, NKF_PAD=nkf_pad, EPI_F=32, HAS_MASK=has_mask,
                USE_TMA=bool(use_tma), DOT_F32=dot_f32, IEEE=ieee, WITH_MASS=bool(with_mass))
    if config is None and INTERPRET:
        config = {"BLOCK_M": 16, "BLOCK_N": 16}
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        if config is None:
            grid = lambda META: (triton.cdiv(Lq, META["BLOCK_M"]), B * H)  # noqa: E731
            _frame_attn_fwd_tuned[grid](*args, **meta)
        else:
            cfg = dict(config)
            bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
            grid = (triton.cdiv(Lq, bm), B * H)
            warps, stages = cfg.pop("num_warps", 4), cfg.pop("num_stages", 2)
            _frame_attn_fwd_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                         num_stages=stages)
    if not with_mass:
        return out, None
    # sum over the query frame's rows (already divided by fsl): [B, H, nkf, nqf, fsl] -> [B, H, nqf, nkf]
    mass = torch.empty((B, H, nqf, nkf), dtype=torch.float32, device=q.device)
    torch.sum(rs.view(B, H, nkf, nqf, fsl), dim=-1, out=mass.transpose(2, 3))
    return out, mass


def frame_attention_fused(q, k, v, *, frame_seq_len, scale=None, allowed=None):
    """Method E. q [B, Lq, H, D], k/v [B, Lk, H, D] (bf16/fp16/fp32, CUDA) ->
    (out [B, Lq, H, D] in q.dtype, mass [B, H, nqf, nkf] float32, rows sum to 1, disallowed pairs 0)."""
    return _launch_fused(q, k, v, frame_seq_len=frame_seq_len, scale=scale, allowed=allowed)


def _launch_key_token(q, k, lse, *, frame_seq_len, scale, allowed=None, config=None):
    B, Lq, H, D, Lk, nqf, nkf = check_frame_inputs(q, k, frame_seq_len=frame_seq_len, allowed=allowed, lse=lse)
    _check_device_and_dtype(q, D)
    if lse.device != q.device:
        raise WorkbenchError(f"lse is on {lse.device}, q on {q.device}")
    fsl = int(frame_seq_len)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k = _last_dim_contiguous(q, k)
    _int32_ok(q, k)
    lse = lse.float()
    if lse.stride(-1) != 1:
        lse = lse.contiguous()
    tok = torch.empty((B, H, nqf, Lk), dtype=torch.float32, device=q.device)
    allowed_arg, has_mask = _allowed_arg(allowed, tok)
    args = (
        q, k, lse, tok, allowed_arg,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1),
        H, Lq, Lk, nqf, nkf, scale * LOG2E,
    )
    meta = dict(FSL=fsl, HEAD_DIM=D, HAS_MASK=has_mask, DOT_F32=INTERPRET and q.dtype == torch.bfloat16,
                IEEE=q.dtype == torch.float32)
    if config is None and INTERPRET:
        config = {"BLOCK_M": 16, "BLOCK_N": 16}
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        if config is None:
            grid = lambda META: (triton.cdiv(Lk, META["BLOCK_N"]), B * H)  # noqa: E731
            _key_token_tuned[grid](*args, **meta)
        else:
            cfg = dict(config)
            bm, bn = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
            grid = (triton.cdiv(Lk, bn), B * H)
            _key_token_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                    num_warps=cfg.pop("num_warps", 4), num_stages=cfg.pop("num_stages", 2))
    return tok


def key_token_mass_from_lse(q, k, lse, *, frame_seq_len, scale, allowed=None):
    """Method B, key-token resolution. lse [B, H, Lq] float32 natural log (e.g. `lse_from_sdpa`) ->
    tok [B, H, nqf, Lk] float32 with tok[b, h, qf, j] = (1/fsl) sum_{i in qf} p_ij (0 for disallowed pairs)."""
    return _launch_key_token(q, k, lse, frame_seq_len=frame_seq_len, scale=scale, allowed=allowed)


def frame_mass_from_lse(q, k, lse, *, frame_seq_len, scale, allowed=None):
    """Method B. lse [B, H, Lq] float32 natural log -> mass [B, H, nqf, nkf] float32 (disallowed pairs 0).

    The same sweep as `key_token_mass_from_lse`, then summed over each key frame's tokens (a [B, H, nqf, Lk]
    float32 intermediate: 4.7 MB for 3 x 21 frames x 12 heads; keeps the result deterministic, no atomics)."""
    tok = _launch_key_token(q, k, lse, frame_seq_len=frame_seq_len, scale=scale, allowed=allowed)
    B, H, nqf, Lk = tok.shape
    fsl = int(frame_seq_len)
    return tok.view(B, H, nqf, Lk // fsl, fsl).sum(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Row log-sum-exp of the model's own attention kernel
# ----------------------------------------------------------------------------------------------------------



def lse_from_sdpa(q, k, v, scale):
    """(out [B, Lq, H, D] in q.dtype, lse [B, H, Lq] float32 natural log) for unmasked attention, computed exactly
    as the model computes it when a probe asks for the log-sum-exp (`models.attention.attention_with_lse`: the
    cuDNN / flash SDPA op on CUDA, SDPA plus a blockwise LSE elsewhere)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise WorkbenchError(f"lse_from_sdpa needs q [B, Lq, H, D], k/v [B, Lk, H, D]; got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
    from models.attention import attention_with_lse

    return attention_with_lse(q, k, v, scale=float(scale))
