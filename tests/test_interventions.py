"""The edit seam at `attend` (workbench/interventions.py): an identity intervention changes nothing, bitwise, with
and without a probe, eagerly and through the rollout graphs' eager warm-up; an intervention that edits q, k, v,
the key frame mask or a head's output changes the model's output and is what the probes see (the edited tensors,
the edited call, its label in `call.edits`), and their statistics equal the float64 reference of the edited
inputs; a changed intervention makes a new CUDA-graph key.

The unedited inputs come from forward pre-hooks on `blocks[i].self_attn.attend` (the module's inputs, before
any intervention: tests/attention_reference.py), so the test sees both sides of an edit independently of it."""

import dataclasses
import functools

import numpy as np
import pytest
import torch

from attention_reference import AttendRecorder, dense_frame_stats, max_abs_diff
from conftest import tiny_model
from models.common import rollout as rollout_mod
from models.common.attention import ForwardLabels
from models.common.rollout import causal_few_step
from models.common.scheduler import FlowMatchScheduler
from workbench.capture import CaptureSpec, Geometry, StatsProbe
from workbench.hooks import CallFilter, Probe, RecordingProbe, attach
from workbench.interventions import Identity, Intervention

C, H, W, FSL, TEXT_LEN, STEPS = 16, 4, 6, 6, 16, 5


def few_step(model, frames, *subscribers, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise, ctx = torch.randn(1, frames, C, H, W, generator=g), torch.randn(1, TEXT_LEN, 32, generator=g)
    s = FlowMatchScheduler(5.0)
    with attach(model, *subscribers):
        return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s, generator=g)


def probe_for(model, frames, **kw):
    cfg = model.config
    spec = CaptureSpec(layers=tuple(range(cfg.num_layers)), heads=tuple(range(cfg.num_heads)),
                       steps=tuple(range(STEPS)), **kw)
    return StatsProbe(spec, Geometry(1, frames, FSL, TEXT_LEN), "cpu")


# ------------------------------------------------------------------------------------------------------
# Identity: the seam itself changes nothing


@pytest.mark.parametrize("edits", [("q", "k", "v", "mask", "out"), ()], ids=["claims-every-edit", "claims-none"])
def test_identity_leaves_rollout_and_statistics_bitwise_unchanged(edits, one_thread):
    model = tiny_model(local_attn_size=6, sink_size=1)
    plain = few_step(model, 12)
    ident = Identity(edits=edits)
    assert torch.equal(few_step(model, 12, ident), plain)
    probe_plain, probe_ident = probe_for(model, 12), probe_for(model, 12)
    assert torch.equal(few_step(model, 12, probe_plain), plain)
    seen = RecordingProbe(CallFilter(layers={0}, kinds={"self"}))
    assert torch.equal(few_step(model, 12, ident, probe_ident, seen), plain)
    for name, values in probe_plain.results().items():
        np.testing.assert_array_equal(probe_ident.results()[name], values)
    assert seen.records and all(call.edits == ("identity",) for call, *_ in seen.records)  # what ran is labelled
    assert not torch.equal(few_step(model, 12, ident, seed=1), plain)  # the comparison can fail


def test_identity_on_the_masked_full_sequence_forward(one_thread):
    model = tiny_model()
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, C, 9, H, W, generator=g), torch.randn(1, TEXT_LEN, 32, generator=g)
    t, labels = torch.full((1, 9), 500.0), ForwardLabels(step=0, timestep=500.0, chunk=0, phase="train")
    plain = model(x, t, ctx, labels=labels)
    with attach(model, Identity()):
        assert torch.equal(model(x, t, ctx, labels=labels), plain)


def test_identity_through_the_rollout_graphs_warm_up(monkeypatch, one_thread):
    """The graphed rollout's first run of a shape is eager on the graphs' own cache (models/common/rollout.py); on the
    CPU that run is what can be checked: with the identity attached it equals the plain rollout bitwise, and
    the graphs it made are keyed by the intervention and hold it."""
    model = tiny_model(local_attn_size=6, sink_size=1)
    plain = few_step(model, 12)
    monkeypatch.setattr(rollout_mod, "_rollout_graphs",
                        functools.partial(rollout_mod._rollout_graphs, devices=("cpu",)))
    ident = Identity()
    assert torch.equal(few_step(model, 12, ident), plain)
    graphs = model._rollout_graphs
    assert graphs is not None and graphs.interventions == (ident,) and graphs.rollouts == 1
    assert (ident.key,) in graphs.key


