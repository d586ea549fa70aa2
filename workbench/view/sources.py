"""What the viewer shows, from a finished store and its videos or from a live stream folder, behind one interface.

A `Source` answers four questions, each for one sample (a prompt and a seed, the store's `sample` id):
    meta()                     samples, layers, heads, steps (with their timestep / phase labels), frame counts
    state(sample)              which chunks and pixel frames exist yet (a live stream grows; a store is whole)
    attn(sample, layer, step)  attn_mass [head, query_frame, key_frame], NaN where not attended or not yet made
    frame(sample, t)           pixel frame t as uint8 [H, W, 3], or None where there is no video (yet)

Frames. The Wan VAE (models/wan/vae.py) decodes latent frame 0 to one pixel frame (its causal first frame) and every
later latent frame f to four, pixel frames 4f - 3 .. 4f: 21 latent frames <-> 81 pixel frames. So pixel frame t
shows latent frame ceil(t / 4). Chunks come from the data's own labels: the store's `query_chunk` coordinate, or
the chunk labels a live rollout wrote (workbench/view/stream.py), never from counting frames in threes.

Videos of a store: `workbench generate` writes OUT/pPPPP-sS.mp4 for each prompt index P and seed S, the store's
sample ids, so a folder of generate outputs pairs with a store by name (`find_videos`). A name says nothing of the
model, so each video is checked against the latents file generate wrote beside it (pPPPP-sS.safetensors, whose
metadata records the prompt, seed, sampler and weights that made it; `video_mismatch`): a video of another run is
refused when named with --video, and otherwise left out with the reason shown on the page. A missing or refused
video's message gives the command that makes it (`generate_command`: the store's model and settings as generate's
flags), which `workbench report` gives too.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from models.wan.vae import SPATIAL_STRIDE, TEMPORAL_STRIDE, pixel_frames
from workbench.errors import WorkbenchError
from workbench.store import beside, image_of, named
from workbench.store_guard import StoreChanged
from workbench.view import stream


def latent_of_pixel(t: int) -> int:
    """The latent frame that pixel frame t was decoded from: 0 for t = 0, then ceil(t / 4)."""
    return 0 if t == 0 else (t - 1) // TEMPORAL_STRIDE + 1


def pixel_span(f: int) -> tuple[int, int]:
    """[first, stop) of the pixel frames decoded from latent frame f: (0, 1) for f = 0, (4f - 3, 4f + 1) after."""
    return (0, 1) if f == 0 else (TEMPORAL_STRIDE * (f - 1) + 1, TEMPORAL_STRIDE * f + 1)


def chunk_table(labels: dict[int, int | None]) -> list[dict]:
    """{latent frame: chunk label or None (not made yet)} -> one entry per chunk, in order of its first frame:
    {chunk, query_frames, pixel_first, pixel_stop} (its frames' pixel frames, [first, stop))."""
    chunks: dict[int, list[int]] = {}
    for f in sorted(labels):
        if labels[f] is not None:
            chunks.setdefault(int(labels[f]), []).append(int(f))
    table = []
    for c, frames in sorted(chunks.items(), key=lambda kv: kv[1][0]):
        table.append(dict(chunk=c, query_frames=frames, pixel_first=pixel_span(frames[0])[0],
                          pixel_stop=pixel_span(frames[-1])[1]))
    return table


def step_label(s: dict) -> str:
    """'0 · t=1000 · denoise' (and the CFG branch where there is one)."""
    text = f"{s['step']} · t={round(s['timestep'], 1):g} · {s['phase']}"  # (as the reports: 833.3)
    return text + (f" · {s['cfg']}" if s.get("cfg", "none") != "none" else "")


def read_video(path: Path, expected: int) -> tuple[np.ndarray, float]:
    """Every frame of a video as uint8 [T, H, W, 3] and its fps; T must be `expected` (1 + 4 (F - 1))."""
    import imageio.v3 as iio

    try:
        frames = iio.imread(path)
        fps = float(iio.immeta(path).get("fps") or 16)
    except Exception as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WorkbenchError(f"cannot read video {str(path)!r} (not a video file imageio can decode: {why[:120]}); "
                             "give the mp4 `workbench generate` wrote for this store's sample") from None
    if frames.ndim == 3:  # greyscale
        frames = np.repeat(frames[..., None], 3, axis=-1)
    frames = frames[..., :3]
    if frames.shape[0] != expected:
        raise WorkbenchError(
            f"video {str(path)!r} has {frames.shape[0]} frames; the attention covers {latent_of_pixel(expected - 1) + 1} "
            f"latent frames, which the Wan VAE decodes to {expected} (its causal first frame, then 4 per latent frame)")
    return frames, fps


class Source:
    """The interface (see the module docstring). Subclasses fill `layers`, `heads`, `steps`, `num_frames`."""

    kind = "source"
    live = False
    layers: list[int]
    heads: list[int]
    steps: list[dict]
    num_frames: int
    fps: float = 16.0
    image: str | None = None  # image-to-video: the image that is frame 0 (its chunk has a context pass only)

    @property
    def pixel_frames(self) -> int:
        return pixel_frames(self.num_frames)

    def samples(self) -> list[dict]:
        raise NotImplementedError

    def meta(self) -> dict:
        return dict(kind=self.kind, live=self.live, name=self.name, num_frames=self.num_frames,
                    pixel_frames=self.pixel_frames, fps=self.fps,
                    pixel_to_latent=[latent_of_pixel(t) for t in range(self.pixel_frames)],
                    layers=self.layers, heads=self.heads, image=self.image,
                    steps=[dict(s, label=step_label(s)) for s in self.steps], samples=self.samples())

    # --- argument checks: a clear error naming the bad value and what is allowed
    def check_sample(self, sample) -> str:
        ids = [s["sample"] for s in self.samples()]
        if sample not in ids:
            raise WorkbenchError(f"sample {sample!r} is not in {self.name}; it holds {[str(i) for i in ids]}")
        return sample

    def check(self, layer, step) -> tuple[int, int]:
        """Positions of a layer and a step (given as their coordinate values) in the arrays."""
        out = []
        for what, value, allowed in (("layer", layer, self.layers), ("step", step, [s["step"] for s in self.steps])):
            try:
                out.append(allowed.index(int(value)))
            except (TypeError, ValueError):
                raise WorkbenchError(f"{what} {value} is not captured here; choose one of {allowed}") from None
        return out[0], out[1]

    def check_pixel(self, t) -> int:
        try:
            ok = 0 <= int(t) < self.pixel_frames
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise WorkbenchError(f"pixel frame {t} out of range: the video has frames 0-{self.pixel_frames - 1}")
        return int(t)


class StoreSource(Source):
    """A finished store (docs/store.md) and the videos generate wrote for its samples (any may be missing).

    An effects store (`workbench intervene --capture LAYERS`, dim intervention) shows each entry's rollout of
    each sample as one item of the sample menu, id "LABEL · SAMPLE" (the baseline's too), with the video that
    `--save-videos` wrote for it (NAME_videos/LABEL/SAMPLE.mp4)."""

    kind = "store"

    def __init__(self, path, videos: dict[str, Path] | None = None, cache: int = 4):
        from workbench.store import open_store

        self.path = Path(path)
        self.name = named(self.path).name  # (`view .` inside the store: its own name)
        ds = open_store(self.path)
        if "train_step" in ds.dims:
            raise WorkbenchError(f"{str(self.path)!r} is a training probe store (a train_step dim); make one store of "
                                 "a train step first: open_store(path).sel(train_step=N).to_zarr(...)")
        effects = "intervention" in ds.dims
        if "attn_mass" not in ds:
            how = ("run `workbench intervene` with --capture LAYERS (each entry's attention, beside its effects)"
                   if effects else "capture it with `workbench extract --stats attn_mass`")
            raise WorkbenchError(f"{str(self.path)!r} has no attn_mass (its variables: {sorted(ds.data_vars)}); "
                                 f"{how}")
        self.ds = ds
        self.image = image[0] if (image := image_of(ds.attrs)) else None
        # menu item id -> (intervention label or None, sample id)
        self.items = {(f"{e} · {s}" if effects else s): (e if effects else None, s)
                      for e in (ds["intervention"].values if effects else [None]) for s in ds["sample"].values}
        self.layers = [int(v) for v in ds["layer"].values]
        self.heads = [int(v) for v in ds["head"].values]
        self.steps = [dict(step=int(s), timestep=float(t), phase=str(p), cfg=str(c), denoise_index=int(d))
                      for s, t, p, c, d in zip(ds["step"].values, ds["timestep"].values, ds["phase"].values,
                                               ds["cfg"].values, ds["denoise_index"].values)]
        self.num_frames = int(ds.sizes["query_frame"])
        self.query_chunk = {int(f): int(c) for f, c in zip(ds["query_frame"].values, ds["query_chunk"].values)}
        self.ids = list(self.items)
        self._frames: OrderedDict[str, np.ndarray] = OrderedDict()  # decoded videos, the most recent few
        self._cache = cache
        self.video_errors: dict[str, str] = {}  # sample -> why its video is left out
        self._run_flags: list[str] | None = None  # generate's flags for this store's run (`make_video`)
        self._position = {str(s): i for i, s in enumerate(ds["sample"].values)}
        self.videos = {}
        for sample, path in (videos or {}).items():
            if why := video_mismatch(ds, sample, path, make=lambda s=sample, p=path: self.make_video(s, over=p)):
                self.video_errors[sample] = why
            else:
                self.videos[sample] = path
        self._video_stamps = {sample: _stamp(path) for sample, path in self.videos.items()}  # (as opened)
        # the menu, made once (a finished store does not change; every request checks its sample against it)
        ids = [str(v) for v in ds["sample"].values]
        index = ([int(v) for v in ds["prompt_index"].values] if "prompt_index" in ds.coords
                 else [int(s[1:s.index("-")]) for s in ids])  # (effects stores: the id's pPPPP)
        about = {s: dict(prompt=str(prompt), seed=int(seed), prompt_index=i)
                 for s, prompt, seed, i in zip(ids, ds["prompt"].values, ds["seed"].values, index)}
        self._samples = [dict(sample=item, **about[str(s)], video=item in self.videos,
                              **({} if entry is None else {"intervention": str(entry)}))
                         for item, (entry, s) in self.items.items()]

    def samples(self) -> list[dict]:
        return self._samples

    def make_video(self, sample: str, over: Path | None = None) -> str | None:
        """The `workbench generate` command that makes the video of one of the store's samples where the viewer
        looks for it (the run's model, sampler and size flags, from the store's config; `--overwrite` where `over`,
        another run's video, sits in that folder); None for an effects store's entry (intervene makes those)."""
        entry, sample = self.items.get(sample, (None, sample))
        if entry is not None:
            return None
        if self._run_flags is None:  # (the store's config read once, not once a sample)
            self._run_flags = run_flags(self.ds)
        folder = videos_folder(self.path)
        command = generate_command(self.ds, self._position[sample], folder, self._run_flags)
        return command + (" --overwrite" if over is not None and Path(over).parent == folder else "")

    def video(self, sample: str) -> np.ndarray | None:
        """The sample's decoded video [T, H, W, 3] (kept for the last few samples), None if it has none."""
        if sample not in self.videos:
            return None
        if _stamp(self.videos[sample]) != self._video_stamps[sample]:  # (the store's guard does not see videos)
            raise StoreChanged(f"{self.videos[sample]} was replaced or removed after the store was opened (another "
                               "run's --save-videos or --overwrite): its frames may not be this store's")
        if sample not in self._frames:
            frames, self.fps = read_video(self.videos[sample], self.pixel_frames)
            self._frames[sample] = frames
            while len(self._frames) > self._cache:
                self._frames.popitem(last=False)
        self._frames.move_to_end(sample)
        return self._frames[sample]

    def state(self, sample) -> dict:
        sample = self.check_sample(sample)
        error = self.video_errors.get(sample)
        try:
            ready = 0 if self.video(sample) is None else self.pixel_frames
        except WorkbenchError as err:
            ready, error = 0, str(err)
        if ready == 0 and error is None and self.items[sample][0] is not None:
            error = ("no video of this entry: `workbench intervene ... --save-videos` writes one per entry and "
                     "sample beside the store")
        make = self.make_video(sample) if ready == 0 and error is None else None  # (how its video is made)
        chunks = [dict(c, ready=True) for c in chunk_table(self.query_chunk)]
        return dict(sample=sample, status="finished", done=True, chunks=chunks, frames_ready=ready,
                    video=ready > 0, video_error=error, make_video=make, samples=len(self.ids))

    def attn(self, sample, layer, step) -> np.ndarray:
        entry, sample = self.items[self.check_sample(sample)]
        self.check(layer, step)
        if not (self.path / "zarr.json").is_file():  # (zarr reads a deleted store's chunks as NaN: "not attended")
            raise WorkbenchError(f"the store {str(self.path)!r} is gone (deleted or moved while the viewer ran); "
                                 "start the viewer again on a store")
        where = dict(sample=sample, layer=int(layer), step=int(step))
        if entry is not None:
            where["intervention"] = entry
        values = self.ds.attn_mass.sel(where)
        return np.asarray(values.transpose("head", "query_frame", "key_frame").values, dtype=np.float32)

    def frame(self, sample, t) -> np.ndarray | None:
        sample, t = self.check_sample(sample), self.check_pixel(t)
        frames = self.video(sample)
        return None if frames is None else frames[t]


class StreamSource(Source):
    """A folder that `workbench generate --live` writes into (or wrote): re-read whenever its manifest changes."""

    kind = "live"
    live = True

    def __init__(self, folder, cache: int = 32):
        self.folder = Path(folder)
        self.name = named(self.folder).name  # (`view .` inside the folder: its own name)
        self._stamp = None
        self._chunks: OrderedDict[tuple, dict] = OrderedDict()  # (chunk file, inode, mtime) -> its arrays, recent
        self._cache = cache
        self._load()

    def _load(self) -> dict:
        path = self.folder / stream.MANIFEST
        st = path.stat() if path.exists() else None  # the manifest is replaced by a rename: a new inode
        stamp = None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp or stamp is None:
            m = stream.read_manifest(self.folder)
            self.manifest, self._stamp = m, stamp
            self.layers, self.heads, self.steps = m["layers"], m["heads"], m["steps"]
            self.num_frames, self.fps = int(m["num_frames"]), float(m["fps"])
            self.image = m.get("image")  # (image-to-video; absent in streams written before it was recorded)
        return self.manifest

    def _entry(self, sample) -> dict:
        self._load()
        sample = self.check_sample(sample)
        return next(s for s in self.manifest["samples"] if s["sample"] == sample)

    def _arrays(self, entry: dict) -> dict:
        st = stream.chunk_path(self.folder, entry).stat()  # a new run into the same folder rewrites the same names
        key = (entry["file"], st.st_ino, st.st_mtime_ns)
        if key not in self._chunks:
            self._chunks[key] = stream.read_chunk(self.folder, entry)
            while len(self._chunks) > self._cache:
                self._chunks.popitem(last=False)
        self._chunks.move_to_end(key)
        return self._chunks[key]

    def samples(self) -> list[dict]:
        return [dict(sample=s["sample"], prompt=s["prompt"], seed=s["seed"], prompt_index=s["prompt_index"],
                     video=any(c["pixel_frames"][1] > c["pixel_frames"][0] for c in s["chunks"]))
                for s in self._load()["samples"]]

    def meta(self) -> dict:
        self._load()
        return dict(super().meta(), status=self.manifest["status"])

    def state(self, sample) -> dict:
        entry = self._entry(sample)
        labels: dict[int, int | None] = {f: None for f in range(self.num_frames)}
        for c in entry["chunks"]:
            labels.update({f: c["chunk"] for f in c["query_frames"]})
        chunks = [dict(c, ready=True) for c in chunk_table(labels)]
        covered = set()
        for c in entry["chunks"]:
            covered.update(range(*c["pixel_frames"]))
        ready = 0
        while ready in covered:  # pixel frames 0..ready-1 are all there
            ready += 1
        return dict(sample=entry["sample"], status=self.manifest["status"], done=entry["done"], chunks=chunks,
                    frames_ready=ready, video=ready > 0, video_error=None, samples=len(self.manifest["samples"]))

    def attn(self, sample, layer, step) -> np.ndarray:
        entry = self._entry(sample)
        li, si = self.check(layer, step)
        F = self.num_frames
        out = np.full((len(self.heads), F, F), np.nan, dtype=np.float32)  # [head, query_frame, key_frame]
        for c in entry["chunks"]:
            out[:, c["query_frames"], :] = self._arrays(c)["attn_mass"][si, li]  # [head, nq, F]
        return out

    def frame(self, sample, t) -> np.ndarray | None:
        entry, t = self._entry(sample), self.check_pixel(t)
        for c in entry["chunks"]:
            first, stop = c["pixel_frames"]
            if first <= t < stop:
                return self._arrays(c)["frames"][t - first]
        return None


# ------------------------------------------------------------------------------------------------------
# Opening what the user named


def _stamp(path) -> tuple | None:
    """A file's (size, mtime, inode), None when it is gone: what says it is the file that was opened."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def video_mismatch(ds, sample: str, video: Path, make=None) -> str | None:
    """Why `video` is not the video of the store's `sample`, or None. Read from the latents file `workbench generate`
    wrote beside it (same name, .safetensors): its prompt, seed, sampler, the weights' sha256 and key (generator or
    generator_ema), the text encoder, image, window, schedule and dtype, against the store's sample and its
    fingerprint (docs/store.md). A video without that file (or a file from before generate recorded the weights) is
    checked on what it has. `make`: the generate command that makes the right one (or a function giving it, called
    only for a video that differs), named in the message."""
    side = Path(video).with_suffix(".safetensors")
    if not side.is_file():
        return None
    from safetensors import safe_open

    from workbench.extract import SAME_VALUES  # (a store made before may record "bf16")

    try:
        with safe_open(str(side), "np") as f:
            made = f.metadata() or {}
            shape = list(f.get_slice("latents").get_shape()) if "latents" in f.keys() else None
    except Exception:  # not a generate output: nothing to compare
        return None
    i = [str(v) for v in ds["sample"].values].index(sample)
    fields = ds.attrs.get("fingerprint_fields") or {}
    model, layout = fields.get("model", {}), fields.get("layout", {})
    store_key = {"ema": "True", "gen": "False"}.get(model.get("key"))
    wanted = dict(prompt=str(ds["prompt"].values[i]), seed=str(int(ds["seed"].values[i])),
                  sampler=layout.get("sampler"), weights_sha256=model.get("weights"), use_ema=store_key,
                  text_encoder=model.get("text_encoder"), image_sha256=model.get("image", ""),
                  dtype=SAME_VALUES["model.dtype"].get(model.get("dtype"), model.get("dtype")))
    if "local_attn_size" in ds.coords and layout.get("sampler") != "bidirectional":  # (generate's "W+sinkS")
        wanted["window"] = f"{int(ds['local_attn_size'].values[i])}+sink{int(ds['sink_size'].values[i])}"
    shown = lambda k, v: f"no {k.replace('_sha256', '')}" if v == "" else repr(v)  # noqa: E731 ('' = none)
    differ = [f"{k} {shown(k, made[k])} (the store's: {shown(k, v)})" for k, v in wanted.items()
              if v is not None and k in made and str(made[k]) != str(v)]
    geometry = layout.get("geometry")  # [latent frames, latent height, latent width] of the store's run
    if shape is not None and len(shape) == 4 and isinstance(geometry, list) and len(geometry) == 3 \
            and [shape[0], shape[2], shape[3]] != [int(g) for g in geometry]:
        differ.append(f"latents of {shape[0]} frames x {shape[2]} x {shape[3]} (the store's: {geometry[0]} frames "
                      f"x {geometry[1]} x {geometry[2]}, a video of {SPATIAL_STRIDE * int(geometry[1])} x "
                      f"{SPATIAL_STRIDE * int(geometry[2])} "
                      "pixels)")
    if made.get("schedule") and layout.get("schedule") and layout.get("sampler") == "causal_few_step":
        if (why := _other_schedule(json.loads(made["schedule"]), layout)) is not None:
            differ.append(why)
    if not differ:
        return None
    make = make() if callable(make) else make
    return (f"{video} was not made by this store's run of sample {sample}: generate made it with "
            + "; ".join(differ) + f" ({side.name}). Make the video with "
            + (f"`{make}`" if make else "`workbench generate` and the store's model, prompt and seed")
            + ", or name the right one with --video")


def _other_schedule(made: dict, layout: dict) -> str | None:
    """How generate's few-step schedule (its metadata: denoising_step_list, warp, shift, context_noise,
    num_frame_per_block) differs from the store's (its steps' timesteps and chunk size), or None."""
    import dataclasses

    from workbench.extract import ExtractConfig, _schedule

    try:
        steps = _schedule(ExtractConfig(sampler="causal_few_step", denoising_step_list=made["denoising_step_list"],
                                        warp_denoising_step=made["warp"], timestep_shift=made["shift"],
                                        context_noise=made["context_noise"]))  # (its own sampler: few-step)
    except (KeyError, TypeError, ValueError):
        return None  # (a file that records it otherwise: nothing to compare)
    theirs = json.loads(json.dumps([dataclasses.astuple(s) for s in steps]))
    if theirs != layout["schedule"] or made.get("num_frame_per_block", layout.get("nfpb")) != layout.get("nfpb"):
        return (f"schedule {made} (timesteps {[round(s[1], 1) for s in theirs]}; the store's: "
                f"{[round(s[1], 1) for s in layout['schedule']]}, chunks of {layout.get('nfpb')})")
    return None


def generate_command(ds, i: int, out, flags: list[str] | None = None) -> str:
    """The `workbench generate` command that makes the video of the store's sample at position `i`: the run's
    flags (`run_flags`, or `flags` as it gave them), the sample's seed and `--out out`."""
    import shlex

    flags = run_flags(ds) if flags is None else flags
    return shlex.join(["workbench", "generate", *flags, "--seed", str(int(ds["seed"].values[i])), *_flag("--out", out)])


