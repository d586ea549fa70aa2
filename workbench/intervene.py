"""`workbench intervene`: the baseline and each intervention (or KV-cache policy) on the same prompts and seeds,
and what each changed, into a labelled effects store.

    entries (a YAML spec and/or flags; workbench/intervene_entries.py) --validated against the model's config, before any weights-->
    baseline rollout per (prompt, seed) (extract's rollout: workbench/extract.py `sample_rollout`; also the
        reference batch of a "mean" ablation)
    for each entry not yet in the store: the same rollouts with its intervention attached (workbench/interventions.py)
        or its cache policy (workbench/kv_policies.py)
        -> latent distance to the baseline per latent frame
        -> on the miniature world (models/world.py): decoded with the folder's VAE, the tracker's metrics
           (studies/world_metrics.py) and the pixel distance per pixel frame
        -> one entry of the store (dim `intervention`), written with extract's store writer (lock, resume)

Every variable of the effects store is defined in docs/store.md ("Effects stores"); what an entry is (a YAML
mapping or a flag, parsed into an `Entry`), in workbench/intervene_entries.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from workbench.errors import Diverged, WorkbenchError
from workbench.intervene_entries import (Entry, build, build_policy, check_entries, older_differs, same_settings,
                                         spec_differences)

WORLD_NUMBERS = ("adherent", "colour_ok", "shape_ok", "direction_ok", "detected", "confidence", "trajectory_error",
                 "speed", "colour_error", "trajectory_drift", "confidence_drift")
WORLD_CURVES = ("trajectory_error", "confidence")
STORE_KIND = "effects"


# ------------------------------------------------------------------------------------------------------ metrics
def latent_distance(x, base) -> tuple[np.ndarray, np.ndarray]:
    """x, base [1, F, C, h, w] -> (RMS of x - base per latent frame, that divided by the baseline's RMS per frame),
    each [F] float32 (computed in float64)."""
    d = (x.double() - base.double())[0]
    rms = d.pow(2).mean(dim=(1, 2, 3)).sqrt()
    ref = base.double()[0].pow(2).mean(dim=(1, 2, 3)).sqrt()
    return rms.float().cpu().numpy(), (rms / ref.clamp_min(1e-12)).float().cpu().numpy()


def latent_rms(x) -> np.ndarray:
    """x [1, F, C, h, w] -> [F] float32: the RMS of each latent frame (float64 inside)."""
    return x.double()[0].pow(2).mean(dim=(1, 2, 3)).sqrt().float().cpu().numpy()


def latent_motion(x) -> np.ndarray:
    """x [1, F, C, h, w] -> [F] float32: the RMS of x[f] - x[f - 1] (NaN at frame 0), how much the video changes
    from one latent frame to the next: a model-independent proxy of motion (a stalled video goes to 0)."""
    d = x.double()[0].diff(dim=0).pow(2).mean(dim=(1, 2, 3)).sqrt().float().cpu().numpy()
    return np.concatenate([[np.nan], d]).astype(np.float32)


def decode(vae, latents, step: int) -> np.ndarray:
    """Latents [1, F, C, h, w] -> float32 pixels [3, T, H, W] in [-1, 1], streamed chunk by chunk as generate does."""
    import torch

    stream = vae.stream_decoder()
    pieces = [stream.push(latents[:, f : f + step]) for f in range(0, latents.shape[1], step)]
    return torch.cat(pieces, dim=2)[0].float().cpu().numpy()


def world_scores(video: np.ndarray, base_video: np.ndarray, prompt: str) -> dict[str, np.ndarray]:
    """The miniature world's numbers and curves of one decoded video and its pixel distance to the baseline's."""
    from studies.world_metrics import score_rollout_video

    s = score_rollout_video(video, prompt)  # (a rollout that diverged: scored as a blank video, its distance NaN)
    out = {f"world_{k}": np.float32(s.numbers[k]) for k in WORLD_NUMBERS}
    out |= {f"world_curve_{k}": s.curves[k].astype(np.float32) for k in WORLD_CURVES}
    if np.isfinite(video).all():
        diff = (video.astype(np.float64) - base_video.astype(np.float64))
        out["pixel_distance"] = np.sqrt((diff ** 2).mean(axis=(0, 2, 3))).astype(np.float32)  # [T]
    else:
        out["pixel_distance"] = np.full(video.shape[1], np.nan, np.float32)
    return out


def is_world(wan_dir: Path, prompts: list[str], height: int, width: int) -> bool:
    """Whether the miniature world's metrics apply: a VAE in the folder, world-sized video, world prompts."""
    from models import world
    from models.wan.folder import present, wan_parts

    if not present(wan_parts(wan_dir).vae) or (height, width) != (world.HEIGHT, world.WIDTH):
        return False
    try:
        for p in prompts:
            world.parse_prompt(p)
    except ValueError:
        return False
    return True


# each effect variable's attrs (their definitions: docs/store.md, "Effects stores")
EFFECT_ATTRS = {
    "latent_distance": dict(long_name="latent distance to the baseline", units="latent units",
                            description="RMS over channels and latent pixels of the entry's clean latents minus the "
                                        "baseline's on the frame (same noise), computed in float64"),
    "latent_distance_rel": dict(long_name="relative latent distance to the baseline", units="ratio",
                                description="latent_distance / the RMS of the baseline's latents on the frame"),
    "latent_rms": dict(long_name="latent RMS", units="latent units",
                       description="RMS of the entry's clean latents on the frame"),
    "latent_motion": dict(long_name="latent motion", units="latent units",
                          description="RMS of the latents of the frame minus those of the frame before (NaN at 0)"),
    "pixel_distance": dict(long_name="pixel distance to the baseline", units="RGB in [-1, 1]",
                           description="RMS over channels and pixels of the decoded video minus the baseline's"),
}


def effect_attrs(name: str) -> dict:
    """long_name, units and description of an effects store's variable."""
    from studies.world_metrics import CURVES, NUMBERS
    from workbench.statistics import STATISTICS

    if name in EFFECT_ATTRS:
        return EFFECT_ATTRS[name]
    if name in STATISTICS:
        return STATISTICS[name].attrs
    if name.startswith("world_curve_"):
        k = name.removeprefix("world_curve_")
        return dict(long_name=f"world tracker: {k} per pixel frame", units=CURVES[k],
                    description="the miniature world's tracker on the decoded video (docs/world_metrics.md)")
    k = name.removeprefix("world_")
    return dict(long_name=f"world tracker: {k}", units=NUMBERS[k],
                description="the miniature world's tracker on the decoded video (docs/world_metrics.md)")


def entry_dataset(e: Entry, samples, per_sample: list[dict], attrs: dict, num_frames: int, cache_frames: int,
                  layout=None, detail: str = ""):
    """One store entry: dims (intervention: 1, sample, frame[, pixel_frame][, step, layer, head, query_frame,
    key_frame] with `layout`, the captured steps and layers as an attention store lays them out)."""
    import xarray as xr

    from workbench.store import COORD_ATTRS, sample_id

    ids = [sample_id(i, seed) for i, _, seed in samples]
    layer, head = e.target
    data = {}
    for name in per_sample[0]:
        stacked = np.stack([s[name] for s in per_sample])[None]  # [1, sample, ...]
        dims = ("intervention", "sample") + (("frame",) if name.startswith("latent") else
                                             ("step", "layer", "head", "query_frame", "key_frame")
                                             if name == "attn_mass" else
                                             ("pixel_frame",) if stacked.ndim == 3 else ())
        data[name] = xr.Variable(dims, stacked, attrs=effect_attrs(name))
    text = lambda xs: np.array(list(xs), dtype=object)  # noqa: E731  (variable-length strings: appends of any length)
    coords = dict(intervention=text([e.label]), sample=text(ids), frame=np.arange(num_frames),
                  intervention_kind=("intervention", text([e.kind])),
                  intervention_spec=("intervention", text([json.dumps(e.spec(), sort_keys=True)])),
                  target_layer=("intervention", [layer]), target_head=("intervention", [head]),
                  cache_frames=("intervention", [cache_frames]), intervention_detail=("intervention", text([detail])),
                  prompt=("sample", text(p for _, p, _ in samples)), seed=("sample", [s for *_, s in samples]))
    if layout is not None:  # the coordinates of an attention store's steps, layers and frames
        steps, frames = layout.steps, np.arange(num_frames)
        coords |= dict(step=[s.step for s in steps], layer=list(layout.layers), head=list(layout.heads),
                       query_frame=frames, key_frame=frames,
                       timestep=("step", np.array([s.timestep for s in steps], dtype=np.float32)),
                       phase=("step", text(s.phase for s in steps)), cfg=("step", text(s.cfg for s in steps)),
                       denoise_index=("step", np.array([s.denoise_index for s in steps], dtype=np.int64)),
                       query_chunk=("query_frame", layout.chunk_of(frames)),
                       key_chunk=("key_frame", layout.chunk_of(frames)))
    if any(v.dims[-1:] == ("pixel_frame",) for v in data.values()):
        T = next(v.shape[-1] for v in data.values() if v.dims[-1:] == ("pixel_frame",))
        coords["pixel_frame"] = np.arange(T)
    ds = xr.Dataset(data, coords=coords, attrs=attrs)
    for name in ds.coords:  # (what each coordinate is, as an attention store's: workbench/store.py COORD_ATTRS)
        ds[name].attrs.update(EFFECT_COORD_ATTRS.get(name) or COORD_ATTRS.get(name, {}))
    return ds


EFFECT_COORD_ATTRS = {
    "intervention": dict(long_name="entry label (baseline first)"),
    "frame": dict(long_name="latent frame", units="frames"),
    "pixel_frame": dict(long_name="decoded pixel frame", units="frames"),
    "intervention_kind": dict(long_name="baseline, ablate, knockout, temperature, sink, policy, or a plugin's kind"),
    "intervention_spec": dict(long_name="the entry's settings as JSON"),
    "intervention_detail": dict(long_name="what the entry decided as it ran (a head-wise cache's static heads, a "
                                          "deep sink's positions, the frames an attention-guided cache kept); "
                                          "empty for the others"),
    "target_layer": dict(long_name="the one layer the entry acts on (-1: not exactly one)"),
    "target_head": dict(long_name="the one head the entry acts on (-1: not exactly one)"),
    "cache_frames": dict(long_name="latent frames each layer's KV cache holds at most", units="frames"),
}


def entry_bounds(p) -> dict:
    """What a plan's entries are checked against (`parse_entry`'s bounds): the model's layers and heads, the
    rollout's frames, steps of the per-chunk schedule and chunks."""
    from workbench.chunking import block_sizes_of

    mc = p.model_config
    sizes = [p.geometry[0]] if p.cfg.sampler == "bidirectional" else block_sizes_of(p.cfg)
    return dict(num_layers=mc.num_layers, num_heads=mc.num_heads, num_frames=p.geometry[0],
                num_steps=len(p.schedule), num_chunks=len(sizes), chunk_frames=p.cfg.num_frame_per_block,
                first_chunk_frames=sizes[0])


# ------------------------------------------------------------------------------------------------------ running
BASELINE = Entry(kind="baseline", label="baseline")


def run_intervene(cfg, entries: list, *, world: str = "auto", command: str | list | None = None,
                  capture: bool = False, save_videos: bool = False, log=print) -> Path:
    """Run the baseline and every entry not yet in the store `cfg.out` (an ExtractConfig: model, prompts, seeds,
    frames, sampler, device, out, mode); returns the store path. `entries`: `Entry` objects or spec dicts as a
    --spec file holds them (`{"kind": "ablate", "layers": 3, "heads": 0}`), checked against the model first.
    `capture`: also store `attn_mass` of the layers `cfg.layers` (every step) under each entry (the statistics
    probe of `extract`, attached after the edit)."""
    from models.wan.checkpoint import weights_sha256
    from models.wan.folder import present, wan_parts
    from models.wan.text_encoder import check_encoder_files, wan_dir_encoder_identity
    from workbench.extract import ExtractConfig, LATER_FIELDS, fingerprint_of, plan, same_values
    from workbench.store import SCHEMA_VERSION, StoreWriter
    from workbench.store_lock import StoreLock
    from workbench.weights import run_files

    if world not in ("auto", "on", "off"):
        raise WorkbenchError(f"world {world!r}: use auto, on or off")
    p = plan(cfg)
    check_encoder_files(p.wan_dir)  # (before the store is touched)
    cfg = p.cfg  # the weights spelled out (a zoo model's checkpoint and use_ema)
    from workbench.intervene_entries import parse_entry

    # spec dicts (as in a --spec file) parsed, and Entry objects checked the same way, against the plan: a frame,
    # layer or head the rollout lacks would otherwise edit nothing, silently
    bounds = entry_bounds(p)
    def checked(e):
        """An entry parsed; an Entry object, a copy as a parsed one (a headwise entry with the static heads its store
        gives; a plugin's kind with its settings over the defaults, its code, and the default label if it had none)."""
        if not isinstance(e, Entry):
            return parse_entry(e, **bounds)
        parsed = parse_entry(e.spec(), **bounds)
        return dataclasses.replace(e, static_heads=parsed.static_heads, settings=parsed.settings, code=parsed.code,
                                   label=e.label or parsed.label)

    entries = [checked(e) for e in entries]
    check_entries(entries, cfg.sampler)
    partial = [e.label for e in entries if e.kind == "knockout" and e.heads is not None]
    if capture and partial:  # (the captured call carries one key frame mask for all its heads)
        raise WorkbenchError(f"--capture with a knockout of some heads only ({', '.join(partial)}): the capture would "
                             "read the call's mask, not those heads'; capture without it, or knock out all heads")
    F, h, w = p.geometry
    px_h, px_w = h * 8, w * 8
    scored = is_world(p.wan_dir, cfg.prompts, px_h, px_w) if world == "auto" else world == "on"
    if world == "auto" and not scored and is_world(p.wan_dir, [], px_h, px_w):  # (the prompts turned them off)
        off = [q for q in cfg.prompts if not is_world(p.wan_dir, [q], px_h, px_w)]
        log(f"note: no world metrics in this run: {len(off)} of its {len(cfg.prompts)} prompt(s) are not the "
            f"miniature world's (one colour, shape and direction), e.g. {off[0]!r}; a run scores all its prompts "
            "or none")
    if world == "on" and not is_world(p.wan_dir, cfg.prompts, px_h, px_w):
        raise WorkbenchError("--world on needs the miniature world: a VAE in the model folder, 96 x 128 video and "
                             "prompts naming one colour, shape and direction (models/world.py)")
    if save_videos and not present(wan_parts(p.wan_dir).vae):
        raise WorkbenchError(f"--save-videos decodes with the model folder's VAE; there is none at "
                             f"{wan_parts(p.wan_dir).describe('vae')}")
    if save_videos or scored:
        from workbench.weights import check_vae_file

        check_vae_file(p.wan_dir)  # (whole, before the baseline runs)
    lock = StoreLock(cfg.out).acquire()
    try:  # (the files' stamps before their labels are hashed: checked once they are loaded)
        stamps = run_files(p.wan_dir, p.weights_file)
        sha = weights_sha256(p.weights_file)
        fields = dict(layout=dict(kind=STORE_KIND, schema=SCHEMA_VERSION, geometry=p.geometry, sampler=cfg.sampler,
                                  prompts=cfg.prompts, seeds=cfg.seeds, world=scored),
                      model=dict(weights=sha, config=dataclasses.asdict(p.model_config), dtype=cfg.dtype,
                                 key="ema" if cfg.use_ema else "gen", steps=cfg.denoising_step_list,
                                 text_encoder=wan_dir_encoder_identity(p.wan_dir)))
        if capture:  # (absent without capture: stores made before the option still resume)
            fields["layout"]["capture_layers"] = list(p.spec.layers)
        if scored:  # (the tracker and its rules: entries scored by another version are not mixed in)
            from workbench.scores import scorer_sha256

            fields["model"]["world_scorer"] = scorer_sha256()[:16]
        schedule = {key: getattr(cfg, key) for key in ("warp_denoising_step", "timestep_shift", "context_noise",
                                                       "num_frame_per_block")}
        defaults = {key: getattr(ExtractConfig(), key) for key in schedule}
        if schedule != defaults:  # (absent at the defaults: stores made before the schedule flags still resume)
            fields["model"]["schedule"] = schedule
        writer = StoreWriter(cfg.out, fingerprint_of(fields), mode=cfg.mode, append_dim="intervention", lock=lock,
                             fields=fields, log=log, same_values=same_values(p),
                             later={**LATER_FIELDS, "model.world_scorer": "the world metrics' scorer (studies/"
                                    "world_metrics.py; its world numbers may follow older rules)"},
                             absent={f"model.schedule.{key}": value for key, value in defaults.items()})
    except BaseException:
        lock.release()
        raise
    try:
        return _run(p, cfg, entries, writer, scored, command, log, capture, save_videos, world, stamps=stamps)
    except KeyboardInterrupt as err:  # (Ctrl-C, SIGTERM: the command line says what is kept)
        err.kept = writer.kept_note("entry(ies) (baseline included)", cfg.mode)
        raise
    finally:
        writer.close()


def videos_dir(store, attrs: dict | None = None) -> Path:
    """Where `--save-videos` writes: beside the store, `NAME_videos/<label>/<sample>.png`. A reader passes the
    store's attrs: a store renamed without its folder still finds the folder its attr `videos_dir` names, a folder
    beside the store (a name with a path in it, from a store made elsewhere, is not followed)."""
    from workbench.store import named as own_name

    store = own_name(store)  # (`.` inside the store: its own name)
    named = store.with_name(store.stem + "_videos")
    if not named.is_dir() and store.is_symlink():  # (a link to the store: its folder is beside the store itself)
        real = store.resolve()
        if real.with_name(real.stem + "_videos").is_dir():
            named = real.with_name(real.stem + "_videos")
    given = str((attrs or {}).get("videos_dir") or "")
    if given and Path(given).name == given and given not in (".", "..") and not named.is_dir():
        return store.parent / given
    return named


def video_folder_name(label: str) -> str:
    """The folder of an entry's videos under the videos folder: its label with every character but letters, digits
    and `.+-=` made `_`, and a leading `.` too (`..` named the folder above, `.x` a hidden one)."""
    safe = _kept_characters(label)
    return "_" + safe[1:] if safe.startswith(".") or not safe else safe


def _kept_characters(label: str) -> str:
    return "".join(c if c.isalnum() or c in ".+-=" else "_" for c in label)


def video_file(store, label: str, sample: str, suffix: str = ".png", attrs: dict | None = None) -> Path:
    """Where the video of entry `label` and `sample` is (or goes). An entry whose label starts with `.` kept its
    videos in a hidden folder of that name before (`.x`, not `.` or `..`): read from there when it holds the file (a
    later entry `_x` has the new name's folder). A file there that is a link out of the videos folder (git-annex,
    `cp -rs`) is followed only to a PNG or MP4 file: a store from elsewhere may link to any file."""
    folder = videos_dir(store, attrs)
    sample = video_folder_name(sample)  # (a plain name as it is: pPPPP-sS; a store's `../x` stays inside)
    path = folder / video_folder_name(label) / f"{sample}{suffix}"
    older = _kept_characters(label)
    if older not in (".", "..") and older != video_folder_name(label) and (folder / older / path.name).exists():
        path = folder / older / path.name
    if path.exists() and not path.resolve().is_relative_to(folder.resolve()) and not _is_video(path.resolve()):
        raise WorkbenchError(f"{path} is a link out of the videos folder {folder} to {path.resolve()}, which is no "
                             f"{path.suffix[1:].upper()} file: a store's links are followed to its videos only")
    return path


def _is_video(path: Path) -> bool:
    """Whether `path` is a regular file that starts as a PNG or an MP4 does (its signature, its `ftyp` box)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(12)
    return head.startswith(b"\x89PNG\r\n\x1a\n") or head[4:8] == b"ftyp"


def _save_video(video: np.ndarray, store, label: str, sample: tuple, model: str) -> None:
    """sample: (prompt index, prompt, seed)."""
    from models.video import mp4_available, nan_drawn_black, write_mp4, write_png_grid
    from workbench.store import sample_id

    index, prompt, seed = sample
    name = sample_id(index, seed)
    path = video_file(store, label, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    last = video.shape[1] - 1  # nine pixel frames, first to last, evenly spaced (a stride of T // 9 gave 9 to 17)
    video, diverged = nan_drawn_black(video)  # (a rollout that diverged: still shown)
    write_png_grid(video, path, ncols=9, frames=sorted({round(i * last / 8) for i in range(9)}), label_frames=True,
                   title=f"{label} · {model} · seed {seed} · {name}{diverged} · \"{prompt}\"")
    if mp4_available():
        write_mp4(video, path.with_suffix(".mp4"), fps=16)


def _record_videos(store: Path, folder: str, label: str) -> None:
    """List entry `label` under the store's attr `video_entries` (and its folder under `videos_dir`, for a store
    begun without --save-videos): readers show the videos of the entries listed there only. The folder may hold
    files of the same labels and samples that are not this store's: a store replaced with --overwrite by a run
    without --save-videos kept them, or an entry of the old store that this store lacks."""
    import zarr

    group = zarr.open_group(store, mode="r+")
    attrs = dict(group.attrs)
    if "video_entries" in attrs:
        listed = list(attrs["video_entries"])
    else:  # (a store of an older workbench naming its videos folder: all its entries saved theirs)
        listed = [str(e) for e in attrs.get("completed", []) if str(e) != label] if "videos_dir" in attrs else []
    if attrs.get("videos_dir") != folder or label not in listed:
        group.attrs.update(videos_dir=folder, video_entries=[*listed, label])


def _short_list(labels: list[str], n: int = 5) -> str:
    from workbench.progress import printable

    return ", ".join(map(printable, labels[:n])) + (f" and {len(labels) - n} more" if len(labels) > n else "")


def saved_videos(attrs: dict, label: str) -> bool:
    """Whether the run that made entry `label` saved its videos: listed in `video_entries`; for a store made before
    that attr, whether its attrs name a videos folder at all."""
    if "video_entries" in attrs:
        return str(label) in map(str, attrs["video_entries"])
    return "videos_dir" in attrs


def _refuse_relabelled(cfg, entries, writer) -> None:
    """Refuses entries whose labels the store holds, made with other settings (their intervention_spec)."""
    stored = writer.stored("intervention_spec")
    clash = [e for e in entries if e.label in stored and not same_settings(json.loads(stored[e.label]), e)]
    if clash:
        why = [f"{e.label}: {w}" for e in clash if (w := older_differs(json.loads(stored[e.label]), e))]
        differ = [f"{e.label}: {'; '.join(d)}" for e in clash
                  if (d := spec_differences(json.loads(stored[e.label]), e))]
        raise WorkbenchError(f"{cfg.out} holds entries {[e.label for e in clash]} made with other settings "
                             f"(intervention_spec{': ' + '; '.join(differ) if differ else ''}"
                             f"{'; made by an older workbench, ' + '; '.join(why) if why else ''}): "
                             "give this run's entries their own labels (label: in a --spec file), or choose another "
                             "--out (or --overwrite)")


def _refuse_shared_video_folders(cfg, entries, writer, late_baseline: bool) -> None:
    """Refuses two labels whose videos would go into one folder: two of this run's, or one of them the store's
    (`late_baseline`: the stored baseline gets its videos in this run)."""
    folders: dict[str, set] = {}
    saved = videos_dir(cfg.out)
    ours = set(map(str, writer.completed)) - ({BASELINE.label} if late_baseline else set())
    for label in {BASELINE.label, *(e.label for e in entries)} - ours:
        folders.setdefault(video_folder_name(label).lower(), set()).add(label)  # (A and a: one on macOS)
    for label in map(str, writer.completed):  # (a stored entry's folder, by the new name or an older one)
        for folder in {video_folder_name(label), _kept_characters(label)} - {".", ".."}:
            if folder.lower() in folders and (saved / folder).is_dir():
                folders[folder.lower()].add(label)
    if shared := [sorted(labels) for labels in folders.values() if len(labels) > 1]:
        raise WorkbenchError(f"the labels {shared} would keep their videos in one folder (a label's folder keeps "
                             "its letters, digits and .+-=, the rest become _; on a disk blind to case, as macOS' "
                             "and Windows' are, A and a are one): give this run's entries labels that differ there")


def _run(p, cfg, entries, writer, scored, command, log, capture=False, save_videos=False, world="auto", *,
         stamps: dict):
    """The run after its checks: the baseline of every sample, then each entry not yet in the store, one store
    entry each (its rows per sample: latent distances, world scores, and attn_mass with `capture`)."""
    import torch

    from models.files import check_unchanged
    from models.common.attention_kernels import refusals
    from models.common.rollout import nonfinite_frame
    from models.video import mp4_available
    from models.wan.text_encoder import TextEncoder, prompt_cache_dir
    from workbench.extract import _attrs, _dtype, command_words, load_model, make_probe, sample_rollout, store_layout
    from workbench.hooks import CallFilter, attach
    from workbench.interventions import HeadOutputs
    from workbench.progress import printable, progress_bar, shell_word
    from workbench.store import SCHEMA_VERSION, sample_id

    _refuse_relabelled(cfg, entries, writer)
    import zarr

    stored_attrs = dict(zarr.open_group(writer.path, mode="r").attrs) if writer.completed else {}
    # a store begun without --save-videos: the baseline, rolled out again anyway, gets its videos now
    late_baseline = save_videos and writer.done(BASELINE.label) and not saved_videos(stored_attrs, BASELINE.label)
    if save_videos:
        _refuse_shared_video_folders(cfg, entries, writer, late_baseline)
    todo = [e for e in [BASELINE, *entries] if not writer.done(e.label)]
    writer.requested = [e.label for e in [BASELINE, *entries]]
    samples = [(i, prompt, seed) for i, prompt in enumerate(cfg.prompts) for seed in cfg.seeds]
    without = [e.label for e in entries if writer.done(e.label) and not saved_videos(stored_attrs, e.label)]
    if save_videos and without:
        log(f"note: {_short_list(without)} {'is' if len(without) == 1 else 'are'} in {cfg.out} without videos (made "
            "by a run without --save-videos); a run saves the videos of the entries it computes: --overwrite, or "
            "another --out, makes them again with theirs")
    if not todo and not late_baseline:
        log(f"{cfg.out}: all {len(entries) + 1} entries of this run (baseline included) are already there; nothing "
            "to do")
        return Path(cfg.out)
    if len(todo) < len(entries) + 1:
        log(f"resuming: {len(entries) + 1 - len(todo)} of {len(entries) + 1} entries (baseline included) are already "
            f"in {cfg.out}; computing the other {len(todo)}"
            + ("; the baseline is rolled out again for its videos" if late_baseline else ""))
    device, dtype = torch.device(cfg.device), _dtype(cfg.dtype)
    model = load_model(p, device, dtype)
    encoder = TextEncoder.from_wan_dir(p.wan_dir, device=device, cache_dir=prompt_cache_dir())
    vae = None
    if scored or save_videos:
        from models.wan.folder import wan_parts
        from models.wan.vae import WanVAE

        vae = WanVAE.from_file(wan_parts(p.wan_dir).vae, device=device, dtype=dtype)
    check_unchanged(stamps, "between the hashing of the store's labels and the loading of the weights")
    embs = {prompt: encoder.encode([prompt]) for prompt in
            {*cfg.prompts, *(e.resample_prompt for e in entries if e.resample_prompt)}}
    # the CFG samplers' negative prompt (both branches run under the same interventions)
    negative = encoder.encode([cfg.negative_prompt]) if cfg.sampler != "causal_few_step" else None
    n = model.num_frame_per_block
    F = p.geometry[0]
    window = cfg.local_attn_size if cfg.local_attn_size != -1 else F
    attrs = _attrs(p, writer.fingerprint, command_words(command, "workbench.intervene.run_intervene"))
    attrs.update(store_kind=STORE_KIND, world_metrics=scored, world_asked=world, schema_version=SCHEMA_VERSION,
                 stats=["attn_mass"] if capture else [],
                 # the cache of the baseline and of every entry that is not a policy (a policy's: its spec)
                 local_attn_size=cfg.local_attn_size, sink_size=cfg.sink_size)
    layout = store_layout(p, attrs) if capture else None  # (the captured steps, layers and chunks)
    if save_videos:  # (a new store lists its entries' videos from its first write on: one without the list is older)
        attrs.update(videos_dir=videos_dir(cfg.out).name, video_entries=[])
    bar = progress_bar(total=len(todo) * len(samples), desc="intervene", unit="rollout", disable=not cfg.progress)
    running = None  # what the loop below is doing, for an error's note
    diverged = {}  # entry label -> its samples whose rollout is not finite, and from which latent frame

    try:
        probe = make_probe(model, p, device) if capture else None

        def rollout(prompt, seed, *subscribers, policy=None):
            with attach(model, *subscribers):
                return sample_rollout(model, p, embs[prompt], negative, seed, device, dtype, cache_policy=policy)

        def captured(entry, prompt, seed, *subscribers, policy=None):
            """(latents, attn_mass [step, layer, head, F, F] or None) of a rollout, the probe after the edits."""
            if probe is None:
                return rollout(prompt, seed, *subscribers, policy=policy), None
            if getattr(policy, "heads_differ", False):  # (a head-wise cache: its grouped calls take no observer)
                return rollout(prompt, seed, *subscribers, policy=policy), None
            probe.reset()
            x = rollout(prompt, seed, *subscribers, probe, policy=policy)
            return x, probe.results()["attn_mass"][0]

        # the baseline of every sample (and the reference batch of the "mean" ablations)
        mean_layers = sorted({layer for e in entries if e.kind == "ablate" and e.mode == "mean"
                              for layer in (e.layers or range(model.config.num_layers))})
        reference = HeadOutputs(CallFilter(layers=mean_layers), keep_calls=False) if mean_layers else None
        base, base_video, base_mass = {}, {}, {}
        for s in samples:
            base[s], base_mass[s] = captured(BASELINE, s[1], s[2], *([reference] if reference else []))
            if (bad := nonfinite_frame(base[s])) is not None:  # (every entry's effect would be measured from NaN)
                raise Diverged.rollout(f"the baseline rollout (no intervention) of sample {sample_id(s[0], s[2])} "
                                       f"(prompt {s[1]!r}, seed {s[2]}) is not finite (NaN or inf) from latent frame "
                                       f"{bad} on", "nothing is written")
            if scored or save_videos:
                base_video[s] = decode(vae, base[s], n)
        means = reference.mean() if reference else {}
        if late_baseline:
            for s in samples:
                _save_video(base_video[s], cfg.out, BASELINE.label, s, p.checkpoint_label)
            _record_videos(writer.path, attrs["videos_dir"], BASELINE.label)

        for e in todo:
            per_sample = []
            policy = build_policy(e) if e.kind == "policy" else None
            edit, source = None, None  # the entry's intervention and resample source, kept across its samples
            for s in samples:
                running = f"while running entry {e.label!r} on sample {sample_id(s[0], s[2])} of workbench intervene"
                if e is BASELINE:
                    x, mass = base[s], base_mass[s]
                else:
                    sources = {e.label: means}
                    if e.kind == "ablate" and e.mode == "resample":
                        src = HeadOutputs(CallFilter(layers=e.layers, kinds={e.attention}))
                        rollout(e.resample_prompt, s[2] if e.resample_seed is None else e.resample_seed, src)
                        sources[e.label] = source = held_in_place(source, src)
                    if policy is None and (edit is None or not getattr(edit, "graph_safe", False)):
                        edit = build(e, sources)  # (a graph-safe one is built once: its CUDA graphs replay)
                    subs = [edit] if policy is None else ([policy] if hasattr(policy, "observe") else [])
                    x, mass = captured(e, s[1], s[2], *subs, policy=policy)
                if (bad := nonfinite_frame(x)) is not None:
                    diverged.setdefault(e.label, []).append(f"{sample_id(s[0], s[2])} from latent frame {bad}")
                dist, rel = latent_distance(x, base[s])
                row = dict(latent_distance=dist, latent_distance_rel=rel, latent_rms=latent_rms(x),
                           latent_motion=latent_motion(x))
                if capture:  # NaN where the entry takes no observer (a head-wise cache)
                    shape = (len(p.spec.steps), len(p.spec.layers), len(p.spec.heads), F, F)
                    row["attn_mass"] = mass if mass is not None else np.full(shape, np.nan, np.float32)
                video = (decode(vae, x, n) if e is not BASELINE else base_video[s]) if vae is not None else None
                if scored:
                    row |= world_scores(video, base_video[s], s[1])
                if save_videos:
                    _save_video(video, cfg.out, e.label, s, p.checkpoint_label)
                per_sample.append(row)
                bar.update(1)
            held = policy.capacity(F, n) if policy is not None else window
            detail = str(policy.describe()) if hasattr(policy, "describe") else ""  # (a policy's decisions)
            if save_videos:  # (listed before the entry is: a kill between the two leaves it listed and unfinished,
                if writer.completed:  # which readers do not show; its videos, all written, are this entry's)
                    _record_videos(writer.path, attrs["videos_dir"], e.label)
                else:  # (the first write makes the store, with these attrs)
                    attrs["video_entries"] = [e.label]
            refused = refusals(cfg.attention_kernel, device, dtype, heads=model.config.num_heads,
                               head_dim=model.config.head_dim)  # (a kernel's run-time refusals: docs/store.md)
            writer.write(entry_dataset(e, samples, per_sample, attrs, F, held, layout, detail), key=e.label,
                         facts={"attn_refused": refused})
    except Exception as err:  # (an error of a plugin's code: which entry and sample, in its traceback)
        if running and hasattr(err, "add_note") and not isinstance(err, WorkbenchError):
            err.add_note(running)
        raise
    finally:  # (also when stopped or failed: an open bar is drawn again under later output)
        bar.close()
    log(ranking_text(cfg.out))
    for label, where in diverged.items():
        log(f"note: under {label!r} the rollout is not finite (NaN or inf: the activations overflowed) for "
            f"{_short_list(where)}: its latent distances are NaN or inf, its world scores those of a blank video (the "
            "tracker finds nothing: adherent 0, detected 0), its pixel distance NaN"
            + (", and its saved frames draw NaN black" if save_videos else ""))
    if save_videos:
        log(f"videos: {printable(shell_word(videos_dir(cfg.out)))}/LABEL/pPPPP-sS.png"
            + (" and .mp4" if mp4_available() else "") + " (LABEL with characters other than letters, digits and "
            ".+-= as _)")
    return Path(cfg.out)


def held_in_place(held, recorded):
    """A resample source (workbench/interventions.py `HeadOutputs`) holding `recorded`'s outputs in `held`'s
    tensors where they match (the first time `recorded` itself): an ablation's CUDA graphs read its tensors in
    place, so the entry's later samples replay the graphs of its first ones."""
    if held is None:
        return recorded
    for key, out in recorded.by_call.items():
        mine = held.by_call.get(key)
        if mine is not None and (mine.shape, mine.dtype, mine.device) == (out.shape, out.dtype, out.device):
            mine.copy_(out)
        else:
            held.by_call[key] = out
    for key in set(held.by_call) - set(recorded.by_call):
        del held.by_call[key]
    return held


