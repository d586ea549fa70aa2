"""KV-cache policies (workbench/kv_policies.py, models/common/kv_cache.py `keep`): what each cache holds after each
chunk, at which RoPE positions, and what memory it takes; window + sink as a policy is bitwise today's rolling
window; a cache that never held frames equals a knockout of them; attention-guided compression keeps the frames the
chunk's queries attended to most (dense float64 reference); head-wise groups equal per-head masked attention."""

import math

import numpy as np
import pytest
import torch

from attention_reference import dense_frame_stats
from conftest import tiny_model
from models.common import rollout as rollout_mod
from models.common.attention import AttentionCall, attend
from models.common.kv_cache import Keep, KVCache
from models.common.rollout import causal_few_step
from models.common.scheduler import FlowMatchScheduler
from models.wan.fused import rope
from models.wan.rope import RopeTable, rope_cos_sin
from workbench.hooks import CallFilter, RecordingProbe, attach
from workbench.interventions import KeyFrameKnockout
from workbench.kv_policies import AttentionGuided, DeepSink, FifoWindow, HeadWise, WindowSink

C, H, W, FSL, TEXT_LEN = 16, 4, 6, 6, 16


def run(model, frames, *subscribers, policy=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise, ctx = torch.randn(1, frames, C, H, W, generator=g), torch.randn(1, TEXT_LEN, 32, generator=g)
    s = FlowMatchScheduler(5.0)
    with attach(model, *subscribers):
        return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g,
                               cache_policy=policy)


def held(model, frames, policy, *extra):
    """Key frames of layer 0's first self-attention call in every chunk (what the cache held then)."""
    rec = RecordingProbe(CallFilter(layers={0}, kinds={"self"}, steps={0}))
    out = run(model, frames, rec, *extra, policy=policy)
    return out, [call.key_frames for call, *_ in rec.records]


@pytest.mark.parametrize("window,sink", [(9, 3), (6, 0), (7, 1)])
def test_window_sink_policy_is_bitwise_the_rolling_window(window, sink, one_thread):
    plain, plain_frames = held(tiny_model(local_attn_size=window, sink_size=sink), 18, None)
    policy = FifoWindow(window) if sink == 0 else WindowSink(window, sink)
    got, got_frames = held(tiny_model(), 18, policy)
    assert torch.equal(got, plain) and got_frames == plain_frames
    assert got_frames[-1] == tuple(range(sink)) + tuple(range(18 - (window - sink), 18))


@pytest.mark.parametrize("window,sink", [(7, 1), (6, 0)])
def test_window_sink_policy_on_the_independent_first_frame_layout(window, sink, one_thread):
    """Chunks [1, 3, 3, 3, 3, 3, 3] (models/common/chunks.py): a policy's rollout runs the layout (frame 0's chunk
    first) and equals the rolling window on the same layout bitwise, the window's last frames included."""
    plain_model, policy_model = tiny_model(local_attn_size=window, sink_size=sink), tiny_model()
    plain_model.independent_first_frame = policy_model.independent_first_frame = True
    plain, plain_frames = held(plain_model, 19, None)
    policy = FifoWindow(window) if sink == 0 else WindowSink(window, sink)
    got, got_frames = held(policy_model, 19, policy)
    assert len(got_frames) == 7 and got_frames[0] == (0,)
    assert torch.equal(got, plain) and got_frames == plain_frames
    assert got_frames[-1] == tuple(range(sink)) + tuple(range(19 - (window - sink), 19))


def drive(policy, chunks=6, n=3, heads=2, d=12, dtype=torch.float64):
    """A cache driven as a rollout drives it: write each chunk, then the policy. Returns per chunk (frames held
    after the policy, their positions, bytes held) and the cache."""
    cap = policy.capacity(chunks * n, n)
    cache = KVCache(1, cap, FSL, heads, d, dtype=dtype)
    cache.temporal_freqs = RopeTable((d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))).tables[0][1]
    after = []
    for c in range(chunks):
        k = torch.randn(1, n * FSL, heads, d, dtype=dtype)
        cache.write(c * n, k, k.clone())
        keep = policy.after_chunk(0, cache, c, n if c < chunks - 1 else 0)
        if keep is not None:
            cache.keep(keep.frames, keep.positions, keep.head_mask)
        after.append((list(cache.frames), list(cache.positions), cache.held_bytes()))
    return after, cache


