"""Frame-aggregated attention kernels for the probes: the Triton frame forward's statistics, and recomputation
from LSE.

Two ways, both drop-in replacements for the blockwise torch reference in `reference.py` (same definitions, same
shapes; see that module's docstring):

- From the forward (the "fused" capture mode), `frame_forward_with_stats(q, k, v)` -> (out, mass): the model's own
  Triton forward
  (`models.common.triton_attention`, `attention_kernel="triton"`) asked for its per-key-frame row masses, which a sum
  over each query frame's rows turns into the mass. Its output is bitwise the model's, so a probe on a model
  that runs this kernel changes nothing. `frame_forward_into_store` adds one small kernel
  (`_store_frame_stats_kernel`) that writes attn_mass and attn_logit (from the kernel's frame means of q and k)
  straight into a capture buffer's cells.
- From the log-sum-exp (the "exact" capture mode on CUDA), `frame_mass_from_lse(q, k, lse)` /
  `key_token_mass_from_lse(q, k, lse)`: given the row
  log-sum-exp of a stock attention kernel (`lse_from_sdpa`), recompute p = exp(s - lse) tile by tile.
  A program owns BLOCK_N key tokens and sweeps every query row, accumulating sum_i p_ij per query frame
  (the query axis is split at frame edges with masked sums); the frame mass is the key-token mass summed over
  the key frame's tokens (the same numbers as per-key-frame row sums averaged per query frame, organised so
  that no program needs atomics). The forward kernel stays untouched (bitwise-identical output).

Layouts: q [B, Lq, H, D], k and v [B, Lk, H, D] (last dim contiguous), lse [B, H, Lq] float32 natural log,
allowed [nqf, nkf] bool. D must be a power of two (Wan: 128). bf16/fp16 inputs use tensor cores; fp32
inputs use exact fp32 dots ("ieee", slow; for tests).

CPU testing: with TRITON_INTERPRET=1 set before this module is imported, the kernels run on CPU tensors in
Triton's interpreter (models/common/triton_common.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from models.common import triton_attention  # the model's forward: its public API (frame_attention)
from models.common.triton_attention import frame_means_many_into
from models.common.triton_common import (INTERPRET, LOG2E, allowed_arg, check_device_and_dtype, int32_ok,
                                  last_dim_contiguous, on_device)
from workbench.errors import WorkbenchError
from workbench.kernels.reference import check_frame_inputs

# ----------------------------------------------------------------------------------------------------------
# From the forward: the model's Triton forward with its statistics
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _store_frame_stats_kernel(
    RS, QM, KM, MASS_OUT, LOGIT_OUT, QIDX, KIDX,
    stride_mb, stride_mh, stride_mq, stride_mk,
    stride_lb, stride_lh, stride_lq, stride_lk,
    H, Lq, NQF, NKF, NKM, scale,
    FSL: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
    WITH_MASS: tl.constexpr, WITH_LOGIT: tl.constexpr, KM_BY_FRAME: tl.constexpr,
):
    # grid: (B * H * NQF * NKF,). For query frame g and key frame f of (b, h): mass = sum of the frame's rows of
    # RS[b, h, f, :] (each already divided by fsl) and logit = QM[b, h, g] . KM[b, h, f] * scale, written straight
    # into MASS_OUT / LOGIT_OUT [B, H, F, F] (strided views of a capture buffer) at (QIDX[g], KIDX[f]).
    # KM [B, H, NKM, D]: the call's key frames in order (NKM = NKF) or, KM_BY_FRAME, every absolute frame's slot
    # (row KIDX[f]: the probe's kept key means).
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
        km = tl.load(KM + (bh * NKM + (kj if KM_BY_FRAME else f)) * HEAD_DIM + d)
        tl.store(LOGIT_OUT + b * stride_lb + h * stride_lh + qi * stride_lq + kj * stride_lk,
                 tl.sum(qm * km, 0) * scale)



def _launch_frame_forward(q, k, v, *, frame_seq_len, scale=None, allowed=None, config=None, use_tma=None,
                  with_mass=True, frame_means=False, store=None):
    """frame_forward_with_stats with knobs for tests and benchmarks (config and use_tma: see
    `models.common.triton_attention.frame_attention`). with_mass=False runs the same kernel without the frame
    bookkeeping (a plain Triton forward, for measuring what the bookkeeping costs), mass None.
    Returns (out [B, Lq, H, D] q.dtype, mass [B, H, nqf, nkf] float32), and with frame_means also the per-frame
    mean vectors of q and k: q_means [B, H, nqf, D], k_means [B, H, nkf, D] float32.
    store: see `frame_forward_into_store` (then returns (out, None)).
    """
    if store is not None:
        if allowed is not None:
            raise WorkbenchError("frame_forward_into_store takes unmasked calls only (allowed=None)")
        frame_means = store.get("logit_out") is not None
        with_mass = store.get("mass_out") is not None
    B, Lq, H, D, Lk, nqf, nkf = check_frame_inputs(q, k, v, frame_seq_len=frame_seq_len, allowed=allowed)
    if store is not None:
        _check_store(store, B, H, nqf, nkf, D, q.device)  # (the launcher checks device and dtype before any work)
    fsl = int(frame_seq_len)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kept = store is not None and store.get("key_means") is not None  # the means are made below, not in the forward
    q, k, v = last_dim_contiguous(q, k, v)
    means_jobs = []
    int32_ok(q, k, v)  # (frame_attention checks it too, but the means below come first; they check device and dtype)
    if kept and frame_means:  # the kept key means: q's and the new frames', in one pass (before the attention
        # kernel while q and the new keys may still be in L2: triton_attention.MEANS_FIRST)
        q_means, k_means = torch.empty((B, H, nqf, D), dtype=torch.float32, device=q.device), store["key_means"]
        means_jobs = [(q, q_means, 0)] + [(k[:, a * fsl : b * fsl], k_means, first) for a, b, first in store["fresh"]]
        if triton_attention.MEANS_FIRST:
            frame_means_many_into(means_jobs, fsl)
    r = triton_attention.frame_attention(q, k, v, frame_seq_len=fsl, scale=scale, allowed=allowed, with_mass=with_mass,
                            frame_means=frame_means and not kept, config=config, use_tma=use_tma)
    if store is not None:
        if means_jobs and not triton_attention.MEANS_FIRST:
            frame_means_many_into(means_jobs, fsl)
        if not means_jobs:
            q_means, k_means = r.q_means, r.k_means
        _store_frame_stats(store, r.row_mass, q_means, k_means, B, H, Lq, nqf, nkf, fsl, D, scale)
        return r.out, None
    mass = None
    if with_mass:
        # sum over the query frame's rows (already divided by fsl): [B, H, nkf, nqf, fsl] -> [B, H, nqf, nkf]
        mass = torch.empty((B, H, nqf, nkf), dtype=torch.float32, device=q.device)
        torch.sum(r.row_mass.view(B, H, nkf, nqf, fsl), dim=-1, out=mass.transpose(2, 3))
    if frame_means:
        return r.out, mass, r.q_means, r.k_means
    return r.out, mass


def _check_store(store, B, H, nqf, nkf, D, device):
    mass_out, logit_out = store.get("mass_out"), store.get("logit_out")
    qidx, kidx = store["query_index"], store["key_index"]
    if mass_out is None and logit_out is None:
        raise WorkbenchError("frame_forward_into_store needs mass_out, logit_out or both")
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
    km = store.get("key_means")
    if km is not None:
        if (km.dim() != 4 or km.dtype != torch.float32 or tuple(km.shape[:2]) != (B, H) or km.shape[3] != D
                or not km.is_contiguous() or km.device != device):
            raise WorkbenchError(f"key_means must be a contiguous float32 [B={B}, H={H}, F, D={D}] tensor on {device}; "
                                 f"got {km.dtype} {tuple(km.shape)} on {km.device}")
        for run in store["fresh"]:
            a, b, first = run
            if not (0 <= a < b <= nkf and 0 <= first and first + b - a <= km.shape[2]):
                raise WorkbenchError(f"fresh key-frame run {run}: allowed are (first, end, frame) with "
                                     f"0 <= first < end <= {nkf} key frames and frame + end - first <= {km.shape[2]}")


def _store_frame_stats(store, rs, qsum, ksum, B, H, Lq, nqf, nkf, fsl, D, scale):
    by_frame = store.get("key_means") is not None  # ksum: the kept means, one slot per absolute frame
    mass_out, logit_out = store.get("mass_out"), store.get("logit_out")
    qidx, kidx = store["query_index"], store["key_index"]
    ms = mass_out.stride() if mass_out is not None else (0, 0, 0, 0)
    ls = logit_out.stride() if logit_out is not None else (0, 0, 0, 0)
    unused = torch.empty(0, dtype=torch.float32, device=qidx.device)  # pointer of what this call does not write
    rs, qsum, ksum = (unused if t is None else t for t in (rs, qsum, ksum))
    _store_frame_stats_kernel[(B * H * nqf * nkf,)](
        rs, qsum, ksum, mass_out if mass_out is not None else unused, logit_out if logit_out is not None else unused,
        qidx, kidx, *ms, *ls, H, Lq, nqf, nkf, ksum.shape[2] if by_frame else nkf, scale,
        FSL=fsl, HEAD_DIM=D, ROWS=512, WITH_MASS=mass_out is not None, WITH_LOGIT=logit_out is not None,
        KM_BY_FRAME=by_frame, num_warps=4)


def frame_forward_into_store(q, k, v, *, frame_seq_len, mass_out=None, logit_out=None, query_index,
                               key_index, scale=None, key_means=None, fresh=()):
    """The Triton frame forward of an unmasked call that also writes its frame statistics into capture buffers:
    mass_out[b, h, query_index[i], key_index[j]] = attn_mass of query frame i and key frame j, and logit_out
    the same cells of attn_logit (mean q of the frame . mean k of the frame * scale); either may be None.
    mass_out / logit_out: float32 [B, H, F, F] views (any strides); query_index [nqf], key_index [nkf] int
    tensors on the GPU. One small kernel after the forward replaces the row sums, the logit matmul and the
    scatter into the buffers. Returns out [B, Lq, H, D].

    key_means (with logit_out): float32 [B, H, F, D] contiguous, the mean key vector of every absolute frame as
    kept by the caller from earlier calls (every key_index value must be below F: it is a row of key_means);
    `fresh` lists the runs of this call's key frames whose means it does not hold yet, (first, end, frame): key
    frames first..end-1 of the call (positions in k) are absolute frames frame, frame + 1, ...; their means are
    computed (`frame_means_into`) into those slots before the logits read key_means at key_index. Then the frame
    means are two Triton passes (q, the fresh frames of k), whatever the config's MEANS; a frame's mean is the
    same bits as from a pass over all of k."""
    store = dict(mass_out=mass_out, logit_out=logit_out, query_index=query_index, key_index=key_index,
                 key_means=key_means if logit_out is not None else None, fresh=tuple(fresh))
    return _launch_frame_forward(q, k, v, frame_seq_len=frame_seq_len, scale=scale, store=store)[0]


def frame_forward_with_stats(q, k, v, *, frame_seq_len, scale=None, allowed=None, frame_means=False):
    """From the forward. q [B, Lq, H, D], k/v [B, Lk, H, D] (bf16/fp16/fp32, CUDA) ->
    (out [B, Lq, H, D] in q.dtype, mass [B, H, nqf, nkf] float32, rows sum to 1, disallowed pairs 0), and with
    frame_means also (q_means [B, H, nqf, D], k_means [B, H, nkf, D]) float32, the per-frame mean vectors."""
    return _launch_frame_forward(q, k, v, frame_seq_len=frame_seq_len, scale=scale, allowed=allowed,
                         frame_means=frame_means)


# ----------------------------------------------------------------------------------------------------------
# From the log-sum-exp: key-token mass (the frame mass is its sum over a key frame's tokens)
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


def _launch_key_token(q, k, lse, *, frame_seq_len, scale, allowed=None, config=None):
    B, Lq, H, D, Lk, nqf, nkf = check_frame_inputs(q, k, frame_seq_len=frame_seq_len, allowed=allowed, lse=lse)
    check_device_and_dtype(q, D)
    if lse.device != q.device:
        raise WorkbenchError(f"lse is on {lse.device}, q on {q.device}")
    fsl = int(frame_seq_len)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q, k = last_dim_contiguous(q, k)
    int32_ok(q, k)
    lse = lse.float()
    if lse.stride(-1) != 1:
        lse = lse.contiguous()
    tok = torch.empty((B, H, nqf, Lk), dtype=torch.float32, device=q.device)
    allowed_t, has_mask = allowed_arg(allowed, tok)
    args = (
        q, k, lse, tok, allowed_t,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1),
        H, Lq, Lk, nqf, nkf, scale * LOG2E,
    )
    meta = dict(FSL=fsl, HEAD_DIM=D, HAS_MASK=has_mask, DOT_F32=INTERPRET and q.dtype == torch.bfloat16,
                IEEE=q.dtype == torch.float32)
    if config is None and INTERPRET:
        config = {"BLOCK_M": 16, "BLOCK_N": 16}
    with on_device(q):
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
    """From the log-sum-exp, key-token resolution. lse [B, H, Lq] float32 natural log (e.g. `lse_from_sdpa`) ->
    tok [B, H, nqf, Lk] float32 with tok[b, h, qf, j] = (1/fsl) sum_{i in qf} p_ij (0 for disallowed pairs)."""
    return _launch_key_token(q, k, lse, frame_seq_len=frame_seq_len, scale=scale, allowed=allowed)


def frame_mass_from_lse(q, k, lse, *, frame_seq_len, scale, allowed=None):
    """From the log-sum-exp. lse [B, H, Lq] float32 natural log -> mass [B, H, nqf, nkf] float32 (disallowed pairs 0).

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
    as the model's stock kernels compute it when a probe asks for the log-sum-exp
    (`models.common.attention_kernels.attention_with_lse`: the cuDNN / flash SDPA op on CUDA, SDPA plus a blockwise LSE
    elsewhere)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise WorkbenchError(f"lse_from_sdpa needs q [B, Lq, H, D], k/v [B, Lk, H, D]; got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
    from models.common.attention_kernels import attention_with_lse

    return attention_with_lse(q, k, v, scale=float(scale))