def test_a_changed_intervention_makes_a_new_graph_key(one_thread):
    from models.common.rollout import _rollout_graphs

    model = tiny_model()
    noise, ctx = torch.randn(1, 6, C, H, W), torch.randn(1, TEXT_LEN, 32)
    get = lambda: _rollout_graphs(model, noise, ctx, True, "k", devices=("cpu",))  # noqa: E731
    with torch.no_grad():
        plain = get()
        ident = Identity()
        with attach(model, ident):
            first = get()
            assert first is not plain and first.interventions == (ident,) and get() is first
        assert get() is not first  # removed: graphs without it
        with attach(model, ident):
            again = get()
            assert get() is again
            ident.filter = CallFilter(layers={1})  # the same object with other settings
            changed = get()
            assert changed is not again and changed.key != again.key
        with attach(model, Identity(label="another")):
            assert get().key != changed.key
        unsafe = Identity()
        unsafe.graph_safe = False
        with attach(model, unsafe):
            assert get() is None  # an intervention that is not graph-safe turns the graphs off


# ------------------------------------------------------------------------------------------------------
# Edits are what the probes see


class ScaleHeadQ(Intervention):
    edits = frozenset({"q"})

    def edit_inputs(self, call, q, k, v):
        q = q.clone()
        q[:, :, list(self.heads)] *= 2.0  # twice the logits of these heads: a sharper softmax
        return call, q, k, v


class NegateHeadV(Intervention):
    edits = frozenset({"v"})

    def edit_inputs(self, call, q, k, v):
        v = v.clone()
        v[:, :, list(self.heads)] *= -1.0
        return call, q, k, v


class KnockOutKeyFrame(Intervention):
    """Takes key frame `frame` out of the softmax of every query frame outside its own chunk."""

    edits = frozenset({"mask"})

    def __init__(self, frame, **kw):
        super().__init__(**kw)
        self.frame = frame

    def edit_inputs(self, call, q, k, v):
        if self.frame not in call.key_frames or call.query_frames[0] // 3 == self.frame // 3:
            return call, q, k, v
        mask = torch.ones(len(call.query_frames), len(call.key_frames), dtype=torch.bool) if call.frame_mask is None \
            else call.frame_mask.clone()
        mask[:, call.key_frames.index(self.frame)] = False
        return dataclasses.replace(call, frame_mask=mask), q, k, v


class ZeroHeadOut(Intervention):
    edits = frozenset({"out"})

    def edit_output(self, call, q, k, v, out):
        out = out.clone()
        out[:, :, list(self.heads)] = 0
        return out


def test_q_edit_is_what_probes_see_and_their_statistics_follow_it(one_thread):
    model = tiny_model()
    plain = few_step(model, 9)
    edit = ScaleHeadQ(CallFilter(layers={1}, kinds={"self"}, steps={0, 2}), heads=[2], label="q x2 head 2")
    probe = probe_for(model, 9)
    seen = RecordingProbe(CallFilter(layers={1}, kinds={"self"}))
    rec = AttendRecorder(model, [1])  # the module's inputs: before the edit
    edited = few_step(model, 9, edit, probe, seen)
    rec.remove()
    assert not torch.equal(edited, plain)  # the edit reaches the output
    got = probe.results()["attn_mass"][0]  # [S, L, H, F, F]
    assert len(seen.records) == len(rec.records[1]) == 3 * STEPS
    for visit, ((q_in, k_in, _), (call, q_seen, k_seen, _)) in enumerate(zip(rec.records[1], seen.records)):
        step = visit % STEPS
        if step in (0, 2):
            assert call.edits == ("q x2 head 2",)
            assert torch.equal(q_seen[:, :, 2], q_in[:, :, 2] * 2) and torch.equal(q_seen[:, :, :2], q_in[:, :, :2])
        else:
            assert call.edits == () and torch.equal(q_seen, q_in)
        mass, _ = dense_frame_stats(q_seen, k_seen, FSL)  # float64, from what ran
        qf, kf = list(call.query_frames), list(call.key_frames)
        assert max_abs_diff(got[step, 1][:, qf][:, :, kf], mass[0].numpy()) <= 1e-6
    unedited, _ = dense_frame_stats(*rec.records[1][0][:2], FSL)
    assert np.abs(got[0, 1][2, :3, :3] - unedited[0, 2].numpy()).max() > 1e-3  # the probe did not see q_in


