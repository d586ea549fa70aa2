"""Synthetic attention stores with planted heads, laid out exactly as docs/store.md defines.

The studies are tested on stores whose answers are known by construction. Every captured head plays one
*role*, the same at every step and for every query frame (`noise=0`):

    sink       all mass on key frame 0 (the StreamingLLM-style sink)
    local      all mass on the query's own frame (distance 0)
    global     uniform over every key frame the query attended
    deep_sink  uniform over the attended frames among the first `deep_frames` (default 9 = 3 chunks,
               ~40% of 21 frames, the "deep sink" of Deep Forcing); uniform over all attended if none

The default role of (layer, head) is `HEAD_ROLES[(layer + head) % 4]`, so every layer holds all four roles;
pass `roles={(layer, head): role}` to change some. With `noise > 0` each row is mixed with a random
distribution over the same attended frames: `(1 - noise) * planted + noise * dirichlet`.

Three variants, each a sampler the workbench captures:

    causal         Self-Forcing few-step rollout: 21 frames in chunks of 3 (`independent_first_frame=True`: frame 0
                   alone, then chunks of 3, e.g. 19 frames), steps t = 1000, 937.5, 833.33, 625 and the context
                   pass (t = 0); NaN above the block-causal staircase (key_chunk > query_chunk)
    window         the same with a KV window of `local_attn_size` frames (default 9) whose first `sink_size`
                   frames (default 3) are kept: NaN also for evicted frames
    bidirectional  Wan's sampler: one chunk holds every frame (nothing NaN), 8 steps of the shift-5 flow
                   schedule, each run twice (cfg `cond` then `uncond`), so 16 steps

`attn_logit` is the mean-centred log of the mass, `ln(mass + 1e-4) - mean_attended(ln(mass + 1e-4))`: the logit
a head would have if every token of a key frame scored the same. `cross_mass` puts weight 1 on the prompt's
tokens and 0.1 on padding.

    from studies.synthetic import write_store
    write_store("runs/synthetic.zarr", "causal", layers=(0, 1), num_heads=4)

The stores are built and written by `workbench.store` (`sample_dataset`, `StoreWriter`), the code that
`workbench extract` writes real stores with, so they have exactly the layout of docs/store.md as implemented.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import xarray as xr

from models.common.chunks import frame_chunks
from models.common.labels import ForwardLabels
from models.common.window import attended_key_frames
from models.errors import ModelInputError
from workbench.errors import WorkbenchError
from workbench.store import StoreLayout, StoreWriter, sample_dataset

HEAD_ROLES = ("sink", "local", "global", "deep_sink")
VARIANTS = ("causal", "window", "bidirectional")
DEFAULT_PROMPT = "A majestic eagle soaring through a cloudy sky, cinematic lighting"
LOGIT_FLOOR = 1e-4


def planted_role(layer: int, head: int) -> str:
    """The default role of a head: `HEAD_ROLES[(layer + head) % 4]`."""
    return HEAD_ROLES[(layer + head) % len(HEAD_ROLES)]


def flow_timesteps(num_steps: int, shift: float = 5.0) -> np.ndarray:
    """Timesteps of the shift-`shift` flow schedule on a uniform grid: t = 1000 * shift*s / (1 + (shift-1)*s)
    for s = 1 - i/num_steps. With shift 5, 4 steps give Self-Forcing's warped list 1000, 937.5, 833.33, 625;
    8 steps give 1000, 972.2, 937.5, 892.9, 833.3, 750, 625, 416.7 (a superset)."""
    s = 1.0 - np.arange(num_steps) / num_steps
    return (1000.0 * shift * s / (1.0 + (shift - 1.0) * s)).astype(np.float32)


def attended_frames(variant: str, num_frames: int, num_frame_per_block: int, local_attn_size: int,
                    sink_size: int, independent_first_frame: bool = False) -> np.ndarray:
    """[query_frame, key_frame] bool: which key frames a query frame's call attended (the rule of
    models/common/window.py: key frames of the query's chunk and earlier ones, chunks as models/common/chunks.py
    lays them out; with a window of L frames and S sink frames, frames [0, S) and the L - S most recent frames up
    to the end of the query's chunk). A bidirectional forward is one chunk holding every frame."""
    if variant == "bidirectional":
        return np.array(attended_key_frames(num_frames, num_frames), dtype=bool)
    return np.array(attended_key_frames(num_frames, num_frame_per_block, local_attn_size, sink_size,
                                        independent_first_frame), dtype=bool)


def planted_row(role: str, query_frame: int, attended: np.ndarray, deep_frames: int) -> np.ndarray:
    """[key_frame] float64: the planted distribution of one query frame (zeros where not attended)."""
    row = np.zeros(attended.shape, dtype=np.float64)
    if role == "sink" and attended[0]:
        row[0] = 1.0
    elif role == "local":
        row[query_frame] = 1.0
    elif role == "deep_sink" and attended[:deep_frames].any():
        row[:deep_frames] = attended[:deep_frames]
    else:  # global, or a sink / deep sink whose frames were evicted
        row[:] = attended
    return row / row.sum()


