"""The entries of `workbench intervene` (workbench/intervene.py): what an intervention or cache policy of a run
is, read from a YAML spec or a flag, checked against the model's config before any weights are read, labelled,
and built into the object that acts (workbench/interventions.py, workbench/kv_policies.py).

An entry is a mapping (an item of a YAML spec's list, or made from a flag by `parse_flag`):

    kind: ablate | knockout | temperature | sink | policy
    layers, heads, steps, chunks: which calls (a list, a string like "0-3,7", or "all"; default all)
    attention: self | cross (ablate, temperature; default self)
    mode: zero | mean | resample (ablate); resample_prompt, resample_seed: the source rollout (default: the
        sample's own seed, the prompt given)
    frames: absolute latent frames (knockout, sink; sink default [0]); history_only (knockout, sink; default true:
        only the chunks after a frame's own see the change, the frames themselves are generated as in the baseline)
    value: the temperature T (temperature) or the logit factor c (sink)
    policy: fifo | sink | deepsink | attention | headwise, window, sink_frames, store and threshold (headwise:
        static heads from a store's attention mass), static_recent (headwise); static_heads (headwise: the
        [layer, head] pairs, as a stored spec records them; given without store, or with a store that gives them)
    label: the name in the store (default: made from the settings)
    settings: a kind or policy of your own (`register`): its settings, over the defaults it registered

Kinds and policies of your own: `register(EntryKind(name, build, settings))` in a plugin module (named by
WORKBENCH_PLUGINS, as statistics are: docs/architecture.md); `kind: NAME` (or `kind: policy, policy: NAME`) then
takes the calls' keys above and `settings:`, and the entry is built, checked and stored like the built-in ones.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from workbench.code_identity import NOT_USERS, code_identity, constants_read
from workbench.errors import WorkbenchError

KINDS = ("ablate", "knockout", "temperature", "sink", "policy")
HEAD_SPLIT = "chunk_end"  # the head-wise split's rule, in its spec: an entry made by another rule is another's
# the deep sink's rule, in its spec (since 2026-12-05: the sink alone beside the next chunk moves too, and a move
# rotates the keys as written once); an entry made before is another's
DEEP_SINK_RULE = "sink_alone_moves"
CALLS = ("layers", "heads", "steps", "chunks", "attention")  # which calls an intervention acts on
SPEC_FIELDS = {  # an entry's settings per kind, beside kind and label
    "baseline": (),
    "ablate": CALLS + ("mode", "resample_prompt", "resample_seed"),
    "knockout": CALLS + ("frames", "history_only"),
    "temperature": CALLS + ("value",),
    "sink": CALLS + ("frames", "history_only", "value"),
    "policy": ("policy", "window", "sink_frames", "store", "threshold", "static_recent", "split", "static_heads",
               "sink_rule"),
}


def same_settings(stored: dict, entry: Entry) -> bool:
    """Whether a stored intervention_spec is `entry`'s: equal on the entry's kind's settings. A store made before
    specs kept only those (every field written) reads the same, except where what ran then differs from what the
    same settings run now (`older_differs`)."""
    if older_differs(stored, entry):
        return False
    return not spec_differences(stored, entry)


def spec_differences(stored: dict, entry: Entry) -> list[str]:
    """The settings of `entry`'s kind on which a stored intervention_spec differs, as 'name: stored vs this run'.
    A head-wise policy is its static heads, not the path its store was given by (a store moved, copied, or named
    relative to another folder is the same store; a spec made before the heads were recorded compares
    the paths, resolved)."""
    # (an older sink spec's history_only is the default every entry carried then, not what ran)
    keep = entry.fields() - ({"history_only"} if older(stored) and entry.kind == "sink" else set())
    # (the heads known, the store and the threshold that chose them say nothing more)
    keep -= {"store", "threshold"} if "static_heads" in stored else {"static_heads"}
    a, b = {k: v for k, v in stored.items() if k in keep}, {k: v for k, v in entry.spec().items() if k in keep}
    if "settings" in keep:  # (a plugin's kind: setting by setting)
        a, b = _each_setting(a), _each_setting(b)
        keep = (keep - {"settings"}) | {k for k in (*a, *b) if k.startswith("settings.")}
    if "store" in a and "store" in b and os.path.realpath(a["store"]) == os.path.realpath(b["store"]):
        b["store"] = a["store"]  # (an older spec's path: the same store named relatively, or through a link)
    show = lambda v: str(v) if len(str(v)) <= 80 else str(v)[:77] + "..."  # noqa: E731
    return [f"{k}: {show(a.get(k, '(not set)'))} in the store, {show(b.get(k, '(not set)'))} in this run"
            for k in sorted(keep) if a.get(k) != b.get(k)]


def _each_setting(spec: dict) -> dict:
    """A spec with its `settings` mapping spread into settings.NAME items."""
    out = {k: v for k, v in spec.items() if k != "settings"}
    settings = spec.get("settings")
    out.update({f"settings.{k}": v for k, v in settings.items()} if isinstance(settings, dict) else {})
    return out


def older(stored: dict) -> bool:
    """Whether a stored spec is of a store made before specs kept their kind's settings only (it has every field)."""
    policy = stored.get("kind") == "policy"
    return "frames" in stored if policy else "window" in stored


