"""The Triton kernels of the frame-tiled FlashAttention forward (models/common/triton_attention.py launches them
and is their public API): `_frame_attn_fwd_kernel`, one program per work item, `_frame_attn_merge_kernel`,
which combines the segments of split tiles, and the two passes of `frame_means_into` (the frame means beside the
Gluon forward, which has none of its own). Only the launcher imports them (and a test that compiles them for
Hopper ahead of time).

How it works (FlashAttention-2 online softmax, tensor-core dots, fp32 accumulators):
- Per query row it keeps, next to the running max m and sum l, the running sum of the current key frame's
  probabilities, rescaled by the same exp(m_old - m_new). When the key sweep passes the last key of a frame,
  that sum and the max it is relative to go to a [B, H, nkf, Lq] scratch (a key tile that straddles a frame
  edge is split with masked sums, in a branch taken by ~1 tile in 12 at fsl=1560 with BLOCK_N=64). After the
  sweep the rows become r * 2^(m_flush - m_final) / (l * fsl) in place. No extra matmul or exponential.
- Work items: the tiles (query block, head) that fill whole waves of the GPU run whole; each tile of the last,
  partial wave is split into segments of whole key frames (`split_plan`) whose (acc, m, l) a small merge kernel
  combines, so the last wave does not leave most SMs idle. Plan and block sizes:
  models/common/triton_attention_plan.py (one canonical variant's residency and one fixed config per GPU family,
  so every variant and every process computes the same bits). On sm90 K/V tiles come through TMA descriptors.
- q_means / k_means are averaged by the first segment of query block j for frames j, j + n_qblk, ... from
  L2-hot data.
"""

from __future__ import annotations

import triton
import triton.language as tl

