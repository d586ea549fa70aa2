"""`workbench extract`: run rollouts with the statistics probe attached and write whole samples to a store.

    ExtractConfig --validate--> model + text encoder + schedule --for each (prompt, seed) not yet in the store-->
        noise(seed) -> sampler (few-step causal | multi-step causal CFG | bidirectional) with StatsProbe attached
        -> host arrays [step, layer, head, query_frame, key_frame] -> StoreWriter.write (one append per sample)

Everything that can be wrong with the request (layer or head out of range, unknown statistic, frames that do
not divide into chunks, an incompatible existing store, an empty prompt file) is found before the first
forward. Under `torchrun --nproc_per_node=K` the samples are dealt out to the ranks and rank 0 writes them in
order, so the store is the same as a single-process run's.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.common.attention_kernels import check_kernel, describe, refusals
from models.common.rollout import (CONTEXT_NOISE_MULTI_STEP, IMAGE_CONTEXT_NOISE, SAMPLERS, MultiStepSolver,
                                   few_step_schedule, multistep_schedule, sample, seeded_noise)
from models.common.scheduler import FlowMatchScheduler
from models.common.window import check_window_room
from models.errors import ModelInputError
from models.files import check_unchanged
from models.wan.checkpoint import load_wan, sha256_file, wan_weights_file, weights_sha256
from models.wan.embedded import require_embedded_dir
from models.wan.text_encoder import check_encoder_files, earlier_identities, wan_dir_encoder_identity
from workbench.capture import CaptureSpec, Geometry, StatsProbe, resolve_mode
from workbench.chunking import block_sizes_of, image_latent  # noqa: F401 (block_sizes_of: the nnsight recipe)
from workbench.inputs import check_device, parse_int_list  # noqa: F401 (re-exported: they were here)
from workbench.inputs import check_prompts
from workbench.chunking import check_image_frames
from workbench.errors import WorkbenchError
from workbench.statistics import DEFAULT_STATS, check_stats
from workbench.statistics import identities as stat_identities
from workbench.store import (SCHEMA_VERSION, StoreLayout, StoreWriter, ema_suffix, sample_dataset, sample_id,
                             stats_in_store_order)
from workbench.store_lock import StoreLock
from workbench.weights import (check_wan_dir, check_weights_args, resolve_model,  # noqa: F401 (resolve_model: the API)
                               run_files, wan_dir_hint)

DEFAULT_PROMPT = "A majestic eagle soaring through a cloudy sky, cinematic lighting"  # the researchers' scripts'
WORLD_PROMPT = "a red square moving right"  # the embedded zoo's default: a prompt of its world (models/world.py)


def default_prompts(wan_dir) -> list[str]:
    """The prompts a run makes when none is given: the researchers' eagle prompt for a Wan folder (so that runs
    compare with their scripts), a prompt of the miniature world for the embedded zoo (wan_dir None), whose models
    know nothing else and would draw no clear object for the eagle."""
    return [DEFAULT_PROMPT] if wan_dir else [WORLD_PROMPT]


@dataclass
class ExtractConfig:
    """One extraction run. Lists are resolved (no ranges); None means the default described per field."""

    layers: list[int] | None = None  # None: every layer
    heads: list[int] | None = None  # None: every head
    steps: list[int] | None = None  # None: every step of the schedule
    stats: list[str] = field(default_factory=lambda: list(DEFAULT_STATS))
    token_layers: list[int] | None = field(default_factory=list)  # None: every captured layer
    prompts: list[str] | None = None  # None: default_prompts(wan_dir), set at construction
    seeds: list[int] = field(default_factory=lambda: [42])
    num_frames: int = 21
    # which weights: `model`, a model of the embedded zoo by name (models/wan/embedded.py ZOO: teacher, df, ode,
    # dmd, sid), or wan_dir / checkpoint / use_ema; none of them: the zoo's default, the Self-Forcing DMD student
    # (the same default as `workbench extract`; `resolve_model` turns a name into its checkpoint and use_ema)
    model: str | None = None
    wan_dir: str | None = None  # None: the embedded folder, data/embedded
    checkpoint: str | None = None  # a Self-Forcing .pt
    use_ema: bool = False
    trust_pickle: bool = False
    sampler: str | None = None  # None: the model's own (a zoo model's, its table's), else causal_few_step
    # the few-step sampler's schedule, as the researchers' inference configs set it (their keys; --config reads one)
    denoising_step_list: list[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    warp_denoising_step: bool = True  # steps mapped onto the shifted grid (1000, 937.5, 833.3, 625); False: as given
    timestep_shift: float = 5.0  # their model_kwargs.timestep_shift
    context_noise: float = 0.0
    num_inference_steps: int | None = None  # multi-step samplers; None: the model's own, else 50
    guidance_scale: float | None = None  # multi-step samplers; None: the model's own, else 5.0
    negative_prompt: str = ""
    local_attn_size: int = -1
    sink_size: int = 0
    num_frame_per_block: int = 3
    independent_first_frame: bool = False  # frame 0 is a chunk of its own, then chunks of num_frame_per_block
    image: str | None = None  # image-to-video: this image's VAE latent is frame 0 (needs independent_first_frame)
    height: int | None = None  # pixels; None: the model folder's own size (models.wan.config.default_video_size):
    width: int | None = None  # 96 x 128 for the embedded default, 480 x 832 for Wan2.1
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 (bf16) | float16 | float64
    out: str = "runs/extract.zarr"
    mode: str = "resume"  # resume | append | overwrite
    batch_size: int = 1
    progress: bool = True
    capture_mode: str = "auto"  # auto | exact | indicator | fused (workbench.capture.StatsProbe)
    attention_kernel: str = "auto"  # auto | triton (models.common.attention_kernels.CHOICES)

    def __post_init__(self):
        if self.prompts is None:
            self.prompts = default_prompts(self.wan_dir)


# ------------------------------------------------------------------------------------------------------
# Resolving and validating


def check_window(local_attn_size: int, sink_size: int, chunk_frames: int) -> None:
    """A KV window (-1: global) must hold the sink and a chunk (models/common/window.py `check_window_room`): one
    line naming the flag otherwise (the cache could not place the chunk)."""
    try:
        check_window_room(local_attn_size, sink_size, chunk_frames, name="--local-attn-size")
    except ModelInputError as err:
        raise WorkbenchError(str(err)) from None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise WorkbenchError(f"dtype {name!r}: use one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(name: str) -> str:
    """torch's name of a dtype given by one of DTYPES' names ("bf16" is "bfloat16"), so that a store records one
    name for one dtype; a WorkbenchError naming the allowed ones otherwise."""
    return str(_dtype(name)).removeprefix("torch.")


@dataclass
class Plan:
    cfg: ExtractConfig
    model_config: object
    wan_dir: Path
    weights_file: Path
    spec: CaptureSpec
    schedule: list  # ForwardLabels of every step of the per-chunk schedule
    geometry: tuple[int, int, int]  # F, h, w (latent)
    frame_seq_len: int
    family: str
    checkpoint_label: str
    capture_mode: str  # the mode that runs ("auto" resolved for the device)


def _int_list(value, what: str) -> list[int] | None:
    """A request's layers, heads, steps or token layers as sorted distinct ints (an int alone as a list of one; None
    stays None: all), or a WorkbenchError naming what is not an int."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise WorkbenchError(f"{what}s {value!r}: give a list of ints, e.g. [0, 3] (None: all)")
    values = list(value)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
    if bad:
        raise WorkbenchError(f"{what}s {value!r}: {bad[:3]} {'is' if len(bad) == 1 else 'are'} not an int; give a "
                             "list of ints, e.g. [0, 3]")
    return sorted({int(v) for v in values})