def test_frames_positions_and_memory_held_after_each_chunk():
    per_frame = 2 * FSL * 2 * 12 * 8  # k and v, fsl tokens, 2 heads, head_dim 12, float64
    fifo, _ = drive(FifoWindow(6))
    assert [f for f, _, _ in fifo] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14], [12, 13, 14, 15, 16, 17]]
    assert all(b == len(f) * per_frame for f, _, b in fifo)
    sink, _ = drive(WindowSink(7, 1))
    assert [f for f, _, _ in sink][2:] == [[0, 6, 7, 8], [0, 9, 10, 11], [0, 12, 13, 14],
                                           [0, 12, 13, 14, 15, 16, 17]]
    assert all(p == f for f, p, _ in sink)  # a plain sink keeps its positions
    deep, _ = drive(DeepSink(9, 4))
    frames, positions, nbytes = zip(*deep)
    assert frames[2] == [0, 1, 2, 3, 7, 8] and positions[2] == [3, 4, 5, 6, 7, 8]  # sink right before frame 7
    assert frames[4] == [0, 1, 2, 3, 13, 14] and positions[4] == [9, 10, 11, 12, 13, 14]
    assert frames[5] == [0, 1, 2, 3, 13, 14, 15, 16, 17] and positions[5] == list(range(9, 18))
    assert nbytes[5] == 9 * per_frame
    # window = sink + chunk: the sink alone beside the next chunk moves to just before it (it never moved, so the
    # rollout was bitwise the plain window + sink one while the store said the positions moved)
    tight, _ = drive(DeepSink(6, 3))
    assert [f for f, _, _ in tight][1:4] == [[0, 1, 2]] * 3
    assert [p for _, p, _ in tight][:4] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]


def deep_sink_rollout(chunks: int, dtype, after_chunk=None, heads=2, d=12, n=3):
    """DeepSink(9, 4) driving a cache of `dtype` over `chunks` chunks of keys made by RoPE at their frame (float64,
    then `dtype`); `after_chunk(cache, at)` after each. Returns the cache and at(frame, position): the float64 keys
    of a frame made by RoPE at a position."""
    table = RopeTable((d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)))
    torch.manual_seed(0)
    base = torch.randn(1, chunks * n * FSL, heads, d, dtype=torch.float64)  # un-rotated keys

    def at(frame, position):
        cos, sin = rope_cos_sin(table.angles(1, 2, 3, position), "cpu", torch.float64)
        return rope(base[:, frame * FSL : (frame + 1) * FSL], cos, sin)

    policy = DeepSink(9, 4)
    cache = KVCache(1, 9, FSL, heads, d, dtype=dtype)
    cache.temporal_freqs = table.tables[0][1]
    for c in range(chunks):
        k = torch.cat([at(f, f) for f in range(c * n, c * n + n)], 1).to(dtype)
        cache.write(c * n, k, k)
        keep = policy.after_chunk(0, cache, c, n)
        if keep is not None:
            cache.keep(keep.frames, keep.positions)
        if after_chunk is not None:
            after_chunk(cache, at)
    return cache, at


def test_deep_sink_realignment_rotates_temporal_channels_only():
    """Keys made by RoPE at their frame, moved by the policy, equal the same keys made by RoPE at the new position
    (float64); height and width channels are untouched bitwise."""
    t = RopeTable((12 - 4 * 2, 4, 4)).split[0]

    def check(cache, at):
        for slot, (f, p) in enumerate(zip(cache.frames, cache.positions)):
            got = cache.k[:, slot * FSL : (slot + 1) * FSL]
            torch.testing.assert_close(got, at(f, p), rtol=0, atol=1e-12)
            assert torch.equal(got[..., t:], at(f, f)[..., t:])

    cache, _ = deep_sink_rollout(6, torch.float64, check)
    assert cache.positions[:4] != cache.frames[:4]  # they did move


def test_a_sink_moved_many_times_is_rotated_once_from_its_keys_as_written():
    """Each move rotated the keys from their last rotation, so the rounding compounded: in bf16 ~2e-3 a move,
    3e-2 after 100. Now every move rotates the keys as they were written, once: after 40 moves a bf16 sink is as far
    from the float64 keys at its position as one rounding."""
    cache, at = deep_sink_rollout(42, torch.bfloat16)
    assert cache.positions[:4] == [cache.positions[4] - 4 + i for i in range(4)] and cache.positions[0] > 100
    for slot, (f, p) in enumerate(zip(cache.frames[:4], cache.positions[:4])):
        want = at(f, p)
        got = cache.k[:, slot * FSL : (slot + 1) * FSL].double()
        err = float((got - want).norm() / want.norm())
        assert err < 3e-3  # one bf16 rounding (~2e-3; 40 of them: 5.4e-3)
    assert sorted(cache.unmoved) == [0, 1, 2, 3]  # what they are rotated from: the sink's keys as written


