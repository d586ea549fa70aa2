"""The fast Wan2.1 VAE decoder: diffusers' `WanDecoder3d` layers and weights, run one latent frame at a time with
channels-last activations, fixed buffers for the causal caches and, on CUDA, one CUDA graph per step.

How it fits: models/wan/vae.py's `StreamDecoder` (and `WanVAE.decode`, a stream of one push) calls `FastDecoder.step`
for each latent frame when the VAE's decoder is "fast"; the "reference" decoder calls diffusers' modules. Both
decode the same function (tests/test_vae_fast.py: equal in float64 on the CPU, whole and streamed).

What differs from the diffusers code, and why it is the same function:
- Layout: activations are [B, C, T, H, W] tensors in channels_last_3d memory ([B][T][H][W][C]), so cuDNN runs
  NDHWC implicit-GEMM kernels with no layout transposes. The 2D parts (the upsamplers' convolutions, the
  mid-block attention) see the frames as a batch of channels-last images: views of the same memory.
- Causal caches: each causal convolution owns an input buffer of `cache + T` frames (cache = 2 for a 3-frame
  kernel). A step writes the convolution's input (RMSNorm + SiLU: one Triton kernel on CUDA,
  models/wan/triton_vae.py) straight into the buffer's last T frames; the convolution reads the whole buffer (no
  torch.cat, no F.pad: H and W are zero-padded by the convolution); then the last `cache` frames move to the
  front for the next step. Buffers start at zero: exactly diffusers' zero padding of the first frames. The
  first step skips the temporal upsampling convolutions and leaves their buffers at zero, which is diffusers'
  "Rep" marker (its second step pads that convolution with zeros).
- Upsampling: the interleave of `time_conv`'s two channel halves into 2T frames and the 2x nearest
  upsampling are one copy into the next convolution's input.
- Biases (CUDA, Triton): the convolutions run without their bias and the next kernel adds it: the norm kernel
  for a residual block's first convolution, one in-place pass (models/wan/triton_vae.py `combine_`) that also
  adds the temporal taps and the residual for the others. The same sums in the same order and dtype as
  PyTorch's separate `add_` of a cuDNN convolution's bias, so the same bits, without its slow broadcast pass.
- Temporal taps: a 3x3x3 causal convolution whose output channels are in TAPS_CHANNELS (per device type) runs as
  three 3x3 `conv2d` over views of its buffer's frames, summed. On CUDA only at 64-127 channels (cuDNN's conv3d
  picks a slow kernel for the 96-channel convolutions at 480x832, 248 TFLOP/s, against 323 for the three 2D ones;
  at 3 and at 192 or more channels conv3d is the faster: bench/bench_vae_convs.py); on the CPU below 64 channels
  (PyTorch's CPU conv3d takes 1.7-6x the time of the three conv2d at the embedded VAE's 8-32 channels; at 96-384
  the two are even or conv3d is faster: bench/bench_vae_cpu.py). The same products, summed in another order:
  a rounding difference only (tests/test_vae_fast.py checks it in float64).
- The latent normalisation and `post_quant_conv` run per latent frame inside the step, so a whole decode and
  any chunking of the same latents run the same kernels on the same data: equal bitwise.
Numerics: the same operations in the same dtype. In bf16 the frames differ from the reference decoder by
rounding (other convolution algorithms, the fused norm); float32/float64 agree to rounding.

The graphs are recorded on the decoder's own capture stream (models/common/graph_streams.py): replayed on the decode
stream beside the rollout's graphs, their GEMMs must not share a cuBLAS workspace with those.

One video at a time: the buffers and graphs belong to the `FastDecoder` of a `WanVAE` and are re-zeroed when a
new stream starts (`reset`); an older stream that pushes again afterwards is refused (models/wan/vae.py).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from models.common.graph_streams import capture_stream
from models.errors import ModelInputError

CL3 = torch.channels_last_3d
CL2 = torch.channels_last
# device type -> the output channels of the 3x3x3 convolutions that run as three 2D taps (B = 1 only)
TAPS_CHANNELS = {"cuda": range(64, 128), "cpu": range(64)}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] channels-last (or a frame slice of a buffer), or [B, C, H, W] channels-last
    -> [B, T*H*W, C], a view of the same memory."""
    return t.movedim(1, -1).view(t.shape[0], -1, t.shape[1])


