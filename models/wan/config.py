"""Model configurations: one frozen dataclass for the Wan2.1 DiT, with presets and readers.

`WanConfig` holds the architecture (what the weights need) plus the causal attention window (what the
KV cache needs). It reads the official `config.json` of a Wan2.1 folder, and sizes that a format does not
record are inferred from tensor shapes (`WanConfig.from_state_dict`).

Presets:
    wan2.1-t2v-1.3b   dim 1536, 30 layers, 12 heads (the Self-Forcing backbone)
    wan2.1-t2v-14b    dim 5120, 40 layers, 40 heads
    tiny              a few-second CPU model for unit tests
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from models.common.chunks import block_sizes
from models.errors import ModelInputError

ROPE_MAX_POSITIONS = 1024  # rows of the RoPE table on every axis (t, h, w)
VAE_STRIDE = 8  # pixels per latent cell, on both axes (the Wan2.1 VAE)
VAE_TIME_STRIDE = 4  # pixel frames per latent frame after the first (a causal first frame decodes to one)
WAN_VIDEO_SIZE = (480, 832)  # pixels (height, width) Wan2.1-T2V-1.3B and Self-Forcing run at
# the largest value each size of a config may take (Wan2.1-14B: dim 5120, ffn_dim 13824, 40 layers, 40 heads)
SIZE_LIMITS = dict(dim=65536, ffn_dim=1 << 20, freq_dim=65536, in_dim=4096, out_dim=4096, num_heads=4096,
                   num_layers=1024, text_len=1 << 16, text_dim=65536)
MAX_VIDEO_SIDE = 4096  # pixels: a video's height or width (Wan2.1 runs at 480 x 832 and 720 x 1280)
MAX_PARAMETERS = 200e9  # a config of more (by the rough count in `WanConfig`) is refused before anything is built


@dataclass(frozen=True)
class WanConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    in_dim: int = 16
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    text_len: int = 512
    text_dim: int = 4096
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    model_type: str = "t2v"
    # causal model only: attention window in latent frames (-1 = global) and sink frames kept in the cache
    local_attn_size: int = -1
    sink_size: int = 0

    def __post_init__(self):
        for name, top in SIZE_LIMITS.items():  # (a config.json from elsewhere: a string, 0 or 10^8 layers)
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
                raise ModelInputError(f"{name} {value!r}: give a whole number from 1 to {top}")
        patch = tuple(self.patch_size) if isinstance(self.patch_size, (list, tuple)) else ()
        if len(patch) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= 64 for p in patch):
            raise ModelInputError(f"patch_size {self.patch_size!r}: give 3 whole numbers from 1 to 64 (t, h, w)")
        for name in ("local_attn_size", "sink_size"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise ModelInputError(f"{name} {getattr(self, name)!r}: give a whole number of frames")
        if not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            raise ModelInputError(f"eps {self.eps!r}: give a number between 0 and 1")
        params = self.num_layers * (8 * self.dim**2 + 2 * self.dim * self.ffn_dim)  # (attention, FFN: a rough count)
        if params > MAX_PARAMETERS:
            raise ModelInputError(f"{self.num_layers} layers of width {self.dim} (FFN {self.ffn_dim}) are about "
                                  f"{params / 1e9:.0f}B parameters, past the {MAX_PARAMETERS / 1e9:.0f}B any Wan2.1 "
                                  "model has by far: a config to check")
        if self.model_type != "t2v":
            raise ModelInputError(f"model_type {self.model_type!r}: only Wan2.1's text-to-video DiT ('t2v') is built "
                                  "here; the i2v, flf2v and vace models take image inputs it has no layers for "
                                  "(image-to-video here runs the t2v model with the image's latent as frame 0)")
        if self.dim % self.num_heads:
            raise ModelInputError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ModelInputError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.local_attn_size != -1 and self.local_attn_size < 1:
            raise ModelInputError(f"local_attn_size {self.local_attn_size}: use -1 (global) or a positive frame count")
        if self.sink_size < 0 or (self.local_attn_size != -1 and self.sink_size >= self.local_attn_size):
            raise ModelInputError(
                f"sink_size {self.sink_size} must be >= 0 and smaller than local_attn_size {self.local_attn_size}"
            )
        object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of each head carrying (time, height, width) rotary positions: [44, 42, 42] at head_dim 128."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def token_grid(self, latent_height: int, latent_width: int) -> tuple[int, int]:
        """(rows, columns) of a latent frame's token grid: (30, 52) for a 60 x 104 latent (480 x 832 pixels)."""
        _, ph, pw = self.patch_size
        if latent_height % ph or latent_width % pw:
            raise ModelInputError(
                f"latent size {latent_height}x{latent_width} is not divisible by the patch size {ph}x{pw}"
            )
        return latent_height // ph, latent_width // pw

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        """Tokens per latent frame: 30 * 52 = 1560 for a 60 x 104 latent (480 x 832 pixels)."""
        rows, cols = self.token_grid(latent_height, latent_width)
        return rows * cols

    def replace(self, **changes) -> "WanConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ModelInputError(f"unknown WanConfig keys {sorted(unknown)}; known: {config_keys()}")
        return dataclasses.replace(self, **changes)

    # --- readers -------------------------------------------------------------------------------------

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> "WanConfig":
        """Read the official Wan2.1 `config.json` (diffusers-style `_class_name`/`_diffusers_version` keys and
        the Wan-only `dim`/`ffn_dim`/... keys). Unknown keys are refused, so a typo cannot pass silently."""
        path = Path(path)
        if not path.is_file():
            raise ModelInputError(f"config file {str(path)!r} does not exist")
        try:
            raw = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ModelInputError(f"{path} is not JSON: {err}") from None
        if not isinstance(raw, dict):
            raise ModelInputError(f"{path}: a config holds a JSON object of settings, not {type(raw).__name__}")
        if raw.get("_class_name") == "WanTransformer3DModel":  # diffusers' transformer/ folder
            raw = _from_diffusers_config(raw, path)
        for key, wan, means in WAN_ONLY:  # (keys of Wan's own WanModel that this model does not take)
            if key in raw and raw[key] != wan and not (isinstance(raw[key], list) and tuple(raw[key]) == wan):
                raise ModelInputError(f"{path}: {key} {raw[key]!r}: this model is Wan2.1's with {key} "
                                      f"{list(wan) if isinstance(wan, tuple) else wan} only ({means})")
        ignored = {"_class_name", "_diffusers_version", "_name_or_path", "window_size", "qk_norm", "cross_attn_norm",
                   "video_size"}  # (video_size: read by `default_video_size`)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known - ignored
        if unknown:
            raise ModelInputError(f"{path}: unknown config keys {sorted(unknown)}; known: {sorted(known)}")
        kwargs = {k: v for k, v in raw.items() if k in known}
        try:
            return cls(**kwargs).replace(**overrides) if overrides else cls(**kwargs)
        except ModelInputError as err:
            raise ModelInputError(f"{path}: {err}") from None

    def to_json_dict(self) -> dict:
        """The official `config.json` content for this config (causal-window keys omitted)."""
        d = dataclasses.asdict(self)
        d.pop("local_attn_size"), d.pop("sink_size")
        d["patch_size"] = list(d["patch_size"])
        return {"_class_name": "WanModel", **d}

    @classmethod
    def from_state_dict(cls, state_dict: dict, **overrides) -> "WanConfig":
        """Infer every size a checkpoint records in its tensor shapes (no config file needed)."""
        try:
            dim, in_dim = state_dict["patch_embedding.weight"].shape[:2]
            patch = tuple(state_dict["patch_embedding.weight"].shape[2:])
            ffn_dim = state_dict["blocks.0.ffn.0.weight"].shape[0]
            freq_dim = state_dict["time_embedding.0.weight"].shape[1]
            text_dim = state_dict["text_embedding.0.weight"].shape[1]
            out_dim = state_dict["head.head.weight"].shape[0] // (patch[0] * patch[1] * patch[2])
        except KeyError as err:
            raise ModelInputError(f"cannot infer the model size: state dict has no {err.args[0]!r}") from err
        num_layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        if "num_heads" not in overrides:
            overrides["num_heads"] = PRESET_HEADS.get(dim)
            if overrides["num_heads"] is None:
                raise ModelInputError(f"dim {dim}: the number of heads is not in the weights; pass num_heads")
        return cls(dim=dim, in_dim=in_dim, patch_size=patch, ffn_dim=ffn_dim, freq_dim=freq_dim,
                   text_dim=text_dim, out_dim=out_dim, num_layers=num_layers, **overrides)


