"""The causal model: KV-cache rollout == block-causal full-sequence forward, absolute RoPE across chunks,
sink + window eviction (the window rule of models/common/window.py), labels of every forward, and input errors."""

import contextlib

import pytest
import torch

from conftest import tiny_model
from models.common.attention import ForwardLabels
from models.common.graph_streams import capture_stream, side_stream
from models.common.kv_cache import KVCache, RolloutCache
from models.common.rollout import causal_few_step, few_step_schedule
from models.common.scheduler import FlowMatchScheduler
from models.errors import ModelInputError
from workbench.hooks import CallFilter, RecordingProbe, attach

B, C, H, W = 2, 16, 4, 6  # 2 x 3 = 6 tokens per frame


def inputs(frames, seed=0, text_dim=32, text_len=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, frames, H, W, generator=g)
    t = torch.rand(B, frames, generator=g) * 1000
    ctx = torch.randn(B, text_len, text_dim, generator=g)
    return x, t, ctx


def incremental(model, x, t, ctx, repeats=1):
    """Chunk by chunk through the KV cache; each chunk is run `repeats` times (like denoising steps)."""
    frames = x.shape[2]
    cache = RolloutCache.allocate(model.config, B, frames, (H // 2) * (W // 2), dtype=x.dtype, device="cpu")
    outs = []
    for start in range(0, frames, 3):
        for _ in range(repeats):
            out = model(x[:, :, start : start + 3], t[:, start : start + 3], ctx, cache=cache, start_frame=start)
        outs.append(out)
    return torch.cat(outs, dim=2), cache


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("window", [dict(), dict(local_attn_size=6, sink_size=1), dict(local_attn_size=4, sink_size=0)])
def test_kv_cache_rollout_equals_block_causal_forward(window):
    model = tiny_model(**window)
    frames = 12 if window else 9
    x, t, ctx = inputs(frames)
    full = model(x, t, ctx)
    inc, _ = incremental(model, x, t, ctx, repeats=2)
    assert rel_err(inc, full) <= 1e-5
    # and the mask matters: the bidirectional model gives something else
    bidir = tiny_model(causal=False)
    assert rel_err(bidir(x, t, ctx), full) > 1e-2


def test_block_causal_mask_shape():
    model = tiny_model()
    m = model.block_causal_mask(9)
    expected = torch.tensor([[kf // 3 <= qf // 3 for kf in range(9)] for qf in range(9)])
    assert torch.equal(m, expected)  # bidirectional inside a chunk, causal across chunks
    model = tiny_model(local_attn_size=6, sink_size=1)
    m = model.block_causal_mask(12)
    assert m[11].tolist() == [True] + [False] * 6 + [True] * 5  # sink frame 0 + the 5 most recent frames
    assert m[2].tolist() == [True] * 3 + [False] * 9


def test_rope_positions_are_absolute_across_chunks():
    """The keys in the cache when the last chunk attends are, frame by frame, the keys of a full-sequence
    forward: every frame keeps the rotation of its absolute index (keys are cached after RoPE and never re-rotated)."""
    model = tiny_model()
    x, t, ctx = inputs(9)
    full_probe, inc_probe = RecordingProbe(CallFilter(layers={1}, kinds={"self"})), RecordingProbe(CallFilter(layers={1}, kinds={"self"}))
    with attach(model, full_probe):
        model(x, t, ctx)
    with attach(model, inc_probe):
        incremental(model, x, t, ctx)
    (_, _, k_full, _), (call, _, k_last, _) = full_probe.records[0], inc_probe.records[-1]
    assert call.key_frames == tuple(range(9)) and call.query_frames == (6, 7, 8)
    torch.testing.assert_close(k_last, k_full, rtol=0, atol=1e-5)
    # the temporal angles of a chunk starting at frame 6 are those of positions 6, 7, 8
    table = model.rope
    angles = table.angles(3, 2, 3, start_frame=6)  # [3*2*3, head_dim/2]
    t_pairs = model.config.rope_split[0] // 2
    assert torch.equal(angles[::6, :t_pairs], table.tables[0][6:9])


def test_rope_past_1024_is_refused():
    model = tiny_model(causal=False)
    x, t, ctx = inputs(3)
    with pytest.raises(ModelInputError, match="1024"):
        model(x, t, ctx, start_frame=1023)


def test_eviction_keeps_sink_and_window():
    fsl, heads, hd = 2, 1, 2
    cache = KVCache(1, 6, fsl, heads, hd, sink_frames=1, evict=True)

    def chunk(start):  # each frame's tokens carry the frame index, so slots are traceable
        v = torch.arange(start, start + 3).repeat_interleave(fsl).float()
        return v.view(1, 3 * fsl, 1, 1).expand(1, 3 * fsl, heads, hd)

    cache.write(0, chunk(0), chunk(0))
    sink_before = cache.k[:, :fsl].clone()
    cache.write(3, chunk(3), chunk(3))
    assert cache.frames == [0, 1, 2, 3, 4, 5]
    cache.write(6, chunk(6), chunk(6))  # 3 over capacity: evict frames 1, 2, 3
    assert cache.frames == [0, 4, 5, 6, 7, 8]
    assert torch.equal(cache.k[:, :fsl], sink_before)  # the sink slots are unchanged
    k, v, key_frames = cache.window()
    assert key_frames == (0, 4, 5, 6, 7, 8) and k.shape[1] == 6 * fsl  # the window holds local_attn_size frames
    assert k[0, :, 0, 0].tolist() == [0, 0, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8]
    cache.write(6, chunk(6) + 100, chunk(6))  # the same chunk again overwrites in place
    assert cache.frames == [0, 4, 5, 6, 7, 8] and cache.k[0, -1, 0, 0].item() == 108
    with pytest.raises(ModelInputError, match="does not follow"):
        cache.write(12, chunk(12), chunk(12))


def test_global_cache_refuses_overflow():
    cache = KVCache(1, 3, 2, 1, 2, evict=False)
    cache.write(0, torch.zeros(1, 6, 1, 2), torch.zeros(1, 6, 1, 2))
    with pytest.raises(ModelInputError, match="local_attn_size"):
        cache.write(3, torch.zeros(1, 6, 1, 2), torch.zeros(1, 6, 1, 2))


def rollout(model, frames=9, seed=0, **kw):
    s = FlowMatchScheduler(5.0)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, frames, C, H, W, generator=g)
    ctx = torch.randn(1, 16, 32, generator=g)
    return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g, **kw)


def test_rollout_is_reproducible_and_labels_every_forward():
    model = tiny_model()
    events = []
    a = rollout(model, on_forward=lambda labels, start, n: events.append((labels, start, n)))
    b = rollout(model)
    assert torch.equal(a, b)
    assert not torch.equal(a, rollout(model, seed=1))
    assert len(events) == 3 * 5  # chunks x (4 steps + context pass)
    steps = [(e[0].chunk, e[0].step, e[0].phase, e[0].timestep, e[1]) for e in events]
    assert steps[:5] == [(0, 0, "denoise", 1000.0, 0), (0, 1, "denoise", 937.5, 0),
                         (0, 2, "denoise", pytest.approx(833.3333, abs=1e-3), 0), (0, 3, "denoise", 625.0, 0),
                         (0, 4, "context", 0.0, 0)]
    assert [s[4] for s in steps[5::5]] == [3, 6]


@pytest.mark.parametrize("sampler", ["causal_few_step", "causal_multi_step_cfg", "bidirectional"])
def test_on_chunk_gets_each_finished_chunk_after_its_last_forward(sampler, one_thread):
    """on_chunk(chunk, start, x0): every chunk once, in order, after all of its forwards (the context pass
    included), with exactly the latents the sampler returns for it; the bidirectional sampler has one chunk."""
    from models.common.rollout import sample

    model = tiny_model(causal=sampler != "bidirectional")
    g = torch.Generator().manual_seed(0)
    noise, ctx, neg = torch.randn(1, 9, C, H, W, generator=g), torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    events = []
    out = sample(model, sampler, noise, ctx, neg, generator=g, num_inference_steps=2,
                 on_forward=lambda labels, start, n: events.append(("forward", labels.chunk, labels.phase)),
                 on_chunk=lambda chunk, start, x0: events.append(("chunk", chunk, start, x0.clone())))
    chunks = [e for e in events if e[0] == "chunk"]
    starts = [0] if sampler == "bidirectional" else [0, 3, 6]
    assert [(e[1], e[2]) for e in chunks] == list(enumerate(starts))
    for _, chunk, start, x0 in chunks:
        assert torch.equal(x0, out[:, start : start + x0.shape[1]])
        at = next(i for i, e in enumerate(events) if e[0] == "chunk" and e[1] == chunk)
        assert not any(e[0] == "forward" and e[1] == chunk for e in events[at + 1:])  # nothing of it runs later
        if sampler != "bidirectional":  # its context pass has run
            assert ("forward", chunk, "context") in events[:at]
    assert sum(x0.shape[1] for *_, x0 in chunks) == 9


def test_skipping_the_last_context_pass_keeps_the_latents(one_thread):
    """sample(last_context_pass=False): the same latents bit for bit and the same chunks, one forward fewer
    (the last chunk's context pass only writes the cache)."""
    from models.common.rollout import sample

    model = tiny_model()
    runs = []
    for last in (True, False):
        g = torch.Generator().manual_seed(0)
        noise, ctx = torch.randn(1, 9, C, H, W, generator=g), torch.randn(1, 16, 32, generator=g)
        forwards, chunks = [], []
        out = sample(model, "causal_few_step", noise, ctx, generator=g, last_context_pass=last,
                     on_forward=lambda labels, start, n: forwards.append((labels.chunk, labels.phase)),
                     on_chunk=lambda chunk, start, x0: chunks.append(x0.clone()))
        runs.append((out, forwards, chunks))
    (a, fa, ca), (b, fb, cb) = runs
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ca, cb)) and len(cb) == 3
    assert fa[-1] == (2, "context") and fb == fa[:-1]


@pytest.mark.parametrize("sampler", ["causal_few_step", "causal_multi_step_cfg", "image"])
def test_a_context_pass_stops_once_the_last_block_wrote_its_keys(sampler, one_thread, monkeypatch):
    """A context pass runs for what it writes in the KV cache (`cache_only`): the last block stops after its keys
    and values, and the head does not run. The latents and every layer's final cache (a window that evicts) are
    bitwise those of the whole forward; the last block's FFN runs once fewer per chunk. With an observer of the
    last layer's self-attention it runs as far as that call, which the observer sees, and no further; with one of
    its cross-attention (or of both kinds) the whole forward runs, and so it does while anything watches the last
    block's modules from outside (a forward hook; a forward set on the instance, as nnsight's tracing does)."""
    from models.common.rollout import sample
    from models.wan import model as wan

    model = tiny_model(local_attn_size=6, sink_size=1)
    last = model.blocks[-1]
    g = torch.Generator().manual_seed(0)
    noise, ctx, neg = (torch.randn(1, 12, C, H, W, generator=g), torch.randn(1, 16, 32, generator=g),
                       torch.randn(1, 16, 32, generator=g))
    image = torch.randn(1, 1, C, H, W, generator=g) if sampler == "image" else None
    model.independent_first_frame = image is not None
    noise = noise[:, :10] if image is not None else noise  # 1 + 3k frames with the image's chunk

    # the blocks' cross-attention residuals (one a block: the last block's runs only in a whole forward), counted
    # through the function module the blocks call, which no check of the model's modules sees
    ffn, add_norm = [], wan.fused.add_norm_modulate

    def counted(*args, **kwargs):
        ffn.append(True)
        return add_norm(*args, **kwargs)

    monkeypatch.setattr(wan.fused, "add_norm_modulate", counted)

    def run(short, probe=None):
        monkeypatch.setattr(wan, "CACHE_ONLY_SKIPS_LAST_BLOCK", short)
        ffn.clear()
        with attach(model, probe) if probe is not None else contextlib.nullcontext():
            out = sample(model, "causal_few_step" if image is not None else sampler, noise, ctx, neg,
                         generator=torch.Generator().manual_seed(1), num_inference_steps=2, initial_latent=image)
        return out, sum(ffn)

    whole, ffn_whole = run(False)
    short, ffn_short = run(True)
    assert torch.equal(short, whole)
    chunks = len(model.chunk_spans(noise.shape[1]))
    cfg = 2 if sampler == "causal_multi_step_cfg" else 1  # (two caches, two context passes a chunk)
    # the image's context pass is the rollout's first forward: it fills the cross-attention cache, so it runs whole
    assert ffn_whole - ffn_short == cfg * (chunks - (image is not None))
    last_layer = len(model.blocks) - 1
    for kinds, ffn_expected in (({"self"}, ffn_short), ({"cross"}, ffn_whole), (None, ffn_whole)):
        probe = RecordingProbe(CallFilter(layers={last_layer}, kinds=kinds))
        observed, ffn_observed = run(True, probe)
        assert torch.equal(observed, whole) and ffn_observed == ffn_expected, kinds
        seen = [(r[0].kind, r[0].labels.phase) for r in probe.records]
        for kind in kinds or ("self", "cross"):
            assert seen.count((kind, "context")) == cfg * chunks, (kinds, kind)
    # watched from outside: a forward hook on the last layer's cross-attention, or a forward set on the instance
    calls = []
    handle = last.cross_attn.attend.register_forward_hook(lambda m, args, out: calls.append(args[3].labels.phase))
    hooked, ffn_hooked = run(True)
    handle.remove()
    assert torch.equal(hooked, whole) and ffn_hooked == ffn_whole and calls.count("context") == cfg * chunks
    last.norm3.forward = last.norm3.forward  # (what a tool that wraps a module's forward leaves on the instance)
    patched, ffn_patched = run(True)
    del last.norm3.forward
    assert torch.equal(patched, whole) and ffn_patched == ffn_whole
    # a class's forward replaced, the attention entry point replaced, or a block wrapped in another module
    from models.common import attention
    from models.common.attention import Attend

    seen, attend_forward, entry = [], Attend.forward, attention.attend
    for where, name, fn in ((Attend, "forward", lambda self, q, k, v, call, *a, **kw: seen.append(call.layer) or
                             attend_forward(self, q, k, v, call, *a, **kw)),
                            (attention, "attend", lambda q, k, v, call, *a, **kw: seen.append(call.layer) or
                             entry(q, k, v, call, *a, **kw))):
        seen.clear()
        with monkeypatch.context() as m:
            m.setattr(where, name, fn)
            out, ffn_out = run(True)
        assert torch.equal(out, whole) and ffn_out == ffn_whole, name
        assert seen.count(last.self_attn.layer) == seen.count(0), name  # every call of the last layer too

    class Wrapper(torch.nn.Module):  # (a residual-stream recorder around a block)
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, *args):
            self.calls += 1
            return self.inner(*args)

    model.blocks[-1] = wrapper = Wrapper(last)
    wrapped, ffn_wrapped = run(True)
    model.blocks[-1] = last
    assert torch.equal(wrapped, whole) and ffn_wrapped == ffn_whole
    assert wrapper.calls == ffn_whole // len(model.blocks)  # every forward of the rollout