def ranking(ds):
    """Entries ranked by effect: a pandas DataFrame with the mean relative latent distance (over samples and
    frames), its last-chunk mean, and the world's numbers minus the baseline's where present, with `missed`: which
    of adherent's checks (the object shown in half the frames, colour, shape, direction) failed, in how many samples
    ("shown 1/2; shape 1/2")."""
    import pandas as pd

    rel = ds.latent_distance_rel
    n = int(ds.attrs.get("num_frame_per_block", 3))
    specs = [json.loads(str(x)) for x in ds.intervention_spec.values]
    rows = pd.DataFrame({
        "kind": ds.intervention_kind.values,
        "mode": [sp.get("mode", "") if sp.get("kind") == "ablate" else sp.get("policy", "") or "" for sp in specs],
        "layer": ds.target_layer.values, "head": ds.target_head.values,
        "effect": rel.mean(["sample", "frame"]).values,
        "effect_last_chunk": rel.isel(frame=slice(-n, None)).mean(["sample", "frame"]).values,
    }, index=pd.Index(ds.intervention.values, name="intervention"))
    if "latent_motion" in ds and "baseline" in ds.intervention.values:
        motion = ds.latent_motion.mean(["sample", "frame"])
        rows["motion_change"] = (motion / motion.sel(intervention="baseline") - 1).values
    if "world_trajectory_error" in ds:
        base = ds.sel(intervention="baseline") if "baseline" in ds.intervention.values else None
        for k in ("trajectory_error", "adherent", "speed", "confidence"):
            v = ds[f"world_{k}"].mean("sample")
            rows[k] = v.values
            if base is not None:
                rows[f"d_{k}"] = (v - base[f"world_{k}"].mean("sample")).values
        checks = [c for c in ("colour", "shape", "direction") if f"world_{c}_ok" in ds]
        if checks:  # which of adherent's checks failed, in how many samples (a miss is not always the prompt's)
            failed = {c: (ds[f"world_{c}_ok"] < 1).sum("sample").values for c in checks}
            if "world_detected" in ds:  # (studies/world_metrics.py MIN_SHOWN: the object in half the frames)
                from studies.world_metrics import MIN_SHOWN

                # (where the stored adherent agrees: a store scored before the rule holds such videos adherent)
                lost = (ds.world_detected < MIN_SHOWN) & (ds.world_adherent < 1) if "world_adherent" in ds else \
                    ds.world_detected < MIN_SHOWN
                failed = {"shown": lost.sum("sample").values, **failed}
                checks = ["shown", *checks]
            count = ds.sizes["sample"]
            rows["missed"] = ["; ".join(f"{c} {int(failed[c][i])}/{count}" for c in checks if failed[c][i])
                              for i in range(ds.sizes["intervention"])]
    return rows.sort_values("effect", ascending=False)


