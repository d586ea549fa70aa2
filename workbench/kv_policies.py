"""KV-cache policies: after each chunk of a causal rollout, which frames each layer's cache keeps (optionally which
heads attend to which of them) and at which temporal RoPE positions.

How it fits: the interface (`CachePolicy`, `Keep`) and the mechanics (compacting slots in place, re-rotating keys
whose position moves) live in models/common/kv_cache.py; `causal_few_step(..., cache_policy=P)`
(models/common/rollout.py) calls `P.after_chunk` for every layer once a chunk is finished, its context pass
included. The policies here decide:

    FifoWindow(window)              the newest `window` frames (the first frames are dropped like any other)
    WindowSink(window, sink)        the first `sink` frames stay, then the newest: today's rolling window; with
                                    (local_attn_size, sink_size) it is bitwise the rollout without a policy
    DeepSink(window, sink)          a deep sink (Deep Forcing: about half the window) whose temporal RoPE positions
                                    are re-aligned to sit just before the newest frames held, so no key is far
                                    from the queries in time
    AttentionGuided(window, sink)   keep what the recent queries attend to most: per layer, the attention mass of
                                    the chunk's queries (every head, every step of the chunk, exact: computed
                                    from the kernel's log-sum-exp while the rollout runs) on each held frame; the
                                    sink always stays, and the newest chunk where the window has room for it
                                    beside the sink. An observer: attach it (`attach(model, policy)`) to the same
                                    rollout
    HeadWise(window, static, ...)   Forcing-KV's split: "static" heads (per layer) attend only to the sink and the
                                    newest `static_recent` frames, the other ("dynamic") heads to the whole window;
                                    `static_heads_from_store` reads the split from a store's attention mass

Every policy's `capacity` is the window; `key_frame` labels of attention calls are the frames actually held (the
cache's own record). Decisions of FifoWindow, WindowSink, DeepSink and HeadWise depend only on the frames held, so a
rollout with them may replay CUDA graphs (HeadWise excepted: its masked calls build their masks on the host);
AttentionGuided's depend on the data, so its rollouts run eagerly.
A head-wise cache holds the union of the heads' frames (no memory saved by this implementation); its heads attend
through one masked call per group of heads (models/common/attention.py), and capture is refused under it.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np
import torch

from models.common.kv_cache import KVCache, Keep
from workbench.hooks import CallFilter


def _check_window(window: int, sink: int) -> None:
    if window < 1 or sink < 0 or sink >= window:
        raise ValueError(f"cache window {window} with sink {sink}: use window >= 1 and 0 <= sink < window")


class WindowSink:
    """The first `sink` frames and the newest ones, `window` frames in all once the next chunk is written."""

    graph_safe = True

    def __init__(self, window: int, sink: int = 0):
        _check_window(window, sink)
        self.window, self.sink = int(window), int(sink)

    @property
    def name(self) -> str:
        return f"window{self.window}+sink{self.sink}"

    def describe(self) -> str:
        """What the policy decided as it ran, beyond its name (an effects store's intervention_detail): "" here."""
        return ""

    @property
    def key(self):
        return type(self).__name__, self.window, self.sink

    def capacity(self, num_frames: int, chunk_frames: int) -> int:
        if self.window < self.sink + chunk_frames:
            raise ValueError(f"{self.name}: a window of {self.window} frames has no room for a chunk of "
                             f"{chunk_frames} beside {self.sink} sink frames")
        return self.window

    def kept_frames(self, cache: KVCache, next_frames: int) -> list[int]:
        held = cache.frames
        room = self.window - next_frames
        if len(held) <= room:
            return list(held)
        sink = held[: self.sink]
        return sink + held[len(held) - (room - len(sink)):]

    def after_chunk(self, layer: int, cache: KVCache, chunk: int, next_frames: int) -> Keep | None:
        kept = self.kept_frames(cache, next_frames)
        return None if kept == cache.frames else Keep(kept)


class FifoWindow(WindowSink):
    """The newest `window` frames (a window without a sink)."""

    def __init__(self, window: int):
        super().__init__(window, 0)

    @property
    def name(self) -> str:
        return f"fifo{self.window}"


class DeepSink(WindowSink):
    """A deep sink (`sink` frames, Deep Forcing keeps 40-60% of the window) with its temporal RoPE re-aligned:
    sink frame i sits at position p0 - sink + i, p0 = the position of the oldest non-sink frame held (the next
    chunk's first frame when the window keeps the sink alone beside it, window = sink + chunk), so the sink is
    contiguous in time with the newest frames (before the window slides, p0 = sink: nothing moves)."""

    def __init__(self, window: int, sink: int, realign: bool = True):
        super().__init__(window, sink)
        self.realign = bool(realign)

    @property
    def name(self) -> str:
        return f"deepsink{self.sink}/{self.window}" + ("" if self.realign else "-norealign")

    def describe(self) -> str:
        return (f"sink frames 0-{self.sink - 1} kept" + (", their temporal RoPE positions moved to just before the "
                "oldest other frame held (contiguous with the window)" if self.realign else ", at their own positions"))

    @property
    def key(self):
        return super().key + (self.realign,)

    def after_chunk(self, layer: int, cache: KVCache, chunk: int, next_frames: int) -> Keep | None:
        kept = self.kept_frames(cache, next_frames)
        if not self.realign or len(kept) < self.sink:  # (the sink not yet full: nothing to move)
            return None if kept == cache.frames else Keep(kept)
        pos = dict(zip(cache.frames, cache.positions))
        # the oldest other frame kept, or with none (the sink alone beside the next chunk) that chunk's first frame,
        # one after the newest frame held (the frames after the sink sit at their own frame index)
        first_recent = pos[kept[self.sink]] if len(kept) > self.sink else pos[cache.frames[-1]] + 1
        positions = [first_recent - self.sink + i if i < self.sink else pos[f] for i, f in enumerate(kept)]
        return None if kept == cache.frames and positions == cache.positions else Keep(kept, positions)


class AttentionGuided(WindowSink):
    """Keep the sink, the newest `recent` frames (default: one chunk) and, of the rest, the frames the chunk's
    queries attended to most (attention mass summed over the layer's heads, query tokens and the chunk's steps),
    up to the window. It observes the rollout's self-attention calls (attach it with the policy's rollout)."""

    graph_safe = False  # which frames stay depends on the attention
    needs_lse = True

    def __init__(self, window: int, sink: int = 0, recent: int | None = None, filter: CallFilter | None = None):
        super().__init__(window, sink)
        self.recent = recent
        self.filter = filter or CallFilter(kinds={"self"})
        self.mass: dict[int, dict[int, float]] = {}  # layer -> key frame -> attention mass since the last chunk
        self.chosen: list[tuple[int, int, tuple[int, ...]]] = []  # (chunk, layer, frames kept by their attention)

    @property
    def name(self) -> str:
        return f"attention{self.window}+sink{self.sink}"

    def describe(self) -> str:
        """The frames each chunk found kept for their attention (besides the sink and the newest frames), over the
        layers and the rollouts this policy ran: the commonest choice per chunk, and how often others were made."""
        by_chunk: dict[int, Counter] = {}
        for chunk, _, frames in self.chosen:
            by_chunk.setdefault(chunk, Counter())[frames] += 1
        parts = []
        for chunk, counts in sorted(by_chunk.items()):
            (frames, n), total = counts.most_common(1)[0], sum(counts.values())
            others = f"; {len(counts) - 1} other choice(s) in the rest" if len(counts) > 1 else ""
            parts.append(f"chunk {chunk + 1}: {list(frames)} ({n} of {total} layer rollouts{others})")
        return ("frames kept by attention, besides the sink and the newest: " + "; ".join(parts)) if parts else ""

    @property
    def key(self):
        return super().key + (self.recent, self.filter)

    # the observer half (models/common/attention.py AttentionObserver)
    def wants(self, call) -> bool:
        return call.kind == "self" and call.key_frames is not None and self.filter.matches(call)

    def observe(self, call, q, k, v, out, lse) -> None:
        from workbench.reductions import frame_mass

        m = frame_mass(q, k, lse, call.frame_seq_len, call.frame_mask)  # [B, H, nqf, nkf]
        per_frame = m.double().sum(dim=(0, 1, 2)).tolist()
        acc = self.mass.setdefault(call.layer, {})
        for f, x in zip(call.key_frames, per_frame):
            acc[f] = acc.get(f, 0.0) + x

    # the policy half
    def after_chunk(self, layer: int, cache: KVCache, chunk: int, next_frames: int) -> Keep | None:
        held, room = cache.frames, self.window - next_frames
        mass = self.mass.pop(layer, {})
        if len(held) <= room:
            return None
        recent = self.recent if self.recent is not None else next_frames or 1
        recent = min(recent, max(0, room - self.sink))  # the window bounds what stays: the newest that fit the sink
        fixed = set(held[: self.sink]) | (set(held[-recent:]) if recent else set())
        others = [f for f in held if f not in fixed]
        if not mass and others:
            raise RuntimeError(f"{self.name}: no attention was observed in layer {layer}; attach the policy to the "
                               "model for its rollout (attach(model, policy))")
        ranked = sorted(others, key=lambda f: (-mass.get(f, 0.0), -f))  # ties: the newer frame
        picked = ranked[: max(0, room - len(fixed))]
        self.chosen.append((chunk, layer, tuple(sorted(picked))))
        chosen = fixed | set(picked)
        return Keep([f for f in held if f in chosen])


class HeadWise(WindowSink):
    """A window + sink cache in which the `static` heads ({layer: heads}) attend only to the sink and the newest
    `static_recent` frames (Forcing-KV's static heads: the current chunk and the transition anchor), the other
    heads to everything held. Its rollouts run eagerly: each group of heads is a masked call whose mask is built
    on the host."""

    graph_safe = False
    heads_differ = True  # its heads attend to different frames (Keep.head_mask): observers are refused under it

    def __init__(self, window: int, sink: int, static: dict[int, Iterable[int]], static_recent: int = 6):
        super().__init__(window, sink)
        self.static = {int(layer): tuple(sorted(int(h) for h in heads)) for layer, heads in static.items()}
        self.static_recent = int(static_recent)

    @property
    def name(self) -> str:
        n = sum(len(h) for h in self.static.values())
        return f"headwise{self.window}+sink{self.sink}:{n}static/recent{self.static_recent}"

    def describe(self) -> str:
        heads = "; ".join(f"layer {layer}: {', '.join(map(str, h))}" for layer, h in sorted(self.static.items()))
        return (f"static heads (attend to the {self.sink} sink frame(s) and the newest {self.static_recent} only): "
                + (heads or "none"))

    @property
    def key(self):
        return super().key + (tuple(sorted(self.static.items())), self.static_recent)

    def capacity(self, num_frames: int, chunk_frames: int) -> int:
        if self.static_recent < chunk_frames:  # (a chunk's queries always see their own chunk)
            raise ValueError(f"{self.name}: static_recent {self.static_recent} is less than a chunk of "
                             f"{chunk_frames} frames; a static head sees its own chunk whole, so give at least "
                             f"{chunk_frames}")
        # (its window may be longer than the rollout, whose static heads still mask: then the rollout's frames)
        return min(super().capacity(num_frames, chunk_frames), num_frames)

    def after_chunk(self, layer: int, cache: KVCache, chunk: int, next_frames: int) -> Keep | None:
        kept = self.kept_frames(cache, next_frames)
        heads = self.static.get(layer, ())
        if not heads:
            return None if kept == cache.frames else Keep(kept)
        mask = torch.ones(cache.k.shape[2], len(kept), dtype=torch.bool)
        # after the next chunk is appended, its queries see the sink and the newest static_recent frames
        newest = kept[-max(0, self.static_recent - next_frames):] if self.static_recent > next_frames else []
        allowed = set(kept[: self.sink]) | set(newest)
        for h in heads:
            mask[h] = torch.tensor([f in allowed for f in kept])
        return Keep(kept, head_mask=mask)


def static_heads_from_store(path, threshold: float = 0.8, span: int = 6, sink_frames: int = 1, *,
                            strict: bool = False) -> dict[int, list[int]]:
    """Forcing-KV's head taxonomy from a store's `attn_mass`: a head is static when, on average over samples,
    denoising steps and the query frames after the first chunk, at least `threshold` of its attention falls on
    the first `sink_frames` frames and the newest `span` frames when its chunk runs (up to the chunk's last frame):
    the frames a static head of `HeadWise(window, sink_frames, ..., static_recent=span)` sees; else dynamic.
    A store whose queries saw no other frame cannot split the heads: a warning, or with `strict` (`workbench
    intervene`) a WorkbenchError."""
    import xarray as xr

    from workbench.store import open_store

    ds = open_store(path)
    if "attn_mass" not in ds:
        raise ValueError(f"{path}: the store has no attn_mass (extract it with --stats attn_mass)")
    m = ds.attn_mass.where(ds.phase == "denoise", drop=True)
    m = m.where(m.query_chunk > 0, drop=True)
    # a static head sees the sink and the newest `span` frames held when its chunk runs: those up to its chunk's end
    chunk = m.query_chunk.values
    end = xr.DataArray([m.query_frame.values[chunk == c].max() for c in chunk], dims="query_frame",
                       coords={"query_frame": m.query_frame})
    near = (m.key_frame < sink_frames) | ((m.key_frame <= end) & (m.key_frame > end - span))
    # a store whose queries saw nothing a static head would not keep (e.g. extracted with a KV window no wider than
    # the static heads' frames) makes every head static whatever its attention
    if not bool((m.notnull() & ~near).any()):
        window = ""
        if "local_attn_size" in ds.coords and "sink_size" in ds.coords:
            sizes = sorted({(int(a), int(b)) for a, b in zip(np.atleast_1d(ds["local_attn_size"].values),
                                                             np.atleast_1d(ds["sink_size"].values))})
            window = " (its KV cache: " + ", ".join(f"window {a}, sink {b}" if a != -1 else "global attention"
                                                     for a, b in sizes) + ")"
        why = (f"{path}: its queries after chunk 0 attend to no key frame outside the first {sink_frames} and the "
               f"newest {span} up to their chunk's end{window}, so every head would be static whatever its "
               "attention; split the heads on a store whose queries saw more (a wider --local-attn-size, global "
               "attention or more --frames), or keep fewer frames per static head (sink frames, static_recent)")
        if strict:
            from workbench.errors import WorkbenchError

            raise WorkbenchError(f"headwise policy: store {why}")
        import warnings

        from models.errors import ModelInputWarning

        warnings.warn(why, ModelInputWarning, stacklevel=2)
    local = m.where(near).sum("key_frame").mean([d for d in ("sample", "step", "query_frame") if d in m.dims])
    local = local.transpose("layer", "head")
    out: dict[int, list[int]] = {}
    for i, layer in enumerate(local.layer.values):
        heads = [int(h) for j, h in enumerate(local["head"].values) if float(local.values[i, j]) >= threshold]
        if heads:
            out[int(layer)] = heads
    return out