def test_a_cache_only_forward_writes_the_cache_of_the_whole_forward():
    """model(..., cache_only=True) returns None and leaves every layer's cache as the whole forward does; without
    a cache it is refused."""
    from models.wan import model as wan

    model = tiny_model(local_attn_size=6, sink_size=1)
    x, t, ctx = inputs(9)
    caches = []
    for cache_only in (False, True):
        cache = RolloutCache.allocate(model.config, B, 9, (H // 2) * (W // 2), dtype=x.dtype, device="cpu")
        with torch.no_grad():
            for start in (0, 3, 6):
                out = model(x[:, :, start:start + 3], t[:, start:start + 3], ctx, cache=cache, start_frame=start,
                            cache_only=cache_only)
                assert (out is None) == cache_only
        caches.append(cache)
    assert wan.CACHE_ONLY_SKIPS_LAST_BLOCK
    for a, b in zip(*(c.kv for c in caches)):
        assert a.frames == b.frames and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    with pytest.raises(ModelInputError, match="cache_only=True needs a cache"):
        model(x[:, :, :3], t[:, :3], ctx, cache_only=True)


def test_attention_calls_carry_layer_kind_and_frames():
    model = tiny_model(local_attn_size=6, sink_size=1)
    probe = RecordingProbe()
    with attach(model, probe):
        rollout(model, frames=12)
    calls = [r[0] for r in probe.records]
    assert len(calls) == 4 * 5 * 2 * 2  # chunks x forwards x layers x (self, cross)
    selfs = [c for c in calls if c.kind == "self"]
    assert [c.layer for c in selfs[:2]] == [0, 1]
    last = selfs[-1]
    assert last.query_frames == (9, 10, 11) and last.key_frames == (0, 7, 8, 9, 10, 11)  # sink + window: 6 frames
    cross = [c for c in calls if c.kind == "cross"]
    assert all(c.key_frames is None for c in cross)
    assert {c.labels.chunk for c in calls} == {0, 1, 2, 3}
    # the recorded key length matches the frames the call says it holds
    for call, q, k, _ in probe.records:
        if call.kind == "self":
            assert k.shape[1] == len(call.key_frames) * call.frame_seq_len


def test_frame_errors_before_work():
    model = tiny_model()
    with pytest.raises(ModelInputError, match="chunks of 3"):
        rollout(model, frames=8)
    with pytest.raises(ModelInputError, match="KV cache holds"):
        rollout(model, frames=24, cache_frames=21)
    x, t, ctx = inputs(3)
    with pytest.raises(ModelInputError, match="channels"):
        model(x[:, :8], t, ctx)
    with pytest.raises(ModelInputError, match="timesteps"):
        model(x, t[:, :2], ctx)


def test_schedule_labels():
    labels = few_step_schedule(torch.tensor([1000.0, 937.5]), 0.0)
    assert labels == [ForwardLabels(0, 1000.0, 0, "denoise", "none", 0), ForwardLabels(1, 937.5, 0, "denoise", "none", 1),
                      ForwardLabels(2, 0.0, 0, "context", "none", -1)]


def test_folded_residuals_leave_outputs_and_cache_as_the_blocks_one_by_one(monkeypatch):
    """Where models/wan/triton_norms.py runs (CUDA inference), a block's FFN residual is added in the pass of the next
    block's norm1 (the head's norm after the last block; the short context pass's last block too). Forced here on the
    CPU, where each folded function is its two parts, the outputs and every layer's cache are bitwise those of the
    blocks run one by one, and the fold happens once per block boundary and in the head; an observer of the last
    layer's self-attention (a context pass then runs that block as far as its attention) sees the same calls. While
    anything watches a block or the head (a forward hook or pre-hook, a global pre-hook) nothing is folded, and
    what it sees is what it sees without the fold: a block's whole output, the head's whole input, every call."""
    from models.wan import model as wan

    model = tiny_model(local_attn_size=6, sink_size=1)
    x, t, ctx = inputs(9)
    folds, fold = [], wan.fused.gated_residual_norm_modulate
    monkeypatch.setattr(wan.fused, "gated_residual_norm_modulate", lambda *a: folds.append(1) or fold(*a))
    last = len(model.blocks) - 1

    def run(on, watch=None, probe=None):
        monkeypatch.setattr(wan.fused, "residual_norms", lambda x: on)
        folds.clear()
        seen = []
        def keep(*args):  # a forward hook's output, a pre-hook's first input
            seen.append(args[-1][0].clone() if isinstance(args[-1], tuple) else args[-1].clone())
        handle = {"block 0": lambda: model.blocks[0].register_forward_hook(keep),
                  "last block": lambda: model.blocks[last].register_forward_hook(keep),
                  "block 1 pre": lambda: model.blocks[1].register_forward_pre_hook(keep),
                  "head pre": lambda: model.head.register_forward_pre_hook(keep),
                  "global pre": lambda: torch.nn.modules.module.register_module_forward_pre_hook(
                      lambda m, args: seen.append(1) if m is model.head else None),
                  None: lambda: None}[watch]()
        cache = RolloutCache.allocate(model.config, B, 9, (H // 2) * (W // 2), dtype=x.dtype, device="cpu")
        outs = []
        with torch.no_grad(), attach(model, probe) if probe is not None else contextlib.nullcontext():
            for start in (0, 3, 6):
                chunk = x[:, :, start:start + 3], t[:, start:start + 3], ctx
                outs += [model(*chunk, cache=cache, start_frame=start) for _ in range(2)]
                model(*chunk, cache=cache, start_frame=start, cache_only=True)
        if handle is not None:
            handle.remove()
        return outs, cache, len(folds), seen

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(a, b))

    plain, plain_cache, plain_folds, _ = run(False)
    folded, folded_cache, n, _ = run(True)
    assert plain_folds == 0 and n == 3 * (2 * len(model.blocks) + len(model.blocks) - 1)
    assert same(plain, folded)
    for a, b in zip(plain_cache.kv, folded_cache.kv):
        assert a.frames == b.frames and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    records = []
    for on in (False, True):
        probe = RecordingProbe(CallFilter(layers={last}, kinds={"self"}))
        outs, cache, n, _ = run(on, probe=probe)
        assert same(outs, plain) and (n > 0) == on
        assert all(torch.equal(a.k, b.k) and torch.equal(a.v, b.v) for a, b in zip(cache.kv, plain_cache.kv))
        records.append([(r[0].query_frames, r[1], r[2]) for r in probe.records])
    assert len(records[0]) == 9 and all(p == q and torch.equal(a, c) and torch.equal(b, d)
                                        for (p, a, b), (q, c, d) in zip(*records))
    for watch in ("block 0", "last block", "block 1 pre", "head pre", "global pre"):
        _, _, _, want = run(False, watch)
        outs, _, n, seen = run(True, watch)
        assert n == 0 and same(outs, plain), watch
        assert len(seen) == len(want) > 0 and same(seen, want), watch


@pytest.mark.gpu
def test_kv_made_in_the_cache_slots_equals_the_copied_kv(monkeypatch):
    """The chunk's keys/values made directly in the KV cache's slots (models/wan/model.py `cache_slots`: the q/k
    kernel and the v GEMM write there, `KVCache.write` copies nothing) give bitwise the latents and the final
    cache of the copying path, eager and from CUDA graphs, with a window that evicts."""
    from models.common.kv_cache import KVCache
    from models.wan import model as wan

    model = tiny_model(local_attn_size=6, sink_size=1).cuda().to(torch.bfloat16)
    s = FlowMatchScheduler(5.0)
    placed = []
    slots = KVCache.slots
    monkeypatch.setattr(KVCache, "slots", lambda self, *a: placed.append(a) or slots(self, *a))

    def run(direct, graphs):
        monkeypatch.setattr(wan, "DIRECT_KV_WRITES", direct)
        g = torch.Generator(device="cuda").manual_seed(0)
        noise = torch.randn(1, 12, C, H, W, generator=g, device="cuda").to(torch.bfloat16)
        ctx = torch.randn(1, 16, 32, generator=g, device="cuda").to(torch.bfloat16)
        out = causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g,
                              cuda_graphs=graphs)
        cache = model._rollout_graphs.cache.kv[1] if graphs else None
        return out, None if cache is None else (cache.k.clone(), cache.v.clone())

    copied, _ = run(False, False)
    assert not placed
    direct, _ = run(True, False)
    assert len(placed) == 2 * 4 * 5  # every self-attention call of both layers made its k, v in the cache
    assert torch.equal(direct, copied)
    for _ in range(3):  # warm-up, record, replay
        a, cache_a = run(True, True)
    for _ in range(3):
        b, cache_b = run(False, True)
    assert torch.equal(a, copied) and torch.equal(b, copied)
    assert torch.equal(cache_a[0], cache_b[0]) and torch.equal(cache_a[1], cache_b[1])


@pytest.mark.gpu
@pytest.mark.parametrize("flag", ["models.wan.model:CACHE_ONLY_SKIPS_LAST_BLOCK", "models.wan.fused:RESIDUAL_NORMS"])
def test_the_rollouts_shortcuts_are_bitwise_in_graphed_rollouts(monkeypatch, flag):
    """On CUDA (bf16, the Triton/cuDNN kernels and norm row kernels, direct KV writes, CUDA graphs with a graph of its
    own for the context pass), with a window that evicts, each shortcut gives the latents of the path without it bit
    for bit, eager and graphed (warm-up, record, replay): the context pass stopped after the last block's keys and
    values (CACHE_ONLY_SKIPS_LAST_BLOCK), the gated residuals added in the norms' passes (RESIDUAL_NORMS)."""
    import importlib

    module_name, name = flag.split(":")
    module = importlib.import_module(module_name)
    model = tiny_model(local_attn_size=6, sink_size=1).cuda().to(torch.bfloat16)
    s = FlowMatchScheduler(5.0)

    def run(on, graphs):
        monkeypatch.setattr(module, name, on)
        g = torch.Generator(device="cuda").manual_seed(0)
        noise = torch.randn(1, 12, C, H, W, generator=g, device="cuda").to(torch.bfloat16)
        ctx = torch.randn(1, 16, 32, generator=g, device="cuda").to(torch.bfloat16)
        return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g,
                               cuda_graphs=graphs)

    without = run(False, False)
    assert torch.equal(run(True, False), without)
    for on in (True, False, True):
        for i in range(3):  # warm-up, record, replay
            assert torch.equal(run(on, True), without), (on, i)


@pytest.mark.gpu
def test_cuda_graph_rollout_equals_eager_rollout():
    model = tiny_model(local_attn_size=6, sink_size=1).cuda().to(torch.bfloat16)
    s = FlowMatchScheduler(5.0)

    def run(graphs):
        g = torch.Generator(device="cuda").manual_seed(0)
        noise = torch.randn(1, 12, C, H, W, generator=g, device="cuda").to(torch.bfloat16)
        ctx = torch.randn(1, 16, 32, generator=g, device="cuda").to(torch.bfloat16)
        return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g,
                               cuda_graphs=graphs)

    eager = run(False)
    # rollout 1 warms up on its first chunk (eager on the graphs' cache) and records the later chunks' graphs,
    # 2 records chunk 0's and replays the rest, 3 replays only
    torch.testing.assert_close(run(True), eager, rtol=0, atol=0, msg="graphed rollout 1")
    graphs = model._rollout_graphs
    # a graph per (chunk, first forward, context pass): the first, the other denoising steps, the context pass
    assert graphs is not None and sorted(graphs.graphs) == [(c, f, p) for c in (1, 2, 3)
                                                            for f, p in ((False, False), (False, True), (True, False))]
    for i in range(1, 3):
        torch.testing.assert_close(run(True), eager, rtol=0, atol=0, msg=f"graphed rollout {i + 1}")
    assert model._rollout_graphs is graphs and len(graphs.graphs) == 3 * 4  # for 4 chunks
    # another prompt reuses the graphs (the context is copied in, the cross cache refilled)
    g = torch.Generator(device="cuda").manual_seed(5)
    noise = torch.randn(1, 12, C, H, W, generator=g, device="cuda").to(torch.bfloat16)
    ctx = torch.randn(1, 16, 32, generator=g, device="cuda").to(torch.bfloat16)
    kw = dict(timesteps=s.warp([1000, 750, 500, 250]), scheduler=s)
    a = causal_few_step(model, noise, ctx, generator=torch.Generator(device="cuda").manual_seed(1), cuda_graphs=True, **kw)
    b = causal_few_step(model, noise, ctx, generator=torch.Generator(device="cuda").manual_seed(1), cuda_graphs=False, **kw)
    assert model._rollout_graphs is graphs
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, eager)
    # an attached observer turns graphs off; changed weights make new graphs
    with torch.no_grad():
        model.blocks[0].ffn[0].weight.data = model.blocks[0].ffn[0].weight.data.clone()
    run(True)
    assert model._rollout_graphs is not graphs
    # a shape recorded at once, without the eager warm-up rollout (RolloutGraphs.eager_first = False; every
    # kernel is planned by now), equals its eager rollout too
    from models.common.rollout import RolloutGraphs

    def run9(graphs):
        g = torch.Generator(device="cuda").manual_seed(2)
        noise = torch.randn(1, 9, C, H, W, generator=g, device="cuda").to(torch.bfloat16)
        ctx = torch.randn(1, 16, 32, generator=g, device="cuda").to(torch.bfloat16)
        return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s,
                               generator=g, cuda_graphs=graphs)

    eager9 = run9(False)
    model._rope_cache.clear()  # as in a fresh process: no RoPE table of these positions computed yet (the
    # recorder computes them before recording; a host-to-device copy inside a recording is an error)
    RolloutGraphs.eager_first = False
    try:
        for i in range(2):
            torch.testing.assert_close(run9(True), eager9, rtol=0, atol=0, msg=f"recorded at once, rollout {i + 1}")
    finally:
        RolloutGraphs.eager_first = True


