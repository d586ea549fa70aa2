"""The interventions of workbench/interventions.py against direct computations on a tiny model:
- settings that change nothing (temperature 1, sink factor 1, a resample from the same prompt and seed) give the
  baseline bitwise;
- zero-ablating every head of a layer's self-attention equals the model whose self-attention of that layer
  returns only its output projection's bias (its heads' contribution removed), computed without the seam;
- a key-frame knockout equals a rollout whose KV cache never offers those frames to the later chunks;
- temperature equals the model with that head's q-norm weights divided by T; sink scaling equals a dense float64
  softmax with those frames' logits multiplied by c; mean ablation writes the recorded mean."""

import math

import pytest
import torch

from conftest import tiny_model
from models.common import kv_cache
from test_interventions import C, FSL, H, TEXT_LEN, W, few_step
from workbench.hooks import CallFilter, RecordingProbe, attach
from workbench.interventions import HeadAblation, HeadOutputs, HeadTemperature, KeyFrameKnockout, SinkScaling


def test_settings_that_change_nothing_are_bitwise_the_baseline(one_thread):
    model = tiny_model(local_attn_size=6, sink_size=1)
    plain = few_step(model, 9)
    assert torch.equal(few_step(model, 9, HeadTemperature(1.0, heads=[1])), plain)
    assert torch.equal(few_step(model, 9, SinkScaling(1.0, frames=[0, 1])), plain)
    same = HeadOutputs(CallFilter(layers={1}))
    assert torch.equal(few_step(model, 9, same), plain)
    assert torch.equal(few_step(model, 9, HeadAblation(CallFilter(layers={1}), heads=[0, 3], mode="resample",
                                                       source=same)), plain)
    other = HeadOutputs(CallFilter(layers={1}))
    few_step(model, 9, other, seed=5)
    assert not torch.equal(few_step(model, 9, HeadAblation(CallFilter(layers={1}), heads=[0], mode="resample",
                                                           source=other)), plain)


def test_zero_ablation_of_every_head_is_the_layer_without_its_attention(one_thread):
    model = tiny_model()
    layer = 1
    ablated = few_step(model, 9, HeadAblation(CallFilter(layers={layer}, kinds={"self"}), mode="zero"))
    attn = model.blocks[layer].self_attn
    forward = attn.forward

    def removed(x, ctx, cache):  # the heads contribute nothing: o(0) = o.bias (the cache is still written)
        forward(x, ctx, cache)
        return attn.o.bias.expand(*x.shape[:2], -1)

    attn.forward = removed
    try:
        direct = few_step(model, 9)
    finally:
        attn.forward = forward
    assert torch.equal(ablated, direct)
    assert not torch.equal(ablated, few_step(model, 9))


def test_knockout_equals_a_cache_that_never_held_those_frames(one_thread, monkeypatch):
    model = tiny_model()
    gone = {1, 4}
    knocked = few_step(model, 12, KeyFrameKnockout(gone, filter=CallFilter(chunks={1, 2, 3})))
    window = kv_cache.KVCache.window

    def without(self):  # the later chunks' window leaves those frames' slots out (as if never written)
        k, v, frames = window(self)
        if frames[-1] < 3:  # chunk 0 attends to its own frames
            return k, v, frames
        keep = [i for i, f in enumerate(frames) if f not in gone]
        idx = torch.tensor([i * self.fsl + t for i in keep for t in range(self.fsl)])
        return k[:, idx], v[:, idx], tuple(frames[i] for i in keep)

    monkeypatch.setattr(kv_cache.KVCache, "window", without)
    direct = few_step(model, 12)
    monkeypatch.undo()
    torch.testing.assert_close(knocked, direct, rtol=1e-5, atol=1e-5)
    assert (knocked - few_step(model, 12)).abs().max() > 1e-3  # the knockout changes the video


def record_inputs(model, layer):
    """(q, k, v) of every self-attention call of `layer`, as the module gets them (before any edit)."""
    records = []
    handle = model.blocks[layer].self_attn.attend.register_forward_pre_hook(
        lambda module, args: records.append(tuple(t.detach().clone() for t in args[:3])))
    return records, handle


