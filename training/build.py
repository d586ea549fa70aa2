"""Building a training run from a checked config: the models, the data, the probes and the `Trainer`.

    build_trainer(cfg, logdir) --> checks (training/checks.py), then the models from `model_root/<name>`
                                   (+ generator_ckpt), the text encoder, the probes and the data --> Trainer
                                   (a resume: the weights from its checkpoint; of generator_ckpt only the sha256,
                                   the checkpoint's record where the file is gone)
    describe(trainer)          --> the run in one line, with its gradient semantics (docs/training.md)

Checks come first: nothing here reads weights before every config and file error has been raised.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from models.common.chunks import block_sizes
from models.common.scheduler import FlowMatchScheduler
from models.errors import ModelInputError
from models.family import WAN, check_fits_cache
from training import distributed as fsdp
from training.checkpoints import (check_no_later_checkpoints, check_resumed_config, check_same_run, latest_checkpoint,
                                  resumed_start_weights)
from training.checks import Plan, check_config, check_files, model_folder, world_vae_path
from training.config import recorded
from training.data import LatentDataset, PromptSource, synthetic_latents
from training.errors import TrainingError
from training.trainer import RESTART, Models, Trainer


def build_models(cfg, plan: Plan, device="cpu", *, read_generator_ckpt: bool = True) -> tuple[Models, Path]:
    """The models a config names, on the CPU in float32 (teacher: bf16 on CUDA with mixed precision, where its
    frozen weights are only ever used in bf16), and with ema_start_step <= 0 the generator folder's own weights
    for the EMA to start from. `read_generator_ckpt` False: the generator's weights are the folder's (a resume
    whose checkpoint then loads its own, generator_ckpt's file gone). Returns (models, generator folder)."""
    from models.wan.checkpoint import load_wan

    kw = cfg.model_kwargs
    gen_dir = model_folder(cfg, kw.model_name)
    causal = plan.trainer != "diffusion" or bool(cfg.causal)
    ckpt = (cfg.generator_ckpt or None) if read_generator_ckpt else None
    generator = load_wan(gen_dir, checkpoint=ckpt, causal=causal, num_frame_per_block=cfg.num_frame_per_block,
                         local_attn_size=kw.local_attn_size, sink_size=kw.sink_size, dtype=torch.float32)
    generator.independent_first_frame = causal and bool(cfg.independent_first_frame)
    ema_init = None
    if ckpt and cfg.ema_weight > 0 and cfg.ema_start_step <= 0:
        from models.wan.checkpoint import read_wan_folder

        ema_init = read_wan_folder(gen_dir)[1]
    critic = teacher = None
    if plan.trainer == "gan":  # the discriminator: the fake score with its classification branch
        from training.gan import add_classification_branch

        critic = load_wan(model_folder(cfg, cfg.fake_name), causal=False, dtype=torch.float32)
        with torch.random.fork_rng(devices=[]):  # (its initial weights: the config's seed, on every rank alike)
            torch.manual_seed(cfg.seed)
            add_classification_branch(critic, cfg.num_class, bool(cfg.concat_time_embeddings))
    if plan.trainer == "score_distillation":
        critic = load_wan(model_folder(cfg, cfg.fake_name), causal=False, dtype=torch.float32)
        teacher_dtype = torch.bfloat16 if (cfg.mixed_precision and torch.device(device).type == "cuda") else torch.float32
        teacher = load_wan(model_folder(cfg, cfg.real_name), causal=False, dtype=teacher_dtype)
    return Models(generator, critic, teacher, ema_init), gen_dir


def build_data(cfg, plan: Plan, seed: int, d: fsdp.Dist | None = None, *, progress: bool = True):
    """The trainer's data: prompts, or a latent set (kept on d.device with `data_on_device`)."""
    data = read_data(cfg, plan, seed, d, progress=progress)
    if cfg.data_on_device and d is not None and isinstance(data, LatentDataset):
        data.to(d.device)
    return data


def read_data(cfg, plan: Plan, seed: int, d: fsdp.Dist | None = None, *, progress: bool = True):
    if cfg.i2v:
        data = LatentDataset.from_file(cfg.data_path, seed, "image_latents")
        F, C, H, W = plan.shape
        if tuple(data.latents.shape[1:]) != (1, C, H, W):
            raise TrainingError(f"image latents of shape {tuple(data.latents.shape[1:])}; image_or_video_shape asks "
                                f"for {(1, C, H, W)}")
        return data
    if plan.trainer == "score_distillation":
        return PromptSource.from_file(cfg.data_path, seed)
    if plan.trainer == "ode":
        data = LatentDataset.from_file(cfg.data_path, seed, "ode_pairs")
        if cfg.max_pair < len(data):  # their ODE trainer reads the first max_pair pairs
            data = LatentDataset(data.prompts[:cfg.max_pair], data.latents[:cfg.max_pair], data.kind, seed)
        F, C, H, W = plan.shape
        if tuple(data.latents.shape[2:]) != (F, C, H, W):
            raise TrainingError(f"ODE pairs of shape {tuple(data.latents.shape[2:])}; image_or_video_shape asks "
                                f"for {(F, C, H, W)}")
        if len(plan.timesteps) > data.latents.shape[1]:
            raise TrainingError(f"denoising_step_list has {len(plan.timesteps)} steps; the ODE pairs hold "
                                f"{data.latents.shape[1]} trajectory points")
        return data
    if cfg.data_path == "synthetic":
        F, C, H, W = plan.shape
        prompts, latents = synthetic_latents(64, F, C, H, W, seed=0)
        return LatentDataset(prompts, latents, "latents", seed)
    if cfg.data_path == "world":
        return world_data(cfg, plan, seed, d, progress=progress)
    data = LatentDataset.from_file(cfg.data_path, seed, "latents")
    if plan.trainer == "gan" and tuple(data.latents.shape[1:]) != tuple(plan.shape):
        raise TrainingError(f"real latents of shape {tuple(data.latents.shape[1:])} in {cfg.data_path!r}; the "
                            f"generator makes {tuple(plan.shape)} (image_or_video_shape): encode "
                            f"{plan.shape[0]} latent frames (python -m training.i2v --frames {plan.shape[0]})")
    return data


def world_data(cfg, plan: Plan, seed: int, d: fsdp.Dist | None, *, progress: bool = True) -> LatentDataset:
    """`data_path: world`: the cached latent set of training/world_data.py (rank 0 makes it when missing)."""
    from training.world_data import make_world_dataset, world_dataset_path

    F, C, H, W = plan.shape
    w = cfg.world
    if (C, H, W) != (16, 12, 16):
        raise TrainingError(f"data_path: world gives latents of 16 x 12 x 16 (96 x 128 pixels); image_or_video_shape "
                            f"asks for {C} x {H} x {W}")
    if w.num_videos < 1 or w.batch < 1:
        raise TrainingError(f"world.num_videos {w.num_videos} and world.batch {w.batch} must be >= 1")
    device = d.device if d is not None else torch.device("cpu")
    vae = world_vae_path(cfg)
    path = world_dataset_path(vae, w.num_videos, w.seed, F, w.cache_dir)
    if d is None or d.main:
        make_world_dataset(path, vae, w.num_videos, w.seed, F, device=device, batch=w.batch, progress=progress)
    if d is not None:
        d.barrier()
    return LatentDataset.from_file(path, seed, "latents")


def text_encoder_device(cfg, device):
    """Where the text encoder lives and runs: the training device, or the CPU with `text_encoder_cpu_offload`
    (its weights out of GPU memory; each prompt is encoded once and kept, training/text.py `PromptCache`)."""
    return torch.device("cpu") if cfg.text_encoder_cpu_offload else torch.device(device)


def _encoder_identity(cfg) -> str:
    """The text encoder's identity (models/wan/text_encoder.py `encoder_identity`) of the generator's model folder,
    '?' without one (a trainer built from models in memory)."""
    from models.errors import CheckpointError
    from models.wan.text_encoder import wan_dir_encoder_identity

    try:
        return wan_dir_encoder_identity(model_folder(cfg, cfg.model_kwargs.model_name))
    except (CheckpointError, TrainingError):
        return "?"


def build_probes(cfg, plan: Plan, model_config, logdir, *, weights_label: str, weights_sha: str,
                 command: str = "workbench train"):
    """The probe set of cfg.probe, checked against the model (None when probes are off)."""
    import hashlib

    from models.common.rollout import few_step_schedule
    from models.video import read_prompts
    from training.probes import TrainingProbes
    from workbench.capture import CaptureSpec
    from workbench.store import stats_in_store_order

    p = cfg.probe
    if not p.every:
        return None
    if p.every < 0:
        raise TrainingError(f"probe.every {p.every} must be >= 0")
    if plan.trainer not in ("score_distillation", "ode", "gan"):
        raise TrainingError("probes run the causal few-step rollout: use them with score_distillation, ode or gan")
    prompts = list(p.prompts) + (read_prompts(p.prompt_file) if p.prompt_file else [])
    if not prompts:
        raise TrainingError("probe.every is set but the probe set has no prompts (probe.prompts or probe.prompt_file)")
    if not p.seeds:
        raise TrainingError("probe.seeds is empty")
    for key in ("layers", "heads", "steps"):
        if p[key] is not None and not len(p[key]):
            raise TrainingError(f"probe.{key} is empty: give the {key} to capture, or null for all of them")
    seeds = list(dict.fromkeys(int(s) for s in p.seeds))  # (a repeated seed is the same sample, once: as extract)
    mc = model_config
    frames = p.num_frames or plan.shape[0]
    iff = bool(cfg.independent_first_frame)
    try:  # frames that fit the chunk layout (models/common/chunks.py)
        block_sizes(frames, plan.nfpb, iff)
    except ModelInputError as err:
        raise TrainingError(f"probe.num_frames: {err}") from None
    try:  # the cache holds the training length, and at least the family's
        check_fits_cache(frames, mc.local_attn_size, max(plan.shape[0], WAN.cache_frames),
                         label=f"probe.num_frames {frames}", remedy="set model_kwargs.local_attn_size")
    except ModelInputError as err:
        raise TrainingError(str(err)) from None
    # each once, in order (as extract takes --layers 3,3): a layer twice was a second, empty row in the store
    layers = sorted({int(x) for x in p.layers}) if p.layers is not None else list(range(mc.num_layers))
    heads = sorted({int(x) for x in p.heads}) if p.heads is not None else list(range(mc.num_heads))
    for what, values, n in (("layer", layers, mc.num_layers), ("head", heads, mc.num_heads)):
        bad = sorted(v for v in values if not 0 <= v < n)
        if bad:
            raise TrainingError(f"probe {what}s {bad} out of range: the model has {what}s 0-{n - 1}")
    schedule = few_step_schedule(plan.timesteps, float(cfg.context_noise))
    steps = sorted({int(x) for x in p.steps}) if p.steps is not None else [s.step for s in schedule]
    bad = sorted(set(steps) - {s.step for s in schedule})
    if bad:
        raise TrainingError(f"probe steps {bad} out of range: the schedule has steps 0-{len(schedule) - 1}")
    try:
        # (the same statistics in another order than the run's store holds go on in the store's order)
        stats = stats_in_store_order(Path(logdir) / p.store, p.stats)
        spec = CaptureSpec(tuple(layers), tuple(heads), tuple(sorted(steps)), tuple(stats))
    except Exception as err:
        raise TrainingError(f"probe: {err}") from None
    _, _, H, W = plan.shape
    fsl = mc.tokens_per_frame(H, W)
    layout_key = dict(spec=dataclasses.astuple(spec), schedule=[dataclasses.astuple(s) for s in schedule],
                      prompts=prompts, seeds=seeds, frames=frames, hw=(H, W), weights=weights_sha,
                      model=dataclasses.asdict(mc), nfpb=plan.nfpb)
    if iff:  # (absent otherwise: probe stores made before the option still resume)
        layout_key["independent_first_frame"] = True
    from workbench.statistics import identities

    if own := identities(spec.stats):
        layout_key["own_stats"] = own  # a plugin's statistics: their definition and code (absent for built-in ones)
    fp = hashlib.sha256(json.dumps(layout_key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    import platform

    import xarray
    import zarr

    from workbench import __version__, git_commit

    import datetime
    import os

    attrs = dict(workbench_version=__version__, git_commit=git_commit(), command=command, working_dir=os.getcwd(),
                 created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 capture_mode="exact",  # (the probes' StatsProbe; dtype and attn_backend: set by the first probe)
                 config_yaml=OmegaConf.to_yaml(recorded(cfg)), frame_seq_len=fsl, num_frame_per_block=plan.nfpb,
                 independent_first_frame=iff,
                 num_frames=frames, text_len=mc.text_len, head_dim=mc.head_dim, num_layers=mc.num_layers,
                 num_heads=mc.num_heads, versions=dict(torch=torch.__version__, xarray=xarray.__version__,
                                                       zarr=zarr.__version__, python=platform.python_version()),
                 trainer=plan.trainer, loss=plan.loss)
    # the settings the fingerprint hashes, by name, so that a store of other ones names them (and what a report
    # names, studies/report.py model_facts: the start weights and the text encoder)
    fields = dict(layout=dict(layers=layers, heads=heads, steps=spec.steps, stats=spec.stats, prompts=prompts,
                              seeds=seeds, frames=frames, hw=[H, W], nfpb=plan.nfpb, independent_first_frame=iff,
                              schedule=layout_key["schedule"]),
                  model=dict(weights=weights_sha, text_encoder=_encoder_identity(cfg), config=layout_key["model"]))
    if own:
        fields["layout"]["own_stats"] = own
    meta = dict(checkpoint=weights_label, checkpoint_sha256=weights_sha, model_family="self_forcing",
                sampler="causal_few_step", local_attn_size=mc.local_attn_size, sink_size=mc.sink_size)
    return TrainingProbes(spec=spec, schedule=schedule, prompts=prompts, seeds=seeds, num_frames=frames,
                          latent_hw=(H, W), channels=plan.shape[1], frame_seq_len=fsl, grid=mc.token_grid(H, W),
                          text_len=mc.text_len, nfpb=plan.nfpb, independent_first_frame=iff, timesteps=plan.timesteps,
                          scheduler=FlowMatchScheduler(cfg.model_kwargs.timestep_shift, cfg.num_train_timestep),
                          context_noise=float(cfg.context_noise), every=int(p.every),
                          path=Path(logdir) / p.store, attrs=attrs, fingerprint=fp, fields=fields, sample_meta=meta)


def build_trainer(cfg, logdir, *, sets_sid_alpha: bool = False, resume=None, log=print, progress=True,
                  command: str = "workbench train") -> Trainer:
    """Everything a config names: checks first, then weights, text encoder, data, probes. `command`: the command
    line, as the probe store records it."""
    from models.wan.checkpoint import wan_weights_file, weights_sha256
    from models.wan.text_encoder import TextEncoder, prompt_cache_dir

    d = fsdp.setup(cfg.device)
    plan = check_config(cfg, d.world, sets_sid_alpha=sets_sid_alpha)
    # a resume whose generator_ckpt is gone: the start weights' sha256 its checkpoint recorded (None otherwise)
    start = resumed_start_weights(cfg, logdir, resume)
    check_files(cfg, plan, start_recorded=start is not None)
    if resume == "latest":
        resume = latest_checkpoint(logdir)
        if resume is None:  # nothing to continue (a run stopped before its first checkpoint, or none ran): step 0
            saved = Path(logdir) / "config.yaml"  # (an earlier run's, written at its start)
            check_resumed_config(cfg, saved.read_text() if saved.is_file() else None, logdir, started=True)
            resume = RESTART
            if d.main:
                log(f"--resume: {logdir} holds no complete checkpoint" + (
                    " (the run there stopped before its first one)" if saved.is_file() else "")
                    + ": starting from step 0" + (", replacing its losses and probes" if saved.is_file() else ""))
    elif resume is None and latest_checkpoint(logdir) is not None:
        raise TrainingError(f"{logdir} already holds checkpoints; pass --resume to continue or use a new --logdir")
    elif resume is not None and resume != RESTART:
        check_no_later_checkpoints(logdir, resume)
        check_same_run(cfg, logdir, resume)
    if d.main and Path(logdir).is_dir():  # what a write killed midway left (a checkpoint's part can be gigabytes)
        from models.files import stale_temporaries

        for path in stale_temporaries(logdir):
            path.unlink(missing_ok=True)
            log(f"removed {path}: the temporary file of a write that was killed")
    from models.files import check_unchanged
    from models.wan.config import WanConfig
    from models.wan.folder import dit_dir
    from workbench.weights import run_files

    gen_dir = model_folder(cfg, cfg.model_kwargs.model_name)
    gen_config = WanConfig.from_json(dit_dir(gen_dir) / "config.json").replace(
        local_attn_size=cfg.model_kwargs.local_attn_size, sink_size=cfg.model_kwargs.sink_size)
    weights = Path(cfg.generator_ckpt) if cfg.generator_ckpt else wan_weights_file(gen_dir)  # (or its shard index)
    stamps = run_files(gen_dir, weights)  # (before the probe store's label is hashed; checked after the loads)
    sha = start["sha256"] if start is not None else weights_sha256(weights)  # (a file there: hashed, as at the start)
    probes = build_probes(cfg, plan, gen_config, logdir, weights_label=str(weights), weights_sha=sha,
                          command=command)  # checks first
    if probes is not None and d.main:
        # (a store of other start weights or probe settings: named before the weights load)
        probes.check_store(restart=resume == RESTART)
    models, _ = build_models(cfg, plan, d.device, read_generator_ckpt=start is None)
    # (the commands' shared prompt cache: a run whose prompts are all there loads no text encoder)
    encoder = TextEncoder.from_wan_dir(gen_dir, device=text_encoder_device(cfg, d.device), cache_dir=prompt_cache_dir())
    check_unchanged(stamps, "between the hashing of the probe store's labels and the loading of the weights")
    cls = Trainer
    if plan.trainer == "gan":
        from training.gan import GanTrainer as cls
    trainer = cls(cfg, models, encoder, logdir, d=d, plan=plan, data=None, probes=probes, resume=resume, log=log,
                  progress=progress, seed=cfg.seed, start_weights=dict(file=str(weights), sha256=sha))
    trainer.data = build_data(cfg, plan, trainer.seed, d, progress=progress)  # (--no-progress: no bar there either)
    return trainer


def describe(trainer: Trainer) -> str:
    plan, cfg, d = trainer.plan, trainer.cfg, trainer.d
    what = {"dmd": "DMD", "sid": "SiD", "ode": "ODE regression", "diffusion": "diffusion", "gan": "GAN"}[plan.loss]
    F, C, H, W = plan.shape
    return (f"{what} training from step {trainer.step}: {F} latent frames of {H}x{W}, global batch "
            f"{cfg.total_batch_size} = {d.world} rank(s) x {plan.accum} micro-batch(es) x {cfg.batch_size}, "
            + (f"steps {[round(float(t), 2) for t in plan.timesteps]}, " if plan.loss != "diffusion" else
               "t drawn from the whole training schedule, ")
            + f"seed {trainer.seed}, device {d.device}, "
            f"compute {str(trainer.dtype).replace('torch.', '')}"
            + (f", AdamW {cfg.adamw_impl} (may differ from loop in the last bit)" if cfg.adamw_impl != "loop" else "")
            + schedule(cfg, plan) + semantics(cfg, plan))


def schedule(cfg, plan: Plan) -> str:
    """The run's optimisation settings in one clause: learning rates, the critic's update ratio, guidance, EMA."""
    parts = [f"lr {cfg.lr:g}"]
    if plan.trainer == "gan":  # (its own rates, as training/gan.py GanTrainer.make_optimizers reads them)
        critic = cfg.critic_lr if cfg.critic_lr is not None else cfg.lr_critic
        parts = [f"generator lr {cfg.gen_lr if cfg.gen_lr is not None else cfg.lr:g}",
                 f"discriminator lr {critic:g} (its branch x{cfg.discriminator_lr_multiplier:g})"]
    if plan.trainer == "score_distillation":
        parts += [f"critic lr {cfg.lr_critic:g}", f"generator updated every {cfg.dfake_gen_update_ratio} steps",
                  f"guidance {cfg.guidance_scale:g} (real = c + g (c - u))"]
    if cfg.ema_weight:
        parts.append(f"EMA {cfg.ema_weight:g} from step {cfg.ema_start_step} (in checkpoints after it)")
    return "; " + ", ".join(parts)


def semantics(cfg, plan: Plan) -> str:
    """The gradient semantics of a run in one line (docs/training.md), for the score-distillation trainer."""
    if plan.trainer != "score_distillation":
        return ""
    shift = cfg.score_timestep_shift if cfg.score_timestep_shift is not None else cfg.model_kwargs.timestep_shift
    return (f"; score networks on the shift-{shift:g} grid, KV cache gradient {cfg.kv_cache_gradient}, text k/v "
            f"gradient {cfg.text_kv_gradient}, unused parameter grads {cfg.unused_param_grads} (docs/training.md)")