def test_which_rollouts_share_recorded_graphs():
    """The host-side rule of `RolloutGraphs` (checked on the CPU; the graphs themselves run on a GPU): one set per
    model, reused while shape, weights and observers are the same; off with autograd or a non-graph-safe
    observer; new for a new shape, new weights or other observers."""
    from models.common.rollout import _rollout_graphs, release_graphs
    from workbench.capture import CaptureSpec, Geometry, StatsProbe
    from workbench.hooks import Probe, attach

    model = tiny_model()
    noise, ctx = torch.randn(1, 6, C, H, W), torch.randn(1, 16, 32)
    get = lambda n=noise: _rollout_graphs(model, n, ctx, True, "k", devices=("cpu",))  # noqa: E731
    with torch.no_grad():
        first = get()
        assert first is not None and get() is first
        assert _rollout_graphs(model, noise, ctx, True, "k") is None  # CPU tensors: no graphs by default
        assert _rollout_graphs(model, noise, ctx, False, "k", devices=("cpu",)) is None
        assert get(torch.randn(1, 9, C, H, W)) is not first  # another shape
        second = get()
        assert second is not first and second.cache.kv[0].k.shape[1] == 6 * (H // 2) * (W // 2)
        with attach(model, Probe()):
            assert get() is None  # a plain Probe runs arbitrary Python per call
        probe = StatsProbe(CaptureSpec(layers=(0,), heads=(0,), steps=(0,)), Geometry(1, 6, 6, 16), "cpu")
        with attach(model, probe):
            third = get()
            assert third is not second and third.observers == (probe,) and get() is third
        with attach(model, probe):
            assert get() is third  # the same probe attached again
        model.blocks[0].ffn[0].weight.data = model.blocks[0].ffn[0].weight.data.clone()
        with attach(model, probe):
            assert get() is not third  # new weights
        release_graphs(model)
        assert model._rollout_graphs is None
    assert get() is None  # autograd on


def test_an_eager_rollout_lets_the_graphs_go_when_the_gpu_has_no_room_for_both():
    """An eager rollout beside the model's recorded graphs (a rollout's cache and the graphs' pool: GiBs at full
    size) keeps them for the next graphed rollout while the device has room for it; it lets them go first when
    its cache does not fit (an out-of-memory error, then the same allocation again) or when what is left after
    it is less than the graphs' pool. (The rule, checked on the CPU with graphs kept for CPU tensors and a room
    of the test's own; tests/test_rollout.py's GPU test runs it on a GPU.)"""
    from models.common.rollout import _rollout_graphs, eager_cache

    model = tiny_model()
    cpu = torch.device("cpu")
    noise, ctx = torch.randn(1, 6, C, H, W), torch.randn(1, 16, 32)
    calls = []

    def allocate(fail=0):
        calls.append(fail)
        if len(calls) <= fail:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
        return RolloutCache.allocate(model.config, 1, 6, model.config.tokens_per_frame(H, W), dtype=torch.float32,
                                     device=cpu)

    def eager(room, fail=0, device=cpu, devices=("cpu",)):
        calls.clear()
        return eager_cache(model, device, lambda: allocate(fail), devices=devices, room=lambda: room)

    with torch.no_grad():
        held = _rollout_graphs(model, noise, ctx, True, "k", devices=("cpu",))
        held.pool_bytes = 1000
        cache = eager(1000)
        assert model._rollout_graphs is held and cache is not held.cache
        assert cache.kv[0].k.shape == held.cache.kv[0].k.shape
        eager(0, devices=("cuda",))  # (by default only graphs of a GPU are let go)
        eager(0, device=torch.device("meta"), devices=("cpu", "meta"))  # (nor graphs of another device)
        assert model._rollout_graphs is held
        eager(999)
        assert model._rollout_graphs is None  # no room for a forward beside them
        import gc
        import weakref

        gone = weakref.ref(_rollout_graphs(model, noise, ctx, True, "k", devices=("cpu",)))
        freed = []
        allocate_once = allocate

        def allocate(fail=0):  # (the retry finds the graphs freed, not only unset: nothing holds them then)
            if len(calls) == 1:
                gc.collect()
                freed.append(gone() is None)
            return allocate_once(fail)

        assert eager(10**12, fail=1) is not None and calls == [1, 1]  # its cache out of memory: let go, then again
        assert model._rollout_graphs is None and freed == [True]
        allocate = allocate_once
        with pytest.raises(torch.cuda.OutOfMemoryError):  # (with nothing to let go, the error is the caller's)
            eager(10**12, fail=1)


@pytest.mark.parametrize("independent_first_frame", [False, True])
def test_first_rollout_warms_up_on_its_first_full_size_chunk(independent_first_frame):
    """Which forwards of a shape's first rollout run eagerly (`RolloutGraphs._warm_up`; the host-side rule, on the
    CPU): without subscribers, those up to and including the first full-size chunk (the image's one-frame chunk
    before it too); with an observer, or with `warm_up_chunk` off, the whole first rollout; none in later
    rollouts."""
    from models.common.rollout import RolloutGraphs, _rollout_graphs, release_graphs
    from workbench.capture import CaptureSpec, Geometry, StatsProbe
    from workbench.hooks import attach

    model = tiny_model()
    model.independent_first_frame = independent_first_frame
    frames = 10 if independent_first_frame else 12
    noise, ctx = torch.randn(1, frames, C, H, W), torch.randn(1, 16, 32)
    spans = model.chunk_spans(frames)

    def eager_chunks():
        """begin a rollout; the chunks whose forwards (steps 0-4 each) run eagerly."""
        graphs = _rollout_graphs(model, noise, ctx, True, "k", devices=("cpu",))
        graphs.begin(model, ctx)
        eager = set()
        for chunk, (start, n) in enumerate(spans):
            x = noise[:, start : start + n].transpose(1, 2)  # the model's [B, C, F, H, W]
            for step in range(5):
                if graphs._warm_up(model, x, chunk):
                    eager.add(chunk)
                elif chunk in eager:
                    raise AssertionError(f"chunk {chunk}: an eager forward after a recorded one")
        return eager

    with torch.no_grad():
        warm = {0, 1} if independent_first_frame else {0}
        assert eager_chunks() == warm and eager_chunks() == set()
        release_graphs(model)
        probe = StatsProbe(CaptureSpec(layers=(0,), heads=(0,), steps=(0,)), Geometry(1, 6, 6, 16), "cpu")
        with attach(model, probe):
            assert eager_chunks() == set(range(len(spans))) and eager_chunks() == set()
        release_graphs(model)
        RolloutGraphs.warm_up_chunk = False
        try:
            assert eager_chunks() == set(range(len(spans)))
        finally:
            RolloutGraphs.warm_up_chunk = True
        release_graphs(model)
        RolloutGraphs.eager_first = False
        try:
            assert eager_chunks() == set()
        finally:
            RolloutGraphs.eager_first = True


def test_a_failed_recording_in_the_first_rollout_falls_back_to_eager(monkeypatch):
    """`RolloutGraphs.forward` when a recording of the first rollout fails (a kernel that cannot be set up inside a
    recording): the cache's bookkeeping is put back and that forward and the rest of the rollout run eagerly, with
    the eager rollout's latents. Simulated on the CPU: the 'recording' runs the forward and then fails, as a CUDA
    capture fails at its end (global attention, so writing a chunk's keys twice is harmless)."""
    import contextlib

    model = tiny_model()
    s = FlowMatchScheduler(5.0)
    g = torch.Generator().manual_seed(0)
    noise, ctx = torch.randn(1, 12, C, H, W, generator=g), torch.randn(1, 16, 32, generator=g)

    def run(graphs):
        return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s,
                               generator=torch.Generator().manual_seed(1), cuda_graphs=graphs)

    with torch.no_grad():
        eager = run(False)
        recordings = []

        @contextlib.contextmanager
        def failing_graph(graph, pool=None, stream=None):
            recordings.append(stream)
            yield
            for kv in model._rollout_graphs.cache.kv:  # what a real capture leaves: the host's bookkeeping moved
                kv.frames.append(99)  # on while its kernels never ran
                kv.positions.append(99)
                kv.stamps.append(0)
            raise RuntimeError("operation not permitted when stream is capturing")

        cuda_graphs_on_the_cpu(monkeypatch, failing_graph, object)
        out = run(True)
        graphs = model._rollout_graphs
        assert len(recordings) == 1 and graphs._cold and not graphs.graphs  # chunk 1's first forward, then eager
        assert recordings[0] is capture_stream(model, "cpu")  # recorded on the model's own capture stream
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        assert [kv.state()[0] for kv in graphs.cache.kv] == [list(range(12))] * len(graphs.cache.kv)


