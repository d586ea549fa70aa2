"""Train the embedded default's tiny Wan VAE on the miniature world (models/world.py).

How it fits: the zoo (training/zoo.py) trains every DiT on latents of world videos; this module makes the VAE
those latents come from, and writes it as Wan's own `Wan2.1_VAE.pth`, so `models.wan.vae.WanVAE.from_file` (the
loader of the real VAE) reads it unchanged.

Architecture: Wan2.1's VAE (diffusers' `AutoencoderKLWan`) at toy widths, `WORLD_VAE`: base_dim 8 with
dim_mult (1, 1, 2, 4), so 8 channels at full and half resolution and 32 at the 12 x 16 latent grid, one
residual block per level, z_dim 16, the stride 4 x 8 x 8 with a causal first frame. The wide levels sit at the
low resolutions, where they cost little. It starts as a block-average codec (`pooling_init`). The model's
pieces (building, the trained parameters, the official state dict, folding the statistics) are in
training/world_vae_model.py.

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

Further training (`--init-from FILE`): start every weight from a trained Wan2.1_VAE.pth (for example on a world
whose rendering changed) and train all of them; the latent space moves, so the statistics are measured and folded
again at the end, on top of the file's (the fold is an affine map, so folds compose).

    python -m training.world_vae --out runs/zoo/vae                       # the full run (CPU: ~45 min, 1 thread)
    python -m training.world_vae --out runs/vae_dec --decoder-from data/zoo/Wan2.1_VAE.pth --steps 3000
    python -m training.world_vae --out runs/vae_more --init-from data/zoo/Wan2.1_VAE.pth --steps 1500
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
from models.files import atomic_torch_save
from models.wan.vae import SPATIAL_STRIDE, VAELayout, WanVAE
from training.world_vae_model import (WORLD_VAE, decode_unclamped, encode_moments, fold_latent_stats,
                                      set_posterior_width, start_model, trained_parameters, wan_state_dict)

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
    eval_videos: int = 16  # held-out world videos for the PSNR and the latent statistics
    eval_frames: int = world.NUM_FRAMES  # pixel frames of each held-out video (81; fewer only for quick tests)
    log_every: int = 50
    save_every: int = 250
    device: str = "cpu"
    decoder_from: str = ""  # a Wan2.1_VAE.pth: train only its decoder (module docstring, "Decoder only")
    init_from: str = ""  # a Wan2.1_VAE.pth: train all of it further (module docstring, "Further training")


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
    if cfg.decoder_from and cfg.init_from:
        raise SystemExit("--decoder-from and --init-from: give one (decoder only, or every weight further)")
    for flag, path in (("--decoder-from", cfg.decoder_from), ("--init-from", cfg.init_from)):
        if path and not Path(path).is_file():
            raise SystemExit(f"{flag} {path}: no such file (a Wan2.1_VAE.pth)")
    if cfg.steps < 1 or cfg.batch < 1 or cfg.eval_videos < 1:
        raise SystemExit("--steps, --batch and --eval-videos must be >= 1")
    if cfg.eval_frames < 1 or (cfg.eval_frames - 1) % 4:
        raise SystemExit(f"--eval-frames {cfg.eval_frames}: held-out videos need 1 + 4k pixel frames (5, ..., 81)")


def train(cfg: VAETrainConfig, out: Path, resume: bool = False, log=print, deadline: float | None = None) -> dict:
    """Train, fold the statistics, write Wan2.1_VAE.pth and vae_metrics.json into `out`; returns the metrics.
    `deadline` (time.perf_counter() seconds): stop then; the learning-rate schedule follows the time."""
    from workbench.progress import progress_bar

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
    bar = progress_bar(total=cfg.steps, initial=step, desc="train VAE", unit="step")
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
            atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                "history": history, "seconds": spent + time.perf_counter() - t0}, state_path)
    bar.close()
    seconds = spent + time.perf_counter() - t0
    atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "history": history, "seconds": seconds}, state_path)
    return finish(model, cfg, out, history, seconds, log, steps=step)


def finish(model, cfg: VAETrainConfig, out: Path, history: list, seconds: float, log=print, steps: int = 0) -> dict:
    """Fold the held-out latent statistics into the model, write Wan2.1_VAE.pth, evaluate it through the
    loader, write vae_metrics.json. Should training have made the held-out reconstruction worse than the
    block-average start, the start is kept (and the metrics say so)."""
    device = torch.device(cfg.device)
    layout = layout_of(cfg)
    model.eval()
    _, fold_videos = held_out_videos(cfg.eval_videos, cfg.eval_frames)
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
    atomic_torch_save(sd, out / "Wan2.1_VAE.pth")
    vae = WanVAE.from_file(out / "Wan2.1_VAE.pth", device=device)
    # a second held-out set for the reported numbers (the statistics were fitted on the first)
    _, test_videos = held_out_videos(2 * cfg.eval_videos, cfg.eval_frames)
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
    from workbench.help_text import HelpFormatter  # (--help fitted to the terminal)

    d = VAETrainConfig()
    ap = argparse.ArgumentParser(prog="python -m training.world_vae", description=__doc__,
                                 formatter_class=HelpFormatter)
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