def ranking_text(path, top: int = 20) -> str:
    from workbench.progress import columns, fit, printable, shell_word
    from workbench.store import open_store

    ds = open_store(path)
    table = ranking(ds)
    table.index = [printable(label) for label in table.index]  # (a shared store's labels: shown, never obeyed)
    lines = [f"wrote {path}: {ds.sizes['intervention']} entries (baseline included) x {ds.sizes['sample']} "
             f"sample(s) x {ds.sizes['frame']} latent frames",
             "effect = mean over samples and frames of the latent RMS distance to the baseline / the baseline's RMS",
             "motion_change = mean latent_motion (frame-to-frame RMS change) / the baseline's - 1"]
    cols = [c for c in ("effect", "effect_last_chunk", "motion_change", "trajectory_error", "d_trajectory_error",
                        "adherent", "speed") if c in table]
    shown = table.head(top)
    # columns as wide as their names: the table fits a terminal of ~120 columns
    name = min(36, max([12, *(columns(str(x)) for x in shown.index)]))  # (terminal columns: 温度 takes 4)
    width = {c: max(8, len(c)) + 2 for c in cols}
    lines.append(f"{'intervention':<{name}}" + "".join(f"{c:>{width[c]}}" for c in cols))
    from studies.world_metrics import NUMBERS, mean_unit  # (the world columns' units: means over samples; d_: the
    units = {c: mean_unit(c.removeprefix("d_")) for c in cols if c.removeprefix("d_") in NUMBERS}  # change)
    if units:  # (the world tracker's numbers: their units under their names)
        lines.append(f"{'(units)':<{name}}" + "".join(f"{units.get(c, ''):>{width[c]}}" for c in cols))
    for label, r in shown.iterrows():
        lines.append(fit(label, name) + "".join(f"{r[c]:>{width[c]}.4f}" for c in cols))
    if "missed" in shown and any(shown["missed"]):  # (adherent 0 is not always the prompt's colour or direction)
        lines.append("adherent's checks that failed (in how many samples): " + "; ".join(
            f"{fit(label, name).rstrip()}: {missed}" for label, missed in shown["missed"].items() if missed))
    if len(table) > top:
        lines.append(f"... {len(table) - top} more (workbench report {printable(shell_word(path))})")
    lines.append(f"render it: workbench report {printable(shell_word(path))}")
    return "\n".join(lines)
