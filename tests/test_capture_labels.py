"""What a capture is labelled with and what it refuses (workbench/capture.py, workbench/hooks.py, the rollouts'
labels in models/common/rollout.py): one timestep per step, the context pass's real timestep, the steps that missed a
query frame, a probe's heads in its order, filters on rollout labels, layers and heads one past the last, and the
CFG branch of each call. CPU only, tiny model."""

import numpy as np
import pytest
import torch

from conftest import tiny_model
from models.common.attention import AttentionCall, ForwardLabels
from models.common.rollout import causal_few_step, causal_multi_step, few_step_schedule, multistep_schedule
from models.common.scheduler import FlowMatchScheduler
from models.errors import ModelInputError
from workbench.capture import CaptureSpec, Geometry, StatsProbe
from workbench.errors import WorkbenchError
from workbench.hooks import CallFilter, Probe, attach

C, H, W = 16, 4, 6  # 2 x 3 = 6 tokens per frame
FSL, TEXT_LEN = 6, 16
STEPS = [1000, 750, 500, 250]  # the released few-step list, before the shift


def _rollout(model, probe, frames=6, image=False, steps=STEPS, **kw) -> torch.Tensor:
    """A seeded few-step rollout of `model` with `probe` attached (image: frame 0 given, image-to-video); returns
    its timesteps."""
    g = torch.Generator().manual_seed(0)
    noise, ctx = torch.randn(1, frames, C, H, W, generator=g), torch.randn(1, TEXT_LEN, 32, generator=g)
    initial = torch.randn(1, 1, C, H, W, generator=g) if image else None
    s = FlowMatchScheduler(5.0)
    timesteps = s.warp(steps)
    with attach(model, probe):
        causal_few_step(model, noise, ctx, timesteps=timesteps, scheduler=s, generator=g, initial_latent=initial, **kw)
    return timesteps


def test_probe_refuses_one_step_at_two_timesteps():
    """A store has one timestep per step: an image-to-video rollout with context_noise runs the image's context
    pass (step 4) at t = 0 and the later chunks' at context_noise, and a probe attached to it refuses that,
    naming both timesteps, instead of storing two timesteps' attention under one `timestep(step)`."""
    model = tiny_model()
    model.independent_first_frame = True
    probe = StatsProbe(CaptureSpec(layers=(0,), heads=(0,), steps=(4,)), Geometry(1, 7, FSL, TEXT_LEN), "cpu")
    with pytest.raises(WorkbenchError, match=r"step 4 ran at timestep 100.0 in chunk 1 but at 0.0 before.*one "
                                             r"timestep per step"):
        _rollout(model, probe, frames=7, image=True, context_noise=100.0)
    # the same rollout at context_noise 0 is one timestep per step and passes
    probe.reset()
    _rollout(model, probe, frames=7, image=True, context_noise=0.0)
    assert probe.timesteps == {4: 0.0} and not probe.missing_steps(7)


def test_missing_steps_names_a_step_that_missed_a_single_frame():
    """`missing_steps` (the check `capture_sample` runs before a sample is stored) names every (kind, step, layer)
    that missed any query frame, even one: image-to-video never denoises frame 0, so its denoising steps miss
    exactly that frame (NaN rows in a store) unless the check starts at frame 1."""
    model = tiny_model()
    model.independent_first_frame = True
    probe = StatsProbe(CaptureSpec(layers=(0, 1), heads=(0,), steps=(0, 3, 4)), Geometry(1, 7, FSL, TEXT_LEN), "cpu")
    _rollout(model, probe, frames=7, image=True)
    assert sorted(probe.missing_steps(7)) == [("self", s, l) for s in (0, 3) for l in (0, 1)]
    assert probe.missing_steps(7, from_frame=1) == []
    assert np.isnan(probe.results()["attn_mass"][0, 0, :, :, 0]).all()  # what the check guards: frame 0's rows