class FakeStream:
    """Stands in for torch.cuda.Stream on the CPU: each one made is a new object."""

    def __init__(self, device=None, priority=0):
        self.device, self.priority = device, priority


def cuda_graphs_on_the_cpu(monkeypatch, graph_context, graph_class) -> None:
    """`RolloutGraphs` on the CPU: CUDA graph recording is `graph_context` (torch.cuda.graph's signature), graphs are
    `graph_class`, streams `FakeStream`."""
    from models.common import rollout as ro

    real = ro._rollout_graphs
    monkeypatch.setattr(ro, "_rollout_graphs", lambda *a, **k: real(*a, **{**k, "devices": ("cpu",)}))
    monkeypatch.setattr(torch.cuda, "graph", graph_context)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", graph_class)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)


def test_graph_owners_keep_streams_of_their_own(monkeypatch):
    """models/common/graph_streams.py: an owner of CUDA graphs gets one capture stream, kept (so its graphs' GEMMs
    have a cuBLAS workspace no other owner's graphs use), another owner another; side streams are kept per owner
    and priority, apart from its capture stream; the streams go with their owner."""
    import gc

    from models.common import graph_streams

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    a, b = tiny_model(), tiny_model()
    cap = capture_stream(a, "cuda:0")
    assert capture_stream(a, "cuda:0") is cap and capture_stream(a, torch.device("cuda", 0)) is cap
    assert capture_stream(b, "cuda:0") is not cap and capture_stream(a, "cuda:1") is not cap
    side = side_stream(a, "cuda:0")
    assert side_stream(a, "cuda:0", 0) is side and side not in (cap, side_stream(a, "cuda:0", -5))
    assert side.priority == 0 and side_stream(a, "cuda:0", -5).priority == -5
    held = len(graph_streams._STREAMS)
    del b
    gc.collect()
    assert len(graph_streams._STREAMS) == held - 1


