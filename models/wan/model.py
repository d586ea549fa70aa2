"""The Wan2.1 diffusion transformer, bidirectional and causal, in one file.

Dataflow of one forward (as Wan2.1's `WanModel._forward`), for a latent video x [B, 16, F, H, W]:
    patchify (Conv3d, kernel = stride = (1, 2, 2))      -> tokens [B, F*h*w, dim], (frame, row, column) order
    sinusoidal time embedding of per-frame t [B, F]      -> e [B, F, dim], e0 = 6-way modulation [B, F, 6, dim]
    text MLP on the context [B, 512, 4096]               -> [B, 512, dim]
    N blocks:  x += gate_sa  * self_attn(LN1(x) * (1 + scale_sa) + shift_sa)    (RoPE, q/k RMSNorm over all heads)
               x += cross_attn(LN3(x), text)                                      (no modulation, no gate)
               x += gate_ffn * ffn(LN2(x) * (1 + scale_ffn) + shift_ffn)
    head: Linear(LN(x) * (1 + scale) + shift) with (shift, scale) = head.modulation + e -> unpatchify
The output is a flow (velocity) prediction v = noise - x0.

Three ways to run the self-attention:
- bidirectional (`WanModel`, causal=False): every token sees every token;
- block-causal full sequence (`causal=True`, no cache): bidirectional inside a chunk of `num_frame_per_block`
  frames (frame 0 alone first with `independent_first_frame`, models/common/chunks.py), causal across chunks
  (optionally within a local window) - the training path;
- KV cache (`kv_cache=` given): one chunk's tokens attend to the cached frames plus themselves - the rollout.
  With gradients enabled (training's exit step) each layer sees its cache through a `GradWindow`: backward
  sees the cache as the forward did, and the cache's `kv_gradient` says whether gradient also reaches the
  earlier exit steps' keys/values through it; its `text_kv_gradient` says whether the forward computes the
  text keys/values afresh with gradient (models/common/kv_cache.py, docs/training.md).
Every attention call goes through `models.common.attention.attend` with its labels and the model's
`attention_kernel`; parameter names match the official checkpoints (`blocks.N.self_attn.q.weight`, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from models.common import attention as attention_entry
from models.common.attention import AttentionCall, Attend, ForwardLabels, ObserverList, attend as ATTEND
from models.common.attention_kernels import check_kernel
from models.common.chunks import chunk_spans
from models.common.kv_cache import CrossCache, GradWindow, KeyStamps, KVCache, RolloutCache
from models.common.window import attended_key_frames
from models.errors import ModelInputError
from models.wan import fused
from models.wan.config import WanConfig
from models.wan.rope import RopeTable, rope_cos_sin


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[cos | sin] of t * 10000^(-i / (dim/2)), computed in float64: t [N] -> [N, dim]."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim (all heads jointly), computed in float32, weight applied after the cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return fused.rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, cast back. The non-affine ones only hold `eps`: blocks call
    `fused.norm_modulate` with it."""

    def forward(self, x):
        return fused.layer_norm_affine(x, self.weight, self.bias, self.eps)


@dataclass
class ForwardContext:
    """What every block of one forward shares: labels, subscribers, RoPE, and the frames of the query tokens."""

    labels: ForwardLabels | None
    observers: ObserverList | tuple
    interventions: ObserverList | tuple
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [L, 1, head_dim/2]
    query_frames: tuple[int, ...]
    start_frame: int
    frame_seq_len: int
    grid: tuple[int, int]
    frame_mask: torch.Tensor | None  # block-causal frame mask of a full-sequence causal forward
    fill_cross: bool = False  # this forward computes the text keys/values and fills the cross-attention caches
    kernel: str = "auto"  # the model's attention kernel choice (models.common.attention_kernels.CHOICES)


