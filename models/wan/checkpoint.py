"""Checkpoint IO for the Wan DiT: the official Wan2.1 folder, Self-Forcing `.pt` files, and diffusers' layout.

Formats read (and written, for tests and the embedded default):
- official Wan2.1 folder: `config.json` + `diffusion_pytorch_model.safetensors`, or a sharded
  `diffusion_pytorch_model.safetensors.index.json` with its shards;
- Self-Forcing `.pt`: a dict with `generator`, `generator_ema` and/or `critic` (ODE init: `generator` or
  `model`), each a state dict whose keys carry the wrapper's `model.` prefix; FSDP, activation-checkpoint
  and torch.compile prefixes are stripped;
- diffusers `WanTransformer3DModel` state dicts (converted both ways by `to_diffusers` / `from_diffusers`), and
  a diffusers pipeline folder's transformer/ (models/wan/folder.py says where each layout keeps its parts).

Models are built on the meta device and loaded with `load_state_dict(..., assign=True)`, so a 1.3B model is
never randomly initialised and its weights are never held twice. Checkpoints are untrusted input: `.pt`
files are read with `torch.load(weights_only=True)`; a file that needs arbitrary unpickling is refused
unless `trust_pickle=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.errors import CheckpointError
from models.files import (atomic_torch_save, atomic_write, check_tensor_shapes, load_tensors, sha256_file,  # noqa: F401
                          shard_files, weight_files, weights_sha256)  # (sha256_file and the last two: re-exported)
from models.wan.config import WanConfig
from models.wan.folder import dit_dir, present, weights_in
from models.wan.model import WanModel

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
SELF_FORCING_KEYS = ("generator", "generator_ema", "critic")

# official Wan names -> diffusers names (applied in order, as substrings); the inverse is derived
_TO_DIFFUSERS = [
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
    (".self_attn.", ".attn1."),
    (".cross_attn.", ".attn2."),
    (".o.", ".to_out.0."),
    (".q.", ".to_q."),
    (".k.", ".to_k."),
    (".v.", ".to_v."),
    (".modulation", ".scale_shift_table"),
    (".ffn.0.", ".ffn.net.0.proj."),
    (".ffn.2.", ".ffn.net.2."),
    (".norm3.", ".norm2."),  # Wan's cross-attention norm is norm3, diffusers' is norm2 (FFN norms have no weights)
]


def to_diffusers(state_dict: dict) -> dict:
    """Official Wan key names -> diffusers `WanTransformer3DModel` key names."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for a, b in _TO_DIFFUSERS:
            new = new.replace(a, b)
        out[new] = value
    return out


def from_diffusers(state_dict: dict) -> dict:
    """diffusers `WanTransformer3DModel` key names -> official Wan key names."""
    out = {}
    for key, value in state_dict.items():
        new = key
        for a, b in reversed(_TO_DIFFUSERS):
            new = new.replace(b, a)
        out[new] = value
    return out


def strip_prefixes(state_dict: dict, prefix: str = "model.") -> dict:
    """Remove the Self-Forcing wrapper prefix and FSDP / checkpoint / compile wrapper names."""
    out = {}
    for key, value in state_dict.items():
        for wrapper in WRAPPER_PREFIXES:
            key = key.replace(wrapper, "")
        if key.startswith("module."):  # DistributedDataParallel's wrapper, saved whole
            key = key[len("module.") :]
        if prefix and key.startswith(prefix):
            key = key[len(prefix) :]
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------------------
# Reading files


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    return path


def wan_weights_file(folder: str | Path) -> Path:
    """The file that names a Wan folder's DiT weights (a diffusers pipeline's in transformer/):
    `diffusion_pytorch_model.safetensors`, else the index of its shards; a clear error when the folder has neither."""
    weights = weights_in(dit_dir(folder), (WEIGHTS_NAME, INDEX_NAME))
    if present(weights):
        return weights
    raise CheckpointError(f"Wan folder {str(folder)!r} has no DiT weights: neither {WEIGHTS_NAME} nor the index of "
                          f"its shards ({INDEX_NAME})")