def default_video_size(folder) -> tuple[int, int]:
    """The pixel size (height, width) a model folder runs at unless told otherwise: its config.json's optional
    `video_size` [height, width] (the embedded default records [96, 128]), else Wan2.1's 480 x 832."""
    from models.wan.folder import dit_dir

    path = dit_dir(folder) / "config.json"
    try:
        size = json.loads(path.read_text()).get("video_size")
    except (OSError, ValueError) as err:
        raise ModelInputError(f"cannot read {path}: {err}") from err
    if size is None:
        return WAN_VIDEO_SIZE
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and 0 < v <= MAX_VIDEO_SIDE
                                                               for v in size)):
        raise ModelInputError(f"{path}: video_size {size!r} must be [height, width] in pixels, each at most "
                              f"{MAX_VIDEO_SIDE}")
    return size[0], size[1]


def latent_size(height: int, width: int, config: WanConfig) -> tuple[int, int]:
    """Pixels -> latent (h, w); each pixel side must be a positive multiple of the VAE stride times the patch."""
    out = []
    for name, px, patch in (("height", height, config.patch_size[1]), ("width", width, config.patch_size[2])):
        step = VAE_STRIDE * patch
        if isinstance(px, int) and px > MAX_VIDEO_SIDE:  # (a video of 32000 x 32000: 21 GB of noise, then a traceback)
            raise ModelInputError(f"--{name} {px}: at most {MAX_VIDEO_SIDE} pixels")
        if not isinstance(px, int) or px < step or px % step:
            raise ModelInputError(f"--{name} {px}: use a positive multiple of {step} pixels (the VAE's {VAE_STRIDE} "
                                  f"pixels per latent cell x the patch's {patch} cells), e.g. "
                                  f"{max(step, round(px / step) * step) if isinstance(px, int) else step}")
        out.append(px // VAE_STRIDE)
    return out[0], out[1]


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(WanConfig)]