def _flag(name: str, value) -> list[str]:
    """[name, value], or [name=value] for a value that starts with '-' (a prompt or a path such as -x), which
    argparse would take for a flag."""
    return [f"{name}={value}"] if str(value).startswith("-") else [name, str(value)]


def run_flags(ds) -> list[str]:
    """generate's flags for the run that made the store: its settings (its `config_yaml`, as resolved: model,
    sampler, schedule, window, size, frames) and every prompt of the store in order (generate names its files by
    prompt index, as the store its samples)."""
    import yaml

    from workbench.extract import ExtractConfig
    from workbench.weights import SAMPLER_DEFAULTS

    c = (yaml.safe_load(str(ds.attrs.get("config_yaml", ""))) or {}).get("extract") or {}
    flags = []
    if c.get("model"):  # (a zoo model: its name sets the weights and the sampler defaults)
        from models.wan.embedded import ZOO

        flags += ["--model", str(c["model"])]
        own = ZOO.get(str(c["model"]))
        ref = {k: getattr(own, k) for k in SAMPLER_DEFAULTS} if own is not None else dict(SAMPLER_DEFAULTS)
    else:
        flags += _flag("--wan-dir", c["wan_dir"]) if c.get("wan_dir") else []
        flags += _flag("--checkpoint", c["checkpoint"]) if c.get("checkpoint") else []
        flags += ["--use-ema"] if c.get("use_ema") else []
        ref = dict(SAMPLER_DEFAULTS)
    defaults = ExtractConfig(prompts=["x"])
    for key, default in [*ref.items(), *((k, getattr(defaults, k)) for k in (
            "timestep_shift", "context_noise", "num_frame_per_block", "local_attn_size", "sink_size", "height",
            "width", "image"))]:
        if key in c and c[key] is not None and c[key] != default:
            flags += _flag(f"--{key.replace('_', '-')}", c[key])
    if c.get("denoising_step_list") and list(c["denoising_step_list"]) != defaults.denoising_step_list:
        flags += ["--denoising-step-list", ",".join(str(t) for t in c["denoising_step_list"])]
    if c.get("warp_denoising_step") is False:
        flags += ["--no-warp-denoising-step"]
    if c.get("independent_first_frame"):
        flags += ["--independent-first-frame"]
    if c.get("trust_pickle"):
        flags += ["--trust-pickle"]
    frames = c.get("num_frames") or (ds.sizes["key_frame"] if "key_frame" in ds.dims else None)
    flags += ["--frames", str(frames)] if frames else []
    index = ds["prompt_index"].values if "prompt_index" in ds.coords else np.zeros(ds.sizes["sample"], int)
    prompts = dict(sorted(zip((int(x) for x in index), (str(p) for p in ds["prompt"].values))))
    for p in prompts.values():
        flags += _flag("--prompt", p)
    return flags