def older_differs(stored: dict, entry: Entry) -> str | None:
    """Why an older store's entry of these settings ran otherwise than `entry` runs, or None: its sink entries
    scaled the frames' logits in every call, their own chunk's too (history_only false now; true is the default),
    a head-wise split made without `split` in its spec counted other frames than a static head sees, and a deep
    sink without `sink_rule` moved its sink otherwise."""
    if entry.kind == "sink" and entry.history_only and older(stored):
        return ("its sink entries scaled the frames' logits in every call, the frames' own chunk's too: a spec entry "
                f"with history_only: false and label: {entry.label} is that; sink entries are history-only by "
                "default now")
    if entry.policy == "deepsink" and stored.get("sink_rule") != DEEP_SINK_RULE:
        return ("its deep sink left the sink where it was when the window kept it alone beside the next chunk (window "
                "= sink + chunk: the plain window and sink) and rotated each move from the last; the deep sink now "
                "moves it there too and rotates the keys as written once")
    if entry.policy == "headwise" and stored.get("split") != HEAD_SPLIT:
        return ("its head-wise split chose the static heads by the frames up to each query frame; the split now "
                "counts the policy's sink frames and its newest static_recent frames up to the query's chunk end")
    return None


POLICIES = ("fifo", "sink", "deepsink", "attention", "headwise")
ENTRY_KEYS = {"kind", "layers", "heads", "steps", "chunks", "attention", "mode", "resample_prompt", "resample_seed",
              "frames", "history_only", "value", "policy", "window", "sink_frames", "store", "threshold",
              "static_recent", "split", "static_heads", "sink_rule", "label", "settings", "code"}


# ------------------------------------------------------------------------------------------ kinds of your own
@dataclass(frozen=True)
class EntryKind:
    """An intervention or a KV-cache policy of your own, as `workbench intervene` takes it.

    An intervention (`policy=False`; a spec entry `kind: NAME`): `build(filter, heads, label, **settings)` returns
    an intervention (workbench/interventions.py `Intervention`: `edits`, `edit_inputs` / `edit_output`) acting on
    the calls `filter` selects (a `CallFilter` of the entry's layers, steps, chunks and attention) and on `heads`
    (a tuple, or None for all), named `label`. A cache policy (`policy=True`; `kind: policy, policy: NAME`):
    `build(window, sink_frames, **settings)` returns a `CachePolicy` (models/common/kv_cache.py: `key`,
    `graph_safe`, `capacity`, `after_chunk`; optionally `describe()`, `wants` / `observe` as an observer, and
    `heads_differ = True` when its Keep gives heads different frames: `--capture` then stores NaN under it).
    `settings`: the names of its own settings and their defaults (JSON values: numbers, text, booleans, lists);
    an entry's `settings:` mapping overrides them, and the store records them all in its intervention_spec."""

    name: str
    build: Callable
    settings: dict = field(default_factory=dict)
    policy: bool = False
    about: str = ""  # one line for `workbench intervene --help`


OWN_KINDS: dict[str, EntryKind] = {}  # interventions of your own, by kind
OWN_POLICIES: dict[str, EntryKind] = {}  # cache policies of your own, by policy name


