"""workbench/interventions.py: the chosen heads (and only they) are edited, each layer's mean goes to that layer, a
resample takes the same CFG branch's output, the settings that change the effect change the graph key, and
interventions that would edit nothing or make NaNs are refused."""

import pytest
import torch

from conftest import tiny_model
from models.common.attention import AttentionCall
from models.common.labels import ForwardLabels
from models.errors import ModelInputError
from test_interventions import few_step
from workbench.hooks import CallFilter, Probe
from workbench.interventions import HeadAblation, HeadOutputs, HeadTemperature, Intervention, SinkScaling


def first_call_out(model, *edits, layer=1):
    """out [B, Lq, H, D] of `layer`'s first self-attention call (chunk 0, step 0: its inputs are the baseline's
    whatever the edits of this layer do) as the edits left it."""
    outs = []
    watch = Probe(CallFilter(layers={layer}, kinds={"self"}, steps={0}, chunks={0}),
                  fn=lambda call, q, k, v, out, lse: outs.append(out.clone()))
    few_step(model, 3, *edits, watch)
    assert len(outs) == 1
    return outs[0]


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_a_head_ablation_replaces_the_chosen_head_only(mode, one_thread):
    """Ablating head 2 of layer 1 replaces head 2's output (by 0, or by its own recorded mean, not head 0's) and
    leaves every other head's output bitwise as it ran."""
    model = tiny_model()
    base = first_call_out(model)
    ref = HeadOutputs(CallFilter(layers={1}, kinds={"self"}))
    few_step(model, 3, ref, seed=3)
    means = ref.mean()
    ablation = HeadAblation(CallFilter(layers={1}, kinds={"self"}), heads=[2], mode=mode,
                            source=None if mode == "zero" else means)
    out = first_call_out(model, ablation)
    want = torch.zeros_like(out[:, :, 2]) if mode == "zero" else means[(1, "self")][2].expand_as(out[:, :, 2])
    torch.testing.assert_close(out[:, :, 2], want, rtol=0, atol=1e-6)
    assert not torch.allclose(means[(1, "self")][2], means[(1, "self")][0])  # (head 0's mean would be another)
    for h in (0, 1, 3):
        assert torch.equal(out[:, :, h], base[:, :, h])


def test_a_mean_ablation_of_several_layers_writes_each_layers_own_mean(one_thread):
    """A "mean" ablation acting on layers 0 and 1 writes layer 0's mean in layer 0 and layer 1's in layer 1 (the
    mean held per layer, not the first layer's for all)."""
    model = tiny_model()
    ref = HeadOutputs(CallFilter(kinds={"self"}))
    few_step(model, 3, ref, seed=3)
    means = ref.mean()
    assert not torch.allclose(means[(0, "self")][0], means[(1, "self")][0])
    ablation = HeadAblation(CallFilter(kinds={"self"}), heads=[0], mode="mean", source=means)
    outs = {}
    watch = Probe(CallFilter(kinds={"self"}),
                  fn=lambda call, q, k, v, out, lse: outs.setdefault(call.layer, out.clone()))
    few_step(model, 3, ablation, watch)
    for layer in (0, 1):
        torch.testing.assert_close(outs[layer][0, :, 0], means[(layer, "self")][0].expand(outs[layer].shape[1], -1),
                                   rtol=0, atol=1e-6)


def test_a_resample_takes_the_same_cfg_branchs_output():
    """Under classifier-free guidance the cond and uncond forwards of a step are two calls: a "resample" ablation of
    the cond call writes the source's cond output, not its uncond one (the call key holds the branch)."""
    def call(cfg):
        return AttentionCall(layer=1, kind="self", labels=ForwardLabels(0, 500.0, 0, "denoise", cfg, 0),
                             query_frames=(0,), key_frames=(0,), frame_seq_len=2, grid=(1, 2), num_heads=2, head_dim=4)

    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 2, 2, 4, generator=g), torch.randn(1, 2, 2, 4, generator=g)
    source = HeadOutputs()
    source.observe(call("cond"), None, None, None, cond, None)
    source.observe(call("uncond"), None, None, None, uncond, None)
    ablation = HeadAblation(heads=[0], mode="resample", source=source)
    out = ablation.edit_output(call("cond"), None, None, None, torch.zeros(1, 2, 2, 4))
    assert torch.equal(out[:, :, 0], cond[:, :, 0]) and torch.equal(out[:, :, 1], torch.zeros(1, 2, 4))


def test_settings_that_change_the_effect_change_the_graph_key():
    """Two graph-safe interventions of one label that differ in a setting (heads, a temperature, a sink factor) have
    different keys: a rollout's recorded CUDA graphs, keyed by them, are not replayed with the other's effect."""
    f = CallFilter(layers={1})
    assert HeadAblation(f, heads=[0], label="x").key != HeadAblation(f, heads=[1], label="x").key
    assert HeadTemperature(2.0, f, heads=[0], label="x").key != HeadTemperature(3.0, f, heads=[0], label="x").key
    assert SinkScaling(2.0, label="x").key != SinkScaling(0.5, label="x").key


def test_a_temperature_of_zero_is_refused():
    """T = 0 would scale q by 1/0 (inf logits, NaN video): refused when the intervention is made, as T < 0 is."""
    for t in (0.0, -1.0):
        with pytest.raises(ValueError, match="positive"):
            HeadTemperature(t)


def test_an_edit_output_without_out_in_edits_is_refused_at_attach(one_thread):
    """An intervention overriding only edit_output whose edits omit "out" (attend would never call it, while
    call.edits recorded it) is refused at attach, naming it."""
    class ZeroOut(Intervention):
        edits = frozenset({"q"})

        def edit_output(self, call, q, k, v, out):
            return out * 0

    with pytest.raises(ModelInputError, match="zero-out: overrides edit_output .* no out"):
        few_step(tiny_model(), 3, ZeroOut(label="zero-out"))
