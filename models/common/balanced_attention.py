"""Wave-balanced attention: a library kernel's tiles rescheduled so that the GPU's last wave is not left half idle.

A FlashAttention-style kernel gives each (batch, head, 128-row query block) one CTA that walks all the keys.
At the rollout's shapes (q = 3 frames x 1560 tokens, 12 heads: 37 query blocks x 12 = 444 tiles) an H200 with
132 SMs runs 3 full waves and a fourth of 48 tiles, in which 84 SMs wait: the call takes 4 tile-times for 3.36
tile-times of work. `balanced_attention` runs the same math in two launches of the same kernel:

- main: the first `main_rows` query rows (a whole number of waves of tiles, 33 blocks x 12 heads = 396 =
  3 x 132) against all keys, as one call;
- tail: the remaining rows against the keys cut into `split` equal segments, the segments stacked on the batch
  dim so they share one launch (48 tiles x split, each 1/split as long);

then merges the tail's segments exactly: lse = logsumexp_s lse_s, out = sum_s exp(lse_s - lse) out_s (float32,
rounded once to the output dtype). The output is the same softmax(q k^T * scale) v; it differs from one call of
the kernel only in the tail rows' rounding (each segment's output is rounded to bf16 before the merge).

Which split pays comes from a cost model counted in key rows swept per wave (`plan`); its two constants were
fitted on an H200 with bench/bench_balanced.py (results in bench/RESULTS.md, issue 16, session 16). `run` is any
(q, k, v, scale) -> (out, lse) kernel, q [B, Lq, H, D], k/v [B, Lk, H, Dv] -> out [B, Lq, H, Dv], lse [B, H, Lq]
float32 (natural log): on a GPU cuDNN's (models/common/cuda_attention.py); in tests any exact reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.common.triton_version import usable

TILE_M = 128  # query rows per CTA of the kernels this schedules (cuDNN's and FlashAttention-3's Hopper forward)
# The cost model, in key rows swept by one wave of tiles (a call of Lk keys and w waves costs w * Lk):
SEGMENT_KEYS = 500  # a round of tail segments pays this on top of its keys (q load, output write)
FIXED_KEYS = 500  # the second launch and the assembling merge (one Triton launch on a GPU)
MAX_SPLIT = 8


@dataclass(frozen=True)
class Plan:
    main_rows: int  # query rows run as one call against all keys
    split: int  # key segments of the tail rows (1: the call is not split at all)
    cost: float  # modelled cost in key rows (the plain call: ceil(tiles / slots) * k_len)


def plan(batch: int, heads: int, q_len: int, k_len: int, slots: int, tile_m: int = TILE_M,
         max_split: int = MAX_SPLIT) -> Plan:
    """The cheapest schedule by the cost model: main rows fill whole waves of `slots` tiles; the tail's tiles are
    split into `split` key segments (k_len divisible by split). split = 1 when the plain call is the cheapest."""
    bh = batch * heads
    q_blocks = -(-q_len // tile_m)
    plain = Plan(q_len, 1, float(-(-bh * q_blocks // slots) * k_len))
    if slots <= 0 or (bh * q_blocks) % slots == 0:
        return plain
    step = slots // math.gcd(slots, bh)  # main query blocks come in multiples of this (whole waves)
    main_blocks = (q_blocks // step) * step
    tail_tiles = bh * (q_blocks - main_blocks)
    best = plain
    for split in range(2, max_split + 1):
        if k_len % split:
            continue
        rounds = -(-tail_tiles * split // slots)
        cost = bh * main_blocks // slots * k_len + rounds * (k_len / split + SEGMENT_KEYS) + FIXED_KEYS
        if cost < best.cost:
            best = Plan(main_blocks * tile_m, split, cost)
    return best


def segments(x: torch.Tensor, split: int) -> torch.Tensor | None:
    """x [B, Lk, H, D] -> [B * split, Lk / split, H, D], its key segments on the batch dim, batch-major, as a view;
    None when x's strides allow no such view (the caller then runs the plain call: never a copy of the keys)."""
    B, Lk, H, D = x.shape
    try:
        return x.view(B * split, Lk // split, H, D)
    except RuntimeError:
        return None


def merge_segments(out_s: torch.Tensor, lse_s: torch.Tensor, dtype: torch.dtype):
    """out_s [B, S, L, H, Dv], lse_s [B, S, H, L] (per key segment) -> (out [B, L, H, Dv] dtype, lse [B, H, L]):
    the softmax over all the keys, from each segment's normalised output and log-sum-exp (in float32, or float64)."""
    acc = torch.promote_types(out_s.dtype, torch.float32)  # float32, or float64 for float64 inputs
    lse = torch.logsumexp(lse_s, dim=1)  # [B, H, L]
    w = torch.exp(lse_s - lse.unsqueeze(1)).transpose(2, 3).unsqueeze(-1)  # [B, S, L, H, 1]
    return (w.to(acc) * out_s.to(acc)).sum(1).to(dtype), lse


def balanced_attention(q, k, v, scale: float, run, *, slots: int, p: Plan | None = None):
    """(out [B, Lq, H, Dv] q.dtype, lse [B, H, Lq] float32) of softmax(q k^T * scale) v, computed by `run` on
    the wave-balanced schedule `p` (default: `plan` for these shapes and `slots` resident tiles). On a GPU one
    Triton launch assembles the output (models/common/triton_balanced_merge.py); elsewhere `merge_segments`."""
    B, Lq, H, D = q.shape
    Lk, Dv = k.shape[1], v.shape[3]
    p = p or plan(B, H, Lq, Lk, slots)
    ks = vs = None
    if p.split > 1:
        ks, vs = segments(k, p.split), segments(v, p.split)
    if ks is None or vs is None:
        return run(q, k, v, scale)
    S, m = p.split, p.main_rows
    qt = q[:, m:]  # [B, Lt, H, D]
    Lt = qt.shape[1]
    # the tail rows once per key segment, batch-major like ks / vs: [B * S, Lt, H, D] (a real copy: cuDNN lays
    # its output out after q's strides, and a stride-0 batch would put the head dim's columns apart)
    qs = qt.unsqueeze(1).expand(B, S, Lt, H, D).contiguous().view(B * S, Lt, H, D)
    out_s, lse_s = run(qs, ks, vs, scale)  # [B * S, Lt, H, Dv], [B * S, H, Lt]
    if m:
        out_m, lse_m = run(q[:, :m], k, v, scale)  # [B, m, H, Dv], [B, H, m]
    else:
        out_m, lse_m = out_s.new_empty(B, 0, H, Dv), lse_s.new_empty(B, H, 0)
    if q.is_cuda and usable():
        from models.common.triton_balanced_merge import ROWS, assemble

        if m % ROWS == 0:  # (always with a planned schedule: main rows come in 128-row blocks)
            return assemble(out_m, lse_m, out_s, lse_s, S)
    out_t, lse_t = merge_segments(out_s.reshape(B, S, Lt, H, Dv), lse_s.reshape(B, S, H, Lt), q.dtype)
    return torch.cat([out_m, out_t], dim=1), torch.cat([lse_m.float(), lse_t], dim=2)
