"""Interventions and KV-cache policies of a user's own, registered by a plugin module (workbench/intervene_entries.py
`register`), run by `workbench intervene` into an effects store like the built-in ones; and methods of a user's probe,
intervention or policy that cannot be called as the rollout calls them are refused before any work."""

import functools
import json
import sys

import numpy as np
import pytest
import torch

from workbench import intervene_entries as ie
from workbench.cli import main as cli_main
from workbench.errors import WorkbenchError

PLUGIN = '''"""Two entries of a user's own: a head's output scaled, and the window + sink policy written again."""
from workbench.intervene_entries import EntryKind, register
from workbench.interventions import Intervention
from workbench.kv_policies import WindowSink


class HeadScale(Intervention):
    edits = frozenset({"out"})

    def __init__(self, filter, heads, label, factor=1.0):
        super().__init__(filter, heads, label)
        self.factor = factor

    @property
    def key(self):
        return super().key + (self.factor,)

    def edit_output(self, call, q, k, v, out):
        out = out.clone()
        h = list(self.heads) if self.heads is not None else slice(None)
        out[:, :, h] = out[:, :, h] * self.factor
        return out


class MySink(WindowSink):
    def __init__(self, window, sink_frames, spare=0):
        super().__init__(window, sink_frames)

    def describe(self):  # (not text: the store keeps its str)
        return {"spare": 0}


register(EntryKind("head_scale", HeadScale, {"factor": 1.0}, about="heads' outputs times factor"))
register(EntryKind("my_sink", MySink, {"spare": 0}, policy=True, about="the window and sink again"))
'''

SPEC = """interventions:
  - {kind: head_scale, layers: 1, heads: 0, settings: {factor: 0.0}}
  - {kind: ablate, layers: 1, heads: 0}
  - {kind: head_scale, layers: 1, heads: 0-1}
  - {kind: policy, policy: my_sink, window: 6, sink_frames: 3}
  - {kind: policy, policy: sink, window: 6, sink_frames: 3}
"""


@pytest.fixture
def own_registry(monkeypatch):
    """Empty registries of one's own kinds for the test (the process's are left as the other tests know them)."""
    monkeypatch.setattr(ie, "OWN_KINDS", {})
    monkeypatch.setattr(ie, "OWN_POLICIES", {})