@pytest.mark.parametrize("local,sink", [(-1, 0), (9, 3), (6, 0), (12, 3), (4, 1)])
def test_window_rule_is_what_the_kv_cache_holds(local, sink):
    """models/common/window.py (the full-sequence mask, the synthetic stores) against the frames the KV cache holds
    when each chunk attends (tests/attention_reference.py), 8 chunks of 3."""
    from models.common.window import attended_key_frames
    from attention_reference import expected_key_frames

    rows = attended_key_frames(24, 3, local, sink)
    for i, row in enumerate(rows):
        assert tuple(j for j, a in enumerate(row) if a) == expected_key_frames(i // 3, 3, local, sink)


def replays_on_the_cpu(monkeypatch) -> None:
    """`RolloutGraphs` on the CPU with a fake CUDA graph: a recording notes the DiT forward it saw, a replay runs
    that forward again on the same tensors (what a graph's replay computes; the host's bookkeeping is the
    rollout's own). The model class's forward is wrapped, not an instance's: an instance's would be a watcher."""
    import contextlib

    from models.wan.model import WanModel

    recording = []

    class FakeGraph:
        def replay(self):
            self.again()

    @contextlib.contextmanager
    def fake_graph(graph, pool=None, stream=None):
        recording.append(graph)
        try:
            yield
        finally:
            recording.pop()

    cuda_graphs_on_the_cpu(monkeypatch, fake_graph, FakeGraph)
    forward = WanModel.forward

    def recorded(model, x, t, ctx, **kw):
        out = forward(model, x, t, ctx, **kw)
        if recording:
            def again(x=x, t=t, ctx=ctx, kw=kw, out=out):
                o = forward(model, x, t, ctx, **kw)
                if out is not None:
                    out.copy_(o)
            recording[-1].again = again
        return out

    monkeypatch.setattr(WanModel, "forward", recorded)


def few_step_on(model, seed: int, graphs: bool, frames: int = 12, policy=None):
    s = FlowMatchScheduler(5.0)
    g = torch.Generator().manual_seed(seed)
    noise, ctx = torch.randn(1, frames, C, H, W, generator=g), torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s,
                               generator=g, cuda_graphs=graphs, cache_policy=policy)


