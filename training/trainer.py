"""The training loop: Self-Forcing score distillation (DMD or SiD), ODE regression and diffusion training.

    check_config(cfg, world) --> Plan (every config error, before any work)
    build_trainer(cfg, logdir) --> models from `model_root/<name>` (+ generator_ckpt), text encoder --> Trainer
    Trainer.train()            --> steps, logs, checkpoints, probes

Score distillation (the researchers' `trainer/distillation.py`), one iteration at `step`:

    if step % dfake_gen_update_ratio == 0:          # generator: rollout with gradient at the exit step + DMD/SiD
        zero grads; for each micro-batch: loss / accum -> backward; clip; AdamW step; EMA update
    zero grads; for each micro-batch: no-grad rollout + critic flow loss / accum -> backward; clip; AdamW step
    step += 1; create the EMA once step >= ema_start_step; save every log_iters; log; probe every probe.every

The researchers' gradient semantics are the defaults, each with an option (docs/training.md): score networks
converting on the shift-8 grid (`score_timestep_shift`), gradient through the in-place-written KV cache
(`kv_cache_gradient`), text keys/values recomputed with gradient under activation checkpointing
(`text_kv_gradient`), zero gradients for parameters a step did not reach, which AdamW then decays and steps
(`unused_param_grads`); `fake_guidance_scale` only when `real_guidance_scale` is set; `ts_schedule`; with
`ema_start_step` <= 0 an EMA that starts from the generator's weights before `generator_ckpt` loads.

ODE regression and diffusion training run one generator update per step. Gradient accumulation: the global
batch `total_batch_size` is split into `accum = total_batch_size / (batch_size * world)` micro-batches per rank
(the gradient reduce-scatter runs on the last one only). Micro-batch m of rank r holds the samples with
global indices (m * world + r) * batch_size + j; every random draw is keyed by step, purpose and global index
(`training.rng`), so the result does not depend on how the batch is split. The exit step of a rollout is one
draw per step, made on rank 0 and broadcast.

Checkpoints: `logdir/checkpoint_model_{step:06d}/model.pt` in the researchers' format (`generator`, `critic`,
`generator_ema` once step > ema_start_step; keys `model.`-prefixed) and `training_state.pt` beside it (step,
seed, optimiser states) for `--resume`. A resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from models.common.chunks import block_sizes
from models.errors import ModelInputError
from models.family import WAN, check_fits_cache
from models.files import atomic_torch_save, atomic_write_text
from models.common.scheduler import FlowMatchScheduler
from training import distributed as fsdp
from training import rng
from training.data import LatentDataset, PromptSource, synthetic_latents
from training.ema import EMA
from training.errors import TrainingError
from training.losses import (critic_flow_loss, diffusion_loss, dmd_loss, ode_regression_loss, score_timestep,
                             sid_loss)
from training.rollout import denoised_timestep_range, draw_exit_indices, self_forcing_rollout

TRAINERS = ("score_distillation", "ode", "diffusion", "gan")  # gan: training/gan.py
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


# ------------------------------------------------------------------------------------------------------
# Config checks


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
        from training.gan import check_gan_config

        check_gan_config(cfg)
    if cfg.denoising_loss_type != "flow":
        raise TrainingError(f"denoising_loss_type {cfg.denoising_loss_type!r}: only 'flow' is implemented")
    from models.common.kv_cache import KV_GRADIENTS, TEXT_KV_GRADIENTS

    for key, allowed in (("kv_cache_gradient", KV_GRADIENTS), ("text_kv_gradient", TEXT_KV_GRADIENTS),
                         ("unused_param_grads", UNUSED_PARAM_GRADS)):
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
    per_step = cfg.batch_size * world
    if cfg.batch_size < 1 or cfg.total_batch_size < 1 or cfg.total_batch_size % per_step:
        raise TrainingError(f"total_batch_size {cfg.total_batch_size} does not divide into batch_size "
                            f"{cfg.batch_size} x {world} rank(s); use a multiple of {per_step}")
    accum = cfg.total_batch_size // per_step
    if cfg.log_iters < 1:
        raise TrainingError(f"log_iters {cfg.log_iters} must be >= 1")
    if cfg.max_steps < 0:
        raise TrainingError(f"max_steps {cfg.max_steps} must be >= 0 (0: until interrupted)")
    if cfg.ema_weight < 0 or cfg.ema_weight >= 1:
        raise TrainingError(f"ema_weight {cfg.ema_weight} must lie in [0, 1) (0: no EMA)")
    if not 0 <= cfg.prompt_dropout < 1:
        raise TrainingError(f"prompt_dropout {cfg.prompt_dropout} must lie in [0, 1)")
    if cfg.prompt_dropout and cfg.trainer != "diffusion":
        raise TrainingError(f"prompt_dropout is for diffusion training (trainer {cfg.trainer!r} does not use it)")
    if cfg.data_path == "world" and cfg.trainer != "diffusion":
        raise TrainingError("data_path: world (latents of the miniature world) is for diffusion training; "
                            f"trainer {cfg.trainer!r} reads {'ODE pairs' if cfg.trainer == 'ode' else 'a prompt file'}")
    fsdp.check_strategies(cfg)
    from training.logger import check_loggers

    check_loggers(list(cfg.loggers))
    scheduler = FlowMatchScheduler(cfg.model_kwargs.timestep_shift, cfg.num_train_timestep)
    try:
        if cfg.warp_denoising_step:
            timesteps = scheduler.warp(list(cfg.denoising_step_list))
        else:
            timesteps = torch.tensor(list(cfg.denoising_step_list), dtype=torch.float32)
    except Exception as err:
        raise TrainingError(f"denoising_step_list: {err}") from None
    if len(timesteps) == 0:
        raise TrainingError("denoising_step_list is empty")
    if cfg.trainer == "score_distillation" and float(timesteps[-1]) == 0:
        timesteps = timesteps[:-1]  # the training pipeline drops a trailing 0
    return Plan(cfg.trainer, loss, world, accum, (frames, channels, height, width), nfpb, timesteps, notes)


def chunk_layout(frames: int, nfpb: int, independent_first_frame: bool) -> list[int]:
    """Frames per chunk (models/common/chunks.py) as a TrainingError naming the config keys."""
    try:
        return block_sizes(frames, nfpb, independent_first_frame)
    except ModelInputError as err:
        raise TrainingError(f"image_or_video_shape / num_frame_per_block / independent_first_frame: {err}") from None


def model_folder(cfg, name: str) -> Path:
    folder = Path(cfg.model_root) / name
    if not (folder / "config.json").is_file():
        raise TrainingError(f"model folder {str(folder)!r} (model_root {cfg.model_root!r} / {name!r}) has no "
                            "config.json; set model_root to where the Wan folders live")
    return folder


def check_files(cfg, plan: Plan) -> None:
    """Model folders, generator_ckpt and data files exist (before any weights are read)."""
    model_folder(cfg, cfg.model_kwargs.model_name)
    if plan.trainer == "score_distillation":
        model_folder(cfg, cfg.real_name)
        model_folder(cfg, cfg.fake_name)
    if cfg.generator_ckpt and not Path(cfg.generator_ckpt).is_file():
        raise TrainingError(f"generator_ckpt {cfg.generator_ckpt!r} does not exist (a Self-Forcing .pt with a "
                            "'generator' or 'model' entry, e.g. the output of ODE regression)")
    if plan.trainer == "ode" and not Path(cfg.data_path).is_file():
        raise TrainingError(f"data_path {cfg.data_path!r} (ODE pairs) does not exist; make it with "
                            "`workbench train --config CONFIG --make-ode-pairs`")
    if plan.trainer == "gan":
        model_folder(cfg, cfg.fake_name)
        if cfg.data_path != "synthetic" and not Path(cfg.data_path).is_file():
            raise TrainingError(f"data_path {cfg.data_path!r} does not exist (a latent dataset .pt of real videos: "
                                "python -m training.i2v --frames F makes one from the miniature world; or 'synthetic')")
    if plan.trainer == "diffusion" and cfg.data_path not in ("synthetic", "world") and not Path(cfg.data_path).is_file():
        raise TrainingError(f"data_path {cfg.data_path!r} does not exist (a latent dataset .pt, 'synthetic' or 'world')")
    if plan.trainer == "diffusion" and cfg.data_path == "world":
        vae = world_vae_path(cfg)
        if not vae.is_file():
            raise TrainingError(f"data_path: world encodes world videos with {str(vae)!r}, which does not exist "
                                "(set world.vae, or put Wan2.1_VAE.pth in the generator's folder)")
    if plan.trainer == "score_distillation" and not Path(cfg.data_path).is_file():
        raise TrainingError(f"data_path {cfg.data_path!r} ({'text-image pairs: python -m training.i2v makes them' if cfg.i2v else 'the prompt file'}) does not exist")


# ------------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class Models:
    generator: torch.nn.Module  # causal for score distillation and ODE; any for diffusion
    critic: torch.nn.Module | None = None  # the fake score (bidirectional), trained
    teacher: torch.nn.Module | None = None  # the real score (bidirectional), frozen
    ema_init: dict | None = None  # the generator's weights before generator_ckpt: an EMA made at step 0 starts here


class Trainer:
    def __init__(self, cfg, models: Models, encoder, logdir, *, d: fsdp.Dist, plan: Plan, data=None,
                 probes=None, resume: str | Path | None = None, log=print, progress: bool = True,
                 seed: int | None = None):
        self.cfg, self.plan, self.d, self.log, self.progress = cfg, plan, d, log, progress
        self.logdir = Path(logdir)
        self.device = d.device
        self.dtype = torch.bfloat16 if (cfg.mixed_precision and self.device.type == "cuda") else torch.float32
        self.scheduler = FlowMatchScheduler(cfg.model_kwargs.timestep_shift, cfg.num_train_timestep)
        score_shift = cfg.score_timestep_shift if cfg.score_timestep_shift is not None else cfg.model_kwargs.timestep_shift
        self.score_scheduler = FlowMatchScheduler(score_shift, cfg.num_train_timestep)  # the score networks' grid
        self.timesteps = plan.timesteps
        self.ema_init = models.ema_init
        self._check_models(models)
        from training.text import PromptCache

        self.encode = PromptCache(encoder, self.device, self.dtype)
        self.data = data
        self.seed = self._resolve_seed(seed if seed is not None else cfg.seed)
        for m in (models.generator, models.critic, models.teacher):
            if m is not None:
                m.eval()  # no dropout anywhere (the researchers train in eval mode)
                m.gradient_checkpointing = bool(cfg.gradient_checkpointing)
        models.generator.requires_grad_(True)
        if models.critic is not None:
            models.critic.requires_grad_(True)
        if models.teacher is not None:
            models.teacher.requires_grad_(False)
        mp = bool(cfg.mixed_precision)
        self.generator = fsdp.shard(models.generator, d, mixed_precision=mp)
        self.critic = fsdp.shard(models.critic, d, mixed_precision=mp) if models.critic is not None else None
        self.teacher = fsdp.shard(models.teacher, d, mixed_precision=mp) if models.teacher is not None else None
        # the parameters as the optimiser holds them: FSDP's sharded parameters (a no-grad forward leaves the
        # root's gathered copies registered on the module until the next backward)
        self.gen_params = [(n, p) for n, p in self.generator.named_parameters() if p.requires_grad]
        self.critic_params = [] if self.critic is None else [
            (n, p) for n, p in self.critic.named_parameters() if p.requires_grad]
        self.gen_opt, self.critic_opt = self.make_optimizers()
        self.ema: EMA | None = None
        self.step = 0
        self.last_saved = None
        self.history: list[dict] = []  # every logged row (all ranks), for tests and notebooks
        resume_step = None
        if resume is not None:
            resume_step = self.resume(resume)
            self.ema_init = None  # a resumed run's EMA comes from the checkpoint or from the weights then
        self.uncond = None
        self.logger = None
        if d.main:
            from training.logger import Logger

            self.logdir.mkdir(parents=True, exist_ok=True)
            self.logger = Logger(self.logdir, list(cfg.loggers), resume_step=resume_step, config=cfg,
                                 run_name=self.logdir.name)
            atomic_write_text(self.logdir / "config.yaml", OmegaConf.to_yaml(cfg))
        self.probes = probes
        if probes is not None:
            probes.open(d.main, resume_step)
        for note in plan.warnings:
            warnings.warn(note, stacklevel=2)
            if d.main:
                log(f"warning: {note}")

    # --- setup helpers ------------------------------------------------------------------------------------

    def make_optimizers(self):
        """(generator AdamW, critic AdamW or None) over gen_params / critic_params (training/gan.py overrides)."""
        cfg = self.cfg
        gen = torch.optim.AdamW([p for _, p in self.gen_params], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=cfg.weight_decay)
        if self.critic is None:
            return gen, None
        return gen, torch.optim.AdamW([p for _, p in self.critic_params], lr=cfg.lr_critic,
                                      betas=(cfg.beta1_critic, cfg.beta2_critic), weight_decay=cfg.weight_decay)

    def _check_models(self, models: Models) -> None:
        F, C, H, W = self.plan.shape
        g = models.generator
        if g.config.in_dim != C:
            raise TrainingError(f"image_or_video_shape has {C} channels; the model takes {g.config.in_dim}")
        _, ph, pw = g.config.patch_size
        if H % ph or W % pw:
            raise TrainingError(f"latent {H}x{W} is not divisible by the patch size {ph}x{pw}")
        if self.plan.trainer in ("score_distillation", "ode", "gan"):
            if not g.causal:
                raise TrainingError("the generator must be the causal model")
            if (g.num_frame_per_block, g.independent_first_frame) != (self.plan.nfpb, bool(self.cfg.independent_first_frame)):
                raise TrainingError(f"generator chunks of {g.num_frame_per_block} frames (independent first frame: "
                                    f"{g.independent_first_frame}), config num_frame_per_block {self.plan.nfpb} "
                                    f"(independent_first_frame: {bool(self.cfg.independent_first_frame)})")
        if self.plan.trainer == "gan" and (models.critic is None or models.critic.causal):
            raise TrainingError("GAN training needs the discriminator: the bidirectional fake score (fake_name)")
        if self.plan.trainer == "score_distillation":
            for name, m in (("critic (fake_name)", models.critic), ("teacher (real_name)", models.teacher)):
                if m is None:
                    raise TrainingError(f"score distillation needs a {name} model")
                if m.causal:
                    raise TrainingError(f"the {name} is a bidirectional model (causal=False)")
                if m.config.text_dim != g.config.text_dim or m.config.in_dim != g.config.in_dim:
                    raise TrainingError(f"the {name} takes other inputs than the generator")

    def _resolve_seed(self, seed: int) -> int:
        """seed 0 means a random seed drawn on rank 0 (the researchers' convention), logged and checkpointed."""
        if seed == 0:
            seed = int(torch.randint(1, 10_000_000, (1,)))
        return self.d.broadcast_list([seed])[0]

    def negative(self, batch: int) -> torch.Tensor:
        if self.uncond is None:
            self.uncond = self.encode([self.cfg.negative_prompt])
        return self.uncond.expand(batch, -1, -1)

    def micro_indices(self, m: int) -> list[int]:
        """Global sample indices (within one step's global batch) of micro-batch m on this rank."""
        bs = self.cfg.batch_size
        first = (m * self.d.world + self.d.rank) * bs
        return list(range(first, first + bs))

    def noise(self, gens) -> torch.Tensor:
        return rng.randn(gens, self.plan.shape, device=self.device, dtype=self.dtype)

    def exit_indices(self, stream: str) -> list[int]:
        n_chunks = len(chunk_layout(self.plan.shape[0], self.plan.nfpb, bool(self.cfg.independent_first_frame)))
        draws = draw_exit_indices(self.seed, self.step, stream, n_chunks, len(self.timesteps),
                                  shared=self.cfg.same_step_across_blocks, last_step_only=self.cfg.last_step_only)
        return self.d.broadcast_list(draws)  # the researchers draw on rank 0 and broadcast

    def rollout(self, prompts, indices, stream: str, grad: bool, images=None) -> tuple[torch.Tensor, list[int]]:
        """The generated latents [B, F, C, H, W] and the exit index of every chunk (i2v: `images` [B, 1, C, H, W]
        is frame 0)."""
        gens = rng.sample_generators(self.seed, self.step, f"{stream}/rollout", indices, self.device)
        exits = self.exit_indices(f"{stream}/exit")
        self._last_exit = exits[0]
        x = self_forcing_rollout(self.generator, self.noise(gens), self.encode(prompts), timesteps=self.timesteps,
                                 scheduler=self.scheduler, exit_indices=exits, gens=gens,
                                 context_noise=float(self.cfg.context_noise), grad=grad,
                                 kv_gradient=self.cfg.kv_cache_gradient, text_kv_gradient=self.cfg.text_kv_gradient,
                                 initial_latent=images)
        return x, exits

    def score_range(self, exits: list[int]) -> tuple[int, int | None]:
        """[low, high) of the score timestep draw: min_score_timestep and num_train_timestep, or with
        ts_schedule / ts_schedule_max the rollout's denoised range (only when every chunk exits at one step, as
        the researchers' pipeline returns it only then)."""
        cfg = self.cfg
        low, high = int(cfg.min_score_timestep), None
        if cfg.same_step_across_blocks and (cfg.ts_schedule or cfg.ts_schedule_max):
            frm, to = denoised_timestep_range(exits[0], self.timesteps, self.scheduler)
            low = to if cfg.ts_schedule else low
            high = frm if cfg.ts_schedule_max else high
        return low, high

    def score_draws(self, indices, stream: str, exits: list[int]):
        gens = rng.sample_generators(self.seed, self.step, f"{stream}/score", indices, self.device)
        low, high = self.score_range(exits)
        t = score_timestep(gens, self.plan.shape[0], min_timestep=low, max_timestep=high,
                           num_train_timestep=self.cfg.num_train_timestep, shift=self.cfg.timestep_shift,
                           device=self.device)
        return t, self.noise(gens)

    def prompts_for(self, role: int, indices) -> list[str]:
        """role 0: generator batch, 1: critic batch (each step reads two batches, as the researchers' loop)."""
        total = self.cfg.total_batch_size
        batch = self.data.batch([(2 * self.step + role) * total + i for i in indices])
        return batch[0] if self.cfg.i2v else batch

    def images_for(self, role: int, indices):
        """i2v: the image latents [B, 1, C, H, W] of the same batch's text-image pairs; None otherwise."""
        if not self.cfg.i2v:
            return None
        total = self.cfg.total_batch_size
        return self.data.batch([(2 * self.step + role) * total + i for i in indices])[1].to(self.device, self.dtype)

    # --- losses of one micro-batch --------------------------------------------------------------------------

    def generator_loss(self, m: int):
        idx = self.micro_indices(m)
        prompts = self.prompts_for(0, idx)
        x, exits = self.rollout(prompts, idx, "gen", grad=True, images=self.images_for(0, idx))
        t, noise = self.score_draws(idx, "gen", exits)
        cond, uncond = self.encode(prompts), self.negative(len(idx))
        cfg = self.cfg
        # the researchers' DMD reads fake_guidance_scale only when the config has real_guidance_scale
        g, g_fake = ((cfg.real_guidance_scale, cfg.fake_guidance_scale) if cfg.real_guidance_scale is not None
                     else (cfg.guidance_scale, 0.0))
        common = dict(teacher=self.teacher, critic=self.critic, cond=cond, uncond=uncond, scheduler=self.scheduler,
                      score_scheduler=self.score_scheduler, t=t, noise=noise, guidance_scale=g)
        if self.plan.loss == "sid":
            return sid_loss(x, alpha=cfg.sid_alpha, **common)
        return dmd_loss(x, fake_guidance_scale=g_fake, **common)

    def critic_loss(self, m: int):
        idx = self.micro_indices(m)
        prompts = self.prompts_for(1, idx)
        with torch.no_grad():
            x, exits = self.rollout(prompts, idx, "critic", grad=False, images=self.images_for(1, idx))
        t, noise = self.score_draws(idx, "critic", exits)
        loss = critic_flow_loss(x, critic=self.critic, cond=self.encode(prompts), scheduler=self.scheduler,
                                score_scheduler=self.score_scheduler, t=t, noise=noise)
        return loss, {"critic_timestep": t[:, 0].mean().detach()}

    def regression_loss(self, m: int):
        idx = self.micro_indices(m)
        global_idx = [self.step * self.cfg.total_batch_size + i for i in idx]
        prompts, latents = self.data.batch(global_idx)
        if self.cfg.prompt_dropout:
            prompts = self.drop_prompts(prompts, global_idx)
        gens = rng.sample_generators(self.seed, self.step, self.plan.loss, idx, self.device)
        latents = latents.to(self.device, self.dtype)
        if self.plan.loss == "ode":
            loss = ode_regression_loss(self.generator, latents, self.encode(prompts), timesteps=self.timesteps,
                                       scheduler=self.scheduler, gens=gens)
        else:
            loss = diffusion_loss(self.generator, latents, self.encode(prompts), scheduler=self.scheduler, gens=gens)
        return loss, {}

    def drop_prompts(self, prompts: list[str], global_idx: list[int]) -> list[str]:
        """Each prompt replaced by negative_prompt with probability prompt_dropout (a draw keyed by the sample's
        global index), so the model also learns the unconditional prediction that CFG subtracts."""
        keep = [float(torch.rand((), generator=rng.generator(self.seed, self.step, "prompt_dropout", g)))
                >= self.cfg.prompt_dropout for g in global_idx]
        return [p if k else self.cfg.negative_prompt for p, k in zip(prompts, keep)]

    # --- one optimiser update ----------------------------------------------------------------------------------

    def update(self, model, optimizer, loss_fn, max_norm: float, prefix: str) -> dict:
        """Accumulate `accum` micro-batches, clip, step. Returns logged values (means over micro-batches and ranks)."""
        optimizer.zero_grad(set_to_none=True)
        accum = self.plan.accum
        total, extras = 0.0, {}
        for m in range(accum):
            fsdp.set_gradient_sync(model, m == accum - 1)
            loss, logs = loss_fn(m)
            (loss / accum).backward()
            total += float(loss.detach()) / accum
            for k, v in logs.items():
                extras[k] = extras.get(k, 0.0) + float(v) / accum
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.cfg.unused_param_grads == "zero":  # as the researchers' FSDP: AdamW then decays and steps them
            for p in params:
                if p.grad is None and p.requires_grad:  # (frozen ones, e.g. a GAN warm-up's backbone, stay)
                    p.grad = torch.zeros_like(p)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        out = {f"{prefix}_loss": self.d.mean(total), f"{prefix}_grad_norm": float(fsdp.full_tensor(norm))}
        out.update({k: self.d.mean(v) for k, v in extras.items()})
        return out

    def train_step(self) -> dict:
        """One iteration at self.step (before the increment)."""
        cfg = self.cfg
        logs: dict = {}
        if self.plan.trainer == "score_distillation":
            if self.step % cfg.dfake_gen_update_ratio == 0:
                logs.update(self.update(self.generator, self.gen_opt, self.generator_loss,
                                        cfg.max_grad_norm_generator, "generator"))
                logs["exit_index"] = self._last_exit
                if self.ema is not None:
                    self.ema.update()
            logs.update(self.update(self.critic, self.critic_opt, self.critic_loss, cfg.max_grad_norm_critic,
                                    "critic"))
        else:
            logs.update(self.update(self.generator, self.gen_opt, self.regression_loss,
                                    cfg.max_grad_norm_generator, "generator"))
            if self.ema is not None:
                self.ema.update()
        return logs

    def maybe_create_ema(self) -> None:
        cfg = self.cfg
        if self.ema is None and cfg.ema_weight > 0 and self.step >= cfg.ema_start_step:
            self.ema = EMA(self.gen_params, cfg.ema_weight)
            if self.step == 0 and self.ema_init is not None:  # the researchers' EMA is made before the ckpt loads
                self.ema.load_full(self.ema_init)
            self.ema_init = None

    def iteration(self) -> dict:
        """One iteration: the updates at self.step, then step += 1, EMA creation, checkpoint, log row, probe."""
        t0 = time.perf_counter()
        logs = self.train_step()
        self.step += 1
        self.maybe_create_ema()
        logs["seconds"] = time.perf_counter() - t0
        if self.step % self.cfg.log_iters == 0:
            self.save()
        self.record(logs)
        self.maybe_probe()
        return logs

    def train(self, max_steps: int | None = None, *, save_at_end: bool = True) -> list[dict]:
        """Train until step `max_steps` (default: cfg.max_steps; 0 = until interrupted, then a checkpoint is
        saved). Returns the logged rows."""
        from tqdm.auto import tqdm

        end = self.cfg.max_steps if max_steps is None else max_steps
        self.maybe_create_ema()
        self.maybe_probe()
        bar = tqdm(total=(end - self.step) if end else None, desc=f"train ({self.plan.loss})", unit="step",
                   disable=not (self.progress and self.d.main))
        try:
            while not end or self.step < end:
                logs = self.iteration()
                bar.update(1)
                bar.set_postfix({k.replace("_loss", ""): f"{v:.4g}" for k, v in logs.items() if k.endswith("_loss")})
        except KeyboardInterrupt:
            if self.d.main:
                self.log(f"interrupted at step {self.step}; saving a checkpoint")
        finally:
            bar.close()
        if save_at_end and self.last_saved != self.step and self.step > 0:
            self.save()
        return self.history

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if self.probes is not None:
            self.probes.close()

    def record(self, logs: dict) -> None:
        row = {"step": self.step, **logs}
        self.history.append(row)
        if self.logger is not None:
            self.logger.log(self.step, logs)

    def maybe_probe(self) -> None:
        if self.probes is None or not self.probes.due(self.step, self.d):
            return
        summary = self.probes.run(self.generator, self.step, self.encode, self.d, self.dtype)
        if self.d.main and summary:
            self.log(f"probe at step {self.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))

    # --- checkpoints ---------------------------------------------------------------------------------------

    def save(self) -> Path:
        """logdir/checkpoint_model_{step:06d}/{training_state.pt, model.pt}; every rank must call it."""
        from models.wan.checkpoint import save_self_forcing

        folder = self.logdir / f"checkpoint_model_{self.step:06d}"
        for model in (self.generator, self.critic):
            fsdp.reshard(model)
        models = {"generator": fsdp.full_state_dict(self.generator)}
        if self.critic is not None:
            models["critic"] = fsdp.full_state_dict(self.critic)
        if self.ema is not None and self.cfg.ema_start_step < self.step:
            models["generator_ema"] = self.ema.full_state_dict()
        state = {"step": self.step, "seed": self.seed, "world": self.d.world,
                 "generator_optimizer": fsdp.optimizer_state(self.gen_params, self.gen_opt)}
        if self.critic is not None:
            state["critic_optimizer"] = fsdp.optimizer_state(self.critic_params, self.critic_opt)
        if self.d.main:
            state["config_yaml"] = OmegaConf.to_yaml(self.cfg)
            atomic_torch_save(state, folder / "training_state.pt")
            save_self_forcing(folder / "model.pt", **models)  # last: a folder with model.pt is complete
            self.log(f"saved {folder / 'model.pt'}")
        self.d.barrier()
        self.last_saved = self.step
        return folder

    def resume(self, path) -> int:
        """Load a checkpoint folder written by `save` (weights, optimiser states, step, seed)."""
        from models.wan.checkpoint import load_tensors, strip_prefixes

        folder = Path(path)
        if folder.is_file():
            folder = folder.parent
        model_pt, state_pt = folder / "model.pt", folder / "training_state.pt"
        if not model_pt.is_file() or not state_pt.is_file():
            raise TrainingError(f"{str(folder)!r} is not a complete checkpoint (model.pt and training_state.pt)")
        blob = load_tensors(model_pt)
        state = torch.load(state_pt, map_location="cpu", weights_only=True)
        fsdp.load_full(self.generator, strip_prefixes(blob["generator"]))
        fsdp.load_optimizer_state(self.gen_params, self.gen_opt, state["generator_optimizer"])
        if self.critic is not None:
            if "critic" not in blob:
                raise TrainingError(f"{model_pt} has no critic; it is not a score-distillation checkpoint")
            fsdp.load_full(self.critic, strip_prefixes(blob["critic"]))
            fsdp.load_optimizer_state(self.critic_params, self.critic_opt, state["critic_optimizer"])
        self.step, self.seed = int(state["step"]), int(state["seed"])
        self.last_saved = self.step
        if "generator_ema" in blob:
            self.ema = EMA(self.gen_params, self.cfg.ema_weight)
            self.ema.load_full(strip_prefixes(blob["generator_ema"]))
        # else: an EMA due at this step is made from these weights by train(), as the uninterrupted run did
        if self.d.main:
            self.log(f"resumed from {folder} at step {self.step}")
        return self.step


def latest_checkpoint(logdir) -> Path | None:
    """The newest complete checkpoint folder in a logdir."""
    folders = sorted(Path(logdir).glob("checkpoint_model_*"))
    complete = [f for f in folders if (f / "model.pt").is_file() and (f / "training_state.pt").is_file()]
    return complete[-1] if complete else None


# ------------------------------------------------------------------------------------------------------
# Building everything from a config


def build_models(cfg, plan: Plan, device="cpu") -> tuple[Models, Path]:
    """The models a config names, on the CPU in float32 (teacher: bf16 on CUDA with mixed precision, where its
    frozen weights are only ever used in bf16), and with ema_start_step <= 0 the generator folder's own weights
    for the EMA to start from. Returns (models, generator folder)."""
    from models.wan.checkpoint import load_wan

    kw = cfg.model_kwargs
    gen_dir = model_folder(cfg, kw.model_name)
    causal = plan.trainer != "diffusion" or bool(cfg.causal)
    generator = load_wan(gen_dir, checkpoint=cfg.generator_ckpt or None, causal=causal, num_frame_per_block=cfg.num_frame_per_block,
                         local_attn_size=kw.local_attn_size, sink_size=kw.sink_size, dtype=torch.float32)
    generator.independent_first_frame = causal and bool(cfg.independent_first_frame)
    ema_init = None
    if cfg.generator_ckpt and cfg.ema_weight > 0 and cfg.ema_start_step <= 0:
        from models.wan.checkpoint import read_wan_folder

        ema_init = read_wan_folder(gen_dir)[1]
    critic = teacher = None
    if plan.trainer == "gan":  # the discriminator: the fake score with its classification branch
        from training.gan import add_classification_branch

        critic = load_wan(model_folder(cfg, cfg.fake_name), causal=False, dtype=torch.float32)
        add_classification_branch(critic, cfg.num_class, bool(cfg.concat_time_embeddings))
    if plan.trainer == "score_distillation":
        critic = load_wan(model_folder(cfg, cfg.fake_name), causal=False, dtype=torch.float32)
        teacher_dtype = torch.bfloat16 if (cfg.mixed_precision and torch.device(device).type == "cuda") else torch.float32
        teacher = load_wan(model_folder(cfg, cfg.real_name), causal=False, dtype=teacher_dtype)
    return Models(generator, critic, teacher, ema_init), gen_dir


def world_vae_path(cfg) -> Path:
    """The VAE that encodes `data_path: world`: world.vae, else the generator folder's Wan2.1_VAE.pth."""
    return Path(cfg.world.vae) if cfg.world.vae else Path(cfg.model_root) / cfg.model_kwargs.model_name / "Wan2.1_VAE.pth"


def build_data(cfg, plan: Plan, seed: int, d: fsdp.Dist | None = None):
    if cfg.i2v:
        data = LatentDataset.from_file(cfg.data_path, seed, "image_latents")
        F, C, H, W = plan.shape
        if tuple(data.latents.shape[1:]) != (1, C, H, W):
            raise TrainingError(f"image latents of shape {tuple(data.latents.shape[1:])}; image_or_video_shape asks "
                                f"for {(1, C, H, W)}")
        return data
    if plan.trainer == "score_distillation":
        return PromptSource.from_file(cfg.data_path, seed)
    if plan.trainer == "ode":
        data = LatentDataset.from_file(cfg.data_path, seed, "ode_pairs")
        F, C, H, W = plan.shape
        if tuple(data.latents.shape[2:]) != (F, C, H, W):
            raise TrainingError(f"ODE pairs of shape {tuple(data.latents.shape[2:])}; image_or_video_shape asks "
                                f"for {(F, C, H, W)}")
        if len(plan.timesteps) > data.latents.shape[1]:
            raise TrainingError(f"denoising_step_list has {len(plan.timesteps)} steps; the ODE pairs hold "
                                f"{data.latents.shape[1]} trajectory points")
        return data
    if cfg.data_path == "synthetic":
        F, C, H, W = plan.shape
        prompts, latents = synthetic_latents(64, F, C, H, W, seed=0)
        return LatentDataset(prompts, latents, "latents", seed)
    if cfg.data_path == "world":
        return world_data(cfg, plan, seed, d)
    data = LatentDataset.from_file(cfg.data_path, seed, "latents")
    if plan.trainer == "gan" and tuple(data.latents.shape[1:]) != tuple(plan.shape):
        raise TrainingError(f"real latents of shape {tuple(data.latents.shape[1:])} in {cfg.data_path!r}; the "
                            f"generator makes {tuple(plan.shape)} (image_or_video_shape): encode "
                            f"{plan.shape[0]} latent frames (python -m training.i2v --frames {plan.shape[0]})")
    return data


def world_data(cfg, plan: Plan, seed: int, d: fsdp.Dist | None) -> LatentDataset:
    """`data_path: world`: the cached latent set of training/world_data.py (rank 0 makes it when missing)."""
    from training.world_data import make_world_dataset, world_dataset_path

    F, C, H, W = plan.shape
    w = cfg.world
    if (C, H, W) != (16, 12, 16):
        raise TrainingError(f"data_path: world gives latents of 16 x 12 x 16 (96 x 128 pixels); image_or_video_shape "
                            f"asks for {C} x {H} x {W}")
    if w.num_videos < 1 or w.batch < 1:
        raise TrainingError(f"world.num_videos {w.num_videos} and world.batch {w.batch} must be >= 1")
    device = d.device if d is not None else torch.device("cpu")
    vae = world_vae_path(cfg)
    path = world_dataset_path(vae, w.num_videos, w.seed, F, w.cache_dir)
    if d is None or d.main:
        make_world_dataset(path, vae, w.num_videos, w.seed, F, device=device, batch=w.batch)
    if d is not None:
        d.barrier()
    return LatentDataset.from_file(path, seed, "latents")


def build_probes(cfg, plan: Plan, model_config, logdir, *, weights_label: str, weights_sha: str):
    """The probe set of cfg.probe, checked against the model (None when probes are off)."""
    import hashlib

    from models.common.rollout import few_step_schedule
    from models.video import read_prompts
    from training.probes import TrainingProbes
    from workbench.capture import CaptureSpec
    from workbench.extract import _git_commit

    p = cfg.probe
    if not p.every:
        return None
    if p.every < 0:
        raise TrainingError(f"probe.every {p.every} must be >= 0")
    if plan.trainer not in ("score_distillation", "ode", "gan"):
        raise TrainingError("probes run the causal few-step rollout: use them with score_distillation, ode or gan")
    prompts = list(p.prompts) + (read_prompts(p.prompt_file) if p.prompt_file else [])
    if not prompts:
        raise TrainingError("probe.every is set but the probe set has no prompts (probe.prompts or probe.prompt_file)")
    if not p.seeds:
        raise TrainingError("probe.seeds is empty")
    mc = model_config
    frames = p.num_frames or plan.shape[0]
    iff = bool(cfg.independent_first_frame)
    try:  # frames that fit the chunk layout (models/common/chunks.py)
        block_sizes(frames, plan.nfpb, iff)
    except ModelInputError as err:
        raise TrainingError(f"probe.num_frames: {err}") from None
    try:  # the cache holds the training length, and at least the family's
        check_fits_cache(frames, mc.local_attn_size, max(plan.shape[0], WAN.cache_frames),
                         label=f"probe.num_frames {frames}", remedy="set model_kwargs.local_attn_size")
    except ModelInputError as err:
        raise TrainingError(str(err)) from None
    layers = list(p.layers) if p.layers is not None else list(range(mc.num_layers))
    heads = list(p.heads) if p.heads is not None else list(range(mc.num_heads))
    for what, values, n in (("layer", layers, mc.num_layers), ("head", heads, mc.num_heads)):
        bad = sorted(v for v in values if not 0 <= v < n)
        if bad:
            raise TrainingError(f"probe {what}s {bad} out of range: the model has {what}s 0-{n - 1}")
    schedule = few_step_schedule(plan.timesteps, float(cfg.context_noise))
    steps = list(p.steps) if p.steps is not None else [s.step for s in schedule]
    bad = sorted(set(steps) - {s.step for s in schedule})
    if bad:
        raise TrainingError(f"probe steps {bad} out of range: the schedule has steps 0-{len(schedule) - 1}")
    try:
        spec = CaptureSpec(tuple(layers), tuple(heads), tuple(sorted(steps)), tuple(p.stats))
    except Exception as err:
        raise TrainingError(f"probe: {err}") from None
    _, _, H, W = plan.shape
    fsl = mc.tokens_per_frame(H, W)
    layout_key = dict(spec=dataclasses.astuple(spec), schedule=[dataclasses.astuple(s) for s in schedule],
                      prompts=prompts, seeds=list(p.seeds), frames=frames, hw=(H, W), weights=weights_sha,
                      model=dataclasses.asdict(mc), nfpb=plan.nfpb)
    if iff:  # (absent otherwise: probe stores made before the option still resume)
        layout_key["independent_first_frame"] = True
    fp = hashlib.sha256(json.dumps(layout_key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    import platform

    import xarray
    import zarr

    from workbench import __version__

    attrs = dict(workbench_version=__version__, git_commit=_git_commit(), command="workbench train",
                 config_yaml=OmegaConf.to_yaml(cfg), frame_seq_len=fsl, num_frame_per_block=plan.nfpb,
                 independent_first_frame=iff,
                 num_frames=frames, text_len=mc.text_len, head_dim=mc.head_dim, num_layers=mc.num_layers,
                 num_heads=mc.num_heads, versions=dict(torch=torch.__version__, xarray=xarray.__version__,
                                                       zarr=zarr.__version__, python=platform.python_version()),
                 trainer=plan.trainer, loss=plan.loss)
    meta = dict(checkpoint=weights_label, checkpoint_sha256=weights_sha, model_family="self_forcing",
                sampler="causal_few_step", local_attn_size=mc.local_attn_size, sink_size=mc.sink_size)
    return TrainingProbes(spec=spec, schedule=schedule, prompts=prompts, seeds=list(p.seeds), num_frames=frames,
                          latent_hw=(H, W), channels=plan.shape[1], frame_seq_len=fsl, grid=mc.token_grid(H, W),
                          text_len=mc.text_len, nfpb=plan.nfpb, independent_first_frame=iff, timesteps=plan.timesteps,
                          scheduler=FlowMatchScheduler(cfg.model_kwargs.timestep_shift, cfg.num_train_timestep),
                          context_noise=float(cfg.context_noise), every=int(p.every),
                          path=Path(logdir) / p.store, attrs=attrs, fingerprint=fp, sample_meta=meta)


def build_trainer(cfg, logdir, *, sets_sid_alpha: bool = False, resume=None, log=print, progress=True) -> Trainer:
    """Everything a config names: checks first, then weights, text encoder, data, probes."""
    from models.wan.checkpoint import WEIGHTS_NAME, sha256_file
    from models.wan.text_encoder import TextEncoder

    d = fsdp.setup(cfg.device)
    plan = check_config(cfg, d.world, sets_sid_alpha=sets_sid_alpha)
    check_files(cfg, plan)
    if resume == "latest":
        resume = latest_checkpoint(logdir)
        if resume is None:
            raise TrainingError(f"--resume: {logdir} has no complete checkpoint_model_* folder")
    elif resume is None and latest_checkpoint(logdir) is not None:
        raise TrainingError(f"{logdir} already holds checkpoints; pass --resume to continue or use a new --logdir")
    from models.wan.config import WanConfig

    gen_dir = model_folder(cfg, cfg.model_kwargs.model_name)
    gen_config = WanConfig.from_json(gen_dir / "config.json").replace(
        local_attn_size=cfg.model_kwargs.local_attn_size, sink_size=cfg.model_kwargs.sink_size)
    weights = Path(cfg.generator_ckpt) if cfg.generator_ckpt else gen_dir / WEIGHTS_NAME
    sha = sha256_file(weights) if weights.is_file() else ""  # (a sharded Wan folder has no single file)
    probes = build_probes(cfg, plan, gen_config, logdir, weights_label=str(weights), weights_sha=sha)  # checks first
    models, _ = build_models(cfg, plan, d.device)
    encoder = TextEncoder.from_wan_dir(gen_dir, device=d.device)
    cls = Trainer
    if plan.trainer == "gan":
        from training.gan import GanTrainer as cls
    trainer = cls(cfg, models, encoder, logdir, d=d, plan=plan, data=None, probes=probes, resume=resume, log=log,
                      progress=progress, seed=cfg.seed)
    trainer.data = build_data(cfg, plan, trainer.seed, d)
    return trainer


def describe(trainer: Trainer) -> str:
    plan, cfg, d = trainer.plan, trainer.cfg, trainer.d
    what = {"dmd": "DMD", "sid": "SiD", "ode": "ODE regression", "diffusion": "diffusion", "gan": "GAN"}[plan.loss]
    F, C, H, W = plan.shape
    return (f"{what} training from step {trainer.step}: {F} latent frames of {H}x{W}, global batch "
            f"{cfg.total_batch_size} = {d.world} rank(s) x {plan.accum} micro-batch(es) x {cfg.batch_size}, "
            f"steps {[round(float(t), 2) for t in plan.timesteps]}, seed {trainer.seed}, device {d.device}, "
            f"compute {str(trainer.dtype).replace('torch.', '')}" + semantics(cfg, plan))


def semantics(cfg, plan: Plan) -> str:
    """The gradient semantics of a run in one line (docs/training.md), for the score-distillation trainer."""
    if plan.trainer != "score_distillation":
        return ""
    shift = cfg.score_timestep_shift if cfg.score_timestep_shift is not None else cfg.model_kwargs.timestep_shift
    return (f"; score networks on the shift-{shift:g} grid, KV cache gradient {cfg.kv_cache_gradient}, text k/v "
            f"gradient {cfg.text_kv_gradient}, unused parameter grads {cfg.unused_param_grads} (docs/training.md)")


def build_ode_pairs(cfg, *, log=print, progress: bool = True) -> Path:
    """`--make-ode-pairs`: the teacher (`model_root/real_name`, bidirectional, float32) makes `ode_pairs.num_pairs`
    trajectories for the prompts of `ode_pairs.prompt_file` (cycled), written to `data_path`. Rank 0 works."""
    from tqdm.auto import tqdm

    from models.wan.checkpoint import load_wan
    from models.wan.text_encoder import TextEncoder
    from models.video import read_prompts
    from training.data import save_latent_dataset
    from training.rollout import make_ode_pairs

    d = fsdp.setup(cfg.device)
    plan = check_config(cfg, 1)
    op = cfg.ode_pairs
    if not op.prompt_file:
        raise TrainingError("ode_pairs.prompt_file is not set (the prompts to make ODE pairs for)")
    try:
        prompts = read_prompts(op.prompt_file)
    except Exception as err:
        raise TrainingError(f"ode_pairs.prompt_file: {err}") from None
    if op.num_pairs < 1 or op.steps < 1 or op.batch_size < 1 or any(not 0 <= k < op.steps for k in op.keep):
        raise TrainingError(f"ode_pairs: num_pairs {op.num_pairs}, steps {op.steps} and batch_size {op.batch_size} "
                            f"must be >= 1 and keep {list(op.keep)} must lie in [0, {op.steps})")
    out = Path(cfg.data_path)
    if out.exists():
        raise TrainingError(f"data_path {str(out)!r} already exists; remove it to make new ODE pairs")
    folder = model_folder(cfg, cfg.real_name)
    if d.main:
        teacher = load_wan(folder, causal=False, dtype=torch.float32, device=d.device)
        encoder = TextEncoder.from_wan_dir(folder, device=d.device)
        chosen = [prompts[i % len(prompts)] for i in range(op.num_pairs)]
        context = encoder.encode(chosen).context.to(d.device, torch.float32)
        negative = encoder.encode([cfg.negative_prompt]).context.to(d.device, torch.float32)
        batches = -(-op.num_pairs // op.batch_size)
        bar = tqdm(total=batches * op.steps * 2, desc="ODE pairs", unit="fwd", disable=not progress)
        latents = make_ode_pairs(teacher, context, negative, shape=plan.shape, steps=op.steps, shift=op.shift,
                                 guidance_scale=op.guidance_scale, keep=tuple(op.keep), seed=op.seed,
                                 batch_size=op.batch_size, on_forward=lambda *_: bar.update(1))
        bar.close()
        save_latent_dataset(out, chosen, latents, "ode_pairs", teacher=str(folder), steps=op.steps, shift=op.shift,
                            guidance_scale=op.guidance_scale, keep=list(op.keep))
        log(f"wrote {out}: {op.num_pairs} ODE pairs of shape {tuple(latents.shape[1:])} "
            f"(latents before steps {list(op.keep)} of {op.steps}, then the clean latent)")
    d.barrier()
    return out
