"""workbench/intervene_entries.py and workbench/intervene.py: the bounds an entry is checked against are exclusive,
an entry that would edit nothing is refused when read, the built intervention acts on the calls the entry names (its
attention kind, steps, chunks, heads, history_only), "baseline" is no entry's label, the relative latent distance is
to the baseline's RMS, a resample_seed of 0 is a seed, a policy that evicts nothing or runs under another sampler is
refused, static heads are checked, a sink or temperature needs its value, default labels name what differs, an entry
on several heads has no single target, and a --temperature flag is that temperature."""

import numpy as np
import pytest
import torch
import xarray as xr

from workbench.errors import WorkbenchError
from workbench.extract import ExtractConfig
from workbench.hooks import CallFilter
from workbench.intervene import latent_distance, run_intervene
from workbench.intervene_entries import Entry, build, check_entries, parse_entry, parse_flag


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Tiny models run fastest on one thread."""


ROLLOUT = dict(num_frames=21, num_steps=5, num_chunks=7, chunk_frames=3, first_chunk_frames=3)


def test_the_first_value_past_each_bound_is_refused():
    """Layer 6 of 6 layers, head 4 of 4 heads, step 5 of 5 and chunk 7 of 7 are refused when the entry is read (a
    filter on a step or chunk the rollout lacks would match no call: the entry would change nothing)."""
    for d, message in [(dict(kind="ablate", layers=6), r"layer \[6\] out of range"),
                       (dict(kind="ablate", heads=4), r"head \[4\] out of range"),
                       (dict(kind="ablate", steps=5), r"step \[5\] out of range"),
                       (dict(kind="ablate", chunks=7), r"chunk \[7\] out of range")]:
        with pytest.raises(WorkbenchError, match=message):
            parse_entry(d, 6, 4, **ROLLOUT)
    e = parse_entry(dict(kind="ablate", layers=5, heads=3, steps=4, chunks=6), 6, 4, **ROLLOUT)
    assert (e.layers, e.heads, e.steps, e.chunks) == ([5], [3], [4], [6])


def test_key_frame_entries_on_cross_attention_or_the_last_chunks_start_are_refused():
    """A knockout or sink entry on cross-attention (no key frames) and a history-only one of the frame the last
    chunk starts at (no later chunk sees it) would edit no call: refused, naming why."""
    for kind in ("knockout", "sink"):
        with pytest.raises(WorkbenchError, match="attention must be self"):
            parse_entry(dict(kind=kind, frames=0, value=2, attention="cross"), 6, 4, **ROLLOUT)
    with pytest.raises(WorkbenchError, match="changes nothing"):
        parse_entry(dict(kind="knockout", frames=18), 6, 4, **ROLLOUT)
    assert parse_entry(dict(kind="knockout", frames=17), 6, 4, **ROLLOUT).frames == [17]


def test_the_built_intervention_acts_on_the_calls_its_entry_names():
    """build() hands the entry's layers, attention kind, steps, chunks, heads and history_only to the intervention
    (a history-only knockout or sink that ran in every call would change the frames' own chunk too)."""
    want = CallFilter(layers={2}, kinds={"self"}, steps={1}, chunks={3})
    for d in (dict(kind="ablate"), dict(kind="temperature", value=2), dict(kind="knockout", frames=1),
              dict(kind="sink", value=2, frames=1)):
        e = parse_entry(dict(d, layers=2, heads=[0, 3], steps=1, chunks=3), 6, 4, **ROLLOUT)
        iv = build(e, {})
        assert iv.filter == want and iv.heads == (0, 3) and iv.label == e.label, e.label
        if d["kind"] in ("knockout", "sink"):
            assert iv.history_only is True
            assert build(parse_entry(dict(d, history_only=False), 6, 4, **ROLLOUT), {}).history_only is False


def test_baseline_is_no_entrys_label():
    """An entry labelled "baseline" would be written over the store's reference: refused."""
    with pytest.raises(WorkbenchError, match="'baseline'"):
        check_entries([Entry(kind="ablate", label="baseline")], "causal_few_step")


def test_the_relative_latent_distance_is_to_the_baselines_rms():
    """latent_distance_rel = RMS(x - base) / RMS(base) per frame (not the entry's own RMS, not 1)."""
    base = torch.ones(1, 2, 1, 2, 2) * torch.tensor([1.0, 2.0]).view(1, 2, 1, 1, 1)
    x = base * 3
    dist, rel = latent_distance(x, base)
    np.testing.assert_allclose(dist, [2.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(rel, [2.0, 2.0], rtol=1e-6)


def test_a_resample_seed_of_zero_is_that_seed(tmp_path):
    """resample_seed 0 takes the source from seed 0, not from the sample's own seed (which, with the same prompt,
    would be the baseline bitwise)."""
    prompt = "a red square moving right"
    cfg = ExtractConfig(prompts=[prompt], seeds=[1], num_frames=3, out=str(tmp_path / "fx.zarr"), progress=False)
    spec = dict(kind="ablate", layers=1, heads=0, mode="resample", resample_prompt=prompt)
    run_intervene(cfg, [dict(spec, resample_seed=0, label="seed0"), dict(spec, resample_seed=1, label="own")],
                  world="off", log=lambda *a: None)
    d = xr.open_zarr(tmp_path / "fx.zarr", consolidated=False).latent_distance
    assert float(d.sel(intervention="own").max()) == 0 and float(d.sel(intervention="seed0").max()) > 0


def test_a_cross_attention_entrys_default_label_says_cross():
    """The default label of an entry on cross-attention names it (`.cross`): the store's label of a cross-attention
    ablation is not that of the self-attention one of the same layer and head."""
    cross = parse_entry(dict(kind="ablate", layers=1, heads=0, attention="cross"), 6, 4)
    assert cross.label == "ablate-zero:L1.H0.cross"
    assert parse_entry(dict(kind="ablate", layers=1, heads=0), 6, 4).label == "ablate-zero:L1.H0"


def test_a_policy_whose_window_holds_every_frame_is_refused():
    """A fifo or sink window of exactly the rollout's 21 frames never evicts a frame: the entry would be the
    baseline under a policy's label; refused. One frame less is a policy."""
    for policy, sink in (("fifo", 0), ("sink", 3)):
        with pytest.raises(WorkbenchError, match="all 21 frames of the rollout fit"):
            parse_entry(dict(kind="policy", policy=policy, window=21, sink_frames=sink), 6, 4, **ROLLOUT)
        kept = parse_entry(dict(kind="policy", policy=policy, window=20, sink_frames=sink), 6, 4, **ROLLOUT)
        assert kept.window == 20


def test_a_cache_policy_under_another_sampler_is_refused():
    """Cache policies run with the causal_few_step sampler only: with another one the entry is refused."""
    entries = [Entry(kind="policy", label="p", policy="fifo", window=6)]
    check_entries(entries, "causal_few_step")
    with pytest.raises(WorkbenchError, match="causal_few_step sampler only"):
        check_entries(entries, "causal_multi_step")


def test_static_heads_past_the_last_head_or_on_another_kind_are_refused():
    """static_heads [0, 4] of a model of 4 heads names no head (refused, as [6, 0] is); static_heads on an ablate
    entry would be ignored (refused)."""
    for pairs in ([[0, 4]], [[6, 0]]):
        with pytest.raises(WorkbenchError, match="out of range"):
            parse_entry(dict(kind="policy", policy="headwise", window=9, static_heads=pairs), 6, 4)
    assert parse_entry(dict(kind="policy", policy="headwise", window=9, static_heads=[[5, 3]]), 6, 4).static_heads \
        == [[5, 3]]
    with pytest.raises(WorkbenchError, match="headwise policy's setting"):
        parse_entry(dict(kind="ablate", layers=1, heads=0, static_heads=[[1, 0]]), 6, 4)


def test_a_sink_or_temperature_without_its_value_is_refused_by_name():
    """A sink or temperature entry without value is a one-line refusal naming it (not a KeyError)."""
    for kind in ("sink", "temperature"):
        with pytest.raises(WorkbenchError, match=f"a {kind} entry needs value"):
            parse_entry(dict(kind=kind), 6, 4)


def test_a_sink_entrys_default_label_names_its_factor():
    """Two sink entries of other factors get other default labels (sink0x0.5, sink0x2): the store tells them
    apart."""
    assert parse_entry(dict(kind="sink", value=0.5), 6, 4).label == "sink0x0.5:all"
    assert parse_entry(dict(kind="sink", value=2, frames=[0, 1]), 6, 4).label == "sink0-1x2:all"


def test_an_entry_on_several_heads_or_layers_has_no_single_target():
    """Entry.target (the store's target_layer/target_head, which the sweep's head maps and the report read) is -1
    for what names more than one: heads [0, 3] is no single head, layers [1, 2] no single layer."""
    assert parse_entry(dict(kind="ablate", layers=2, heads=[0, 3]), 6, 4).target == (2, -1)
    assert parse_entry(dict(kind="ablate", layers=[1, 2], heads=0), 6, 4).target == (-1, 0)
    assert parse_entry(dict(kind="ablate", layers=2, heads=1), 6, 4).target == (2, 1)


def test_a_temperature_flag_is_that_temperature():
    """--temperature 1:0:2 is temperature 2 on layer 1 head 0 (label temperature2:L1.H0), as the spec entry
    {kind: temperature, layers: 1, heads: 0, value: 2} is."""
    e = parse_entry(parse_flag("temperature", "1:0:2"), 6, 4)
    assert (e.layers, e.heads, e.value, e.label) == ([1], [0], 2.0, "temperature2:L1.H0")
    assert e == parse_entry(dict(kind="temperature", layers=1, heads=0, value=2), 6, 4)


def test_an_attention_policy_with_no_frame_to_choose_is_named():
    """attention:W:S keeps the sink and the newest chunk beside the next one; with W <= S + 2 chunks no frame is
    left for the attention to choose, so the entry is sink:W:S under another label (bitwise): a warning says so (as
    for a head-wise split without static heads). One frame more leaves one to choose: no warning."""
    import warnings

    from models.errors import ModelInputWarning

    with pytest.warns(ModelInputWarning, match=r"no frame to choose.*sink:9:3.*above 9"):
        parse_entry(dict(kind="policy", policy="attention", window=9, sink_frames=3), 6, 4, **ROLLOUT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelInputWarning)
        assert parse_entry(dict(kind="policy", policy="attention", window=10, sink_frames=3), 6, 4,
                           **ROLLOUT).window == 10


def test_a_head_split_setting_on_another_policy_is_refused(tmp_path):
    """--policy fifo:9:0:STORE took the store and ignored it (only headwise splits heads by a store): a setting
    that would change nothing is named, with the entry without it."""
    for extra, words in [(dict(store=str(tmp_path)), r"store: a headwise policy's setting .* drop it "
                                                     r"\(--policy fifo:9:0\)"),
                         (dict(threshold=0.5, static_recent=3), "threshold, static_recent: a headwise policy's "
                                                                "settings .* not a fifo policy's; drop them$")]:
        with pytest.raises(WorkbenchError, match=words):
            parse_entry(dict(kind="policy", policy="fifo", window=9, **extra), 6, 4, **ROLLOUT)
    assert parse_entry(parse_flag("policy", "fifo:9"), 6, 4, **ROLLOUT).store is None
    old = dict(kind="policy", policy="fifo", window=9, sink_frames=0, threshold=0.8, static_recent=6)  # (an older
    assert parse_entry(old, 6, 4, **ROLLOUT).window == 9  # store's spec: every field, the split's at its defaults)