def _plain(sample: str) -> bool:
    """Whether a sample id is a plain file name (a store made elsewhere may hold `../x` or `a/b`: never followed)."""
    return Path(sample).name == sample and sample not in (".", "..")


def videos_folder(store: Path) -> Path:
    """Where `workbench generate` outputs of a store go: runs/x.zarr -> runs/x/; a store named without .zarr
    (runs/x, runs/x.v1.5): beside it, never into the store or a folder of another name; `.` inside the store: its
    own name."""
    store = named(store)
    return beside(store, "") if store.name.endswith(".zarr") and store.name != ".zarr" else store.parent


def find_videos(store: Path, video: str | None, samples: list[str], sample: str | None = None) -> dict[str, Path]:
    """Which mp4 shows which sample. `video` is a file (the video of `sample`, or of the store's only sample) or a
    folder of generate outputs (pPPPP-sS.mp4 per sample); without it: the store's name with .mp4 (one sample), or
    such files beside the store or in the folder of the store's name (runs/x.zarr -> runs/x/)."""
    if sample is not None and sample not in samples:
        raise WorkbenchError(f"--sample {sample!r} is not in {str(store)!r}; it holds {[str(s) for s in samples]}")
    store = named(store)  # (`view .` inside the store)
    if video is not None:
        path = Path(video)
        if path.is_file():
            if sample is None and len(samples) > 1:
                raise WorkbenchError(f"--video {video!r} is one video but {str(store)!r} holds {len(samples)} samples "
                                     f"({', '.join(samples[:4])}...); say which with --sample, or give a folder of "
                                     "generate outputs (pPPPP-sS.mp4 per sample)")
            return {sample or samples[0]: path}
        if path.is_dir():
            found = {s: path / f"{s}.mp4" for s in samples if _plain(s) and (path / f"{s}.mp4").is_file()}
            if not found:
                raise WorkbenchError(f"--video folder {video!r} has no video of this store's samples (looked for "
                                     f"{', '.join(f'{s}.mp4' for s in samples[:3])}...)")
            return found
        raise WorkbenchError(f"--video {video!r} does not exist (give an mp4, or a folder of generate outputs)")
    found = {}
    # (a link to the store: its videos beside the link, else beside the store itself, as videos_dir finds them)
    for place in dict.fromkeys([store] + ([store.resolve()] if store.is_symlink() else [])):
        own = beside(place, ".mp4")  # (run.v1.5 -> run.v1.5.mp4, not run.v1.mp4)
        if own.is_file() and (len(samples) == 1 or sample is not None):
            return {sample or samples[0]: own}
        for folder in dict.fromkeys((videos_folder(place), place.parent)):
            for s in samples:
                if s not in found and _plain(s) and (folder / f"{s}.mp4").is_file():
                    found[s] = folder / f"{s}.mp4"
        if found:
            return found
    return found