def _check_request(cfg: ExtractConfig) -> ExtractConfig:
    """The request's lists and numbers in the form plan reads them, or a WorkbenchError naming the bad value: a
    prompt or a seed alone becomes a list of one, lists of layers, heads and steps are sorted without repeats."""
    def positive_int(value, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise WorkbenchError(f"{what} {value!r}: give a positive int")
        return int(value)

    prompts = [cfg.prompts] if isinstance(cfg.prompts, str) else cfg.prompts
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise WorkbenchError(f"prompts {cfg.prompts!r}: give a list of strings")
    seeds = [cfg.seeds] if isinstance(cfg.seeds, (int, np.integer)) and not isinstance(cfg.seeds, bool) else cfg.seeds
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise WorkbenchError(f"seeds {cfg.seeds!r}: give a list of ints, e.g. [0, 1]")
    seeds = list(seeds)
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < 2**63]
    if bad or not seeds:
        raise WorkbenchError(f"seeds {cfg.seeds!r}: give one or more ints in 0 .. 2**63 - 1"
                             + (f" ({bad[:3]} {'is' if len(bad) == 1 else 'are'} not)" if bad else ""))
    def number(value, what: str, integer: bool = False):
        ok = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
        if isinstance(value, bool) or not ok:
            raise WorkbenchError(f"{what} {value!r}: give {'an int' if integer else 'a number'}")
        return value

    for what in ("height", "width"):
        if getattr(cfg, what) is not None:
            number(getattr(cfg, what), what, integer=True)
    if not isinstance(cfg.out, (str, os.PathLike)):
        raise WorkbenchError(f"out {cfg.out!r}: give the store's path, e.g. 'runs/extract.zarr'")
    number(cfg.context_noise, "context_noise")
    number(cfg.timestep_shift, "timestep_shift")
    number(cfg.local_attn_size, "local_attn_size", integer=True)
    number(cfg.sink_size, "sink_size", integer=True)
    for what in ("warp_denoising_step", "independent_first_frame", "use_ema"):
        if not isinstance(getattr(cfg, what), (bool, np.bool_)):
            raise WorkbenchError(f"{what} {getattr(cfg, what)!r}: give True or False")
    if cfg.image is not None and not isinstance(cfg.image, (str, os.PathLike)):
        raise WorkbenchError(f"image {cfg.image!r}: give the path of an image file")
    number(cfg.guidance_scale, "guidance_scale")
    positive_int(cfg.num_inference_steps, "num_inference_steps")
    given = cfg.denoising_step_list
    if isinstance(given, str) or not hasattr(given, "__iter__") or \
            not all(isinstance(t, (int, float, np.number)) and not isinstance(t, bool) for t in given):
        raise WorkbenchError(f"denoising_step_list {given!r}: give a list of timesteps, e.g. [1000, 750, 500, 250]")
    steps_list = list(given)
    if not steps_list:
        raise WorkbenchError("denoising_step_list is empty: give the few-step sampler's timesteps, e.g. "
                             "[1000, 750, 500, 250]")
    if not 0 <= cfg.context_noise <= 1000:
        raise WorkbenchError(f"context_noise {cfg.context_noise!r}: a timestep in 0 .. 1000")
    if not np.isfinite(cfg.guidance_scale):  # (NaN runs a whole rollout of NaN)
        raise WorkbenchError(f"guidance_scale {cfg.guidance_scale!r}: give a finite number (the CFG samplers' scale)")
    stats = [x.strip() for x in cfg.stats.split(",") if x.strip()] if isinstance(cfg.stats, str) else list(cfg.stats)
    return dataclasses.replace(
        cfg, prompts=list(prompts), stats=stats, seeds=list(dict.fromkeys(int(s) for s in seeds)),
        layers=_int_list(cfg.layers, "layer"), heads=_int_list(cfg.heads, "head"), steps=_int_list(cfg.steps, "step"),
        token_layers=_int_list(cfg.token_layers, "token layer"),
        num_frames=positive_int(cfg.num_frames, "num_frames"),
        num_frame_per_block=positive_int(cfg.num_frame_per_block, "num_frame_per_block"),
        # (numpy's numbers and bools as Python's, which the model's config checks take; Python's as given, so that
        # the fingerprints of the stores they made stay theirs)
        **{k: getattr(cfg, k).item() for k in ("height", "width", "local_attn_size", "sink_size", "timestep_shift",
                                               "context_noise", "warp_denoising_step", "independent_first_frame",
                                               "use_ema") if isinstance(getattr(cfg, k), np.generic)},
        batch_size=positive_int(cfg.batch_size, "batch_size"), dtype=dtype_name(cfg.dtype))


