"""The embedded default: a small Wan (the zoo trained on the miniature world) that ships with the repo and runs a
whole rollout on a CPU.

It keeps the real model's frame structure (21 latent frames in chunks of 3, text_len 512, the RoPE split
rule, per-frame modulation) at toy width: 6 layers, 4 heads of 32 channels, a 12 x 16 latent (6 x 8 = 48
tokens per frame, 96 x 128 pixels after the VAE). `data/embedded/` is an official-format Wan folder, so it
loads through exactly the code path of the real weights:

    config.json, diffusion_pytorch_model.safetensors   this DiT (bf16, trained here: see below)
    models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/  a tiny umT5 encoder and tokenizer (data/embedded/make_text_and_vae.py)
    Wan2.1_VAE.pth                                      a tiny Wan VAE trained on the world (training/world_vae.py)
    checkpoints/                                        the zoo's students, ZOO.md and zoo_report.json

The DiT is the zoo's "Wan" teacher (`ZOO` below; docs/zoo.md): bidirectional, trained here by flow matching on
the miniature world (models/world.py) with `python3 -m training.zoo` (configs/zoo_teacher.yaml), shipped with the
world VAE it was trained on; `checkpoints/ZOO.md` and `checkpoints/zoo_report.json` say how. The students of
the zoo ship beside it as Self-Forcing checkpoints. The seeded init the zoo starts from is
`make_embedded_state_dict` (`python -m models.wan.embedded --init` writes it over data/embedded's DiT).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from models.errors import ModelInputError
from models.wan.config import VideoGeometry, WanConfig

# the repository's data/embedded (an install without -e, which copies only the packages, can name a checkout's with
# WORKBENCH_EMBEDDED_DIR)
EMBEDDED_DIR = Path(os.environ.get("WORKBENCH_EMBEDDED_DIR")
                    or Path(__file__).resolve().parents[2] / "data" / "embedded")
NOT_INSTALLED = ("the embedded default model is not where this install looks for it ({}): it lives in the "
                 "repository's data/embedded, which `pip install` without -e does not copy; install from a checkout "
                 "with `pip install -e .`, or set WORKBENCH_EMBEDDED_DIR to a checkout's data/embedded, or name a "
                 "model folder with --wan-dir")


def require_embedded_dir() -> Path:
    """EMBEDDED_DIR, or a clear error (before any work) when this install has no data/embedded."""
    if not EMBEDDED_DIR.is_dir():
        raise ModelInputError(NOT_INSTALLED.format(EMBEDDED_DIR))
    return EMBEDDED_DIR


EMBEDDED_CONFIG = WanConfig(dim=128, ffn_dim=384, num_heads=4, num_layers=6, text_dim=64)
EMBEDDED_GEOMETRY = VideoGeometry(num_frames=21, latent_height=12, latent_width=16, num_frame_per_block=3)
EMBEDDED_VIDEO_SIZE = (96, 128)  # pixels; recorded in config.json as video_size (models.wan.config.default_video_size)
EMBEDDED_SEED = 20251128


# ------------------------------------------------------------------------------------------------------
# The zoo: the models trained on the miniature world (training/zoo.py), by short name


@dataclass(frozen=True)
class ZooModel:
    """One model of the embedded zoo and how it samples. Every zoo model is the DiT of `EMBEDDED_DIR` (config,
    text encoder, VAE) with, for the students, the weights of a Self-Forcing checkpoint on top."""

    name: str
    description: str
    checkpoint: str | None  # relative to the zoo folder; None: the folder's own DiT (the teacher)
    use_ema: bool  # load generator_ema instead of generator
    sampler: str  # models.common.rollout.SAMPLERS
    num_inference_steps: int = 50  # the multi-step samplers
    guidance_scale: float = 5.0  # the multi-step samplers (v = v_u + g (v_c - v_u))
    negative_prompt: str = ""  # what the CFG samplers subtract (the models were trained with "" dropped in)

    def checkpoint_path(self, folder: Path | None = None) -> Path | None:
        """The checkpoint file in `folder` (default: the embedded folder); None for the teacher."""
        return None if self.checkpoint is None else Path(folder or EMBEDDED_DIR) / self.checkpoint

    def shipped(self, folder: Path | None = None) -> bool:
        """Whether `folder` (default: the embedded folder) holds this model: its checkpoint, or for the teacher
        the zoo's marker file (before the zoo ships, the folder's DiT is not the world teacher)."""
        path = self.checkpoint_path(folder)
        return path.is_file() if path is not None else (Path(folder or EMBEDDED_DIR) / ZOO_MARKER).is_file()

    def require_shipped(self) -> None:
        """A clear error, before any work, when the embedded folder does not hold this model."""
        require_embedded_dir()
        if not self.shipped():
            missing = self.checkpoint_path() or EMBEDDED_DIR / ZOO_MARKER
            raise ModelInputError(f"the zoo's {self.name!r} model is not in data/embedded yet ({missing} is "
                                  "missing); `python -m training.zoo` trains the zoo")


ZOO_MARKER = "checkpoints/ZOO.md"  # written with the zoo: its presence says the folder's DiT is the world teacher
ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("teacher", "the 'Wan' teacher: bidirectional, flow matching, multi-step sampler with CFG",
             None, False, "bidirectional", num_inference_steps=40, guidance_scale=4.0),
    ZooModel("df", "causal diffusion-forcing student (CausVid-style baseline), multi-step with CFG",
             "checkpoints/diffusion_forcing.pt", True, "causal_multi_step_cfg", num_inference_steps=40,
             guidance_scale=4.0),
    ZooModel("ode", "causal student regressed on the teacher's ODE pairs, 4 steps",
             "checkpoints/ode_init.pt", False, "causal_few_step"),
    ZooModel("dmd", "the Self-Forcing DMD student (EMA), 4 warped steps",
             "checkpoints/self_forcing_dmd.pt", True, "causal_few_step"),
    ZooModel("sid", "the Self-Forcing SiD student (EMA), 4 warped steps",
             "checkpoints/self_forcing_sid.pt", True, "causal_few_step"),
)}
DEFAULT_MODEL = "dmd"


def zoo_model(name: str) -> ZooModel:
    """The zoo entry called `name`; a clear error naming the known ones otherwise."""
    if name not in ZOO:
        raise ModelInputError(f"unknown model {name!r}; the embedded zoo has {', '.join(ZOO)}")
    return ZOO[name]


def default_model(folder: Path | None = None) -> ZooModel | None:
    """The model that commands run when none is named: the Self-Forcing DMD student once the zoo ships it in
    `folder`; None before: the folder's own DiT with the causal few-step sampler (in a zoo that ships only the
    teacher, the teacher's weights under the students' sampler, so that every causal mode runs by default;
    `--model teacher` samples it as trained)."""
    m = ZOO[DEFAULT_MODEL]
    return m if m.shipped(folder) else None


def pick(name: str | None, weights_named: bool) -> ZooModel | None:
    """The zoo model a request means: the one called `name`; without a name, the default when no weights are
    named otherwise (`weights_named`: a folder, checkpoint or EMA flag), else None. Clear errors, before any work,
    for an unknown name or a model the embedded folder does not hold."""
    if not weights_named:
        require_embedded_dir()
    entry = zoo_model(name) if name else None if weights_named else default_model()
    if entry is not None:
        entry.require_shipped()
    return entry


def make_embedded_state_dict(seed: int = EMBEDDED_SEED) -> dict:
    """Seeded weights in the official layout. Linear layers keep PyTorch's default init; the q/k norm gains are
    drawn around 2 so that attention is peaked enough to show structure rather than a uniform haze."""
    from models.wan.model import WanModel

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


def write_embedded(folder: Path = EMBEDDED_DIR, checkpoint: str | Path | None = None, use_ema: bool = False) -> None:
    """Write the DiT of `folder`: the seeded init, or the generator (EMA) weights of a Self-Forcing-format
    training checkpoint in bf16."""
    from models.wan.checkpoint import read_self_forcing, save_wan_folder

    if checkpoint is None:
        state = make_embedded_state_dict()
    else:
        state = {k: v.to(torch.bfloat16) for k, v in
                 read_self_forcing(checkpoint, "generator_ema" if use_ema else "generator").items()}
    save_wan_folder(folder, EMBEDDED_CONFIG, state, video_size=EMBEDDED_VIDEO_SIZE)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m models.wan.embedded", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--init", action="store_true", help="write the seeded init (where training starts)")
    how.add_argument("--from-checkpoint", metavar="MODEL_PT", help="write the weights of a training checkpoint")
    ap.add_argument("--use-ema", action="store_true", help="with --from-checkpoint: its generator_ema weights")
    args = ap.parse_args()
    write_embedded(checkpoint=args.from_checkpoint, use_ema=args.use_ema)
    print(f"wrote {EMBEDDED_DIR}")