def test_a_plugins_intervention_and_policy_run_into_an_effects_store(tmp_path, monkeypatch, capsys, own_registry):
    """A plugin's kind and policy are spec entries: their effects are the built-in ones' where the math is the same
    (a head scaled by 0 is its zero ablation, bitwise; the policy written again is the sink policy), the store
    records their settings, `--help` lists them, a rerun resumes, and other settings under the same label are
    refused naming them."""
    from workbench.store import open_store

    (tmp_path / "my_entries.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("WORKBENCH_PLUGINS", "my_entries")
    monkeypatch.delitem(sys.modules, "my_entries", raising=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    out = tmp_path / "e.zarr"
    run = ["intervene", "--spec", str(spec), "--frames", "9", "--world", "off", "--out", str(out), "--no-progress"]
    try:
        assert cli_main(["intervene", "--help"]) == 0
        assert "kind head_scale: heads' outputs times factor; settings {'factor': 1.0}" in capsys.readouterr().out
        assert cli_main(run) == 0
        assert "head_scale(factor=0):L1.H0" in capsys.readouterr().out
        ds = open_store(out)
        d = ds.latent_distance.isel(sample=0)
        assert float(d.sel(intervention="ablate-zero:L1.H0").max()) > 0
        np.testing.assert_array_equal(d.sel(intervention="head_scale(factor=0):L1.H0"),
                                      d.sel(intervention="ablate-zero:L1.H0"))
        assert float(np.abs(d.sel(intervention="head_scale:L1.H0-1")).max()) == 0  # (factor 1: nothing changes)
        assert float(d.sel(intervention="policy-sink6+sink3").max()) > 0  # (the baseline holds all 9 frames)
        np.testing.assert_array_equal(d.sel(intervention="policy-my_sink:6+sink3"),
                                      d.sel(intervention="policy-sink6+sink3"))
        assert str(ds.intervention_detail.sel(intervention="policy-my_sink:6+sink3").values) == "{'spare': 0}"
        kinds = dict(zip(ds.intervention.values, ds.intervention_kind.values))
        assert kinds["head_scale(factor=0):L1.H0"] == "head_scale" and kinds["policy-my_sink:6+sink3"] == "policy"
        specs = {str(k): json.loads(str(v)) for k, v in zip(ds.intervention.values, ds.intervention_spec.values)}
        assert specs["head_scale(factor=0):L1.H0"]["settings"] == {"factor": 0.0}
        code = specs["policy-my_sink:6+sink3"].pop("code")
        assert specs["policy-my_sink:6+sink3"] == {"kind": "policy", "label": "policy-my_sink:6+sink3",
                                                  "policy": "my_sink", "window": 6, "sink_frames": 3,
                                                  "settings": {"spare": 0}}
        assert code.startswith("MySink (code ") and specs["head_scale:L1.H0-1"]["code"].startswith("HeadScale")
        assert cli_main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0  # (no plugin needed to read)
        assert "No world metrics: the run was made with --world off." in (tmp_path / "r.html").read_text()
        assert cli_main(run) == 0
        assert "already there; nothing to do" in capsys.readouterr().out
        spec.write_text("interventions:\n  - {kind: head_scale, layers: 1, heads: 0, settings: {factor: 0.5}, "
                        "label: 'head_scale(factor=0):L1.H0'}\n")
        assert cli_main(run) == 2
        assert "settings.factor: 0.0 in the store, 0.5 in this run" in capsys.readouterr().err
        # in Python, an Entry object of a plugin's kind takes its settings' defaults, as a spec entry does
        from workbench.extract import ExtractConfig
        from workbench.intervene import run_intervene

        cfg = ExtractConfig(prompts=["a red square moving right"], seeds=[0], num_frames=9, out=str(out))
        mine = [ie.Entry(kind="head_scale", label="api", layers=[1], heads=[0]),
                ie.Entry(kind="head_scale", layers=[2])]
        run_intervene(cfg, mine, world="off", log=lambda *a: None)
        assert mine[1].label == "" and mine[1].settings is None and mine[1].code is None  # (the caller's, as given)
        ds = open_store(out)
        assert json.loads(str(ds.intervention_spec.sel(intervention="api").values))["settings"] == {"factor": 1.0}
        assert float(np.abs(ds.latent_distance.sel(intervention="api")).max()) == 0
        assert "head_scale:L2" in ds.intervention.values  # (an Entry without a label: the default one)
        # the class edited (a notebook cell run again, or the module changed): the store's results of the old code
        # are not resumed as this code's under the same label and settings
        ie.OWN_KINDS.clear()
        ie.OWN_POLICIES.clear()
        sys.modules.pop("my_entries", None)
        (tmp_path / "my_entries.py").write_text(PLUGIN.replace("out[:, :, h] * self.factor",
                                                               "out[:, :, h] + self.factor"))
        spec.write_text(SPEC)
        assert cli_main(run) == 2
        err = capsys.readouterr().err
        assert "holds entries ['head_scale(factor=0):L1.H0', 'head_scale:L1.H0-1'] made with other settings" in err
        assert "code: HeadScale (code " in err and "policy-my_sink" not in err  # (MySink is as it was)
        # an error of the plugin's own code mid-run says which entry and sample it came from; what finished stays
        from workbench.interventions import Intervention

        class Boom(Intervention):
            edits = frozenset({"out"})

            def edit_output(self, call, q, k, v, out):
                raise RuntimeError("boom in the user's code")

        ie.register(ie.EntryKind("boom", Boom))
        cfg.out = str(tmp_path / "boom.zarr")
        with pytest.raises(RuntimeError, match="boom in the user's code") as failed:
            run_intervene(cfg, [{"kind": "boom", "layers": 1}], world="off", log=lambda *a: None)
        assert failed.value.__notes__ == ["while running entry 'boom:L1' on sample p0000-s0 of workbench intervene"]
        assert list(open_store(cfg.out).intervention.values) == ["baseline"]
    finally:
        sys.modules.pop("my_entries", None)


def test_a_plugins_kinds_are_checked_when_registered_and_when_given(own_registry):
    """Every mistake in a kind of one's own, or in an entry of it, is named before any rollout: a registration that
    takes a built-in name or has settings a store cannot record; settings the kind lacks or a built-in kind given
    settings; a build whose signature does not take the entry's settings, that raises, or that returns something
    other than an intervention; a policy whose cache cannot hold a chunk or whose after_chunk takes other arguments."""
    from models.errors import ModelInputWarning
    from workbench.hooks import Probe
    from workbench.interventions import Intervention
    from workbench.kv_policies import WindowSink

    class Scale(Intervention):
        edits = frozenset({"out"})

        def __init__(self, filter, heads, label, factor=1.0, sizes=()):
            super().__init__(filter, heads, label)

        def edit_output(self, call, q, k, v, out):
            return out

    class TwoArgs(Scale):
        def edit_output(self, call, out):
            return out

    class Tiny(WindowSink):
        def capacity(self, num_frames, chunk_frames):
            return 1

    class OldAfter(WindowSink):
        def after_chunk(self, layer, cache):
            return None

    class Watching(WindowSink):  # an observer without wants
        def observe(self, call, q, k, v, out, lse):
            pass

    class FloatCap(WindowSink):
        def capacity(self, num_frames, chunk_frames):
            return 6.0

    class CapRaises(WindowSink):
        def capacity(self, num_frames, chunk_frames):
            raise RuntimeError("capacity unknown")

    class NoAfter:
        key, graph_safe = "no_after", True

        def capacity(self, num_frames, chunk_frames):
            return 6

    def raising(filter, heads, label):
        raise RuntimeError("no GPU here")

    for kind, match in ((ie.EntryKind("ablate", Scale), "intervention kind 'ablate' exists already"),
                        (ie.EntryKind("sink", WindowSink, policy=True), "cache policy 'sink' exists already"),
                        (ie.EntryKind("My Scale", Scale), "use lower-case letters"),
                        (ie.EntryKind("scale2", "Scale"), "build must be a class or a function, not .Scale."),
                        (ie.EntryKind("scale3", Scale, {"factor": torch.ones(2)}), "factor tensor.*give a number"),
                        (ie.EntryKind("temperature2", Scale), "names beginning with a built-in kind's"),
                        (ie.EntryKind("scale4", Scale, {"factor": float("nan")}), "factor nan: give a number"),
                        (ie.EntryKind("scale5", Scale, {"sizes": [torch.ones(1)]}), "sizes .*: give a number"),
                        (ie.EntryKind("scale6", Scale, {1: 0}), "give a mapping of names to values"),
                        (ie.EntryKind("scale7", functools.partial(Scale, factor=2.0)),
                         "build must be a class or a function, not functools.partial")):
        with pytest.raises(WorkbenchError, match=match):
            ie.register(kind)
    ie.register(ie.EntryKind("scale", Scale, {"factor": 1.0}))
    with pytest.raises(WorkbenchError, match="'scale' exists already"):
        ie.register(ie.EntryKind("scale", Scale, {"factor": 1.0}))
    ie.register(ie.EntryKind("scale", Scale, {"factor": 2.0, "sizes": (1, 2)}), replace=True)  # (a cell run again)
    assert ie.parse_entry({"kind": "scale", "settings": {"factor": "1e-3"}}, 4, 2).settings["factor"] == 1e-3  # (YAML
    # reads 1e-3 as text)
    for name, build in (("two_args", TwoArgs), ("raising", raising), ("a_probe", lambda f, h, label: Probe(f))):
        ie.register(ie.EntryKind(name, build, {"factor": 1.0} if name == "two_args" else {}))
    ie.register(ie.EntryKind("any_factor", Scale, {"factor": None}))  # (a default of None takes any plain value)
    for name, build in (("tiny", Tiny), ("old_after", OldAfter), ("bad_sig", lambda window: WindowSink(window)),
                        ("watching", Watching), ("float_cap", FloatCap), ("cap_raises", CapRaises),
                        ("no_after", lambda window, sink_frames: NoAfter())):
        ie.register(ie.EntryKind(name, build, policy=True))
    bounds = dict(num_layers=4, num_heads=2, num_frames=9, chunk_frames=3)
    e = ie.parse_entry({"kind": "scale", "layers": [1], "heads": 0}, **bounds)
    assert e.settings == {"factor": 2.0, "sizes": [1, 2]} and e.label == "scale:L1.H0"  # (defaults: no changes)
    assert ie.build(e, {}).label == "scale:L1.H0" and ie.build(e, {}).heads == (0,)
    e = ie.parse_entry({"kind": "scale", "layers": [1], "settings": {"factor": 3}}, **bounds)
    assert e.settings["factor"] == 3.0 and isinstance(e.settings["factor"], float)  # (built as stored)
    assert e.label == "scale(factor=3):L1" and ie.build(e, {}).heads is None
    assert ie.parse_entry({"kind": "any_factor", "settings": {"factor": 3}}, **bounds).settings == {"factor": 3}
    ie.register(ie.EntryKind("plain", lambda window, sink_frames: WindowSink(window, sink_frames), policy=True))
    with pytest.warns(ModelInputWarning, match="holds 21 frames: all 9 frames of the rollout fit"):  # (full_cache)
        e = ie.parse_entry({"kind": "policy", "policy": "plain", "sink_frames": 3}, **bounds)
    assert e.window == 21 and e.label == "policy-plain:21+sink3"  # (the window of the built-in policies' default)
    for entry, match in (
            ({"kind": "scale", "settings": {"fator": 3}},
             r"settings \['fator'\]: the kind 'scale' takes \['factor', 'sizes'\]"),
            ({"kind": "scale", "frames": 1}, r"\['frames'\]: an entry of kind 'scale' takes"),
            ({"kind": "scale", "layers": 4}, "layer"),
            ({"kind": "ablate", "layers": 1, "heads": 0, "settings": {}}, "settings: is for a kind or policy of your"),
            ({"kind": "policy", "policy": "fifo", "window": 6, "settings": {}}, "not a built-in fifo policy's"),
            ({"kind": "scale_it"}, r"intervention kind 'scale_it'; use one of \[.*'scale'"),
            ({"kind": "tiny", "window": 6}, r"\(tiny is a cache policy: \{kind: policy, policy: tiny, window"),
            ({"kind": "ablate", "layers": 1, "heads": 0, "code": "x"}, "code: is what a store records"),
            ({"kind": "raising"}, "intervention kind 'raising' with settings {}: RuntimeError: no GPU here"),
            ({"kind": "a_probe"}, "returned a probe"),
            ({"kind": "two_args"}, r"TwoArgs.edit_output\(call, out\) must take \(call, q, k, v, out\)"),
            ({"kind": "policy", "policy": "tiny", "window": 6}, r"capacity\(9, 3\) is 1; the cache must hold"),
            ({"kind": "policy", "policy": "old_after", "window": 6}, r"after_chunk\(layer, cache\) must take"),
            ({"kind": "policy", "policy": "watching", "window": 6}, "neither a probe .* nor an intervention"),
            ({"kind": "policy", "policy": "float_cap", "window": 6}, r"capacity\(9, 3\) is 6.0; the cache must"),
            ({"kind": "policy", "policy": "cap_raises", "window": 6}, r"capacity\(9, 3\): RuntimeError: capacity "),
            ({"kind": "policy", "policy": "no_after", "window": 6}, r"NoAfter lacks \['after_chunk'\]"),
            ({"kind": "policy", "policy": "tiny", "window": 6, "sink_frames": 6}, "use 0 <= sink_frames < window"),
            ({"kind": "scale", "attention": "crosss"}, "attention 'crosss'; use self or cross"),
            ({"kind": "scale", "settings": {"factor": "big"}}, "factor 'big' for the kind 'scale': give a number"),
            ({"kind": "scale", "settings": {"factor": True}}, "factor True .*: give a number"),
            ({"kind": "scale", "settings": {"sizes": None}}, "sizes None .*: give a list"),
            ({"kind": "policy", "policy": "bad_sig", "window": 6}, r"build\(window\) does not take \(window, "
                                                                   r"sink_frames, \*\*settings\)")):
        with pytest.raises(WorkbenchError, match=match):
            ie.parse_entry(entry, **bounds)


def test_a_policy_whose_cache_holds_every_frame_is_named_built_in_or_own(own_registry):
    """A cache policy whose cache holds every frame of the rollout never has to evict one. A built-in policy then
    changes nothing (it drops frames only to make room): refused. One of one's own (registered, or an Entry object
    as the Python API takes it) may still drop, move or mask frames by its own choice (its Keep): the same message,
    naming the policy, its capacity, the rollout's frames and what to change, as a warning; a capacity below the
    rollout's frames says nothing."""
    import warnings

    from models.common.kv_cache import Keep
    from models.errors import ModelInputWarning
    from workbench.kv_policies import WindowSink

    class Drop:  # evicts by its own choice with room for the whole rollout (tests/test_kv_policies.py's Drop)
        graph_safe, key = True, "drop"

        def __init__(self, window, sink_frames):
            pass

        def capacity(self, num_frames, chunk_frames):
            return num_frames

        def after_chunk(self, layer, cache, chunk, next_frames):
            return Keep([f for f in cache.frames if f != 1])

    ie.register(ie.EntryKind("my_window", lambda window, sink_frames: WindowSink(window, sink_frames), policy=True))
    ie.register(ie.EntryKind("drop", Drop, policy=True))
    bounds = dict(num_layers=4, num_heads=2, num_frames=9, chunk_frames=3)
    for policy in ("sink", "fifo", "deepsink", "attention"):
        sink = 0 if policy == "fifo" else 3
        with pytest.raises(WorkbenchError, match=rf"cache policy {policy} \(window 12, sink_frames {sink}\) holds 12 "
                           r"frames: all 9 frames of the rollout fit, and it never evicts or moves a frame, so it "
                           r"changes nothing .*; give more --frames than 12 \(e.g. --frames 18\) or a window below 9"):
            ie.parse_entry({"kind": "policy", "policy": policy, "window": 12, "sink_frames": sink}, **bounds)
    own = (r"cache policy '{}' \(capacity\(9, 3\) = {}\) holds {} frames: all 9 frames of the rollout fit, and its "
           r"cache never has to evict a frame, so unless its after_chunk drops, moves or masks frames of its own "
           r"accord the entry changes nothing; give more --frames than {} \(e.g. --frames {}\) or a window below 9")
    with pytest.warns(ModelInputWarning, match=own.format("my_window", 12, 12, 12, 18)):
        e = ie.parse_entry({"kind": "policy", "policy": "my_window", "window": 12, "sink_frames": 3}, **bounds)
    assert e.label == "policy-my_window:12+sink3"  # (not refused: a warning)
    with pytest.warns(ModelInputWarning, match=own.format("my_window", 9, 9, 9, 15)):  # (exactly every frame)
        ie.parse_entry(ie.Entry(kind="policy", policy="my_window", window=9, sink_frames=3).spec(), **bounds)
    with pytest.warns(ModelInputWarning, match=own.format("drop", 9, 9, 9, 15)):  # (a legitimate one: warned only)
        ie.parse_entry({"kind": "policy", "policy": "drop", "window": 6}, **bounds)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a window that evicts: nothing said)
        ie.parse_entry({"kind": "policy", "policy": "my_window", "window": 6, "sink_frames": 3}, **bounds)
        ie.parse_entry({"kind": "policy", "policy": "sink", "window": 6, "sink_frames": 3}, **bounds)
        ie.parse_entry({"kind": "policy", "policy": "my_window", "window": 12, "sink_frames": 3}, 4, 2)  # (no rollout)


CELL = '''
from workbench.interventions import Intervention


class Scale(Intervention):
    """A head's output times factor."""
    edits = frozenset({"out", "q"})

    def edit_output(self, call, q, k, v, out):
        return out * 2.0  # twice
'''


def test_a_plugins_code_is_known_by_what_runs_in_every_process():
    """The code an entry records is its compiled code: a class defined in a notebook cell (no source file) edited and
    run again is other code; its comments, docstrings or place are not; and every process gives the same text
    (no addresses, set orders or hash seeds in it)."""
    import subprocess

    def code(cell):
        ns = {}
        exec(compile(cell, "<cell>", "exec"), ns)
        kind = ie.EntryKind("scale", ns["Scale"])
        return ie.code_of(kind, kind.build(None, None, "x"))

    same = CELL.replace("# twice", "# two times").replace("A head's output", "The output") + "\n\n# moved\n"
    assert code(CELL) == code(same) != code(CELL.replace("out * 2.0", "out + 2.0"))
    assert code(CELL).startswith("Scale (code ")
    # a module constant it names, in its method or in a lambda there, is part of its code: SCALE edited from 2.0
    # to 0.0 and run again kept the first run's results under the same label (found by QA)
    for body in ("out * SCALE", "(lambda o: o * SCALE)(out)"):
        const = CELL.replace("out * 2.0", body).replace("class Scale", "SCALE = 2.0\n\n\nclass Scale")
        assert code(const) != code(const.replace("SCALE = 2.0", "SCALE = 0.0")), body
        assert code(const) == code(const.replace("SCALE = 2.0", "SCALE = 2.0\nOTHER = 1"))  # (one it does not name)
    # ... read in a property, a static method, a class method, or a plain build function given as the kind's build
    # (not a class): each is code of the entry
    reads = {"property": ("    @property\n    def factor(self):\n        return SCALE\n\n", "out * self.factor"),
             "staticmethod": ("    @staticmethod\n    def factor():\n        return SCALE\n\n", "out * self.factor()"),
             "classmethod": ("    @classmethod\n    def factor(cls):\n        return SCALE\n\n",
                             "out * type(self).factor()")}
    for name, (method, body) in reads.items():
        const = (CELL.replace("out * 2.0", body).replace("class Scale", "SCALE = 2.0\n\n\nclass Scale")
                 .replace("    def edit_output", method + "    def edit_output"))
        assert code(const) != code(const.replace("SCALE = 2.0", "SCALE = 0.0")), name

    def built_by_function(cell):
        ns = {}
        exec(compile(cell + "\n\ndef make(filter, heads, label):\n    return Scale(filter, heads, label * LABELS)\n",
                     "<cell>", "exec"), ns)
        kind = ie.EntryKind("scale", ns["make"])
        return ie.code_of(kind, kind.build(None, None, "x"))

    function = CELL.replace("class Scale", "LABELS = 1\n\n\nclass Scale")
    assert built_by_function(function) != built_by_function(function.replace("LABELS = 1", "LABELS = 2"))
    script = ("import sys; sys.path.insert(0, '.'); from tests.test_intervene_plugins import CELL, ie\n"
              "ns = {}; exec(compile(CELL, '<cell>', 'exec'), ns); k = ie.EntryKind('scale', ns['Scale'])\n"
              "print(ie.code_of(k, k.build(None, None, 'x')))")
    for seed in ("1", "2"):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env={**__import__("os").environ, "PYTHONHASHSEED": seed})
        assert run.stdout.strip() == code(CELL), run.stderr[-500:]