def test_mask_edit_is_what_probes_see(one_thread):
    model = tiny_model()
    plain = few_step(model, 9)
    edit = KnockOutKeyFrame(0, filter=CallFilter(kinds={"self"}), label="no frame 0")
    probe = probe_for(model, 9, stats=("attn_mass", "attn_logit", "attn_frame_entropy"))
    seen = RecordingProbe(CallFilter(layers={0}, kinds={"self"}))
    edited = few_step(model, 9, edit, probe, seen)
    assert not torch.equal(edited, plain)
    r = probe.results()
    mass = r["attn_mass"][0]
    assert np.isnan(mass[:, :, :, 3:, 0]).all() and not np.isnan(mass[:, :, :, :3, 0]).any()
    np.testing.assert_allclose(np.nansum(mass, -1), 1.0, atol=1e-5)  # renormalised over the other frames
    for call, q, k, _ in seen.records:
        chunk = call.query_frames[0] // 3
        assert (call.frame_mask is None) == (chunk == 0)
        if chunk:
            assert call.edits == ("no frame 0",) and not call.frame_mask[:, 0].any()
            want, _ = dense_frame_stats(q, k, FSL, frame_mask=call.frame_mask)
            got = mass[call.labels.step, 0][:, list(call.query_frames)][:, :, list(call.key_frames)]
            assert max_abs_diff(got, want[0].numpy()) <= 1e-6


def test_observers_are_refused_beside_a_knockout_of_some_heads(one_thread):
    """Those heads are recomputed with a mask the call (one mask for all heads) does not carry: a statistics probe
    would read the call's mask, so the knocked-out heads' mass showed the frames they never saw. Refused, naming
    why; an observer of the output alone still sees it (tests/test_intervention_kinds.py), and the knockout of all
    heads (the call's own mask) is captured as it ran (test_mask_edit_is_what_probes_see)."""
    from models.errors import ModelInputError
    from workbench.interventions import KeyFrameKnockout

    model = tiny_model()
    partial = KeyFrameKnockout([0], CallFilter(layers={0}), heads=[1])
    assert few_step(model, 6, partial).shape[1] == 6  # (unobserved, it runs)
    with pytest.raises(ModelInputError, match="statistics would read the mask, not those heads'"):
        few_step(model, 6, partial, probe_for(model, 6))


def test_v_and_head_output_edits_are_what_probes_see(one_thread):
    model = tiny_model()
    plain = few_step(model, 6)
    outs = []
    watch = Probe(CallFilter(layers={0}, kinds={"self"}, steps={0}, chunks={0}),  # inputs the edits do not reach
                  fn=lambda call, q, k, v, out, lse: outs.append((call.edits, v.clone(), out.clone())))
    base = []
    few_step(model, 6, Probe(watch.filter, fn=lambda call, q, k, v, out, lse: base.append((v.clone(), out.clone()))))
    negate = NegateHeadV(CallFilter(layers={0}, kinds={"self"}), heads=[1], label="-v head 1")
    zero = ZeroHeadOut(CallFilter(layers={0}, kinds={"self"}), heads=[3], label="zero head 3")
    edited = few_step(model, 6, negate, zero, watch)
    assert not torch.equal(edited, plain)
    assert len(outs) == len(base) == 1
    for (edits, v, out), (v0, out0) in zip(outs, base):
        assert edits == ("-v head 1", "zero head 3")  # in the order they ran
        assert torch.equal(v[:, :, 1], -v0[:, :, 1]) and torch.equal(v[:, :, 0], v0[:, :, 0])
        assert (out[:, :, 3] == 0).all() and not (out0[:, :, 3] == 0).all()
        torch.testing.assert_close(out[:, :, 1], -out0[:, :, 1], rtol=0, atol=1e-6)  # softmax(qk) (-v) = -out
        assert torch.equal(out[:, :, 0], out0[:, :, 0])


