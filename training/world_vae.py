"""Train the embedded default's tiny Wan VAE on the miniature world (models/world.py).

How it fits: the zoo (training/zoo.py) trains every DiT on latents of world videos; this module makes the VAE
those latents come from, and writes it as Wan's own `Wan2.1_VAE.pth`, so `models.wan.vae.WanVAE.from_file` (the
loader of the real VAE) reads it unchanged.

Architecture: Wan2.1's VAE (diffusers' `AutoencoderKLWan`) at toy widths, `WORLD_VAE`: base_dim 8 with
dim_mult (1, 1, 2, 4), so 8 channels at full and half resolution and 32 at the 12 x 16 latent grid, one
residual block per level, z_dim 16, the stride 4 x 8 x 8 with a causal first frame. The wide levels sit at the
low resolutions, where they cost little. It starts as a block-average codec (`pooling_init`).

Training, one step: `batch` world clips of `frames` = 1 + 4k pixel frames (a random prompt and scene, a random
first frame, a `crop` x `crop` window, mostly around the object), encoded; z = mu + sigma eps with a fixed posterior width
sigma = latent_noise x std(mu) (so the decoder learns to tolerate imperfect latents, as a DiT's are); the loss is

    mse(decode(z), x) + l1_weight * l1(decode(z), x) + kl_weight * mean(0.5 mu^2)

on pixels in [-1, 1] (the decoder's output unclamped): the KL to N(0, 1) of a posterior of fixed width, up to
constants. A learned width collapses at these sizes (the KL widens it until the decoder ignores the latent),
and so does a network this narrow at its high resolutions: the RMS norms over 4 channels leave too little of
the input for the optimiser to find, which is why the full-resolution levels have 8 channels. After training
the log-variance rows of `quant_conv` give each channel its training width. AdamW with a cosine learning-rate
decay; bf16 autocast on CUDA.

The latent statistics are the trained model's own: after training, the per-channel mean m and std s of mu
over held-out world videos are folded into the encoder's last conv (`quant_conv`, Wan's `conv1`) and the
decoder's first conv (`post_quant_conv`, `conv2`), both 1 x 1 x 1 convolutions: mu' = a mu + c with
a = LATENTS_STD / s and c = LATENTS_MEAN - a m (log-variance + 2 log a), and the decoder undoes it. Then Wan's
hard-coded normalisation (mu' - LATENTS_MEAN) / LATENTS_STD = (mu - m) / s gives latents of zero mean and unit
variance per channel, and decode(encode(x)) is unchanged.

Decoder only (`--decoder-from FILE`): start from a trained Wan2.1_VAE.pth and train only its decoder and
`post_quant_conv`; the encoder, `quant_conv` and so the folded statistics stay bitwise, so the latent space does
not move: world latents encoded before, and every DiT trained on them, stay valid, and only decoded pixels get
sharper. Nothing is refolded; the reported start is that file.

    python -m training.world_vae --out runs/zoo/vae                       # the full run (CPU: ~45 min, 1 thread)
    python -m training.world_vae --out runs/vae_dec --decoder-from data/zoo/Wan2.1_VAE.pth --steps 3000
    python -m training.world_vae --out /tmp/vae --steps 20 --eval-videos 2  # a smoke test

Writes into --out: Wan2.1_VAE.pth (float32, official key layout), vae_metrics.json (PSNR on held-out
81-frame videos, latent statistics, the run's settings and times), train_state.pt (for --resume; not shipped).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models import world
from models.wan.vae import LATENTS_MEAN, LATENTS_STD, SPATIAL_STRIDE, VAELayout, WanVAE, diffusers_to_wan_key

WORLD_VAE = VAELayout(base_dim=8, z_dim=16, dim_mult=(1, 1, 2, 4), num_res_blocks=1,
                      temporal_downsample=(False, True, True))
HELD_OUT_SEED = 7_000_000  # held-out scenes: world.scene_for(prompt, HELD_OUT_SEED + i), never drawn in training


@dataclass
class VAETrainConfig:
    base_dim: int = WORLD_VAE.base_dim
    dim_mult: str = ",".join(map(str, WORLD_VAE.dim_mult))
    steps: int = 3000
    batch: int = 4
    frames: int = 9  # pixel frames per clip, 1 + 4k
    crop: int = 64  # px, a multiple of 8 (<= 96)
    lr: float = 3e-4
    min_lr: float = 3e-5
    kl_weight: float = 1e-5
    latent_noise: float = 0.1  # the posterior's width, relative to the std of mu
    l1_weight: float = 0.2
    seed: int = 0
    eval_videos: int = 16  # held-out 81-frame videos for the PSNR and the latent statistics
    log_every: int = 50
    save_every: int = 250
    device: str = "cpu"
    decoder_from: str = ""  # a Wan2.1_VAE.pth: train only its decoder (module docstring, "Decoder only")


# ----------------------------------------------------------------------------------------------------------
# Model


def new_vae(layout: VAELayout = WORLD_VAE, seed: int = 0, pooling: bool = True):
    """A freshly initialised diffusers `AutoencoderKLWan` of `layout` (float32, CPU); with `pooling`, started
    as a block-average codec (`pooling_init`)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    model = AutoencoderKLWan(base_dim=layout.base_dim, z_dim=layout.z_dim, dim_mult=list(layout.dim_mult),
                            num_res_blocks=layout.num_res_blocks, temperal_downsample=list(layout.temporal_downsample),
                            latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    if pooling:
        narrowest = layout.base_dim * min(layout.dim_mult) // 2  # the decoder's last upsampler halves
        if narrowest < 4:
            raise ValueError(f"pooling_init needs >= 4 channels everywhere; {layout} has {narrowest}")
        pooling_init(model)
    return model


@torch.no_grad()
def pooling_init(model, const: float = 8.0, unit: float = 0.07, gain: float = 10.0, branch: float = 0.0,
                 spare: float = 0.1) -> None:
    """Start the autoencoder as a block-average codec: latent channels 0-2 = each 8 x 8 x 4 block's mean RGB,
    decoded by nearest upsampling, so the optimiser starts from a working (blurry) reconstruction. At these
    widths the stock init trains very slowly: every residual branch ends in an RMS norm over a few channels,
    and the decoder learns to ignore the latent before the encoder learns to fill it.

    The signal rides in channels 0-2, `gain` x the colour, next to a constant `gain` x `const` in channel 3 (a
    conv bias), so that the final RMS norms (which keep only each position's direction) pass it on nearly
    linearly: their gain is set so that one unit of colour becomes `unit` before the SiLU, whose slope there is
    1/2. Residual branches and the attention projections start at zero (the blocks are identities); shortcuts,
    resamplers and time convs copy or average channels; the first residual convs and attention q/k/v keep their
    random init. The stream's `gain` keeps the first optimiser steps, which move every zero-initialised weight
    at once, small against the signal."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanAttentionBlock, WanResample, WanResidualBlock

    def eye(w, tap, scale=1.0, rows=0):  # w[o, i, *k] = scale at `tap` for i = o - rows (channel copy)
        w.zero_()
        for o in range(rows, w.shape[0]):
            if o - rows < w.shape[1]:
                w[(o, o - rows, *tap)] = scale

    for m in model.modules():
        if isinstance(m, WanResidualBlock):
            m.conv2.weight.mul_(branch)
            m.conv2.bias.zero_()
            if not isinstance(m.conv_shortcut, torch.nn.Identity):
                eye(m.conv_shortcut.weight, (0, 0, 0))
                m.conv_shortcut.bias.zero_()
        elif isinstance(m, WanAttentionBlock):
            m.proj.weight.mul_(branch)
            m.proj.bias.zero_()
        elif isinstance(m, WanResample) and m.mode.startswith("downsample"):
            conv = m.resample[1]  # after ZeroPad2d((0, 1, 0, 1)), 3 x 3 stride 2: the top-left 2 x 2 is the block
            eye(conv.weight, (0, 0), 0.25)
            for tap in ((0, 1), (1, 0), (1, 1)):
                for c in range(conv.weight.shape[0]):
                    conv.weight[(c, c, *tap)] = 0.25
            conv.bias.zero_()
            if m.mode == "downsample3d":  # kernel 3 stride 2 over [last frame of the chunk before, frames]
                eye(m.time_conv.weight, (1, 0, 0), 0.5)
                for c in range(m.time_conv.weight.shape[0]):
                    m.time_conv.weight[c, c, 2, 0, 0] = 0.5
                m.time_conv.bias.zero_()
        elif isinstance(m, WanResample) and m.mode.startswith("upsample"):
            conv = m.resample[1]  # after nearest upsampling, 3 x 3 padding 1: copy the first out channels
            eye(conv.weight, (1, 1))
            conv.bias.zero_()
            if m.mode == "upsample3d":  # dim -> 2 dim: both new frames copy the current one
                w = m.time_conv.weight
                eye(w, (2, 0, 0))
                for c in range(w.shape[1]):
                    w[w.shape[1] + c, c, 2, 0, 0] = 1.0
                m.time_conv.bias.zero_()
    for part in (model.encoder, model.decoder):
        eye(part.conv_in.weight, (2, 1, 1), gain)  # causal: time tap 2 is the current frame
        part.conv_in.weight[:, 3:] = 0.0
        part.conv_in.bias.zero_()
        part.conv_in.bias[3] = gain * const
        channels = part.norm_out.gamma.shape[0]
        part.norm_out.gamma.fill_(unit * const / channels ** 0.5)
        w = part.conv_out.weight
        w.zero_()
        for c in range(3):
            w[c, c, 2, 1, 1] = 1.0 / (0.5 * unit)
        part.conv_out.bias.zero_()
    for conv in (model.quant_conv, model.post_quant_conv):
        eye(conv.weight, (0, 0, 0))
        conv.bias.zero_()
    # the rest of the latent (channels 3-15) and of the final features: small random weights, not zeros, or
    # they would stay at zero (encoder rows and decoder columns that are both zero get no gradient)
    z = model.config.z_dim
    g = torch.Generator().manual_seed(1234)
    for w, rows, cols, scale in ((model.encoder.conv_out.weight, slice(3, z), slice(None), spare),
                                 (model.decoder.conv_in.weight, slice(None), slice(3, None), spare * gain),
                                 (model.decoder.conv_out.weight, slice(None), slice(4, None), 1.0)):
        block = w[rows, cols]
        fan_in = block[0].numel()
        w[rows, cols] = torch.randn(block.shape, generator=g) * scale / fan_in ** 0.5


def start_model(cfg: "VAETrainConfig", layout: VAELayout):
    """The model training starts from: the block-average codec, or with decoder_from that file's VAE."""
    if not cfg.decoder_from:
        return new_vae(layout, cfg.seed)
    vae = WanVAE.from_file(cfg.decoder_from)
    model, found = vae.model.float(), vae.layout
    if (found.base_dim, tuple(found.dim_mult)) != (layout.base_dim, tuple(layout.dim_mult)):
        raise SystemExit(f"--decoder-from {cfg.decoder_from}: base_dim {found.base_dim}, dim_mult {found.dim_mult}; "
                         f"--base-dim / --dim-mult ask for {layout.base_dim}, {layout.dim_mult}")
    return model


def trained_parameters(model, cfg: "VAETrainConfig") -> list:
    """Every parameter, or with decoder_from the decoder's and post_quant_conv's (the rest frozen)."""
    if not cfg.decoder_from:
        return list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    params = [*model.decoder.parameters(), *model.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def wan_state_dict(model, layout: VAELayout = WORLD_VAE) -> dict[str, torch.Tensor]:
    """The diffusers model's weights under Wan's names (`Wan2.1_VAE.pth` layout), float32 on the CPU."""
    return {diffusers_to_wan_key(k, layout.num_res_blocks): v.detach().float().cpu().contiguous()
            for k, v in model.state_dict().items()}


def encode_moments(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, 3, T, H, W] -> (mu, logvar), each [B, 16, F, H/8, W/8], with gradient."""
    h = model._encode(x)  # quant_conv output: [B, 32, F, h, w]
    mu, logvar = h.chunk(2, dim=1)
    return mu, logvar.clamp(-30.0, 20.0)  # the range DiagonalGaussianDistribution uses


def decode_unclamped(model, z: torch.Tensor) -> torch.Tensor:
    """z [B, 16, F, h, w] -> pixels [B, 3, 1 + 4 (F - 1), 8h, 8w], not clamped (so that overshoots get a
    gradient), with the decoder's causal feature cache, one latent frame at a time as diffusers decodes."""
    cache = [None] * model._cached_conv_counts["decoder"]
    x = model.post_quant_conv(z)
    outs = []
    for i in range(x.shape[2]):
        outs.append(model.decoder(x[:, :, i:i + 1], feat_cache=cache, feat_idx=[0], first_chunk=i == 0))
    return torch.cat(outs, dim=2)


@torch.no_grad()
def set_posterior_width(model, sigma: torch.Tensor) -> None:
    """The log-variance rows of quant_conv output the constant log sigma^2 [16] (the width training used)."""
    z = len(sigma)
    model.quant_conv.weight[z:] = 0.0
    model.quant_conv.bias[z:] = 2 * torch.log(sigma.to(model.quant_conv.bias))


@torch.no_grad()
def fold_latent_stats(model, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Make Wan's constants the model's own statistics (module docstring): mean, std [16] of mu per channel."""
    mean, std = mean.double().cpu(), std.double().cpu()  # folded on the CPU in float64, copied back
    target_mean = torch.tensor(LATENTS_MEAN, dtype=torch.float64)
    target_std = torch.tensor(LATENTS_STD, dtype=torch.float64)
    a = target_std / std  # [16]
    c = target_mean - a * mean
    z = len(a)
    q = model.quant_conv  # [32, 32, 1, 1, 1]: rows 0..15 give mu, 16..31 give logvar
    w, b = q.weight.double().cpu(), q.bias.double().cpu()
    w[:z] *= a.view(-1, 1, 1, 1, 1)
    b[:z] = a * b[:z] + c
    b[z:] += 2 * torch.log(a)
    q.weight.copy_(w)
    q.bias.copy_(b)
    p = model.post_quant_conv  # [16, 16, 1, 1, 1]: decoder input z = (mu' - c) / a
    w, b = p.weight.double().cpu(), p.bias.double().cpu()
    b = b - (w[:, :, 0, 0, 0] @ (c / a))
    w = w / a.view(1, -1, 1, 1, 1)
    p.weight.copy_(w)
    p.bias.copy_(b)


# ----------------------------------------------------------------------------------------------------------
# Data


def world_clips(rng: np.random.Generator, batch: int, frames: int, crop: int, device="cpu",
                object_share: float = 0.7) -> torch.Tensor:
    """float32 [batch, 3, frames, crop, crop] in [-1, 1] on `device`: random world scenes from random first
    frames, drawn by `training.world_data.render_scenes` on the device, each cropped around the object (its
    centre at the middle frame, give or take a third of the crop) with probability `object_share`, else
    anywhere: the objects are the hard part and cover a few percent of a frame."""
    from training.world_data import render_scenes

    scenes, firsts, corners = [], [], []
    for _ in range(batch):
        prompt, seed = world.dataset_item(int(rng.integers(2 ** 31)), seed=int(rng.integers(2 ** 31)))
        scene = world.scene_for(prompt, seed)
        first = int(rng.integers(0, world.NUM_FRAMES))
        if rng.random() < object_share:
            cy, cx = scene.centre([first + frames // 2])[0]
            jitter = rng.integers(-(crop // 3), crop // 3 + 1, size=2)
            y = int(np.clip(cy % world.HEIGHT - crop / 2 + jitter[0], 0, world.HEIGHT - crop))
            x = int(np.clip(cx % world.WIDTH - crop / 2 + jitter[1], 0, world.WIDTH - crop))
        else:
            y, x = int(rng.integers(0, world.HEIGHT - crop + 1)), int(rng.integers(0, world.WIDTH - crop + 1))
        scenes.append(scene)
        firsts.append(first)
        corners.append((y, x))
    pixels = render_scenes(scenes, frames, device=device, first_frames=firsts)  # [B, 3, T, H, W]
    return torch.stack([p[:, :, y:y + crop, x:x + crop] for p, (y, x) in zip(pixels, corners)])


def held_out_videos(n: int, num_frames: int = world.NUM_FRAMES) -> tuple[list[str], torch.Tensor]:
    """(prompts, videos [n, 3, T, 96, 128]): whole world videos of scenes no training clip is drawn from,
    cycling through the prompt grid."""
    grid = world.prompt_grid()
    prompts = [grid[(7 * i) % len(grid)] for i in range(n)]
    videos = [world.world_video(p, HELD_OUT_SEED + i, num_frames)[0] for i, p in enumerate(prompts)]
    return prompts, torch.from_numpy(np.stack(videos))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of videos in [-1, 1], on the [0, 1] scale: 10 log10(1 / mse((a + 1) / 2, (b + 1) / 2))."""
    mse = float(((a.double() - b.double()) / 2).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-20))


@torch.no_grad()
def evaluate(vae: WanVAE, videos: torch.Tensor) -> dict:
    """Round trip of whole videos through the loader's encode/decode: PSNR (overall, worst video), and the
    per-channel mean and std of the normalised latents."""
    psnrs, latents = [], []
    for v in videos:
        z = vae.encode(v[None].to(vae.device))  # [1, F, 16, h, w], normalised
        latents.append(z.float().cpu())
        psnrs.append(psnr(vae.decode(z).cpu(), v[None]))
    z = torch.cat(latents)  # [n, F, 16, h, w]
    per_channel = z.transpose(0, 2).reshape(16, -1)
    return {"psnr_db": float(np.mean(psnrs)), "psnr_db_worst": float(np.min(psnrs)), "videos": len(psnrs),
            "latent_mean": per_channel.mean(1).tolist(), "latent_std": per_channel.std(1).tolist()}


@torch.no_grad()
def held_out_psnr(model, videos: torch.Tensor, device) -> float:
    """PSNR of the diffusers model's own round trip (posterior mean, decoder clamped) over `videos`."""
    mse = 0.0
    for v in videos:
        x = v[None].to(device)
        mse += float(((decode_unclamped(model, encode_moments(model, x)[0]).clamp(-1, 1) - x) / 2).pow(2).mean())
    return 10 * math.log10(len(videos) / max(mse, 1e-20))


@torch.no_grad()
def raw_latent_stats(model, videos: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std [16] of the posterior mean mu over `videos` (before any normalisation)."""
    mus = [encode_moments(model, v[None].to(device))[0].float().cpu() for v in videos]
    mu = torch.cat(mus).transpose(0, 1).reshape(16, -1)  # [16, n * F * h * w]
    return mu.mean(1), mu.std(1)


# ----------------------------------------------------------------------------------------------------------
# Training


def lr_at(cfg: VAETrainConfig, progress: float) -> float:
    """At `progress` in [0, 1] (of the steps, or of the time budget): linear warm-up over the first 10%, then
    cosine decay from lr to min_lr."""
    warm = 0.1
    if progress < warm:
        return cfg.lr * max(progress / warm, 1 / max(1, cfg.steps))
    p = (progress - warm) / (1 - warm)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, p)))


def layout_of(cfg: VAETrainConfig) -> VAELayout:
    mult = tuple(int(m) for m in cfg.dim_mult.split(","))
    return VAELayout(cfg.base_dim, WORLD_VAE.z_dim, mult, WORLD_VAE.num_res_blocks, WORLD_VAE.temporal_downsample)


def check(cfg: VAETrainConfig) -> None:
    if cfg.frames < 1 or (cfg.frames - 1) % 4:
        raise SystemExit(f"--frames {cfg.frames}: clips need 1 + 4k pixel frames (5, 9, 13, ...)")
    if cfg.crop % SPATIAL_STRIDE or not SPATIAL_STRIDE <= cfg.crop <= world.HEIGHT:
        raise SystemExit(f"--crop {cfg.crop}: a multiple of 8 between 8 and {world.HEIGHT}")
    if cfg.decoder_from and not Path(cfg.decoder_from).is_file():
        raise SystemExit(f"--decoder-from {cfg.decoder_from}: no such file (a Wan2.1_VAE.pth)")
    if cfg.steps < 1 or cfg.batch < 1 or cfg.eval_videos < 1:
        raise SystemExit("--steps, --batch and --eval-videos must be >= 1")


def _atomic_torch_save(obj, path: Path) -> None:
    from models.files import atomic_write

    atomic_write(path, lambda p: torch.save(obj, p))


def train(cfg: VAETrainConfig, out: Path, resume: bool = False, log=print, deadline: float | None = None) -> dict:
    """Train, fold the statistics, write Wan2.1_VAE.pth and vae_metrics.json into `out`; returns the metrics.
    `deadline` (time.perf_counter() seconds): stop then; the learning-rate schedule follows the time."""
    from tqdm.auto import tqdm

    check(cfg)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    layout = layout_of(cfg)
    model = start_model(cfg, layout).to(device).train()
    params = trained_parameters(model, cfg)  # (with decoder_from, also freezes the rest: once, not per step)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    state_path = out / "train_state.pt"
    step, history, spent = 0, [], 0.0
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history, spent = int(state["step"]), list(state["history"]), float(state["seconds"])
        log(f"resumed at step {step}")
    amp = device.type == "cuda"
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc="train VAE", unit="step")
    running = []
    while step < cfg.steps:
        rng = np.random.default_rng([cfg.seed, step, 0x7AE])  # a step's clips do not depend on resuming
        x = world_clips(rng, cfg.batch, cfg.frames, cfg.crop, device)
        progress = step / cfg.steps if deadline is None else max(
            step / cfg.steps, (time.perf_counter() - t0) / max(1e-9, deadline - t0))
        if progress >= 1:
            log(f"time budget reached at step {step} of {cfg.steps}")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, progress)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            mu, _ = encode_moments(model, x)
            eps = torch.randn(mu.shape, generator=torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + step),
                              device=device)
            z = mu + cfg.latent_noise * mu.detach().float().std() * eps
            recon = decode_unclamped(model, z).float()
        mse = torch.mean((recon - x) ** 2)
        l1 = torch.mean((recon - x).abs())
        kl = 0.5 * torch.mean(mu.float() ** 2)
        loss = mse + cfg.l1_weight * l1 + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        running.append((float(mse.detach()), float(kl.detach())))
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            m, k = np.mean(running, axis=0)
            running = []
            row = {"step": step, "mse": float(m), "train_psnr_db": 10 * math.log10(4 / max(m, 1e-20)), "kl": float(k),
                   "lr": opt.param_groups[0]["lr"], "seconds": spent + time.perf_counter() - t0}
            history.append(row)
            bar.set_postfix(psnr=f"{row['train_psnr_db']:.2f}", kl=f"{k:.3g}")
            log(f"step {step}: mse {m:.5f} (PSNR {row['train_psnr_db']:.2f} dB) kl {k:.4g} lr {row['lr']:.2e}")
        if step % cfg.save_every == 0 and step < cfg.steps:
            _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                "history": history, "seconds": spent + time.perf_counter() - t0}, state_path)
    bar.close()
    seconds = spent + time.perf_counter() - t0
    _atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "history": history, "seconds": seconds}, state_path)
    return finish(model, cfg, out, history, seconds, log, steps=step)


def finish(model, cfg: VAETrainConfig, out: Path, history: list, seconds: float, log=print, steps: int = 0) -> dict:
    """Fold the held-out latent statistics into the model, write Wan2.1_VAE.pth, evaluate it through the
    loader, write vae_metrics.json. Should training have made the held-out reconstruction worse than the
    block-average start, the start is kept (and the metrics say so)."""
    device = torch.device(cfg.device)
    layout = layout_of(cfg)
    model.eval()
    _, fold_videos = held_out_videos(cfg.eval_videos)
    start = start_model(cfg, layout).to(device).eval()
    trained_db, start_db = (round(held_out_psnr(m, fold_videos, device), 2) for m in (model, start))
    if trained_db < start_db:
        log(f"training left the VAE at {trained_db} dB on held-out videos, below its start ({start_db} dB): "
            f"keeping the start")
        model = start
    mean, std = raw_latent_stats(model, fold_videos, device)
    if not cfg.decoder_from:  # (decoder only: the file's statistics are folded already and must not move)
        set_posterior_width(model, cfg.latent_noise * std)
        fold_latent_stats(model, mean, std)
    sd = wan_state_dict(model, layout)
    _atomic_torch_save(sd, out / "Wan2.1_VAE.pth")
    vae = WanVAE.from_file(out / "Wan2.1_VAE.pth", device=device)
    # a second held-out set for the reported numbers (the statistics were fitted on the first)
    _, test_videos = held_out_videos(2 * cfg.eval_videos)
    metrics = evaluate(vae, test_videos[cfg.eval_videos:])
    metrics.update(layout=asdict(layout), config=asdict(cfg), train_seconds=seconds, steps=steps, history=history,
                   fit_psnr_db={"trained": trained_db, "start": start_db, "kept": "start" if model is start else "trained"},
                   parameters=sum(v.numel() for v in sd.values()), raw_mu_mean=mean.tolist(), raw_mu_std=std.tolist())
    from models.files import atomic_write

    atomic_write(out / "vae_metrics.json", lambda p: Path(p).write_text(json.dumps(metrics, indent=1) + "\n"))
    log(f"wrote {out / 'Wan2.1_VAE.pth'}: held-out PSNR {metrics['psnr_db']:.2f} dB (worst video "
        f"{metrics['psnr_db_worst']:.2f}), normalised latents mean in [{min(metrics['latent_mean']):.2f}, "
        f"{max(metrics['latent_mean']):.2f}], std in [{min(metrics['latent_std']):.2f}, {max(metrics['latent_std']):.2f}]")
    return metrics


def main(argv=None) -> int:
    d = VAETrainConfig()
    ap = argparse.ArgumentParser(prog="python -m training.world_vae", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder")
    for name, value in asdict(d).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                        help=f"(default: {value})")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1; tiny convs gain little from more)")
    ap.add_argument("--resume", action="store_true", help="continue from --out/train_state.pt")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = VAETrainConfig(**{k: getattr(args, k) for k in asdict(d)})
    train(cfg, Path(args.out), resume=args.resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
