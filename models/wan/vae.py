"""The Wan2.1 video VAE: Wan's own `Wan2.1_VAE.pth` (or a diffusers pipeline's vae/) loaded into diffusers'
`AutoencoderKLWan`.

How it fits: the DiT denoises latents [B, F, 16, h, w] in a *normalised* latent space; this module turns them
into pixels (decode, or chunk by chunk with `StreamDecoder` while a rollout is still running) and pixels back
into latents (encode). It knows nothing of the DiT.

Conventions (Wan `WanVAE_.encode/decode(z, scale=[mean, 1/std])`, Self-Forcing `WanVAEWrapper`):
  encode:  z_norm = (mu - mean) / std           (mu = the posterior mean, no sampling)
  decode:  z      = z_norm * std + mean, then the decoder, then clamp to [-1, 1]
with the 16 per-channel constants `LATENTS_MEAN` / `LATENTS_STD` below.
Geometry: spatial stride 8, temporal stride 4 with a causal first frame: T = 1 + 4 (F - 1) pixel frames
(21 latents -> 81 frames); encode needs T = 1 + 4k frames and H, W multiples of 8.
The decoder is causal in time and runs one latent frame at a time with a feature cache, so decoding a video
chunk by chunk (`StreamDecoder.push`) and concatenating gives exactly what `decode` gives.

Two implementations of the decoder (`WanVAE(decoder=...)`): "reference" runs diffusers' modules; "fast"
(models/wan/vae_fast.py) runs the same layers with channels-last activations, fixed cache buffers and, on CUDA,
CUDA graphs; it differs from "reference" by rounding only. "auto" is WORKBENCH_VAE_DECODER if set, else "fast"
on CUDA (0.39x the reference's time on an H200 and as close to a float32 decode: bench/RESULTS.md, session 17)
and "reference", diffusers' own code, elsewhere. A stream decoder can also decode on a side CUDA stream
(`stream_decoder(overlap=True)` and `push_async`), so a rollout's next chunk is denoised while the last one is
decoded.

Key map: Wan names (`encoder.downsamples.K.residual.2.weight`, `decoder.upsamples.K...`, `conv1`, `conv2`)
<-> diffusers names (`encoder.down_blocks.K.conv1.weight`, `decoder.up_blocks.i.resnets.j...`, `quant_conv`,
`post_quant_conv`); a file with diffusers' names is renamed to Wan's on the way in. The layout (base_dim, z_dim,
dim_mult, num_res_blocks, temporal downsampling) is read from the tensor shapes, so the real VAE and small test
VAEs load through the same path; every tensor of the file must be used and every parameter of the model filled,
or loading fails with the lists of keys.
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass

import torch

from models.common.graph_streams import side_stream
from models.errors import CheckpointError, ModelInputError
from models.files import check_tensor_shapes, load_state_dict_file

# Self-Forcing `WanVAEWrapper` / Wan `WanVAE` per-channel latent statistics (z_dim = 16).
LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]
Z_DIM = 16
SPATIAL_STRIDE = 8
TEMPORAL_STRIDE = 4
DECODERS = ("auto", "reference", "fast")
DEFAULT_DECODER = {"cuda": "fast"}  # what "auto" means per device type without WORKBENCH_VAE_DECODER
DEFAULT_DECODER_ELSEWHERE = "reference"  # any other device (bench/bench_e2e.py compares both)


def resolve_decoder(decoder: str, device=None) -> str:
    """'reference' or 'fast' for a `WanVAE(decoder=...)` setting on `device` ('auto': WORKBENCH_VAE_DECODER, else
    DEFAULT_DECODER's choice for the device's type; no device: the choice elsewhere, for checking a setting)."""
    if decoder == "auto":
        kind = None if device is None else torch.device(device).type
        decoder = os.environ.get("WORKBENCH_VAE_DECODER") or DEFAULT_DECODER.get(kind, DEFAULT_DECODER_ELSEWHERE)
        what = "WORKBENCH_VAE_DECODER"
    else:
        what = "decoder"
    if decoder not in DECODERS[1:]:
        raise ModelInputError(f"{what} {decoder!r}: use one of {list(DECODERS[1:])}")
    return decoder


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames decoded from `latent_frames` latents: 1 + 4 (F - 1)  (21 -> 81, 3 -> 9)."""
    if latent_frames < 1:
        raise ModelInputError(f"latent frame count must be >= 1, got {latent_frames}")
    return 1 + TEMPORAL_STRIDE * (latent_frames - 1)