def open_source(path, video: str | None = None, sample: str | None = None) -> Source:
    """A store (with its videos) or a live stream folder; a clear error for anything else."""
    path = Path(path)
    if stream.is_stream(path):
        if video is not None:
            raise WorkbenchError(f"{str(path)!r} is a live stream folder: its frames are in it; drop --video")
        return StreamSource(path)
    if not (path / "zarr.json").is_file():
        raise WorkbenchError(f"{str(path)!r} is neither a store (docs/store.md; made by `workbench extract`) nor a "
                             f"folder written by `workbench generate --live` (it would hold {stream.MANIFEST}); for "
                             "a live run that is still starting, add --wait")
    from workbench.store import open_store

    ds = open_store(path)
    if "intervention" in ds.dims:  # an effects store: the videos --save-videos wrote, per entry and sample
        if video is not None or sample is not None:
            raise WorkbenchError(f"{str(path)!r} is an effects store (workbench intervene): its videos are those "
                                 "--save-videos wrote beside it, one per entry and sample; drop --video and --sample "
                                 "(the page's menu picks them)")
        from workbench.intervene import saved_videos, video_file

        found = {f"{e} · {s}": video_file(path, str(e), str(s), ".mp4", ds.attrs)
                 for e in ds["intervention"].values for s in ds["sample"].values
                 if saved_videos(ds.attrs, e)}  # (files of other entries there may be an older store's)
        return StoreSource(path, {k: v for k, v in found.items() if v.is_file()})
    ids = [str(s) for s in ds["sample"].values]
    source = StoreSource(path, find_videos(path, video, ids, sample))
    if video is not None:  # a video the user named: refused if it is another run's, its frame count checked now
        if not source.videos:
            raise WorkbenchError(next(iter(source.video_errors.values())))
        first = sample or next(iter(source.videos))
        source.video(first)
    return source