def test_a_cache_that_never_held_frames_equals_their_knockout(one_thread):
    class Drop:  # frame 1 leaves after chunk 0, frame 4 after chunk 1
        graph_safe, key = True, "drop"

        def capacity(self, num_frames, chunk_frames):
            return num_frames

        def after_chunk(self, layer, cache, chunk, next_frames):
            gone = {0: {1}, 1: {4}}.get(chunk, set())
            return Keep([f for f in cache.frames if f not in gone])

    model = tiny_model()
    never, frames = held(model, 12, Drop())
    assert frames == [(0, 1, 2), (0, 2, 3, 4, 5), (0, 2, 3, 5, 6, 7, 8), (0, 2, 3, 5, 6, 7, 8, 9, 10, 11)]
    knocked = run(model, 12, KeyFrameKnockout([1], filter=CallFilter(chunks={1, 2, 3})),
                  KeyFrameKnockout([4], filter=CallFilter(chunks={2, 3})))
    torch.testing.assert_close(knocked, never, rtol=1e-5, atol=1e-5)
    assert (never - run(model, 12)).abs().max() > 1e-3


def test_attention_guided_keeps_what_the_chunk_attended_to_most(one_thread):
    model = tiny_model()
    policy = AttentionGuided(7, sink=1, recent=1)  # the sink, the newest frame, 2 chosen by attention
    rec = RecordingProbe(CallFilter(layers={0}, kinds={"self"}))
    run(model, 18, rec, policy, policy=policy)
    by_chunk: dict[int, list] = {}
    chosen = []
    for call, q, k, _ in rec.records:
        by_chunk.setdefault(call.chunk, []).append((call, q, k))
    for c in range(1, 5):
        calls = by_chunk[c]
        key_frames = calls[0][0].key_frames
        mass = sum(dense_frame_stats(q, k, FSL)[0].sum(dim=(0, 1, 2)) for _, q, k in calls)  # [nkf] float64
        room = 7 - 3
        fixed = {key_frames[0], *key_frames[-1:]}
        others = sorted((f for f in key_frames if f not in fixed), key=lambda f: -float(mass[key_frames.index(f)]))
        expected = sorted(fixed | set(others[: room - len(fixed)])) if len(key_frames) > room else list(key_frames)
        if len(key_frames) > room:  # what the policy records of its choice (the effects store's detail)
            assert (c, 0, tuple(sorted(others[: room - len(fixed)]))) in policy.chosen
        nxt = by_chunk[c + 1][0][0].key_frames
        assert list(nxt[:-3]) == expected, c
        chosen += [f for f in expected if f not in fixed]
        assert nxt[-3:] == tuple(range(3 * (c + 1), 3 * (c + 2)))
    assert len(set(chosen)) > 2  # attention chose, not a fixed rule
    text = policy.describe()
    layer0 = {c: f for c, layer, f in policy.chosen if layer == 0}
    assert text.startswith("frames kept by attention, besides the sink and the newest: chunk 2: ")
    assert all(f"chunk {c + 1}: " in text for c in layer0) and "layer rollouts" in text


def test_head_groups_equal_per_head_masked_attention():
    torch.manual_seed(0)
    B, nkf, nqf, heads, d = 1, 5, 2, 4, 8
    q = torch.randn(B, nqf * FSL, heads, d, dtype=torch.float64)
    k, v = (torch.randn(B, nkf * FSL, heads, d, dtype=torch.float64) for _ in range(2))
    head_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    call = AttentionCall(0, "self", None, (3, 4), (0, 1, 2, 3, 4), FSL, (2, 3), num_heads=heads, head_dim=d,
                         head_mask=head_mask)
    out = attend(q, k, v, call)
    for h in range(heads):
        s = q[0, :, h] @ k[0, :, h].T / math.sqrt(d)
        s[:, ~head_mask[h].repeat_interleave(FSL)] = -math.inf
        torch.testing.assert_close(out[0, :, h], torch.softmax(s, -1) @ v[0, :, h], rtol=1e-10, atol=1e-12)
    with pytest.raises(Exception, match="head-wise cache policy"):
        attend(q, k, v, call, [RecordingProbe()])