def register(kind: EntryKind, *, replace: bool = False) -> EntryKind:
    """Make `kind` an entry of `workbench intervene` (call it in a plugin module; docs/architecture.md).
    `replace`: a kind of your own registered before under this name gives way (a notebook cell run again)."""
    taken, table = (POLICIES, OWN_POLICIES) if kind.policy else (KINDS + ("baseline",), OWN_KINDS)
    what = "cache policy" if kind.policy else "intervention kind"
    if not isinstance(kind.name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", kind.name):
        raise WorkbenchError(f"{what} name {kind.name!r}: use lower-case letters, digits and _ (e.g. my_edit)")
    if kind.name in taken or kind.name in table and not replace:
        again = "" if kind.name in taken else " (or register(..., replace=True): a notebook cell run again)"
        raise WorkbenchError(f"{what} {kind.name!r} exists already; give yours another name{again}")
    if not kind.policy and kind.name.startswith(taken):  # (its labels could be theirs: temperature2:L1)
        raise WorkbenchError(f"{what} {kind.name!r}: names beginning with a built-in kind's ({', '.join(taken)}) are "
                             f"kept for the labels those make; give yours another, e.g. my_{kind.name}")
    if not (inspect.isfunction(kind.build) or inspect.isclass(kind.build)):  # (its code is the entry's identity)
        raise WorkbenchError(f"{what} {kind.name!r}: build must be a class or a function, not {kind.build!r} (a "
                             "functools.partial's or an object's bound values: make them settings)")
    _check_setting_values(kind.settings, f"{what} {kind.name!r}'s settings")
    table[kind.name] = kind
    return kind


def _check_setting_values(values, what: str) -> None:
    """Settings (a registered kind's defaults, or an entry's) are a mapping of names to values a store records."""
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise WorkbenchError(f"{what}: {values!r}; give a mapping of names to values")
    for k, v in values.items():
        if not _plain(v):
            raise WorkbenchError(f"{what}: {k} {v!r}: give a number, text, true/false or a list of them (what a "
                                 "store's intervention_spec can record)")


def _plain(v) -> bool:
    """Whether v is a value a store's spec records as it is: a number, text, a boolean, None, or a list of them."""
    one = lambda x: x is None or isinstance(x, (bool, int, str)) or isinstance(x, float) and math.isfinite(x)  # noqa
    return one(v) or isinstance(v, (list, tuple)) and all(one(x) for x in v)


def own_kind(kind: str, policy: str | None = None) -> EntryKind | None:
    """The registered kind of an entry's kind (and policy), or None for a built-in one."""
    return OWN_POLICIES.get(policy) if kind == "policy" else OWN_KINDS.get(kind)


def _own_settings(d: dict, kind: EntryKind) -> dict:
    """An entry's `settings:` over its kind's defaults, each of the sort of its default (an integer where a number
    is, a number written as text read as one), as the store records them."""
    given = d.get("settings") or {}
    what = f"the {'policy' if kind.policy else 'kind'} {kind.name!r}"
    _check_setting_values(given, f"settings of {what}")
    unknown = sorted(set(given) - set(kind.settings))
    if unknown:
        raise WorkbenchError(f"settings {unknown}: {what} takes "
                             f"{sorted(kind.settings) if kind.settings else 'no settings'}")
    out = {}
    for k, v in given.items():
        default = kind.settings[k]
        if isinstance(default, float):  # (1 or "1e-3" where the default is a number: built with the float, as stored)
            v = _number_text(v)
            v = float(v) if isinstance(v, int) and not isinstance(v, bool) else v
        if default is not None and _sort(v) != _sort(default):  # (a default of None takes anything plain)
            raise WorkbenchError(f"settings: {k} {v!r} for {what}: give {_sort(default)} (its default is {default!r})")
        out[k] = v
    return _recorded({**kind.settings, **out})


def _sort(v) -> str:
    """What sort of value a setting is: true/false, an integer, a number, text, a list, null."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, int):
        return "an integer"
    return "a number" if isinstance(v, float) else "text" if isinstance(v, str) else "a list"


def _number_text(v):
    """A number written as text (YAML reads 1e-3 as text), as the number; anything else as it is."""
    if isinstance(v, str):
        try:
            x = float(v)
        except ValueError:
            return v
        return x if math.isfinite(x) else v
    return v


def _recorded(settings: dict) -> dict:
    """Settings as a store records and reads them back (lists, not tuples)."""
    return json.loads(json.dumps(settings))


def _built(kind: EntryKind, args: tuple, settings: dict):
    """kind.build(*args, **settings), its signature checked first; what it raises, as a WorkbenchError naming it."""
    what = f"{'cache policy' if kind.policy else 'intervention kind'} {kind.name!r}"
    try:
        inspect.signature(kind.build).bind(*args, **settings)
    except TypeError as err:
        wants = "(window, sink_frames, **settings)" if kind.policy else "(filter, heads, label, **settings)"
        raise WorkbenchError(f"{what}: its build{inspect.signature(kind.build)} does not take {wants} with the "
                             f"settings {sorted(settings)}: {err}") from None
    except ValueError:  # (a builtin without a signature: called as it is)
        pass
    try:
        return kind.build(*args, **settings)
    except Exception as err:  # noqa: BLE001 - the user's code: its own error, named
        raise WorkbenchError(f"{what} with settings {settings}: {type(err).__name__}: {err}") from None


def _check_policy_object(obj, kind: EntryKind, num_frames, chunk_frames) -> None:
    """What its build returned is a cache policy (models/common/kv_cache.py `check_policy`) holding a chunk."""
    from models.common.kv_cache import check_policy

    from workbench.hooks import check_kind

    try:
        check_policy(obj)
        if hasattr(obj, "observe"):  # (an observer too: attached beside the rollout)
            check_kind(obj)
    except ValueError as err:
        raise WorkbenchError(f"cache policy {kind.name!r}: its build returned {err}") from None
    if num_frames and chunk_frames:
        try:
            held = obj.capacity(num_frames, chunk_frames)
        except Exception as err:  # noqa: BLE001 - the user's code
            raise WorkbenchError(f"cache policy {kind.name!r}: capacity({num_frames}, {chunk_frames}): "
                                 f"{type(err).__name__}: {err}") from None
        if not isinstance(held, numbers.Integral) or held < chunk_frames:
            raise WorkbenchError(f"cache policy {kind.name!r}: capacity({num_frames}, {chunk_frames}) is {held!r}; "
                                 f"the cache must hold at least a chunk of {chunk_frames} frames")
        if held >= num_frames:  # (a warning, not a refusal: see full_cache)
            from models.errors import ModelInputWarning

            warnings.warn(full_cache(f"{kind.name!r} (capacity({num_frames}, {chunk_frames}) = {held})", held,
                                     num_frames, chunk_frames, own=True), ModelInputWarning, stacklevel=2)


def full_cache(name: str, held: int, num_frames: int, chunk_frames: int | None, own: bool = False) -> str:
    """Why cache policy `name`, whose cache holds `held` frames, changes nothing on a rollout of `num_frames`
    frames that all fit, and what to change. A built-in policy only ever drops frames to make room (and moves
    none that stay put), so the entry would be a rollout without eviction labelled as a cache-policy experiment:
    refused. A policy of one's own may still drop frames by its own choice (capacity is what the cache allocates),
    move them or mask heads (its Keep's positions, head_mask), so for it this is a warning, not a refusal."""
    c = chunk_frames or 3
    does = ("its cache never has to evict a frame, so unless its after_chunk drops, moves or masks frames of its "
            "own accord the entry changes nothing" if own else "it never evicts or moves a frame, so it changes "
            "nothing (a rollout without eviction, labelled as a cache policy)")
    return (f"cache policy {name} holds {held} frames: all {num_frames} frames of the rollout fit, and {does}; "
            f"give more --frames than {held} (e.g. --frames {c * (held // c + 2)}) or a window below {num_frames}")


@dataclass
class Entry:
    """One intervention or policy of a run, resolved (lists of ints, None = all)."""

    kind: str
    label: str = ""  # "" : made from the settings when the entry is checked (`default_label`)
    layers: list[int] | None = None
    heads: list[int] | None = None
    steps: list[int] | None = None
    chunks: list[int] | None = None
    attention: str = "self"
    mode: str = "zero"
    resample_prompt: str | None = None
    resample_seed: int | None = None
    frames: list[int] = field(default_factory=list)
    history_only: bool = True
    value: float = 1.0
    policy: str | None = None
    window: int = 21
    sink_frames: int = 0
    store: str | None = None
    threshold: float = 0.8
    static_recent: int = 6
    split: str = HEAD_SPLIT  # how a headwise policy's static heads are chosen (kv_policies.static_heads_from_store)
    static_heads: list | None = None  # headwise: the [layer, head] pairs that split chose from the store
    sink_rule: str = DEEP_SINK_RULE  # how a deep sink moves its sink (workbench/kv_policies.py DeepSink)
    settings: dict | None = None  # a kind or policy of your own (`register`): all its settings
    code: str | None = None  # a kind or policy of your own: its code's names and source hash (`code_of`)

    def spec(self) -> dict:
        """The entry's settings that mean something for its kind (stored as intervention_spec: a knockout carries no
        policy window, the baseline nothing but its name; the run's own cache is the store's local_attn_size and
        sink_size attributes)."""
        keep = self.fields()
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k in keep}

    def fields(self) -> set[str]:
        """The names of the settings of this entry's kind (and policy)."""
        if own_kind(self.kind, self.policy) is not None:  # (one of your own: its calls or window, and its settings)
            return {"kind", "label", "settings", "code", *(("policy", "window", "sink_frames")
                                                           if self.kind == "policy" else CALLS)}
        keep = {"kind", "label", *SPEC_FIELDS[self.kind]}
        if self.kind == "policy" and self.policy != "headwise":  # (the head split's settings)
            keep -= {"store", "threshold", "static_recent", "split", "static_heads"}
        if self.kind == "policy" and self.policy != "deepsink":
            keep -= {"sink_rule"}
        return keep

    @property
    def target(self) -> tuple[int, int]:
        """(layer, head) when the entry acts on exactly one head (sweeps rank these), else -1 for what is not one."""
        one = lambda xs: xs[0] if xs is not None and len(xs) == 1 else -1  # noqa: E731
        return one(self.layers), one(self.heads)


def _pairs(value, num_layers: int, num_heads: int) -> list[list[int]]:
    """static_heads: [[layer, head], ...] -> the pairs in order, each checked against the model."""
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2
        and all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in p) for p in value)
    if not ok:
        raise WorkbenchError(f"static_heads {value!r}: give [layer, head] pairs, e.g. [[0, 1], [3, 2]]")
    bad = [list(p) for p in value if not (0 <= p[0] < num_layers and 0 <= p[1] < num_heads)]
    if bad:
        raise WorkbenchError(f"static_heads {bad} out of range: the model has layers 0-{num_layers - 1} and heads "
                             f"0-{num_heads - 1}")
    return sorted(list(p) for p in {(int(a), int(b)) for a, b in value})


