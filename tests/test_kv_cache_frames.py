"""models/common/kv_cache.py: a head mask follows its frames through an eviction that keeps the sink, and every
newly written frame gets a stamp never seen before (the statistics probe keys its per-frame means by them)."""

import torch

from models.common.kv_cache import KVCache


def test_head_mask_columns_follow_their_frames_through_eviction():
    heads, fsl = 2, 1
    c = KVCache(1, 4, fsl, heads, 2, sink_frames=1, evict=True)
    for f in range(4):
        c.write(f, torch.full((1, fsl, heads, 2), float(f)), torch.full((1, fsl, heads, 2), float(f)))
    mask = torch.tensor([[True, False, True, False], [False, True, True, True]])  # [heads, frames 0..3]
    c.keep([0, 1, 2, 3], head_mask=mask)
    c.write(4, torch.full((1, fsl, heads, 2), 4.0), torch.full((1, fsl, heads, 2), 4.0))  # evicts frame 1
    assert c.frames == [0, 2, 3, 4]
    assert c.k[0, :, 0, 0].tolist() == [0.0, 2.0, 3.0, 4.0]
    expected = torch.cat([mask[:, [0, 2, 3]], torch.ones(heads, 1, dtype=torch.bool)], 1)  # the sink's column stays
    assert torch.equal(c.head_mask, expected)


def test_every_newly_written_frame_gets_a_stamp_never_seen_before():
    """Equal stamps mean equal keys (KeyStamps): appended frames, whose keys are new, must not share a stamp with
    each other or with any frame held before (the statistics probe would reuse a stale per-frame mean)."""
    heads, fsl = 2, 3
    c = KVCache(1, 6, fsl, heads, 4, sink_frames=1, evict=True)
    seen = set()
    for start in range(0, 12, 2):  # chunks of 2 frames, evicting past 6
        k = torch.randn(1, 2 * fsl, heads, 4)
        c.write(start, k, k)
        new = c.stamps[-2:]
        assert len(set(new)) == 2 and not set(new) & seen, (start, c.stamps, seen)
        seen |= set(c.stamps)
        assert len(set(c.stamps)) == len(c.stamps)