def test_head_wise_policy_masks_the_static_heads(one_thread):
    model = tiny_model()
    base = run(model, 18, policy=WindowSink(9, 1))
    assert torch.equal(run(model, 18, policy=HeadWise(9, 1, {})), base)  # no static head: the window itself
    policy = HeadWise(9, 1, {0: [1]}, static_recent=5)
    _, cache = drive(policy, chunks=4, heads=2)  # after chunk 3 (no next chunk): frames 0, 4-11
    assert cache.frames == [0, *range(4, 12)]
    keep = policy.after_chunk(0, cache, 3, 3)  # room for 3 more: the sink and the newest 5
    assert keep.frames == [0, 7, 8, 9, 10, 11]
    allowed = [f for f, m in zip(keep.frames, keep.head_mask[1].tolist()) if m]
    assert allowed == [0, 10, 11] and bool(keep.head_mask[0].all())  # sink + the 2 newest (+ 3 to come = 5)
    assert not torch.equal(run(model, 18, policy=HeadWise(9, 1, {0: [1], 1: [0, 2]}, static_recent=3)), base)
    # a window that holds every frame evicts none, but the static heads still see only the sink and the newest
    full = run(model, 12)
    assert torch.equal(run(model, 12, policy=HeadWise(12, 1, {})), full)
    static = run(model, 12, policy=HeadWise(12, 1, {0: [1]}, static_recent=3))
    assert not torch.equal(static, full)
    longer = HeadWise(100, 1, {0: [1]}, static_recent=3)  # (a window longer than the rollout: its frames held)
    assert longer.capacity(12, 3) == 12 and torch.equal(run(model, 12, policy=longer), static)


def test_policies_are_part_of_the_graph_key(one_thread):
    model = tiny_model()
    noise, ctx = torch.randn(1, 6, C, H, W), torch.randn(1, TEXT_LEN, 32)
    with torch.no_grad():
        get = lambda p: rollout_mod._rollout_graphs(model, noise, ctx, True, "k", devices=("cpu",), policy=p)  # noqa
        a = get(WindowSink(9, 3))
        assert get(WindowSink(9, 3)) is a and get(DeepSink(9, 3)) is not a
        assert get(AttentionGuided(9, 1)) is None  # data-dependent: eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_graphed_rollout_with_a_policy_equals_eager():
    """bf16: FIFO, window + sink and deep sink (RoPE re-alignment between graph replays) replay from CUDA graphs
    bitwise as their eager rollouts, each replay with other data than the recording (a deep sink's keys as written
    once came back from the recording rollout); window + sink equals the model's own window."""
    s = FlowMatchScheduler(5.0)

    def go(model, graphs, policy, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        noise = torch.randn(1, 18, C, H, W, generator=g, device="cuda").to(torch.bfloat16)
        ctx = torch.randn(1, TEXT_LEN, 32, generator=g, device="cuda").to(torch.bfloat16)
        return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s,
                               generator=g, cuda_graphs=graphs, cache_policy=policy)

    model = tiny_model().cuda().to(torch.bfloat16)
    windowed = tiny_model(local_attn_size=9, sink_size=3).cuda().to(torch.bfloat16)
    assert torch.equal(go(model, False, WindowSink(9, 3)), go(windowed, False, None))
    for policy in (FifoWindow(9), WindowSink(9, 3), DeepSink(9, 4)):
        for seed in (0, 1, 2, 0):
            assert torch.equal(go(model, True, policy, seed), go(model, False, policy, seed)), (policy.name, seed)