def _ints(value, what: str, upper: int | None = None, owner: str = "the model") -> list[int] | None:
    from workbench.inputs import parse_int_list

    if value is None or value == "all":
        return None
    if isinstance(value, int):
        value = [value]
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return parse_int_list(str(value), what=what, upper=upper, owner=owner)


def _check_attention_store(path) -> None:
    """A headwise policy's store must be an attention store of `workbench extract` with attn_mass: not an effects
    store (an intervention dim) nor a training probe store (a train_step dim)."""
    from workbench.store import open_store

    ds = open_store(path)
    other = [d for d in ("intervention", "train_step") if d in ds.dims]
    if other or "attn_mass" not in ds:
        article = "an" if other and other[0][0] in "aeiou" else "a"
        what = f"has {article} {other[0]} dim (not a store of `workbench extract`)" if other else "has no attn_mass"
        raise WorkbenchError(f"store {str(path)!r} {what}; a headwise policy splits the heads by the attn_mass of "
                             "an attention store: workbench extract --stats attn_mass ...")


def _number(value, what: str, integer: bool = False) -> float:
    """A spec entry's number (int or float, or its text), or a WorkbenchError naming the value."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if not math.isfinite(x) or isinstance(value, bool) or (integer and x != int(x)):
        raise WorkbenchError(f"{what} {value!r}: give {'an integer' if integer else 'a number'}")
    return x


def _read_window(e: Entry, d: dict, deep: bool = False) -> None:
    """A policy entry's window (default 21) and sink frames (default 0; a deep sink's, half the window), checked."""
    e.window = int(_number(d.get("window", 21), "policy window", integer=True))
    e.sink_frames = int(_number(d.get("sink_frames", e.window // 2 if deep else 0), "policy sink_frames", integer=True))
    if e.window < 1 or not 0 <= e.sink_frames < e.window:
        raise WorkbenchError(f"window {e.window} with sink_frames {e.sink_frames}: use 0 <= sink_frames < window")


def _read_calls(e: Entry, d: dict, num_layers: int, num_heads: int, num_steps, num_chunks) -> None:
    """An entry's calls (layers, heads, steps, chunks, attention), each checked against the model and rollout."""
    e.layers = _ints(d.get("layers"), "layer", num_layers)
    e.heads = _ints(d.get("heads"), "head", num_heads)
    e.steps = _ints(d.get("steps"), "step", num_steps, "the per-chunk schedule")
    e.chunks = _ints(d.get("chunks"), "chunk", num_chunks, "the rollout")
    e.attention = d.get("attention", "self")
    if e.attention not in ("self", "cross"):
        raise WorkbenchError(f"attention {e.attention!r}; use self or cross")