def read_wan_folder(folder: str | Path) -> tuple[WanConfig, dict]:
    """(config, state dict) of an official Wan2.1 folder, or a diffusers pipeline's transformer/ (single or sharded
    safetensors)."""
    if not Path(folder).is_dir():
        raise CheckpointError(f"Wan folder {str(folder)!r} does not exist")
    folder = dit_dir(folder)
    config = WanConfig.from_json(_require_file(folder / "config.json", "Wan config"))
    state_dict = {}
    for path in weight_files(wan_weights_file(folder)):
        state_dict.update(load_tensors(path))
    return config, state_dict


def read_self_forcing(path: str | Path, key: str = "generator", *, trust_pickle: bool = False) -> dict:
    """The Wan state dict stored under `key` of a Self-Forcing `.pt` (prefixes stripped). A file without that
    entry holding "model" (ODE-init checkpoints) gives that for "generator"; a bare state dict (tensors at its top
    level) is the generator, as the researchers' trainers read `generator_ckpt`."""
    blob = load_tensors(path, trust_pickle=trust_pickle)
    if not isinstance(blob, dict):
        raise CheckpointError(f"{str(path)!r} holds a {type(blob).__name__}, not a dict of state dicts")
    if key not in blob:
        if key == "generator" and "model" in blob:  # ODE-init checkpoints may use "model"
            key = "model"
        else:
            import torch

            entries = sorted(k for k in blob if isinstance(blob[k], dict))
            if not entries and blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
                if key == "generator":
                    return strip_prefixes(blob)
                raise CheckpointError(
                    f"{str(path)!r} is a bare state dict ({len(blob)} tensors at its top level, e.g. "
                    f"{sorted(blob)[:3]}): one model's weights, read as the generator, with no {key!r} entry "
                    "(a Self-Forcing checkpoint holds 'generator', 'generator_ema' and 'critic')")
            why = (" (a training run writes it in the checkpoints after step ema_start_step)"
                   if key == "generator_ema" and "generator" in blob else
                   " (its weights are the EMA's: pass --use-ema, use_ema=True)" if key == "generator" and
                   "generator_ema" in blob else "")
            raise CheckpointError(f"{str(path)!r} has no {key!r} entry{why}; it has {entries or sorted(blob)[:10]}")
    return strip_prefixes(blob[key])


# ------------------------------------------------------------------------------------------------------
# Building models


def check_state_dict(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Refuse missing, unexpected and wrongly shaped keys, listing them all."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_tensor_shapes(expected, state_dict, f"{source} does not fit the model{_size_hint(model, state_dict)}")


def weights_size(state_dict: dict) -> tuple[int, int, int] | None:
    """(layers, width, FFN width) of a Wan DiT state dict, read from its tensors' names and shapes; None for a dict
    that has no blocks.N.self_attn / ffn tensors (not a Wan DiT)."""
    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    embed = state_dict.get("blocks.0.self_attn.q.weight")  # [dim, dim]: the width, whatever one other tensor says
    ffn = state_dict.get("blocks.0.ffn.0.weight")  # [ffn_dim, dim]
    if embed is None or ffn is None or not blocks:
        return None
    return len(blocks), embed.shape[0], ffn.shape[0]


def _size_hint(model: WanModel, state_dict: dict) -> str:
    """Where the weights' own shapes say they belong to another size of model than the config's: both sizes."""
    def size(layers, dim, ffn):
        return f"{layers} layers of width {dim} (FFN {ffn})"

    c = model.config
    theirs, ours = weights_size(state_dict), (c.num_layers, c.dim, c.ffn_dim)
    if theirs is None or theirs == ours:
        return ""
    return (f": the weights are a model of {size(*theirs)}, the config.json it was built from says {size(*ours)}; "
            "load them with the Wan folder (config.json) they belong to")


def build_model(config: WanConfig, state_dict: dict | None = None, *, causal: bool = False,
                num_frame_per_block: int = 3, device="cpu", dtype=torch.float32, source: str = "state dict") -> WanModel:
    """Build on the meta device, then load with assignment (or materialise empty weights when no state dict)."""
    with torch.device("meta"):
        model = WanModel(config, causal=causal, num_frame_per_block=num_frame_per_block)
    if state_dict is None:
        return model.to_empty(device=device).to(dtype)
    if any(k.startswith("condition_embedder.") for k in state_dict):
        state_dict = from_diffusers(state_dict)
    check_state_dict(model, state_dict, source)
    model.load_state_dict(state_dict, assign=True)
    model = model.to(device=device, dtype=dtype).eval()
    if bad := nonfinite_parameters(model):  # (else a whole rollout ran before a NaN video was refused, naming nothing)
        raise CheckpointError(f"{source} holds NaN or infinite values in {len(bad)} of its tensors ("
                              f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): damaged weights, or a training "
                              "run that diverged")
    return model


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """The names of the parameters holding NaN or inf: one float32 sum per tensor, on the model's device, read back
    once (a sum is finite when every value is, barring overflow, which the exact check of those tensors rules out).
    For the 1.3B model on a 2-core CPU: 0.24 s in float32, 1.1 s in bfloat16 (on a GPU, 825 small reductions)."""
    named = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        return []
    with torch.no_grad():
        sums = torch.stack([p.sum(dtype=torch.float32) for _, p in named]).isfinite().cpu()
    return [name for (name, p), ok in zip(named, sums.tolist()) if not ok and not bool(torch.isfinite(p).all())]