def plan(cfg: ExtractConfig) -> Plan:
    """Validate the request against the model's config, without loading weights."""
    check_weights_args(cfg.checkpoint, cfg.use_ema, cfg.model, trust_pickle=cfg.trust_pickle)
    cfg = _check_request(resolve_model(cfg))
    if cfg.sampler not in SAMPLERS:
        raise WorkbenchError(f"sampler {cfg.sampler!r}; use one of {list(SAMPLERS)}")
    check_stats(cfg.stats, cfg.token_layers)
    check_prompts(cfg.prompts)
    if cfg.mode not in ("resume", "append", "overwrite"):
        raise WorkbenchError(f"mode {cfg.mode!r}; use resume, append or overwrite")
    check_kernel(cfg.attention_kernel)
    check_device(cfg.device)
    wan_dir = Path(cfg.wan_dir) if cfg.wan_dir else require_embedded_dir()
    check_wan_dir(wan_dir)
    from models.family import check_fits_cache, family_of

    arch = family_of(wan_dir)  # the architecture's family (the store's model_family says how it was trained)
    if cfg.sampler != "bidirectional":  # (the flags named, before the config they override says it of its file)
        check_window(cfg.local_attn_size, cfg.sink_size, cfg.num_frame_per_block)
    mc = arch.read_config(wan_dir, local_attn_size=cfg.local_attn_size, sink_size=cfg.sink_size)
    embedded = cfg.wan_dir is None
    mc, h, w, fsl = arch.video_geometry(wan_dir, cfg.height, cfg.width, mc)
    # the mode of the kernel that runs this model's calls (a small model's head_dim is not the Gluon forward's),
    # decided on the device this rank runs on
    capture_mode = resolve_mode(cfg.capture_mode, rank_device(cfg.device), cfg.attention_kernel,
                                dtype=_dtype(cfg.dtype), **kernel_geometry(mc, fsl))
    if cfg.image is not None:
        if cfg.sampler == "bidirectional" or not cfg.independent_first_frame:
            raise WorkbenchError("--image puts the image's latent in a chunk of its own: it needs a causal sampler "
                                 "and the independent-first-frame layout")
        if Path(cfg.image).is_dir():
            raise WorkbenchError(f"--image {cfg.image!r} is a folder; give an image file (PNG, JPEG, ...)")
        if not Path(cfg.image).is_file():
            raise WorkbenchError(f"--image {cfg.image!r} does not exist")
        check_image_frames(cfg.num_frames, cfg.num_frame_per_block)
    check_context_noise(cfg.sampler, cfg.context_noise, cfg.image is not None, captured=True)
    if cfg.sampler != "bidirectional":
        block_sizes_of(cfg)  # frames that do not fit the chunk layout (the window: checked above)
        check_fits_cache(cfg.num_frames, mc.local_attn_size, arch.cache_frames, label=f"--frames {cfg.num_frames}")
    elif cfg.independent_first_frame:
        raise WorkbenchError("--independent-first-frame is a chunk layout of the causal samplers; the bidirectional "
                             "sampler denoises every frame together")
    layers = cfg.layers if cfg.layers is not None else list(range(mc.num_layers))
    heads = cfg.heads if cfg.heads is not None else list(range(mc.num_heads))
    for what, values, n in (("layer", layers, mc.num_layers), ("head", heads, mc.num_heads)):
        bad = sorted(v for v in values if not 0 <= v < n)
        if bad:
            raise WorkbenchError(f"{what} {bad} out of range: the model has {what}s 0-{n - 1}")
        if not values:
            raise WorkbenchError(f"no {what} selected; the model has {what}s 0-{n - 1}")
    schedule = _schedule(cfg)
    steps = cfg.steps if cfg.steps is not None else [s.step for s in schedule]
    bad = sorted(set(steps) - {s.step for s in schedule})
    if bad:
        raise WorkbenchError(f"step {bad} out of range: the {cfg.sampler} schedule has steps 0-{len(schedule) - 1}")
    token_layers = layers if cfg.token_layers is None else cfg.token_layers
    spec = CaptureSpec(tuple(layers), tuple(heads), tuple(sorted(steps)), tuple(cfg.stats), tuple(token_layers))
    family = "self_forcing" if cfg.checkpoint else "wan"
    # the weights by a name that means the same on every machine: a zoo model by its name, else the path as given
    weights = Path(cfg.checkpoint) if cfg.checkpoint else wan_weights_file(wan_dir)  # (or its shard index)
    label = (f"embedded:{cfg.model}" if cfg.model and embedded else
             cfg.checkpoint or ("embedded" if embedded else str(weights)))
    return Plan(cfg, mc, wan_dir, weights, spec, schedule, (cfg.num_frames, h, w), fsl, family, label, capture_mode)


