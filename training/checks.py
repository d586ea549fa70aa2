"""Training configs: loading one (the YAML over configs/default_config.yaml and the schema of training/config.py)
and every check that needs no weights, before any work starts.

    load_train_config(path, overrides) --> (cfg, sets_sid_alpha)
    check_config(cfg, world)           --> Plan: trainer, loss, micro-batches per rank, latent shape, timesteps
    check_files(cfg, plan)             --> model folders, generator_ckpt (unless a resume's checkpoint records
                                           its sha256) and data files exist

Every error is a TrainingError naming the config key, its value and what is allowed. training/build.py builds
a run from a checked config; training/trainer.py runs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from models.common.chunks import block_sizes
from models.common.scheduler import FlowMatchScheduler
from models.common.window import check_window_room
from models.errors import ModelInputError
from models.files import relative_note
from training import distributed as fsdp
from training.errors import TrainingError

TRAINERS = ("score_distillation", "ode", "diffusion", "gan")  # gan: training/gan.py
TIMESTEP_WEIGHTINGS = ("bump", "uniform")  # diffusion_loss's weight over timesteps (training/losses.py)
UNUSED_PARAM_GRADS = ("zero", "none")
SID_QUIRK = ("the config sets sid_alpha but distribution_loss is 'dmd' (as the researchers' shipped "
             "self_forcing_sid.yaml does): like their trainer, this run trains DMD, with the SiD config's teacher "
             "and learning rates. Set distribution_loss: sid to train SiD.")


@dataclass
class Plan:
    """What the config asks for, checked and resolved."""

    trainer: str  # score_distillation | ode | diffusion
    loss: str  # dmd | sid | ode | diffusion
    world: int
    accum: int  # micro-batches per rank per optimiser step
    shape: tuple[int, int, int, int]  # one latent: F, C, H, W
    nfpb: int
    timesteps: torch.Tensor  # the (warped) denoising steps, float32
    warnings: list[str]


def load_train_config(path, overrides: list[str] | None = None):
    """The YAML merged onto configs/default_config.yaml and the schema (training.config), as TrainingErrors."""
    from training.config import load_config

    try:
        cfg = load_config(path, overrides=overrides)
    except ModelInputError as err:
        raise TrainingError(str(err)) from None
    raw = OmegaConf.load(path)
    sets_sid_alpha = "sid_alpha" in raw or any(o.split("=")[0].strip() == "sid_alpha" for o in overrides or [])
    return cfg, sets_sid_alpha


def check_config(cfg, world: int, *, sets_sid_alpha: bool = False) -> Plan:
    """Every error a config can have that needs no files, before any work starts."""
    notes = []
    if cfg.trainer not in TRAINERS:
        raise TrainingError(f"trainer {cfg.trainer!r}; this workbench trains {list(TRAINERS)}")
    if cfg.trainer == "score_distillation":
        if cfg.distribution_loss not in ("dmd", "sid"):
            raise TrainingError(f"distribution_loss {cfg.distribution_loss!r}; use 'dmd' or 'sid' "
                                "(causvid is not implemented)")
        loss = cfg.distribution_loss
        if loss == "dmd" and sets_sid_alpha:
            notes.append(SID_QUIRK)
        if not 0 <= cfg.min_score_timestep < cfg.num_train_timestep:
            raise TrainingError(f"min_score_timestep {cfg.min_score_timestep} must lie in [0, {cfg.num_train_timestep})")
        if loss == "dmd" and cfg.fake_guidance_scale != 0 and cfg.real_guidance_scale is None:
            notes.append(f"fake_guidance_scale {cfg.fake_guidance_scale} is not used: like the researchers' DMD, "
                         "the critic is guided only when real_guidance_scale is set too")
        if cfg.dfake_gen_update_ratio < 1:
            raise TrainingError(f"dfake_gen_update_ratio {cfg.dfake_gen_update_ratio} must be >= 1")
        if not cfg.generator_ckpt:
            raise TrainingError("generator_ckpt is not set: DMD/SiD start from an ODE-initialised generator "
                                "(a Self-Forcing .pt with a 'generator' or 'model' entry)")
    else:
        loss = cfg.trainer
    if cfg.trainer == "gan":
        check_gan_config(cfg)
    if cfg.denoising_loss_type != "flow":
        raise TrainingError(f"denoising_loss_type {cfg.denoising_loss_type!r}: only 'flow' is implemented")
    from models.common.kv_cache import KV_GRADIENTS, TEXT_KV_GRADIENTS

    for key, allowed in (("kv_cache_gradient", KV_GRADIENTS), ("text_kv_gradient", TEXT_KV_GRADIENTS),
                         ("unused_param_grads", UNUSED_PARAM_GRADS), ("adamw_impl", fsdp.ADAMW_IMPLS)):
        if cfg[key] not in allowed:
            raise TrainingError(f"{key} {cfg[key]!r}; use one of {list(allowed)} (docs/training.md)")
    if cfg.score_timestep_shift is not None and cfg.score_timestep_shift <= 0:
        raise TrainingError(f"score_timestep_shift {cfg.score_timestep_shift} must be positive (or null: "
                            "model_kwargs.timestep_shift)")
    if cfg.i2v and (cfg.trainer != "score_distillation" or not cfg.independent_first_frame):
        raise TrainingError("i2v: true trains DMD / SiD from text-image pairs (trainer: score_distillation) with the "
                            "image's latent as a chunk of its own (independent_first_frame: true)")
    shape = list(cfg.image_or_video_shape)
    if len(shape) != 5:
        raise TrainingError(f"image_or_video_shape {shape} must be [batch, frames, channels, height, width]")
    _, frames, channels, height, width = shape
    nfpb = cfg.num_frame_per_block
    if cfg.num_training_frames != frames:
        raise TrainingError(f"num_training_frames {cfg.num_training_frames} differs from image_or_video_shape's "
                            f"{frames} frames; generating more frames than are trained on (VAE re-encoding) is "
                            "not implemented")
    if cfg.trainer != "diffusion" or cfg.causal:
        chunk_layout(frames, nfpb, bool(cfg.independent_first_frame))
        try:
            check_window_room(cfg.model_kwargs.local_attn_size, cfg.model_kwargs.sink_size, nfpb,
                              name="model_kwargs.local_attn_size")
        except ModelInputError as err:
            raise TrainingError(f"{err} (num_frame_per_block {nfpb}, model_kwargs.sink_size)") from None
    for key in ("batch_size", "total_batch_size"):
        if cfg[key] < 1:
            raise TrainingError(f"{key} {cfg[key]} must be >= 1")
    per_step = cfg.batch_size * world
    if cfg.total_batch_size % per_step:
        below = cfg.total_batch_size // per_step * per_step
        raise TrainingError(f"total_batch_size {cfg.total_batch_size} does not divide into batch_size "
                            f"{cfg.batch_size} x {world} rank(s); use a multiple of {per_step} ("
                            + (f"{below} or " if below else "") + f"{below + per_step}), or --set total_batch_size="
                            f"{per_step} for a step of batch_size x ranks, as the researchers' DMD, SiD and GAN "
                            "trainers take whatever their configs say (docs/training.md)")
    accum = cfg.total_batch_size // per_step
    if cfg.log_iters < 1:
        raise TrainingError(f"log_iters {cfg.log_iters} must be >= 1")
    if cfg.max_steps < 0:
        raise TrainingError(f"max_steps {cfg.max_steps} must be >= 0 (0: until interrupted)")
    for key in ("lr", "lr_critic", "weight_decay"):  # (AdamW's own check raised inside the first step, unnamed)
        if not cfg[key] >= 0:
            raise TrainingError(f"{key} {cfg[key]} must be >= 0")
    for key in ("beta1", "beta2", "beta1_critic", "beta2_critic"):
        if not 0 <= cfg[key] < 1:
            raise TrainingError(f"{key} {cfg[key]} must lie in [0, 1) (AdamW's betas)")
    if cfg.ema_weight < 0 or cfg.ema_weight >= 1:
        raise TrainingError(f"ema_weight {cfg.ema_weight} must lie in [0, 1) (0: no EMA)")
    if not 0 <= cfg.prompt_dropout < 1:
        raise TrainingError(f"prompt_dropout {cfg.prompt_dropout} must lie in [0, 1)")
    if cfg.prompt_dropout and cfg.trainer != "diffusion":
        raise TrainingError(f"prompt_dropout is for diffusion training (trainer {cfg.trainer!r} does not use it)")
    if cfg.timestep_weighting not in TIMESTEP_WEIGHTINGS:
        raise TrainingError(f"timestep_weighting {cfg.timestep_weighting!r}; use one of {list(TIMESTEP_WEIGHTINGS)}")
    for key, default, what in (("teacher_forcing", False, "CausVid's teacher forcing"),
                               ("noise_augmentation_max_timestep", 0, "CausVid's noise augmentation of clean context"),
                               ("backward_simulation", True, "training without backward simulation")):
        if cfg[key] != default:  # (their code reads these keys; none of their Self-Forcing configs sets them)
            raise TrainingError(f"{key}: {cfg[key]}: {what} is not implemented in workbench train (it runs "
                                f"{key}: {default}, as every Self-Forcing config does)")
    if cfg.max_grad_norm != 10.0:  # (CausVid's one clip norm; Self-Forcing's trainers read the two below)
        raise TrainingError(f"max_grad_norm {cfg.max_grad_norm} is not read by the trainers; set "
                            "max_grad_norm_generator and max_grad_norm_critic (both 10.0 by default)")
    if cfg.load_raw_video:
        raise TrainingError("load_raw_video: true (VAE-encoding raw videos while training) is not implemented in "
                            "workbench train; it reads prompt files, ODE pairs (ode_pairs) or the world's latents")
    if cfg.max_pair < 1:
        raise TrainingError(f"max_pair {cfg.max_pair} must be >= 1 (the ODE trainer reads the first max_pair pairs)")
    if cfg.loss_scale != 1.0 and cfg.trainer != "gan":
        raise TrainingError(f"loss_scale is read by the GAN trainer only (trainer {cfg.trainer!r} does not use it)")
    if cfg.timestep_weighting != "bump" and cfg.trainer != "diffusion":
        raise TrainingError(f"timestep_weighting is for diffusion training (trainer {cfg.trainer!r} does not use it)")
    if cfg.data_path == "world" and cfg.trainer not in ("diffusion", "gan"):
        raise TrainingError("data_path: world (latents of the miniature world) is for diffusion and GAN training; "
                            f"trainer {cfg.trainer!r} reads {'ODE pairs' if cfg.trainer == 'ode' else 'a prompt file'}")
    fsdp.check_strategies(cfg)
    from training.logger import check_loggers

    check_loggers(list(cfg.loggers))
    scheduler = FlowMatchScheduler(cfg.model_kwargs.timestep_shift, cfg.num_train_timestep)
    try:
        timesteps = scheduler.denoising_timesteps(list(cfg.denoising_step_list), cfg.warp_denoising_step)
    except Exception as err:
        raise TrainingError(f"denoising_step_list: {err}") from None
    if len(timesteps) == 0:
        raise TrainingError("denoising_step_list is empty")
    if cfg.trainer == "score_distillation" and float(timesteps[-1]) == 0:
        timesteps = timesteps[:-1]  # the training pipeline drops a trailing 0
    return Plan(cfg.trainer, loss, world, accum, (frames, channels, height, width), nfpb, timesteps, notes)


def check_gan_config(cfg) -> None:
    """The GAN keys (`trainer: gan`, training/gan.py), checked before any work."""
    if cfg.num_class < 1:
        raise TrainingError(f"num_class {cfg.num_class} must be >= 1")
    for key in ("gan_g_weight", "gan_d_weight", "r1_weight", "r2_weight", "discriminator_warmup_steps"):
        if cfg[key] < 0:
            raise TrainingError(f"{key} {cfg[key]} must be >= 0")
    for key in ("r1_sigma", "r2_sigma"):
        if cfg[key] <= 0:
            raise TrainingError(f"{key} {cfg[key]} must be positive")
    if cfg.dfake_gen_update_ratio < 1:
        raise TrainingError(f"dfake_gen_update_ratio {cfg.dfake_gen_update_ratio} must be >= 1 (the generator "
                            "trains every that many steps)")
    if cfg.critic_timestep_shift is not None and cfg.critic_timestep_shift <= 0:
        raise TrainingError(f"critic_timestep_shift {cfg.critic_timestep_shift} must be positive (or null: "
                            "timestep_shift)")
    if cfg.data_path.endswith(".txt"):
        raise TrainingError(f"data_path {cfg.data_path!r}: GAN training needs real latents (a latent dataset .pt of "
                            "clean latents, e.g. encoded world videos), not a prompt file")


def chunk_layout(frames: int, nfpb: int, independent_first_frame: bool) -> list[int]:
    """Frames per chunk (models/common/chunks.py) as a TrainingError naming the config keys."""
    try:
        return block_sizes(frames, nfpb, independent_first_frame)
    except ModelInputError as err:
        raise TrainingError(f"image_or_video_shape / num_frame_per_block / independent_first_frame: {err}") from None


def model_folder(cfg, name: str) -> Path:
    from models.wan.folder import dit_dir

    folder = Path(cfg.model_root) / name
    if not (dit_dir(folder) / "config.json").is_file():
        raise TrainingError(f"model folder {str(folder)!r} (model_root {cfg.model_root!r} / {name!r}) has no "
                            "config.json (nor a diffusers pipeline's transformer/config.json); set model_root to "
                            "where the Wan folders live")
    return folder


def world_vae_path(cfg) -> Path:
    """The VAE that encodes `data_path: world`: world.vae, else the generator folder's (Wan2.1_VAE.pth)."""
    from models.wan.folder import wan_parts

    if cfg.world.vae:
        return Path(cfg.world.vae)
    return wan_parts(Path(cfg.model_root) / cfg.model_kwargs.model_name).vae


