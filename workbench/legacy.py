"""Export a store to the researchers' earlier per-layer `.pt` files, so their notebooks keep working: the
layout their fork's `run_extraction_each.py --layer_index N` wrote, described below.

One file per (sample, layer), `{out}/{sample}/layer{N}.pt`, holding only plain Python values and tensors
(`torch.load(path, weights_only=True)` reads it):

    layer_index                 int
    full_frame_attention        fp16 [heads, F, F]: attn_logit at the chosen step (default step 0, t = 1000: the
                                fork's "first capture of each chunk"), 0 (not NaN) where the pair was not attended
                                (above the block staircase, evicted frames), as the fork left it; a row of NaN
                                alone (attention that was not finite: a rollout whose activations overflowed)
                                stays NaN, as the fork's own capture of it would be, and the export says so;
                                an image-to-video store's frame 0 (the image, never denoised) has rows of 0 at
                                a denoising step (no attention ran there: not an overflow)
    last_block_frame_attention  fp16 [heads, F]: full_frame_attention averaged over the last chunk's query frames
                                (computed in float32 from the zero-filled matrix, then cast, as the fork did)
    is_logits                   True
    prompt, num_frames, frame_seq_length, num_frame_per_block, num_heads (heads in the file), block_sizes,
    query_frames, key_frames (lists 0..F-1), last_block_query_frames
plus provenance the fork did not have: extraction_method 'workbench-store', sample, seed, step, timestep, phase
("denoise" or "context") and cfg ("cond", "uncond" or "none": a CFG store's steps come in pairs at one timestep),
head_indices (the model's head index of each row), checkpoint, use_ema (generator_ema or generator).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.files import atomic_torch_save, check_writable_dir
from workbench.errors import WorkbenchError
from workbench.store import beside, chunk_sizes, image_of, open_store


def legacy_record(ds, sample: str, layer: int, step: int = 0) -> dict:
    """The fork's dict for one (sample, layer) of an opened store (see the module docstring)."""
    logit = ds["attn_logit"].sel(sample=sample, layer=layer, step=step).values  # [heads, F, F] float32, NaN outside
    not_finite = np.isnan(logit).all(axis=-1, keepdims=True)  # [heads, F, 1]: rows that attended nothing finite
    if image_of(ds.attrs) is not None and str(ds["phase"].sel(step=step).values) == "denoise":
        # image-to-video: the image's chunk (frame 0) is never denoised, so its rows at a denoising step ran no
        # attention at all (the store's NaN by design, docs/modes.md): not attended (0), not an overflow
        not_finite[:, np.asarray(ds["query_chunk"].values) == 0, :] = False
    full32 = torch.from_numpy(np.where(not_finite, np.nan, np.nan_to_num(logit, nan=0.0)).astype(np.float32))
    sizes = chunk_sizes(ds["query_chunk"].values)
    num_frames = int(ds.sizes["query_frame"])
    last_start = num_frames - sizes[-1]
    last_rows = list(range(last_start, num_frames))
    causal = str(ds["sampler"].sel(sample=sample).values) != "bidirectional"
    return {
        "layer_index": int(layer),
        "full_frame_attention": full32.to(torch.float16),
        "last_block_frame_attention": full32[:, last_start:, :].mean(dim=1).to(torch.float16),
        "is_logits": True,
        "prompt": str(ds["prompt"].sel(sample=sample).values),
        "num_frames": num_frames,
        "frame_seq_length": int(ds.attrs["frame_seq_len"]),
        "num_frame_per_block": int(ds.attrs["num_frame_per_block"]) if causal else num_frames,
        "num_heads": int(ds.sizes["head"]),
        "block_sizes": sizes,
        "query_frames": list(range(num_frames)),
        "key_frames": list(range(num_frames)),
        "last_block_query_frames": last_rows,
        "extraction_method": "workbench-store",
        "sample": str(sample),
        "seed": int(ds["seed"].sel(sample=sample).values),
        "step": int(step),
        "timestep": float(ds["timestep"].sel(step=step).values),
        **{what: str(ds[what].sel(step=step).values) for what in ("phase", "cfg") if what in ds.coords},
        "head_indices": [int(h) for h in ds["head"].values],
        "checkpoint": str(ds["checkpoint"].sel(sample=sample).values),
        # which of the checkpoint's state dicts ran: generator_ema (True) or generator (False); None if not recorded;
        # a training probe ran the generator being trained, at `train_step` (its checkpoint: where training started)
        "use_ema": False if "train_step" in ds.coords else {"ema": True, "gen": False}.get(
            _model_fields(ds).get("key")),
        **({"train_step": int(ds["train_step"])} if "train_step" in ds.coords else {}),
    }


