"""GAN training of the causal generator against real videos (`trainer: gan`; the researchers' model/gan.py and
trainer/gan.py in guandeh17/Self-Forcing), with their config keys and defaults.

The discriminator is the fake score (the bidirectional Wan of `fake_name`) with a classification branch, kept as
attributes of that model under the researchers' names (so the critic's checkpoint holds them):
    _register_tokens   3 learned tokens [3, dim], RMSNorm'd
    _gan_ca_blocks     3 `GanAttentionBlock`s read the block outputs after layers 13, 21 and 29 (of 30; spread
                       the same way for other depths, `gan_layers`): register token i queries that layer's video
                       tokens (cross-attention, then an FFN)
    _cls_pred_branch   LayerNorm(3 dim) -> Linear(3 dim, dim) -> SiLU -> Linear(dim, num_class); with
                       concat_time_embeddings, 10 x the time embedding is a fourth token
The backbone's own flow output is not used; its block outputs reach the branch through forward hooks.

One iteration at `step` (warm-up: `discriminator_warmup_steps`, only the branch's cross-attention blocks and head
train, no generator step):
    if not warm-up and step % dfake_gen_update_ratio == 0:    generator, discriminator frozen:
        x = self-forcing rollout (gradient at the exit step); real = a batch of real latents (another batch of
        the latent set than the discriminator's); t = critic timestep (uniform, shifted by critic_timestep_shift,
        clamped to [20, 980], ts_schedule as DMD); fake/real logits of add_noise(x, eps1, t), add_noise(real,
        eps2, t); loss = gan_g_weight * mean softplus(-fake)   (relativistic: softplus(-(fake - real)))
    discriminator: x = no-grad rollout; the same noise eps for fake and real (as theirs);
        loss = gan_d_weight * (mean softplus(-real) + mean softplus(fake))   (relativistic: softplus(-(real -
        fake))) + 0.5 (r1 + r2), with r1 = r1_weight * mean(((D(real_t + s e) - D(real_t)) / s)^2), s =
        r1_sigma (a finite-difference gradient penalty; r2 the same on the fake side); both off by default
Optimisers: generator AdamW(gen_lr, beta1, beta2); discriminator AdamW with two groups, as theirs: the
discriminator's cross-attention blocks and head (`_gan_ca_blocks`, `_cls_pred_branch`; the parameters the warm-up
trains) at critic_lr x discriminator_lr_multiplier, everything else, the register tokens among it, at critic_lr.
With a warm-up its betas are (0.9, beta2_critic) and its moments restart when the warm-up ends; their trainer
builds a new AdamW there with beta1_critic, but over the same parameter-group dicts, which the first AdamW has
already given betas (0.9, ...), so 0.9 is what runs on (torch's `add_param_group` keeps a group's own values).
Without a warm-up: (beta1_critic, beta2_critic). Both optimisers take the config's `weight_decay`; their GAN trainer
passes none, so AdamW's own 0.01 applies there whatever a config says (the default config's value, so the two
differ only where a config sets another). Everything else
(accumulation, EMA, checkpoints, resume, probes, logging) is `training.trainer.Trainer`'s.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common.rollout import _to_model
from models.wan.model import RMSNorm
from training import distributed as fsdp
from training import rng
from training.errors import TrainingError
from training.losses import score_timestep
from training.trainer import Trainer

DISCRIMINATOR = ("_gan_ca_blocks", "_cls_pred_branch")  # theirs: the faster group, and what the warm-up trains


def discriminator_param(name: str) -> bool:
    """Their test (trainer/gan.py): a parameter of the faster group, the one the warm-up trains."""
    return any(part in name for part in DISCRIMINATOR)


def gan_layers(num_layers: int) -> tuple[int, int, int]:
    """The layers whose outputs feed the branch: 13, 21, 29 of 30 (the researchers'), spread alike for other depths."""
    return tuple(round(layer * (num_layers - 1) / 29) for layer in (13, 21, 29))


class FloatLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (Wan's), affine or not."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class RegisterTokens(nn.Module):
    def __init__(self, num: int, dim: int, eps: float):
        super().__init__()
        self.register_tokens = nn.Parameter(torch.randn(num, dim) * 0.02)
        self.rms_norm = RMSNorm(dim, eps)

    def forward(self, x):
        """x: any tensor of the call (unused). The branch's modules are FSDP units of their own, and FSDP's root
        pre-forward on CUDA fails on a call without arguments (it moves args[0] to the device)."""
        return self.rms_norm(self.register_tokens)  # [num, dim]


class GanCrossAttention(nn.Module):
    """One register token [B, 1, dim] attends to the video tokens x [B, L, dim] (q from the token, k/v from x)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, token):
        B = x.shape[0]
        q = self.norm_q(self.q(token)).view(B, 1, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, 1, d]
        k = self.norm_k(self.k(x)).view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, d]
        v = self.v(x).view(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, d]
        return self.o(out.transpose(1, 2).flatten(2))  # [B, 1, dim]


class GanAttentionBlock(nn.Module):
    """token <- token + cross_attn(LN(x), token); out = FFN(LN(token)) + token (the researchers' block; their FFN
    width is 8192 at dim 1536, 16/3 dim here)."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.norm3 = FloatLayerNorm(dim, eps=eps, elementwise_affine=True)
        self.norm2 = FloatLayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, dim * 16 // 3), nn.GELU(approximate="tanh"), nn.Linear(dim * 16 // 3, dim))
        self.cross_attn = GanCrossAttention(dim, num_heads, eps)

    def forward(self, x, token):
        token = token + self.cross_attn(self.norm3(x), token)
        return self.ffn(self.norm2(token)) + token  # [B, 1, dim]


def add_classification_branch(critic, num_class: int = 1, concat_time_embeddings: bool = False) -> None:
    """Give the fake score its classification branch (module docstring), in place."""
    cfg = critic.config
    critic._register_tokens = RegisterTokens(3, cfg.dim, cfg.eps)
    critic._gan_ca_blocks = nn.ModuleList(GanAttentionBlock(cfg.dim, cfg.num_heads, cfg.eps) for _ in range(3))
    width = cfg.dim * (4 if concat_time_embeddings else 3)
    critic._cls_pred_branch = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, cfg.dim), nn.SiLU(),
                                            nn.Linear(cfg.dim, num_class))
    critic._gan_concat_time = concat_time_embeddings
    # called outside the critic's forward: each its own FSDP unit, so that their gradients reach the shards
    critic.fsdp_units = (critic._register_tokens, *critic._gan_ca_blocks, critic._cls_pred_branch)
    critic.to(next(critic.blocks.parameters()).dtype)