def check_context_noise(sampler: str, context_noise: float, image: bool, captured: bool) -> None:
    """context_noise where it would not run as given: the multi-step CFG sampler's context passes are at t = 0,
    and an image's (image-to-video) is at t = 0 beside the other chunks' context_noise, two timesteps in one of a
    store's steps (models/common/rollout.py says why)."""
    if context_noise and sampler == "causal_multi_step_cfg":
        raise WorkbenchError(CONTEXT_NOISE_MULTI_STEP.format(context_noise))
    if context_noise and image and captured:
        raise WorkbenchError(IMAGE_CONTEXT_NOISE.format(context_noise, context_noise))


def _schedule(cfg: ExtractConfig) -> list:
    if cfg.sampler == "causal_few_step":
        timesteps = FlowMatchScheduler(cfg.timestep_shift).denoising_timesteps(cfg.denoising_step_list,
                                                                               cfg.warp_denoising_step)
        return few_step_schedule(timesteps, cfg.context_noise)
    solver = MultiStepSolver("unipc", cfg.num_inference_steps, cfg.timestep_shift)
    return multistep_schedule(solver.timesteps, cfg=True, context_pass=cfg.sampler == "causal_multi_step_cfg")


def fingerprint_fields(p: Plan, weights_sha: str) -> dict:
    """The settings a store's fingerprint hashes: `layout` (what shapes the store) and `model` (what made the
    numbers). Stored as the attr `fingerprint_fields`, so that a refusal names the setting that differs."""
    c = p.cfg
    layout = dict(schema=SCHEMA_VERSION, layers=p.spec.layers, heads=p.spec.heads, steps=p.spec.steps,
                  stats=p.spec.stats, token_layers=p.spec.token_layers, geometry=p.geometry, sampler=c.sampler,
                  schedule=[dataclasses.astuple(s) for s in p.schedule], nfpb=c.num_frame_per_block)
    if c.independent_first_frame:  # (absent otherwise: stores made before the option still resume)
        layout["independent_first_frame"] = True
    model = dict(weights=weights_sha, config=dataclasses.asdict(p.model_config), key=("ema" if c.use_ema else "gen"),
                 dtype=c.dtype, guidance=c.guidance_scale, negative=c.negative_prompt,
                 capture_mode=p.capture_mode, text_encoder=wan_dir_encoder_identity(p.wan_dir))
    # The kernel that computes the numbers. Absent for the stock kernels as they ran before these fields existed
    # (stores made then still resume): "auto" on Hopper now runs cuDNN wave-balanced, a configuration of its own;
    # the stores "auto" made there before (one cuDNN call) resume with --attention-kernel cudnn.
    if c.attention_kernel not in ("auto", "cudnn"):
        model["attention_kernel"] = c.attention_kernel
    backend = describe(rank_device(c.device), _dtype(c.dtype), c.attention_kernel,
                       **kernel_geometry(p.model_config, p.frame_seq_len))
    if backend == "cudnn-balanced":
        model["attn_backend"] = backend
    if c.image is not None:
        model["image"] = sha256_file(c.image)
    if own := stat_identities(p.spec.stats):
        model["own_stats"] = own  # a plugin's statistics: their definition and code (absent for built-in ones)
    return dict(layout=layout, model=model)