def _frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] channels-last -> [B*T, C, H, W] channels-last images, a view (for B = 1 also of a frame
    slice of a buffer)."""
    B, C, T, H, W = x.shape
    return x.transpose(1, 2).reshape(B * T, C, H, W)


def _as_video(y: torch.Tensor, T: int) -> torch.Tensor:
    """[B*T, C, H, W] channels-last images -> [B, C, T, H, W] channels last, a view."""
    N, C, H, W = y.shape
    return y.permute(0, 2, 3, 1).view(N // T, T, H, W, C).permute(0, 4, 1, 2, 3)


def _fused(x: torch.Tensor) -> bool:
    """Whether x's norms and sums run as Triton kernels (CUDA, half or float32; else the PyTorch code)."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and _triton_ok()


def _norm_into(out: torch.Tensor, x: torch.Tensor, norm, silu: bool, bias: torch.Tensor | None = None) -> None:
    """out <- SiLU(norm(x + bias)) (or norm(...); no bias: of x); out, x [B, C, T, H, W] (or [B, C, H, W] for a
    norm of images) channels-last; norm a diffusers `WanRMS_norm`; bias [C] (a convolution's, not yet added)."""
    if _fused(x):
        from models.wan.triton_vae import rms_silu_into

        fmt = CL3 if x.ndim == 5 else CL2  # (a no-op copy: convolutions return this layout)
        rms_silu_into(_rows(out), _rows(x.contiguous(memory_format=fmt)), norm.gamma, norm.scale, silu=silu,
                      bias=bias)
        return
    if bias is not None:
        x = x + bias.view(-1, *[1] * (x.ndim - 2))
    y = norm(x)  # the module itself: exactly the reference math
    out.copy_(F.silu(y) if silu else y)


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    """A dense channels-last tensor [B, C, ...] as a flat view (channels fastest), or None if it is not one."""
    rows = t.movedim(1, -1)  # [B, ..., C]
    return rows.view(-1) if rows.is_contiguous() else None