def parse_entry(d: dict, num_layers: int, num_heads: int, *, num_frames: int | None = None,
                num_steps: int | None = None, num_chunks: int | None = None, chunk_frames: int | None = None,
                first_chunk_frames: int | None = None) -> Entry:
    """A spec entry (YAML or flags) -> an `Entry`, every value checked (a WorkbenchError names the bad one): layers
    and heads against the model, and, when given, frames, steps and chunks against the rollout (an entry that no
    call can match would change nothing), a policy's window against the chunk size (`chunk_frames`) and a knockout
    that would leave the first chunk (`first_chunk_frames`) nothing to attend to."""
    if not isinstance(d, dict):
        raise WorkbenchError(f"an intervention entry must be a mapping with a kind, got {d!r}")
    unknown = sorted(set(d) - ENTRY_KEYS)
    if unknown:
        raise WorkbenchError(f"intervention entry {d}: unknown keys {unknown}; allowed: {sorted(ENTRY_KEYS)}")
    kind = d.get("kind")
    if kind not in KINDS and kind not in OWN_KINDS:
        policy = kind in OWN_POLICIES or kind in POLICIES
        raise WorkbenchError(f"intervention kind {kind!r}; use one of {list(KINDS) + list(OWN_KINDS)}"
                             + (f" ({kind} is a cache policy: {{kind: policy, policy: {kind}, window: ..., "
                                "sink_frames: ...}})" if policy else OWN_HINT if not OWN_KINDS else ""))
    own = own_kind(kind, d.get("policy"))
    if "code" in d and own is None:
        raise WorkbenchError("code: is what a store records of a plugin's kind or policy, not a built-in entry's")
    if "settings" in d and own is None:
        raise WorkbenchError(f"settings: is for a kind or policy of your own (registered: "
                             f"{sorted(OWN_KINDS) + sorted(OWN_POLICIES) or 'none'}), not a built-in "
                             f"{kind if kind != 'policy' else str(d.get('policy')) + ' policy'}'s")
    if own is not None:
        return _parse_own(d, own, num_layers, num_heads, num_frames=num_frames, num_steps=num_steps,
                          num_chunks=num_chunks, chunk_frames=chunk_frames)
    if "static_heads" in d and kind != "policy":
        raise WorkbenchError(f"static_heads is a headwise policy's setting, not a {kind} entry's")
    e = Entry(kind=kind, label="")
    _read_calls(e, d, num_layers, num_heads, num_steps, num_chunks)
    if kind == "ablate":
        e.mode = d.get("mode", "zero")
        if e.mode not in ("zero", "mean", "resample"):
            raise WorkbenchError(f"ablation mode {e.mode!r}; use zero, mean or resample")
        if e.mode == "resample":
            e.resample_prompt = d.get("resample_prompt")
            if not e.resample_prompt:
                raise WorkbenchError("a resample ablation needs resample_prompt (the prompt its head outputs come from)")
            e.resample_seed = None if d.get("resample_seed") is None else int(d["resample_seed"])
    if kind in ("knockout", "sink"):
        e.frames = _ints(d.get("frames", [0] if kind == "sink" else None), "frame", num_frames, "the rollout") or []
        if not e.frames:
            raise WorkbenchError(f"a {kind} entry needs frames (absolute latent frames, e.g. 0 or 0-2)")
        e.history_only = bool(d.get("history_only", True))
        if kind == "knockout" and not e.history_only and first_chunk_frames and \
                set(range(first_chunk_frames)) <= set(e.frames):
            raise WorkbenchError(f"knockout of frames {e.frames} with history_only false: the first chunk's query "
                                 f"frames 0-{first_chunk_frames - 1} would attend to no key frame; keep one of them, "
                                 "or leave history_only true (later chunks then never see the frames)")
        if e.history_only and num_chunks and first_chunk_frames:
            starts = [0] + [first_chunk_frames + c * (chunk_frames or 0) for c in range(num_chunks - 1)]
            chosen = e.chunks or range(num_chunks)
            if starts[max(chosen)] <= min(e.frames):
                from workbench.summary import format_int_list

                last = max(chosen)
                where = "the rollout is one chunk (all frames denoised together)" if num_chunks == 1 else \
                    f"the last {'chosen ' if e.chunks else ''}chunk ({last}) starts at frame {starts[last]}"
                does = "hides a frame from" if kind == "knockout" else "scales a frame's logits in"
                raise WorkbenchError(f"{kind} of frames {format_int_list(e.frames)} with history_only true changes "
                                     f"nothing: it {does} the chunks that start after it, and {where}; choose "
                                     "earlier frames or later chunks, or set history_only false (the frames' own "
                                     "chunk then sees the change too)")
    if kind in ("temperature", "sink"):
        if "value" not in d:
            raise WorkbenchError(f"a {kind} entry needs value (the {'temperature' if kind == 'temperature' else 'factor'})")
        e.value = _number(d["value"], "temperature" if kind == "temperature" else "sink factor")
        if kind == "temperature" and not e.value > 0:
            raise WorkbenchError(f"temperature {e.value}: use a positive number")
    if kind in ("knockout", "sink") and e.attention != "self":
        raise WorkbenchError(f"a {kind} acts on self-attention key frames; attention must be self")
    if kind == "policy":
        _read_policy(e, d, num_layers, num_heads, num_frames, chunk_frames)
    e.label = str(d.get("label") or default_label(e))
    return e