def dense(q, k, v, logit_edit):
    """Float64 attention per head with `logit_edit(head, s)` applied to the logits s [Lq, Lk] first."""
    out = torch.empty(q.shape[1:], dtype=torch.float64)  # [Lq, H, D]
    for h in range(q.shape[2]):
        s = q[0, :, h].double() @ k[0, :, h].double().T / math.sqrt(q.shape[-1])
        out[:, h] = torch.softmax(logit_edit(h, s), dim=-1) @ v[0, :, h].double()
    return out


def test_knockout_of_some_heads_equals_a_dense_masked_softmax(one_thread):
    model = tiny_model()
    records, handle = record_inputs(model, 0)
    seen = RecordingProbe(CallFilter(layers={0}, kinds={"self"}), keep_out=True)
    few_step(model, 6, KeyFrameKnockout([0], filter=CallFilter(layers={0}), heads=[1, 3]), seen)
    handle.remove()
    call, _, _, out = seen.records[5]  # chunk 1, step 0: frames 3-5 attend to 0-5
    assert call.key_frames == tuple(range(6)) and call.edits == ("knockout:0",) and call.frame_mask is None

    def knock(h, s):
        if h in (1, 3):
            s[:, :FSL] = -math.inf
        return s

    ref = dense(*records[5], knock)
    torch.testing.assert_close(out[0].double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attend to no key frame"):
        few_step(model, 3, KeyFrameKnockout([0, 1, 2]))


def test_temperature_equals_scaled_q_norm_weights(one_thread):
    model = tiny_model()
    layer, head, T = 1, 3, 2.5
    edited = few_step(model, 6, HeadTemperature(T, CallFilter(layers={layer}, kinds={"self"}), heads=[head]))
    d = model.config.head_dim
    with torch.no_grad():
        model.blocks[layer].self_attn.norm_q.weight[head * d : (head + 1) * d] /= T
    direct = few_step(model, 6)
    torch.testing.assert_close(edited, direct, rtol=1e-5, atol=1e-5)
    assert (edited - few_step(tiny_model(), 6)).abs().max() > 1e-3


def test_a_history_only_sink_scaling_leaves_the_sink_frames_own_chunk_as_it_was(one_thread):
    """`history_only` (workbench intervene's default for sink entries, as for knockouts): the chunk that generates
    the sink frames runs as in the baseline, bit for bit, and only the later chunks see the scaled logits; without
    it the sink frames' own chunk changes too (the store's spec said history_only true while it did)."""
    model = tiny_model()
    plain = few_step(model, 9)  # [1, F, C, H, W], chunks of 3
    later = few_step(model, 9, SinkScaling(0.0, frames=[0, 1, 2], history_only=True))
    every = few_step(model, 9, SinkScaling(0.0, frames=[0, 1, 2]))
    assert torch.equal(later[:, :3], plain[:, :3])
    assert (later[:, 3:] - plain[:, 3:]).abs().max() > 1e-3
    assert (every[:, :3] - plain[:, :3]).abs().max() > 1e-3
    seen = RecordingProbe(CallFilter(kinds={"self"}))
    few_step(model, 9, SinkScaling(0.5, frames=[0], history_only=True), seen)
    assert {min(r[0].query_frames) for r in seen.records if r[0].edits} == {3, 6}


def test_sink_scaling_equals_a_dense_softmax_with_scaled_logits(one_thread):
    model = tiny_model()
    c = 3.0
    records, handle = record_inputs(model, 1)
    seen = RecordingProbe(CallFilter(layers={1}, kinds={"self"}), keep_out=True)
    few_step(model, 6, SinkScaling(c, frames=[0], filter=CallFilter(layers={1}), heads=[1]), seen)
    handle.remove()
    call, _, _, out = seen.records[5]
    assert call.key_frames == tuple(range(6)) and call.edits == ("sink:0x3",)

    def scale(h, s):
        if h == 1:
            s[:, :FSL] *= c
        return s

    torch.testing.assert_close(out[0].double(), dense(*records[5], scale), rtol=1e-5, atol=1e-5)
    k_in, k_seen = records[5][1], seen.records[5][2]  # the probe sees the edited copy: frame 0 of head 1 times c
    assert torch.equal(k_seen[:, :FSL, 1], k_in[:, :FSL, 1] * c) and torch.equal(k_seen[:, FSL:], k_in[:, FSL:])
    assert torch.equal(k_seen[:, :, 0], k_in[:, :, 0])


def test_sink_scaling_in_a_rolling_window_scales_the_frame_in_its_cache_slot(one_thread):
    """With a window the cache slot of a frame is not its index: frame 7 sits in slot 1 behind the sink when chunk 3
    (frames 9-11) attends to frames (0, 7, 8, 9, 10, 11)."""
    model = tiny_model(local_attn_size=6, sink_size=1)
    c = 2.0
    records, handle = record_inputs(model, 1)
    seen = RecordingProbe(CallFilter(layers={1}, kinds={"self"}), keep_out=True)
    few_step(model, 12, SinkScaling(c, frames=[7], filter=CallFilter(layers={1}), heads=[2]), seen)
    handle.remove()
    i = next(i for i, (call, *_) in enumerate(seen.records) if call.key_frames == (0, 7, 8, 9, 10, 11))

    def scale(h, s):
        if h == 2:
            s[:, FSL : 2 * FSL] *= c  # slot 1
        return s

    torch.testing.assert_close(seen.records[i][3][0].double(), dense(*records[i], scale), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(seen.records[i][3][0].double(), dense(*records[i], lambda h, s: s), atol=1e-4)


def test_mean_ablation_writes_the_recorded_mean(one_thread):
    model = tiny_model()
    ref, one, two = (HeadOutputs(CallFilter(layers={1}, kinds={"self"})) for _ in range(3))
    few_step(model, 6, ref, one, seed=1)
    few_step(model, 6, ref, two, seed=2)  # a reference batch of two rollouts
    means = ref.mean()
    assert set(means) == {(1, "self")} and means[(1, "self")].shape == (4, model.config.head_dim)
    calls = [*one.by_call.values(), *two.by_call.values()]  # every call has the same number of query tokens
    expected = torch.stack([o.double().mean(dim=(0, 1)) for o in calls]).mean(0)  # [H, D]
    seen = RecordingProbe(CallFilter(layers={1}, kinds={"self"}), keep_out=True)
    few_step(model, 6, HeadAblation(CallFilter(layers={1}, kinds={"self"}), heads=[0], mode="mean", source=means), seen)
    for call, _, _, out in seen.records:
        if call.kind == "self":
            torch.testing.assert_close(out[0, :, 0].double(), expected[0].expand(out.shape[1], -1), atol=1e-6,
                                       rtol=0)
    with pytest.raises(ValueError, match="needs a source"):
        HeadAblation(mode="mean")


def test_the_recorded_mean_of_a_batched_reference_averages_over_its_videos(one_thread):
    """A reference batch of two videos in one rollout (as an API user runs it): the mean is over both videos'
    query tokens, the same as the mean of two one-video rollouts' calls."""
    from models.common.rollout import causal_few_step
    from models.common.scheduler import FlowMatchScheduler

    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    noise, ctx = torch.randn(2, 6, C, H, W, generator=g), torch.randn(2, TEXT_LEN, 32, generator=g)
    ref = HeadOutputs(CallFilter(layers={1}, kinds={"self"}))
    s = FlowMatchScheduler(5.0)
    with attach(model, ref):
        causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g)
    calls = list(ref.by_call.values())
    assert calls[0].shape[0] == 2
    expected = torch.stack([o.double().mean(dim=(0, 1)) for o in calls]).mean(0)  # [H, D]
    torch.testing.assert_close(ref.mean()[(1, "self")].double(), expected, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_graphed_rollout_with_each_graph_safe_intervention_equals_eager():
    """bf16, eviction on: head ablation (zero, mean, resample), temperature and sink scaling replay from CUDA graphs
    (warm-up, record, replay) bitwise as their eager rollouts; the knockout turns the graphs off."""
    from models.common.rollout import causal_few_step
    from models.common.scheduler import FlowMatchScheduler

    model = tiny_model(local_attn_size=6, sink_size=1).cuda().to(torch.bfloat16)
    s = FlowMatchScheduler(5.0)

    def run(graphs, *subscribers, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        noise = torch.randn(1, 12, C, H, W, generator=g, device="cuda").to(torch.bfloat16)
        ctx = torch.randn(1, TEXT_LEN, 32, generator=g, device="cuda").to(torch.bfloat16)
        with attach(model, *subscribers):
            return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s,
                                   generator=g, cuda_graphs=graphs)

    plain = run(False)
    ref = HeadOutputs(CallFilter(layers={1}, kinds={"self"}))
    run(False, ref, seed=3)
    sel = CallFilter(layers={1}, kinds={"self"})
    for edit in (HeadAblation(sel, heads=[2]), HeadAblation(sel, heads=[1], mode="mean", source=ref.mean()),
                 HeadAblation(sel, heads=[0], mode="resample", source=ref), HeadTemperature(2.0, sel, heads=[3]),
                 SinkScaling(0.5, frames=[0], filter=sel, heads=[1])):
        eager = run(False, edit)
        assert not torch.equal(eager, plain), edit.label
        for _ in range(3):
            assert torch.equal(run(True, edit), eager), edit.label
        assert model._rollout_graphs is not None and model._rollout_graphs.interventions == (edit,)
    from models.common.rollout import _rollout_graphs

    with attach(model, KeyFrameKnockout([0], filter=sel)):  # not graph-safe: the rollout runs eagerly
        assert _rollout_graphs(model, plain, torch.zeros(1, TEXT_LEN, 32, device="cuda"), True, "k") is None


def test_a_resample_source_recorded_again_is_new_settings_for_the_graphs(one_thread):
    """CUDA graphs read a resample source's outputs in place: recorded again into new tensors, the ablation's key
    changes (graphs made again, not replayed on freed memory); `workbench intervene` holds an entry's source of
    each sample in the first sample's tensors (`held_in_place`), so the key stays and its later samples replay."""
    from workbench.intervene import held_in_place

    model = tiny_model()
    src = HeadOutputs(CallFilter(layers={1}))
    few_step(model, 6, src, seed=1)
    ablation = HeadAblation(CallFilter(layers={1}), heads=[0], mode="resample", source=src)
    key, old = ablation.key, dict(src.by_call)  # (the old tensors kept: their addresses stay taken)
    assert ablation.key == key and len(old) == 2 * 5 * 2  # (2 chunks x 5 forwards x self/cross)
    src.by_call.clear()
    few_step(model, 6, src, seed=2)
    assert ablation.key != key
    key, addresses = ablation.key, {k: out.data_ptr() for k, out in src.by_call.items()}
    other = HeadOutputs(CallFilter(layers={1}))
    few_step(model, 6, other, seed=3)
    assert held_in_place(src, other) is src and ablation.key == key
    assert {k: out.data_ptr() for k, out in src.by_call.items()} == addresses
    assert all(torch.equal(src.by_call[k], out) for k, out in other.by_call.items())
    assert not all(torch.equal(old[k], out) for k, out in other.by_call.items())  # (the comparison can fail)
    assert held_in_place(None, other) is other
    # a call the new recording lacks goes, one it adds comes, one of another dtype takes the new tensor
    gone, changed = list(src.by_call)[:2]
    partial = HeadOutputs(CallFilter(layers={1}))
    partial.by_call = {k: out.clone() for k, out in other.by_call.items() if k != gone}
    partial.by_call[changed] = partial.by_call[changed].double()
    partial.by_call["new"] = torch.ones(2)
    assert held_in_place(src, partial) is src
    assert set(src.by_call) == set(partial.by_call) and src.by_call[changed].dtype == torch.float64
    assert src.by_call["new"] is partial.by_call["new"] and ablation.key != key