def test_stamps_change_exactly_when_a_frames_keys_do():
    """A slot's stamp (models/common/kv_cache.py) is new whenever the cache writes or re-rotates the frame's keys,
    moves with the frame when eviction or a policy compacts the slots, and every stamp is new once anything else
    wrote the keys in place; `KeyStamps.valid_for` holds only for the window the cache gave, unedited."""
    from models.common.kv_cache import KeyStamps

    heads, d, n = 2, 12, 3
    cache = KVCache(1, 6, FSL, heads, d, sink_frames=1, evict=True, dtype=torch.float64)
    cache.temporal_freqs = RopeTable((d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))).tables[0][1]
    chunk = lambda: torch.randn(1, n * FSL, heads, d, dtype=torch.float64)  # noqa: E731
    stamps_of = lambda: dict(zip(cache.frames, cache.stamps))  # noqa: E731
    cache.write(0, chunk(), chunk())
    first = stamps_of()
    cache.write(0, chunk(), chunk())  # the chunk's next forward rewrites it
    assert set(stamps_of().values()).isdisjoint(first.values())
    before = stamps_of()
    cache.write(3, chunk(), chunk())
    assert {f: stamps_of()[f] for f in (0, 1, 2)} == before  # appending leaves the others alone
    before = stamps_of()
    cache.write(6, chunk(), chunk())  # evicts frames 1-3: frames 0, 4, 5 move or stay, their stamps with them
    assert cache.frames == [0, 4, 5, 6, 7, 8] and all(stamps_of()[f] == before[f] for f in (0, 4, 5))
    k, _, _ = cache.window()
    st = KeyStamps.of(cache, k)
    assert st.stamps == tuple(cache.stamps) and st.valid_for(k)
    assert not st.valid_for(k.clone())  # a replaced k
    before = stamps_of()
    cache.keep([0, 5, 6, 7, 8], positions=[4, 5, 6, 7, 8])  # frame 4 leaves, the sink moves to position 4
    after = stamps_of()
    assert after[0] != before[0] and all(after[f] == before[f] for f in (5, 6, 7, 8))
    k, _, _ = cache.window()
    st = KeyStamps.of(cache, k)
    k[:, :FSL] *= 2  # a hook editing the window in place: this call's stamps no longer hold ...
    assert not st.valid_for(k)
    before = stamps_of()
    cache.write(9, chunk()[:, :FSL], chunk()[:, :FSL])  # ... nor any later ones
    assert set(stamps_of().values()).isdisjoint(before.values())
    with torch.inference_mode():
        frozen = KVCache(1, 2, FSL, heads, d)
        frozen.write(0, chunk()[:, :FSL], chunk()[:, :FSL])
        assert KeyStamps.of(frozen, frozen.window()[0]) is None  # inference tensors keep no version counter


def test_write_finds_keys_made_in_their_slots():
    """`KVCache.slots` places a chunk (evicting as `write` would) and returns its slots; keys/values made there
    (through any view of them, as the model's q/k kernel and v GEMM do) are found in place by `write`, which
    copies only what is elsewhere."""
    heads, d, n = 2, 4, 3
    cache = KVCache(1, 6, FSL, heads, d, sink_frames=1, evict=True)
    for c in range(2):
        cache.write(c * n, torch.randn(1, n * FSL, heads, d), torch.randn(1, n * FSL, heads, d))
    k_slot, v_slot = cache.slots(6, n)  # evicts frames 1-3
    assert cache.frames == [0, 4, 5, 6, 7, 8]
    k_new, v_new = torch.randn(1, n * FSL, heads, d), torch.randn(1, n * FSL, heads, d)
    k_view = k_slot.view(1, n * FSL, heads * d)  # (a view whose size-1 batch dim has another stride)
    k_view.copy_(k_new.view(1, n * FSL, heads * d))
    cache.write(6, k_view.view(1, n * FSL, heads, d), v_new)  # v from elsewhere: copied
    k, v, frames = cache.window()
    assert frames == (0, 4, 5, 6, 7, 8)
    assert torch.equal(k[:, 3 * FSL :], k_new) and torch.equal(v[:, 3 * FSL :], v_new)


def test_the_head_split_counts_the_frames_a_static_head_keeps(tmp_path):
    """static_heads_from_store counts a head's mass on the policy's sink frames and its newest `span` frames (it
    counted frame 0 alone, while a HeadWise policy of 3 sink frames keeps three): every frame counted, every head is
    static; frame 0 and the query's chunk only (span 3, up to the chunk's end: what a static head sees), the planted
    sink and local heads are, and not every head."""
    from studies import synthetic
    from workbench.kv_policies import static_heads_from_store

    store = synthetic.write_store(tmp_path / "s.zarr", "causal", layers=(0, 1), num_heads=4)
    every = static_heads_from_store(store, 0.8, span=1, sink_frames=21)
    assert every == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}
    few = static_heads_from_store(store, 0.8, span=3, sink_frames=1)  # (frame 0 and the query's chunk)
    assert few and all(set(h) < set(every[layer]) for layer, h in few.items())
    assert 0 in few.get(0, []) and 0 in few.get(1, [])  # (the planted sink head of layer 0, local head of layer 1)