def _read_policy(e: Entry, d: dict, num_layers: int, num_heads: int, num_frames: int | None,
                 chunk_frames: int | None) -> None:
    """A cache-policy entry's settings into `e`, each checked against the model (layers, heads) and, when given,
    the rollout (frames, chunk size): a policy that would evict nothing or hold no chunk is refused."""
    e.policy = d.get("policy")
    if e.policy not in POLICIES:
        raise WorkbenchError(f"cache policy {e.policy!r}; use one of {list(POLICIES) + list(OWN_POLICIES)}"
                             f"{OWN_HINT if not OWN_POLICIES else ''}")
    _read_window(e, d, deep=e.policy == "deepsink")
    e.store, e.threshold = d.get("store"), _number(d.get("threshold", 0.8), "policy threshold")
    e.static_recent = int(_number(d.get("static_recent", 6), "policy static_recent", integer=True))
    if d.get("sink_rule", DEEP_SINK_RULE) != DEEP_SINK_RULE:
        raise WorkbenchError(f"sink_rule {d['sink_rule']!r}: the deep sink's rule is {DEEP_SINK_RULE!r}")
    if d.get("split", HEAD_SPLIT) != HEAD_SPLIT:
        raise WorkbenchError(f"split {d['split']!r}: the head-wise split is {HEAD_SPLIT!r} (the sink frames and "
                             "the newest static_recent frames up to the query's chunk end)")
    # (read by no other policy: a setting that changes nothing is refused; an older store's spec of a fifo policy
    # recorded every field, the head split's at their defaults: those go on)
    given = [k for k, default in (("store", None), ("threshold", 0.8), ("static_recent", 6))
             if d.get(k) is not None and d.get(k) != default]
    if given and e.policy != "headwise":
        raise WorkbenchError(f"{', '.join(given)}: a headwise policy's setting{'s' if len(given) > 1 else ''} (the "
                             f"head split), not a {e.policy} policy's; drop {'them' if len(given) > 1 else 'it'}"
                             + (f" (--policy {e.policy}:{e.window}:{e.sink_frames})" if "store" in given else ""))
    if "static_heads" in d:  # (the split as a stored spec records it, or chosen by hand)
        if e.policy != "headwise":
            raise WorkbenchError(f"static_heads is a headwise policy's setting, not a {e.policy} policy's")
        e.static_heads = _pairs(d["static_heads"], num_layers, num_heads)
    if e.policy == "headwise" and not e.store and e.static_heads is None:
        raise WorkbenchError("a headwise policy needs store (an extract store whose attn_mass splits the heads) "
                             "or static_heads (its [layer, head] pairs)")
    if e.store and not Path(e.store).exists() and e.static_heads is None:
        raise WorkbenchError(f"store {e.store!r} does not exist (an entry already in an effects store goes on "
                             "without it: its intervention_spec, static_heads included, as a --spec entry)")
    if e.policy == "headwise" and e.store and Path(e.store).exists():
        _check_attention_store(e.store)
    if e.policy == "fifo" and e.sink_frames:
        raise WorkbenchError(f"a fifo policy keeps no sink (sink_frames {e.sink_frames}); use the sink policy, "
                             f"e.g. sink:{e.window}:{e.sink_frames}")
    if e.policy == "deepsink" and not e.sink_frames:
        raise WorkbenchError(f"a deep sink of 0 sink frames is a fifo window: give sink frames (e.g. "
                             f"deepsink:{e.window}:{e.window // 2}, or leave them out: half the window), or use "
                             f"fifo:{e.window}")
    # (a built-in policy's capacity is its window; a headwise one's static heads mask even then: below)
    if num_frames and num_frames <= e.window and e.policy != "headwise":
        raise WorkbenchError(full_cache(f"{e.policy} (window {e.window}, sink_frames {e.sink_frames})", e.window,
                                        num_frames, chunk_frames))
    if chunk_frames and e.window < e.sink_frames + chunk_frames:
        raise WorkbenchError(f"policy window {e.window}: it must hold the {e.sink_frames} sink frame(s) and a "
                             f"chunk of {chunk_frames}: at least {e.sink_frames + chunk_frames}")
    if e.policy == "attention" and chunk_frames and e.window <= e.sink_frames + 2 * chunk_frames:
        # (beside the next chunk, the window keeps the sink and the newest chunk: no frame is left to choose; a
        # warning, as for a head-wise split without static heads)
        from models.errors import ModelInputWarning

        warnings.warn(f"cache policy attention (window {e.window}, sink_frames {e.sink_frames}) has no frame to "
                      f"choose: beside the next chunk ({chunk_frames}) its window keeps the {e.sink_frames} sink "
                      f"frame(s) and the newest frames and nothing else, so this attention policy is the sink "
                      f"policy sink:{e.window}:{e.sink_frames} (bitwise); give a window above "
                      f"{e.sink_frames + 2 * chunk_frames} for a choice", ModelInputWarning, stacklevel=3)
    seen = min(e.window, num_frames or e.window)  # the most frames a dynamic head sees at once
    if e.policy == "headwise" and e.static_recent >= seen - e.sink_frames:
        held = f"a window of {e.window} holds" if seen == e.window else f"the rollout's {num_frames} frames hold"
        least = e.sink_frames + e.static_recent
        more = [f"a window above {least}"] * (e.window <= least) + \
            [f"more --frames than {least}"] * bool(num_frames and num_frames <= least)
        below = seen - e.sink_frames  # (a static_recent that still holds a chunk, when there is one)
        raise WorkbenchError(f"static_recent {e.static_recent} keeps every frame {held} beside its "
                             f"{e.sink_frames} sink frame(s): a static head would see what a dynamic one sees, so "
                             f"the split changes nothing; give {' and '.join(more)} (--policy "
                             f"headwise:WINDOW:SINK:STORE keeps static_recent {Entry.static_recent}; a --spec "
                             f"entry sets it)" + (f", or static_recent below {below}"
                                                  if below > (chunk_frames or 0) else ""))
    if chunk_frames and e.policy == "headwise" and e.static_recent < chunk_frames:
        raise WorkbenchError(f"static_recent {e.static_recent} is less than a chunk of {chunk_frames} frames: a "
                             f"static head sees its own chunk whole, so give at least {chunk_frames}")
    if e.policy == "headwise" and e.store and Path(e.store).exists():
        given, e.static_heads = e.static_heads, None
        static_heads_of(e)  # (the entry's identity: the heads its store gives, whatever path named the store)
        if given is not None and given != e.static_heads:
            raise WorkbenchError(f"static_heads {given} differ from the heads store {e.store!r} gives "
                                 f"({e.static_heads}, threshold {e.threshold:g}, static_recent {e.static_recent}); "
                                 "give one of them")
    if e.policy == "headwise" and not e.static_heads:
        none = (f"no head of store {e.store!r} is static (keeps {e.threshold:g} of its attention on the "
                f"{e.sink_frames} sink frame(s) and the newest {e.static_recent})" if e.store else
                "static_heads is empty")
        if num_frames and num_frames <= e.window:  # neither an eviction nor a mask: nothing changes
            raise WorkbenchError(f"{none}, and " + full_cache(f"headwise (window {e.window}, sink_frames "
                                                               f"{e.sink_frames})", e.window, num_frames,
                                                               chunk_frames))
        from models.errors import ModelInputWarning

        fix = "lower the threshold (a --spec entry sets it) or name static_heads" if e.store else \
            "name some [layer, head] pairs in static_heads"
        warnings.warn(f"{none}: this headwise policy is the sink policy sink:{e.window}:{e.sink_frames}; {fix} "
                      "for a split", ModelInputWarning, stacklevel=3)


