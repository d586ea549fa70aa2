"""The KV cache of the causal rollout, kept in whole latent frames, and the cross-attention cache.

Semantics are those of Self-Forcing's `CausalWanModel._forward_inference`:
- keys are stored after RoPE, with their absolute temporal positions, and never re-rotated;
- a forward for a chunk that was already written (the later denoising steps and the context pass) overwrites
  that chunk's slots; a forward for a new chunk appends;
- with a local window (`local_attn_size` frames) the cache holds that many frames; when a new chunk does not
  fit, the oldest frames after the first `sink_size` ones are evicted (the sink slots never move);
- every query of a call attends to every frame in the cache (its own chunk included).

The cache records which absolute frame each slot holds, so attention calls are labelled from what is really
there, not from a count. It also gives each slot a stamp, a number drawn from one process-wide counter whenever
the slot's keys are written or re-rotated (moving a frame to another slot keeps its stamp): equal stamps mean
equal keys, so an observer may keep something it computed from a frame's keys until the stamp changes
(`KeyStamps`; the statistics probe keeps each key frame's mean vector). On the CUDA inference path the model
makes a chunk's keys and values directly in their slots (`slots`, then `write` finds them in place and copies
nothing; models/wan/model.py `SelfAttention.cache_slots`).

Cache policies (`CachePolicy`; workbench/kv_policies.py implements FIFO window, window + sink, deep sink with
temporal RoPE re-alignment, attention-guided compression and head-wise policies): after each chunk of a rollout
the policy says, per layer, which held frames stay (`Keep`: frames in slot order, the temporal RoPE position of
each, optionally which heads attend to which of them). `KVCache.keep` compacts the slots in place (the tensors
keep their addresses, so CUDA graphs still read them) and re-rotates the temporal RoPE channels of a frame whose
position changes (RoPE is a rotation: moving a key from position p to p' is one more rotation by the angle of
p' - p; height and width channels are untouched). With no policy the cache behaves exactly as above.

Training (a forward with gradients, the exit step of Self-Forcing) sees the cache through a `GradWindow`; the
window's values are fixed when the forward starts, so backward (and an activation-checkpoint recompute) sees
what the forward saw even after later chunks and context passes wrote the cache. What gradient the past
entries carry is the rollout's `kv_gradient` (docs/training.md):
- "inplace" (the researchers' code): the chunk's keys/values are written into the cache with their gradient,
  as `CausalWanSelfAttention` writes its cache in place. A later chunk's exit forward reads the rows of an
  earlier chunk holding the context pass's values (written without gradient), but autograd still routes the
  gradient of those rows to the last forward that wrote them with gradient: the earlier chunk's exit step.
- "detached": the cache stores a detached copy; past keys/values carry no gradient (the paper's truncation).

The cross-attention cache holds the text keys/values of the rollout's first forward; `text_kv_gradient` says
when an exit forward computes them afresh (with gradient) instead:
- "follows_checkpointing" (the researchers' code): when the model checkpoints activations (their checkpointed
  block path is not given the cross-attention cache), otherwise never;
- "every_exit": always, so the text parameters get the same gradient with and without checkpointing;
- "first_forward": never (the text parameters get gradient only when the first forward is an exit step).
"""

from __future__ import annotations

import itertools
import numbers
from dataclasses import dataclass
from typing import Hashable, Protocol

import torch

from models.errors import ModelInputError, check_takes

KV_GRADIENTS = ("inplace", "detached")
TEXT_KV_GRADIENTS = ("follows_checkpointing", "every_exit", "first_forward")
_STAMPS = itertools.count(1)  # every cache's slot stamps: never the same number twice in a process


