"""How the frame-attention forward (models/common/triton_attention.py) is launched: its block sizes and the split plan.

- One fixed block config per GPU family, chosen with bench/bench_fused_sweep.py on an H200 and never timed at run
  time, so every process of a run computes the same bits (`default_config`; the sweep's candidates are
  `FUSED_CANDIDATES`, and `FUSED_WS_CANDIDATES` those of the opt-in warp-specialised plain forward).
- The tiles (query block, head) that fill whole waves of the GPU run whole; each tile of the last, partial wave
  is split into segments of whole key frames (`split_plan`), sized from the GPU's resident programs of one
  canonical variant of the kernel (`resident_programs`), so every variant runs the same plan and the output's
  bits do not depend on which statistics were asked for.
"""

from __future__ import annotations

import torch

from models.common.triton_common import INTERPRET

# Block sizes of the Triton frame forward. One fixed config per GPU family (no timing-based autotuning, so every
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
# Opt-in (config "WS": True): triton's automatic warp specialisation of the plain forward (a TMA producer warpgroup
# and two consumer warpgroups of 64 rows each: FlashAttention-3's layout). sm90 specialises only with 4 warps a
# consumer group (num_warps 4; 8 compiles without specialising). Its output differs from the default's by rounding.
FUSED_WS_CANDIDATES = [
    {"BLOCK_M": 128, "BLOCK_N": bn, "num_warps": 4, "num_stages": st, "WS": True}
    for bn, st in [(64, 2), (64, 3), (128, 2)]
]

_CANONICAL = dict(WITH_MASS=True, WITH_SUMS=True, WITH_LSE=True)
_SLOTS: dict = {}  # (device, constexprs, config) -> resident programs on the whole GPU


def resident_programs(kernel, args, meta, cfg, device) -> int:
    """How many programs of the compiled `kernel` run at once on the GPU (SMs x CTAs per SM, from its registers,
    shared memory and warps). Asked of the variant with every extra output on (`_CANONICAL`), whatever variant
    runs: the split plan, and so the output's bits, must not depend on which statistics were asked for. The
    warp-specialised variant (meta WS) has no extras: it is asked of itself."""
    if not meta.get("WS"):
        meta = {**meta, **_CANONICAL}
    key = (str(device), tuple(sorted(meta.items())), tuple(sorted(cfg.items())))
    if key not in _SLOTS:
        warps = cfg["num_warps"]
        ck = kernel.warmup(*args, grid=(1,), **meta, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=warps,
                           num_stages=cfg["num_stages"])
        ck._init_handles()
        props = torch.cuda.get_device_properties(device)
        warps = getattr(ck.metadata, "num_warps", warps)  # warp specialisation adds a producer warpgroup
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


def default_config(device) -> dict:
    if INTERPRET:
        return dict(FUSED_CONFIG_INTERPRET)
    major = torch.cuda.get_device_capability(device)[0]
    return dict(FUSED_CONFIG_SM90 if major >= 9 else FUSED_CONFIG_OTHER)