def test_user_methods_that_cannot_take_the_rollouts_arguments_are_refused_before_the_rollout():
    """A probe's observe, an intervention's edit methods and a cache policy's capacity / after_chunk with other
    arguments than the rollout passes are refused at attach / before the first forward (they failed with a plain
    TypeError at their first call, in the middle of the rollout), and a policy whose cache cannot hold a chunk."""
    from conftest import tiny_model
    from models.common.kv_cache import Keep
    from models.common.rollout import causal_few_step
    from models.common.scheduler import FlowMatchScheduler
    from models.errors import ModelInputError
    from workbench.hooks import CallFilter, Probe, attach
    from workbench.interventions import Intervention
    from workbench.kv_policies import WindowSink

    model = tiny_model()

    class OldProbe(Probe):
        def observe(self, call, q, k, v):
            raise AssertionError("never called")

    class OldEdit(Intervention):
        edits = frozenset({"q"})

        def edit_inputs(self, call, q):
            raise AssertionError("never called")

    class Duck:  # an intervention by its edits alone: no label, no edit_inputs
        edits = frozenset({"out"})
        graph_safe = False

        def wants(self, call):
            return True

        def edit_output(self, call, q, k, v, out):
            return out

    class KeylessDuck(Duck):  # graph-safe, so the rollout graphs need its key
        graph_safe, label = True, "keyless"

        def edit_inputs(self, call, q, k, v):
            return call, q, k, v

    class Blind(Probe):  # wants without the call
        def wants(self):
            return True

    class Tensorish(Intervention):  # edit_inputs returns q alone
        edits = frozenset({"q"})

        def edit_inputs(self, call, q, k, v):
            return q

    class OldPolicy(WindowSink):
        def after_chunk(self, layer, cache, chunk):
            raise AssertionError("never called")

    class Tiny(WindowSink):
        def capacity(self, num_frames, chunk_frames):
            return 2

    class FloatCap(WindowSink):
        def capacity(self, num_frames, chunk_frames):
            return 6.0

    class Stray(WindowSink):  # keeps a frame the cache never held
        def after_chunk(self, layer, cache, chunk, next_frames):
            return Keep([99])

    def packed(fn):  # a decorator that changes the arguments (functools.wraps keeps fn's signature)
        @functools.wraps(fn)
        def wrapper(self, *args):
            return fn(self, args)
        return wrapper

    class PackedProbe(Probe):
        @packed
        def observe(self, args):
            self.seen = len(args)

    with attach(model, PackedProbe(CallFilter())) as seen:  # (its wrapper takes what attend passes)
        seen.observe(*range(6))
    assert seen.seen == 6
    for sub, match in ((OldProbe, "OldProbe is a class; attach an instance of it"),
                       (OldProbe(CallFilter()), r"OldProbe.observe\(call, q, k, v\) must take \(call, q, k, v, "
                                                r"out, lse\)"),
                       (OldEdit(), r"OldEdit.edit_inputs\(call, q\) must take \(call, q, k, v\)"),
                       (Duck(), r"an intervention \(it has edits\) without \['label', 'edit_inputs'\]"),
                       (KeylessDuck(), r"without \['key'\]"),
                       (Blind(CallFilter()), r"Blind.wants\(\) must take \(call\)")):
        with pytest.raises(ModelInputError, match=match):
            with attach(model, sub):
                raise AssertionError("attached")
    noise, context = torch.randn(1, 6, 16, 4, 6), torch.randn(1, 16, 32)
    s = FlowMatchScheduler(5.0)
    with pytest.raises(ModelInputError, match=r"'Tensorish': edit_inputs returned a tensor of shape .*; it returns "
                                              r"\(call, q, k, v\)"):
        with attach(model, Tensorish()):
            causal_few_step(model, noise, context, timesteps=s.warp([1000, 500]), scheduler=s)
    for policy, match in ((OldPolicy(6, 3), r"OldPolicy.after_chunk\(layer, cache, chunk\) must take"),
                          (Tiny(6, 3), r"capacity\(6, 3\) is 2; a cache holds at least a chunk"),
                          (FloatCap(6, 3), r"capacity\(6, 3\) is 6.0; a cache holds"),
                          (Stray(6, 3), r"cache policy 'Stray', layer 0 after chunk 0: a cache policy kept frames "
                                        r"\[99\]; the cache holds \[0, 1, 2\]")):
        with pytest.raises(ModelInputError, match=match):
            causal_few_step(model, noise, context, timesteps=s.warp([1000, 500]), scheduler=s, cache_policy=policy)