def test_graphs_follow_the_model_config_compiled_blocks_and_watchers(monkeypatch):
    """What a forward depends on beyond the rollout's shape is in the graphs' key, or turns them off: the model's
    config (a window set on a model that ran without one: the old cache never evicted, so later rollouts ran
    global attention under a windowed config), blocks compiled later, and anything watching the modules (a
    forward hook or pre-hook anywhere, a forward set on an instance as nnsight does: a replay runs none of it)."""
    from models.common.rollout import _rollout_graphs

    model = tiny_model()
    noise, ctx = torch.randn(1, 12, C, H, W), torch.randn(1, 16, 32)
    get = lambda: _rollout_graphs(model, noise, ctx, True, "k", devices=("cpu",))  # noqa: E731
    with torch.no_grad():
        first = get()
        assert get() is first and not first.cache.kv[0].evict
        model.config = model.config.replace(local_attn_size=6, sink_size=0)
        windowed = get()
        assert windowed is not first and windowed.cache.kv[0].evict and windowed.cache.kv[0].capacity == 6
        model.blocks[1]._compiled_call_impl = model.blocks[1]._call_impl  # (what Module.compile sets)
        assert get() is not windowed
        model.blocks[1]._compiled_call_impl = None
        for module in (model, model.blocks[0].self_attn.norm_q, model.head, model.patch_embedding):
            for register in (module.register_forward_hook, module.register_forward_pre_hook):
                hook = register(lambda *a: None)
                assert get() is None
                hook.remove()
                assert get() is not None
        for module in (model.blocks[1].ffn, model.patch_embedding):  # (nnsight's way: a forward on the instance)
            module.forward = module.forward
            assert get() is None
            del module.forward
            assert get() is not None
        hook = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)  # (every module's)
        assert get() is None
        hook.remove()

        class Wrapper(torch.nn.Module):  # (a module of its own around the head's projection)
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x)

        inner = model.head.head
        model.head.head = Wrapper(inner)
        assert get() is None
        model.head.head = inner
        assert get() is not None

    replays_on_the_cpu(monkeypatch)  # the rollouts: a window set on a model that ran without one is honoured
    model = tiny_model()
    few_step_on(model, 0, True)
    few_step_on(model, 0, True)
    model.config = model.config.replace(local_attn_size=6, sink_size=0)
    assert torch.equal(few_step_on(model, 1, True), few_step_on(model, 1, False))