_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for the running max: keeps fully masked rows free of NaN


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
                # a frame is done when its last key is swept: within this tile and before the sweep's end
                # (Lk here; a segment's partial last tile gets the segment's end, so it never flushes a frame
                # of the next segment with a zero sum, which would race with that segment's own flush)
                done = ((f + 1) * FSL <= tl.minimum(n_end, Lk)) & (f < NKF)
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
def _key_tile(
    q, acc, l_i, m_i, r_cur, k_base, v_base, desc_k, desc_v, kv_row0, col_d0, n0, Lk, end, NKF, qk_scale,
    stride_kn, stride_vn, offs_n, offs_d, row_ok, qf_row, rs_row, rm_row, Lq, Allowed,
    FSL: tl.constexpr, BLOCK_N: tl.constexpr, LOAD_MASK: tl.constexpr, MASKED: tl.constexpr,
    HAS_MASK: tl.constexpr, USE_TMA: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    WITH_MASS: tl.constexpr,
):
    """One step of the key sweep: scores of the key tile [n0, n0 + BLOCK_N) (key loads bounded by Lk when
    LOAD_MASK, without TMA), then the online-softmax update with keys >= end left out (MASKED); end also
    bounds the frame flushes."""
    qk = _tile_scores(q, k_base, desc_k, kv_row0, col_d0, n0, Lk, stride_kn, offs_n, offs_d,
                      LOAD_MASK, USE_TMA, DOT_F32, IEEE)
    return _tile_update(
        qk, acc, l_i, m_i, r_cur, v_base, desc_v, kv_row0, col_d0, n0, end, NKF, qk_scale, stride_vn,
        offs_n, offs_d, row_ok, qf_row, rs_row, rm_row, Lq, Allowed,
        FSL, BLOCK_N, MASKED, HAS_MASK, USE_TMA, DOT_F32, IEEE, WITH_MASS,
    )


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
def _finish_rows(Out, LSE, acc, m_i, l_i, b, h, pid_bh, offs_m, offs_d, row_ok, Lq,
                 stride_ob, stride_om, stride_oh, WITH_LSE: tl.constexpr):
    """Write the rows' output acc / l (a row with no allowed key gets 0) and, WITH_LSE, their natural-log
    log-sum-exp from the base-2 running max and sum (-inf for a row with no key). Returns the safe l."""
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(Out + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    if WITH_LSE:
        lse = tl.where(l_i > 0.0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)
    return l_safe


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
def _frame_row_sums_kernel(X, X2, Part, stride_xb, stride_xl, stride_xh, stride_2b, stride_2l, stride_2h, NF, NF2,
                           NBF1, FSL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_C: tl.constexpr, SUB: tl.constexpr):
    """First pass of the frame means (the Gluon path's, launched by triton_attention's `frame_means_into`):
    program (b * nf + f, row block r, column block c) sums rows [r BLOCK_R, (r + 1) BLOCK_R) of frame f of
    X [B, L, H, HEAD_DIM] over BLOCK_C of its H * HEAD_DIM columns in float32 into
    Part [B * nf, cdiv(FSL, BLOCK_R), H * HEAD_DIM], SUB rows at a time (elementwise float32 adds in row order,
    then one sum over the SUB lanes). Blocks of a few hundred rows (bench/bench_frame_means.py timed 48 tilings;
    512 rows of 64-row steps were the fastest), so that hundreds of programs share the reading (a program a
    frame summing 1560 rows in series measured slower than torch's mean).
    Two tensors in one launch: programs bf < NBF1 (= B * NF) take the NF frames a batch row of X, the rest
    (bf - NBF1 = b * NF2 + f) the NF2 of X2 (strides stride_2*), their sums after X's in Part; a frame's sum is
    the same bits either way."""
    bf = tl.program_id(0)
    if bf < NBF1:
        b, f = bf // NF, bf % NF
        base = X + b.to(tl.int64) * stride_xb + (f * FSL).to(tl.int64) * stride_xl
        sl, sh = stride_xl, stride_xh
    else:
        b, f = (bf - NBF1) // NF2, (bf - NBF1) % NF2
        base = X2 + b.to(tl.int64) * stride_2b + (f * FSL).to(tl.int64) * stride_2l
        sl, sh = stride_2l, stride_2h
    r = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)  # h * HEAD_DIM + d
    col_off = ((cols // HEAD_DIM) * sh + cols % HEAD_DIM)[None, :]
    acc = tl.zeros([SUB, BLOCK_C], dtype=tl.float32)
    for r0 in tl.static_range(0, BLOCK_R, SUB):
        rows = r * BLOCK_R + r0 + tl.arange(0, SUB)
        ptr = base + rows.to(tl.int64)[:, None] * sl + col_off
        acc += tl.load(ptr, mask=(rows < FSL)[:, None], other=0.0).to(tl.float32)
    n_r = tl.num_programs(1)
    tl.store(Part + (bf * n_r + r).to(tl.int64) * tl.num_programs(2) * BLOCK_C + cols, tl.sum(acc, 0))


@triton.jit
def _frame_means_finish_kernel(Part, Out, Out2, H, NF, NF2, NBF1, N_R, NF_OUT, NF_OUT2, F0, F02, FSL: tl.constexpr,
                               HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr):
    """Second pass: Out[:, :, F0 + f] (Out [B, H, NF_OUT, HEAD_DIM] float32) = frame f's N_R partial sums, added in
    order, / FSL. Program (b * NF + f, column block); programs bf >= NBF1 write X2's frames into Out2 (NF2 frames a
    batch row, NF_OUT2 slots, from F02)."""
    bf = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r in range(0, N_R):
        acc += tl.load(Part + (bf * N_R + r).to(tl.int64) * (H * HEAD_DIM) + cols)
    if bf < NBF1:
        b, f = bf // NF, bf % NF
        dst = Out + ((b * H + cols // HEAD_DIM) * NF_OUT + F0 + f) * HEAD_DIM + cols % HEAD_DIM
    else:
        b, f = (bf - NBF1) // NF2, (bf - NBF1) % NF2
        dst = Out2 + ((b * H + cols // HEAD_DIM) * NF_OUT2 + F02 + f) * HEAD_DIM + cols % HEAD_DIM
    tl.store(dst, acc * (1.0 / FSL))


@triton.jit
def _frame_attn_fwd_kernel(
    Q, K, V, Out, RS, RM, Allowed, desc_k, desc_v, PACC, PM, PL, QSUM, KSUM, LSE,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    H, Lq, Lk, NKF, qk_scale, N_FULL, SPLIT,
    FSL: tl.constexpr, HEAD_DIM: tl.constexpr, NKF_PAD: tl.constexpr, EPI_F: tl.constexpr,
    HAS_MASK: tl.constexpr, USE_TMA: tl.constexpr, DOT_F32: tl.constexpr, IEEE: tl.constexpr,
    WITH_MASS: tl.constexpr, WITH_SUMS: tl.constexpr, WITH_LSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WS: tl.constexpr = False,
):
    # 1-D grid of work items. A tile is (query block, b * H + h), numbered query block fastest. Items below
    # N_FULL are whole tiles (item = tile). The tiles after them (the last, partial wave) are each split into
    # SPLIT segments of whole key frames, one item per segment; a segment leaves its unnormalised acc and
    # (m, l) in PACC / PM / PL and `_frame_attn_merge_kernel` combines them (unmasked calls only).
    # WITH_SUMS: the program of query block j (its first segment) also averages key frames and query frames
    # j, j + n_qblk, ... of its head into KSUM [B, H, NKF, D] / QSUM [B, H, NQF, D] (the frame means of
    # attn_logit, from L2-hot data instead of separate passes over q and k).
    # WITH_LSE: also the row log-sum-exp (natural log) into LSE [B, H, Lq].
    # WS (the plain unmasked forward on TMA, LSE allowed; the launcher refuses the rest): triton's automatic warp
    # specialisation of the key sweep (a TMA producer warpgroup, two consumer warpgroups of BLOCK_M / 2 rows,
    # setmaxnreg). sm90 specialises only with num_warps 4, q through a TMA descriptor, one loop whose every tile
    # is masked at `end`, no branch in it (so no frame-mass flush) and none after it (predicated stores
    # instead); tests/test_kernels.py compiles it for sm_90 and checks. Its bits differ from WS=False by
    # rounding (the masked tile arithmetic).
    # The q descriptor is built here, not on the host: the sm90 pass splits the q tile into one [BLOCK_M / 2, D]
    # TMA copy per consumer group. It re-derives the box of an in-kernel descriptor, but the box of a host
    # descriptor is fixed at [BLOCK_M, ...], so each copy moved twice the bytes its buffer holds (past the end
    # of shared memory: the illegal memory access of the first H200 run). The descriptor spans this batch's
    # rows only ([Lq, H * D]): rows past Lq of the last query block read as zeros, never the next batch.
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

    if WS:  # rows past this batch's Lq are zero-filled by TMA and never stored
        desc_q = tl.make_tensor_descriptor(Q + b.to(tl.int64) * stride_qb, shape=[Lq, H * HEAD_DIM],
                                           strides=[stride_qm, 1], block_shape=[BLOCK_M, HEAD_DIM])
        q = desc_q.load([m0, h * HEAD_DIM])  # [BM, D]
    else:
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

    if WS:
        for n0 in tl.range(start, end, BLOCK_N, warp_specialize=True):
            acc, l_i, m_i, r_cur = _key_tile(
                q, acc, l_i, m_i, r_cur, k_base, v_base, desc_k, desc_v, kv_row0, col_d0, n0, Lk, end, NKF,
                qk_scale, stride_kn, stride_vn, offs_n, offs_d, row_ok, qf_row, rs_row, rm_row, Lq, Allowed,
                FSL, BLOCK_N, True, True, HAS_MASK, USE_TMA, DOT_F32, IEEE, WITH_MASS)
        _finish_rows(Out, LSE, acc, m_i, l_i, b, h, pid_bh, offs_m, offs_d, row_ok & is_full, Lq,
                     stride_ob, stride_om, stride_oh, WITH_LSE)
        part = (offs_m >= 0) & (item >= N_FULL)  # [BM]: every row of a segment item
        p_rows = seg_item.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(PACC + p_rows[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=part[:, None])
        tl.store(PM + p_rows, m_i, mask=part)
        tl.store(PL + p_rows, l_i, mask=part)
    else:
        n_stop = start + ((end - start) // BLOCK_N) * BLOCK_N  # full tiles in [start, n_stop), then a partial one
        for n0 in range(start, n_stop, BLOCK_N):  # (a frame mask needs masked tiles everywhere)
            acc, l_i, m_i, r_cur = _key_tile(
                q, acc, l_i, m_i, r_cur, k_base, v_base, desc_k, desc_v, kv_row0, col_d0, n0, Lk, Lk, NKF, qk_scale,
                stride_kn, stride_vn, offs_n, offs_d, row_ok, qf_row, rs_row, rm_row, Lq, Allowed,
                FSL, BLOCK_N, False, HAS_MASK, HAS_MASK, USE_TMA, DOT_F32, IEEE, WITH_MASS)
        if n_stop < end:  # the last, partial tile: keys from `end` on are left out
            acc, l_i, m_i, r_cur = _key_tile(
                q, acc, l_i, m_i, r_cur, k_base, v_base, desc_k, desc_v, kv_row0, col_d0, n_stop, Lk, end, NKF,
                qk_scale, stride_kn, stride_vn, offs_n, offs_d, row_ok, qf_row, rs_row, rm_row, Lq, Allowed,
                FSL, BLOCK_N, True, True, HAS_MASK, USE_TMA, DOT_F32, IEEE, WITH_MASS)

        if is_full:
            # ---- epilogue: output (and LSE), then the frame mass
            l_safe = _finish_rows(Out, LSE, acc, m_i, l_i, b, h, pid_bh, offs_m, offs_d, row_ok, Lq,
                                  stride_ob, stride_om, stride_oh, WITH_LSE)
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
    Out, RS, RM, Allowed, PACC, PM, PL, LSE,
    stride_ob, stride_om, stride_oh,
    H, Lq, NKF, N_FULL, SPLIT,
    FSL: tl.constexpr, HEAD_DIM: tl.constexpr, EPI_F: tl.constexpr, WITH_MASS: tl.constexpr, WITH_LSE: tl.constexpr,
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
    l_safe = _finish_rows(Out, LSE, acc, m_i, l_i, b, h, pid_bh, offs_m, offs_d, row_ok, Lq,
                          stride_ob, stride_om, stride_oh, WITH_LSE)
    if WITH_MASS:
        scratch = pid_bh.to(tl.int64) * NKF * Lq
        _mass_epilogue(RS + scratch + offs_m, RM + scratch + offs_m, m_i, l_safe, row_ok, qf_row, Lq, NKF,
                       Allowed, FSL, EPI_F, False)