def fingerprint_of(fields: dict) -> str:
    """'layout:model', the hashes of the two halves of a store's fingerprint fields. A store takes samples (or
    entries) of one fingerprint only."""
    def h(d):
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    return f"{h(fields['layout'])}:{h(fields['model'])}"


# Settings the fingerprint hashes that stores made before they were recorded lack, in words (StoreWriter `later`:
# such a store takes this run's entries when every setting it did record agrees)
LATER_FIELDS = {"model.text_encoder": "its text encoder",
                "model.own_stats": "the definition and code of its own (plugins') statistics"}
# values that stores made before a setting's name was made one recorded for what this run records otherwise
# ({flattened field: {their value: this run's}}): `--dtype bf16` was stored as typed
SAME_VALUES = {"model.dtype": {"bf16": "bfloat16"}}


def same_values(p: Plan) -> dict:
    """SAME_VALUES, with the identities earlier workbenches gave this run's text encoder (models/wan/text_encoder.py
    `earlier_identities`: its tokenizer folder's hidden files hashed too)."""
    earlier = earlier_identities(p.wan_dir)
    return {**SAME_VALUES, "model.text_encoder": earlier} if earlier else SAME_VALUES


# ------------------------------------------------------------------------------------------------------
# Running


def command_words(command, api: str) -> list[str]:
    """A run's command as words for the store's `command` attribute: a list as given, a string as a shell splits it
    (a whole command line, or words such as "analysis notebook"); None (a Python call that named none): the API
    function and the program, e.g. `workbench.extract.run_extract from ipykernel_launcher.py`, not the process's
    own arguments (a Jupyter kernel's were its connection file)."""
    if command is None or command == "" or command == []:
        program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
        return [api, "from", program or "python"]
    if isinstance(command, str):
        try:
            return shlex.split(command)
        except ValueError:  # (an unbalanced quote: "my notebook's run") the words as given
            return [command]
    return [str(w) for w in command]


def _attrs(p: Plan, fp: str, command: list[str]) -> dict:
    from importlib.metadata import version

    import xarray
    import zarr
    from omegaconf import OmegaConf

    from workbench import __version__, git_commit

    c = p.cfg
    image = dict(image=str(c.image), image_sha256=sha256_file(c.image)) if c.image is not None else {}
    return dict(  # the command quoted as a shell takes it back (a prompt with spaces stays one argument)
        workbench_version=__version__, git_commit=git_commit(), command=shlex.join(command),
        working_dir=os.getcwd(),  # (what the command's relative paths, --checkpoint's among them, start from)
        created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config_yaml=OmegaConf.to_yaml(OmegaConf.create({"extract": dataclasses.asdict(c),
                                                        "model": dataclasses.asdict(p.model_config)})),
        versions=dict(torch=torch.__version__, xarray=xarray.__version__, zarr=zarr.__version__,
                      python=platform.python_version(), transformers=version("transformers")),
        frame_seq_len=p.frame_seq_len, num_frame_per_block=c.num_frame_per_block, num_frames=c.num_frames,
        independent_first_frame=bool(c.independent_first_frame),
        text_len=p.model_config.text_len, head_dim=p.model_config.head_dim, num_layers=p.model_config.num_layers,
        num_heads=p.model_config.num_heads, dtype=c.dtype,
        attn_backend=describe(rank_device(c.device), _dtype(c.dtype), c.attention_kernel,
                              **kernel_geometry(p.model_config, p.frame_seq_len)),
        capture_mode=p.capture_mode,
        fingerprint=fp,
        **image,  # image-to-video: the image that is frame 0 (absent otherwise)
    )


def kernel_geometry(mc, frame_seq_len: int) -> dict:
    """What decides which attention kernel runs a model's calls besides device and dtype (`describe`)."""
    return dict(heads=mc.num_heads, head_dim=mc.head_dim, frame_seq_len=frame_seq_len)