def test_missing_steps_of_a_cross_attention_only_capture():
    """A capture of cross-attention statistics alone (`--stats cross_mass`) checks the cross-attention calls:
    a complete rollout has nothing missing, and one that skipped a forward names its cross-attention step."""
    model = tiny_model()
    spec = CaptureSpec(layers=(1,), heads=(0, 2), steps=(0, 4), stats=("cross_mass",))
    probe = StatsProbe(spec, Geometry(1, 6, FSL, TEXT_LEN), "cpu")
    _rollout(model, probe)
    assert probe.missing_steps(6) == []
    assert not np.isnan(probe.results()["cross_mass"]).any()
    probe.reset()
    _rollout(model, probe, last_context_pass=False)  # the last chunk's context pass skipped: step 4 misses frames 3-5
    assert probe.missing_steps(6) == [("cross", 4, 1)]


def test_reset_forgets_the_timesteps_of_the_last_rollout():
    """`reset()` forgets the last rollout entirely, its steps' timesteps included: a probe kept for a series of
    rollouts of one shape captures a rollout on another denoising schedule after a reset (and records its
    timesteps), where without the reset it refuses it."""
    model = tiny_model()
    probe = StatsProbe(CaptureSpec(layers=(0,), heads=(1,), steps=(0, 1, 4)), Geometry(1, 6, FSL, TEXT_LEN), "cpu")
    for steps in (STEPS, [1000, 500, 400, 300]):
        probe.reset()
        timesteps = _rollout(model, probe, steps=steps)
        assert probe.timesteps == {0: float(timesteps[0]), 1: float(timesteps[1]), 4: 0.0}
        assert probe.missing_steps(6) == []


def test_a_probe_gets_its_heads_in_the_order_it_named_them():
    """`Probe(heads=...)` hands its function exactly the named heads in the named order, also when they are all of
    the model's heads in another order (q, k, v, out on dim 2 and lse on dim 1 alike)."""
    model = tiny_model()
    seen = {}

    def keep(name):
        def fn(call, q, k, v, out, lse):
            seen[name] = (q.clone(), k.clone(), out.clone(), lse.clone())
        return fn

    order = [3, 1, 2, 0]
    probes = [Probe(CallFilter(layers={1}, kinds={"self"}, steps={0}), heads=None, fn=keep("all"), needs_lse=True),
              Probe(CallFilter(layers={1}, kinds={"self"}, steps={0}), heads=order, fn=keep("named"), needs_lse=True)]
    x, ctx = torch.randn(1, C, 3, H, W, generator=torch.Generator().manual_seed(0)), torch.randn(1, TEXT_LEN, 32)
    with attach(model, *probes):
        model(x, torch.full((1,), 1000.0), ctx, labels=ForwardLabels(step=0, timestep=1000.0, chunk=0))
    (q, k, out, lse), (qn, kn, outn, lsen) = seen["all"], seen["named"]
    for a, b in ((q, qn), (k, kn), (out, outn)):
        assert torch.equal(b, a[:, :, order])
    assert torch.equal(lsen, lse[:, order])
    assert not torch.equal(qn, q)  # (the heads differ, so the order shows)


def test_the_context_pass_is_labelled_with_the_timestep_it_ran_at():
    """The few-step schedule labels its context pass (the store's last `step`) with the context_noise the DiT
    sees there, and the probe records that timestep for the step: with context_noise 100 the store's
    `timestep(4)` is 100, not 0."""
    timesteps = FlowMatchScheduler(5.0).warp(STEPS)
    labels = few_step_schedule(timesteps, 100.0)
    assert [(l.step, l.phase, l.denoise_index) for l in labels] == [(0, "denoise", 0), (1, "denoise", 1),
                                                                    (2, "denoise", 2), (3, "denoise", 3),
                                                                    (4, "context", -1)]
    assert [l.timestep for l in labels] == [float(t) for t in timesteps] + [100.0]
    model = tiny_model()
    seen = []
    forward = model.forward

    def spy(x, t, *args, **kw):  # what the DiT really saw, beside its label
        seen.append((kw["labels"].step, float(t.flatten()[0]), kw["labels"].timestep))
        return forward(x, t, *args, **kw)

    model.forward = spy
    probe = StatsProbe(CaptureSpec(layers=(0,), heads=(0,), steps=(4,)), Geometry(1, 6, FSL, TEXT_LEN), "cpu")
    _rollout(model, probe, context_noise=100.0)
    assert all(t == label for _, t, label in seen) and (4, 100.0, 100.0) in seen
    assert probe.timesteps == {4: 100.0}


