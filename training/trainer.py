"""The training loop: Self-Forcing score distillation (DMD or SiD), ODE regression, diffusion and GAN training.

    load_train_config, check_config(cfg, world) --> Plan (every config error, before any work)   training/checks.py
    build_trainer(cfg, logdir) --> models, text encoder, data, probes --> Trainer                 training/build.py
    Trainer.train()            --> iterations: steps, logs, checkpoints, probes                   this module
        one step (draws, losses, optimiser updates)                                             training/steps.py
        save / resume                                                                           training/checkpoints.py
    build_ode_pairs(cfg)       --> the teacher's ODE pairs (`--make-ode-pairs`)                   training/ode_pairs.py

One iteration at `step` (`iteration`): the step's updates (`train_step`: training/steps.py says what each
trainer does), then step += 1; create the EMA once step >= ema_start_step; save every log_iters; log; probe
every probe.every. `trainer: gan` is `GanTrainer` (training/gan.py), a `Trainer` with its own losses.

The researchers' gradient semantics are the defaults, each with an option (docs/training.md): score networks
converting on the shift-8 grid (`score_timestep_shift`), gradient through the in-place-written KV cache
(`kv_cache_gradient`), text keys/values recomputed with gradient under activation checkpointing
(`text_kv_gradient`), zero gradients for parameters a step did not reach, which AdamW then decays and steps
(`unused_param_grads`); `fake_guidance_scale` only when `real_guidance_scale` is set; `ts_schedule`; with
`ema_start_step` <= 0 an EMA that starts from the generator's weights before `generator_ckpt` loads.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from models.common.scheduler import FlowMatchScheduler
from models.files import atomic_write_text
from training import distributed as fsdp
from training.checkpoints import Checkpoints
from training.checks import Plan
from training.config import recorded
from training.ema import EMA
from training.errors import TrainingError
from training.steps import Steps

# names that lived here before the split, for user scripts (code of this repository imports their new modules)
MOVED = {**dict.fromkeys(("Plan", "TRAINERS", "UNUSED_PARAM_GRADS", "SID_QUIRK", "load_train_config", "check_config",
                          "check_gan_config", "chunk_layout", "model_folder", "world_vae_path", "check_files"),
                         "training.checks"),
         **dict.fromkeys(("build_models", "build_data", "world_data", "build_probes", "build_trainer", "describe",
                          "semantics"), "training.build"),
         "latest_checkpoint": "training.checkpoints", "build_ode_pairs": "training.ode_pairs"}


def __getattr__(name: str):
    if name in MOVED:  # read when first used: training.build imports this module
        import importlib

        return getattr(importlib.import_module(MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# `resume` when --resume finds no checkpoint: start from step 0, replacing the losses and probes an earlier start
# (stopped before its first checkpoint) left
RESTART = "restart from step 0"


@dataclass
class Models:
    generator: torch.nn.Module  # causal for score distillation and ODE; any for diffusion
    critic: torch.nn.Module | None = None  # the fake score (bidirectional), trained
    teacher: torch.nn.Module | None = None  # the real score (bidirectional), frozen
    ema_init: dict | None = None  # the generator's weights before generator_ckpt: an EMA made at step 0 starts here


class Trainer(Steps, Checkpoints):
    """A training run: the models (sharded), optimisers, EMA, data, probes, logger and the step counter; the loop
    (`train`, `iteration`) is here, one step in `Steps` (training/steps.py), checkpoints in `Checkpoints`
    (training/checkpoints.py)."""

    def __init__(self, cfg, models: Models, encoder, logdir, *, d: fsdp.Dist, plan: Plan, data=None,
                 probes=None, resume: str | Path | None = None, log=print, progress: bool = True,
                 seed: int | None = None, start_weights: dict | None = None):
        self.cfg, self.plan, self.d, self.log, self.progress = cfg, plan, d, log, progress
        # {"file", "sha256"} of the weights the run started from (generator_ckpt, or the folder's), saved with each
        # checkpoint: a resume goes on from the record once that file is gone (training/checkpoints.py)
        self.start_weights = start_weights
        self.logdir = Path(logdir)
        self.device = d.device
        # the compute dtype: FSDP's (bf16 with mixed_precision on a GPU)
        self.dtype = fsdp.mixed_precision_dtypes(bool(cfg.mixed_precision), self.device).get("param_dtype",
                                                                                             torch.float32)
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
        self.step_done = None  # called after each step's counter moves (train's progress bar)
        self.interrupted = False  # set by train(): stopped by Ctrl-C or SIGTERM before its last step
        self.stop_signal: int | None = None  # which: 2 (SIGINT) or 15 (SIGTERM)
        self.history: list[dict] = []  # every logged row (all ranks), for tests and notebooks
        resume_step = None
        if resume == RESTART:  # --resume where no checkpoint was made: from step 0, an earlier start's files replaced
            resume_step = -1
        elif resume is not None:
            resume_step = self.resume(resume)
            self.ema_init = None  # a resumed run's EMA comes from the checkpoint or from the weights then
        self.uncond = None
        self.logger = None
        if d.main:
            from training.logger import Logger

            self.logdir.mkdir(parents=True, exist_ok=True)
            self.logger = Logger(self.logdir, list(cfg.loggers), resume_step=resume_step, config=cfg,
                                 run_name=self.logdir.name)
            atomic_write_text(self.logdir / "config.yaml", OmegaConf.to_yaml(recorded(cfg)))
        self.probes = probes
        if probes is not None:
            probes.open(d.main, resume_step)
        for note in plan.warnings:
            warnings.warn(note, stacklevel=2)
            if d.main:
                log(f"warning: {note}")

    # --- setup helpers ------------------------------------------------------------------------------------

    def make_optimizers(self):
        """(generator AdamW, critic AdamW or None) over gen_params / critic_params (training/gan.py overrides):
        `fsdp.ShardAdamW` (torch's AdamW on the local shards; `adamw_impl` picks loop, foreach or fused)."""
        cfg = self.cfg
        gen = fsdp.ShardAdamW([p for _, p in self.gen_params], impl=cfg.adamw_impl, lr=cfg.lr,
                              betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        if self.critic is None:
            return gen, None
        return gen, fsdp.ShardAdamW([p for _, p in self.critic_params], impl=cfg.adamw_impl, lr=cfg.lr_critic,
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

    # --- the loop ----------------------------------------------------------------------------------------------

    def maybe_create_ema(self) -> None:
        cfg = self.cfg
        if self.ema is None and cfg.ema_weight > 0 and self.step >= cfg.ema_start_step:
            self.ema = EMA(self.gen_params, cfg.ema_weight)
            if self.step == 0 and self.ema_init is not None:  # the researchers' EMA is made before the ckpt loads
                self.ema.load_full(self.ema_init)
            self.ema_init = None

    def iteration(self) -> dict:
        """One iteration: the updates at self.step, then step += 1 (and `self.step_done()`, set by `train`: its
        progress bar counts the step before the step's checkpoint and probe messages), EMA creation, log row,
        checkpoint, probe."""
        t0 = time.perf_counter()
        logs = self.train_step()
        self.step += 1
        if self.step_done is not None:
            self.step_done()
        self.maybe_create_ema()
        logs["seconds"] = time.perf_counter() - t0
        self.record(logs)  # (before the checkpoint: a resume from it keeps its step's row; a row written then a
        if self.step % self.cfg.log_iters == 0:  # failed checkpoint is dropped by the resume from the one before)
            self.save()
        self.maybe_probe()
        return logs

    def train(self, max_steps: int | None = None, *, save_at_end: bool = True) -> list[dict]:
        """Train until step `max_steps` (default: cfg.max_steps; 0 = until interrupted, then a checkpoint is
        saved). Returns the logged rows."""
        from workbench.progress import progress_bar

        end = self.cfg.max_steps if max_steps is None else max_steps
        self.maybe_create_ema()
        self.maybe_probe()
        bar = progress_bar(total=(end - self.step) if end else None, desc=f"train ({self.plan.loss})", unit="step",
                   disable=not (self.progress and self.d.main))
        interrupted = broken = False
        stop = _StopAfterStep(self.log if self.d.main else None)  # Ctrl-C: finish this step, then save and stop
        self.step_done = lambda: bar.update(1)
        try:
            with stop:
                while not end or self.step < end:
                    logs = self.iteration()
                    bar.set_postfix({k.replace("_loss", ""): f"{v:.4g}" for k, v in logs.items()
                                     if k.endswith("_loss")})
                    if self.d.broadcast_list([int(stop.requested)])[0]:  # (every rank stops after the same step)
                        interrupted = True
                        break
        except KeyboardInterrupt:  # raised inside a step (a second Ctrl-C): its updates may be partly applied
            interrupted = broken = True
            stop.signum = stop.signum or 2
        finally:
            self.step_done = None
            bar.close()
        # an interrupt saves its finished steps whatever save_at_end says (its message promises a checkpoint)
        due = (save_at_end or interrupted) and self.last_saved != self.step and self.step > 0 and not broken
        if interrupted and self.d.main:
            if broken and self.last_saved != self.step and self.step > 0:
                since = (f"resume from the last checkpoint, step {self.last_saved}" if self.last_saved is not None
                         else "no checkpoint was saved in this run")
                self.log(f"interrupted during step {self.step + 1}, whose updates may be partly applied: nothing is "
                         f"saved ({since})")
            else:
                self.log(f"interrupted at step {self.step}; "
                         + ("saving a checkpoint" if due else "no finished step to save since the last checkpoint"))
        if due:
            self.save()
        self.interrupted = interrupted
        self.stop_signal = (stop.signum or 2) if interrupted else None  # 2 SIGINT (Ctrl-C), 15 SIGTERM
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


class _StopAfterStep:
    """While training runs in the main thread, the first Ctrl-C (SIGINT) or SIGTERM (what `kill`, `timeout`, SLURM
    and Kubernetes send) only asks to stop: the step under way finishes (a step's optimizer updates are never left
    half applied), then the loop saves and stops; a second one raises KeyboardInterrupt at once (then nothing is
    saved). `signum` says which signal asked."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, log=None):
        self.requested, self.signum, self.log, self._old = False, None, log, {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        if self.log is not None:
            name = "Ctrl-C" if signum == 2 else "SIGTERM"
            self.log(f"{name}: stopping after this step and saving a checkpoint ({name} again stops at once, saving "
                     "nothing)")

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = {name: signal.signal(getattr(signal, name), self._handle) for name in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        import signal

        for name, old in self._old.items():
            signal.signal(getattr(signal, name), old)