def classify(critic, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Discriminator logits [B, num_class] of latents x [B, F, C, H, W] at timesteps t [B, F]."""
    layers = gan_layers(len(critic.blocks))
    features: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(module, args, out):
            features[layer] = out  # [B, L, dim] (a checkpoint recompute writes the same value again)
        return hook

    handles = [critic.blocks[layer].register_forward_hook(keep(layer)) for layer in set(layers)]
    try:
        critic(_to_model(x), t if critic.causal else t[:, 0], context)  # the flow output is not used
    finally:
        for h in handles:
            h.remove()
    registers = critic._register_tokens(x)  # [3, dim]
    B = x.shape[0]
    tokens = [block(features[layer], registers[i][None, None].expand(B, 1, -1))
              for i, (block, layer) in enumerate(zip(critic._gan_ca_blocks, layers))]  # 3 x [B, 1, dim]
    if critic._gan_concat_time:
        e, _ = critic.embed_time(t if critic.causal else t[:, :1])  # [B, F, dim]
        tokens.append(10 * e[:, :1].to(tokens[0].dtype))
    return critic._cls_pred_branch(torch.cat(tokens, dim=1).flatten(1))  # [B, num_class]


def generator_gan_loss(fake_logit, real_logit, weight: float, relativistic: bool) -> torch.Tensor:
    logit = fake_logit - real_logit if relativistic else fake_logit
    return F.softplus(-logit.float()).mean() * weight


def discriminator_gan_loss(fake_logit, real_logit, weight: float, relativistic: bool) -> torch.Tensor:
    if relativistic:
        return F.softplus(-(real_logit - fake_logit).float()).mean() * weight
    return (F.softplus(-real_logit.float()).mean() + F.softplus(fake_logit.float()).mean()) * weight


class GanTrainer(Trainer):
    """`Trainer` with the GAN losses, optimisers and update schedule of the module docstring."""

    def make_optimizers(self):
        cfg = self.cfg
        gen = fsdp.ShardAdamW([p for _, p in self.gen_params], impl=cfg.adamw_impl,
                              lr=cfg.gen_lr if cfg.gen_lr is not None else cfg.lr,
                              betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        lr = cfg.critic_lr if cfg.critic_lr is not None else cfg.lr_critic
        backbone = [p for n, p in self.critic_params if not discriminator_param(n)]
        branch = [p for n, p in self.critic_params if discriminator_param(n)]
        if not branch:
            raise TrainingError("the critic has no classification branch (training.gan.add_classification_branch)")
        beta1 = 0.9 if cfg.discriminator_warmup_steps > 0 else cfg.beta1_critic  # (module docstring)
        critic = fsdp.ShardAdamW([{"params": backbone, "lr": lr},
                                  {"params": branch, "lr": lr * cfg.discriminator_lr_multiplier}], impl=cfg.adamw_impl,
                                 betas=(beta1, cfg.beta2_critic), weight_decay=cfg.weight_decay)
        return gen, critic

    def real_batch(self, role: int, indices):
        """(prompts, clean latents [B, F, C, H, W]) of micro-batch `indices`; role 0 generator, 1 discriminator."""
        total = self.cfg.total_batch_size
        prompts, latents = self.data.batch([(2 * self.step + role) * total + i for i in indices])
        return prompts, latents.to(self.device, self.dtype)

    def critic_timestep(self, indices, stream: str, exits):
        gens = rng.sample_generators(self.seed, self.step, f"{stream}/score", indices, self.device)
        low, high = self.score_range(exits)
        shift = self.cfg.critic_timestep_shift if self.cfg.critic_timestep_shift is not None else self.cfg.timestep_shift
        t = score_timestep(gens, self.plan.shape[0], min_timestep=low, max_timestep=high,
                           num_train_timestep=self.cfg.num_train_timestep, shift=shift, device=self.device)
        return t, gens

    def logits(self, fake_t, real_t, t, cond):
        both = classify(self.critic, torch.cat([fake_t, real_t]), torch.cat([t, t]), torch.cat([cond, cond]))
        return both.chunk(2)

    def generator_loss(self, m: int):
        cfg, idx = self.cfg, self.micro_indices(m)
        prompts, real = self.real_batch(0, idx)
        x, exits = self.rollout(prompts, idx, "gen", grad=True)
        t, gens = self.critic_timestep(idx, "gen", exits)
        fake_t = self.scheduler.add_noise(x, self.noise(gens), t)
        real_t = self.scheduler.add_noise(real, self.noise(gens), t)
        fake, real_logit = self.logits(fake_t, real_t, t, self.encode(prompts))
        loss = generator_gan_loss(fake, real_logit, cfg.gan_g_weight, cfg.relativistic_discriminator)
        # (its own name: a step that trains both logs the critic's after, under gan_fake_logit)
        return loss, {"generator_fake_logit": fake.float().mean().detach()}

    def critic_loss(self, m: int):
        cfg, idx = self.cfg, self.micro_indices(m)
        prompts, real = self.real_batch(1, idx)
        with torch.no_grad():
            x, exits = self.rollout(prompts, idx, "critic", grad=False)
        t, gens = self.critic_timestep(idx, "critic", exits)
        noise = self.noise(gens)  # the same noise for both sides, as theirs
        fake_t, real_t = self.scheduler.add_noise(x, noise, t), self.scheduler.add_noise(real, noise, t)
        cond = self.encode(prompts)
        fake, real_logit = self.logits(fake_t, real_t, t, cond)
        loss = discriminator_gan_loss(fake, real_logit, cfg.gan_d_weight, cfg.relativistic_discriminator)
        logs = {"gan_real_logit": real_logit.float().mean().detach(), "gan_fake_logit": fake.float().mean().detach()}
        for name, weight, sigma, side, logit in (("r1", cfg.r1_weight, cfg.r1_sigma, real_t, real_logit),
                                                  ("r2", cfg.r2_weight, cfg.r2_sigma, fake_t, fake)):
            if weight > 0:  # finite-difference gradient penalty
                moved = classify(self.critic, side + sigma * self.noise(gens), t, cond)
                penalty = weight * (((moved - logit) / sigma) ** 2).mean()
                loss = loss + 0.5 * penalty
                logs[f"{name}_loss"] = penalty.detach()
        return loss, logs

    def warming_up(self) -> bool:
        return self.step < self.cfg.discriminator_warmup_steps

    def train_step(self) -> dict:
        cfg, logs = self.cfg, {}
        if cfg.discriminator_warmup_steps > 0 and self.step == cfg.discriminator_warmup_steps:
            self.critic_opt.state.clear()  # the warm-up's moments and step counts go (their new AdamW)
        if not self.warming_up() and self.step % cfg.dfake_gen_update_ratio == 0:
            trainable(self.critic, lambda name: False)
            trainable(self.generator, lambda name: True)
            logs.update(self.update(self.generator, self.gen_opt, self.generator_loss, cfg.max_grad_norm_generator,
                                    "generator"))
            logs["exit_index"] = self._last_exit
            if self.ema is not None:
                self.ema.update()
        trainable(self.generator, lambda name: False)
        warm = self.warming_up()  # warm-up: only the discriminator's blocks and head (not the register tokens)
        trainable(self.critic, lambda name: not warm or discriminator_param(name))
        logs.update(self.update(self.critic, self.critic_opt, self.critic_loss, cfg.max_grad_norm_critic, "critic"))
        trainable(self.generator, lambda name: True)
        trainable(self.critic, lambda name: True)
        return logs


def trainable(model: nn.Module, which) -> None:
    """Set requires_grad of `model`'s parameters by name (`which(name) -> bool`) on the parameters the optimiser
    holds. On one rank the model is one FSDP unit that stays gathered after a no-grad forward (the rollouts of
    the discriminator step): its gathered copies are what `named_parameters` lists then, so the model is
    resharded first (the next forward gathers again, with the flags set here)."""
    fsdp.reshard(model)
    for name, p in model.named_parameters():
        p.requires_grad_(which(name))
