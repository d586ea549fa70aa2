"""A FlashAttention-3-style attention forward for Hopper in Gluon (Triton's explicit dialect): warp-specialised,
with the frame sums in its softmax. models/common/triton_attention.py's `frame_attention` runs it on sm90 (its
public API, split plan and merge kernel stay the same), so it is the kernel table's "gluon" (the "auto" choice's
kernel on sm90) and "triton" there, and the capture mode "fused" reads its statistics.

Why Gluon: Triton 3.6's automatic warp specialisation partitions the work but does not schedule it, and it
refuses a branch in the key loop (the frame-sum flush). Here the schedule is written out:

- one CTA per work item (a tile = (batch, head, 128-row query block), or one key segment of a tile of the last,
  partial wave, as triton_attention's split plan says); three partitions: a producer warp that TMA-loads q once
  and the K/V tiles into a STAGES-deep ring (mbarriers `k_ready`, `v_ready`; `kv_empty` counts the two consumers'
  releases), and two consumer warpgroups of 64 query rows each (the default partition is consumer 0) that share
  every K/V tile;
- each consumer overlaps its softmax with the tensor cores (FlashAttention-3's intra-warpgroup pipelining):
  in iteration j it issues S_j = q K_j^T, then O += P_{j-1} V_{j-1} (P from registers), waits for S_j only,
  runs the softmax of S_j while the P V product runs, then waits for it and frees the stage;
- frame sums (WITH_MASS): next to the running max m and sum l each row keeps the running sum of the current
  key frame's probabilities (rescaled like l). The key loop runs by frames: a tile inside a frame only adds
  its row sums (two FMAs a row); the tile holding a frame's last key (one in ~12 at 1560-token frames) splits
  its sums with one masked sum and stores that frame's sum and the max it is relative to in `rs`/`rm`
  [B, H, nkf, Lq]. A whole tile then writes r * 2^(m_f - m) / (l * fsl) in place (triton_attention's
  row_mass), a segment leaves its (acc, m, l) for the Triton merge kernel, which does the same for split tiles.
  The output arithmetic is the same with and without the sums, so capture leaves the output bits unchanged;
  the sums cost ~4% of the kernel's time (a branch and a predicated store on every tile cost 8%).

Layouts: q [B, Lq, H, D], k/v [B, Lk, H, D] with the rows of a batch H * D apart; D = 128; bf16/fp16; whole
frames of at least BLOCK_N keys (`applies`). Measured on an H200 with bench/bench_gluon_attention.py.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634
BLOCK_M = 128  # query rows of a CTA: two consumer warpgroups of 64 (wgmma's M)
BLOCK_N = 128  # keys of a K/V tile
STAGES = 3  # K/V ring depth: 32 KB q + 3 x 64 KB = 224 KB of shared memory (2 stages measured 1.38x slower)
CONSUMER_REGS, PRODUCER_REGS = 240, 24  # setmaxnreg per thread of a consumer warpgroup / the producer
DISABLE_ENV = "WORKBENCH_GLUON"  # =0: frame_attention runs its Triton forward on Hopper too


@gluon.jit
def _producer(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
              q_row0, kv_row0, col0, n_kv, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """One warp: q's two 64-row halves once, then K_j and V_j into stage j % STAGES when both consumers freed it."""
    mbarrier.expect(q_bar, 2 * desc_q.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_q, [q_row0, col0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(desc_q, [q_row0 + 64, col0], q_bar, q_smem.index(1))
    for j in range(n_kv):
        st = j % STAGES
        ph = (j // STAGES) & 1
        mbarrier.wait(kv_empty.index(st), ph ^ 1)  # a fresh barrier passes the wait on parity 1
        mbarrier.expect(k_ready.index(st), desc_k.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_k, [kv_row0 + j * BLOCK_N, col0], k_ready.index(st), k_smem.index(st))
        mbarrier.expect(v_ready.index(st), desc_v.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_v, [kv_row0 + j * BLOCK_N, col0], v_ready.index(st), v_smem.index(st))


@gluon.jit
def _softmax_tile(s, n0, end, f, m_i, l_i, r_i, cols0, rows, row_ok, Lq, qk_scale, rs_ptr, rm_ptr,
                  BLOCK_N: gl.constexpr, FSL: gl.constexpr, MASS: gl.constexpr):
    """Online softmax of the scores s [64, BN] of keys [n0, n0 + BN) (base 2: qk_scale = scale * log2 e) and the
    frame sums. MASS: 0 none; 1 a tile inside key frame f (its running sum r grows); 2 the tile with frame f's
    last key (r's part before it is flushed to rs/rm with the max it is relative to, the part after starts frame
    f + 1's sum). Returns (p, alpha = 2^(m_old - m_new), m, l, r)."""
    if MASS != 1:  # only a frame's last tile can reach `end` (the next segment's or batch's keys, or TMA's zeros)
        if n0 + BLOCK_N > end:
            s = gl.where((n0 + cols0 < end)[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])  # [64, BN]
    alpha = gl.exp2(m_i - m_new)
    p_sum = gl.sum(p, 1)
    l_i = l_i * alpha + p_sum
    if MASS == 1:
        r_i = r_i * alpha + p_sum
    if MASS == 2:
        edge = (f + 1) * FSL - n0  # keys of frame f in this tile, 1..BN
        after = gl.sum(gl.where((cols0 >= edge)[None, :], p, 0.0), 1)  # frame f + 1's part (one masked sum)
        r_i = r_i * alpha + gl.maximum(p_sum - after, 0.0)
        gl.store(rs_ptr + f * Lq + rows, r_i, mask=row_ok)
        gl.store(rm_ptr + f * Lq + rows, m_new, mask=row_ok)
        r_i = after
    return p, alpha, m_new, l_i, r_i


@gluon.jit
def _kv_step(j, q, k_smem, v_smem, k_ready, v_ready, kv_empty, acc, p_op, alpha, m_i, l_i, r_i, f, start, end,
             zero_s, cols0, rows, row_ok, Lq, qk_scale, rs_ptr, rm_ptr, orow_l: gl.constexpr,
             p_layout: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, FSL: gl.constexpr,
             MASS: gl.constexpr):
    """Key tile j (j >= 1): issue S_j = q K_j^T, then O += P_{j-1} V_{j-1} on the tensor cores while S_j's softmax
    runs; free tile j - 1's stage. Returns the new (acc, p_op = P_j, alpha, m, l, r)."""
    st = j % STAGES
    pst = (j - 1) % STAGES
    mbarrier.wait(k_ready.index(st), (j // STAGES) & 1)
    s = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    acc = acc * gl.convert_layout(alpha, orow_l)[:, None]
    mbarrier.wait(v_ready.index(pst), ((j - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(pst), acc, is_async=True)
    s = warpgroup_mma_wait(1, deps=(s,))
    p, alpha, m_i, l_i, r_i = _softmax_tile(s, start + j * BLOCK_N, end, f, m_i, l_i, r_i, cols0, rows, row_ok,
                                            Lq, qk_scale, rs_ptr, rm_ptr, BLOCK_N, FSL, MASS)
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
    mbarrier.arrive(kv_empty.index(pst), count=1)
    p_op = gl.convert_layout(p.to(k_smem.dtype), p_layout)
    return acc, p_op, alpha, m_i, l_i, r_i


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
              out_ptr, lse_ptr, rs_ptr, rm_ptr, pacc_ptr, pm_ptr, pl_ptr, row0, slot0, is_full, start, end,
              Lq, NKF, qk_scale, stride_ol,
              WG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
              FSL: gl.constexpr, WITH_MASS: gl.constexpr, WITH_LSE: gl.constexpr):
    """Rows [row0 + 64 WG, row0 + 64 WG + 64) of the query block against keys [start, end). A whole tile
    (is_full) writes its output rows (and lse, row mass); a segment leaves acc, m, l at slot0 + 64 WG for the
    merge. (Stores are predicated rather than branched: Triton 3.6 cannot lower a store inside a branch of a
    warp-specialised partition.)"""
    R: gl.constexpr = 64
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)
    ocol_l: gl.constexpr = gl.SliceLayout(0, o_layout)
    # with the sums, tile 0 is a frame's last tile only when frames are one tile long (then frame 0 is done)
    FIRST: gl.constexpr = 0 if not WITH_MASS else (2 if FSL <= BLOCK_N else 1)
    G0: gl.constexpr = 1 if FIRST == 2 else 0

    q = q_smem.index(WG)
    rows = row0 + WG * R + gl.arange(0, R, layout=row_l)  # [64] query index within the batch
    row_ok = rows < Lq
    cols0 = gl.arange(0, BLOCK_N, layout=col_l)
    m_i = gl.full([R], -1.0e30, gl.float32, row_l)
    l_i = gl.zeros([R], gl.float32, row_l)
    r_i = gl.zeros([R], gl.float32, row_l)  # the current key frame's running sum (WITH_MASS)
    f0 = start // FSL
    acc = gl.zeros([R, HEAD_DIM], gl.float32, o_layout)
    zero_s = gl.zeros([R, BLOCK_N], gl.float32, s_layout)
    n_kv = gl.cdiv(end - start, BLOCK_N)

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False)
    p, alpha, m_i, l_i, r_i = _softmax_tile(s, start, end, f0, m_i, l_i, r_i, cols0, rows, row_ok, Lq, qk_scale,
                                            rs_ptr, rm_ptr, BLOCK_N, FSL, FIRST)
    p_op = gl.convert_layout(p.to(k_smem.dtype), p_layout)
    if WITH_MASS:
        # the key loop by frames: the tiles inside frame g only add to its running sum; its last tile (e) flushes
        # it. No branch and no predicated store on the tiles inside a frame (the sums cost ~8% of the kernel
        # when every tile tested for an edge). Tiles run in order 1..n_kv-1, as the producer loads them.
        for g in range(G0, (end - start) // FSL):
            jb = gl.maximum((g * FSL - 1) // BLOCK_N + 1, 1)  # the first tile after frame g - 1's last
            e = ((g + 1) * FSL - 1) // BLOCK_N
            for j in range(jb, e):
                acc, p_op, alpha, m_i, l_i, r_i = _kv_step(
                    j, q, k_smem, v_smem, k_ready, v_ready, kv_empty, acc, p_op, alpha, m_i, l_i, r_i, f0 + g,
                    start, end, zero_s, cols0, rows, row_ok, Lq, qk_scale, rs_ptr, rm_ptr, orow_l, p_layout,
                    BLOCK_N, STAGES, FSL, 1)
            acc, p_op, alpha, m_i, l_i, r_i = _kv_step(
                e, q, k_smem, v_smem, k_ready, v_ready, kv_empty, acc, p_op, alpha, m_i, l_i, r_i, f0 + g,
                start, end, zero_s, cols0, rows, row_ok, Lq, qk_scale, rs_ptr, rm_ptr, orow_l, p_layout,
                BLOCK_N, STAGES, FSL, 2)
    else:
        for j in range(1, n_kv):
            acc, p_op, alpha, m_i, l_i, r_i = _kv_step(
                j, q, k_smem, v_smem, k_ready, v_ready, kv_empty, acc, p_op, alpha, m_i, l_i, r_i, f0,
                start, end, zero_s, cols0, rows, row_ok, Lq, qk_scale, rs_ptr, rm_ptr, orow_l, p_layout,
                BLOCK_N, STAGES, FSL, 0)

    # the last tile's P V
    pst = (n_kv - 1) % STAGES
    acc = acc * gl.convert_layout(alpha, orow_l)[:, None]
    mbarrier.wait(v_ready.index(pst), ((n_kv - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(pst), acc, is_async=True)
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
    mbarrier.arrive(kv_empty.index(pst), count=1)

    orows = row0 + WG * R + gl.arange(0, R, layout=orow_l)
    ocols = gl.arange(0, HEAD_DIM, layout=ocol_l)
    # a segment: acc relative to 2^m, and (m, l), for the merge (models/common/triton_attention_kernels.py)
    part = gl.arange(0, R, layout=orow_l) >= 0
    prow = slot0 + WG * R + gl.arange(0, R, layout=orow_l)
    gl.store(pacc_ptr + prow[:, None] * HEAD_DIM + ocols[None, :], acc, mask=(part & (is_full == 0))[:, None])
    prow_s = slot0 + WG * R + gl.arange(0, R, layout=row_l)
    seg_rows = (rows >= 0) & (is_full == 0)
    gl.store(pm_ptr + prow_s, m_i, mask=seg_rows)
    gl.store(pl_ptr + prow_s, l_i, mask=seg_rows)
    # a whole tile: out = acc / l, the lse and the row mass r * 2^(m_f - m) / (l * fsl) (in place: a row's sums
    # are reread by the one thread that stored them)
    l_safe = gl.where(l_i > 0.0, l_i, 1.0)
    o = acc / gl.convert_layout(l_safe, orow_l)[:, None]
    gl.store(out_ptr + orows[:, None] * stride_ol + ocols[None, :], o.to(k_smem.dtype),
             mask=((orows < Lq) & (is_full != 0))[:, None])
    full_rows = row_ok & (is_full != 0)
    if WITH_LSE:
        gl.store(lse_ptr + rows, (m_i + gl.log2(l_safe)) * 0.6931471805599453, mask=full_rows)
    if WITH_MASS:
        norm = 1.0 / (l_safe * FSL)
        for f in range(NKF * is_full):
            r = gl.load(rs_ptr + f * Lq + rows, mask=full_rows, other=0.0)
            mf = gl.load(rm_ptr + f * Lq + rows, mask=full_rows, other=0.0)
            gl.store(rs_ptr + f * Lq + rows, r * gl.exp2(mf - m_i) * norm, mask=full_rows)


@gluon.jit
def _attn_fwd(desc_q, desc_k, desc_v, out_ptr, lse_ptr, rs_ptr, rm_ptr, pacc_ptr, pm_ptr, pl_ptr,
              H, Lq, Lk, NKF, qk_scale, stride_ob, stride_ol, stride_oh, N_FULL, SPLIT,
              HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, FSL: gl.constexpr,
              WITH_MASS: gl.constexpr, WITH_LSE: gl.constexpr, CONSUMER_REGS: gl.constexpr,
              PRODUCER_REGS: gl.constexpr):
    # 1-D grid of work items, as models/common/triton_attention_kernels.py's forward: a tile is (query block,
    # b * H + h), query block fastest; items below N_FULL are whole tiles, each later tile (the last, partial wave)
    # is SPLIT items of whole key frames whose (acc, m, l) the Triton merge kernel combines.
    item = gl.program_id(0)
    n_qblk = gl.cdiv(Lq, 128)
    is_full = (item < N_FULL).to(gl.int32)
    seg_item = gl.maximum(item - N_FULL, 0)
    tile = gl.where(item < N_FULL, item, N_FULL + seg_item // SPLIT)
    seg = seg_item % SPLIT
    qblk = tile % n_qblk
    bh = tile // n_qblk
    h = bh % H
    b = bh // H
    row0 = qblk * 128
    start = gl.where(item < N_FULL, 0, (seg * NKF // SPLIT) * FSL)
    end = gl.where(item < N_FULL, Lk, gl.minimum(((seg + 1) * NKF // SPLIT) * FSL, Lk))
    dtype: gl.constexpr = desc_k.dtype

    q_smem = gl.allocate_shared_memory(dtype, [2, 64, HEAD_DIM], desc_q.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], desc_v.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a stage

    out_b = out_ptr + b.to(gl.int64) * stride_ob + h * stride_oh
    lse_b = lse_ptr + bh * Lq
    rs_b = rs_ptr + bh.to(gl.int64) * NKF * Lq
    rm_b = rm_ptr + bh.to(gl.int64) * NKF * Lq
    slot0 = seg_item * 128
    col0 = h * HEAD_DIM
    gl.warp_specialize([
        (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, out_b, lse_b, rs_b, rm_b,
                     pacc_ptr, pm_ptr, pl_ptr, row0, slot0, is_full, start, end, Lq, NKF, qk_scale, stride_ol,
                     0, HEAD_DIM, BLOCK_N, STAGES, FSL, WITH_MASS, WITH_LSE)),
        (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty, out_b, lse_b, rs_b, rm_b,
                     pacc_ptr, pm_ptr, pl_ptr, row0, slot0, is_full, start, end, Lq, NKF, qk_scale, stride_ol,
                     1, HEAD_DIM, BLOCK_N, STAGES, FSL, WITH_MASS, WITH_LSE)),
        (_producer, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, kv_empty,
                     b * Lq + row0, b * Lk + start, col0, gl.cdiv(end - start, BLOCK_N), BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


@functools.lru_cache(maxsize=None)
def _smem_layout(block: tuple, bf16: bool):
    """The shared-memory layout of a TMA block (made once: ~10 us of host time each, three a call)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.bfloat16 if bf16 else gl.float16)


def _desc(t2d, block):
    layout = _smem_layout(tuple(block), t2d.dtype == torch.bfloat16)
    return TensorDescriptor(t2d, list(t2d.shape), list(t2d.stride()), block, layout)


def applies(q, k, v, frame_seq_len: int, masked: bool) -> bool:
    """Whether the Gluon forward takes this call: unmasked, Hopper (sm90 exactly: its wgmma and setmaxnreg),
    bf16/fp16, head_dim 128, whole frames of at least BLOCK_N keys, K/V rows of a batch contiguous."""
    if masked or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] != 128:
        return False
    if os.environ.get(DISABLE_ENV) == "0" or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    row = q.shape[2] * 128
    return frame_seq_len >= BLOCK_N and all(
        t.stride(3) == 1 and t.stride(2) == 128 and t.stride(1) == row and (t.shape[0] == 1 or t.stride(0) == t.shape[1] * row)
        for t in (k, v))


def resident_programs(device) -> int:
    """One CTA a SM (229 KB of shared memory with 3 stages)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch(q, k, v, out, lse, rs, rm, pacc, pm, pl, scale, n_full, split, nkf, fsl, with_mass, with_lse):
    """Run the forward over n_full whole tiles and (n_tiles - n_full) * split segments (the caller,
    models/common/triton_attention.py, allocates the outputs and scratch and runs the merge)."""
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if not q.is_contiguous():
        q = q.contiguous()
    desc_q = _desc(q.view(B * Lq, H * D), [64, D])
    desc_k = _desc(k.reshape(B * Lk, H * D), [BLOCK_N, D])
    desc_v = _desc(v.reshape(B * Lk, H * D), [BLOCK_N, D])
    n_tiles = triton.cdiv(Lq, BLOCK_M) * B * H
    _attn_fwd[(n_full + (n_tiles - n_full) * split,)](
        desc_q, desc_k, desc_v, out, lse, rs, rm, pacc, pm, pl, H, Lq, Lk, nkf, scale * LOG2E,
        out.stride(0), out.stride(1), out.stride(2), n_full, split,
        HEAD_DIM=D, BLOCK_N=BLOCK_N, STAGES=STAGES, FSL=fsl, WITH_MASS=bool(with_mass), WITH_LSE=bool(with_lse),
        CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=4)