def load_wan(folder: str | Path, *, checkpoint: str | Path | None = None, use_ema: bool = False,
             key: str | None = None, causal: bool = True, num_frame_per_block: int = 3, local_attn_size: int = -1,
             sink_size: int = 0, device="cpu", dtype=torch.float32, trust_pickle: bool = False) -> WanModel:
    """The model of a Wan folder, optionally with the weights of a Self-Forcing checkpoint on top."""
    config, state_dict = read_wan_folder(folder)
    config = config.replace(local_attn_size=local_attn_size, sink_size=sink_size)
    source = str(wan_weights_file(folder))  # (a pipeline's transformer/..., or the shard index)
    if checkpoint is not None:
        key = key or ("generator_ema" if use_ema else "generator")
        state_dict = read_self_forcing(checkpoint, key, trust_pickle=trust_pickle)
        source = f"{checkpoint}[{key!r}]"
    return build_model(config, state_dict, causal=causal, num_frame_per_block=num_frame_per_block, device=device,
                       dtype=dtype, source=source)


# ------------------------------------------------------------------------------------------------------
# Writing (atomic: models.files.atomic_write)


def save_wan_folder(folder: str | Path, config: WanConfig, state_dict: dict, *, shard_size: int | None = None,
                    video_size: tuple[int, int] | None = None) -> None:
    """Write an official-format Wan folder (optionally sharded, for tests of the index path); `video_size`
    (height, width in pixels) is recorded in config.json as the size the model runs at by default."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    content = config.to_json_dict() | ({"video_size": list(video_size)} if video_size else {})
    atomic_write(folder / "config.json", lambda p: Path(p).write_text(json.dumps(content, indent=2)))
    if shard_size is None:
        atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, p))
        return
    names = sorted(tensors)
    shards = [names[i : i + shard_size] for i in range(0, len(names), shard_size)]
    weight_map = {}
    for i, keys in enumerate(shards):
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        atomic_write(folder / shard, lambda p, keys=keys: save_file({k: tensors[k] for k in keys}, p))
        weight_map.update({k: shard for k in keys})
    atomic_write(folder / INDEX_NAME, lambda p: Path(p).write_text(json.dumps({"weight_map": weight_map}, indent=2)))


def save_self_forcing(path: str | Path, **state_dicts: dict) -> None:
    """Write a Self-Forcing checkpoint: `generator=`, `critic=`, `generator_ema=` state dicts, `model.` prefixed.
    Other keyword values (e.g. `step=`, optimiser states) are stored as given."""
    blob = {}
    for name, value in state_dicts.items():
        if name in SELF_FORCING_KEYS and value is not None:
            value = {f"model.{k}": v.detach().cpu() for k, v in value.items()}
        blob[name] = value
    atomic_torch_save(blob, Path(path))