def test_the_head_split_equals_its_definition_written_out(tmp_path):
    """static_heads_from_store against numpy: the mass on frame 0 and on the `span` newest frames up to the query's
    chunk end (end - span < key <= end), over samples, denoising steps and the query frames after chunk 0; every
    threshold between two heads' fractions splits the heads where the fractions say (an off-by-one in the span,
    counting span + 1 frames, moves some head across one of them)."""
    from studies import synthetic
    from workbench.kv_policies import static_heads_from_store
    from workbench.store import open_store

    store = synthetic.write_store(tmp_path / "s.zarr", "causal", layers=(0, 1), num_heads=4, noise=0.3)
    ds = open_store(store)
    denoise = (ds.phase == "denoise").values
    m = np.nan_to_num(ds.attn_mass.values[:, denoise].astype(np.float64))  # [sample, step, layer, head, q, k]
    chunk = ds.query_chunk.values
    span = 2

    def fractions(span):
        out = np.zeros(m.shape[2:4])
        qs = [q for q in range(m.shape[4]) if chunk[q] > 0]
        for q in qs:
            end = max(f for f in range(m.shape[4]) if chunk[f] == chunk[q])
            near = np.array([k < 1 or end - span < k <= end for k in range(m.shape[5])])
            out += m[..., q, :][..., near].sum(-1).mean((0, 1)) / len(qs)
        return out  # [layer, head]

    frac, wider = fractions(span), fractions(span + 1)
    levels = np.sort(frac.ravel())
    cuts = [(a + b) / 2 for a, b in zip(levels[:-1], levels[1:]) if b - a > 1e-6]
    assert any(((frac >= t) != (wider >= t)).any() for t in cuts)  # (the span's boundary decides some head)
    for t in cuts:
        want = {layer: [h for h in range(4) if frac[i, h] >= t] for i, layer in enumerate((0, 1))}
        got = static_heads_from_store(store, float(t), span=span, sink_frames=1)
        assert got == {k: v for k, v in want.items() if v}


def test_a_policy_returning_something_else_than_a_keep_is_named(one_thread):
    """A user's policy whose after_chunk returns a list of frames (not a Keep) is refused after the first chunk
    with a message naming the policy and what to return (it was an AttributeError on 'frames' deep in the cache)."""
    from models.errors import ModelInputError

    class FirstAndRecent(WindowSink):
        def after_chunk(self, layer, cache, chunk, next_frames):
            return [0, *cache.frames[-6:]]

    model = tiny_model(local_attn_size=9)
    with pytest.raises(ModelInputError, match=r"after_chunk returned list \[0, .*; it returns None .* or a Keep"):
        run(model, 12, policy=FirstAndRecent(9, 1))


def test_a_head_split_from_a_store_whose_window_shows_only_kept_frames_is_refused(tmp_path):
    """A store extracted with a KV window of 7 frames and 1 sink frame: its queries see frame 0 and their 6 newest
    frames only, all of which a static head of 3 sink frames and static_recent 6 keeps, so every head would come
    out static whatever its attention: a warning naming the store's window, and `workbench intervene` refuses the
    entry; a global store splits without one."""
    import warnings

    from models.errors import ModelInputWarning
    from studies import synthetic
    from workbench.errors import WorkbenchError
    from workbench.intervene_entries import parse_entry
    from workbench.kv_policies import static_heads_from_store

    windowed = synthetic.write_store(tmp_path / "w.zarr", "window", layers=(0, 1), num_heads=4, local_attn_size=7,
                                     sink_size=1)
    with pytest.warns(ModelInputWarning, match=r"window 7, sink 1.*every head would be static"):
        static_heads_from_store(windowed, 0.8, span=6, sink_frames=3)
    entry = dict(kind="policy", policy="headwise", window=12, sink_frames=3, static_recent=6)
    rollout = dict(num_frames=24, num_steps=5, num_chunks=8, chunk_frames=3, first_chunk_frames=3)
    with pytest.raises(WorkbenchError, match=r"headwise policy: store .*every head would be static"):
        parse_entry(dict(entry, store=str(windowed)), 6, 4, **rollout)
    whole = synthetic.write_store(tmp_path / "g.zarr", "causal", layers=(0, 1), num_heads=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelInputWarning)
        static_heads_from_store(whole, 0.8, span=6, sink_frames=3)
        parse_entry(dict(entry, store=str(whole)), 6, 4, **rollout)