def latent_frames(pixel_frame_count: int) -> int:
    """Latent frames encoding `pixel_frame_count` frames; needs T = 1 + 4k (81 -> 21)."""
    if pixel_frame_count < 1 or (pixel_frame_count - 1) % TEMPORAL_STRIDE:
        raise ModelInputError(
            f"pixel frame count must be 1 + 4k (1, 5, 9, ..., 81), got {pixel_frame_count}")
    return 1 + (pixel_frame_count - 1) // TEMPORAL_STRIDE


# ----------------------------------------------------------------------------------------------------------
# Layout and key map
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAELayout:
    """Sizes of a Wan2.1-style VAE. The released one: base_dim 96, z_dim 16, dim_mult (1, 2, 4, 4),
    num_res_blocks 2, temporal_downsample (False, True, True)."""
    base_dim: int
    z_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temporal_downsample: tuple[bool, ...]


# Inside one residual block: Wan's nn.Sequential indices <-> diffusers' attribute names.
_RES_WAN_TO_DIFF = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight",
                    "residual.2.bias": "conv1.bias", "residual.3.gamma": "norm2.gamma",
                    "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
                    "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_RES_DIFF_TO_WAN = {v: k for k, v in _RES_WAN_TO_DIFF.items()}
_TOP_WAN_TO_DIFF = {"conv1.weight": "quant_conv.weight", "conv1.bias": "quant_conv.bias",
                    "conv2.weight": "post_quant_conv.weight", "conv2.bias": "post_quant_conv.bias"}
_TOP_DIFF_TO_WAN = {v: k for k, v in _TOP_WAN_TO_DIFF.items()}
_HEAD_WAN_TO_DIFF = {"head.0.gamma": "norm_out.gamma", "head.2.weight": "conv_out.weight",
                     "head.2.bias": "conv_out.bias", "conv1.weight": "conv_in.weight", "conv1.bias": "conv_in.bias"}
_HEAD_DIFF_TO_WAN = {v: k for k, v in _HEAD_WAN_TO_DIFF.items()}


def _res(rest: str, table: dict[str, str], key: str) -> str:
    if rest not in table:
        raise KeyError(f"unknown residual-block parameter in {key!r}")
    return table[rest]


