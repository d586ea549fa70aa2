"""The CLI's commands, one module each (`register(subparsers)` + `run(args)`), and the arguments they share."""

import argparse

from workbench.weights import SAMPLER_DEFAULTS  # (the settings a model not of the zoo samples with)

# --attention-kernel's choices: models.common.attention_kernels.ATTENTION_KERNELS, written out here so that the
# CLI's --help imports no torch (tests/test_statistics.py checks that the two agree)
ATTENTION_KERNELS = ["auto", "triton", "cudnn", "cudnn-balanced"]


def add_model_arguments(group, model_option: bool = True, causal_only: bool = False) -> None:
    """Which weights to run and where: the options `extract` and `generate` share (an argparse parser or group);
    `evaluate` has a --model of its own (model_option=False); `intervene` takes the causal few-step students only
    (causal_only)."""
    if model_option:
        _add_model_option(group, causal_only)
    _add_weight_options(group)


def _add_model_option(group, causal_only: bool = False) -> None:
    group.add_argument("--model", metavar="NAME",
                       help="a model of the embedded zoo (models/wan/embedded.py): "
                            + ("" if causal_only else "teacher (the bidirectional 'Wan' teacher), df (diffusion "
                               "forcing), ")
                            + "ode (ODE init), dmd (Self-Forcing DMD, the default), sid (Self-Forcing SiD); it sets "
                              "the checkpoint and the sampler defaults"
                            + ("; this command runs the causal few-step rollout, so not teacher or df"
                               if causal_only else ""))


def _add_weight_options(group) -> None:
    group.add_argument("--wan-dir", metavar="DIR", help="the official Wan2.1 folder, or a diffusers Wan2.1 pipeline "
                       "folder (model_index.json) (default: the embedded default)")
    group.add_argument("--checkpoint", metavar="FILE",
                       help="a Self-Forcing .pt (generator / generator_ema) on top of the Wan folder's config")
    group.add_argument("--use-ema", action="store_true", help="load generator_ema instead of generator")
    group.add_argument("--trust-pickle", action="store_true", help="allow a checkpoint that needs full unpickling")
    group.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    group.add_argument("--dtype", default=None,
                       help="float32 | bfloat16 (bf16) | float16 | float64 (default: bfloat16 on cuda, float32 on cpu; "
                       "a float64 run draws float32's noise: the float32 run's reference)")


def check_frames(frames) -> None:
    """--frames (None: the default) must be a positive number: one line naming it otherwise."""
    from workbench.errors import WorkbenchError

    if frames is not None and frames < 1:
        raise WorkbenchError(f"--frames {frames}: give a positive number of latent frames, e.g. 21")


def add_chunk_arguments(group) -> None:
    """--frames and --independent-first-frame: how many latent frames and how a causal rollout chunks them."""
    group.add_argument("--frames", type=int, default=None,
                       help="latent frames (default: 21 -> 81 video frames; 19 with --independent-first-frame)")
    group.add_argument("--independent-first-frame", action="store_true",
                       help="frame 0 is a chunk of its own, then chunks of 3: 19 frames give chunks "
                            "[1, 3, 3, 3, 3, 3, 3], the researchers' extraction layout (frames must be 1 + 3k)")


