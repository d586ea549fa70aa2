"""The researchers' YAML configs, read unchanged through an OmegaConf structured config.

`load_config("configs/self_forcing_dmd.yaml")` merges the file onto `configs/default_config.yaml` (as the
researchers' train.py and inference.py do) and onto the `SelfForcingConfig` schema below, so a misspelt or
unknown key is an error that names it, and every value has a type. The files themselves stay as they are.

Keys the researchers' files do not have, used by `workbench train` (all optional): `model_root` (where model
folders live), `model_kwargs.model_name` (the generator's folder), `max_steps`, `max_grad_norm_generator` /
`max_grad_norm_critic`, `real_guidance_scale`, `loggers`, `device`, `ode_pairs`, `probe` (attention probes
during training), `prompt_dropout` and `world` (diffusion and GAN training on the miniature world, `data_path: world`),
and the gradient semantics `score_timestep_shift`, `kv_cache_gradient`, `text_kv_gradient` and
`unused_param_grads`, whose defaults reproduce the researchers' code (docs/training.md). Keys their code reads
with a default (`ts_schedule` True, `ts_schedule_max`, `min_score_timestep`, `real_guidance_scale`,
`fake_guidance_scale`, `sid_alpha`, `num_frame_per_block` 1, `timestep_shift` 1.0, `loss_scale`, `teacher_forcing`,
`noise_augmentation_max_timestep`, `max_pair`, `backward_simulation`) have that default here; `lr_critic`, which
their trainer reads as `lr` where a config leaves it out, is set to `lr` by `load_config` after every override.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from models.errors import ModelInputError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default_config.yaml"


@dataclass
class ModelKwargs:
    timestep_shift: float = 8.0  # the wrapper's default; every Self-Forcing config sets 5.0
    local_attn_size: int = -1
    sink_size: int = 0
    model_name: str = "Wan2.1-T2V-1.3B"  # the generator's folder under model_root (the wrapper's default)


@dataclass
class ProbeConfig:
    """Attention probes during training: every `every` steps the probe set runs through the few-step rollout
    with the extraction statistics and is appended to `logdir/store` along `train_step`."""

    every: int = 0  # 0: no probes
    prompts: list[str] = field(default_factory=list)
    prompt_file: Optional[str] = None  # one prompt per line, after `prompts`
    seeds: list[int] = field(default_factory=lambda: [0])  # (one given twice is one sample: it runs once)
    layers: Optional[list[int]] = None  # None: every layer (each captured once, in order, as extract's --layers)
    heads: Optional[list[int]] = None  # None: every head (each once, in order)
    steps: Optional[list[int]] = None  # positions in the per-chunk schedule; None: every step (each once)
    stats: list[str] = field(default_factory=lambda: ["attn_mass", "attn_logit"])
    num_frames: Optional[int] = None  # None: the training rollout's frame count
    store: str = "probes.zarr"  # relative to the logdir


@dataclass
class OdePairsConfig:
    """How `workbench train --make-ode-pairs` makes ODE regression pairs with the bidirectional teacher
    (researchers' scripts/generate_ode_pairs.py): Euler steps on the shift-`shift` grid with CFG, the latents
    before steps `keep` and the final one stored."""

    prompt_file: Optional[str] = None  # None: data_path's prompts are not known; required for --make-ode-pairs
    num_pairs: int = 16
    steps: int = 48
    shift: float = 8.0
    guidance_scale: float = 6.0
    keep: list[int] = field(default_factory=lambda: [0, 12, 24, 36])
    seed: int = 0
    batch_size: int = 1  # pairs sampled together (on a GPU: many)


@dataclass
class WorldDataConfig:
    """`data_path: world` (diffusion and GAN training): latents of the miniature world's videos (training/world_data.py),
    items 0..num_videos-1 of `models.world.dataset_item(i, seed)` encoded by the VAE, cached under cache_dir."""

    num_videos: int = 2048
    seed: int = 0
    vae: Optional[str] = None  # None: the generator folder's Wan2.1_VAE.pth
    cache_dir: str = "runs/world_latents"
    batch: int = 16  # videos rendered and encoded at once


@dataclass
class SelfForcingConfig:
    # --- default_config.yaml
    independent_first_frame: bool = False
    warp_denoising_step: bool = False
    weight_decay: float = 0.01
    same_step_across_blocks: bool = True
    discriminator_lr_multiplier: float = 1.0
    last_step_only: bool = False
    i2v: bool = False
    num_training_frames: int = 21
    gc_interval: int = 100
    context_noise: float = 0.0
    causal: bool = True
    ckpt_step: int = 0
    prompt_name: str = "MovieGenVideoBench"
    prompt_path: str = "prompts/MovieGenVideoBench.txt"
    eval_first_n: int = 64
    num_samples: int = 1
    height: int = 480
    width: int = 832
    num_frames: int = 81
    # --- model and sampling
    generator_ckpt: Optional[str] = None
    real_name: str = "Wan2.1-T2V-1.3B"
    fake_name: str = "Wan2.1-T2V-1.3B"
    denoising_step_list: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    ts_schedule: bool = True  # their getattr default; the shipped configs set false
    ts_schedule_max: bool = False
    num_train_timestep: int = 1000
    timestep_shift: float = 1.0  # their getattr default (every Self-Forcing config sets 5.0)
    guidance_scale: float = 3.0
    fake_guidance_scale: float = 0.0
    negative_prompt: str = ""
    image_or_video_shape: list[int] = field(default_factory=lambda: [1, 21, 16, 60, 104])
    num_frame_per_block: int = 1  # their getattr default: frame by frame (every Self-Forcing config sets 3)
    model_kwargs: ModelKwargs = field(default_factory=ModelKwargs)
    # --- training
    trainer: str = "score_distillation"
    distribution_loss: str = "dmd"
    denoising_loss_type: str = "flow"
    min_score_timestep: int = 0
    sid_alpha: float = 1.0
    mixed_precision: bool = True
    seed: int = 0
    sharding_strategy: str = "hybrid_full"
    generator_fsdp_wrap_strategy: str = "size"
    real_score_fsdp_wrap_strategy: str = "size"
    fake_score_fsdp_wrap_strategy: str = "size"
    text_encoder_fsdp_wrap_strategy: str = "size"
    text_encoder_cpu_offload: bool = False  # True: the text encoder stays in CPU memory and runs there
    lr: float = 2e-6
    lr_critic: Optional[float] = None  # None: lr (their trainer's fallback for a config without lr_critic)
    beta1: float = 0.0
    beta2: float = 0.999
    beta1_critic: float = 0.0
    beta2_critic: float = 0.999
    max_grad_norm: float = 10.0  # CausVid's; other values are refused (the two norms below are read)
    data_path: str = "prompts/vidprom_filtered_extended.txt"
    batch_size: int = 1
    total_batch_size: int = 64
    ema_weight: float = 0.99
    ema_start_step: int = 200
    log_iters: int = 50
    dfake_gen_update_ratio: int = 5
    gradient_checkpointing: bool = True
    load_raw_video: bool = False  # True is refused (not implemented)
    # wandb (`loggers: [..., wandb]` or --wandb): login and init take those set; empty or the placeholders of
    # their files (wandb_project: WANDB_PROJECT) leave wandb's environment and `wandb login` in charge
    wandb_host: str = ""
    wandb_key: str = ""
    wandb_entity: str = ""
    wandb_project: str = ""
    # --- GAN (trainer: gan; the researchers' model/gan.py and trainer/gan.py read these with these defaults)
    gen_lr: Optional[float] = None  # None: lr
    critic_lr: Optional[float] = None  # None: lr_critic
    discriminator_warmup_steps: int = 0
    gan_g_weight: float = 1e-2
    gan_d_weight: float = 1e-2
    r1_weight: float = 0.0
    r2_weight: float = 0.0
    r1_sigma: float = 0.01
    r2_sigma: float = 0.01
    relativistic_discriminator: bool = False
    num_class: int = 1
    concat_time_embeddings: bool = False
    critic_timestep_shift: Optional[float] = None  # None: timestep_shift
    loss_scale: float = 1.0  # their trainer/gan.py: both GAN losses multiplied by it
    # --- keys their code reads with these defaults; workbench train runs the defaults and refuses other values
    # (training/checks.py): CausVid's teacher forcing and its noise augmentation, the ODE set's cap, and the
    # backward simulation every Self-Forcing run uses
    teacher_forcing: bool = False
    noise_augmentation_max_timestep: int = 0
    max_pair: int = 100000000
    backward_simulation: bool = True
    # --- workbench train (not in the researchers' files)
    model_root: str = "wan_models"  # folders named real_name / fake_name / model_kwargs.model_name live here
    max_steps: int = 0  # 0: until interrupted (as the researchers' loop)
    max_grad_norm_generator: float = 10.0
    max_grad_norm_critic: float = 10.0
    real_guidance_scale: Optional[float] = None  # None: guidance_scale, and fake_guidance_scale unused (as theirs)
    # gradient semantics (docs/training.md); the defaults are the researchers' code
    score_timestep_shift: Optional[float] = 8.0  # score networks' flow -> x0 grid; None: model_kwargs.timestep_shift
    kv_cache_gradient: str = "inplace"  # inplace | detached
    text_kv_gradient: str = "follows_checkpointing"  # follows_checkpointing | every_exit | first_forward
    unused_param_grads: str = "zero"  # zero (AdamW decays and steps them) | none (skipped)
    data_on_device: bool = False  # a latent set (data_path: world, a latents or ODE-pairs file) kept on the
    # training device: no per-step host gather and transfer of the batch (the zoo's sets: 2 GB for 8192 videos)
    adamw_impl: str = "loop"  # loop (torch's per-tensor AdamW, bit for bit as before) | foreach | fused (fewer
    # GPU launches; may differ from loop in the last bit; training/distributed.py ShardAdamW)
    loggers: list[str] = field(default_factory=lambda: ["csv"])  # csv, tensorboard, wandb
    device: Optional[str] = None  # None: cuda when available
    ode_pairs: OdePairsConfig = field(default_factory=OdePairsConfig)
    prompt_dropout: float = 0.0  # diffusion training: the share of samples trained on negative_prompt instead (CFG)
    timestep_weighting: str = "bump"  # diffusion training's loss weight over timesteps: "bump" (the researchers'
    # Gaussian bump, near 0 at the noisiest and cleanest steps) or "uniform" (every drawn timestep counts alike)
    world: WorldDataConfig = field(default_factory=WorldDataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # anything else a config may carry, by name, is refused


def load_config(path: str | Path, *, default: str | Path | None = DEFAULT_CONFIG, overrides: list[str] | None = None):
    """Schema <- default_config.yaml <- the given YAML <- dotlist overrides ('lr=1e-5'). Returns a typed
    OmegaConf object (attribute access, `OmegaConf.to_yaml` for provenance)."""
    path = Path(path)
    if not path.is_file():
        raise ModelInputError(f"config file {str(path)!r} does not exist")
    layers: list[Any] = [OmegaConf.structured(SelfForcingConfig)]
    if default is not None:
        if not Path(default).is_file():  # (an install without -e copies the packages, not the repository's configs/)
            raise ModelInputError(f"the defaults every config is read over, {str(default)!r}, are not there: they live "
                                  "in the repository's configs/, which `pip install` without -e does not copy; "
                                  "install from a checkout with `pip install -e .`")
        layers.append(OmegaConf.load(default))
    layers.append(_load_yaml(path))
    bare = [o for o in overrides or [] if "=" not in o]
    if bare:
        raise ModelInputError(f"--set {bare[0]}: give KEY=VALUE, e.g. --set lr=2e-6")
    try:
        merged = OmegaConf.merge(*layers)
    except (ConfigKeyError, ValidationError) as err:
        raise ModelInputError(f"{path}: {_config_error(err)}") from err
    if overrides:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
        except (ConfigKeyError, ValidationError) as err:
            key = str(err.full_key or err.key)
            given = [o for o in overrides if o.split("=", 1)[0] == key]
            raise ModelInputError(f"--set {given[0] if given else key}: {_config_error(err)}") from err
    if merged.lr_critic is None:  # their trainer: config.lr_critic if hasattr(config, "lr_critic") else config.lr
        merged.lr_critic = merged.lr
    return merged


def _load_yaml(path: Path):
    """A config file as OmegaConf reads it: a mapping of settings; one line naming the file otherwise."""
    import yaml

    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise ModelInputError(f"config file {str(path)!r} is not YAML ({getattr(err, 'problem', None) or err}"
                              f"{where})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ModelInputError(f"config file {str(path)!r} cannot be read ({err})") from None
    if not isinstance(node, DictConfig):
        raise ModelInputError(f"config file {str(path)!r} holds a list, not a mapping of settings "
                              "(key: value lines, as configs/self_forcing_dmd.yaml)")
    return node


SECRET_KEYS = ("wandb_key",)  # what logs in, never written down: config.yaml, checkpoints, stores, wandb's config


def without_secrets(words: list[str]) -> list[str]:
    """Command-line words to write down (a probe store's or the log folder lock's `command`), the values of
    SECRET_KEYS given on it (`--set wandb_key=...`) hidden."""
    pattern = re.compile(rf"((?:^|[=\s.]){'|'.join(SECRET_KEYS)}=).*")
    return [pattern.sub(r"\1(given; not recorded)", str(w)) for w in words]


def recorded(cfg):
    """A copy of the config to write down or upload, its SECRET_KEYS blanked where set (the placeholders of the
    researchers' files, WANDB_KEY, are kept as they are)."""
    out = copy.deepcopy(cfg)
    for key in SECRET_KEYS:
        if out.get(key) and out.get(key) != key.upper():
            out[key] = "(given; not recorded)"
    return out


def flat(node: dict, prefix: str = "") -> dict:
    """A nested config as {"model_kwargs.timestep_shift": value, ...}."""
    out = {}
    for k, v in node.items():
        out |= flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def _config_error(err) -> str:
    """An OmegaConf merge error in words: an unknown key with the known keys closest to it, or a bad value."""
    if not isinstance(err, ConfigKeyError):
        msg = str(err.msg).splitlines()[0]  # (OmegaConf appends full_key and object_type lines)
        return f"{err.full_key}: {msg}" if err.full_key else msg
    import difflib

    known = list(flat(OmegaConf.to_container(OmegaConf.structured(SelfForcingConfig))))
    key = str(err.full_key or err.key)
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown config key {key!r}{hint} (training/config.py lists the known keys)"