def wan_to_diffusers_key(key: str, num_res_blocks: int) -> str:
    """One Wan VAE state-dict name -> the diffusers `AutoencoderKLWan` name (KeyError if it is not a Wan name).

    Decoder: Wan's flat `decoder.upsamples.K` holds, per level i, (num_res_blocks + 1) residual blocks and then
    one resample, so K = i (num_res_blocks + 2) + j; diffusers splits it into `up_blocks.i.resnets.j` and
    `up_blocks.i.upsamplers.0`. Encoder: `downsamples.K` and `down_blocks.K` share the flat index.
    """
    if key in _TOP_WAN_TO_DIFF:
        return _TOP_WAN_TO_DIFF[key]
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        raise KeyError(f"not a Wan VAE key: {key!r}")
    if rest in _HEAD_WAN_TO_DIFF:
        return f"{part}.{_HEAD_WAN_TO_DIFF[rest]}"
    m = re.fullmatch(r"middle\.(\d)\.(.+)", rest)
    if m:
        idx, inner = int(m.group(1)), m.group(2)
        if idx == 1:  # attention block: same inner names
            if inner not in ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias"):
                raise KeyError(f"unknown attention parameter in {key!r}")
            return f"{part}.mid_block.attentions.0.{inner}"
        if idx not in (0, 2):
            raise KeyError(f"middle block index must be 0, 1 or 2 in {key!r}")
        return f"{part}.mid_block.resnets.{idx // 2}.{_res(inner, _RES_WAN_TO_DIFF, key)}"
    m = re.fullmatch(r"(downsamples|upsamples)\.(\d+)\.(.+)", rest)
    if not m or (part == "encoder") != (m.group(1) == "downsamples"):
        raise KeyError(f"not a Wan VAE key: {key!r}")
    k, inner = int(m.group(2)), m.group(3)
    is_resample = inner.startswith(("resample.", "time_conv."))
    if part == "encoder":
        return f"encoder.down_blocks.{k}.{inner if is_resample else _res(inner, _RES_WAN_TO_DIFF, key)}"
    level, j = divmod(k, num_res_blocks + 2)
    if is_resample:
        if j != num_res_blocks + 1:
            raise KeyError(f"resample parameter at a residual-block index in {key!r}")
        return f"decoder.up_blocks.{level}.upsamplers.0.{inner}"
    if j > num_res_blocks:
        raise KeyError(f"residual parameter at a resample index in {key!r}")
    return f"decoder.up_blocks.{level}.resnets.{j}.{_res(inner, _RES_WAN_TO_DIFF, key)}"


def diffusers_to_wan_key(key: str, num_res_blocks: int) -> str:
    """The inverse of `wan_to_diffusers_key`."""
    if key in _TOP_DIFF_TO_WAN:
        return _TOP_DIFF_TO_WAN[key]
    part, _, rest = key.partition(".")
    if part not in ("encoder", "decoder"):
        raise KeyError(f"not a diffusers AutoencoderKLWan key: {key!r}")
    if rest in _HEAD_DIFF_TO_WAN:
        return f"{part}.{_HEAD_DIFF_TO_WAN[rest]}"
    m = re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", rest)
    if m:
        kind, idx, inner = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"{part}.middle.1.{inner}"
        return f"{part}.middle.{2 * idx}.{_res(inner, _RES_DIFF_TO_WAN, key)}"
    if part == "encoder":
        m = re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest)
        if not m:
            raise KeyError(f"not a diffusers AutoencoderKLWan key: {key!r}")
        k, inner = m.group(1), m.group(2)
        if inner.startswith(("resample.", "time_conv.")):
            return f"encoder.downsamples.{k}.{inner}"
        return f"encoder.downsamples.{k}.{_res(inner, _RES_DIFF_TO_WAN, key)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", rest)
    if not m:
        raise KeyError(f"not a diffusers AutoencoderKLWan key: {key!r}")
    level, inner = int(m.group(1)), m.group(4)
    if m.group(3) is None:  # upsampler
        return f"decoder.upsamples.{level * (num_res_blocks + 2) + num_res_blocks + 1}.{inner}"
    k = level * (num_res_blocks + 2) + int(m.group(3))
    return f"decoder.upsamples.{k}.{_res(inner, _RES_DIFF_TO_WAN, key)}"


def to_wan_names(sd: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """A VAE state dict under Wan's names: as it is when it has them, renamed when it has diffusers' (a pipeline's
    vae/diffusion_pytorch_model.safetensors). num_res_blocks, which the renaming of the decoder needs, is the
    count of the first up block's residual blocks less one (the decoder's levels hold one more than the encoder's)."""
    resnets = {m.group(1) for k in sd if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k))}
    if not resnets:
        return sd
    try:
        return {diffusers_to_wan_key(k, len(resnets) - 1): v for k, v in sd.items()}
    except KeyError as e:
        raise CheckpointError(f"{source}: {e.args[0]}") from None


