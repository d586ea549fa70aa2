"""models/common/kv_cache.py: a head mask follows its frames through an eviction that keeps the sink, and every
newly written frame gets a stamp never seen before (the statistics probe keys its per-frame means by them), and
training's gradient follows a frame that an eviction moved (moves autograd cannot see are refused)."""

import pytest
import torch

from models.common.kv_cache import GradWindow, KVCache
from models.errors import ModelInputError


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


def test_gradient_follows_frames_that_an_eviction_moved():
    """Training with a window ("inplace" kv_gradient): a later chunk's exit forward reads frame 1, which an eviction
    in an earlier no-grad forward moved from slot 1 to slot 0; its gradient must reach frame 1's exit-step
    keys/values (as in the researchers' cache, which never moves a frame), not frame 0's, which held slot 0."""
    heads, fsl, dim = 2, 3, 4
    c = KVCache(1, 2, fsl, heads, dim, evict=True)  # a window of 2 frames, no sink
    exits = {}
    for f in range(3):
        with torch.no_grad():  # the chunk's first denoising step: places it (evicting frame 0 for frame 2)
            c.write(f, torch.randn(1, fsl, heads, dim), torch.randn(1, fsl, heads, dim))
        k, v = (torch.randn(1, fsl, heads, dim, requires_grad=True) for _ in range(2))
        w = GradWindow(c, f, 1, inplace=True)  # the exit step, with gradient
        w.write(f, k, v)
        exits[f] = (k, v)
        with torch.no_grad():  # the context pass overwrites the chunk's slots without gradient
            c.write(f, torch.randn(1, fsl, heads, dim), torch.randn(1, fsl, heads, dim))
    kw, vw, frames = w.window()
    assert frames == (1, 2)
    rk, rv = torch.randn_like(kw), torch.randn_like(vw)
    ((kw * rk).sum() + (vw * rv).sum()).backward()
    for t in exits[0]:  # frame 0 was evicted: read by nobody
        assert t.grad is None or not t.grad.any()
    torch.testing.assert_close(exits[1][0].grad, rk[:, :fsl], rtol=0, atol=0)
    torch.testing.assert_close(exits[1][1].grad, rv[:, :fsl], rtol=0, atol=0)
    torch.testing.assert_close(exits[2][0].grad, rk[:, fsl:], rtol=0, atol=0)
    torch.testing.assert_close(exits[2][1].grad, rv[:, fsl:], rtol=0, atol=0)


def test_a_cache_holding_training_gradients_refuses_moves_autograd_cannot_see():
    """Under torch.inference_mode an eviction's move would not be recorded (the gradient would go to the slot's old
    frame), and a cache policy's re-rotation never is: both are refused once exit steps wrote the cache with
    gradient; the same cache without gradient history evicts and compacts."""
    for grad in (True, False):
        c = KVCache(1, 2, 1, 1, 2, evict=True)
        for f in range(2):
            k = torch.randn(1, 1, 1, 2, requires_grad=grad)
            GradWindow(c, f, 1, inplace=True).write(f, k, k)
        with torch.inference_mode():
            if grad:
                with pytest.raises(ModelInputError, match="inference_mode"):
                    c.write(2, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
            else:
                c.write(2, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
        if grad:
            with pytest.raises(ModelInputError, match="inference only"):
                c.keep([1])
        else:
            c.keep([2])
            assert c.frames == [2]
