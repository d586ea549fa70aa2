"""One Triton launch that assembles a wave-balanced attention call's output (models/common/balanced_attention.py).

The balanced schedule leaves two results: the main rows' output and log-sum-exp from one call, and the tail
rows' per-key-segment outputs and log-sum-exps from another. `assemble` writes the whole output [B, Lq, H, Dv]
and lse [B, H, Lq] in one pass: main rows copied, tail rows merged in float32,

    lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) out_s,

rounded once to the output dtype. The same arithmetic as `merge_segments` there, which is what the CPU runs;
this one launch replaces the dozen small launches and the concatenation of the torch version (which cost up to
about 0.1 ms a call more at the rollout's shapes: bench/RESULTS.md, issue 16, session 16). Tested against it under the interpreter (tests/test_balanced.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 32  # query rows per program


@triton.jit
def _assemble_kernel(Out, Lse, OutM, LseM, OutS, LseS, Lq, M, Lt, H,
                     so_b, so_l, so_h, sm_b, sm_l, sm_h, ss_b, ss_l, ss_h, slm_b, slm_h, sls_b, sls_h,
                     DV: tl.constexpr, DV_P2: tl.constexpr, S: tl.constexpr, ROWS: tl.constexpr):
    # grid (cdiv(Lq, ROWS), B * H). Out [B, Lq, H, DV] contiguous; Lse [B, H, Lq]; OutM [B, M, H, DV] and
    # LseM [B, H, M] (main rows); OutS [B * S, Lt, H, DV] and LseS [B * S, H, Lt] (tail rows per key segment).
    # M is a multiple of ROWS, so a program's rows are all main or all tail.
    r0 = tl.program_id(0) * ROWS
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = r0 + tl.arange(0, ROWS)  # [R]
    cols = tl.arange(0, DV_P2)  # [DV_P2]
    col_ok = cols < DV
    row_ok = rows < Lq
    out_ptr = Out + b * so_b + h * so_h + rows[:, None] * so_l + cols[None, :]
    if r0 < M:
        o = tl.load(OutM + b * sm_b + h * sm_h + rows[:, None] * sm_l + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :])
        tl.store(out_ptr, o, mask=row_ok[:, None] & col_ok[None, :])
        tl.store(Lse + bh * Lq + rows, tl.load(LseM + b * slm_b + h * slm_h + rows, mask=row_ok), mask=row_ok)
    else:
        t = rows - M  # tail row index
        m = tl.full([ROWS], float("-inf"), tl.float32)
        for s in tl.static_range(S):
            ls = tl.load(LseS + (b * S + s) * sls_b + h * sls_h + t, mask=row_ok, other=0.0)
            m = tl.maximum(m, ls)
        tot = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DV_P2], tl.float32)
        for s in tl.static_range(S):
            ls = tl.load(LseS + (b * S + s) * sls_b + h * sls_h + t, mask=row_ok, other=0.0)
            w = tl.exp(ls - m)
            o = tl.load(OutS + (b * S + s) * ss_b + h * ss_h + t[:, None] * ss_l + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += w[:, None] * o.to(tl.float32)
            tot += w
        tl.store(out_ptr, (acc / tot[:, None]).to(Out.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        tl.store(Lse + bh * Lq + rows, m + tl.log(tot), mask=row_ok)


def assemble(out_m, lse_m, out_s, lse_s, split: int):
    """out_m [B, M, H, Dv], lse_m [B, H, M], out_s [B * split, Lt, H, Dv], lse_s [B * split, H, Lt] ->
    (out [B, M + Lt, H, Dv] contiguous in out_m's dtype, lse [B, H, M + Lt] float32). M a multiple of 32."""
    B, M, H, Dv = out_m.shape
    Lt = out_s.shape[1]
    Lq = M + Lt
    if M % ROWS or out_m.stride(3) != 1 or out_s.stride(3) != 1 or lse_m.stride(2) != 1 or lse_s.stride(2) != 1:
        raise ValueError(f"assemble: main rows {M} must be a multiple of {ROWS} and the last dims contiguous")
    out = torch.empty(B, Lq, H, Dv, device=out_m.device, dtype=out_m.dtype)
    lse = torch.empty(B, H, Lq, device=out_m.device, dtype=torch.float32)
    lse_m, lse_s = lse_m.float(), lse_s.float()
    _assemble_kernel[(triton.cdiv(Lq, ROWS), B * H)](
        out, lse, out_m, lse_m, out_s, lse_s, Lq, M, Lt, H,
        out.stride(0), out.stride(1), out.stride(2), out_m.stride(0), out_m.stride(1), out_m.stride(2),
        out_s.stride(0), out_s.stride(1), out_s.stride(2), lse_m.stride(0), lse_m.stride(1),
        lse_s.stride(0), lse_s.stride(1),
        DV=Dv, DV_P2=triton.next_power_of_2(Dv), S=split, ROWS=ROWS, num_warps=4)
    return out, lse