def _model_fields(ds) -> dict:
    """The `model` half of the store's fingerprint_fields ({} in stores made before they were recorded)."""
    return (ds.attrs.get("fingerprint_fields") or {}).get("model", {})


def _check(ds, store, layers, samples, step) -> tuple[list[int], list[str]]:
    if ds.attrs.get("store_kind") == "effects":
        raise WorkbenchError(f"{store} is an effects store (workbench intervene: what each intervention changed in "
                             "the video, and with --capture each entry's attention mass, not the mean logits); "
                             "export-legacy writes an attention store's mean logits (workbench extract)")
    if "attn_logit" not in ds:
        raise WorkbenchError(f"{store} has no attn_logit (stats: {ds.attrs.get('stats')}); the legacy files hold mean "
                             "logits: extract with --stats attn_logit (the default includes it)")
    have_layers = [int(x) for x in ds["layer"].values]
    layers = have_layers if layers is None else list(layers)
    bad = [x for x in layers if x not in have_layers]
    if bad:
        raise WorkbenchError(f"layer {bad} not in {store}; it holds layers {have_layers}")
    have_samples = [str(x) for x in ds["sample"].values]
    samples = have_samples if samples is None else list(samples)
    bad = [x for x in samples if x not in have_samples]
    if bad:
        raise WorkbenchError(f"sample {bad} not in {store}; it holds {have_samples}")
    have_steps = [int(x) for x in ds["step"].values]
    if step not in have_steps:
        raise WorkbenchError(f"step {step} not in {store}; it holds steps {have_steps} (step 0 is t = 1000)")
    return layers, samples


def _one_train_step(ds, store, train_step: int | None):
    """The store at one train step: a probe store needs `train_step` (one of its own; the only one when it holds
    one), any other store none."""
    if "train_step" not in ds.dims:
        if train_step is not None:
            raise WorkbenchError(f"--train-step {train_step}: {store} is not a training probe store "
                                 "(no train_step dim)")
        return ds
    have = [int(t) for t in ds["train_step"].values]
    if train_step is None and len(have) == 1:  # (one train step: nothing to choose)
        train_step = have[0]
    if train_step not in have:
        what = "choose one" if train_step is None else f"train step {train_step} is not in it"
        raise WorkbenchError(f"{store} is a training probe store ({what}: --train-step N); it holds train steps {have}")
    return ds.sel(train_step=train_step)


def default_out(store) -> Path:
    """runs/layer3.zarr -> runs/layer3_legacy (`.` inside the store: its own name)"""
    return beside(store, "_legacy")


def export_legacy(store, out=None, *, layers=None, samples=None, step: int = 0, train_step: int | None = None,
                  log=print) -> list[Path]:
    """Write `{out}/{sample}/layer{N}.pt` for every chosen (sample, layer); returns the paths. A training probe
    store (a train_step dim) exports one train step, `train_step`. Everything is checked before the first file is
    written."""
    ds = _one_train_step(open_store(store), store, train_step)
    layers, samples = _check(ds, store, layers, samples, step)
    out = check_writable_dir(out if out is not None else default_out(store))
    paths, nan_files = [], []
    for sample in samples:
        for layer in layers:
            path = out / sample / f"layer{layer}.pt"
            record = legacy_record(ds, sample, layer, step)
            atomic_torch_save(record, path)
            paths.append(path)
            if bool(record["full_frame_attention"].isnan().any()):
                nan_files.append(f"{sample}/layer{layer}.pt")
    at = f"train step {int(ds['train_step'])}, " if "train_step" in ds.coords else ""
    branch = f", {ds['cfg'].sel(step=step).values} branch" if "cfg" in ds.coords and \
        str(ds["cfg"].sel(step=step).values) != "none" else ""  # (a CFG store's steps: pairs at one timestep)
    log(f"wrote {len(paths)} legacy file(s) under {out} ({at}step {step}, t = "
        f"{float(ds['timestep'].sel(step=step)):g}{branch}): {len(samples)} sample(s) x layers {layers}")
    if nan_files:
        log(f"note: {len(nan_files)} file(s) hold rows of NaN, where the store's attention was not finite (a rollout "
            f"whose activations overflowed): {', '.join(nan_files[:5])}" + (" ..." if len(nan_files) > 5 else ""))
    return paths
