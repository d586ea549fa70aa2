"""`workbench extract`: frame-by-frame attention of chosen layers, heads and steps into a zarr store."""

from __future__ import annotations

import argparse

from workbench.commands import (ATTENTION_KERNELS, PROMPT_HELP, add_chunk_arguments, add_model_arguments,
                                add_schedule_arguments, add_size_arguments, latent_frames)
from workbench.statistics import DEFAULT_STATS, stats_help

HELP = "capture per-layer, per-head, frame-by-frame attention of a rollout into a zarr store"

EPILOG = """\
examples:
  workbench extract --layer 3                                  # embedded default model, one prompt
  workbench extract --layer 3 --model teacher --out runs/teacher_layer3.zarr   # the zoo's teacher
  workbench extract --layers 0-29 --prompts prompts.txt --seed 0,1,2 \\
      --wan-dir wan_models/Wan2.1-T2V-1.3B --checkpoint checkpoints/self_forcing_dmd.pt --use-ema \\
      --device cuda --dtype bfloat16 --out runs/sf_dmd.zarr
  workbench extract --layer 3 --sampler bidirectional --wan-dir wan_models/Wan2.1-T2V-1.3B --out runs/wan.zarr
  torchrun --nproc_per_node=4 -m workbench.cli extract --layers all --prompts prompts.txt ...
  workbench extract --layer 3 --independent-first-frame      # 19 frames in chunks [1, 3, 3, 3, 3, 3, 3]
  workbench extract --layer 3 --config configs/self_forcing_dmd.yaml --num-frame-per-block 1  # frame by frame

what is stored (docs/store.md): attn_mass[sample, step, layer, head, query_frame, key_frame] (the softmax
mass each query frame puts on each key frame; rows sum to 1), attn_logit (the mean pre-softmax logit of a
frame pair), optional cross_mass (per prompt token), attn_frame_entropy (per query frame, in nats) and
attn_key_token (per key token, --token-layers).
Steps of the few-step rollout (default schedule): 0-3 = t 1000, 937.5, 833.3, 625; 4 = the context
(cache refresh) pass; --denoising-step-list, --config and the other schedule flags change them.
Re-running the same command resumes (the finished samples are kept by id); one process writes a store at a
time (a second is refused, naming the first). Open the store with xarray.open_zarr(path, consolidated=False)
(samples are appended as they finish, so the store keeps no consolidated metadata).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("extract", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to capture")
    what.add_argument("--layer", help="one layer (0-based), or as --layers")
    what.add_argument("--layers", help="layers: 3, 0-29, 0,4,8 or all (default: all)")
    what.add_argument("--heads", help="heads: 0-11, 0,5 or all (default: all)")
    what.add_argument("--steps", help="steps of the per-chunk schedule, e.g. 0 (t=1000) or 0-4 (default: all)")
    what.add_argument("--stats", default=",".join(DEFAULT_STATS), help=stats_help())
    what.add_argument("--token-layers", help="layers that also get per-key-token maps (attn_key_token): e.g. 3, "
                                             "0,3 or all (every captured layer)")
    what.add_argument("--capture-mode", default="auto", choices=["auto", "exact", "indicator", "fused"],
                      help="how attn_mass is computed; every mode leaves the rollout bitwise unchanged: exact "
                           "(log-sum-exp + a recompute pass, float32), indicator (cuDNN kernels: one attention "
                           "call with key-frame indicator columns appended to V; ~+35%% for all 30 layers on an "
                           "H200), fused (the model's own Gluon or Triton forward also returns the statistics; "
                           "+1-3%% for all 30 layers on an H200); auto = fused with the Gluon/Triton kernels (auto "
                           "on H100/H200), indicator with cuDNN's, exact on the CPU, where indicator runs exact "
                           "too: the store's attr capture_mode says what ran (default: %(default)s; docs/store.md)")
    what.add_argument("--attention-kernel", default="auto", choices=ATTENTION_KERNELS, metavar="KERNEL",
                      help="the model's attention kernel: auto (on H100/H200 the Gluon FlashAttention-3-style "
                           "forward, whose frame statistics come free (capture mode fused); flash-attn / cuDNN / SDPA "
                           "elsewhere), triton (the Gluon forward on H100/H200, a frame-tiled Triton forward on "
                           "other GPUs), cudnn-balanced (cuDNN on a wave-balanced schedule: auto before the Gluon "
                           "forward; capture mode indicator) or cudnn (one cuDNN call per attention). Outputs differ "
                           "between kernels by bf16 rounding, never between a captured and an uncaptured run "
                           "(default: %(default)s)")
    job = p.add_argument_group("what to run")
    job.add_argument("--prompt", action="append", metavar="TEXT",
                     help=PROMPT_HELP)
    job.add_argument("--prompts", metavar="FILE", help="a prompt file, one prompt per line")
    job.add_argument("--image", metavar="PATH",
                     help="image-to-video: the image's VAE latent is frame 0, a chunk of its own (implies "
                          "--independent-first-frame; 19 frames by default)")
    job.add_argument("--seed", "--seeds", default="42", help="seed(s): 42, 0-3 or 1,2,3 (default: %(default)s)")
    add_chunk_arguments(job)
    add_size_arguments(job)
    job.add_argument("--sampler", choices=["causal_few_step", "causal_multi_step_cfg", "bidirectional"], metavar="NAME",
                     help="causal_few_step, causal_multi_step_cfg or bidirectional; default: the --model's "
                          "(causal_few_step for the students, bidirectional for the teacher); "
                          "causal_few_step for --wan-dir, with or without --checkpoint (as the researchers' "
                          "extraction runs the base weights)")
    job.add_argument("--local-attn-size", type=int, help="KV window in latent frames (default: -1, global)")
    job.add_argument("--sink-size", type=int, help="sink frames kept in the KV cache (default: 0)")
    job.add_argument("--num-inference-steps", type=int, help="multi-step samplers (default: the --model's, else 50)")
    job.add_argument("--guidance-scale", type=float, help="multi-step samplers (default: the --model's, else 5.0)")
    job.add_argument("--negative-prompt", help="the CFG samplers' unconditional prompt (default: \"\", what the zoo "
                                               "was trained with; with --config, the file's)")
    add_schedule_arguments(p.add_argument_group("schedule (the researchers' inference config)"))
    model = p.add_argument_group("which model (default: the embedded default)")
    add_model_arguments(model)
    out = p.add_argument_group("output")
    out.add_argument("--out", help="store path (default: runs/layer{N}.zarr or runs/extract.zarr)")
    mode = out.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true",
                      help="add samples (new prompts or seeds) to a store of the same model and configuration, as a "
                           "plain re-run does; another model's samples are refused (a store holds one model)")
    mode.add_argument("--overwrite", action="store_true",
                      help="replace an existing store (of this workbench; never another folder)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from workbench.commands import apply_schedule, resolve_model, schedule_settings, world_prompt_note
    from workbench.errors import WorkbenchError
    from workbench.extract import ExtractConfig, parse_int_list, run_extract

    resolve_model(args)
    apply_schedule(args)
    if args.layer is not None and args.layers is not None:
        raise WorkbenchError("give --layer N or --layers LIST, not both")
    layers = parse_int_list(args.layer if args.layer is not None else args.layers, what="layer")
    if args.prompt and args.prompts:
        raise WorkbenchError("give --prompt TEXT or --prompts FILE, not both")
    cfg = ExtractConfig(
        layers=layers,
        heads=parse_int_list(args.heads, what="head"),
        steps=parse_int_list(args.steps, what="step"),
        stats=[s.strip() for s in args.stats.split(",") if s.strip()],
        token_layers=parse_int_list(args.token_layers, what="layer") if args.token_layers else [],  # all: None
        seeds=parse_int_list(args.seed, what="seed", all_ok=False),
        num_frames=latent_frames(args), independent_first_frame=args.independent_first_frame or bool(args.image),
        image=args.image, height=args.height, width=args.width, sampler=args.sampler, **schedule_settings(args),
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt, model=args.model, wan_dir=args.wan_dir, checkpoint=args.checkpoint,
        use_ema=args.use_ema,
        trust_pickle=args.trust_pickle,
        progress=not args.no_progress, capture_mode=args.capture_mode, attention_kernel=args.attention_kernel,
        mode="append" if args.append else "overwrite" if args.overwrite else "resume",
    )
    if args.prompts:
        from models.video import read_prompts

        cfg.prompts = read_prompts(args.prompts)
    elif args.prompt:
        cfg.prompts = list(args.prompt)
    cfg.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.dtype = args.dtype or ("bfloat16" if cfg.device.startswith("cuda") else "float32")
    if args.out:
        cfg.out = args.out
    elif layers is not None and len(layers) == 1:
        cfg.out = f"runs/layer{layers[0]}.zarr"
    if cfg.seeds is None:
        raise WorkbenchError("--seed all is not a seed; give numbers like 42 or 0-3")
    args.out = cfg.out  # the store this run writes (what a Ctrl-C message reads back: workbench/cli.py)
    run_extract(cfg, command=args.argv)
    if args.model_note:
        print(args.model_note)
    if note := world_prompt_note(args, cfg.prompts):
        print(note)
    return 0