def check_files(cfg, plan: Plan, *, start_recorded: bool = False) -> None:
    """Model folders, generator_ckpt and data files exist (before any weights are read). A training size other than
    the one the generator's folder records (config.json `video_size`, e.g. the embedded zoo's 96 x 128) is a warning:
    the researchers' configs are for Wan2.1's 480 x 832. `start_recorded`: a resume whose checkpoint records the
    start weights (training/checkpoints.py `resumed_start_weights`), which needs no generator_ckpt file."""
    from models.wan.config import VAE_STRIDE, default_video_size
    from models.wan.folder import dit_dir

    folder = model_folder(cfg, cfg.model_kwargs.model_name)
    if "video_size" in json.loads((dit_dir(folder) / "config.json").read_text()):
        own = tuple(x // VAE_STRIDE for x in default_video_size(folder))  # its latent height, width
        if tuple(plan.shape[2:]) != own:
            plan.warnings.append(f"image_or_video_shape trains {plan.shape[2]} x {plan.shape[3]} latents; the model "
                                 f"folder {folder} records video_size {own[0] * VAE_STRIDE} x {own[1] * VAE_STRIDE} "
                                 f"pixels ({own[0]} x {own[1]} latents), the size it was made for")
    if plan.trainer == "score_distillation":
        model_folder(cfg, cfg.real_name)
        model_folder(cfg, cfg.fake_name)
    if cfg.generator_ckpt and not start_recorded and not Path(cfg.generator_ckpt).is_file():
        raise TrainingError(f"generator_ckpt {cfg.generator_ckpt!r} does not exist{relative_note(cfg.generator_ckpt)} "
                            "(a Self-Forcing .pt with a 'generator' or 'model' entry, e.g. the output of ODE "
                            "regression)")
    if plan.trainer == "ode" and not Path(cfg.data_path).is_file():
        raise TrainingError(f"data_path {cfg.data_path!r} (ODE pairs) does not exist{relative_note(cfg.data_path)}; "
                            "make it with `workbench train --config CONFIG --make-ode-pairs`")
    if plan.trainer == "gan":
        model_folder(cfg, cfg.fake_name)
        if cfg.data_path not in ("synthetic", "world") and not Path(cfg.data_path).is_file():
            raise TrainingError(f"data_path {cfg.data_path!r} does not exist{relative_note(cfg.data_path)} (a latent "
                                "dataset .pt of real videos: python -m training.i2v --frames F makes one from the "
                                "miniature world; 'world': "
                                "the miniature world's videos encoded by the generator folder's VAE; or 'synthetic')")
    if plan.trainer == "diffusion" and cfg.data_path not in ("synthetic", "world") and not Path(cfg.data_path).is_file():
        raise TrainingError(f"data_path {cfg.data_path!r} does not exist{relative_note(cfg.data_path)} (a latent "
                            "dataset .pt, 'synthetic' or 'world')")
    if plan.trainer in ("diffusion", "gan") and cfg.data_path == "world":
        vae = world_vae_path(cfg)
        if not vae.is_file():
            raise TrainingError(f"data_path: world encodes world videos with {str(vae)!r}, which does not exist "
                                "(set world.vae, or put Wan2.1_VAE.pth in the generator's folder)")
    if plan.trainer == "score_distillation" and not Path(cfg.data_path).is_file():
        what = "text-image pairs: python -m training.i2v makes them" if cfg.i2v else "the prompt file"
        raise TrainingError(f"data_path {cfg.data_path!r} ({what}) does not exist{relative_note(cfg.data_path)}")
