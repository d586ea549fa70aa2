"""Where a Wan model folder keeps its parts: the DiT (config.json and weights), the umT5 text encoder, its tokenizer
and the VAE. Two layouts are read as they are:

- the official Wan2.1 folder (Wan-AI/Wan2.1-T2V-1.3B): config.json, diffusion_pytorch_model.safetensors (or the
  index of its shards), models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ and Wan2.1_VAE.pth side by side; a
  diffusers transformer/ folder with the official files linked beside its config.json reads the same way;
- a diffusers pipeline folder (model_index.json; Wan-AI/Wan2.1-T2V-1.3B-Diffusers): transformer/ (the DiT),
  text_encoder/ (transformers' UMT5EncoderModel), tokenizer/ and vae/ (diffusers' AutoencoderKLWan); each
  part's weights one safetensors file or the index of its shards, as save_pretrained writes them.

The loaders (models/wan/checkpoint.py, text_encoder.py, vae.py) take either layout's key names; everything that
needs a part's file asks `wan_parts` rather than spelling its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

T5_NAME = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_SUBDIR = Path("google") / "umt5-xxl"
VAE_NAME = "Wan2.1_VAE.pth"
PIPELINE_INDEX = "model_index.json"  # what makes a folder a diffusers pipeline
PIPELINE_T5 = ("model.safetensors", "model.safetensors.index.json")  # text_encoder/'s weights, one file or shards
PIPELINE_VAE = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")


@dataclass(frozen=True)
class WanParts:
    folder: Path  # the folder as it was named
    layout: str  # "official" or "diffusers pipeline"
    dit: Path  # the folder of the DiT's config.json and weights
    text_encoder: Path  # the umT5 encoder's weights: one file, or the index of its shards
    tokenizer: Path  # the tokenizer's folder
    vae: Path  # the VAE's weights

    def describe(self, part: str) -> str:
        """How a missing part is named in an error: its path, and where this layout keeps it."""
        where = {"official": {"text_encoder": f"the Wan folder's umT5 encoder, {T5_NAME}",
                              "tokenizer": f"the Wan folder's {TOKENIZER_SUBDIR.as_posix()}/",
                              "vae": f"the Wan folder's {VAE_NAME}"},
                 "diffusers pipeline": {"text_encoder": f"the pipeline's text_encoder/{PIPELINE_T5[0]} or "
                                                        f"text_encoder/{PIPELINE_T5[1]}",
                                        "tokenizer": "the pipeline's tokenizer/",
                                        "vae": f"the pipeline's vae/{PIPELINE_VAE[0]} or vae/{PIPELINE_VAE[1]}"},
                 }[self.layout]
        return f"{str(getattr(self, part))!r} ({where[part]})"


def is_pipeline(folder) -> bool:
    """A diffusers pipeline folder: model_index.json and no config.json of its own."""
    folder = Path(folder)
    return (folder / PIPELINE_INDEX).is_file() and not (folder / "config.json").is_file()


def present(path: Path) -> bool:
    """A part's file is there: a file, or a link even if broken (its loader then says the link is broken, as a
    Hugging Face cache whose blob is gone has it, rather than that the file is missing)."""
    return path.is_file() or path.is_symlink()


def wan_parts(folder) -> WanParts:
    """The paths of a model folder's parts, in whichever layout it has (nothing is checked to exist)."""
    folder = Path(folder)
    if not is_pipeline(folder):
        return WanParts(folder, "official", folder, folder / T5_NAME, folder / TOKENIZER_SUBDIR, folder / VAE_NAME)
    return WanParts(folder, "diffusers pipeline", folder / "transformer",
                    weights_in(folder / "text_encoder", PIPELINE_T5), folder / "tokenizer",
                    weights_in(folder / "vae", PIPELINE_VAE))


def weights_in(part: Path, names: tuple[str, str]) -> Path:
    """A part's weights: its one file, else the index of its shards (the one file, named in errors, when there is
    neither; a broken link counts as there, so that its loader names it)."""
    return next((part / n for n in names if present(part / n)), part / names[0])


def folder_name(folder) -> str:
    """A model folder's name for titles: its own (resolved: `.` names the folder it is), or for a Hugging Face
    cache snapshot (models--ORG--NAME/snapshots/HASH) the repository's ORG/NAME."""
    folder = Path(folder).absolute()  # (pathlib drops a trailing slash and inner `.`s)
    folder = folder.resolve() if folder.name == ".." else folder
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name[len("models--"):].replace("--", "/")
    return folder.name


def dit_dir(folder) -> Path:
    """The folder of a model folder's DiT config.json and weights: itself, or a pipeline's transformer/."""
    return wan_parts(folder).dit