def test_an_entry_whose_rollout_diverges_is_kept_scored_as_a_blank_video_and_named(tmp_path, monkeypatch, capsys,
                                                                                   own_registry):
    """A head's output times 1e30 overflows the rollout: the sweep goes on, the entry's latent distances are NaN,
    its world scores a blank video's (adherent 0: its score_video raised on NaN before, a traceback that lost the
    run), its pixel distance NaN, its saved frames drawn with NaN black, and a note names it. A baseline that
    diverges stops the run before anything is written."""
    from conftest import diverging_checkpoint
    from workbench.store import open_store

    (tmp_path / "my_entries.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("WORKBENCH_PLUGINS", "my_entries")
    monkeypatch.delitem(sys.modules, "my_entries", raising=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text("interventions:\n  - {kind: head_scale, layers: 1, heads: 0, settings: {factor: 1.0e+30}}\n")
    out, label = tmp_path / "e.zarr", "head_scale(factor=1e+30):L1.H0"
    assert cli_main(["intervene", "--spec", str(spec), "--frames", "3", "--world", "on", "--save-videos", "--out",
                     str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"note: under {label!r} the rollout is not finite (NaN or inf: the activations overflowed) for p0000-s0 " \
           "from latent frame 0" in printed, printed
    ds = open_store(out)
    entry, base = ds.sel(intervention=label, sample="p0000-s0"), ds.sel(intervention="baseline", sample="p0000-s0")
    assert bool(entry.latent_distance.isnull().all()) and bool(entry.pixel_distance.isnull().all())
    assert float(entry.world_adherent) == 0 and float(entry.world_detected) == 0
    assert float(base.world_adherent) == 1 and bool(np.isfinite(base.pixel_distance).all())
    assert (tmp_path / "e_videos" / "head_scale_factor=1e+30__L1.H0" / "p0000-s0.png").exists()

    bad = tmp_path / "b.zarr"
    assert cli_main(["intervene", "--checkpoint", str(diverging_checkpoint(tmp_path / "d.pt")), "--ablate", "1:0",
                     "--frames", "3", "--world", "off", "--out", str(bad), "--no-progress"]) == 1
    assert "the baseline rollout (no intervention) of sample p0000-s0 (prompt 'a red square moving right', seed 0) " \
           "is not finite" in capsys.readouterr().err
    assert not bad.exists()