@dataclass(frozen=True)
class KeyStamps:
    """What an attention call's keys are, frame by frame, as the cache wrote them: one stamp per key frame (equal
    stamps, equal keys) and the identity of the key tensor the call was given (its storage and in-place version
    counter). `valid_for(k)` is False once anything but the cache changed those keys: an intervention or a hook
    that replaced k or wrote into it in place."""

    stamps: tuple[int, ...]  # one per key frame, in token order
    ptr: int  # k.data_ptr() when the call was made
    version: int  # k._version then

    @classmethod
    def of(cls, cache, k: torch.Tensor) -> "KeyStamps | None":
        """The stamps of the window `cache.window()` returned as k, or None where there are none (a cache without
        stamps, e.g. a training forward's `GradWindow`; inference-mode tensors, which keep no version counter)."""
        stamps = getattr(cache, "stamps", None)
        if stamps is None or len(stamps) != len(cache.frames) or k.is_inference():
            return None
        cache._check_foreign_writes()
        stamps = cache.stamps
        return cls(tuple(stamps), k.data_ptr(), k._version)

    def valid_for(self, k: torch.Tensor) -> bool:
        return not k.is_inference() and k.data_ptr() == self.ptr and k._version == self.version


class KVCache:
    """One layer's self-attention cache: k, v [B, capacity * fsl, heads, head_dim]."""

    def __init__(self, batch: int, capacity_frames: int, frame_seq_len: int, heads: int, head_dim: int,
                 *, sink_frames: int = 0, evict: bool = False, dtype=torch.float32, device="cpu"):
        self.capacity = capacity_frames
        self.fsl = frame_seq_len
        self.sink = sink_frames
        self.evict = evict  # False: global attention, running out of room is an error
        shape = (batch, capacity_frames * frame_seq_len, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.frames: list[int] = []  # absolute frame index held by each filled slot, in slot order
        self.positions: list[int] = []  # temporal RoPE position of each filled slot's keys (its frame unless moved)
        self.stamps: list[int] = []  # each filled slot's stamp: new whenever its keys are written or re-rotated
        self._own_version = self._k_version()  # self.k's in-place version counter after the cache's own last write
        self.head_mask: torch.Tensor | None = None  # [heads, filled slots] bool: which heads attend to which
        self.end_frame = 0  # one past the newest absolute frame written
        self.temporal_freqs: torch.Tensor | None = None  # [rope_split[0] / 2] float64: `keep` re-rotates with it
        # frame -> (the position its keys were written at, their temporal channels then [B, fsl, H, 2t]): a frame
        # moved again is rotated from these, once, not from its last rotation (in bf16 each rotation rounds). Data
        # of this rollout's, so not part of `state` (a graph replay puts the bookkeeping back, not the keys)
        self.unmoved: dict[int, tuple[int, torch.Tensor]] = {}

    def write(self, start_frame: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write the keys/values of frames [start_frame, start_frame + n) (k_new [B, n * fsl, H, D]). Keys or
        values already in their slots (the tensors `slots` returned, written by the model's kernels) are not
        copied again."""
        n = k_new.shape[1] // self.fsl
        a, b = self.place(start_frame, n)
        for buf, new in ((self.k, k_new), (self.v, v_new)):
            slot = buf[:, a:b]
            if not _same_memory(new, slot):
                slot.copy_(new)
        self._own_version = self._k_version()

    def slots(self, start_frame: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) [B, n * fsl, H, D]: the slots of frames [start_frame, start_frame + n), placed now (evicting as
        `write` would), for the model to write the chunk's keys/values into directly; `write` then finds them in
        place."""
        a, b = self.place(start_frame, n)
        return self.k[:, a:b], self.v[:, a:b]

    def _k_version(self) -> int | None:
        return None if self.k.is_inference() else self.k._version

    def _check_foreign_writes(self) -> None:
        """New stamps for every slot if anything but the cache wrote its keys in place since its own last write (a
        hook editing the window it was given, a training forward's `GradWindow`): stamps must never outlive the
        keys they describe."""
        if self._k_version() != self._own_version:
            self.stamps = [next(_STAMPS) for _ in self.stamps]
            self.unmoved = {}  # (the keys as written may be edited: a later move rotates what is there)
            self._own_version = self._k_version()

    def place(self, start_frame: int, n: int) -> tuple[int, int]:
        """Make room for frames [start_frame, start_frame + n) (evicting if needed) and return their token slots
        [a, b). A chunk seen before gets its old slots; a new chunk is appended."""
        self._check_foreign_writes()
        frames = list(range(start_frame, start_frame + n))
        if start_frame + n <= self.end_frame:  # a chunk seen before: overwrite its slots in place
            if not set(frames) <= set(self.frames):
                raise ModelInputError(f"frames {frames} were evicted from the KV cache and cannot be rewritten")
            slot = self.frames.index(start_frame)
            self.stamps[slot : slot + n] = [next(_STAMPS) for _ in range(n)]
            for f in frames:  # (new keys: rotated at their frame by the model)
                self.unmoved.pop(f, None)
        else:
            if start_frame != self.end_frame:
                raise ModelInputError(
                    f"chunk starting at frame {start_frame} does not follow the cache, which ends at frame {self.end_frame}"
                )
            overflow = len(self.frames) + n - self.capacity
            if overflow > 0:
                if not self.evict:
                    raise ModelInputError(
                        f"the KV cache holds {self.capacity} frames and frame {start_frame + n - 1} does not fit; "
                        "set local_attn_size for a rolling window"
                    )
                self._evict(overflow)
            slot = len(self.frames)
            self.frames.extend(frames)
            self.positions.extend(frames)  # new keys are rotated at their absolute frame (models/wan/model.py)
            self.stamps.extend(next(_STAMPS) for _ in range(n))
            if self.head_mask is not None:  # every head attends to a new frame
                self.head_mask = torch.cat([self.head_mask, self.head_mask.new_ones(self.head_mask.shape[0], n)], 1)
            self.end_frame = start_frame + n
        return slot * self.fsl, (slot + n) * self.fsl

    def _evict(self, count: int) -> None:
        """Drop the `count` oldest frames after the sink; shift the rest left."""
        keep_from = self.sink + count
        if keep_from > len(self.frames):
            raise ModelInputError(f"cannot evict {count} frames from a cache holding {len(self.frames)}")
        used = len(self.frames) * self.fsl
        src = slice(keep_from * self.fsl, used)
        self._move(slice(self.sink * self.fsl, used - count * self.fsl), src)
        for f in self.frames[self.sink : keep_from]:
            self.unmoved.pop(f, None)
        del self.frames[self.sink : keep_from]
        del self.positions[self.sink : keep_from]
        del self.stamps[self.sink : keep_from]
        self._own_version = self._k_version()
        if self.head_mask is not None:
            self.head_mask = torch.cat([self.head_mask[:, : self.sink], self.head_mask[:, keep_from:]], 1)

    def _move(self, dst: slice, src: slice) -> None:
        """Copy the token slots `src` over `dst` in place. Where the cache carries gradient history (training's
        "inplace" kv_gradient: exit forwards wrote their keys/values with gradient) autograd records the move, even
        inside a no-grad forward, so a later reader's gradient follows each frame to its new slot and reaches the
        forward that wrote that frame, not whichever frame held the slot before. (`torch.inference_mode` records
        nothing, so such a cache is refused there: run the no-grad forwards under `torch.no_grad`.)"""
        tracked = self.k.requires_grad or self.v.requires_grad
        if tracked and torch.is_inference_mode_enabled():
            raise ModelInputError("a KV cache holding training gradients cannot move frames under torch.inference_mode "
                                  "(autograd would not see the move); run the no-grad forwards under torch.no_grad")
        with torch.set_grad_enabled(tracked):
            self.k[:, dst] = self.k[:, src].clone()
            self.v[:, dst] = self.v[:, src].clone()

    def keep(self, frames, positions=None, head_mask: torch.Tensor | None = None) -> None:
        """Keep exactly `frames` (held frames, in slot order) at temporal RoPE `positions` (default: where they
        are), with `head_mask` [heads, len(frames)] bool (None: every head attends to every kept frame).
        Slots are compacted to the left in place; a frame whose position changes has its keys' temporal
        channels rotated by the angle of the change. Inference only: a cache holding training gradients is refused
        (the re-rotation is not recorded for autograd, and a training forward's `GradWindow` reads slots in place)."""
        if self.k.requires_grad or self.v.requires_grad:
            raise ModelInputError("cache policies run at inference only; this KV cache holds training gradients")
        self._check_foreign_writes()
        frames = [int(f) for f in frames]
        where = {f: i for i, f in enumerate(self.frames)}
        missing = [f for f in frames if f not in where]
        if missing or len(set(frames)) != len(frames):
            raise ModelInputError(f"a cache policy kept frames {frames}; the cache holds {self.frames}")
        src = [where[f] for f in frames]
        if src != sorted(src):
            raise ModelInputError(f"a cache policy kept frames {frames} out of slot order ({self.frames})")
        positions = [self.positions[i] for i in src] if positions is None else [int(p) for p in positions]
        if len(positions) != len(frames) or any(not 0 <= p < 1024 for p in positions):
            raise ModelInputError(f"cache policy positions {positions} for frames {frames}: one per frame, in 0-1023")
        fsl = self.fsl
        stamps = [self.stamps[i] for i in src]
        for dst, i in enumerate(src):  # left to right: a slot is read before anything is written over it
            if dst != i:
                self._move(slice(dst * fsl, (dst + 1) * fsl), slice(i * fsl, (i + 1) * fsl))
            if positions[dst] != self.positions[i]:
                tokens, f = slice(dst * fsl, (dst + 1) * fsl), frames[dst]
                if f not in self.unmoved:
                    self.unmoved[f] = (self.positions[i], self.k[:, tokens, :, : 2 * self._temporal_pairs()].clone())
                written_at, channels = self.unmoved[f]
                self._retime(tokens, positions[dst] - written_at, channels)
                stamps[dst] = next(_STAMPS)
        self.unmoved = {f: v for f, v in self.unmoved.items() if f in frames}
        if head_mask is not None and tuple(head_mask.shape) != (self.k.shape[2], len(frames)):
            raise ModelInputError(f"cache policy head mask of shape {tuple(head_mask.shape)}; expected "
                                  f"[{self.k.shape[2]}, {len(frames)}]")
        self.frames, self.positions, self.stamps = frames, positions, stamps
        self._own_version = self._k_version()
        self.head_mask = None if head_mask is None or bool(head_mask.all()) else head_mask.to(torch.bool).cpu()

    def _temporal_pairs(self) -> int:
        if self.temporal_freqs is None:
            raise ModelInputError("this cache cannot move RoPE positions (no temporal frequencies were given)")
        return self.temporal_freqs.numel()

    def _retime(self, tokens: slice, delta: int, channels: torch.Tensor) -> None:
        """The temporal RoPE channel pairs of the keys in `tokens`: `channels` (the same keys' temporal channels
        [B, n, H, 2t] as written) rotated by the angle of `delta` positions."""
        k = self.k[:, tokens]  # [B, n, H, D]
        work = torch.float64 if k.dtype == torch.float64 else torch.float32
        t = self._temporal_pairs()
        angle = (delta * self.temporal_freqs).to(k.device)  # float64 [t]
        cos, sin = angle.cos().to(work), angle.sin().to(work)
        pairs = channels.to(work).unflatten(-1, (t, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        k[..., : 2 * t] = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2).to(k.dtype)

    def clear(self) -> None:
        """Empty (the next rollout rewrites every slot before reading it; the tensors keep their addresses)."""
        self.frames, self.positions, self.stamps, self.head_mask, self.end_frame = [], [], [], None, 0
        self.unmoved = {}

    def state(self) -> tuple:
        """The slot bookkeeping (what `restore` puts back: a CUDA graph replay writes the tensors, not this)."""
        return list(self.frames), list(self.positions), list(self.stamps), self.head_mask, self.end_frame

    def restore(self, state: tuple) -> None:
        frames, positions, stamps, self.head_mask, self.end_frame = state
        self.frames, self.positions, self.stamps = list(frames), list(positions), list(stamps)

    def held_bytes(self) -> int:
        """Bytes of keys and values in filled slots (what the held frames take, not the allocation)."""
        return 2 * len(self.frames) * self.fsl * self.k.shape[0] * self.k.shape[2] * self.k.shape[3] * \
            self.k.element_size()

    def window(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """(k, v, key_frames) of what a query attends to: every filled slot."""
        end = len(self.frames) * self.fsl
        return self.k[:, :end], self.v[:, :end], tuple(self.frames)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are views of the same elements in the same layout (strides of size-1 dims aside)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype and all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n > 1)


class GradWindow:
    """A `KVCache` as one forward with gradients sees it (same `write` / `window` interface).

    Made before the forward runs: the chunk's slots are placed (evicting as `write` would) and the keys/values
    of the other filled slots are taken as they are now (views; copies when a rolling window may later shift
    them). `write` stores the new keys/values in the cache once (an activation-checkpoint recompute does not
    write again): in place with their gradient (`inplace=True`, the researchers' semantics: the cache's
    autograd history then routes a later reader's gradient to these keys/values) or as a detached copy; it keeps
    the new keys/values with their gradient. `window` returns cat(before, new, after): a new tensor (the
    attention saves no view of the cache, which later forwards overwrite), whose backward reaches this chunk's
    keys/values and, with `inplace`, the earlier exit forwards' keys/values through the cache."""

    def __init__(self, cache: KVCache, start_frame: int, num_frames: int, *, inplace: bool = False):
        self.cache, self.inplace = cache, inplace
        self.a, self.b = cache.place(start_frame, num_frames)
        end = len(cache.frames) * cache.fsl
        copy = (lambda t: t.clone()) if cache.evict else (lambda t: t)  # later evictions shift slots in place
        self.k_before, self.v_before = copy(cache.k[:, : self.a]), copy(cache.v[:, : self.a])
        self.k_after, self.v_after = cache.k[:, self.b : end].clone(), cache.v[:, self.b : end].clone()
        self.key_frames = tuple(cache.frames)
        self.written = False
        self.k_new = self.v_new = None

    def write(self, start_frame: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        if not self.written:
            with torch.set_grad_enabled(self.inplace and torch.is_grad_enabled()):
                self.cache.k[:, self.a : self.b] = k_new
                self.cache.v[:, self.a : self.b] = v_new
            self.written = True
        self.k_new, self.v_new = k_new, v_new

    def window(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        k = torch.cat([self.k_before, self.k_new, self.k_after], dim=1)  # [B, Lk, heads, head_dim]
        v = torch.cat([self.v_before, self.v_new, self.v_after], dim=1)
        return k, v, self.key_frames


@dataclass
class Keep:
    """A cache policy's decision for one layer: the frames that stay (slot order), their temporal RoPE positions
    (None: unchanged) and which heads attend to them ([heads, frames] bool; None: all)."""

    frames: list[int]
    positions: list[int] | None = None
    head_mask: torch.Tensor | None = None


class CachePolicy(Protocol):
    """What a rollout needs from a KV-cache policy (workbench/kv_policies.py implements it)."""

    key: Hashable  # its settings: part of the rollout graphs' key
    graph_safe: bool  # its decisions depend only on (layer, chunk, frames held), not on the data

    def capacity(self, num_frames: int, chunk_frames: int) -> int:
        """Frames each layer's cache allocates for a rollout of `num_frames` frames in chunks of (at most)
        `chunk_frames` (with independent_first_frame the first chunk is frame 0 alone, models/common/chunks.py)."""

    def after_chunk(self, layer: int, cache: KVCache, chunk: int, next_frames: int) -> Keep | None:
        """After chunk `chunk` (its context pass included): what layer `layer` keeps, leaving room for the
        `next_frames` frames of the next chunk (None: keep everything)."""


def check_policy(policy) -> None:
    """A cache policy has what a rollout uses, callable as the rollout calls it (ModelInputError naming what not)."""
    name = type(policy).__name__
    missing = [a for a in ("key", "graph_safe", "capacity", "after_chunk") if not hasattr(policy, a)]
    if missing:
        raise ModelInputError(f"cache policy {name} lacks {missing}: a CachePolicy (models/common/kv_cache.py) has "
                              "key, graph_safe, capacity(num_frames, chunk_frames) and after_chunk(layer, cache, "
                              "chunk, next_frames)")
    check_takes(policy.capacity, "num_frames, chunk_frames", f"cache policy {name}.capacity", "the rollout")
    check_takes(policy.after_chunk, "layer, cache, chunk, next_frames", f"cache policy {name}.after_chunk",
                "the rollout")


@dataclass
class CrossCache:
    """One layer's cross-attention keys/values, computed from the text once per video."""

    k: torch.Tensor | None = None  # [B, text_len, H, D]
    v: torch.Tensor | None = None


@dataclass
class RolloutCache:
    """Everything a causal rollout keeps between forwards: one KV and one cross cache per layer, and what
    gradient a forward with gradients gets through them (module docstring; used by training only)."""

    kv: list[KVCache]
    cross: list[CrossCache]
    kv_gradient: str = "inplace"  # KV_GRADIENTS
    text_kv_gradient: str = "follows_checkpointing"  # TEXT_KV_GRADIENTS
    policy: CachePolicy | None = None  # decides what stays after each chunk (None: the window and sink above)

    def __post_init__(self):
        if self.kv_gradient not in KV_GRADIENTS:
            raise ModelInputError(f"kv_gradient {self.kv_gradient!r}; use one of {list(KV_GRADIENTS)}")
        if self.text_kv_gradient not in TEXT_KV_GRADIENTS:
            raise ModelInputError(f"text_kv_gradient {self.text_kv_gradient!r}; use one of {list(TEXT_KV_GRADIENTS)}")

    @classmethod
    def allocate(cls, config, batch: int, num_frames: int, frame_seq_len: int, *, dtype, device,
                 kv_gradient: str = "inplace", text_kv_gradient: str = "follows_checkpointing",
                 policy: CachePolicy | None = None, chunk_frames: int = 3) -> "RolloutCache":
        """Cache for a rollout of `num_frames` latent frames. Global attention holds all of them; a local window
        of `config.local_attn_size` frames (with `config.sink_size` sink frames) evicts the oldest. With a
        `policy`, its capacity, and nothing evicted but what it drops after each chunk."""
        local = config.local_attn_size
        if policy is not None:
            check_policy(policy)
            capacity, evict = policy.capacity(num_frames, chunk_frames), False
            if not isinstance(capacity, numbers.Integral) or capacity < min(chunk_frames, num_frames):
                raise ModelInputError(f"cache policy {type(policy).__name__}: capacity({num_frames}, {chunk_frames}) "
                                      f"is {capacity!r}; a cache holds at least a chunk ({chunk_frames} frames)")
        elif local == -1:
            capacity, evict = num_frames, False
        else:
            capacity, evict = local, True
        from models.wan.rope import axis_angles

        freqs = axis_angles(config.rope_split[0], 2)[1]  # [rope_split[0] / 2]: the angle of one position
        kv = [KVCache(batch, capacity, frame_seq_len, config.num_heads, config.head_dim, sink_frames=config.sink_size,
                      evict=evict, dtype=dtype, device=device) for _ in range(config.num_layers)]
        for c in kv:
            c.temporal_freqs = freqs
        return cls(kv=kv, cross=[CrossCache() for _ in range(config.num_layers)], kv_gradient=kv_gradient,
                   text_kv_gradient=text_kv_gradient, policy=policy)

    def after_chunk(self, chunk: int, next_frames: int) -> None:
        """Apply the policy (if any) to every layer's cache after chunk `chunk`."""
        if self.policy is None:
            return
        name = type(self.policy).__name__
        for layer, kv in enumerate(self.kv):
            keep = self.policy.after_chunk(layer, kv, chunk, next_frames)
            if keep is not None and not all(hasattr(keep, a) for a in ("frames", "positions", "head_mask")):
                raise ModelInputError(f"cache policy {name!r}: after_chunk returned {type(keep).__name__} "
                                      f"{str(keep)[:80]}; it returns None (the cache as it is) or a Keep(frames=[...], "
                                      "positions=None, head_mask=None) of models/common/kv_cache.py")
            if keep is not None:
                try:
                    kv.keep(keep.frames, keep.positions, keep.head_mask)
                except ModelInputError as err:  # (named: which policy, which layer, after which chunk)
                    raise ModelInputError(f"cache policy {name!r}, layer {layer} after chunk {chunk}: {err}") from None
            if len(kv.frames) + next_frames > kv.capacity and next_frames:
                raise ModelInputError(f"cache policy {name!r} left {len(kv.frames)} frames in layer "
                                      f"{layer}; the next {next_frames} do not fit its {kv.capacity} frames")

    def held_bytes(self) -> int:
        return sum(kv.held_bytes() for kv in self.kv)

    def fresh_text_kv(self, checkpointing: bool) -> bool:
        """Whether a forward with gradients computes the text keys/values itself (with gradient) rather than
        reading (or filling) the cross-attention cache."""
        if self.text_kv_gradient == "every_exit":
            return True
        return self.text_kv_gradient == "follows_checkpointing" and checkpointing