def _combine(y: torch.Tensor, parts=(), bias: torch.Tensor | None = None,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """y <- (((y + parts...) + bias) + residual) in place, rounded after each sum as PyTorch's add_ chain;
    y, parts, residual [B, C, T, H, W] (or [B, C, H, W]) channels-last, bias [C]. One Triton pass on CUDA."""
    if not parts and bias is None and residual is None:
        return y
    if _fused(y) and len(parts) <= 2:
        flats = [_flat(t) for t in [y, *parts] + ([] if residual is None else [residual])]
        if all(f is not None for f in flats):
            from models.wan.triton_vae import combine_

            combine_(flats[0], flats[1:1 + len(parts)], bias, None if residual is None else flats[-1])
            return y
    for p in parts:
        y.add_(p)
    if bias is not None:
        y.add_(bias.view(-1, *[1] * (y.ndim - 2)))
    if residual is not None:
        y.add_(residual)
    return y


def _triton_ok() -> bool:
    if os.environ.get("WORKBENCH_COMPILE", "1") == "0":  # the switch models/wan/fused.py also reads
        return False
    from models.common.triton_version import usable

    return usable()


class _CausalConv:
    """One causal convolution (diffusers `WanCausalConv3d`, stride 1) and its input buffer
    [B, Cin, cache + frames, H, W] (channels last): frames = the most frames a step gives it."""

    def __init__(self, conv, frames: int):
        if tuple(conv.stride) != (1, 1, 1):
            raise ModelInputError(f"fast VAE decoder: causal convolution with stride {tuple(conv.stride)}; only 1")
        self.weight = conv.weight.detach().contiguous(memory_format=CL3)  # a copy: the module keeps its own
        self.bias = None if conv.bias is None else conv.bias.detach()
        self.cache = conv._padding[4]  # 2 * temporal padding: 2 for a 3-frame kernel, 0 for 1
        self.padding = (0, conv._padding[2], conv._padding[0])  # (T, H, W): time is the buffer's job
        self.frames = frames
        self.buf: torch.Tensor | None = None
        self.taps: list | None = None  # the weight's temporal taps as 2D kernels, made on first use

    def input(self, like: torch.Tensor, T: int) -> torch.Tensor:
        """The buffer's slot for this step's T input frames, [B, Cin, T, H, W] (allocated on first use)."""
        B, C, _, H, W = like.shape
        shape = (B, C, self.cache + self.frames, H, W)
        if self.buf is None or tuple(self.buf.shape) != shape:
            self.buf = torch.zeros(shape, device=like.device, dtype=like.dtype).contiguous(memory_format=CL3)
        return self.buf[:, :, self.cache:self.cache + T]

    def run(self, T: int) -> tuple[torch.Tensor, list, torch.Tensor | None]:
        """Convolve the cached frames + this step's T frames; keep the last `cache`. Returns (y, parts, bias):
        the convolution is y + parts... + bias, each [B, Cout, T, H, W] channels last, bias [Cout] or None:
        on CUDA the sum is left to the next kernel (`_combine`, `_norm_into`); elsewhere y is the whole."""
        buf, c = self.buf, self.cache
        B = buf.shape[0]
        defer = _fused(buf)
        bias = self.bias if defer else None
        parts = []
        if c == 2 and B == 1 and self.weight.shape[0] in TAPS_CHANNELS.get(buf.device.type, ()) and \
                tuple(self.weight.shape[2:]) == (3, 3, 3):
            if self.taps is None:  # [Cout, Cin, 3, 3] per temporal tap k (frame t + k - 2 of output frame t)
                self.taps = [self.weight[:, :, k].contiguous(memory_format=CL2) for k in range(3)]
            pad = self.padding[1:]
            y, *parts = [F.conv2d(_frames(buf[:, :, k:k + T]), self.taps[k], None, padding=pad)
                         for k in (2, 1, 0)]  # [T, Cout, H, W] each
            y, parts = _as_video(y, T), [_as_video(p, T) for p in parts]
            if not defer:
                _combine(y, parts, self.bias)
                parts = []
        else:
            y = F.conv3d(buf[:, :, :c + T], self.weight, None if defer else self.bias, padding=self.padding)
        if c and T >= c:
            buf[:, :, :c].copy_(buf[:, :, T:T + c])
        else:
            for i in range(c):  # source index T + i > i: in order, no frame is overwritten before it is read
                buf[:, :, i].copy_(buf[:, :, T + i])
        return y, parts, bias

    def full(self, T: int) -> torch.Tensor:
        """run(T) with the sums done: [B, Cout, T, H, W] channels last."""
        y, parts, bias = self.run(T)
        return _combine(y, parts, bias)

    def reset(self) -> None:
        if self.buf is not None and self.cache:
            self.buf[:, :, :self.cache].zero_()


class _ResBlock:
    def __init__(self, block, frames: int):
        self.norm1, self.norm2 = block.norm1, block.norm2
        self.conv1, self.conv2 = _CausalConv(block.conv1, frames), _CausalConv(block.conv2, frames)
        sc = block.conv_shortcut
        self.shortcut = None if isinstance(sc, torch.nn.Identity) else (
            sc.weight.detach().contiguous(memory_format=CL3), None if sc.bias is None else sc.bias.detach())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [B, C, T, H, W] channels last
        T = x.shape[2]
        if self.shortcut is None:
            h = x
        else:
            (w, b), fused = self.shortcut, _fused(x)
            h = _combine(F.conv3d(x, w, None if fused else b), bias=b if fused else None)
        _norm_into(self.conv1.input(x, T), x, self.norm1, silu=True)
        y, parts, bias = self.conv1.run(T)
        _combine(y, parts)  # (the bias goes into the norm kernel)
        _norm_into(self.conv2.input(y, T), y, self.norm2, silu=True, bias=bias)
        y, parts, bias = self.conv2.run(T)
        return _combine(y, parts, bias, residual=h)

    def convs(self):
        return [self.conv1, self.conv2]


class _Attention:
    """The mid block's single-head attention over the pixels of each frame (diffusers `WanAttentionBlock`)."""

    def __init__(self, block):
        C = block.to_qkv.weight.shape[1]
        self.norm = block.norm
        self.qkv_w, self.qkv_b = block.to_qkv.weight.detach().reshape(3 * C, C), block.to_qkv.bias.detach()
        self.proj_w, self.proj_b = block.proj.weight.detach().reshape(C, C), block.proj.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        frames = _frames(x)  # [B*T, C, H, W]: the norm's gamma is shaped for images
        n = torch.empty_like(frames, memory_format=CL2)
        _norm_into(n, frames, self.norm, silu=False)
        qkv = F.linear(_rows(n), self.qkv_w, self.qkv_b)  # [B*T, HW, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # [B*T, 1, HW, C] each, as diffusers splits them
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B*T, HW, C]
        out = F.linear(a, self.proj_w, self.proj_b).view(B, T, H, W, C)
        return out.permute(0, 4, 1, 2, 3).add_(x)  # [B, C, T, H, W] channels last