def _dist():
    """(rank, world, we_initialised) under torchrun, initialising the process group once; (0, 1, False)
    otherwise. The ranks only exchange small Python objects (the work list, finished samples), so the group
    is gloo even on GPUs: no NCCL device binding is needed for that."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), world, False
    dist.init_process_group("gloo")
    return dist.get_rank(), world, True


def rank_share(items: list, rank: int, world: int) -> list:
    """The items rank `rank` of `world` runs: items rank, rank + world, ... (round r of `world` items gives its
    item `rank` to this rank; `workbench generate` deals its samples the same way)."""
    return items[rank::world]


def rank_device(device: str) -> torch.device:
    """This process's device: its own GPU under torchrun (`_rank_device`; the kernel table's shape rules make a
    small tensor there, which on a bare 'cuda' would open a context on GPU 0 from every rank)."""
    return _rank_device(device, int(os.environ.get("WORLD_SIZE", "1")))


def _rank_device(device: str, world: int) -> torch.device:
    """Under torchrun each rank takes its own GPU (LOCAL_RANK) when the device is a bare 'cuda'."""
    if world > 1 and device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(device)


def run_extract(cfg: ExtractConfig, command: list[str] | str | None = None, log=print):
    """Run an extraction; returns the store path. Validation happens before any model weights are read. `command`:
    what the store records as the command that made it (`command_words`)."""
    p = in_store_order(plan(cfg))
    check_encoder_files(p.wan_dir)  # (the rollout's text encoder: its files, before the store is touched)
    rank, world, initialised = _dist()
    try:
        return _run(p, p.cfg, rank, world, command, log)
    finally:
        if initialised:
            import torch.distributed as dist

            dist.destroy_process_group()


def open_writer(p: Plan, log=print) -> StoreWriter:
    """The store's writer: its lock first (one writer per store, refused at once when another process holds
    it), then the weights' sha256 and the store's fingerprint check, all before any weights are loaded."""
    cfg = p.cfg
    lock = StoreLock(cfg.out).acquire()
    try:
        sha = weights_sha256(p.weights_file)
    except BaseException:
        lock.release()
        raise
    fields = fingerprint_fields(p, sha)
    return StoreWriter(cfg.out, fingerprint_of(fields), mode=cfg.mode, lock=lock, log=log, fields=fields,
                       entry_coords={"checkpoint_sha256": sha}, made_by=p.checkpoint_label + ema_suffix(cfg.use_ema),
                       later=LATER_FIELDS, same_values=same_values(p))


def check_resumed_prompts(writer: StoreWriter, samples, out) -> None:
    """A sample's id is p<prompt index>-s<seed>: a store's sample of this id made from another prompt (the prompts
    given in another order, or others) is refused, naming it, before it is taken as done or mixed in."""
    stored = writer.stored("prompt")
    clash = [f"{sid} holds {stored[sid]!r}, this run's {prompt!r}" for i, prompt, seed in samples
             if (sid := sample_id(i, seed)) in stored and stored[sid] != prompt]
    if clash:
        raise WorkbenchError(f"{out} holds samples of other prompts under this run's sample ids ({'; '.join(clash[:2])}"
                             f"{f' and {len(clash) - 2} more' if len(clash) > 2 else ''}): ids count the prompts in "
                             "their order, so list the store's prompts first and new ones after them, or choose "
                             "another --out (or --overwrite)")


def in_store_order(p: Plan) -> Plan:
    """The plan with its statistics in the order of the store it goes on (`--out`, resumed or appended) when
    they are the same ones: the order of `--stats` is no setting (`--stats attn_logit,attn_mass` was refused by a
    store of attn_mass,attn_logit, with only --overwrite or another --out offered)."""
    if p.cfg.mode == "overwrite" or (stored := stats_in_store_order(p.cfg.out, p.spec.stats)) == list(p.spec.stats):
        return p
    return dataclasses.replace(p, spec=dataclasses.replace(p.spec, stats=tuple(stored)),
                               cfg=dataclasses.replace(p.cfg, stats=stored))


def _run(p: Plan, cfg: ExtractConfig, rank: int, world: int, command, log):
    device, dtype = _rank_device(cfg.device, world), _dtype(cfg.dtype)
    if rank == 0 and p.capture_mode == "indicator" and len(p.spec.layers) > 8:
        log(f"note: capturing {len(p.spec.layers)} layers with the stock attention kernel (indicator mode) costs "
            "~+35% on a 1.3B rollout; --attention-kernel triton captures all 30 at ~+2% over its own rollout "
            "(~+15% over the default's; bench/RESULTS.md)")
    samples = [(i, prompt, seed) for i, prompt in enumerate(cfg.prompts) for seed in cfg.seeds]
    writer, todo, error, fp, sha = None, samples, None, None, None
    stamps = run_files(p.wan_dir, p.weights_file, cfg.image)  # (before the labels are hashed; checked after the loads)
    if rank == 0:
        try:
            writer = open_writer(p, log)
            check_resumed_prompts(writer, samples, cfg.out)
            todo = [s for s in samples if not writer.done(sample_id(s[0], s[2]))]
            writer.requested = [sample_id(i, seed) for i, _, seed in samples]
            fp, sha = writer.fingerprint, writer.fields["model"]["weights"]
            # the same weights (the fingerprint holds their sha256) keep the store's one label, however named now
            # (`--model dmd` and the path of its file made two labels of one model in a store)
            labels = sorted(set(writer.stored("checkpoint").values()))
            if labels and p.checkpoint_label not in labels:
                log(f"note: {cfg.out} labels these weights {labels[0]!r} (checkpoint); this run's samples keep that "
                    f"label (given as {p.checkpoint_label!r})")
                p = dataclasses.replace(p, checkpoint_label=labels[0])
            if todo and len(todo) < len(samples):
                log(f"resuming: {len(samples) - len(todo)} of {len(samples)} samples are already in {cfg.out}; "
                    f"computing the other {len(todo)}")
        except ModelInputError as err:  # (WorkbenchError included; as a plain one, which any rank can unpickle)
            error = WorkbenchError.of(err)
            if writer is not None:
                writer.close()
                writer = None
    if world > 1:  # every rank learns the work list, or rank 0's error (so no rank waits forever)
        import torch.distributed as dist

        box = [(error, todo, fp, sha)]
        dist.broadcast_object_list(box, src=0)
        error, todo, fp, sha = box[0]
    if error is not None:
        raise error  # (its exit status kept: a store another run writes exits 75)
    try:
        if not todo:
            if rank == 0:
                log(f"{cfg.out}: all {len(samples)} samples are already there; nothing to do")
            return Path(cfg.out)
        return _extract(p, rank, world, todo, fp, sha, device, dtype, command, log, writer, stamps)
    except KeyboardInterrupt as err:  # (Ctrl-C, SIGTERM: the command line says what is kept)
        if writer is not None:
            err.kept = writer.kept_note("sample(s)", cfg.mode)
        raise
    finally:
        if writer is not None:
            writer.close()


def _extract(p: Plan, rank: int, world: int, todo, fp: str, weights_sha: str, device, dtype, command, log,
             writer: StoreWriter | None, stamps: dict):
    """Run the samples of `todo` (dealt out to the ranks) and write them with rank 0's `writer`; `stamps`: the
    run's files as they were when their labels were hashed (`run_files`)."""
    from models.wan.text_encoder import TextEncoder, prompt_cache_dir
    from workbench.progress import progress_bar

    cfg = p.cfg
    causal = cfg.sampler != "bidirectional"
    model = load_model(p, device, dtype)
    initial = image_latent(p, device, dtype)
    encoder = TextEncoder.from_wan_dir(p.wan_dir, device=device, cache_dir=prompt_cache_dir())
    check_unchanged(stamps, "between the hashing of the store's labels and the loading of the weights")
    negative = encoder.encode([cfg.negative_prompt]) if cfg.sampler != "causal_few_step" else None
    layout = store_layout(p, _attrs(p, fp, command_words(command, "workbench.extract.run_extract")))
    # Rounds of `world` samples: rank r runs sample r of each round, and rank 0 writes the round's samples in
    # the order of a single-process run as soon as the round ends (a killed run keeps every finished round).
    rounds = [todo[i : i + world] for i in range(0, len(todo), world)]
    forwards = len(p.schedule) * (len(block_sizes_of(cfg)) if causal else 1)
    if cfg.image is not None:  # image-to-video: chunk 0 (the image) runs its context pass only (the bar ended at 11/15)
        forwards -= sum(s.phase == "denoise" for s in p.schedule)
    bar = progress_bar(total=len(rank_share(todo, rank, world)) * forwards,
               desc=f"extract (rank {rank})" if world > 1 else "extract", unit="fwd",
               disable=not cfg.progress or rank != 0)
    try:
        probe = make_probe(model, p, device)
        for batch in rounds:
            result = None
            if rank < len(batch):
                prompt_index, prompt, seed = batch[rank]
                emb = encoder.encode([prompt])
                arrays = _one_sample(model, p, emb, negative, seed, device, dtype, bar, probe, initial)
                meta = dict(prompt_index=prompt_index, seed=seed, prompt=prompt, checkpoint=p.checkpoint_label,
                            checkpoint_sha256=weights_sha, model_family=p.family, sampler=cfg.sampler,
                            local_attn_size=cfg.local_attn_size, sink_size=cfg.sink_size, tokens=emb.tokens[0],
                            num_tokens=emb.lengths[0])
                if negative is not None:  # (the uncond forwards' cross-attention keys are the negative prompt's tokens)
                    meta.update(uncond_tokens=negative.tokens[0], uncond_num_tokens=negative.lengths[0])
                result = (meta, arrays, refusals(cfg.attention_kernel, device, dtype, heads=model.config.num_heads,
                                                 head_dim=model.config.head_dim))
            if world == 1:
                finished = [result]
            else:
                import torch.distributed as dist

                finished = [None] * world if rank == 0 else None
                dist.gather_object(result, finished, dst=0)
            if rank == 0:
                for meta, arrays, refused in finished[: len(batch)]:
                    meta["checkpoint"] = p.checkpoint_label  # (rank 0's: the store's label, see _run)
                    writer.write(sample_dataset(layout, meta, arrays), facts={"attn_refused": refused})
    finally:  # (also when stopped or failed: an open bar is drawn again under later output)
        bar.close()
    if rank == 0:
        from workbench.summary import summary_table

        log(summary_table(cfg.out))
    return Path(cfg.out)