def add_schedule_arguments(group) -> None:
    """The few-step sampler's schedule and chunk size, as the researchers' inference configs set them: --config
    reads one of their YAML files as their inference.py does, the other flags set one key each and win over it."""
    group.add_argument("--config", metavar="YAML",
                       help="the researchers' config (e.g. their configs/self_forcing_dmd.yaml, unchanged), merged "
                            "onto configs/default_config.yaml as their inference.py merges it; it sets "
                            "denoising_step_list, warp_denoising_step, model_kwargs.timestep_shift, context_noise, "
                            "num_frame_per_block, independent_first_frame and model_kwargs.local_attn_size / "
                            "sink_size, and for a CFG sampler guidance_scale, negative_prompt and the top-level "
                            "timestep_shift, as their multi-step pipeline (flags given on the command line win)")
    group.add_argument("--denoising-step-list", metavar="T,T,...",
                       help="the few-step sampler's steps (default: 1000,750,500,250, every Self-Forcing config's)")
    group.add_argument("--warp-denoising-step", action=argparse.BooleanOptionalAction, default=None,
                       help="map the steps onto the shifted grid (1000,750,500,250 -> t 1000, 937.5, 833.3, 625), as "
                            "every Self-Forcing config does (default: on; --no-warp-denoising-step runs them as given)")
    group.add_argument("--timestep-shift", type=float, metavar="S",
                       help="the flow-matching shift (default: 5.0, their model_kwargs.timestep_shift)")
    group.add_argument("--context-noise", type=float, metavar="T",
                       help="the timestep of the few-step sampler's context pass, which writes each chunk into the KV "
                            "cache (default: 0; the multi-step CFG sampler's and an image's, in image-to-video, run "
                            "at 0, as the researchers' pipelines)")
    group.add_argument("--num-frame-per-block", type=int, metavar="N",
                       help="latent frames per chunk of the causal samplers (default: 3; 1 is frame by frame)")


# the settings of the schedule flags (ExtractConfig's fields of these names, and their defaults)
SCHEDULE_KEYS = ("denoising_step_list", "warp_denoising_step", "timestep_shift", "context_noise", "num_frame_per_block",
                 "local_attn_size", "sink_size")


def apply_schedule(args) -> None:
    """Fill in the schedule settings the command line left unset (None): from --config's file when given, else
    ExtractConfig's defaults; --denoising-step-list parsed; the config's independent_first_frame turns the flag on.
    Errors (a missing file, an unknown key, a step or context noise out of 0..1000, a shift <= 0) before any
    work."""
    from workbench.errors import WorkbenchError
    from workbench.extract import ExtractConfig

    from_file = {}
    if args.config:
        from training.config import load_config

        c = load_config(args.config)  # (the ModelInputError of a missing file or an unknown key: one line)
        # their few-step pipeline shifts with the model's model_kwargs.timestep_shift, their multi-step one with the
        # top-level timestep_shift (causal_diffusion_inference.py: args.timestep_shift); both 5.0 in their configs
        cfg_sampler = getattr(args, "sampler", None) not in (None, "causal_few_step")
        shift = c.timestep_shift if cfg_sampler and "timestep_shift" in _as_written(args.config) else \
            c.model_kwargs.timestep_shift
        from_file = dict(denoising_step_list=list(c.denoising_step_list), warp_denoising_step=c.warp_denoising_step,
                         timestep_shift=shift, context_noise=c.context_noise,
                         num_frame_per_block=c.num_frame_per_block, local_attn_size=c.model_kwargs.local_attn_size,
                         sink_size=c.model_kwargs.sink_size)
        if c.independent_first_frame and not hasattr(args, "independent_first_frame"):
            raise WorkbenchError(f"--config {args.config}: independent_first_frame is true; this command runs chunks "
                                 "of equal size only")
        if c.i2v and hasattr(args, "image") and not args.image:  # (their training key: images come with the data)
            import warnings

            from models.errors import ModelInputWarning

            warnings.warn(f"--config {args.config}: i2v is true, which trains from text-image pairs; an inference "
                          "run takes its first frame from --image", ModelInputWarning, stacklevel=2)
        if c.independent_first_frame:
            args.independent_first_frame = True
    if isinstance(args.denoising_step_list, str):
        steps = []
        for part in args.denoising_step_list.split(","):
            try:
                steps.append(int(part))
            except ValueError:
                raise WorkbenchError(f"--denoising-step-list {args.denoising_step_list!r}: give timesteps in "
                                     "0..1000 separated by commas, e.g. 1000,750,500,250") from None
        args.denoising_step_list = steps
    defaults = ExtractConfig()
    for key in SCHEDULE_KEYS:
        if getattr(args, key) is None:
            setattr(args, key, from_file.get(key, getattr(defaults, key)))
    if not all(0 <= t <= 1000 for t in args.denoising_step_list) or not args.denoising_step_list:
        raise WorkbenchError(f"--denoising-step-list {args.denoising_step_list}: give timesteps in 0..1000, e.g. "
                             "1000,750,500,250")
    if not 0 <= args.context_noise <= 1000:
        raise WorkbenchError(f"--context-noise {args.context_noise:g}: give a timestep in 0..1000 (the noise level at "
                             "which each finished chunk is written to the KV cache; 0 = clean, as the researchers' "
                             "configs)")
    if not args.timestep_shift > 0:
        raise WorkbenchError(f"--timestep-shift {args.timestep_shift:g}: give a number > 0 (Wan2.1 and Self "
                             "Forcing: 5)")
    if args.sink_size < 0:
        raise WorkbenchError(f"--sink-size {args.sink_size}: give 0 or more frames (the first frames the KV cache "
                             "keeps when its window evicts the others)")
    if args.sink_size and args.local_attn_size == -1:  # (the researchers' configs may carry one: a warning)
        import warnings

        from models.errors import ModelInputWarning

        warnings.warn(f"--sink-size {args.sink_size} does nothing with global attention (--local-attn-size -1: the "
                      "KV cache holds every frame, nothing is evicted); give --local-attn-size for a window",
                      ModelInputWarning, stacklevel=2)