def infer_layout(sd: dict[str, torch.Tensor], source: str = "state dict") -> VAELayout:
    """Read the VAE sizes from a Wan-named state dict's shapes (see `VAELayout`)."""
    need = ["conv2.weight", "encoder.conv1.weight", "decoder.conv1.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(
            f"{source}: not a Wan2.1 VAE state dict (missing {missing}; first keys: {sorted(sd)[:5]})")
    z_dim = sd["conv2.weight"].shape[0]
    base_dim = sd["encoder.conv1.weight"].shape[0]
    # Encoder `downsamples`: per level, num_res_blocks residual blocks then a resample (none after the last).
    kinds: dict[int, str] = {}
    out_dims: dict[int, int] = {}
    has_time_conv: dict[int, bool] = {}
    for key, t in sd.items():
        m = re.fullmatch(r"encoder\.downsamples\.(\d+)\.(\w+)\..+", key)
        if not m:
            continue
        k, what = int(m.group(1)), m.group(2)
        kind = {"residual": "res", "shortcut": "res", "resample": "resample", "time_conv": "resample"}.get(what)
        if kind is None:
            raise CheckpointError(
                f"{source}: unsupported VAE layout: {key!r} (attention inside the down blocks is not Wan2.1)")
        if kinds.setdefault(k, kind) != kind:
            raise CheckpointError(f"{source}: encoder.downsamples.{k} mixes residual and resample parameters")
        if key.endswith("residual.2.weight"):
            out_dims[k] = t.shape[0]
        has_time_conv[k] = has_time_conv.get(k, False) or what == "time_conv"
    order = [kinds[k] for k in sorted(kinds)]
    if sorted(kinds) != list(range(len(kinds))) or not order or order[0] != "res":
        raise CheckpointError(f"{source}: encoder.downsamples indices are not 0..N-1 starting with a residual block")
    num_res_blocks = order.index("resample") if "resample" in order else len(order)
    n_levels = order.count("resample") + 1
    expect = (["res"] * num_res_blocks + ["resample"]) * (n_levels - 1) + ["res"] * num_res_blocks
    if order != expect:
        raise CheckpointError(f"{source}: encoder.downsamples layout {order} is not a Wan2.1 layout")
    dim_mult, temporal = [], []
    for level in range(n_levels):
        first = level * (num_res_blocks + 1)
        out = out_dims.get(first)
        if out is None or out % base_dim:
            raise CheckpointError(f"{source}: encoder.downsamples.{first} has no conv weight of width k*{base_dim}")
        dim_mult.append(out // base_dim)
        if level < n_levels - 1:
            temporal.append(has_time_conv[first + num_res_blocks])
    if n_levels != 4:
        raise CheckpointError(f"{source}: Wan2.1 VAEs have 4 resolution levels, this one has {n_levels}")
    if z_dim != Z_DIM:
        raise CheckpointError(f"{source}: z_dim is {z_dim}; the Wan2.1 latent statistics need z_dim {Z_DIM}")
    if sum(temporal) != 2:
        raise CheckpointError(
            f"{source}: temporal downsampling {temporal} does not give the stride 4 of Wan2.1 (two levels)")
    return VAELayout(base_dim, z_dim, tuple(dim_mult), num_res_blocks, tuple(temporal))


def build_diffusers_vae(sd: dict[str, torch.Tensor], source: str = "state dict"):
    """A diffusers `AutoencoderKLWan` holding the tensors of the Wan-named `sd` (no copies: assign)."""
    from diffusers import AutoencoderKLWan

    layout = infer_layout(sd, source)
    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=layout.base_dim, z_dim=layout.z_dim, dim_mult=list(layout.dim_mult),
                                 num_res_blocks=layout.num_res_blocks,
                                 temperal_downsample=list(layout.temporal_downsample),
                                 latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    target = model.state_dict()
    wan_of = {d: diffusers_to_wan_key(d, layout.num_res_blocks) for d in target}
    check_tensor_shapes({w: target[d].shape for d, w in wan_of.items()}, sd,
                        f"{source}: VAE weights do not match the Wan2.1 layout {layout}")
    model.load_state_dict({d: sd[w] for d, w in wan_of.items()}, strict=True, assign=True)
    return model, layout


# ----------------------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------------------

class WanVAE:
    """Decode/encode between the DiT's normalised latents [B, F, 16, h, w] and video [B, 3, T, H, W] in [-1, 1]."""

    def __init__(self, model, layout: VAELayout, device, dtype, decoder: str = "auto"):
        self.decoder = resolve_decoder(decoder, device)
        # nn.Module.to, not ModelMixin.to (which warns about fp32-pinned modules; this VAE has none)
        self.model = torch.nn.Module.to(model, device=device, dtype=dtype).eval().requires_grad_(False)
        self.layout = layout
        self.device = torch.device(device)
        self.dtype = dtype
        self._fast = None  # the FastDecoder (buffers, graphs), made on first use
        self._fast_weights = None  # the weights it copied (`fast_decoder`)
        self.mean = torch.tensor(LATENTS_MEAN, dtype=torch.float32, device=device).view(1, 1, Z_DIM, 1, 1)
        self.std = torch.tensor(LATENTS_STD, dtype=torch.float32, device=device).view(1, 1, Z_DIM, 1, 1)
        self._decoder_takes_first_chunk = "first_chunk" in inspect.signature(self.model.decoder.forward).parameters

    @classmethod
    def from_file(cls, path, device="cpu", dtype=torch.float32, trust_pickle: bool = False,
                  decoder: str = "auto") -> "WanVAE":
        """Load Wan's `Wan2.1_VAE.pth` (or a .safetensors with Wan's names or diffusers', as a pipeline's vae/)."""
        resolve_decoder(decoder)  # a bad setting is refused before the file is read
        sd = to_wan_names(load_state_dict_file(path, trust_pickle=trust_pickle), str(path))
        return cls.from_state_dict(sd, device=device, dtype=dtype, source=str(path), decoder=decoder)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], device="cpu", dtype=torch.float32,
                        source: str = "state dict", decoder: str = "auto") -> "WanVAE":
        """Build from a Wan-named state dict (tensors are assigned, then moved once to device/dtype)."""
        model, layout = build_diffusers_vae(sd, source)
        return cls(model, layout, device, dtype, decoder=decoder)

    # -- normalisation ---------------------------------------------------------------------------------------
    def _check_latents(self, latents: torch.Tensor, what: str) -> None:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[2] != Z_DIM:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ModelInputError(f"{what}: latents must be [B, F, {Z_DIM}, h, w], got {shape}")
        if latents.shape[1] < 1 or latents.shape[0] < 1:
            raise ModelInputError(f"{what}: latents need B >= 1 and F >= 1, got {tuple(latents.shape)}")

    def unnormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """DiT latents [B, F, 16, h, w] -> VAE latents [B, 16, F, h, w] (z * std + mean) in the model dtype."""
        z = latents.to(device=self.device, dtype=torch.float32) * self.std + self.mean
        return z.permute(0, 2, 1, 3, 4).to(self.dtype)

    def normalise(self, mu: torch.Tensor) -> torch.Tensor:
        """VAE latents [B, 16, F, h, w] -> DiT latents [B, F, 16, h, w] ((mu - mean) / std), float32."""
        return (mu.float().permute(0, 2, 1, 3, 4) - self.mean) / self.std

    # -- decode / encode -------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, F, 16, h, w] (normalised) -> video [B, 3, 1 + 4(F-1), 8h, 8w] in [-1, 1], float32."""
        self._check_latents(latents, "decode")
        if self.decoder == "fast":  # one push: the same per-frame steps as any chunking of a stream
            return self.stream_decoder().push(latents)
        video = self.model.decode(self.unnormalise(latents)).sample  # [B, 3, T, H, W], clamped by diffusers
        return video.float()

    def stream_decoder(self, overlap: bool = False, priority: int = 0) -> "StreamDecoder":
        """A fresh chunk-by-chunk decoder (its own causal cache). overlap: on CUDA, `push_async` decodes on a
        side stream of this `priority` (lower is more urgent, as torch.cuda.Stream takes it)."""
        return StreamDecoder(self, overlap=overlap, priority=priority)

    def fast_decoder(self):
        """The `FastDecoder` of this VAE (models/wan/vae_fast.py), made on first use and again once the model's
        weights changed (it holds copies of them: a `load_state_dict` into `self.model` decoded with a mix of old and
        new weights): each parameter's address and version counter, which an in-place write bumps."""
        weights = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        if self._fast is None or self._fast_weights != weights:
            from models.wan.vae_fast import FastDecoder

            self._fast, self._fast_weights = None, weights  # (the old one's buffers and graphs freed first)
            self._fast = FastDecoder(self)
        return self._fast

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of 8 -> latents [B, F, 16, H/8, W/8]
        (normalised, the posterior mean), float32."""
        if not isinstance(video, torch.Tensor) or video.ndim != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ModelInputError(f"encode: video must be [B, 3, T, H, W] in [-1, 1], got {shape}")
        latent_frames(video.shape[2])  # checks T = 1 + 4k
        h, w = video.shape[3], video.shape[4]
        if h % SPATIAL_STRIDE or w % SPATIAL_STRIDE:
            raise ModelInputError(f"encode: height and width must be multiples of 8, got {h}x{w}")
        x = video.to(device=self.device, dtype=self.dtype)
        mu = self.model.encode(x).latent_dist.mode()  # [B, 16, F, h, w]
        return self.normalise(mu)


class StreamDecoder:
    """Decode latents chunk by chunk, keeping the decoder's causal feature cache between pushes.

    The first pushed latent frame gives 1 pixel frame, every later one 4, so pushing 21 latents as 7 chunks of
    3 gives 9 + 6 x 12 = 81 frames, and the concatenation of the pushes equals `WanVAE.decode` of all 21.
    (This is Wan's `cached_decode`, not the demo's zero-cache decoder that gives 12 frames for chunk 0.)

    With `overlap` on CUDA, `push_async` runs the decode on a side stream after the caller's stream has produced
    the chunk, and returns at once: the caller's stream goes on (the next chunk's denoising) while the side
    stream decodes. The decode runs the same kernels as `push`, so the frames are the same bits. Elsewhere
    `push_async` is `push`.
    """

    def __init__(self, vae: WanVAE, overlap: bool = False, priority: int = 0):
        self.vae = vae
        # the VAE's own side stream of this priority, the same for every video (models/common/graph_streams.py)
        self.stream = side_stream(vae, vae.device, priority) if overlap and vae.device.type == "cuda" else None
        n_conv = vae.model._cached_conv_counts["decoder"] if hasattr(vae.model, "_cached_conv_counts") else \
            sum(type(m).__name__ == "WanCausalConv3d" for m in vae.model.decoder.modules())
        self._feat_cache: list = [None] * n_conv  # per causal conv: the last 2 input frames (or 'Rep')
        self.frames_in = 0       # latent frames pushed so far
        self.frames_out = 0      # pixel frames returned so far
        self._geometry = None    # (B, h, w) of the first push

    @torch.no_grad()
    def push(self, latent_chunk: torch.Tensor) -> torch.Tensor:
        """latent_chunk [B, f, 16, h, w] -> the new pixel frames [B, 3, t, 8h, 8w] in [-1, 1], float32,
        t = 1 + 4(f-1) for the first push and 4f afterwards."""
        vae = self.vae
        vae._check_latents(latent_chunk, "StreamDecoder.push")
        geometry = (latent_chunk.shape[0], latent_chunk.shape[3], latent_chunk.shape[4])
        if self._geometry is None:
            self._geometry = geometry
        elif geometry != self._geometry:
            raise ModelInputError(
                f"StreamDecoder.push: chunk has (B, h, w) = {geometry}, earlier chunks {self._geometry}; "
                "start a new stream_decoder() for a different video")
        if vae.decoder == "fast":
            return self._push_fast(latent_chunk)
        x = vae.model.post_quant_conv(vae.unnormalise(latent_chunk))  # [B, 16, f, h, w], 1x1x1 conv
        outs = []
        for i in range(x.shape[2]):
            kwargs = {"first_chunk": self.frames_in == 0} if vae._decoder_takes_first_chunk else {}
            outs.append(vae.model.decoder(x[:, :, i:i + 1], feat_cache=self._feat_cache, feat_idx=[0], **kwargs))
            self.frames_in += 1
        video = torch.cat(outs, dim=2).clamp_(-1.0, 1.0).float()  # [B, 3, t, H, W]
        self.frames_out += video.shape[2]
        return video


    def _push_fast(self, latent_chunk: torch.Tensor) -> torch.Tensor:
        fast = self.vae.fast_decoder()
        if self.frames_in == 0:
            fast.reset(self._geometry)
            fast.owner = self
        elif fast.owner is not self:
            raise ModelInputError("StreamDecoder.push: another video started on this VAE's fast decoder since this "
                                  "stream began; the fast decoder decodes one video at a time")
        B, f, _, h, w = latent_chunk.shape
        t = pixel_frames(f) if self.frames_in == 0 else TEMPORAL_STRIDE * f
        video = torch.empty(B, 3, t, SPATIAL_STRIDE * h, SPATIAL_STRIDE * w, device=self.vae.device)
        pos = 0
        for i in range(f):
            frames = fast.step(latent_chunk[:, i:i + 1], first=self.frames_in == 0)  # [B, 3, 1 or 4, H, W]
            video[:, :, pos:pos + frames.shape[2]].copy_(frames)
            pos += frames.shape[2]
            self.frames_in += 1
        self.frames_out += t
        return video

    def push_async(self, latent_chunk: torch.Tensor) -> "PendingFrames":
        """Like `push`, but on CUDA with `overlap` the decode is queued on the side stream and this returns at
        once; `PendingFrames.get()` hands the frames to the caller's stream."""
        if self.vae.device.type != "cuda":
            return PendingFrames(self.push(latent_chunk))
        caller = torch.cuda.current_stream(self.vae.device)
        done = torch.cuda.Event(enable_timing=True)  # timing: benchmarks read when each chunk was ready
        started = torch.cuda.Event(enable_timing=True)
        if self.stream is None:
            started.record(caller)
            frames = self.push(latent_chunk)
            done.record(caller)
            return PendingFrames(frames, done, started)
        ready = torch.cuda.Event()
        ready.record(caller)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            started.record(self.stream)
            latent_chunk.record_stream(self.stream)  # its memory is not reused before the decode has read it
            frames = self.push(latent_chunk)
            done.record(self.stream)
        return PendingFrames(frames, done, started)


class PendingFrames:
    """The pixel frames of one pushed chunk [B, 3, t, H, W]. On CUDA, `started` and `done` are timing events
    recorded when the decode begins and when the frames are complete. `get()` makes the calling stream wait for
    `done` (the host does not wait) and returns the frames."""

    def __init__(self, frames: torch.Tensor, done=None, started=None):
        self.frames, self.done, self.started = frames, done, started

    def get(self) -> torch.Tensor:
        if self.done is not None and self.frames.is_cuda:
            stream = torch.cuda.current_stream(self.frames.device)
            stream.wait_event(self.done)
            self.frames.record_stream(stream)  # made on the side stream, read on this one
        return self.frames