def store_layout(p: Plan, attrs: dict) -> StoreLayout:
    """The store layout of a plan's samples (its chunks: the causal rollout's, one chunk for bidirectional)."""
    cfg = p.cfg
    causal = cfg.sampler != "bidirectional"
    return StoreLayout(steps=[s for s in p.schedule if s.step in p.spec.steps], layers=list(p.spec.layers),
                       heads=list(p.spec.heads), token_layers=list(p.spec.token_layers), num_frames=cfg.num_frames,
                       num_frame_per_block=cfg.num_frame_per_block if causal else 0,
                       frame_seq_len=p.frame_seq_len, grid=p.model_config.token_grid(*p.geometry[1:]),
                       text_len=p.model_config.text_len, stats=list(cfg.stats), attrs=attrs,
                       independent_first_frame=causal and cfg.independent_first_frame)


def load_model(p: Plan, device, dtype) -> torch.nn.Module:
    """The model a plan runs: the Wan folder (or embedded default), optionally a Self-Forcing checkpoint, causal
    unless the sampler is bidirectional, with the plan's attention window."""
    c = p.cfg
    with wan_dir_hint(c.wan_dir, c.checkpoint):
        model = load_wan(p.wan_dir, checkpoint=c.checkpoint, use_ema=c.use_ema, causal=c.sampler != "bidirectional",
                         num_frame_per_block=c.num_frame_per_block, local_attn_size=c.local_attn_size,
                         sink_size=c.sink_size, device=device, dtype=dtype, trust_pickle=c.trust_pickle)
    model.attention_kernel = c.attention_kernel
    model.independent_first_frame = c.independent_first_frame
    return model