def sample_datasets(
    variant: str = "causal",
    *,
    layers: Sequence[int] = (0, 1),
    num_heads: int = 4,
    num_frames: int = 21,
    num_frame_per_block: int = 3,
    independent_first_frame: bool = False,
    prompts: Sequence[str] = (DEFAULT_PROMPT,),
    seeds: Sequence[int] = (42,),
    roles: Mapping[tuple[int, int], str] | Callable[[int, int], str] | None = None,
    noise: float = 0.0,
    timesteps: Sequence[float] | None = None,
    local_attn_size: int | None = None,
    sink_size: int | None = None,
    deep_frames: int = 9,
    text_len: int = 8,
    frame_seq_len: int = 6,
    num_layers: int | None = None,
    model_family: str | None = None,
    checkpoint: str = "synthetic",
    with_cross: bool = True,
    rng_seed: int = 0,
) -> list[xr.Dataset]:
    """One Dataset per sample, built by `workbench.store.sample_dataset` (the writer `workbench extract` uses),
    so a synthetic store has exactly the layout of a real one; the module docstring says what is planted."""
    if variant not in VARIANTS:
        raise WorkbenchError(f"unknown synthetic variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if variant == "bidirectional" and independent_first_frame:
        raise WorkbenchError("independent_first_frame is a chunk layout of the causal variants")
    try:  # frames that do not fit the chunk layout (models/common/chunks.py)
        frame_chunks(num_frames, num_frame_per_block, independent_first_frame)
    except ModelInputError as err:
        raise WorkbenchError(str(err)) from None
    if not 0.0 <= noise <= 1.0:
        raise WorkbenchError(f"noise {noise} must be in [0, 1]")
    if not prompts or not seeds:
        raise WorkbenchError("a synthetic store needs at least one prompt and one seed")
    if len(set(int(x) for x in layers)) != len(list(layers)):
        raise WorkbenchError(f"layers {list(layers)} name a layer twice; give each once")
    layers = sorted(int(x) for x in layers)
    role_of = roles if callable(roles) else (lambda l, h: (roles or {}).get((l, h), planted_role(l, h)))
    for l in layers:
        for h in range(num_heads):
            if role_of(l, h) not in HEAD_ROLES:
                raise WorkbenchError(f"unknown role {role_of(l, h)!r} for layer {l} head {h}; roles: {HEAD_ROLES}")

    # the schedule: one entry per kind of DiT forward, in the order they run
    if variant == "bidirectional":
        t = np.asarray(timesteps if timesteps is not None else flow_timesteps(8), dtype=np.float32)
        step_t = np.repeat(t, 2)
        phase = ["denoise"] * len(step_t)
        cfg = ["cond", "uncond"] * len(t)
        denoise_index = np.repeat(np.arange(len(t)), 2)
        sampler, family = "bidirectional", model_family or "wan"
        local_attn_size, sink_size = -1, 0
    else:
        t = np.asarray(timesteps if timesteps is not None else flow_timesteps(4), dtype=np.float32)
        step_t = np.append(t, np.float32(0.0))
        phase = ["denoise"] * len(t) + ["context"]
        cfg = ["none"] * len(step_t)
        denoise_index = np.append(np.arange(len(t)), -1)
        sampler, family = "causal_few_step", model_family or "self_forcing"
        if variant == "window":
            local_attn_size = 9 if local_attn_size is None else local_attn_size
            sink_size = 3 if sink_size is None else sink_size
        else:
            local_attn_size = -1 if local_attn_size is None else local_attn_size
            sink_size = 0 if sink_size is None else sink_size
    num_steps = len(step_t)

    samples = [(pi, prompt, seed) for pi, prompt in enumerate(prompts) for seed in seeds]
    window = attended_frames(variant, num_frames, num_frame_per_block, local_attn_size, sink_size,
                             independent_first_frame)  # [qf, kf]
    rng = np.random.default_rng(rng_seed)
    shape = (len(samples), num_steps, len(layers), num_heads, num_frames, num_frames)
    mass = np.full(shape, np.nan, dtype=np.float64)  # [sample, step, layer, head, query_frame, key_frame]
    for li, layer in enumerate(layers):
        for head in range(num_heads):
            role = role_of(layer, head)
            planted = np.stack([planted_row(role, qf, window[qf], deep_frames) for qf in range(num_frames)])
            planted = np.broadcast_to(planted, (len(samples), num_steps, num_frames, num_frames))
            if noise > 0:
                random = rng.dirichlet(np.ones(num_frames), size=planted.shape[:-1]) * window
                random /= random.sum(-1, keepdims=True)
                planted = (1.0 - noise) * planted + noise * random
            mass[:, :, li, head] = np.where(window, planted, np.nan)
    logit = np.log(mass + LOGIT_FLOOR)
    logit = logit - np.nanmean(np.where(np.isnan(mass), np.nan, logit), axis=-1, keepdims=True)
    logit = np.where(np.isnan(mass), np.nan, logit)

    num_tokens = [min(len(prompt.split()), text_len) for _, prompt, _ in samples]
    stats = ["attn_mass", "attn_logit"] + (["cross_mass"] if with_cross else [])
    schedule = [ForwardLabels(step=i, timestep=float(step_t[i]), chunk=0, phase=phase[i], cfg=cfg[i],
                              denoise_index=int(denoise_index[i])) for i in range(num_steps)]
    config_yaml = (
        f"synthetic:\n  variant: {variant}\n  noise: {noise}\n  deep_frames: {deep_frames}\n  rng_seed: {rng_seed}\n"
        f"num_frames: {num_frames}\nnum_frame_per_block: {num_frame_per_block}\n"
        f"independent_first_frame: {independent_first_frame}\n"
        f"local_attn_size: {local_attn_size}\nsink_size: {sink_size}\nsampler: {sampler}\n"
        f"timesteps: {[float(x) for x in step_t]}\n"
        "roles:\n" + "".join(f"  L{l}H{h}: {role_of(l, h)}\n" for l in layers for h in range(num_heads))
    )
    layout_hash = hashlib.sha256(f"{config_yaml}{layers}{num_heads}{stats}".encode()).hexdigest()[:16]
    weights_hash = hashlib.sha256(checkpoint.encode()).hexdigest()
    import zarr

    layout = StoreLayout(
        steps=schedule, layers=layers, heads=list(range(num_heads)), token_layers=[], num_frames=num_frames,
        num_frame_per_block=num_frame_per_block if variant != "bidirectional" else 0, frame_seq_len=frame_seq_len,
        grid=(1, frame_seq_len), text_len=text_len, stats=stats, independent_first_frame=independent_first_frame,
        attrs=dict(
            workbench_version="synthetic", git_commit="synthetic",
            command=" ".join([sys.argv[0] if sys.argv else "python", "studies.synthetic", variant]),
            created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), config_yaml=config_yaml,
            versions={"torch": "none", "xarray": xr.__version__, "zarr": zarr.__version__,
                      "python": sys.version.split()[0]},
            frame_seq_len=frame_seq_len, num_frame_per_block=num_frame_per_block, num_frames=num_frames,
            independent_first_frame=independent_first_frame, text_len=text_len, head_dim=16, num_layers=num_layers if num_layers is not None else max(layers) + 1,
            num_heads=num_heads, dtype="float32", attn_backend="synthetic",
            fingerprint=f"{layout_hash}:{weights_hash[:16]}",
        ),
    )
    per_sample = []
    for si, (pi, prompt, seed) in enumerate(samples):
        arrays = {"attn_mass": mass[si], "attn_logit": logit[si]}  # [step, layer, head, query_frame, key_frame]
        if with_cross:
            weight = np.where(np.arange(text_len) < num_tokens[si], 1.0, 0.1)  # [text_token]
            arrays["cross_mass"] = np.broadcast_to(weight / weight.sum(), mass.shape[1:-1] + (text_len,))
        words = prompt.split()[:text_len]
        meta = dict(prompt_index=pi, seed=seed, prompt=prompt, checkpoint=checkpoint, checkpoint_sha256=weights_hash,
                    model_family=family, sampler=sampler, local_attn_size=local_attn_size, sink_size=sink_size,
                    tokens=words + [""] * (text_len - len(words)), num_tokens=num_tokens[si])
        per_sample.append(sample_dataset(layout, meta, arrays))
    return per_sample


def make_dataset(variant: str = "causal", **kwargs) -> xr.Dataset:
    """The store `write_store` would write, in memory (see `sample_datasets` for the arguments)."""
    parts = sample_datasets(variant, **kwargs)
    ds = xr.concat(parts, dim="sample", data_vars="minimal", coords="minimal", compat="override",
                   combine_attrs="override")
    ds.attrs["completed"] = [str(s) for s in ds.sample.values]
    return ds


def write_store(path: str | Path, variant: str = "causal", *, overwrite: bool = False, **kwargs) -> Path:
    """Make a synthetic store (`sample_datasets(variant, **kwargs)`) and write it to `path` with
    `workbench.store.StoreWriter`, one sample at a time as `workbench extract` does; returns the path."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise WorkbenchError(f"{str(path)!r} already exists; pass overwrite=True to replace it")
    parts = sample_datasets(variant, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with StoreWriter(path, parts[0].attrs["fingerprint"], mode="overwrite") as writer:
        for part in parts:
            writer.write(part)
    return path