class ScaleHeadSlice(Intervention):
    """q of heads [first, last) times 2, by slicing (no index tensor made per call: graph-safe)."""

    edits = frozenset({"q"})

    def edit_inputs(self, call, q, k, v):
        q = q.clone()
        q[:, :, self.heads[0]:self.heads[-1] + 1] *= 2.0
        return call, q, k, v


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_graphed_rollout_with_interventions_equals_eager():
    """bf16 on the GPU, eviction on: with the identity (and a probe) the graphed rollouts (warm-up, record,
    replay) equal the plain eager rollout bitwise; with a q edit they equal the edited eager rollout bitwise and
    differ from the plain one; graphs are recorded per forward (keyed by labels) while interventions are attached."""
    model = tiny_model(local_attn_size=6, sink_size=1).cuda().to(torch.bfloat16)
    s = FlowMatchScheduler(5.0)

    def run(graphs, *subscribers):
        g = torch.Generator(device="cuda").manual_seed(0)
        noise = torch.randn(1, 12, C, H, W, generator=g, device="cuda").to(torch.bfloat16)
        ctx = torch.randn(1, TEXT_LEN, 32, generator=g, device="cuda").to(torch.bfloat16)
        for sub in subscribers:
            if hasattr(sub, "reset"):
                sub.reset()
        with attach(model, *subscribers):
            return causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s,
                                   generator=g, cuda_graphs=graphs)

    plain = run(False)
    ident = Identity()
    spec = CaptureSpec(layers=(0, 1), heads=(0, 1, 2, 3), steps=tuple(range(STEPS)))
    probe = StatsProbe(spec, Geometry(1, 12, FSL, TEXT_LEN), "cuda", mode="exact")
    for _ in range(3):
        assert torch.equal(run(True, ident, probe), plain)
    assert model._rollout_graphs.interventions == (ident,) and len(model._rollout_graphs.graphs) == 4 * STEPS
    edit = ScaleHeadSlice(CallFilter(layers={1}, kinds={"self"}), heads=[2], label="q x2 head 2")
    eager_edit = run(False, edit)
    assert not torch.equal(eager_edit, plain)
    for _ in range(3):
        assert torch.equal(run(True, edit), eager_edit)


def test_a_filter_or_an_edit_aimed_at_nothing_is_refused():
    """CallFilter(kinds="self") means {"self"} (not the letters s, e, l, f, which matched no call and made an
    edit change nothing); a layer given as a string, an unknown kind or phase, and layers or heads the model lacks
    are named when the filter is made or the edit attached."""
    from models.errors import ModelInputError
    from workbench.hooks import CallFilter, attach
    from workbench.interventions import HeadAblation

    assert CallFilter(kinds="self", layers=3).kinds == {"self"} and CallFilter(layers=3).layers == {3}
    for kw, message in [(dict(layers="3"), r"layers: \['3'\] not allowed"), (dict(kinds={"slef"}), "one of"),
                        (dict(phases={"denoising"}), r"\['denoising'\] not allowed; give one of \['denoise'")]:
        with pytest.raises(ModelInputError, match=message):
            CallFilter(**kw)
    model = tiny_model()  # 2 layers of 4 heads
    for edit, message in [(HeadAblation(CallFilter(layers={99}), heads=[0]), r"layers \[99\] out of range"),
                          (HeadAblation(CallFilter(layers={1}), heads=[7]), r"heads \[7\] out of range")]:
        with pytest.raises(ModelInputError, match=message):
            with attach(model, edit):
                pass
    assert not model.interventions  # nothing left attached