def test_a_graphed_rollout_runs_its_own_cache_policy(monkeypatch):
    """A cache policy of the same key as the graphs' (the same settings) is the one the rollout applies and whose
    decisions it records (`describe`), not the one the graphs were first made with."""
    from workbench.kv_policies import WindowSink

    class Counted(WindowSink):
        def __init__(self, *a):
            super().__init__(*a)
            self.chunks = []

        def after_chunk(self, layer, cache, chunk, next_frames):
            self.chunks.append(chunk)
            return super().after_chunk(layer, cache, chunk, next_frames)

    replays_on_the_cpu(monkeypatch)
    model = tiny_model()
    first, second = Counted(6, 1), Counted(6, 1)
    ran = few_step_on(model, 0, True, policy=first)
    n = len(first.chunks)
    assert n and torch.equal(ran, few_step_on(model, 0, False, policy=Counted(6, 1)))
    assert torch.equal(few_step_on(model, 1, True, policy=second), few_step_on(model, 1, False, policy=Counted(6, 1)))
    assert len(first.chunks) == n and second.chunks == first.chunks and model._rollout_graphs.graphs


def test_a_window_without_room_for_the_sink_and_a_chunk_is_refused_before_any_work():
    """A window smaller than sink + chunk: the rollout failed in its first forward ("cannot evict 1 frames from a
    cache holding 0"), while the full-sequence mask let frame 0 attend frames 1-2 and not itself; the rule, the
    mask, the rollout and a training config now refuse it, naming the least window."""
    from models.common.window import attended_key_frames
    from test_training import BASE
    from training.checks import check_config, load_train_config
    from training.errors import TrainingError

    with pytest.raises(ModelInputError, match=r"local_attn_size 2: the window must hold the sink \(0 frames\) and a "
                                              r"chunk \(3 frames\): at least 3"):
        attended_key_frames(6, 3, 2, 0)
    with pytest.raises(ModelInputError, match="local_attn_size 0: the window must hold"):
        attended_key_frames(6, 3, 0, 0)
    model = tiny_model(local_attn_size=4, sink_size=2)
    probe = RecordingProbe()
    with pytest.raises(ModelInputError, match="at least 5"), attach(model, probe):
        rollout(model, frames=6)
    assert not probe.records  # (before any forward)
    with pytest.raises(ModelInputError, match="at least 5"):
        model.block_causal_mask(6)
    assert attended_key_frames(6, 3, 5, 2)[3] == [True, True, False, True, True, True]  # the sink and its chunk
    cfg, _ = load_train_config("configs/self_forcing_dmd.yaml", BASE + ["model_kwargs.local_attn_size=4",
                                                                         "model_kwargs.sink_size=2"])
    with pytest.raises(TrainingError, match=r"model_kwargs.local_attn_size 4: .* at least 5"):
        check_config(cfg, 1)