def test_a_step_filter_never_matches_a_call_without_rollout_labels():
    """CallFilter: a call without rollout labels (a plain forward) matches only a filter that leaves steps,
    chunks, phases and cfgs open; a filter on any of them does not see it."""
    unlabelled = AttentionCall(layer=0, kind="self", labels=None, query_frames=(0,), key_frames=(0,), frame_seq_len=FSL,
                               grid=(2, 3))
    labelled = AttentionCall(layer=0, kind="self", labels=ForwardLabels(step=0, timestep=1000.0, chunk=0),
                             query_frames=(0,), key_frames=(0,), frame_seq_len=FSL, grid=(2, 3))
    assert CallFilter(layers={0}).matches(unlabelled)
    for field in (dict(steps={0}), dict(chunks={0}), dict(phases={"denoise"}), dict(cfgs={"none"})):
        assert CallFilter(**field).matches(labelled), field
        assert not CallFilter(**field).matches(unlabelled), field


def test_a_probe_on_a_layer_or_head_one_past_the_last_is_refused():
    """attach refuses a probe whose layers or heads the model does not have, the first one past the end included
    (a probe on layer num_layers would capture nothing, silently)."""
    model = tiny_model()
    L, Hh = model.config.num_layers, model.config.num_heads
    with pytest.raises(ModelInputError, match=rf"layers \[{L}\] out of range"):
        with attach(model, Probe(CallFilter(layers={L}))):
            pass
    with pytest.raises(ModelInputError, match=rf"heads \[{Hh}\] out of range"):
        with attach(model, Probe(heads=[Hh])):
            pass
    with attach(model, Probe(CallFilter(layers={L - 1}), heads=[Hh - 1])):  # the last ones are fine
        pass


def test_multi_step_calls_carry_their_cfg_branch_and_chunk():
    """The multi-step CFG sampler labels each attention call with the branch that made it (a probe or intervention
    filtering on `cfg` sees only that branch's calls) and with the chunk it denoises."""
    model = tiny_model()
    seen = []
    probe = Probe(CallFilter(layers={0}, kinds={"self"}), fn=lambda call, *tensors: seen.append(call.labels))
    g = torch.Generator().manual_seed(0)
    noise, ctx = torch.randn(1, 6, C, H, W, generator=g), torch.randn(1, TEXT_LEN, 32, generator=g)
    with attach(model, probe):
        causal_multi_step(model, noise, ctx, torch.zeros_like(ctx), steps=2, solver="euler")
    got = [(l.chunk, l.step, l.phase, l.cfg) for l in seen]
    per_chunk = [(0, "denoise", "cond"), (1, "denoise", "uncond"), (2, "denoise", "cond"), (3, "denoise", "uncond"),
                 (4, "context", "cond"), (5, "context", "uncond")]
    assert got == [(chunk, *rest) for chunk in (0, 1) for rest in per_chunk]


def test_multistep_context_passes_are_no_denoising_step():
    """Two solver steps with CFG and a context pass: steps 0-3 denoise (denoise_index 0, 0, 1, 1), steps 4-5 are
    the context passes of each branch at t = 0 with denoise_index -1; without CFG, the branch is "none"."""
    labels = multistep_schedule([900.0, 400.0], True, True)
    assert [(l.step, l.phase, l.cfg, l.denoise_index, l.timestep) for l in labels] == [
        (0, "denoise", "cond", 0, 900.0), (1, "denoise", "uncond", 0, 900.0),
        (2, "denoise", "cond", 1, 400.0), (3, "denoise", "uncond", 1, 400.0),
        (4, "context", "cond", -1, 0.0), (5, "context", "uncond", -1, 0.0)]
    plain = multistep_schedule([900.0, 400.0], False, True)
    assert [(l.cfg, l.denoise_index) for l in plain] == [("none", 0), ("none", 1), ("none", -1)]