def test_steps_chunks_and_frames_the_rollout_lacks_are_refused_before_its_first_forward(one_thread):
    """Steps, chunks, phases, CFG branches and key frames depend on the run, not the model: the sampler hands
    each attached probe and intervention the run's extent before its first forward, and a selection the run lacks
    (a 12-frame few-step rollout: steps 0-4, chunks 0-3, frames 0-11, no CFG) is refused naming it, with no
    forward run; selections inside the run go through, and change the video as before."""
    from models.errors import ModelInputError
    from workbench.interventions import HeadAblation, KeyFrameKnockout, SinkScaling

    model = tiny_model(local_attn_size=6, sink_size=1)
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    for sub, message in [
            (KeyFrameKnockout([25]), r"knockout:25: frames \[25\] not in this rollout, whose frames are 0-11: it "
                                     "would change nothing there"),
            (SinkScaling(0.5, frames=[0, 12]), r"frames \[12\] not in this rollout"),
            (HeadAblation(CallFilter(layers={1}, steps={5}), heads=[0]), r"steps \[5\] not in this rollout, whose "
                                                                         "steps are 0-4"),
            (HeadAblation(CallFilter(chunks={4}), heads=[0]), r"chunks \[4\] not in .* chunks are 0-3"),
            (HeadAblation(CallFilter(cfgs={"uncond"}), heads=[0]), r"cfgs \['uncond'\] not in .* cfgs are none"),
            (Probe(CallFilter(steps={0, 7})), r"Probe: steps \[7\] not in this rollout, .* would see nothing"),
            (RecordingProbe(CallFilter(phases={"train"})), r"phases \['train'\] not in .* phases are context, "
                                                           "denoise"),
            (probe_for(model, 21), "StatsProbe: made for 21 latent frames .* but this rollout has 12"),
            (StatsProbe(CaptureSpec(layers=(0,), heads=(0,), steps=(0, 5)), Geometry(1, 12, FSL, TEXT_LEN), "cpu"),
             r"StatsProbe: steps \[5\] not in this rollout")]:
        with pytest.raises(ModelInputError, match=message):
            few_step(model, 12, sub)
        assert not forwards and not model.interventions and not model.observers
    # each value in the run, never together: the last chunk's context pass without last_context_pass, and the
    # denoising of an image-to-video run's chunk 0 (the image: its context pass only)
    s, g = FlowMatchScheduler(5.0), torch.Generator().manual_seed(0)
    noise, ctx = torch.randn(1, 12, C, H, W, generator=g), torch.randn(1, TEXT_LEN, 32, generator=g)
    late = HeadAblation(CallFilter(chunks={3}, phases={"context"}), heads=[0])
    with pytest.raises(ModelInputError, match=r"chunks \[3\], phases \['context'\] select no forward of this rollout "
                                              r"\(chunk 3: denoise step\(s\) 0-3\): it would change nothing"):
        with attach(model, late):
            causal_few_step(model, noise, ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s,
                            last_context_pass=False)
    image = tiny_model()
    image.independent_first_frame = True
    image.register_forward_pre_hook(lambda *a: forwards.append(1))
    with pytest.raises(ModelInputError, match=r"chunks \[0\], steps \[0\] select no forward .*\(chunk 0: context "
                                              r"step\(s\) 4\)"):
        with attach(image, Probe(CallFilter(chunks={0}, steps={0}))):
            causal_few_step(image, noise[:, :7], ctx, timesteps=s.warp([1000, 750, 500, 250]), scheduler=s,
                            initial_latent=noise[:, :1])
    assert not forwards and not model.interventions and not image.observers
    plain = few_step(model, 12)
    forwards.clear()
    inside = [KeyFrameKnockout([0], history_only=True), HeadAblation(CallFilter(steps={4}, chunks={2}), heads=[0])]
    for sub in inside:
        assert not torch.equal(few_step(model, 12, sub), plain), sub.label
    assert forwards


# ------------------------------------------------------------------------------------------------------
# Extensions written wrong are refused, naming the intervention, before they change anything silently


class _InPlaceKeys(Intervention):  # (k may be the KV cache's own memory)
    edits = frozenset({"k"})

    def edit_inputs(self, call, q, k, v):
        k.mul_(2)
        return call, q, k, v


class _FirstFrameDropped(Intervention):  # (key frames go with the call's mask, not by slicing)
    edits = frozenset({"k", "v"})

    def edit_inputs(self, call, q, k, v):
        return call, q, k[:, call.frame_seq_len:], v[:, call.frame_seq_len:]


class _HalfOutput(Intervention):
    edits = frozenset({"out"})

    def edit_output(self, call, q, k, v, out):
        return out[:, : out.shape[1] // 2]


class _NoEditsListed(Intervention):  # (edits left at the class default: attend would never call edit_output)
    def edit_output(self, call, q, k, v, out):
        return out.flip(2)


def test_a_wrongly_written_intervention_is_refused_by_name(one_thread):
    """An edit in place of k or v (the KV cache's memory: every later call would read the changed keys), edited
    shapes (a key frame sliced away: observers read the call's key frames), an output of another shape, an
    intervention listing no edit, and an object that is neither probe nor intervention: each a ModelInputError
    naming it, the first three at the first call they edit (the rollout stops there), the last two at attach."""
    from models.errors import ModelInputError

    model = tiny_model(local_attn_size=6, sink_size=1)
    plain = few_step(model, 6)
    layer1 = CallFilter(layers={1}, kinds={"self"})
    for iv, message in ((_InPlaceKeys(layer1, label="keys x2"), "'keys x2': edit_inputs changed k in place"),
                        (_FirstFrameDropped(layer1, label="drop"), "'drop': edit_inputs returned as k a tensor"),
                        (_HalfOutput(layer1, label="half"), "'half': edit_output returned a tensor of shape")):
        with pytest.raises(ModelInputError, match=message):
            few_step(model, 6, iv)
    assert torch.equal(few_step(model, 6), plain)  # (nothing kept from the refused runs)
    with pytest.raises(ModelInputError, match="flip: overrides edit_output but its edits \\[\\] name nothing"):
        few_step(model, 6, _NoEditsListed(layer1, label="flip"))

    class Duck:
        def wants(self, call):
            return True

    with pytest.raises(ModelInputError, match="Duck: neither a probe .* nor an intervention"):
        few_step(model, 6, Duck())
