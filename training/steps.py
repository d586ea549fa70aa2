"""One training step: the random draws, the loss of each micro-batch and the optimiser update (`Steps`, a part
of training/trainer.py's `Trainer`, which owns the models, optimisers and state these methods read).

Score distillation (the researchers' `trainer/distillation.py`), one iteration at `step` (`train_step`):

    if step % dfake_gen_update_ratio == 0:          # generator: rollout with gradient at the exit step + DMD/SiD
        zero grads; for each micro-batch: loss / accum -> backward; clip; AdamW step; EMA update
    zero grads; for each micro-batch: no-grad rollout + critic flow loss / accum -> backward; clip; AdamW step

ODE regression and diffusion training run one generator update per step. Gradient accumulation (`update`): the
global batch `total_batch_size` is split into `accum = total_batch_size / (batch_size * world)` micro-batches per
rank (the gradient reduce-scatter runs on the last one only). Micro-batch m of rank r holds the samples with
global indices (m * world + r) * batch_size + j; every random draw is keyed by step, purpose and global index
(`training.rng`), so the result does not depend on how the batch is split. The exit step of a rollout is one
draw per step, made on rank 0 and broadcast. training/gan.py overrides the losses and `train_step`.
"""

from __future__ import annotations

import torch
from torch.profiler import record_function

from training import distributed as fsdp
from training import rng
from training.checks import chunk_layout
from training.losses import (critic_flow_loss, diffusion_loss, dmd_loss, ode_regression_loss, score_timestep,
                             sid_loss)
from training.rollout import denoised_timestep_range, draw_exit_indices, self_forcing_rollout


class Steps:
    """The step methods of `Trainer` (training/trainer.py)."""

    # --- draws of one micro-batch ---------------------------------------------------------------------------

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
            loss = diffusion_loss(self.generator, latents, self.encode(prompts), scheduler=self.scheduler, gens=gens,
                                  weighting=self.cfg.timestep_weighting)
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
            with record_function(f"{prefix}/loss"):  # named ranges: bench/bench_zoo_step.py --profile reads them
                loss, logs = loss_fn(m)
            with record_function(f"{prefix}/backward"):
                # (their GAN trainer's loss_scale multiplies what is back-propagated, not what is logged)
                scaled = loss * self.cfg.loss_scale if self.plan.trainer == "gan" and self.cfg.loss_scale != 1 else loss
                (scaled / accum).backward()
            total += float(loss.detach()) / accum
            for k, v in logs.items():
                extras[k] = extras.get(k, 0.0) + float(v) / accum
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.cfg.unused_param_grads == "zero":  # as the researchers' FSDP: AdamW then decays and steps them
            for p in params:
                if p.grad is None and p.requires_grad:  # (frozen ones, e.g. a GAN warm-up's backbone, stay)
                    p.grad = torch.zeros_like(p)
        with record_function(f"{prefix}/clip"):
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        with record_function(f"{prefix}/optimizer"):
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
                    with record_function("generator/ema"):
                        self.ema.update()
            logs.update(self.update(self.critic, self.critic_opt, self.critic_loss, cfg.max_grad_norm_critic,
                                    "critic"))
        else:
            logs.update(self.update(self.generator, self.gen_opt, self.regression_loss,
                                    cfg.max_grad_norm_generator, "generator"))
            if self.ema is not None:
                with record_function("generator/ema"):
                    self.ema.update()
        return logs
