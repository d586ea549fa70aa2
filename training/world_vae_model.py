"""The world VAE's model pieces: the Wan2.1 VAE at toy widths (`WORLD_VAE`), its block-average start, the
parameters a run trains, the official state dict, the moments of the encoder and the folding of the latent
statistics into the 1 x 1 x 1 convolutions around the latent.

How it fits: training/world_vae.py trains the model these functions build and save; its docstring gives the
recipe (architecture, loss, the folded statistics, the decoder-only mode). Split from it to keep each file short.
"""

from __future__ import annotations

import torch

from models.wan.vae import LATENTS_MEAN, LATENTS_STD, VAELayout, WanVAE, diffusers_to_wan_key

WORLD_VAE = VAELayout(base_dim=8, z_dim=16, dim_mult=(1, 1, 2, 4), num_res_blocks=1,
                      temporal_downsample=(False, True, True))


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
    """The model training starts from: the block-average codec, or with decoder_from / init_from that file's VAE."""
    path = cfg.decoder_from or cfg.init_from
    if not path:
        return new_vae(layout, cfg.seed)
    vae = WanVAE.from_file(path)
    model, found = vae.model.float(), vae.layout
    if (found.base_dim, tuple(found.dim_mult)) != (layout.base_dim, tuple(layout.dim_mult)):
        flag = "--decoder-from" if cfg.decoder_from else "--init-from"
        raise SystemExit(f"{flag} {path}: base_dim {found.base_dim}, dim_mult {found.dim_mult}; "
                         f"--base-dim / --dim-mult ask for {layout.base_dim}, {layout.dim_mult}")
    return model


def trained_parameters(model, cfg: "VAETrainConfig") -> list:
    """Every parameter, or with decoder_from the decoder's and post_quant_conv's (the rest frozen). (A VAE read from
    a file comes frozen, for inference: the trained ones are unfrozen here.)"""
    if not cfg.decoder_from:
        return [p.requires_grad_(True) for p in model.parameters()]
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
