"""Triton kernels for exact frame-aggregated attention that never materialise the probabilities.

Two methods (perf_anchors.md section 3), both drop-in replacements for the blockwise torch reference in
`reference.py` (same definitions, same shapes; see that module's docstring):

- Method E, `frame_attention_fused(q, k, v)` -> (out, mass): a FlashAttention-2 style forward (online
  softmax, tensor-core dots, fp32 accumulators) that also keeps, per query row, the running sum of the
  current key frame's probabilities (rescaled with the same exp(m_old - m_new) factor as the row sum l).
  When the key sweep passes the last key of a frame, that frame's sum and the running max it is relative to
  are written to a small [B, H, nkf, Lq] float32 scratch (one store per row per key frame; a key tile that
  straddles a frame edge is split with masked sums, inside a branch taken by ~1 tile in 12 at fsl=1560 with
  BLOCK_N=64). After the sweep the program turns its rows into r * 2^(m_flush - m_final) / (l * fsl) in
  place, and one sum over each query frame's rows gives the mass (deterministic: no atomics). No extra
  matmul and no extra exponential over a plain forward; on sm90 K/V tiles come through TMA descriptors.
  Work items: the tiles (query block, head) that fill whole waves of the GPU run whole; each tile of the
  last, partial wave is split into segments of whole key frames (`split_plan`) whose (acc, m, l) a small
  merge kernel combines, so the last wave does not leave most SMs idle (-12% on the 1.3B shapes). Block sizes
  are one fixed config per GPU family (chosen with bench/bench_fused_sweep.py), never timed at run time, so
  every process computes the same bits. Optional extras: the per-frame mean vectors of q and k for attn_logit
  (`frame_means=True`, averaged by the first segment of query block j for frames j, j + n_qblk, ...), and
  `frame_attention_fused_into`, whose last small kernel writes attn_mass and attn_logit straight into a
  capture buffer's cells.
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
def _mass_epilogue(rs_row, rm_row, m_i, l_safe, row_ok, qf_row, Lq, NKF, Allowed,
                   FSL: tl.constexpr, EPI_F: tl.constexpr, HAS_MASK: tl.constexpr):
    """Per-row frame mass r * 2^(m_flush - m_final) / (l * fsl), written in place of RS ([BM] rows, every frame)."""
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


@triton.jit
def _frame_mean(X, stride_x, row0, out_ptr, FSL: tl.constexpr, HEAD_DIM: tl.constexpr, SUM_ROWS: tl.constexpr):
    """out[:] = mean of the FSL rows X[row0:row0 + FSL, :], summed in float32 in a fixed order (deterministic)."""
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([SUM_ROWS, HEAD_DIM], dtype=tl.float32)
    for r0 in range(0, FSL, SUM_ROWS):
        rows = r0 + tl.arange(0, SUM_ROWS)
        x = tl.load(X + (row0 + rows)[:, None] * stride_x + offs_d[None, :], mask=(rows < FSL)[:, None], other=0.0)
        acc += x.to(tl.float32)
    tl.store(out_ptr + offs_d, tl.sum(acc, 0) * (1.0 / FSL))


@triton.jit
def _frame_attn_fwd_kernel(
    Q, K, V, Out, RS, RM, Allowed, desc_k, desc_v, PACC, PM, PL, QSUM, KSUM,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    H, Lq, Lk, NKF, qk_scale, N_FULL, SPLIT,
    FSL: tl.constexpr, HEAD_DIM: tl.constexpr, NKF_PAD: tl.constexpr, EPI_F: tl.constexpr,
    HAS_MASK: tl.constexpr, USE_TMA: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    WITH_MASS: tl.constexpr, WITH_SUMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1-D grid of work items. A tile is (query block, b * H + h), numbered query block fastest. Items below
    # N_FULL are whole tiles (item = tile). The tiles after them (the last, partial wave) are each split into
    # SPLIT segments of whole key frames, one item per segment; a segment leaves its unnormalised acc and
    # (m, l) in PACC / PM / PL and `_frame_attn_merge_kernel` combines them (unmasked calls only).
    # WITH_SUMS: the program of query block j (its first segment) also averages key frames and query frames
    # j, j + n_qblk, ... of its head into KSUM [B, H, NKF, D] / QSUM [B, H, NQF, D] (the frame means of
    # attn_logit, from L2-hot data instead of separate passes over q and k).
    # Q/Out [B, Lq, H, D]; K/V [B, Lk, H, D]; RS/RM scratch [B, H, NKF, Lq]; PACC [items - N_FULL, BM, D].
    item = tl.program_id(0)
    n_qblk = tl.cdiv(Lq, BLOCK_M)
    is_full = item < N_FULL
    seg_item = tl.maximum(item - N_FULL, 0)  # index among the segment items
    tile = tl.where(is_full, item, N_FULL + seg_item // SPLIT)
    seg = seg_item % SPLIT
    pid_m = tile % n_qblk
    pid_bh = tile // n_qblk
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

    if WITH_SUMS:
        if seg == 0:
            for f in range(pid_m, NKF, n_qblk):
                _frame_mean(k_base, stride_kn, f * FSL, KSUM + (pid_bh.to(tl.int64) * NKF + f) * HEAD_DIM,
                            FSL, HEAD_DIM, 32)
            for f in range(pid_m, Lq // FSL, n_qblk):
                _frame_mean(Q + b.to(tl.int64) * stride_qb + h * stride_qh, stride_qm, f * FSL,
                            QSUM + (pid_bh.to(tl.int64) * (Lq // FSL) + f) * HEAD_DIM, FSL, HEAD_DIM, 32)

    # key range: all keys, the segment's key frames, or (masked) the key frames allowed for any row of this block
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
        start = tl.where(is_full, 0, (seg * NKF // SPLIT) * FSL)
        end = tl.where(is_full, Lk, tl.minimum(((seg + 1) * NKF // SPLIT) * FSL, Lk))

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

    if is_full:
        # ---- epilogue: output, then the frame mass
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # a row with no allowed key gets output 0 and mass 0
        out = acc / l_safe[:, None]
        tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        if WITH_MASS:
            tl.debug_barrier()  # the flush stores above were made by other threads of this program
            _mass_epilogue(rs_row, rm_row, m_i, l_safe, row_ok, qf_row, Lq, NKF, Allowed, FSL, EPI_F, HAS_MASK)
    else:
        # ---- a segment: leave acc (relative to 2^m) and (m, l) for the merge
        p_rows = seg_item.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows of this item's slot
        tl.store(PACC + p_rows[:, None] * HEAD_DIM + offs_d[None, :], acc)
        tl.store(PM + p_rows, m_i)
        tl.store(PL + p_rows, l_i)


@triton.jit
def _frame_attn_merge_kernel(
    Out, RS, RM, Allowed, PACC, PM, PL,
    stride_ob, stride_om, stride_oh,
    H, Lq, NKF, N_FULL, SPLIT,
    FSL: tl.constexpr, HEAD_DIM: tl.constexpr, EPI_F: tl.constexpr, WITH_MASS: tl.constexpr,
    BLOCK_M: tl.constexpr, SUB: tl.constexpr,
):
    # grid: (split tiles * BLOCK_M // SUB,). Combines the SPLIT segments of SUB rows of tile N_FULL + t:
    # m = max m_s, l = sum l_s 2^(m_s - m), out = sum acc_s 2^(m_s - m) / l; then the frame mass epilogue.
    t = tl.program_id(0) // (BLOCK_M // SUB)
    r0 = (tl.program_id(0) % (BLOCK_M // SUB)) * SUB  # first row of this program within the tile
    tile = N_FULL + t
    n_qblk = tl.cdiv(Lq, BLOCK_M)
    pid_m = tile % n_qblk
    pid_bh = tile // n_qblk
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + r0 + tl.arange(0, SUB)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Lq
    qf_row = tl.minimum(offs_m, Lq - 1) // FSL
    slot0 = (t * SPLIT).to(tl.int64) * BLOCK_M + r0 + tl.arange(0, SUB)  # [SUB] rows of the first segment
    m_i = tl.zeros([SUB], dtype=tl.float32) + _NEG_BIG
    for s in range(SPLIT):
        m_i = tl.maximum(m_i, tl.load(PM + slot0 + s * BLOCK_M))
    l_i = tl.zeros([SUB], dtype=tl.float32)
    acc = tl.zeros([SUB, HEAD_DIM], dtype=tl.float32)
    for s in range(SPLIT):
        rows = slot0 + s * BLOCK_M
        w = tl.math.exp2(tl.load(PM + rows) - m_i)
        l_i += tl.load(PL + rows) * w
        acc += tl.load(PACC + rows[:, None] * HEAD_DIM + offs_d[None, :]) * w[:, None]
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    if WITH_MASS:
        scratch = pid_bh.to(tl.int64) * NKF * Lq
        _mass_epilogue(RS + scratch + offs_m, RM + scratch + offs_m, m_i, l_safe, row_ok, qf_row, Lq, NKF,
                       Allowed, FSL, EPI_F, False)


@triton.jit
def _store_frame_stats_kernel(
    RS, QM, KM, MASS_OUT, LOGIT_OUT, QIDX, KIDX,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_lb, stride_lh, stride_lq, stride_lk,
    H, Lq, NQF, NKF, scale,
    FSL: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
    WITH_MASS: tl.constexpr, WITH_LOGIT: tl.constexpr,
):
    # grid: (B * H * NQF * NKF,). For query frame g and key frame f of (b, h): mass = sum of the frame's rows of
    # RS[b, h, f, :] (each already divided by fsl) and logit = QM[b, h, g] . KM[b, h, f] * scale, written straight
    # into MASS_OUT / LOGIT_OUT [B, H, F, F] (strided views of a capture buffer) at (QIDX[g], KIDX[f]).
    pid = tl.program_id(0)
    f = pid % NKF
    g = (pid // NKF) % NQF
    bh = pid // (NKF * NQF)
    b = bh // H
    h = bh % H
    qi = tl.load(QIDX + g)
    kj = tl.load(KIDX + f)
    if WITH_MASS:
        base = RS + (bh.to(tl.int64) * NKF + f) * Lq + g * FSL
        acc = tl.zeros([ROWS], dtype=tl.float32)
        for r0 in range(0, FSL, ROWS):
            r = r0 + tl.arange(0, ROWS)
            acc += tl.load(base + r, mask=r < FSL, other=0.0)
        tl.store(MASS_OUT + b * stride_mb + h * stride_mh + qi * stride_mq + kj * stride_mk, tl.sum(acc, 0))
    if WITH_LOGIT:
        d = tl.arange(0, HEAD_DIM)
        qm = tl.load(QM + (bh * NQF + g) * HEAD_DIM + d)  # [D]
        km = tl.load(KM + (bh * NKF + f) * HEAD_DIM + d)
        tl.store(LOGIT_OUT + b * stride_lb + h * stride_lh + qi * stride_lq + kj * stride_lk,
                 tl.sum(qm * km, 0) * scale)


# Block sizes of the fused forward. One fixed config per GPU family (no timing-based autotuning, so every
# process of a run computes the same bits); chosen with `bench/bench_fused_sweep.py` on an H200.
FUSED_CONFIG_SM90 = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
FUSED_CONFIG_OTHER = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
FUSED_CONFIG_INTERPRET = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 2}
# candidates the sweep compares (Hopper: two warpgroups on 128-row blocks, or one on 64-row blocks, two CTAs a SM)
FUSED_CANDIDATES = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
    for bm, bn, w, st in [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3), (128, 32, 8, 4), (128, 128, 8, 2),
                          (64, 64, 4, 2)]
]

_SLOTS: dict = {}  # (device, constexprs, config) -> resident programs on the whole GPU


def _resident_programs(args, meta, cfg, device) -> int:
    """How many programs of this compiled kernel run at once on the GPU (SMs x CTAs per SM, from its registers,
    shared memory and warps)."""
    key = (str(device), tuple(sorted(meta.items())), tuple(sorted(cfg.items())))
    if key not in _SLOTS:
        warps = cfg["num_warps"]
        ck = _frame_attn_fwd_kernel.warmup(*args, grid=(1,), **meta, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                           num_warps=warps, num_stages=cfg["num_stages"])
        ck._init_handles()
        props = torch.cuda.get_device_properties(device)
        regs_per_warp = -(-ck.n_regs * 32 // 256) * 256  # allocated per warp in units of 256
        by_regs = (65536 // max(regs_per_warp, 256)) // warps
        smem_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
        by_smem = smem_sm // (ck.metadata.shared + 1024) if ck.metadata.shared else 32
        by_threads = props.max_threads_per_multi_processor // (32 * warps)
        _SLOTS[key] = max(1, min(by_regs, by_smem, by_threads)) * props.multi_processor_count
    return _SLOTS[key]


def split_plan(n_tiles: int, slots: int, nkf: int, key_tiles_per_frame: float, max_split: int = 16):
    """(n_full, split): run the first n_full tiles whole and split each of the others into `split` segments of
    whole key frames, so that the last, partial wave of tiles becomes a few short waves of segments.

    Cost model in key-tile steps: a segment of f frames costs f * key_tiles_per_frame + 4 (its fixed part), a
    split tile adds 2 for the merge. split = 1 when the tiles fill whole waves or splitting does not pay."""
    if slots <= 0 or n_tiles % slots == 0 or nkf < 2:
        return n_tiles, 1
    full_waves, rem = divmod(n_tiles, slots)
    best_cost, best = nkf * key_tiles_per_frame + 4.0, 1  # the tail wave of whole tiles
    for split in range(2, min(nkf, max_split) + 1):
        rounds = -(-rem * split // slots)
        cost = rounds * (-(-nkf // split) * key_tiles_per_frame + 4.0) + 2.0
        if cost < best_cost * 0.97:
            best_cost, best = cost, split
    return (full_waves * slots, best) if best > 1 else (n_tiles, 1)


def _default_config(device) -> dict:
    if INTERPRET:
        return dict(FUSED_CONFIG_INTERPRET)
    major = torch.cuda.get_device_capability(device)[0]
    return dict(FUSED_CONFIG_SM90 if major >= 9 else FUSED_CONFIG_OTHER)


def _launch_fused(q, k, v, *, frame_seq_len, scale=None, allowed=None, config=None, use_tma=None,
                  with_mass=True, frame_means=False, store=None):
    """frame_attention_fused with knobs for tests and benchmarks.

    config: None (the GPU family's fixed config) or a dict with BLOCK_M, BLOCK_N and optionally num_warps,
    num_stages, split (None: from the GPU's resident programs, see `split_plan`; 1: never split; k: split
    tiles into k segments) and n_full (with an explicit split: the tiles before it run whole; default half).
    use_tma: None = on where usable (sm90+), or force False/True. with_mass=False runs the same kernel without
    the frame bookkeeping (a plain Triton forward, for measuring what the bookkeeping costs), mass None.
    Returns (out [B, Lq, H, D] q.dtype, mass [B, H, nqf, nkf] float32), and with frame_means also the per-frame
    mean vectors of q and k: q_means [B, H, nqf, D], k_means [B, H, nkf, D] float32.
    store: see `frame_attention_fused_into` (then returns (out, None)).
    """
    if store is not None:
        if allowed is not None:
            raise WorkbenchError("frame_attention_fused_into takes unmasked calls only (allowed=None)")
        frame_means = store.get("logit_out") is not None
        with_mass = store.get("mass_out") is not None
    B, Lq, H, D, Lk, nqf, nkf = check_frame_inputs(q, k, v, frame_seq_len=frame_seq_len, allowed=allowed)
    _check_device_and_dtype(q, D)
    if store is not None:
        _check_store(store, B, H, nqf, nkf, q.device)
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
    cfg = _default_config(q.device)
    cfg.update(config or {})
    split = cfg.pop("split", None)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]

    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
    rs = torch.empty((B, H, nkf, Lq), dtype=torch.float32, device=q.device)  # per-row frame sums -> row mass
    rm = torch.empty_like(rs)  # running max each frame sum is relative to
    allowed_arg, has_mask = _allowed_arg(allowed, rs)
    if frame_means:
        qsum = torch.empty((B, H, nqf, D), dtype=torch.float32, device=q.device)
        ksum = torch.empty((B, H, nkf, D), dtype=torch.float32, device=q.device)
    else:
        qsum = ksum = rs  # never written
    nkf_pad = _nkf_pad(nkf) if allowed is not None else 16  # only the masked key-range search uses it
    ieee = q.dtype == torch.float32
    dot_f32 = INTERPRET and q.dtype == torch.bfloat16
    if use_tma:
        desc_k = TensorDescriptor(k, [B * Lk, H * D], [H * D, 1], [bn, D])
        desc_v = TensorDescriptor(v, [B * Lk, H * D], [H * D, 1], [bn, D])
    else:
        desc_k, desc_v = k, v  # unused placeholders
    n_tiles = triton.cdiv(Lq, bm) * B * H
    meta = dict(FSL=fsl, HEAD_DIM=D, NKF_PAD=nkf_pad, EPI_F=32, HAS_MASK=has_mask,
                USE_TMA=bool(use_tma), DOT_F32=dot_f32, IEEE=ieee, WITH_MASS=bool(with_mass),
                WITH_SUMS=bool(frame_means))

    def args(pacc, pm, pl, n_full, n_split):
        return (
            q, k, v, out, rs, rm, allowed_arg, desc_k, desc_v, pacc, pm, pl, qsum, ksum,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            H, Lq, Lk, nkf, scale * LOG2E, n_full, n_split,
        )

    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        if has_mask:
            n_full, split = n_tiles, 1  # masked calls sweep per-block key ranges: never split
        elif split is None:
            if INTERPRET:
                n_full, split = n_tiles, 1
            else:
                slots = _resident_programs(args(rs, rs, rs, n_tiles, 1), meta, cfg, q.device)
                n_full, split = split_plan(n_tiles, slots, nkf, fsl / bn)
        else:  # explicit: split the last n_tiles - n_full tiles (default: half of them)
            split = max(1, min(int(split), nkf))
            n_full = n_tiles if split == 1 else min(n_tiles, int(cfg.pop("n_full", n_tiles // 2)))
        n_seg = (n_tiles - n_full) * split
        if n_seg:
            pacc = torch.empty((n_seg, bm, D), dtype=torch.float32, device=q.device)
            pm = torch.empty((n_seg, bm), dtype=torch.float32, device=q.device)
            pl = torch.empty_like(pm)
        else:
            pacc = pm = pl = rs  # never read
        a = args(pacc, pm, pl, n_full, split)
        _frame_attn_fwd_kernel[(n_full + n_seg,)](
            *a, **meta, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 2))
        if n_seg:
            sub = min(bm, 32)  # rows per merge program: 4 programs a tile of 128 rows
            _frame_attn_merge_kernel[((n_tiles - n_full) * (bm // sub),)](
                out, rs, rm, allowed_arg, pacc, pm, pl, out.stride(0), out.stride(1), out.stride(2),
                H, Lq, nkf, n_full, split, FSL=fsl, HEAD_DIM=D, EPI_F=32, WITH_MASS=bool(with_mass), BLOCK_M=bm,
                SUB=sub, num_warps=4)
        if store is not None:
            _store_frame_stats(store, rs, qsum, ksum, B, H, Lq, nqf, nkf, fsl, D, scale)
    if store is not None:
        return out, None
    mass = None
    if with_mass:
        # sum over the query frame's rows (already divided by fsl): [B, H, nkf, nqf, fsl] -> [B, H, nqf, nkf]
        mass = torch.empty((B, H, nqf, nkf), dtype=torch.float32, device=q.device)
        torch.sum(rs.view(B, H, nkf, nqf, fsl), dim=-1, out=mass.transpose(2, 3))
    if frame_means:
        return out, mass, qsum, ksum
    return out, mass


def _check_store(store, B, H, nqf, nkf, device):
    mass_out, logit_out = store.get("mass_out"), store.get("logit_out")
    qidx, kidx = store["query_index"], store["key_index"]
    if mass_out is None and logit_out is None:
        raise WorkbenchError("frame_attention_fused_into needs mass_out, logit_out or both")
    for name, t in (("mass_out", mass_out), ("logit_out", logit_out)):
        if t is not None and (t.dim() != 4 or t.dtype != torch.float32 or tuple(t.shape[:2]) != (B, H)
                              or t.device != device):
            raise WorkbenchError(f"{name} must be a float32 [B={B}, H={H}, F, F] view on {device}; got {t.dtype} "
                                 f"{tuple(t.shape)} on {t.device}")
    for name, t in (("query_index", qidx), ("key_index", kidx)):
        if t.dtype.is_floating_point or t.is_complex() or t.device != device:
            raise WorkbenchError(f"{name} must be an integer tensor on {device}; got {t.dtype} on {t.device}")
    if qidx.numel() != nqf or kidx.numel() != nkf:
        raise WorkbenchError(f"query_index/key_index have {qidx.numel()}/{kidx.numel()} entries for {nqf} query "
                             f"and {nkf} key frames")


def _store_frame_stats(store, rs, qsum, ksum, B, H, Lq, nqf, nkf, fsl, D, scale):
    mass_out, logit_out = store.get("mass_out"), store.get("logit_out")
    qidx, kidx = store["query_index"], store["key_index"]
    ms = mass_out.stride() if mass_out is not None else (0, 0, 0, 0)
    ls = logit_out.stride() if logit_out is not None else (0, 0, 0, 0)
    _store_frame_stats_kernel[(B * H * nqf * nkf,)](
        rs, qsum, ksum, mass_out if mass_out is not None else rs, logit_out if logit_out is not None else rs,
        qidx, kidx, *ms, *ls, H, Lq, nqf, nkf, scale,
        FSL=fsl, HEAD_DIM=D, ROWS=512, WITH_MASS=mass_out is not None, WITH_LOGIT=logit_out is not None,
        num_warps=4)


def frame_attention_fused_into(q, k, v, *, frame_seq_len, mass_out=None, logit_out=None, query_index,
                               key_index, scale=None):
    """The fused forward of an unmasked call that also writes its frame statistics into capture buffers:
    mass_out[b, h, query_index[i], key_index[j]] = attn_mass of query frame i and key frame j, and logit_out
    the same cells of attn_logit (mean q of the frame . mean k of the frame * scale); either may be None.
    mass_out / logit_out: float32 [B, H, F, F] views (any strides); query_index [nqf], key_index [nkf] int
    tensors on the GPU. One small kernel after the forward replaces the row sums, the logit matmul and the
    scatter into the buffers. Returns out [B, Lq, H, D]."""
    store = dict(mass_out=mass_out, logit_out=logit_out, query_index=query_index, key_index=key_index)
    return _launch_fused(q, k, v, frame_seq_len=frame_seq_len, scale=scale, store=store)[0]


def frame_attention_fused(q, k, v, *, frame_seq_len, scale=None, allowed=None, frame_means=False):
    """Method E. q [B, Lq, H, D], k/v [B, Lk, H, D] (bf16/fp16/fp32, CUDA) ->
    (out [B, Lq, H, D] in q.dtype, mass [B, H, nqf, nkf] float32, rows sum to 1, disallowed pairs 0), and with
    frame_means also (q_means [B, H, nqf, D], k_means [B, H, nkf, D]) float32, the per-frame mean vectors."""
    return _launch_fused(q, k, v, frame_seq_len=frame_seq_len, scale=scale, allowed=allowed,
                         frame_means=frame_means)


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