def test_graph_replays_of_a_deep_sink_rollout_equal_its_eager_rollouts_on_other_data(monkeypatch):
    """`RolloutGraphs` on the CPU with a fake CUDA graph (its replay runs the recorded forward again on the same
    tensors): a deep sink's rollouts replayed from graphs equal their eager rollouts for other seeds than the
    recording's. The cache's keys as written (`KVCache.unmoved`, what a moved sink is rotated from) were part of
    the bookkeeping a replay puts back, so every later sample's sink was rotated from the first sample's keys."""
    from workbench.kv_policies import DeepSink

    replays_on_the_cpu(monkeypatch)
    model = tiny_model()
    s = FlowMatchScheduler(5.0)

    def go(seed, graphs):
        g = torch.Generator().manual_seed(seed)
        noise, ctx = torch.randn(1, 18, C, H, W, generator=g), torch.randn(1, 16, 32, generator=g)
        return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s,
                               generator=g, cuda_graphs=graphs, cache_policy=DeepSink(9, 4))

    with torch.no_grad():
        eager = {seed: go(seed, False) for seed in (0, 1, 2)}
        for seed in (0, 1, 2, 0):
            assert torch.equal(go(seed, True), eager[seed]), seed
        assert model._rollout_graphs.graphs  # (replayed: the graphs were recorded)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_graphed_rollouts_honour_hooks_a_new_window_and_a_source_recorded_again():
    """Graphed rollouts (warm-up, record, replay) equal eager ones after what the graphs did not see at first: a
    forward hook on a block (a replay runs no hook), a window set on a model that ran without one, and a resample
    ablation whose source was recorded again into new tensors (the graphs read the old ones in place)."""
    from workbench.interventions import HeadAblation, HeadOutputs

    s = FlowMatchScheduler(5.0)
    g = torch.Generator(device="cuda").manual_seed(0)
    noise = torch.randn(1, 12, C, H, W, generator=g, device="cuda")
    ctx = torch.randn(1, 16, 32, generator=g, device="cuda")

    def run(model, graphs, *subscribers, seed=1, x=noise):
        with attach(model, *subscribers):
            return causal_few_step(model, x, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s,
                                   cuda_graphs=graphs, generator=torch.Generator(device="cuda").manual_seed(seed))

    model = tiny_model().cuda()
    run(model, True), run(model, True)
    hook = model.blocks[0].register_forward_hook(lambda module, args, out: out * 0.5)
    hooked = run(model, False)
    assert torch.equal(run(model, True), hooked)
    hook.remove()
    assert not torch.equal(run(model, True), hooked)

    model = tiny_model().cuda()
    run(model, True), run(model, True)
    model.config = model.config.replace(local_attn_size=6, sink_size=0)
    assert torch.equal(run(model, True), run(model, False))

    model = tiny_model().cuda()
    sel = CallFilter(layers={0}, kinds={"self"})
    source = HeadOutputs(sel)
    run(model, False, source, x=torch.randn_like(noise))
    ablation = HeadAblation(sel, heads=[0], mode="resample", source=source)
    for _ in range(3):
        run(model, True, ablation)
    source.by_call.clear()
    run(model, False, source, x=torch.randn_like(noise))
    torch.cuda.empty_cache()
    junk = [torch.randn(1 << 16, device="cuda") for _ in range(64)]  # (what the freed outputs' memory now holds)
    assert torch.equal(run(model, True, ablation), run(model, False, ablation))
    del junk


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_an_eager_rollout_lets_the_graphs_go_when_there_is_no_room(monkeypatch):
    """On a GPU: the graphs' pool is measured, the room an eager rollout has counts a memory fraction set for the
    process, and graphs let go for an eager rollout (no room left, or its cache out of memory) are recorded again
    by the next graphed rollout, which still equals the eager one bitwise."""
    from models.common import rollout as rollout_mod

    s = FlowMatchScheduler(5.0)
    model = tiny_model(local_attn_size=6, sink_size=1).cuda()

    def run(graphs):
        g = torch.Generator(device="cuda").manual_seed(0)
        noise = torch.randn(1, 12, C, H, W, generator=g, device="cuda")
        ctx = torch.randn(1, 16, 32, generator=g, device="cuda")
        return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g,
                               cuda_graphs=graphs)

    graphed = [run(True) for _ in range(2)]
    held = model._rollout_graphs
    assert held.pool_bytes > 0
    assert torch.equal(run(False), graphed[1]) and model._rollout_graphs is held  # room for both: kept
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.mem_get_info(device)[1]
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(device) + (64 << 20)) / total, device)
    try:
        room = rollout_mod._room(device, held.pool_bytes)  # (the fraction, a float, may cut the limit by a byte)
        assert (64 << 20) - 8 <= room <= (64 << 20) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(
            device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    monkeypatch.setattr(rollout_mod, "_room", lambda device, pool_bytes: pool_bytes - 1)
    assert torch.equal(run(False), graphed[1]) and model._rollout_graphs is None
    assert torch.equal(run(True), graphed[1]) and torch.equal(run(True), graphed[1])  # recorded again, replayed
    monkeypatch.undo()
    held, allocate = model._rollout_graphs, RolloutCache.allocate
    failed = []

    def out_of_memory_once(*args, **kw):
        if not failed:
            failed.append(1)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return allocate(*args, **kw)

    monkeypatch.setattr(RolloutCache, "allocate", out_of_memory_once)
    assert torch.equal(run(False), graphed[1]) and failed and model._rollout_graphs is None
    monkeypatch.undo()
    assert torch.equal(run(True), graphed[1]) and model._rollout_graphs is not held


def test_a_float64_rollout_is_the_float32_rollouts_reference(one_thread):
    """A float64 rollout draws the float32 rollout's noise between steps (the CPU's float64 randn is another
    stream past 16 numbers, so float64 runs differed from float32 by up to 5 in latents, 0.1 in attention mass), so
    the two differ by float32 rounding only; a bfloat16 run keeps drawing in its own dtype."""
    from models.common.rollout import seeded_noise

    model = tiny_model(local_attn_size=6, sink_size=1)
    s = FlowMatchScheduler(5.0)

    def run(dtype):
        m = tiny_model(local_attn_size=6, sink_size=1).to(dtype)
        m.load_state_dict(model.state_dict())
        noise, g = seeded_noise(3, (1, 9, C, H, W), "cpu", dtype)
        ctx = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(4)).to(dtype)
        with torch.no_grad():
            return causal_few_step(m, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g,
                                   cuda_graphs=False).double()

    f32, f64 = run(torch.float32), run(torch.float64)
    assert (f64 - f32).abs().max() < 1e-4 * f64.abs().max()
    # the bfloat16 run is near them where its draws are float32's rounded (torch 2.12 on: all but about one in 4096,
    # a rounding step apart; 2.11's CPU bfloat16 randn is another stream, so its run is another sample)
    one, other = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    drawn = torch.randn(4096, generator=one, dtype=torch.bfloat16)
    if (drawn == torch.randn(4096, generator=other).bfloat16()).float().mean() < 0.99:
        pytest.skip(f"torch {torch.__version__}'s CPU bfloat16 randn is not float32's rounded")
    assert (run(torch.bfloat16) - f64).abs().max() < 0.2 * f64.abs().max()