def schedule_settings(args) -> dict:
    """The ExtractConfig fields of `apply_schedule`'s settings."""
    return {key: getattr(args, key) for key in SCHEDULE_KEYS}


def latent_frames(args) -> int:
    """--frames, or its default for the chunk layout: as many frames as the family's KV cache holds (21 for
    Wan2.1); with --independent-first-frame or --image the most 1 + 3k frames it holds (19)."""
    from models.family import WAN

    check_frames(args.frames)
    if args.frames is not None:
        return args.frames
    if args.independent_first_frame or getattr(args, "image", None):
        return 1 + WAN.frames_per_chunk * ((WAN.cache_frames - 1) // WAN.frames_per_chunk)
    return WAN.cache_frames


# said when a command ran the embedded folder's own DiT while the zoo there ships its teacher but no DMD student
ZOO_TEACHER_ONLY_NOTE = ("note: data/embedded ships the zoo's teacher, not yet its Self-Forcing students: running the "
                         "teacher's weights with the causal few-step sampler (the students' sampler; the object smears "
                         "as chunks go on). `--model teacher` samples the teacher as trained (docs/zoo.md)")


# said when a Wan folder's own (bidirectionally trained) weights ran in the default sampler
BASE_WAN_FEW_STEP_NOTE = ("note: the Wan folder's own weights (no --checkpoint) ran in the causal few-step sampler, "
                          "the students' (4 steps, block-causal KV cache), as the researchers' extraction with "
                          "--no_checkpoint does; Wan was trained bidirectionally: --sampler bidirectional runs it as "
                          "trained (50 steps with CFG)")


def resolve_model(args) -> None:
    """Fill in what `--model NAME` (or, with no model arguments, the zoo's default) means: args.checkpoint and
    args.use_ema, and the sampler settings the command line left unset (None). Errors before any work."""
    from models.wan.embedded import EMBEDDED_DIR, ZOO, ZOO_MARKER, pick
    from workbench.errors import WorkbenchError
    from workbench.weights import check_weights_args

    if not args.model:
        check_weights_args(args.checkpoint, args.use_ema,  # --use-ema alone, a folder or missing file as --checkpoint
                           trust_pickle=getattr(args, "trust_pickle", False))
    explicit = args.wan_dir or args.checkpoint or args.use_ema
    if args.model and explicit:
        raise WorkbenchError("--model NAME picks a model of the embedded zoo; give it without --wan-dir, --checkpoint "
                             "and --use-ema")
    if args.model and args.model not in ZOO and (args.model.endswith((".pt", ".pth", ".safetensors"))
                                                 or "/" in args.model):  # (a file where a zoo name belongs)
        raise WorkbenchError(f"--model {args.model!r}: --model names a model of the embedded zoo ({', '.join(ZOO)}); "
                             "a checkpoint file is --checkpoint PATH, a Wan2.1 folder --wan-dir DIR")
    entry = pick(args.model, bool(explicit))
    if entry is not None:
        args.model = entry.name  # (recorded in a store's config as what ran)
        args.checkpoint = str(entry.checkpoint_path()) if entry.checkpoint else None
        args.use_ema = entry.use_ema
    # said after the work (`model_note`), so that an error before it stays one line
    teacher_weights_as_student = entry is None and not explicit and (EMBEDDED_DIR / ZOO_MARKER).is_file()
    args.model_note = ZOO_TEACHER_ONLY_NOTE if teacher_weights_as_student else None
    base_wan_as_student = bool(args.wan_dir) and not args.checkpoint and getattr(args, "sampler", "") is None
    given = [key for key in ("num_inference_steps", "guidance_scale") if getattr(args, key, None) is not None]
    negative = getattr(args, "negative_prompt", None)
    config_cfg_settings(args, entry)
    for key, value in SAMPLER_DEFAULTS.items():
        if getattr(args, key, value) is None:
            setattr(args, key, getattr(entry, key) if entry is not None else value)
    check_sampler_numbers(args)
    if given and args.sampler == "causal_few_step":  # (the researchers' configs may carry them: a warning)
        import warnings

        from models.errors import ModelInputWarning

        flags = " and ".join(f"--{key.replace('_', '-')} {getattr(args, key):g}" for key in given)
        verb = "do" if len(given) > 1 else "does"
        warnings.warn(f"{flags} {verb} nothing with the causal few-step sampler (its steps are --denoising-step-list; "
                      "it has no CFG), so the run does not keep it; it is for the multi-step samplers (--sampler "
                      "causal_multi_step_cfg or bidirectional)", ModelInputWarning, stacklevel=2)
        for key in given:  # (as if not given: a store made without the flag resumes, its settings say what ran)
            setattr(args, key, getattr(entry, key) if entry is not None else SAMPLER_DEFAULTS[key])
    if negative and args.sampler == "causal_few_step":  # (no CFG: nothing reads it, so the run does not keep it)
        import warnings

        from models.errors import ModelInputWarning

        warnings.warn(f"--negative-prompt {negative!r} does nothing with the causal few-step sampler (it has no CFG); "
                      "it is for --sampler causal_multi_step_cfg or bidirectional", ModelInputWarning, stacklevel=2)
        args.negative_prompt = SAMPLER_DEFAULTS["negative_prompt"]
    window = getattr(args, "local_attn_size", None)
    if getattr(args, "sampler", None) == "bidirectional" and window not in (None, -1):  # (nothing reads it: not kept)
        import warnings

        from models.errors import ModelInputWarning

        warnings.warn(f"--local-attn-size {window} does nothing with the bidirectional sampler (every frame attends "
                      "every frame; a window is the causal samplers' KV cache)", ModelInputWarning, stacklevel=2)
        args.local_attn_size, args.sink_size = -1, 0
    if base_wan_as_student and args.sampler == "causal_few_step":
        args.model_note = BASE_WAN_FEW_STEP_NOTE


def _as_written(path):
    """A config file merged onto configs/default_config.yaml alone (not the schema): the keys the files set."""
    from omegaconf import OmegaConf

    from training.config import DEFAULT_CONFIG

    return OmegaConf.merge(OmegaConf.load(DEFAULT_CONFIG), OmegaConf.load(path))


def config_cfg_settings(args, entry) -> None:
    """With --config and a CFG sampler, the guidance scale and negative prompt the command line left unset come
    from the file (or configs/default_config.yaml under it), as the researchers' multi-step pipeline reads them
    (causal_diffusion_inference.py: args.guidance_scale, args.negative_prompt); the few-step sampler has no CFG,
    so its runs keep them as they were (a store's fingerprint holds them)."""
    if not getattr(args, "config", None):
        return
    sampler = getattr(args, "sampler", None) or (entry.sampler if entry is not None else SAMPLER_DEFAULTS["sampler"])
    wanted = [key for key in ("guidance_scale", "negative_prompt") if getattr(args, key, "") is None]
    if sampler == "causal_few_step" or not wanted:
        return
    from training.config import load_config

    load_config(args.config)  # (a missing file, bad YAML or an unknown key: the one-line error apply_schedule gives)
    raw = _as_written(args.config)
    for key in wanted:
        if key in raw:
            setattr(args, key, raw[key])


def check_sampler_numbers(args) -> None:
    """--guidance-scale finite (NaN ran a whole rollout of NaN) and --num-inference-steps at least 1, before any
    work."""
    import math

    from workbench.errors import WorkbenchError

    scale, steps = getattr(args, "guidance_scale", None), getattr(args, "num_inference_steps", None)
    if scale is not None and not math.isfinite(scale):
        raise WorkbenchError(f"--guidance-scale {scale}: give a finite number (classifier-free guidance's scale for "
                             "the CFG samplers; Wan2.1: 5, 1 = the prompt alone)")
    if steps is not None and steps < 1:
        raise WorkbenchError(f"--num-inference-steps {steps}: give 1 or more (the multi-step samplers' denoising "
                             "steps; Wan2.1: 50)")


def model_label(args) -> str:
    """A short name of the model a command ran, for titles: the zoo model's name, else the checkpoint's file name
    (with "EMA" for --use-ema) on the Wan folder's name."""
    from pathlib import Path

    if getattr(args, "model", None):
        return f"zoo model {args.model}"
    from models.wan.folder import folder_name

    base = folder_name(args.wan_dir) if getattr(args, "wan_dir", None) else "embedded Wan"
    if not getattr(args, "checkpoint", None):
        return base
    return f"{base} + {Path(args.checkpoint).name}{' (EMA)' if getattr(args, 'use_ema', False) else ''}"


PROMPT_HELP = ("a prompt (repeat for several; default: \"a red square moving right\" on the embedded zoo, which knows "
               "only its miniature world of one coloured shape moving one way; the researchers' eagle prompt with "
               "--wan-dir)")


def add_size_arguments(group) -> None:
    """--height/--width in pixels, for `extract` and `generate` (the model folder's own size by default)."""
    group.add_argument("--height", type=int, metavar="PX",
                       help="video height in pixels, a multiple of 16 (default: the model's own size: 96 for the "
                            "embedded default, config.json's video_size for a folder that records one, else 480)")
    group.add_argument("--width", type=int, metavar="PX",
                       help="video width in pixels, a multiple of 16 (default: 128 for the embedded default, "
                            "config.json's video_size, else 832)")


def world_prompt_note(args, prompts: list[str]) -> str | None:
    """A note for a run of the embedded zoo on prompts its miniature world cannot read (models/world.py: one colour,
    shape and direction, e.g. 'a blue circle moving up'), so the video shows no clear object (the default prompt on
    the embedded zoo is one of its world's, workbench/extract.py `default_prompts`). Said after the work, as
    `model_note`; None for a Wan folder."""
    from models import world

    if args.wan_dir:
        return None
    unread = []
    for prompt in prompts:
        try:
            world.parse_prompt(prompt)
        except ValueError:
            unread.append(prompt)
    if not unread:
        return None
    cut = [p if len(p) <= 80 else p[:77] + "..." for p in unread[:2]]  # (a long prompt: its start is enough here)
    shown = ", ".join(map(repr, cut)) + (f" and {len(unread) - 2} more" if len(unread) > 2 else "")
    return (f"note: the embedded models know only their miniature world, one {'/'.join(world.COLOURS)} "
            f"{'/'.join(world.SHAPES)} moving {'/'.join(world.DIRECTIONS)} (models/world.py); {shown} "
            f"{'is' if len(unread) == 1 else 'are'} not among its prompts, so the model draws no clear object. "
            "Try --prompt \"a blue circle moving up\"")