DIRECT_KV_WRITES = True  # the chunk's keys/values made in the KV cache's slots (`SelfAttention.cache_slots`)
# The tokens made row-major once per forward: the patch embedding's output [B, C, F, h, w] flattened and transposed
# is a channel-major view (strides C*L, 1, L); without the copy that layout runs through the residual stream and every
# norm reduces along a strided dim (three kernels each on CUDA; bench/RESULTS.md, sessions 21-22).
CONTIGUOUS_TOKENS = True
# A forward run only for what it writes in the KV cache (`cache_only`: a rollout's context pass) stops the last block
# once its keys/values are written: its attention, cross-attention and FFN and the head feed nothing (~85% of one
# block of the 30: -0.6% on a 1.3B rollout, bench/RESULTS.md session 31). With observers or interventions attached
# the last block runs its self-attention (they see that call), and its cross-attention and FFN only when one of them
# wants the last layer's cross-attention call of this forward. Never while anything watches the last block's modules
# from outside (`watched`: forward hooks, a forward replaced on the instance, as nnsight's tracing does, or on the
# class, a module of another class, the attention entry point replaced): they see every call of the whole forward.
CACHE_ONLY_SKIPS_LAST_BLOCK = True
# the module classes of a block and their forwards as defined (filled below the classes; models/wan/accel.py adds
# its FP8 linear layer): a block made of anything else, or one whose class's forward was replaced, runs whole
OWN_FORWARDS: dict = {}


def watched(module: nn.Module) -> bool:
    """Whether something outside the model may watch the calls of `module` or of a module in it: a forward hook or
    pre-hook (its own or torch's global ones), a `forward` set on the instance (nnsight installs its controller so;
    a monkeypatch) or on the class, a module of a class not in `OWN_FORWARDS` (a wrapper around a block), or the
    attention entry point `models.common.attention.attend` replaced. Then the model runs every call whole."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    if attention_entry.attend is not ATTEND:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__
               or OWN_FORWARDS.get(type(m)) is not type(m).forward for m in module.modules())


def scaled_randn(shape: tuple[int, ...], divisor: float) -> torch.Tensor:
    """torch.randn(shape) / divisor, Wan's initial modulation; under `torch.device("meta")` (a model built before
    its weights are loaded) an empty tensor: randn and division on meta go through torch's reference ops, which
    import torch._dynamo and sympy (3 s of `workbench info` on a 2-core CPU), for values nobody reads."""
    if torch.get_default_device().type == "meta":
        return torch.empty(shape)
    return torch.randn(shape) / divisor


def through_cache(cache, start_frame: int, k, v):
    """Write a chunk's keys/values into a layer's KV cache and return the window its queries attend to: sink +
    window, own chunk included, with the frames each slot holds. Python bookkeeping, run inside
    `SelfAttention.attention`, which a torch.compile'd block leaves eager."""
    cache.write(start_frame, k, v)
    return cache.window()


