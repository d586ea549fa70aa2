"""The statistics registry: every statistic a store can hold, defined once.

A `Statistic` names a store variable and says everything the rest of the workbench needs to know about it:
its dims, which attention calls it reads (self / cross), whether it needs the row log-sum-exp, how one call is
reduced to it (`reduce`, one function of workbench/reductions.py), which capture modes get it from the
attention kernel's own pass instead (`from_kernel`), and its texts (store attributes, `--stats` help). The
capture buffers (workbench/capture.py), the store's variables and attributes (workbench/store.py), the
`--stats` help and its validation (workbench/commands/extract.py) and docs/store.md (checked by
tests/test_statistics.py) all read this table, so adding a statistic is adding one entry here and its
reduction.

Dims: ("sample", "step", layer dim, "head", "query_frame"[, key dim]). The layer dim is "layer", or
"token_layer" for statistics captured only on `--token-layers`; the key dim, when there is one, is
"key_frame", "key_token" or "text_token". Pairs a query frame did not attend are NaN in a key_frame or
key_token dim (workbench/capture.py places values by these dims, whatever the statistic).

This module imports nothing heavy (the CLI reads it to build `--help`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from workbench.errors import WorkbenchError


@dataclass
class CallTensors:
    """What a reduction reads: one attention call as the kernel saw it, restricted to the captured heads."""

    q: Any  # [B, Lq, h, D]
    k: Any  # [B, Lk, h, D] (Lk = text_len for cross-attention)
    lse: Any  # [B, h, Lq] float32 natural log, or None (when no captured statistic needs it)
    frame_seq_len: int
    frame_mask: Any = None  # [nqf, nkf] bool, True = attended; None = all
    given: dict = field(default_factory=dict)  # what the kernel's pass already computed (see `from_kernel`)
    query_frames: tuple = ()  # the absolute latent frame of each query frame, in token order
    key_frames: tuple | None = None  # the same of each key frame (None: cross-attention, whose keys are text)


@dataclass(frozen=True)
class Statistic:
    name: str
    dims: tuple[str, ...]  # store dims, "sample" first
    kind: str  # "self" | "cross": the attention calls it reads
    needs_lse: bool  # its `reduce` reads the row log-sum-exp
    reduce: Callable[[CallTensors], Any]  # -> float32 [B, h, nqf(, key dim)]
    long_name: str
    units: str
    description: str  # the variable's `description` attribute: its definition in one paragraph
    help: str  # a few words for `--stats`
    from_kernel: tuple[str, ...] = ()  # capture modes whose kernel pass gives it (then `reduce` reads `given`)
    default: bool = False  # captured when `--stats` is not given

    @property
    def layer_dim(self) -> str:
        return self.dims[2]

    @property
    def key_dim(self) -> str | None:
        return self.dims[5] if len(self.dims) > 5 else None

    @property
    def attrs(self) -> dict:
        return dict(long_name=self.long_name, units=self.units, description=self.description)


# --------------------------------------------------------------------------------------------------
# Reductions (workbench/reductions.py, imported when a call is reduced)


def _attn_mass(t: CallTensors):
    if "attn_mass" in t.given:
        return t.given["attn_mass"]
    from workbench import reductions

    return reductions.frame_mass(t.q, t.k, t.lse, t.frame_seq_len, t.frame_mask)


def _attn_logit(t: CallTensors):
    from workbench import reductions

    return reductions.mean_logit(t.q, t.k, t.frame_seq_len, means=t.given.get("frame_means"))


def _cross_mass(t: CallTensors):
    from workbench import reductions

    return reductions.cross_mass(t.q, t.k, t.frame_seq_len)


def _attn_key_token(t: CallTensors):
    from workbench import reductions

    return reductions.key_token_mass(t.q, t.k, t.lse, t.frame_seq_len, t.frame_mask)


def _attn_frame_entropy(t: CallTensors):
    from workbench import reductions

    return reductions.frame_entropy(t.q, t.k, t.lse, t.frame_seq_len, t.frame_mask)


# --------------------------------------------------------------------------------------------------
# The registry

FRAME_PAIR = ("sample", "step", "layer", "head", "query_frame", "key_frame")

STATISTICS: dict[str, Statistic] = {}


KEY_DIMS = {"self": ("key_frame", "key_token"), "cross": ("text_token",)}  # the key dims each kind's calls have


def register(stat: Statistic, *, replace: bool = False) -> Statistic:
    """Add a statistic (a plugin's too: docs/architecture.md, "Statistics registry"), checked first: its name is
    new and a name, its kind is self or cross, its dims are the ones the module docstring allows (the probe sizes
    and places values by them) and it has the texts that define its store variable. `replace`: a statistic of your
    own registered before under this name gives way (a notebook cell run again; a built-in one never does)."""
    name = stat.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"statistic name {name!r}: use a Python identifier (it is a store variable, e.g. ds.{name})")
    built_in = globals().get("BUILT_IN", frozenset())  # (empty while the built-in ones are registered)
    if name in STATISTICS and (not replace or name in built_in):
        again = "" if name in built_in else " (or register(..., replace=True): a notebook cell run again)"
        raise ValueError(f"statistic {name!r} is registered already{again}")
    if stat.kind not in KEY_DIMS:
        raise ValueError(f"statistic {name!r}: kind {stat.kind!r} is not 'self' or 'cross'")
    dims = tuple(stat.dims)
    if not (len(dims) in (5, 6) and dims[:2] == ("sample", "step") and dims[2] in ("layer", "token_layer")
            and dims[3:5] == ("head", "query_frame") and dims[5:] in ((), *((k,) for k in KEY_DIMS[stat.kind]))):
        keys = " or ".join(KEY_DIMS[stat.kind])
        raise ValueError(f"statistic {name!r}: dims {dims}; a {stat.kind}-attention statistic has (sample, step, layer "
                         f"or token_layer, head, query_frame) and optionally a key dim, {keys} (its reduce returns "
                         "[B, heads, query frames(, keys)])")
    blank = [t for t in ("long_name", "units", "description", "help") if not str(getattr(stat, t) or "").strip()]
    if blank:
        raise ValueError(f"statistic {name!r}: give {', '.join(blank)} (a store variable's attributes and the --stats "
                         "help are what define it to its readers)")
    STATISTICS[name] = stat
    return stat


register(Statistic(
    "attn_mass", FRAME_PAIR, "self", needs_lse=True, reduce=_attn_mass,
    long_name="self-attention mass per key frame", units="probability",
    description="(1/fsl) sum over the query tokens of query_frame of the softmax probability summed over the key "
                "tokens of key_frame; NaN where not attended",
    help="softmax mass of each query frame on each key frame", from_kernel=("fused", "indicator"), default=True))
register(Statistic(
    "attn_logit", FRAME_PAIR, "self", needs_lse=False, reduce=_attn_logit,
    long_name="mean pre-softmax logit per frame pair", units="logit",
    description="mean over the token pairs of (query_frame, key_frame) of q.k/sqrt(head_dim) = "
                "mean_q . mean_k / sqrt(head_dim); NaN where not attended",
    help="mean pre-softmax logit of a frame pair", from_kernel=("fused",), default=True))
register(Statistic(
    "cross_mass", ("sample", "step", "layer", "head", "query_frame", "text_token"), "cross", needs_lse=False,
    reduce=_cross_mass, long_name="cross-attention mass per text token", units="probability",
    description="(1/fsl) sum over the query tokens of query_frame of the softmax probability of each text token",
    help="cross-attention mass on each prompt token"))
register(Statistic(
    "attn_key_token", ("sample", "step", "token_layer", "head", "query_frame", "key_token"), "self",
    needs_lse=True, reduce=_attn_key_token, long_name="self-attention mass per key token", units="probability",
    description="(1/fsl) sum over the query tokens of query_frame of the softmax probability of each key token; "
                "NaN where not attended",
    help="mass on each key token, on --token-layers"))
register(Statistic(
    "attn_frame_entropy", ("sample", "step", "layer", "head", "query_frame"), "self", needs_lse=True,
    reduce=_attn_frame_entropy, long_name="attention entropy over key frames", units="nat",
    description="(1/fsl) sum over the query tokens i of query_frame of -sum_f p_if ln p_if, with p_if the softmax "
                "probability of token i summed over the key tokens of key frame f (0 ln 0 = 0); between 0 (all on "
                "one key frame) and ln(number of attended key frames)",
    help="entropy (nats) of each query token's mass over key frames, averaged per query frame"))

DEFAULT_STATS = tuple(name for name, s in STATISTICS.items() if s.default)
BUILT_IN = frozenset(STATISTICS)  # (the others are plugins': `identity`)


def identities(stats) -> dict[str, dict]:
    """{name: identity} of the plugins' statistics among `stats` (a store's fingerprint field `own_stats`; empty
    for built-in statistics alone, so that their stores keep the fingerprint they had)."""
    return {name: ident for name in stats if (ident := identity(name)) is not None}


def identity(name: str) -> dict | None:
    """What identifies a plugin's statistic for the stores it goes into (their fingerprint): its definition and
    its reduce's code (workbench/code_identity.py), so that a store of the old one refuses a changed one by name
    instead of mixing the two; None for a built-in statistic (its definition is docs/store.md's, this version's)."""
    if name in BUILT_IN:
        return None
    from workbench.code_identity import callable_identity

    s = STATISTICS[name]
    return dict(dims=list(s.dims), kind=s.kind, needs_lse=s.needs_lse, from_kernel=list(s.from_kernel), **s.attrs,
                code=callable_identity(s.reduce))


def get(name: str) -> Statistic:
    return STATISTICS[name]


def check_stats(stats, token_layers=(), layers=None) -> tuple[str, ...]:
    """The statistics of a request, checked before any work: known, not none, and `--token-layers` (a subset of
    the captured `layers`, when given; None: every captured layer) when a token-layer statistic is asked for."""
    stats = tuple(stats)
    unknown = [s for s in stats if s not in STATISTICS]
    if unknown:
        raise WorkbenchError(f"unknown statistic(s) {unknown}; known: {list(STATISTICS)} (a statistic of your own: "
                             "name the module that registers it in WORKBENCH_PLUGINS, docs/architecture.md)")
    if not stats:
        raise WorkbenchError(f"no statistic to capture; choose from {list(STATISTICS)}")
    token_stats = [name for name in stats if STATISTICS[name].layer_dim == "token_layer"]
    for name in token_stats:
        if token_layers is not None and not token_layers:
            raise WorkbenchError(f"{name} needs --token-layers (which layers get per-key-token maps)")
    if not token_stats and (token_layers is None or len(token_layers)):
        names = [s.name for s in STATISTICS.values() if s.layer_dim == "token_layer"]
        raise WorkbenchError(f"--token-layers {'all' if token_layers is None else list(token_layers)} names the "
                             f"layers of {' and '.join(names)}, which --stats {','.join(stats)} does not ask for: "
                             f"add it (e.g. --stats {','.join(stats + tuple(names))})")
    if layers is not None and token_layers is not None:
        stray = sorted(set(token_layers) - set(layers))
        if stray:
            raise WorkbenchError(f"token layers {stray} are not among the captured layers {list(layers)}")
    return stats


def stats_help() -> str:
    """The `--stats` help: every statistic with a few words, and the default."""
    listed = "; ".join(f"{s.name} ({s.help})" for s in STATISTICS.values())
    return f"comma-separated statistics (docs/store.md): {listed} (default: {','.join(DEFAULT_STATS)})"


def markdown_table() -> str:
    """The table of every statistic that docs/store.md holds between its `statistics` markers."""
    rows = ["| variable | dims | unit | reads | in `--stats` by default | made by the kernel's own pass in mode |",
            "|---|---|---|---|---|---|"]
    for s in STATISTICS.values():
        modes = ", ".join(f"`{m}`" for m in s.from_kernel) or \
            "none: from q, k" + (" and the log-sum-exp (`exact`)" if s.needs_lse else "")
        rows.append(f"| `{s.name}` | ({', '.join(s.dims)}) | {s.units} | {s.kind}-attention | "
                    f"{'yes' if s.default else 'no'} | {modes} |")
    return "\n".join(rows)

if __name__ == "__main__":  # the table docs/store.md holds: python -m workbench.statistics
    print(markdown_table())
