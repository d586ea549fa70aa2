"""Which weights a request names, checked before any work: the checkpoint and --use-ema a user gave
(`check_weights_args`), and a model of the embedded zoo spelled out as its checkpoint and use_ema (`resolve_model`,
for an `ExtractConfig` of workbench/extract.py; workbench/commands/__init__.py `resolve_model` does the same for
the command line's arguments)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from workbench.errors import WorkbenchError

USE_EMA_ALONE = ("--use-ema picks the generator_ema weights of a Self-Forcing checkpoint; give it with "
                 "--checkpoint FILE (the embedded default, the zoo's DMD student, already runs its EMA weights)")


def run_files(wan_dir, weights_file, *extra) -> dict:
    """The stamps (models/files.py `file_stamps`) of the files a run's numbers come from and its store's labels
    hash: the weights (a checkpoint, or the folder's DiT), the DiT's config.json, the text encoder's weights, config
    and tokenizer, and `extra` (an image). Taken before the labels are hashed; `check_unchanged` after the
    loads refuses a run whose files changed in between (a store labelled with one file and filled from another)."""
    from models.files import file_stamps
    from models.wan.folder import wan_parts

    parts = wan_parts(wan_dir)
    return file_stamps(weights_file, Path(parts.dit) / "config.json", parts.text_encoder,
                       Path(parts.text_encoder).parent / "config.json", parts.tokenizer, *extra)


def check_weights_args(checkpoint: str | None, use_ema: bool, model: str | None = None,
                       trust_pickle: bool = False) -> None:
    """The checkpoint a user named, checked before any work: --use-ema needs a --checkpoint (alone it would name no
    weights of its own), and the checkpoint must be a file (a training run's checkpoint_model_N/ folder holds it as
    model.pt), and unless `trust_pickle`, one whose unpickling could run code is refused."""
    if use_ema and not checkpoint and model is None:
        raise WorkbenchError(USE_EMA_ALONE)
    if not checkpoint:
        return
    from workbench.progress import shell_word

    path = Path(checkpoint)
    if path.is_dir():
        inside = [p.name for p in sorted(path.glob("*.pt"))[:3]]
        hint = f"; it holds {', '.join(inside)}: give one of them" if inside else " with no .pt file in it"
        if not inside and any((path / name).is_file() for name in ("config.json", "model_index.json")):
            hint += f"; a model folder (config.json): give it as --wan-dir {shell_word(str(path))}"
        raise WorkbenchError(f"--checkpoint {checkpoint!r} is a directory{hint} (a training run's "
                             "checkpoint_model_N/ folder holds model.pt)")
    if not path.is_file():
        raise WorkbenchError(f"--checkpoint {checkpoint!r} " + (
            "is not a regular file (give a .pt or .safetensors file)" if path.exists() else "does not exist"))
    from models.files import check_unpickling, check_weights_file

    if path.name.endswith(".index.json"):  # (a folder's shard index: the folder is the model)
        raise WorkbenchError(f"--checkpoint {checkpoint!r} is the index of a model's weight shards, not a checkpoint "
                             f"file: give its folder as --wan-dir {shell_word(str(path.parent))}, or one .pt or "
                             ".safetensors file as --checkpoint")
    check_weights_file(path, "--checkpoint")  # truncated or a Git LFS pointer: said before any work
    if not trust_pickle:
        check_unpickling(path)  # (and a pickle that would run code: it was said after the text encoder had run)


# the sampler settings of a model that is not the zoo's (a zoo model's: its table's, models/wan/embedded.py ZOO)
SAMPLER_DEFAULTS = dict(sampler="causal_few_step", num_inference_steps=50, guidance_scale=5.0, negative_prompt="")


def resolve_model(cfg):
    """`cfg` with its zoo model (`model`, or the zoo's default when no weights are named) spelled out as the
    checkpoint and use_ema it means, and the sampler settings it left unset (None) as the model's own (the zoo
    table's: `ExtractConfig(model="teacher")` samples bidirectionally, 40 steps, CFG 4, as `--model teacher` does);
    the weights unchanged when wan_dir, checkpoint or use_ema name them, and when the embedded folder ships no
    default (then its own DiT runs)."""
    from models.errors import ModelInputError
    from models.wan.embedded import pick

    explicit = bool(cfg.wan_dir or cfg.checkpoint or cfg.use_ema)
    try:
        entry = pick(cfg.model, explicit)
    except ModelInputError as e:
        raise WorkbenchError(str(e)) from None
    # the sampler settings left unset (None): the zoo model's own, as its table gives them (ZOO), else the defaults
    # (negative_prompt is never None: "" is every zoo model's too)
    unset = {k: getattr(entry, k) if entry is not None else v for k, v in SAMPLER_DEFAULTS.items()
             if getattr(cfg, k) is None}
    cfg = dataclasses.replace(cfg, **unset)
    if entry is None:
        return cfg
    checkpoint = str(entry.checkpoint_path()) if entry.checkpoint else None
    if cfg.model is not None and (cfg.wan_dir or (explicit and (cfg.checkpoint, cfg.use_ema) != (checkpoint,
                                                                                                   entry.use_ema))):
        raise WorkbenchError(f"model {cfg.model!r} picks a model of the embedded zoo; give it without wan_dir, "
                             "checkpoint and use_ema (--wan-dir, --checkpoint, --use-ema)")
    return dataclasses.replace(cfg, model=entry.name, checkpoint=checkpoint, use_ema=entry.use_ema)


@contextlib.contextmanager
def wan_dir_hint(given_wan_dir: str | None, checkpoint: str | None):
    """Around loading a run's weights: when a checkpoint does not fit a model built from the embedded folder
    because no --wan-dir was given (the commonest cause), the error says so."""
    from models.errors import WeightsMismatchError

    try:
        yield
    except WeightsMismatchError as e:
        if checkpoint and not given_wan_dir:
            raise WorkbenchError(f"{e}. No --wan-dir was given, so the model was built from the embedded toy model's "
                                 "config.json: give --wan-dir with the Wan2.1 folder the checkpoint was trained on"
                                 ) from None
        raise


def check_wan_dir(wan_dir: Path) -> None:
    """A --wan-dir that is not a model folder, said before any work: missing, not a folder, or without config.json
    (a diffusers pipeline folder: without transformer/config.json)."""
    from models.wan.folder import is_pipeline

    if not wan_dir.exists():
        raise WorkbenchError(f"--wan-dir {str(wan_dir)!r} does not exist")
    if not wan_dir.is_dir():
        raise WorkbenchError(f"--wan-dir {str(wan_dir)!r} is a file; give the Wan2.1 folder (config.json, "
                             "diffusion_pytorch_model.safetensors, ...)")
    if is_pipeline(wan_dir):
        check_pipeline(wan_dir)
    elif not (wan_dir / "config.json").is_file():
        snapshots = sorted(p for p in (wan_dir / "snapshots").glob("*") if p.is_dir())
        hint = ""
        if snapshots:  # (the cache's models--ORG--NAME/: its downloads are in snapshots/HASH/)
            more = f" (it has {len(snapshots)})" if len(snapshots) > 1 else ""
            hint = f"; a Hugging Face cache's repository folder: give a snapshot, {str(snapshots[-1])!r}{more}"
        raise WorkbenchError(f"--wan-dir {str(wan_dir)!r} has no config.json (expected the official Wan2.1 folder, "
                             "or a diffusers pipeline folder with model_index.json)" + hint)
    check_model_files(wan_dir)


def check_pipeline(wan_dir: Path) -> None:
    """A diffusers pipeline folder of Wan2.1's text-to-video model: its transformer/config.json there, and one DiT
    (a Wan2.2 pipeline's second expert, transformer_2, is refused: its denoising steps switch between two)."""
    import json

    try:
        index = json.loads((wan_dir / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"--wan-dir {str(wan_dir)!r}: cannot read its model_index.json: {e}") from None
    if any(index.get("transformer_2") or [None]):
        raise WorkbenchError(f"--wan-dir {str(wan_dir)!r} is a two-expert pipeline (model_index.json names a "
                             "transformer_2, as Wan2.2's A14B models do); only Wan2.1's single DiT runs here")
    if not (wan_dir / "transformer" / "config.json").is_file():
        raise WorkbenchError(f"--wan-dir {str(wan_dir)!r} is a diffusers pipeline folder (model_index.json) without "
                             "transformer/config.json: its DiT is missing")


def check_model_files(wan_dir: Path) -> None:
    """The DiT weights of a model folder (the file, or every shard its index names): there and whole
    (models/files.py `check_weights_file`), before any work."""
    from models.files import check_weights_file, weight_files
    from models.wan.checkpoint import wan_weights_file

    for path in weight_files(wan_weights_file(wan_dir)):
        check_weights_file(path, "DiT weights")


def check_vae_file(wan_dir: Path) -> None:
    """The folder's VAE (Wan2.1_VAE.pth, or a pipeline's vae/) there and whole, for the commands that decode
    (before any work)."""
    from models.files import check_weights_file, weight_files
    from models.wan.folder import wan_parts

    for path in weight_files(wan_parts(wan_dir).vae):
        check_weights_file(path, "the VAE")
