"""Model families: what the commands need to know about a family of video DiTs, in one entry each.

A family names the pixel size its models run at unless a model folder records its own, the VAE's strides
(pixels per latent cell, pixel frames per latent frame), the latent frames per chunk of its causal rollout, the
latent frames its KV cache holds with global attention, and the checkpoint layouts its loader reads. The CLI
(`workbench extract`, `generate`, `info`, and the chunk planner, workbench/chunking.py) read these instead of
hard-coding 480 x 832 pixels (60 x 104 latents), chunks of 3 or the 21-frame cache. Only Wan2.1 exists, so
`family_of` returns it without looking. A second video DiT is one more `ModelFamily` in FAMILIES (its model code
in a package of its own beside models/wan/, its config reader in `read_config`) and the rule in `family_of`
that recognises its folders (a key of their config.json); nothing in workbench/ changes. Importing this module
does not import torch. (A store's `model_family`, "wan" or "self_forcing", says how the weights were trained;
the family here is the architecture.)

    WAN.video_geometry(folder, height=None, width=None) -> (config, latent h, latent w, tokens per frame)
    check_fits_cache(num_frames, local_attn_size, ...) -> the one "more than the KV cache holds" check
"""

from __future__ import annotations

from dataclasses import dataclass

from models.errors import ModelInputError
from models.wan.config import VAE_STRIDE, VAE_TIME_STRIDE, WAN_VIDEO_SIZE, WanConfig, default_video_size, latent_size
from models.wan.folder import dit_dir

CACHE_FRAMES = 21  # latent frames the KV cache of a causal rollout holds with global attention (81 pixel frames)


@dataclass(frozen=True)
class ModelFamily:
    name: str
    video_size: tuple[int, int]  # pixels (height, width) its models run at unless the folder's config says
    vae_stride: int  # pixels per latent cell, on both axes
    vae_time_stride: int  # pixel frames per latent frame after the first (a causal first frame decodes to one)
    frames_per_chunk: int  # latent frames per chunk of the causal rollout (num_frame_per_block)
    cache_frames: int  # latent frames the KV cache holds with global attention
    checkpoint_layouts: tuple[str, ...]  # what its loader reads (models/wan/checkpoint.py)

    @property
    def latent_size(self) -> tuple[int, int]:
        """The default latent (height, width): 60 x 104 for Wan2.1's 480 x 832 pixels."""
        return self.video_size[0] // self.vae_stride, self.video_size[1] // self.vae_stride

    def read_config(self, folder, **overrides) -> WanConfig:
        """The architecture a model folder's config.json describes (plus the attention window overrides)."""
        return WanConfig.from_json(dit_dir(folder) / "config.json", **overrides)

    def video_geometry(self, folder, height: int | None = None, width: int | None = None,
                       config: WanConfig | None = None) -> tuple[WanConfig, int, int, int]:
        """(config, latent height, latent width, tokens per latent frame) for a video of height x width pixels
        (None: the folder's own size, its config.json's `video_size`, else the family's). Bad sizes raise
        ModelInputError naming the flag and a size that works."""
        config = config if config is not None else self.read_config(folder)
        own_h, own_w = default_video_size(folder)
        h, w = latent_size(own_h if height is None else height, own_w if width is None else width, config)
        return config, h, w, config.tokens_per_frame(h, w)


WAN = ModelFamily(
    name="wan2.1",
    video_size=WAN_VIDEO_SIZE,
    vae_stride=VAE_STRIDE,
    vae_time_stride=VAE_TIME_STRIDE,
    frames_per_chunk=3,
    cache_frames=CACHE_FRAMES,
    checkpoint_layouts=(
        "official Wan2.1 folder: config.json + diffusion_pytorch_model.safetensors (or its sharded index)",
        "Self-Forcing .pt: generator / generator_ema / critic state dicts with the wrapper's model. prefix",
        "diffusers WanTransformer3DModel state dict (models.wan.checkpoint.from_diffusers)",
        "diffusers pipeline folder: model_index.json + transformer/, text_encoder/, tokenizer/, vae/",
    ),
)

FAMILIES: dict[str, ModelFamily] = {WAN.name: WAN}


def family_of(folder) -> ModelFamily:
    """The family of a model folder. Every folder is Wan2.1 today; a second family would be recognised here
    (by a key of its config.json)."""
    return WAN


def check_fits_cache(num_frames: int, local_attn_size: int, cache_frames: int = CACHE_FRAMES, *,
                     label: str | None = None,
                     remedy: str = "add --local-attn-size N (and optionally --sink-size S)") -> None:
    """The one check that a causal rollout of `num_frames` latent frames fits the KV cache: with global
    attention (local_attn_size -1) the cache holds `cache_frames`; a rolling window holds any length.
    ModelInputError "<label>: more than the KV cache holds (...)" otherwise."""
    if local_attn_size == -1 and num_frames > cache_frames:
        raise ModelInputError(f"{label or f'{num_frames} latent frames'}: more than the KV cache holds "
                              f"({cache_frames} frames) with global attention; {remedy}")