def make_probe(model, p: Plan, device) -> StatsProbe:
    """The statistics probe of a plan; one serves every sample of a run (`reset()` between samples), so that
    a CUDA run replays the rollout graphs recorded for its first samples."""
    geo = Geometry(batch=1, num_frames=p.geometry[0], frame_seq_len=p.frame_seq_len, text_len=model.config.text_len,
                   heads=model.config.num_heads, head_dim=model.config.head_dim)
    return StatsProbe(p.spec, geo, device, mode=p.capture_mode, kernel=p.cfg.attention_kernel,
                      dtype=_dtype(p.cfg.dtype))


def _one_sample(model, p: Plan, emb, negative, seed, device, dtype, bar, probe: StatsProbe,
                initial=None) -> dict[str, np.ndarray]:
    from workbench.sample import capture_sample

    def run():
        sample_rollout(model, p, emb, negative, seed, device, dtype, on_forward=lambda labels, start, n: bar.update(1),
                       initial_latent=initial)

    # image-to-video: frame 0 is the image's latent, which only has a context pass
    return capture_sample(model, probe, run, p.geometry[0], from_frame=0 if initial is None else 1)


def sample_rollout(model, p: Plan, emb, negative, seed: int, device, dtype, on_forward=None,
                   initial_latent=None, cache_policy=None) -> torch.Tensor:
    """The rollout of one sample exactly as `extract` runs it: noise [1, F, C, h, w] drawn from `seed`, the
    plan's sampler, the prompt embedding `emb` (and `negative` for the CFG samplers). Returns the clean latents.
    Whatever observes the model (probes, nnsight) sees the same attention calls as the store's run. `cache_policy`:
    a KV-cache policy (workbench/kv_policies.py; the few-step sampler only)."""
    cfg = p.cfg
    F, h, w = p.geometry
    noise, gen = seeded_noise(seed, (1, F, model.config.in_dim, h, w), device, dtype)
    negative_context = None if negative is None else negative.context.to(device, dtype)
    return sample(model, cfg.sampler, noise, emb.context.to(device, dtype), negative_context, generator=gen,
                  denoising_step_list=cfg.denoising_step_list, warp_denoising_step=cfg.warp_denoising_step,
                  timestep_shift=cfg.timestep_shift,
                  context_noise=cfg.context_noise, num_inference_steps=cfg.num_inference_steps,
                  guidance_scale=cfg.guidance_scale, on_forward=on_forward, initial_latent=initial_latent,
                  cache_policy=cache_policy)
