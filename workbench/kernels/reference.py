"""Plain-torch, blockwise frame-aggregated attention: the reference for the Triton kernels and the CPU path.

Definitions (docs/store.md, `attn_mass` and `attn_key_token`), with P = softmax over every allowed key of the call:

    mass[b, h, qf, kf] = (1/fsl) * sum_{i in qf} sum_{j in kf} P[b, h, i, j]     # [B, H, nqf, nkf] float32
    tok[b, h, qf, j]   = (1/fsl) * sum_{i in qf} P[b, h, i, j]                   # [B, H, nqf, Lk]  float32
    ent[b, h, qf]      = (1/fsl) * sum_{i in qf} -sum_kf m_ikf ln m_ikf,          # [B, H, nqf]      float32
                         m_ikf = sum_{j in kf} P[b, h, i, j]  (0 ln 0 = 0)

Layout: q [B, Lq, H, D], k and v [B, Lk, H, D] (the model's layout); Lq = nqf * fsl, Lk = nkf * fsl.
`allowed` [nqf, nkf] bool (None = all allowed) takes key frames out of the softmax of a query frame (the
block-causal full-sequence forward); disallowed pairs get mass 0 (the caller turns them into NaN). A query frame
with no allowed key frame at all gets mass 0 everywhere and output 0.

Nothing here builds the [Lq, Lk] score matrix: every function loops over query frames and blocks of key frames
and holds at most [B, H, fsl, block] scores at a time. The row log-sum-exp (natural log) is computed in a first
blockwise pass unless given. Arithmetic is float32 (float64 when the inputs are float64, which the tests use).
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError

# Key tokens per block of the blockwise loops (rounded to whole key frames).
_KEY_BLOCK_TOKENS = 8192


def check_frame_inputs(q, k, v=None, *, frame_seq_len, allowed=None, lse=None):
    """Validate shapes before any work; returns (B, Lq, H, D, Lk, nqf, nkf). Raises WorkbenchError."""
    if q.dim() != 4 or k.dim() != 4:
        raise WorkbenchError(f"q and k must be [B, L, heads, head_dim]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, Lq, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise WorkbenchError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, heads or head_dim")
    if v is not None and tuple(v.shape) != tuple(k.shape):
        raise WorkbenchError(f"v {tuple(v.shape)} must have the shape of k {tuple(k.shape)}")
    if q.device != k.device or (v is not None and v.device != q.device):
        raise WorkbenchError(
            f"q, k, v must be on one device; got {q.device}, {k.device}, {None if v is None else v.device}"
        )
    if q.dtype != k.dtype or (v is not None and v.dtype != q.dtype):
        raise WorkbenchError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {None if v is None else v.dtype}")
    if not q.is_floating_point():
        raise WorkbenchError(f"q, k, v must be floating point; got {q.dtype}")
    fsl = int(frame_seq_len)
    if fsl < 1:
        raise WorkbenchError(f"frame_seq_len must be >= 1; got {frame_seq_len}")
    Lk = k.shape[1]
    if Lq == 0 or Lq % fsl or Lk == 0 or Lk % fsl:
        raise WorkbenchError(
            f"query length {Lq} and key length {Lk} must be positive multiples of frame_seq_len={fsl}"
        )
    nqf, nkf = Lq // fsl, Lk // fsl
    if allowed is not None:
        if tuple(allowed.shape) != (nqf, nkf) or allowed.dtype != torch.bool:
            raise WorkbenchError(
                f"allowed must be a bool tensor [query_frames={nqf}, key_frames={nkf}]; "
                f"got {allowed.dtype} {tuple(allowed.shape)}"
            )
    if lse is not None and tuple(lse.shape) != (B, H, Lq):
        raise WorkbenchError(f"lse must be [B={B}, H={H}, Lq={Lq}]; got {tuple(lse.shape)}")
    return B, Lq, H, D, Lk, nqf, nkf


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _key_blocks(nkf: int, fsl: int):
    """Yield (first_frame, last_frame_exclusive) blocks of whole key frames, about _KEY_BLOCK_TOKENS each."""
    per = max(1, _KEY_BLOCK_TOKENS // fsl)
    for f0 in range(0, nkf, per):
        yield f0, min(nkf, f0 + per)


def _scores(q, k, qf, f0, f1, fsl, scale, allowed, cdt):
    """Scaled scores of query frame qf against key frames [f0, f1): [B, H, fsl, (f1-f0)*fsl], -inf where masked."""
    qb = q[:, qf * fsl:(qf + 1) * fsl].to(cdt).transpose(1, 2)  # [B, H, fsl, D]
    kb = k[:, f0 * fsl:f1 * fsl].to(cdt).transpose(1, 2)  # [B, H, n, D]
    s = torch.matmul(qb, kb.transpose(-1, -2)) * scale  # [B, H, fsl, n]
    if allowed is not None:
        keep = allowed[qf, f0:f1].to(s.device).repeat_interleave(fsl)  # [n]
        s = s.masked_fill(~keep, float("-inf"))
    return s


def row_lse_reference(q, k, *, frame_seq_len, scale=None, allowed=None) -> torch.Tensor:
    """Row log-sum-exp (natural log) of the scaled scores over the allowed keys: [B, H, Lq] float32 (f64 in).

    -inf for a query frame that has no allowed key frame.
    """
    B, Lq, H, D, Lk, nqf, nkf = check_frame_inputs(q, k, frame_seq_len=frame_seq_len, allowed=allowed)
    fsl, cdt = int(frame_seq_len), _compute_dtype(q)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    lse = torch.full((B, H, Lq), float("-inf"), dtype=cdt, device=q.device)
    for qf in range(nqf):
        run = lse[:, :, qf * fsl:(qf + 1) * fsl]  # [B, H, fsl] view
        for f0, f1 in _key_blocks(nkf, fsl):
            if allowed is not None and not bool(allowed[qf, f0:f1].any()):
                continue
            s = _scores(q, k, qf, f0, f1, fsl, scale, allowed, cdt)
            run.copy_(torch.logaddexp(run, torch.logsumexp(s, dim=-1)))
    return lse if cdt == torch.float64 else lse.float()


def _probabilities(q, k, lse, qf, f0, f1, fsl, scale, allowed, cdt):
    """P of query frame qf against key frames [f0, f1): [B, H, fsl, (f1-f0)*fsl]; 0 where masked."""
    s = _scores(q, k, qf, f0, f1, fsl, scale, allowed, cdt)
    row = lse[:, :, qf * fsl:(qf + 1) * fsl].to(cdt)  # [B, H, fsl]
    # a row with no allowed key has lse = -inf: use +inf so that every p of it is exp(-inf) = 0, not NaN
    row = torch.where(torch.isneginf(row), torch.full_like(row, float("inf")), row)
    return torch.exp(s - row[..., None])


def key_token_mass_reference(q, k, *, frame_seq_len, scale=None, allowed=None, lse=None) -> torch.Tensor:
    """tok[b, h, qf, j] = (1/fsl) sum_{i in qf} P[i, j]: [B, H, nqf, Lk] float32 (float64 for float64 inputs)."""
    B, Lq, H, D, Lk, nqf, nkf = check_frame_inputs(q, k, frame_seq_len=frame_seq_len, allowed=allowed, lse=lse)
    fsl, cdt = int(frame_seq_len), _compute_dtype(q)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if lse is None:
        lse = row_lse_reference(q, k, frame_seq_len=fsl, scale=scale, allowed=allowed)
    tok = torch.zeros((B, H, nqf, Lk), dtype=cdt, device=q.device)
    for qf in range(nqf):
        for f0, f1 in _key_blocks(nkf, fsl):
            if allowed is not None and not bool(allowed[qf, f0:f1].any()):
                continue
            p = _probabilities(q, k, lse, qf, f0, f1, fsl, scale, allowed, cdt)  # [B, H, fsl, n]
            tok[:, :, qf, f0 * fsl:f1 * fsl] = p.sum(dim=2) / fsl
    return tok if cdt == torch.float64 else tok.float()


def frame_mass_reference(q, k, *, frame_seq_len, scale=None, allowed=None, lse=None) -> torch.Tensor:
    """mass[b, h, qf, kf]: [B, H, nqf, nkf] float32 (float64 for float64 inputs); rows sum to 1 over kf.

    lse: optional [B, H, Lq] natural-log row log-sum-exp of the scaled scores (e.g. from the attention kernel);
    computed in a first blockwise pass when None.
    """
    B, Lq, H, D, Lk, nqf, nkf = check_frame_inputs(q, k, frame_seq_len=frame_seq_len, allowed=allowed, lse=lse)
    fsl, cdt = int(frame_seq_len), _compute_dtype(q)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if lse is None:
        lse = row_lse_reference(q, k, frame_seq_len=fsl, scale=scale, allowed=allowed)
    mass = torch.zeros((B, H, nqf, nkf), dtype=cdt, device=q.device)
    for qf in range(nqf):
        for f0, f1 in _key_blocks(nkf, fsl):
            if allowed is not None and not bool(allowed[qf, f0:f1].any()):
                continue
            p = _probabilities(q, k, lse, qf, f0, f1, fsl, scale, allowed, cdt)  # [B, H, fsl, n]
            mass[:, :, qf, f0:f1] = p.reshape(B, H, fsl, f1 - f0, fsl).sum(dim=(2, 4)) / fsl
    return mass if cdt == torch.float64 else mass.float()


def frame_entropy_reference(q, k, *, frame_seq_len, scale=None, allowed=None, lse=None) -> torch.Tensor:
    """ent[b, h, qf]: [B, H, nqf] float32 (float64 for float64 inputs), in nats; each query token's entropy over
    key frames (its probability summed per key frame), averaged over the query frame's tokens. Disallowed key
    frames hold probability 0 and add nothing; a query frame with no allowed key frame gets 0; a token's entropy
    is never below 0 (not even by rounding)."""
    B, Lq, H, D, Lk, nqf, nkf = check_frame_inputs(q, k, frame_seq_len=frame_seq_len, allowed=allowed, lse=lse)
    fsl, cdt = int(frame_seq_len), _compute_dtype(q)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if lse is None:
        lse = row_lse_reference(q, k, frame_seq_len=fsl, scale=scale, allowed=allowed)
    ent = torch.zeros((B, H, nqf), dtype=cdt, device=q.device)
    for qf in range(nqf):
        rows = torch.zeros((B, H, fsl, nkf), dtype=cdt, device=q.device)  # each query token's mass per key frame
        for f0, f1 in _key_blocks(nkf, fsl):
            if allowed is not None and not bool(allowed[qf, f0:f1].any()):
                continue
            p = _probabilities(q, k, lse, qf, f0, f1, fsl, scale, allowed, cdt)  # [B, H, fsl, n]
            rows[..., f0:f1] = p.reshape(B, H, fsl, f1 - f0, fsl).sum(dim=-1)
        # each token's entropy is at least 0: a token whose one key frame holds mass 1 + 1e-7 by rounding gets 0
        # (only rounding's: a wrong log-sum-exp's larger negatives stay, to be seen)
        token = -torch.special.xlogy(rows, rows).sum(dim=-1)  # [B, H, fsl]
        ent[:, :, qf] = torch.where(token > -1e-5, token.clamp_min(0), token).mean(dim=-1)
    return ent if cdt == torch.float64 else ent.float()


def frame_means_reference(x: torch.Tensor, frame_seq_len: int, dtype=torch.float32) -> torch.Tensor:
    """Per-frame, per-head mean vectors: x [B, F*fsl, H, D] -> [B, H, F, D] in `dtype` (float32 or float64)."""
    B, L, H, D = x.shape
    return x.view(B, L // frame_seq_len, frame_seq_len, H, D).mean(dim=2, dtype=dtype).permute(0, 2, 1, 3)


def frame_attention_reference(q, k, v, *, frame_seq_len, scale=None, allowed=None):
    """(out [B, Lq, H, D] in q.dtype, mass [B, H, nqf, nkf] float32): the CPU path of the Triton frame forward.

    Two blockwise passes (row log-sum-exp, then probabilities times V and frame sums); the output of a query
    frame with no allowed key frame is 0.
    """
    B, Lq, H, D, Lk, nqf, nkf = check_frame_inputs(q, k, v, frame_seq_len=frame_seq_len, allowed=allowed)
    fsl, cdt = int(frame_seq_len), _compute_dtype(q)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    lse = row_lse_reference(q, k, frame_seq_len=fsl, scale=scale, allowed=allowed)
    out = torch.zeros((B, H, Lq, D), dtype=cdt, device=q.device)
    mass = torch.zeros((B, H, nqf, nkf), dtype=cdt, device=q.device)
    for qf in range(nqf):
        for f0, f1 in _key_blocks(nkf, fsl):
            if allowed is not None and not bool(allowed[qf, f0:f1].any()):
                continue
            p = _probabilities(q, k, lse, qf, f0, f1, fsl, scale, allowed, cdt)  # [B, H, fsl, n]
            vb = v[:, f0 * fsl:f1 * fsl].to(cdt).transpose(1, 2)  # [B, H, n, D]
            out[:, :, qf * fsl:(qf + 1) * fsl] += torch.matmul(p, vb)
            mass[:, :, qf, f0:f1] = p.reshape(B, H, fsl, f1 - f0, fsl).sum(dim=(2, 4)) / fsl
    out = out.transpose(1, 2).to(q.dtype)  # [B, Lq, H, D]
    return out, (mass if cdt == torch.float64 else mass.float())