OWN_HINT = (" (a kind or policy of your own: register it in a module named by WORKBENCH_PLUGINS, "
            "docs/architecture.md)")


def _short(v) -> str:
    """A setting's value in a label: numbers as %g, lists joined by -."""
    if isinstance(v, list):
        return "-".join(_short(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _parse_own(d: dict, own: EntryKind, num_layers: int, num_heads: int, *, num_frames, num_steps, num_chunks,
               chunk_frames) -> Entry:
    """An entry of a kind or policy of your own: the calls (an intervention) or the window (a policy) as the
    built-in ones take them, its settings over its defaults, and the object built once to check it."""
    from workbench.hooks import CallFilter, check_kind

    # (code: as a store's intervention_spec records it, given back as an entry: what runs now is compared instead)
    allowed = {"kind", "label", "settings", "code", *(("policy", "window", "sink_frames") if own.policy else CALLS)}
    if unknown := sorted(set(d) - allowed):
        what = f"the policy {own.name!r}" if own.policy else f"an entry of kind {own.name!r}"
        raise WorkbenchError(f"{unknown}: {what} takes {sorted(allowed - {'kind', 'code'})} (its own settings under "
                             "settings:)")
    e = Entry(kind=d["kind"], label="", settings=_own_settings(d, own))
    if own.policy:
        e.policy = own.name
        _read_window(e, d)
        obj = _built(own, (e.window, e.sink_frames), e.settings)
        _check_policy_object(obj, own, num_frames, chunk_frames)
    else:
        _read_calls(e, d, num_layers, num_heads, num_steps, num_chunks)
    e.label = str(d.get("label") or default_label(e))
    if not own.policy:
        filt = CallFilter(layers=e.layers, kinds={e.attention}, steps=e.steps, chunks=e.chunks)
        obj = _built(own, (filt, None if e.heads is None else tuple(e.heads), e.label), e.settings)
        try:
            check_kind(obj)
        except ValueError as err:
            raise WorkbenchError(f"intervention kind {own.name!r}: {err}") from None
        if not hasattr(obj, "edits"):
            raise WorkbenchError(f"intervention kind {own.name!r}: its build returned a probe ({type(obj).__name__}), "
                                 "not an intervention (edits, edit_inputs / edit_output)")
    e.code = code_of(own, obj)
    return e


def code_of(own: EntryKind, obj) -> str:
    """What identifies the code an entry of a plugin's kind runs, for its store: the names of its build and of the
    user's classes of what the build returned (not the workbench's, torch's or Python's), and a hash of their
    compiled code (functions' bytecode and constants, classes' simple attributes: the code that runs, wherever it
    was defined, a notebook cell included; not its comments or docstrings) and of the module constants it names
    (`SCALE = 0.5` edited to 0.0: an entry's results from before were kept as the new code's). An edited class (a
    cell run again) is other code: a store holding the entry's results from before refuses to resume it under the
    same label, as it refuses other settings. The same code gives the same identity in every process of one Python
    version (code that names no module constant keeps the identity it had before constants counted)."""
    mine = [c for c in type(obj).__mro__ if c.__module__.split(".")[0] not in NOT_USERS]
    return code_identity(own.build, *mine, values=constants_read(own.build, *mine))


def default_label(e: Entry) -> str:
    from workbench.summary import format_int_list

    sel = lambda name, xs: "" if xs is None else f"{name}{format_int_list(xs)}"  # noqa: E731
    where = ".".join(x for x in (sel("L", e.layers), sel("H", e.heads), sel("s", e.steps), sel("c", e.chunks)) if x)
    where = where + ("" if e.attention == "self" else ".cross")
    if (own := own_kind(e.kind, e.policy)) is not None:  # its name and the settings that differ from its defaults
        defaults = _recorded(own.settings)
        changed = ",".join(f"{k}={_short(v)}" for k, v in e.settings.items() if v != defaults.get(k))
        name = f"policy-{e.policy}:{e.window}+sink{e.sink_frames}" if own.policy else e.kind  # (':' none of theirs has)
        return name + (f"({changed})" if changed else "") + ("" if own.policy else f":{where or 'all'}")
    if e.kind == "ablate":
        return f"ablate-{e.mode}:{where or 'all'}"
    if e.kind in ("knockout", "sink") and not e.history_only:  # (its own chunk too: another entry than the default)
        where = (where or "all") + ".every-call"
    if e.kind == "knockout":
        return f"knockout{format_int_list(e.frames)}:{where or 'all'}"
    if e.kind == "temperature":
        return f"temperature{e.value:g}:{where or 'all'}"
    if e.kind == "sink":
        return f"sink{format_int_list(e.frames)}x{e.value:g}:{where or 'all'}"
    extra = f"+sink{e.sink_frames}" if e.policy != "fifo" else ""
    return f"policy-{e.policy}{e.window}{extra}"


# the short flag forms (--help shows them)
FLAG_FORMS = {"ablate": "LAYERS:HEADS[:zero|mean|resample]", "temperature": "LAYERS:HEADS:T",
              "knockout": "FRAMES[:LAYERS]", "sink": "FACTOR[:FRAMES[:LAYERS]]", "policy": "NAME:WINDOW[:SINK[:STORE]]"}


def parse_flag(kind: str, text: str) -> dict:
    """The short flag forms (see the CLI's help) -> a spec entry dict."""
    parts = text.split(":")
    if len(parts) > FLAG_FORMS[kind].count(":") + 1:
        raise _bad_form(kind, text)  # (a field more than the form has would be ignored)
    try:
        if kind == "ablate":  # LAYERS:HEADS[:MODE]
            d = dict(kind="ablate", layers=parts[0], heads=parts[1])
            if len(parts) > 2:
                d["mode"] = parts[2]
            return d
        if kind == "temperature":  # LAYERS:HEADS:T
            return dict(kind="temperature", layers=parts[0], heads=parts[1], value=float(parts[2]))
        if kind == "knockout":  # FRAMES[:LAYERS]
            return dict(kind="knockout", frames=parts[0], **({"layers": parts[1]} if len(parts) > 1 else {}))
        if kind == "sink":  # FACTOR[:FRAMES[:LAYERS]]
            d = dict(kind="sink", value=float(parts[0]), frames=parts[1] if len(parts) > 1 else "0")
            if len(parts) > 2:
                d["layers"] = parts[2]
            return d
        if kind == "policy":  # NAME:WINDOW[:SINK[:STORE]]
            d = dict(kind="policy", policy=parts[0], window=int(parts[1]))
            if len(parts) > 2:
                d["sink_frames"] = int(parts[2])
            if len(parts) > 3:
                d["store"] = parts[3]
            return d
    except (IndexError, ValueError):
        pass
    raise _bad_form(kind, text)


def _bad_form(kind: str, text: str) -> WorkbenchError:
    """The error of a flag that does not have its form (too few fields, too many, or a value not a number)."""
    return WorkbenchError(f"--{kind} {text!r}: use {FLAG_FORMS[kind]}")


def sweep_entries(layers: list[int], num_heads: int, mode: str = "zero") -> list[dict]:
    """One single-head ablation per head of each layer (self-attention)."""
    return [dict(kind="ablate", layers=[layer], heads=[h], mode=mode) for layer in layers for h in range(num_heads)]


# ------------------------------------------------------------------------------------------------------ objects
def build(e: Entry, sources: dict):
    """The intervention object of an entry (None for a policy), with its sources (`sources[label]`)."""
    from workbench import interventions as iv
    from workbench.hooks import CallFilter

    filt = CallFilter(layers=e.layers, kinds={e.attention}, steps=e.steps, chunks=e.chunks)
    if e.kind == "ablate":
        return iv.HeadAblation(filt, e.heads, mode=e.mode, source=sources.get(e.label), label=e.label)
    if e.kind == "knockout":
        return iv.KeyFrameKnockout(e.frames, filt, e.heads, label=e.label, history_only=e.history_only)
    if e.kind == "temperature":
        return iv.HeadTemperature(e.value, filt, e.heads, label=e.label)
    if e.kind == "sink":
        return iv.SinkScaling(e.value, e.frames, filt, e.heads, label=e.label, history_only=e.history_only)
    if (own := own_kind(e.kind, e.policy)) is not None and not own.policy:
        return _built(own, (filt, None if e.heads is None else tuple(e.heads), e.label), e.settings)
    return None


def build_policy(e: Entry):
    from workbench import kv_policies as kp

    if (own := own_kind(e.kind, e.policy)) is not None:
        return _built(own, (e.window, e.sink_frames), e.settings)
    if e.policy == "fifo":
        return kp.FifoWindow(e.window)
    if e.policy == "sink":
        return kp.WindowSink(e.window, e.sink_frames)
    if e.policy == "deepsink":
        return kp.DeepSink(e.window, e.sink_frames)
    if e.policy == "attention":
        return kp.AttentionGuided(e.window, e.sink_frames)
    return kp.HeadWise(e.window, e.sink_frames, static_heads_of(e), e.static_recent)


def static_heads_of(e: Entry) -> dict[int, list[int]]:
    """A headwise entry's static heads, layer -> heads: those its store's attn_mass gives (the split counts the
    frames a static head keeps: its sink frames and its newest static_recent), found once and kept in the entry's
    spec (`static_heads`, [layer, head] pairs) so that the entry is known by them, not by its store's path."""
    from workbench import kv_policies as kp

    if e.static_heads is None:
        static = kp.static_heads_from_store(e.store, e.threshold, e.static_recent, sink_frames=e.sink_frames,
                                            strict=True)  # (a store that cannot split the heads: refused)
        e.static_heads = [[int(layer), int(h)] for layer in sorted(static) for h in static[layer]]
    out: dict[int, list[int]] = {}
    for layer, h in e.static_heads:
        out.setdefault(layer, []).append(h)
    return out


def check_entries(entries: list[Entry], sampler: str) -> None:
    from collections import Counter

    counts = Counter(e.label for e in entries)
    dup = sorted({x for x, n in counts.items() if n > 1} | ({"baseline"} & set(counts)))
    if dup:
        named = f"{dup[:10]}" + (f" and {len(dup) - 10} more" if len(dup) > 10 else "")
        raise WorkbenchError(f"intervention labels {named} are used twice (or 'baseline', the store's reference); "
                             "give each entry its own label")
    if not entries:
        raise WorkbenchError("no intervention to run: give --spec FILE or flags such as --ablate 3:0 (see --help)")
    if sampler != "causal_few_step" and any(e.kind == "policy" for e in entries):
        raise WorkbenchError(f"cache policies run with the causal_few_step sampler only, not {sampler}")
