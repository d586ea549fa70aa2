"""The embedded default: a small causal Wan that ships with the repo and runs a whole rollout on a CPU.

It keeps the real model's frame structure (21 latent frames in chunks of 3, text_len 512, the RoPE split
rule, per-frame modulation) at toy width: 6 layers, 4 heads of 32 channels, a 12 x 16 latent (6 x 8 = 48
tokens per frame, 96 x 128 pixels after the VAE). `data/embedded/` is an official-format Wan folder, so it
loads through exactly the code path of the real weights:

    config.json, diffusion_pytorch_model.safetensors   this DiT (seeded weights, bf16; `python -m models.embedded`)
    models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/  a tiny umT5 encoder and tokenizer (data/embedded/make_text_and_vae.py)
    Wan2.1_VAE.pth                                      a tiny Wan VAE
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.config import VideoGeometry, WanConfig

EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "data" / "embedded"
EMBEDDED_CONFIG = WanConfig(dim=128, ffn_dim=384, num_heads=4, num_layers=6, text_dim=64)
EMBEDDED_GEOMETRY = VideoGeometry(num_frames=21, latent_height=12, latent_width=16, num_frame_per_block=3)
EMBEDDED_SEED = 20251128


def make_embedded_state_dict(seed: int = EMBEDDED_SEED) -> dict:
    """Seeded weights in the official layout. Linear layers keep PyTorch's default init; the q/k norm gains are
    drawn around 2 so that attention is peaked enough to show structure rather than a uniform haze."""
    from models.wan import WanModel

    torch.manual_seed(seed)
    model = WanModel(EMBEDDED_CONFIG, causal=True)
    with torch.no_grad():
        for block in model.blocks:
            for attn in (block.self_attn, block.cross_attn):
                attn.norm_q.weight.uniform_(1.0, 3.0)
                attn.norm_k.weight.uniform_(1.0, 3.0)
            block.norm3.weight.normal_(1.0, 0.1)
            block.norm3.bias.normal_(0.0, 0.1)
    return {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}


def write_embedded(folder: Path = EMBEDDED_DIR) -> None:
    from models.checkpoint import save_wan_folder

    save_wan_folder(folder, EMBEDDED_CONFIG, make_embedded_state_dict())


if __name__ == "__main__":
    write_embedded()
    print(f"wrote {EMBEDDED_DIR}")