class _Upsample:
    """diffusers `WanResample` in mode upsample2d or upsample3d: (temporal 2x by `time_conv`, interleaving its
    two channel halves) then per frame a 2x nearest upsampling and a 3x3 convolution."""

    def __init__(self, resample, frames: int):
        if resample.mode not in ("upsample2d", "upsample3d"):
            raise ModelInputError(f"fast VAE decoder: resample mode {resample.mode!r} in the decoder")
        up, conv = resample.resample[0], resample.resample[1]
        if tuple(up.scale_factor) != (2.0, 2.0) or up.mode != "nearest-exact" or conv.padding != (1, 1):
            raise ModelInputError("fast VAE decoder: the upsampler is not Wan2.1's (2x nearest-exact, 3x3 conv)")
        self.time = _CausalConv(resample.time_conv, frames) if resample.mode == "upsample3d" else None
        self.weight = conv.weight.detach().contiguous(memory_format=CL2)
        self.bias = conv.bias.detach()

    def __call__(self, x: torch.Tensor, first: bool) -> torch.Tensor:
        B, C, T, H, W = x.shape
        if self.time is not None and not first:
            self.time.input(x, T).copy_(x)
            y = self.time.full(T).contiguous(memory_format=CL3)  # [B, 2C, T, H, W]: frame 2t + s = channels
            # [s C, (s + 1) C) of frame t
            src, s = _rows(y).view(B, T, H, W, 2, C).permute(0, 1, 4, 2, 3, 5), 2  # [B, T, 2, H, W, C]
        else:  # upsample2d, or the first step of upsample3d (diffusers' "Rep": no time_conv, no new frame)
            src, s = _rows(x.contiguous(memory_format=CL3)).view(B, T, 1, H, W, C), 1
        up = src[:, :, :, :, None, :, None, :].expand(B, T, s, H, 2, W, 2, C)
        up = up.reshape(B * T * s, 2 * H, 2 * W, C).permute(0, 3, 1, 2)  # one copy; channels-last NCHW
        if up.dtype == torch.float64:  # diffusers' WanUpsample rounds to float32 (exact for bf16 and fp32)
            up = up.float().double()
        fused = _fused(up)
        out = F.conv2d(up, self.weight, None if fused else self.bias, padding=1)  # [B*T*s, C', 2H, 2W]
        out = _combine(out, bias=self.bias if fused else None)
        Co = out.shape[1]
        return out.permute(0, 2, 3, 1).reshape(B, T * s, 2 * H, 2 * W, Co).permute(0, 4, 1, 2, 3)

    def convs(self):
        return [] if self.time is None else [self.time]


