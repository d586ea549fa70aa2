"""The KV cache of the causal rollout, kept in whole latent frames, and the cross-attention cache.

Semantics are those of Self-Forcing's `CausalWanModel._forward_inference` (reference section 2.2):
- keys are stored after RoPE, with their absolute temporal positions, and never re-rotated;
- a forward for a chunk that was already written (the later denoising steps and the context pass) overwrites
  that chunk's slots; a forward for a new chunk appends;
- with a local window (`local_attn_size` frames) the cache holds that many frames; when a new chunk does not
  fit, the oldest frames after the first `sink_size` ones are evicted (the sink slots never move);
- every query of a call attends to every frame in the cache (its own chunk included).

The cache records which absolute frame each slot holds, so attention calls are labelled from what is really
there, not from a count.

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

from dataclasses import dataclass

import torch

from models.errors import ModelInputError

KV_GRADIENTS = ("inplace", "detached")
TEXT_KV_GRADIENTS = ("follows_checkpointing", "every_exit", "first_forward")


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
        self.end_frame = 0  # one past the newest absolute frame written

    def write(self, start_frame: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write the keys/values of frames [start_frame, start_frame + n) (k_new [B, n * fsl, H, D])."""
        n = k_new.shape[1] // self.fsl
        a, b = self.place(start_frame, n)
        self.k[:, a:b] = k_new
        self.v[:, a:b] = v_new

    def place(self, start_frame: int, n: int) -> tuple[int, int]:
        """Make room for frames [start_frame, start_frame + n) (evicting if needed) and return their token slots
        [a, b). A chunk seen before gets its old slots; a new chunk is appended."""
        frames = list(range(start_frame, start_frame + n))
        if start_frame + n <= self.end_frame:  # a chunk seen before: overwrite its slots in place
            if not set(frames) <= set(self.frames):
                raise ModelInputError(f"frames {frames} were evicted from the KV cache and cannot be rewritten")
            slot = self.frames.index(start_frame)
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
            self.end_frame = start_frame + n
        return slot * self.fsl, (slot + n) * self.fsl

    def _evict(self, count: int) -> None:
        """Drop the `count` oldest frames after the sink; shift the rest left."""
        keep_from = self.sink + count
        if keep_from > len(self.frames):
            raise ModelInputError(f"cannot evict {count} frames from a cache holding {len(self.frames)}")
        used = len(self.frames) * self.fsl
        src = slice(keep_from * self.fsl, used)
        dst = slice(self.sink * self.fsl, used - count * self.fsl)
        self.k[:, dst] = self.k[:, src].clone()
        self.v[:, dst] = self.v[:, src].clone()
        del self.frames[self.sink : keep_from]

    def window(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """(k, v, key_frames) of what a query attends to: every filled slot."""
        end = len(self.frames) * self.fsl
        return self.k[:, :end], self.v[:, :end], tuple(self.frames)


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

    def __post_init__(self):
        if self.kv_gradient not in KV_GRADIENTS:
            raise ModelInputError(f"kv_gradient {self.kv_gradient!r}; use one of {list(KV_GRADIENTS)}")
        if self.text_kv_gradient not in TEXT_KV_GRADIENTS:
            raise ModelInputError(f"text_kv_gradient {self.text_kv_gradient!r}; use one of {list(TEXT_KV_GRADIENTS)}")

    @classmethod
    def allocate(cls, config, batch: int, num_frames: int, frame_seq_len: int, *, dtype, device,
                 kv_gradient: str = "inplace", text_kv_gradient: str = "follows_checkpointing") -> "RolloutCache":
        """Cache for a rollout of `num_frames` latent frames. Global attention holds all of them; a local window
        of `config.local_attn_size` frames (with `config.sink_size` sink frames) evicts the oldest."""
        local = config.local_attn_size
        if local == -1:
            capacity, evict = num_frames, False
        else:
            capacity, evict = local, True
        kv = [KVCache(batch, capacity, frame_seq_len, config.num_heads, config.head_dim, sink_frames=config.sink_size,
                      evict=evict, dtype=dtype, device=device) for _ in range(config.num_layers)]
        return cls(kv=kv, cross=[CrossCache() for _ in range(config.num_layers)], kv_gradient=kv_gradient,
                   text_kv_gradient=text_kv_gradient)

    def fresh_text_kv(self, checkpointing: bool) -> bool:
        """Whether a forward with gradients computes the text keys/values itself (with gradient) rather than
        reading (or filling) the cross-attention cache."""
        if self.text_kv_gradient == "every_exit":
            return True
        return self.text_kv_gradient == "follows_checkpointing" and checkpointing

    def reset_cross(self) -> None:
        for c in self.cross:
            c.k = c.v = None