class SelfAttention(nn.Module):
    def __init__(self, layer: int, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.layer, self.num_heads, self.head_dim = layer, num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.attend = Attend()

    def forward(self, x, ctx: ForwardContext, cache: KVCache | None):
        # x [B, L, dim] -> [B, L, dim]
        q, k, v = self.project(x, ctx, cache)
        out = self.attention(q, k, v, ctx, cache)  # [B, L, heads, head_dim]
        return self.o(out.flatten(2))

    def project(self, x, ctx: ForwardContext, cache: KVCache | None):
        """x [B, L, dim] -> q, k, v [B, L, heads, head_dim]; q, k after RMSNorm and RoPE."""
        slots = self.cache_slots(x, ctx, cache)  # the chunk's KV-cache slots, when k and v can be made in them
        q, k = fused.qk_norm_rope(self.q(x), self.k(x), self.norm_q.weight, self.norm_k.weight, *ctx.rope,
                                  self.num_heads, self.norm_q.eps, k_out=None if slots is None else slots[0])
        if slots is None:
            v = self.v(x).unflatten(2, (self.num_heads, self.head_dim))
        else:  # the same GEMM as nn.Linear's (addmm on the token rows), into the cache
            v = slots[1]
            torch.addmm(self.v.bias, x.reshape(-1, x.shape[-1]), self.v.weight.t(), out=v.view(-1, x.shape[-1]))
        return q, k, v

    def write_cache(self, x, ctx: ForwardContext, cache: KVCache) -> None:
        """Only the chunk's keys and values into the cache (what `forward` writes there, by the same kernels),
        without the attention: x [B, L, dim]."""
        _, k, v = self.project(x, ctx, cache)
        cache.write(ctx.start_frame, k, v)

    def cache_slots(self, x, ctx: ForwardContext, cache):
        """(k, v) [B, L, heads, head_dim]: the chunk's slots of the KV cache, so that the q/k kernel and the v
        GEMM write the chunk's keys/values there (`through_cache` then copies nothing; two copies fewer a call),
        or None: off (DIRECT_KV_WRITES), a training forward's window, the PyTorch q/k path (CPU, autograd), an
        FP8 or otherwise non-plain v projection, a torch.compile'd block (Python bookkeeping stays in the eager
        attention), or slots that are not contiguous (batch > 1)."""
        if not (DIRECT_KV_WRITES and type(cache) is KVCache and type(self.v) is nn.Linear and self.v.bias is not None
                and fused.qk_norm_rope_kernel(x) and x.is_contiguous() and not torch.compiler.is_compiling()):
            return None
        k, v = cache.slots(ctx.start_frame, x.shape[1] // ctx.frame_seq_len)
        return (k, v) if k.is_contiguous() and v.is_contiguous() and k.shape[1] == x.shape[1] else None

    def attention(self, q, k, v, ctx: ForwardContext, cache: KVCache | None):
        """The chunk's keys/values through the KV cache (if any), then the labelled attention call:
        q, k, v [B, L, heads, head_dim] -> [B, L, heads, head_dim]. Python bookkeeping (cache slots, the call's
        labels, observers, the kernel choice) that a torch.compile'd block runs eagerly (models/wan/accel.py
        marks it so); it is also the only place the layer index is read, so every layer shares the compiled
        code around it."""
        if cache is None:
            key_frames, frame_mask, stamps = ctx.query_frames, ctx.frame_mask, None
        else:
            k, v, key_frames = through_cache(cache, ctx.start_frame, k, v)  # [B, Lk, heads, head_dim]
            frame_mask, stamps = None, KeyStamps.of(cache, k)
        head_mask = getattr(cache, "head_mask", None)  # a head-wise cache policy's frames per head
        call = AttentionCall(self.layer, "self", ctx.labels, ctx.query_frames, key_frames, ctx.frame_seq_len,
                             ctx.grid, frame_mask, self.num_heads, self.head_dim, ctx.kernel, head_mask=head_mask,
                             key_stamps=stamps)
        return self.attend(q, k, v, call, ctx.observers, interventions=ctx.interventions)


class CrossAttention(nn.Module):
    def __init__(self, layer: int, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.layer, self.num_heads, self.head_dim = layer, num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.attend = Attend()

    def forward(self, x, text, ctx: ForwardContext, cache: CrossCache | None):
        # x [B, L, dim], text [B, text_len, dim] (None when the filled cache is read)
        q = self.norm_q(self.q(x)).unflatten(2, (self.num_heads, self.head_dim))
        if cache is not None and not ctx.fill_cross:
            k, v = cache.k, cache.v
        else:  # decided per forward, so an activation-checkpoint recompute takes the same branch
            k, v = self.text_kv(text)
            if cache is not None and cache.k is None:
                cache.k, cache.v = k, v
        out = self.attention(q, k, v, ctx)  # [B, L, heads, head_dim]
        return self.o(out.flatten(2))

    def attention(self, q, k, v, ctx: ForwardContext):
        """The labelled attention call: q [B, L, heads, head_dim], k, v [B, text_len, heads, head_dim] ->
        [B, L, heads, head_dim]. Eager in a torch.compile'd block, as `SelfAttention.attention`."""
        return self.attend(q, k, v, self.call(ctx), ctx.observers, interventions=ctx.interventions)

    def call(self, ctx: ForwardContext) -> AttentionCall:
        """This layer's cross-attention call of the forward `ctx` describes (what observers are shown)."""
        return AttentionCall(self.layer, "cross", ctx.labels, ctx.query_frames, None, ctx.frame_seq_len,
                             ctx.grid, None, self.num_heads, self.head_dim, ctx.kernel)

    def seen(self, ctx: ForwardContext) -> bool:
        """Whether an observer or intervention of the forward wants this layer's cross-attention call."""
        if not ctx.observers and not ctx.interventions:
            return False
        call = self.call(ctx)
        return any(s.wants(call) for s in (*ctx.observers, *ctx.interventions))

    def text_kv(self, text):
        """Keys and values of the text tokens: text [B, text_len, dim] -> k, v [B, text_len, heads, head_dim]."""
        k = self.norm_k(self.k(text)).unflatten(2, (self.num_heads, self.head_dim))
        return k, self.v(text).unflatten(2, (self.num_heads, self.head_dim))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, ffn_dim: int):
        super().__init__(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))

    def forward(self, x):
        # x [B, L, dim] -> [B, L, ffn_dim] -> [B, L, dim]; on CUDA the GELU runs in the first GEMM's epilogue
        up, act, down = self
        if type(up) is nn.Linear and fused.gelu_epilogue_applies(x):  # (not for models/wan/accel.py's FP8 layers)
            h = torch._addmm_activation(up.bias, x.flatten(0, -2), up.weight.t(), use_gelu=True)
            return down(h.view(*x.shape[:-1], -1))
        return down(act(up(x)))


class WanBlock(nn.Module):
    def __init__(self, layer: int, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(layer, dim, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(layer, dim, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.modulation = nn.Parameter(scaled_randn((1, 6, dim), dim**0.5))

    def forward(self, x, e0, text, ctx: ForwardContext, kv: KVCache | None, cross: CrossCache | None,
                residual=None, defer: bool = False):
        # x [B, F*fsl, dim]; e0 [B, F, 6, dim] float32 (per-frame modulation). Folded residuals (`WanModel.forward`
        # when nothing watches the blocks): `residual` = the previous block's (ffn output, gate) not yet in x, added
        # in norm1's pass; `defer` returns (x, (ffn output, gate)) for the next block's norm to add
        mod = (self.modulation.float().unsqueeze(1) + e0).unsqueeze(3)  # [B, F, 6, 1, dim]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mod.unbind(2)  # [B, F, 1, dim] each
        x, h = self._self_attn_input(x, e0, residual, mod)
        y = self.self_attn(h, ctx, kv)
        if torch.compiler.is_compiling() or watched(self.norm3):  # norm3 called as a module, seen by its watchers
            x = fused.gated_residual(x, y, gate_sa)
            h = self.norm3(x)
        else:  # the residual and the norm in one pass on CUDA
            x, h = fused.gated_residual_norm_affine(x, y, gate_sa, self.norm3.weight, self.norm3.bias, self.norm3.eps)
        x, h = fused.add_norm_modulate(x, self.cross_attn(h, text, ctx, cross), shift_ff, scale_ff, self.norm2.eps)
        y = self.ffn(h)
        return (x, (y, gate_ff)) if defer else fused.gated_residual(x, y, gate_ff)

    def write_cache(self, x, e0, ctx: ForwardContext, kv: KVCache, residual=None) -> None:
        """What `forward` leaves in the KV cache, and nothing else (the block's output is not computed): the
        self-attention's keys and values of the chunk. x [B, F*fsl, dim]; e0 [B, F, 6, dim]; residual as `forward`."""
        self.self_attn.write_cache(self._self_attn_input(x, e0, residual)[1], ctx, kv)

    def self_attention_only(self, x, e0, ctx: ForwardContext, kv: KVCache, residual=None) -> None:
        """The block as far as its self-attention (keys and values into the cache, the observed attention call),
        and no further: a context pass whose observers want nothing after it. x [B, F*fsl, dim]; e0 [B, F, 6, dim]."""
        self.self_attn(self._self_attn_input(x, e0, residual)[1], ctx, kv)

    def _self_attn_input(self, x, e0, residual=None, mod=None):
        """(x, the self-attention's input) as `forward` makes them: the previous block's residual added to x when
        `residual` holds it, and norm1(x) modulated. [B, F*fsl, dim] each."""
        if mod is None:
            mod = (self.modulation.float().unsqueeze(1) + e0).unsqueeze(3)  # [B, F, 6, 1, dim], as `forward`
        shift_sa, scale_sa = mod.unbind(2)[:2]
        if residual is None:
            return x, fused.norm_modulate(x, shift_sa, scale_sa, self.norm1.eps)
        return fused.gated_residual_norm_modulate(x, *residual, shift_sa, scale_sa, self.norm1.eps)


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(scaled_randn((1, 2, cfg.dim), cfg.dim**0.5))

    def forward(self, x, e, residual=None):
        # x [B, F*fsl, dim]; e [B, F, dim] float32 (the time embedding itself, not e0); residual: the last block's
        # (ffn output, gate) not yet in x (WanBlock.forward's `defer`), added in the norm's pass
        shift, scale = (self.modulation.float().unsqueeze(1) + e.unsqueeze(2)).unsqueeze(3).unbind(2)  # [B,F,1,dim]
        if residual is None:
            return self.head(fused.norm_modulate(x, shift, scale, self.norm.eps))
        return self.head(fused.gated_residual_norm_modulate(x, *residual, shift, scale, self.norm.eps)[1])


class WanModel(nn.Module):
    """Wan2.1 DiT. `causal=True` gives the block-causal model of Self-Forcing (same parameters)."""

    def __init__(self, config: WanConfig, *, causal: bool = False, num_frame_per_block: int = 3,
                 independent_first_frame: bool = False):
        super().__init__()
        cfg = self.config = config
        self.causal = causal
        self.num_frame_per_block = num_frame_per_block
        self.independent_first_frame = independent_first_frame  # frame 0 a chunk of its own (models/common/chunks.py)
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(cfg.dim, cfg.dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList([WanBlock(i, cfg) for i in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.rope = RopeTable(cfg.rope_split)
        self._rope_cache: dict = {}
        self.observers = ObserverList()  # attention observers (the workbench's probes attach here)
        self.interventions = ObserverList()  # attention interventions (workbench/interventions.py), before observers
        self.attention_kernel = "auto"  # "auto" (stock kernels) or "triton" (models.common.triton_attention)
        self.gradient_checkpointing = False

    @property
    def attention_kernel(self) -> str:
        """Which kernel computes unmasked attention: "auto" (flash-attn / cuDNN / SDPA) or "triton" (the
        frame-tiled forward of models.common.triton_attention, whose statistics a probe can read at no change to
        the output). Checked when set."""
        return self._attention_kernel

    @attention_kernel.setter
    def attention_kernel(self, kernel: str) -> None:
        self._attention_kernel = check_kernel(kernel)

    # --- helpers ---------------------------------------------------------------------------------------

    def grid_of(self, x: torch.Tensor) -> tuple[int, int, int]:
        """Token grid (frames, rows, columns) of a latent video x [B, C, F, H, W]."""
        pt, ph, pw = self.config.patch_size
        _, c, f, h, w = x.shape
        if c != self.config.in_dim:
            raise ModelInputError(f"latent has {c} channels; the model takes {self.config.in_dim}")
        if f % pt or h % ph or w % pw:
            raise ModelInputError(f"latent {f}x{h}x{w} is not divisible by the patch size {self.config.patch_size}")
        return f // pt, h // ph, w // pw

    def chunk_spans(self, frames: int) -> list[tuple[int, int]]:
        """(first frame, frame count) of every chunk of a causal rollout of `frames` latent frames
        (models/common/chunks.py); a clear error when the frames do not fit the layout."""
        return chunk_spans(frames, self.num_frame_per_block, self.independent_first_frame)

    def block_causal_mask(self, frames: int) -> torch.Tensor:
        """Frame mask [F, F]: query frame i sees key frame j iff j's chunk <= i's chunk. With a local window it
        sees what the rolling KV cache would hold after writing i's chunk: the first `sink_size` frames and the
        most recent `local_attn_size - sink_size` frames up to the end of i's chunk."""
        c = self.config
        return torch.tensor(attended_key_frames(frames, self.num_frame_per_block, c.local_attn_size, c.sink_size,
                                                self.independent_first_frame),
                            dtype=torch.bool)  # (the rule: models/common/window.py)

    def rope_cos_sin(self, frames, h, w, start_frame, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [F*h*w, 1, head_dim/2] of a token grid, kept on the device per (grid, start frame): the
        rollout asks for the same few grids in every forward."""
        key = (frames, h, w, start_frame, str(device), dtype)
        if key not in self._rope_cache:
            if len(self._rope_cache) > 64:
                self._rope_cache.clear()
            self._rope_cache[key] = rope_cos_sin(self.rope.angles(frames, h, w, start_frame), device, dtype)
        return self._rope_cache[key]

    def rope_for(self, x: torch.Tensor, start_frame: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos, sin that `forward` uses for the latent input x [B, 16, F, H, W] placed at start_frame. A CUDA
        graph recorder calls it before recording (models/common/rollout.py), so that a new table is computed
        outside the graph (a host-to-device copy cannot be recorded) and stays alive as long as the graph."""
        frames, h, w = self.grid_of(x)
        return self.rope_cos_sin(frames, h, w, start_frame, x.device,
                                 torch.float64 if x.dtype == torch.float64 else torch.float32)

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B, F] -> (e [B, F, dim], e0 [B, F, 6, dim]), both float32."""
        B, Fr = t.shape
        dtype = self.time_embedding[0].weight.dtype
        e = self.time_embedding(sinusoidal_embedding(self.config.freq_dim, t.flatten()).to(dtype))
        e0 = self.time_projection(e).unflatten(1, (6, self.config.dim))
        return e.float().view(B, Fr, -1), e0.float().view(B, Fr, 6, -1)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, F*h*w, pt*ph*pw*C] -> [B, C, F*pt, h*ph, w*pw]."""
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, self.config.out_dim)
        return torch.einsum("bfhwpqrc->bcfphqwr", x).reshape(x.shape[0], self.config.out_dim, f * pt, h * ph, w * pw)

    @torch.no_grad()
    def fill_cross_cache(self, context: torch.Tensor, cache: RolloutCache) -> None:
        """Compute every layer's text keys/values for `context` [B, text_len, text_dim] into the cache, in place
        where the cache already holds tensors (CUDA graphs read them at fixed addresses)."""
        text = self.text_embedding(context)
        for block, cross in zip(self.blocks, cache.cross):
            k, v = block.cross_attn.text_kv(text)
            if cross.k is None:
                cross.k, cross.v = k, v
            else:
                cross.k.copy_(k)
                cross.v.copy_(v)

    # --- forward -----------------------------------------------------------------------------------------

    def forward(self, x, t, context, *, cache: RolloutCache | None = None, start_frame: int = 0,
                labels: ForwardLabels | None = None, cache_only: bool = False):
        """Flow prediction for a latent video.

        x           [B, 16, F, H, W] latents (with a cache: the current chunk only)
        t           [B] or [B, F] timesteps in [0, 1000] (per-frame for the causal model)
        context     [B, text_len, text_dim] text embeddings
        cache       a `RolloutCache` for KV-cache inference (causal only); start_frame = absolute frame of x[:, :, 0]
        labels      what the caller knows about this forward (step, timestep, chunk), passed to attention observers
        cache_only  the forward is run for what it writes in the cache (a rollout's context pass): returns None.
                    Without gradients, the last block stops once its keys and values are written (after its
                    self-attention when observers or interventions are attached; whole when one of them wants
                    its cross-attention call) and the head does not run (CACHE_ONLY_SKIPS_LAST_BLOCK); the cache
                    holds exactly what the whole forward writes
        returns     [B, 16, F, H, W] flow prediction (None with cache_only)
        """
        if cache_only and cache is None:
            raise ModelInputError("cache_only=True needs a cache (the forward is run for what it writes there)")
        grid = self.grid_of(x)
        frames, h, w = grid
        fsl = h * w
        B = x.shape[0]
        if t.ndim == 1:
            t = t[:, None].expand(B, frames)
        if t.shape != (B, frames):
            raise ModelInputError(f"timesteps of shape {tuple(t.shape)}; expected [{B}] or [{B}, {frames}]")
        if context.shape[0] != B or context.shape[2] != self.config.text_dim:
            raise ModelInputError(f"context of shape {tuple(context.shape)}; expected [{B}, text_len, {self.config.text_dim}]")
        if cache is not None and not self.causal:
            raise ModelInputError("a KV cache needs the causal model (causal=True)")

        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [B, F*h*w, dim]
        if CONTIGUOUS_TOKENS:
            tokens = tokens.contiguous()
        e, e0 = self.embed_time(t)
        grad = torch.is_grad_enabled()
        fresh_text = cache is not None and grad and cache.fresh_text_kv(self.gradient_checkpointing)
        fill_cross = cache is not None and not fresh_text and cache.cross[0].k is None
        # the text tokens, unless every layer reads its cross-attention cache (then not computed at all, so no
        # parameter gets a gradient, not even a zero one, through an unused input)
        text = self.text_embedding(context) if (cache is None or fresh_text or fill_cross) else None  # [B, L, dim]
        rope = self.rope_for(x, start_frame)
        ctx = ForwardContext(
            labels=labels,
            observers=self.observers,
            interventions=self.interventions,
            rope=rope,
            query_frames=tuple(range(start_frame, start_frame + frames)),
            start_frame=start_frame,
            frame_seq_len=fsl,
            grid=(h, w),
            frame_mask=self.block_causal_mask(frames) if (self.causal and cache is None) else None,
            fill_cross=fill_cross,
            kernel=self.attention_kernel,
        )
        # a context pass nobody observes: the last block only writes its keys/values, and the head is not run (not
        # for a torch.compile'd block, whose keys may round otherwise than the eager `write_cache`'s)
        compiled = getattr(self.blocks[-1], "_compiled_call_impl", None) is not None  # (nn.Module.compile's)
        # each block's FFN residual added in the pass of the next block's norm1 (the head's norm after the last);
        # not while anything may watch a block's output (one look at every block, kept for the short pass)
        fold = fused.residual_norms(tokens) and not grad and not compiled and not torch.compiler.is_compiling()
        seen = [watched(module) for module in (*self.blocks, self.head)] if fold else None  # [blocks..., head]
        fold = fold and not any(seen)
        short = cache_only and CACHE_ONLY_SKIPS_LAST_BLOCK and not grad and not fill_cross and not compiled and \
            not (seen[-2] if seen is not None else watched(self.blocks[-1]))
        residual = None  # the previous block's (ffn output, gate) not yet in tokens
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else cache.kv[i]
            if short and i == len(self.blocks) - 1 and not block.cross_attn.seen(ctx):
                if self.observers or self.interventions:  # they see the self-attention call
                    block.self_attention_only(tokens, e0, ctx, kv, residual)
                else:
                    block.write_cache(tokens, e0, ctx, kv, residual)
                return None
            if kv is not None and grad:  # training: this chunk's k/v keep their gradient
                kv = GradWindow(kv, start_frame, frames, inplace=cache.kv_gradient == "inplace")
            cross = None if (cache is None or fresh_text) else cache.cross[i]  # None: text k/v from `text`
            if self.gradient_checkpointing and grad:
                tokens = checkpoint(block, tokens, e0, text, ctx, kv, cross, use_reentrant=False)
            elif fold:
                tokens, residual = block(tokens, e0, text, ctx, kv, cross, residual, defer=True)
            else:
                tokens = block(tokens, e0, text, ctx, kv, cross)
        return None if cache_only else self.unpatchify(self.head(tokens, e, residual), grid)


OWN_FORWARDS.update({cls: cls.forward for cls in (WanBlock, LayerNorm, SelfAttention, RMSNorm, Attend, CrossAttention,
                                                  FeedForward, nn.Linear, nn.GELU, Head)})