class FastDecoder:
    """Decode one latent frame per `step` with the weights of a diffusers `AutoencoderKLWan` (Wan2.1 layout).

    step(z, first) takes normalised latents z [B, 1, 16, h, w] (the DiT's space; any float dtype) and returns
    that frame's pixels [B, 3, t, 8h, 8w] in [-1, 1], float32 (t = 1 for the first step of a video, 4 after).
    `graphs`: on CUDA, replay each kind of step (first, later) from a CUDA graph recorded at its second use
    (the first runs eagerly: it plans the kernels). The returned tensor of a replayed step is the graph's own
    output buffer: copy it before the next step. `cudnn_benchmark`: let cuDNN time its convolution algorithms
    (faster, but the choice, and so the last bits, can differ between processes)."""

    def __init__(self, vae, graphs: bool = True, cudnn_benchmark: bool = False):
        self.vae = vae
        model = vae.model
        dec = model.decoder
        if getattr(model.config, "patch_size", None) is not None or not hasattr(dec, "mid_block"):
            raise ModelInputError("fast VAE decoder: not a Wan2.1 decoder (patchified or unknown layout)")
        self.post_quant = model.post_quant_conv
        self.graphs, self.cudnn_benchmark = graphs, cudnn_benchmark
        frames = 1  # frames per step at the current level, after the first step
        self.conv_in = _CausalConv(dec.conv_in, frames)
        mid = dec.mid_block
        if len(mid.attentions) != 1 or len(mid.resnets) != 2:
            raise ModelInputError("fast VAE decoder: the mid block is not Wan2.1's (resnet, attention, resnet)")
        self.mid = [_ResBlock(mid.resnets[0], frames), _Attention(mid.attentions[0]),
                    _ResBlock(mid.resnets[1], frames)]
        self.levels = []
        for block in dec.up_blocks:
            if hasattr(block, "avg_shortcut"):
                raise ModelInputError("fast VAE decoder: residual up blocks (Wan2.2) are not supported")
            resnets = [_ResBlock(r, frames) for r in block.resnets]
            up = None
            if block.upsamplers is not None:
                up = _Upsample(block.upsamplers[0], frames)
                frames *= 2 if up.time is not None else 1
            self.levels.append((resnets, up))
        self.norm_out = dec.norm_out
        self.conv_out = _CausalConv(dec.conv_out, frames)
        self._graphs: dict = {}  # first -> (graph, static input, static output)
        self._eager_steps: dict = {}  # first -> eager steps run (graphs are recorded at the second)
        self._pool = None
        self._geometry = None
        self.owner = None  # the StreamDecoder whose video the buffers hold

    def causal_convs(self) -> list[_CausalConv]:
        convs = [self.conv_in, *self.mid[0].convs(), *self.mid[2].convs()]
        for resnets, up in self.levels:
            for r in resnets:
                convs += r.convs()
            if up is not None:
                convs += up.convs()
        return convs + [self.conv_out]

    def reset(self, geometry) -> None:
        """Start a video of (B, h, w): zero the cached frames (new geometry: new buffers and graphs)."""
        if geometry != self._geometry:
            for conv in self.causal_convs():
                conv.buf = None
            self._graphs, self._eager_steps, self._pool = {}, {}, None
            self._geometry = geometry
        for conv in self.causal_convs():
            conv.reset()

    def step(self, z: torch.Tensor, first: bool) -> torch.Tensor:
        if not (self.graphs and z.is_cuda):
            return self._step(z, first)
        if first not in self._graphs:
            if self._eager_steps.get(first, 0) < 1:
                self._eager_steps[first] = self._eager_steps.get(first, 0) + 1
                return self._step(z, first)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            static_in = z.detach().float().clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=capture_stream(self, z.device)):
                static_out = self._step(static_in, first)
            self._graphs[first] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[first]
        static_in.copy_(z)
        graph.replay()
        return static_out

    def _step(self, z: torch.Tensor, first: bool) -> torch.Tensor:
        with _cudnn_benchmark(self.cudnn_benchmark):
            x = self.post_quant(self.vae.unnormalise(z))  # [B, 16, 1, h, w]
            self.conv_in.input(x, 1).copy_(x)
            x = self.conv_in.full(1)
            x = self.mid[0](x)
            x = self.mid[1](x)
            x = self.mid[2](x)
            for resnets, up in self.levels:
                for r in resnets:
                    x = r(x)
                if up is not None:
                    x = up(x, first)
            T = x.shape[2]
            _norm_into(self.conv_out.input(x, T), x, self.norm_out, silu=True)
            x = self.conv_out.full(T)
            return x.clamp_(-1.0, 1.0).float().contiguous()  # [B, 3, T, H, W], NCDHW like the reference


@contextlib.contextmanager
def _cudnn_benchmark(on: bool):
    if not on:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