PRESETS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig(),
    "wan2.1-t2v-14b": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # unit tests: 2 layers, head_dim 16 (RoPE split [8, 4, 4]), small text
    "tiny": WanConfig(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, text_len=16),
}
PRESET_HEADS = {1536: 12, 5120: 40}  # heads are not recorded in the weights; known sizes


def preset(name: str, **overrides) -> WanConfig:
    if name not in PRESETS:
        raise ModelInputError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


@dataclass(frozen=True)
class VideoGeometry:
    """Latent video geometry: frames, latent height/width, and the chunking of a causal rollout
    (models/common/chunks.py: chunks of `num_frame_per_block`, frame 0 alone first with `independent_first_frame`)."""

    num_frames: int = 21
    latent_height: int = 60
    latent_width: int = 104
    num_frame_per_block: int = 3
    channels: int = 16
    independent_first_frame: bool = False

    def __post_init__(self):
        self.block_sizes  # frame counts that do not fit the chunk layout are refused here

    @property
    def block_sizes(self) -> list[int]:
        return block_sizes(self.num_frames, self.num_frame_per_block, self.independent_first_frame)

    @property
    def num_chunks(self) -> int:
        return len(self.block_sizes)

    @property
    def pixel_frames(self) -> int:
        """Frame-count law of the Wan VAE: 1 + 4 (T - 1); 21 latents -> 81 frames."""
        return 1 + VAE_TIME_STRIDE * (self.num_frames - 1)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """[F, C, h, w], the Self-Forcing `image_or_video_shape` without the batch."""
        return (self.num_frames, self.channels, self.latent_height, self.latent_width)


# Wan's WanModel settings that its released models leave at the default, the only value built here: (key, value,
# what another value would mean)
WAN_ONLY = (("window_size", (-1, -1), "a token window in Wan's self-attention; a window of frames here is "
             "local_attn_size / sink_size"),
            ("qk_norm", True, "false: no RMSNorm of q and k"),
            ("cross_attn_norm", True, "false: no LayerNorm (norm3) before the cross-attention"))


def _from_diffusers_config(raw: dict, path) -> dict:
    """diffusers' `WanTransformer3DModel` config.json -> the official keys (the text-to-video transformer only)."""
    if raw.get("image_dim") or raw.get("added_kv_proj_dim") or raw.get("pos_embed_seq_len"):
        raise ModelInputError(f"{path}: an image-conditioned Wan transformer (image_dim, added_kv_proj_dim or "
                              "pos_embed_seq_len set); only the text-to-video DiT ('t2v') is built here")
    if raw.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads" or not raw.get("cross_attn_norm", True):
        raise ModelInputError(f"{path}: qk_norm {raw.get('qk_norm')!r}, cross_attn_norm "
                              f"{raw.get('cross_attn_norm')!r}; Wan2.1 has 'rms_norm_across_heads' and true")
    try:
        heads, head_dim, in_dim = raw["num_attention_heads"], raw["attention_head_dim"], raw["in_channels"]
    except KeyError as e:
        raise ModelInputError(f"{path}: a WanTransformer3DModel config without {e.args[0]!r}") from None
    for name in ("num_attention_heads", "attention_head_dim", "in_channels"):  # (before dim = heads x head_dim)
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
            raise ModelInputError(f"{path}: {name} {value!r}: give a whole number from 1 to 65536")
    out = dict(dim=heads * head_dim, num_heads=heads, in_dim=in_dim, out_dim=raw.get("out_channels") or in_dim)
    out.update({k: raw[k] for k in ("patch_size", "text_dim", "freq_dim", "ffn_dim", "num_layers", "eps") if k in raw})
    return out
