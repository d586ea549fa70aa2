"""`workbench intervene`: the baseline and each intervention or KV-cache policy on the same prompts and seeds, and
their effects (latent distance per frame; the miniature world's metrics where they apply) in an effects store.
The work is in workbench/intervene.py."""

from __future__ import annotations

import argparse

from workbench.commands import (PROMPT_HELP, add_model_arguments, add_schedule_arguments, add_size_arguments,
                                check_frames)

HELP = "ablate heads, knock out key frames, change temperatures or cache policies: what changes in the video"

EPILOG = """\
what it does: every (prompt, seed) is rolled out once plainly (the baseline) and once per intervention, with the
same noise; the store (dim `intervention`, "baseline" first) holds per intervention x sample x latent frame the
RMS distance of the latents to the baseline (and divided by the baseline's RMS), and on the miniature world (the
embedded model, world prompts) the tracker's numbers and per-pixel-frame curves of the decoded video
(docs/store.md, "Effects stores"). Re-running the same command resumes; new entries are added to the store.

flags (repeat any; LAYERS/HEADS/FRAMES take 3, 0-3 or 0,2,5):
  --ablate LAYERS:HEADS[:MODE]     replace heads' self-attention output: zero (default), mean (over the baseline
                                   rollouts of this run), resample (from --resample-prompt's rollout, same seed)
  --knockout FRAMES[:LAYERS]       later chunks never see these key frames (self-attention; all layers by default)
  --temperature LAYERS:HEADS:T     divide heads' logits by T (T > 1 flattens, T < 1 sharpens)
  --sink FACTOR[:FRAMES[:LAYERS]]  multiply the logits of key frames (default frame 0) by FACTOR in the chunks
                                   after them (as --knockout; a spec entry's history_only: false, in every call)
  --policy NAME:WINDOW[:SINK[:STORE]]  a KV-cache policy: fifo, sink (window + sink), deepsink (a deep sink with
                                   temporal RoPE re-alignment; SINK defaults to half the window), attention
                                   (keep what the chunk's queries attend to most), headwise (static heads from
                                   STORE's attn_mass keep the sink and the newest frames)
  --sweep-heads LAYERS             one zero ablation per head of these layers: heads ranked by effect

a spec file (--spec FILE.yaml) lists entries with every option (steps, chunks, cross-attention, labels):
  interventions:
    - {kind: ablate, layers: 3, heads: 0-1, mode: mean}
    - {kind: ablate, layers: 3, heads: 2, mode: resample, resample_prompt: "a blue circle moving up"}
    - {kind: knockout, frames: 0-2, layers: all, label: no-first-chunk}
    - {kind: temperature, layers: 2, heads: 0, value: 2.0, steps: 0}
    - {kind: sink, frames: 0, value: 0.5}
    - {kind: policy, policy: deepsink, window: 12, sink_frames: 6}     # (a rollout longer than the window)
    - {kind: policy, policy: headwise, window: 12, sink_frames: 3, store: runs/layers.zarr, threshold: 0.8,
       static_recent: 6}   # or static_heads: [[2, 1], [3, 0]] in place of store and threshold
  sweep: {layers: 0-5, mode: zero}
  (every key an entry takes: workbench/intervene_entries.py's docstring)

your own intervention or cache policy: `register(EntryKind(NAME, build, settings))` (workbench/intervene_entries.py)
in a module named by WORKBENCH_PLUGINS, then {kind: NAME, layers: 3, heads: 0, settings: {...}} in a spec (a
policy: {kind: policy, policy: NAME, window: 12, sink_frames: 3, settings: {...}}; docs/architecture.md)

examples:
  workbench intervene --ablate 3:0 --ablate 3:1:mean --knockout 0-2 --seeds 0,1 --out runs/effects.zarr
  workbench intervene --sweep-heads 0-5 --prompt "a red square moving right" --out runs/sweep.zarr
  workbench intervene --frames 84 --local-attn-size 21 --sink-size 3 --policy fifo:21 --policy deepsink:21:10 \\
      --policy attention:21:3 --out runs/policies84.zarr
  workbench report runs/sweep.zarr           # ranked table and per-frame effect curves (HTML + PNG)
"""


def own_kinds_text() -> str:
    """The kinds and policies of your own that plugins registered, for --help ("" when none)."""
    from workbench.intervene_entries import OWN_KINDS, OWN_POLICIES

    lines = [f"  {'kind' if not k.policy else 'policy'} {k.name}: {k.about or '(no description)'}; settings "
             f"{k.settings or '(none)'}" for k in (*OWN_KINDS.values(), *OWN_POLICIES.values())]
    return "\nregistered by plugins:\n" + "\n".join(lines) + "\n" if lines else ""


def register(subparsers) -> None:
    p = subparsers.add_parser("intervene", help=HELP, description=HELP, epilog=EPILOG + own_kinds_text(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_argument_group("what to change (see below)")
    what.add_argument("--spec", metavar="FILE", help="a YAML file of entries (interventions:, sweep:)")
    for flag, meta in (("ablate", "LAYERS:HEADS[:MODE]"), ("knockout", "FRAMES[:LAYERS]"),
                       ("temperature", "LAYERS:HEADS:T"), ("sink", "FACTOR[:FRAMES[:LAYERS]]"),
                       ("policy", "NAME:WINDOW[:SINK[:STORE]]")):
        what.add_argument(f"--{flag}", action="append", default=[], metavar=meta, help="(repeatable; see below)")
    what.add_argument("--sweep-heads", metavar="LAYERS", help="zero-ablate each head of these layers in turn")
    what.add_argument("--resample-prompt", default="a blue circle moving up",
                      help="the prompt resample ablations take heads' outputs from (default: %(default)s)")
    job = p.add_argument_group("the rollouts")
    job.add_argument("--prompt", action="append", metavar="TEXT", help=PROMPT_HELP)
    job.add_argument("--prompts", metavar="FILE", help="a prompt file, one prompt per line")
    job.add_argument("--seeds", "--seed", default="0", help="seeds: 0, 0-2 or 1,5 (default: %(default)s)")
    job.add_argument("--frames", type=int, default=21, help="latent frames (default: %(default)s)")
    add_size_arguments(job)
    job.add_argument("--local-attn-size", type=int,
                     help="the baseline's KV window in latent frames (default: -1, global; needed past 21 frames)")
    job.add_argument("--sink-size", type=int, help="the baseline's sink frames (default: 0)")
    job.add_argument("--world", default="auto", choices=["auto", "on", "off"],
                     help="decode and score with the miniature world's tracker: auto = when the model folder has a "
                          "VAE, the video is 96 x 128 and every prompt is a world prompt (default: %(default)s)")
    add_schedule_arguments(p.add_argument_group("schedule (the researchers' inference config)"))
    model = p.add_argument_group("which model (default: the embedded default)")
    add_model_arguments(model, causal_only=True)
    out = p.add_argument_group("output")
    out.add_argument("--out", default="runs/effects.zarr", help="effects store (default: %(default)s)")
    out.add_argument("--capture", metavar="LAYERS",
                     help="also store attn_mass (every step, every head) of these layers under each intervention, as "
                          "extract computes it after the edits (e.g. 3 or 0-5; not under a head-wise cache policy)")
    out.add_argument("--save-videos", action="store_true",
                     help="decode every rollout and write a PNG grid of its frames (and an mp4 with the video extra) "
                          "per intervention and sample beside the store (NAME_videos/); the report shows them side by "
                          "side with the baseline")
    out.add_argument("--overwrite", action="store_true",
                     help="replace an existing store (of this workbench; never another folder)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def entries_from_args(args, num_layers: int, num_heads: int, **rollout):
    """The entries of --spec and the flags, each checked (`parse_entry`; `rollout`: num_frames, num_steps and
    num_chunks, the bounds of frames, steps and chunks)."""
    from workbench.errors import WorkbenchError
    from workbench.inputs import parse_int_list
    from workbench.intervene_entries import parse_entry, parse_flag, sweep_entries

    raw = []
    if args.spec:
        import yaml

        try:
            with open(args.spec) as f:
                spec = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise WorkbenchError(f"--spec {args.spec}: not YAML ({str(err).splitlines()[0]})") from None
        except OSError as err:
            raise WorkbenchError(f"--spec {args.spec}: {err.strerror or err} (give a YAML file of interventions; "
                                 "see --help)") from None
        if not isinstance(spec, dict) or set(spec) - {"interventions", "sweep"}:
            raise WorkbenchError(f"--spec {args.spec}: a mapping with interventions: (a list) and/or sweep: "
                                 "{layers, mode}")
        listed = spec.get("interventions") or []
        if not isinstance(listed, list) or not all(isinstance(d, dict) for d in listed):
            raise WorkbenchError(f"--spec {args.spec}: interventions: {listed!r}; give a list of mappings, each with "
                                 "a kind, e.g. interventions: [{kind: ablate, layers: 3, heads: 0}] (see --help)")
        raw += listed
        if spec.get("sweep"):
            sw = spec["sweep"]
            if not isinstance(sw, dict):
                raise WorkbenchError(f"--spec {args.spec}: sweep: {sw!r}; give a mapping, e.g. sweep: {{layers: "
                                     "all, mode: zero}")
            layers = parse_int_list(str(sw.get("layers", "all")), what="layer", upper=num_layers)
            raw += sweep_entries(layers if layers is not None else list(range(num_layers)), num_heads,
                                 sw.get("mode", "zero"))
    for kind in ("ablate", "knockout", "temperature", "sink", "policy"):
        raw += [parse_flag(kind, text) for text in getattr(args, kind)]
    if args.sweep_heads:
        layers = parse_int_list(args.sweep_heads, what="layer", upper=num_layers)
        raw += sweep_entries(layers if layers is not None else list(range(num_layers)), num_heads)
    for d in raw:
        if d.get("kind") == "ablate" and d.get("mode") == "resample" and not d.get("resample_prompt"):
            d["resample_prompt"] = args.resample_prompt
    import warnings

    from models.errors import ModelInputWarning

    with warnings.catch_warnings():  # (run_intervene checks the entries again and says their warnings: once)
        warnings.simplefilter("ignore", ModelInputWarning)
        return [parse_entry(d, num_layers, num_heads, **rollout) for d in raw]


def run(args) -> int:
    import shlex

    import torch

    from models.wan.embedded import ZOO
    from workbench.commands import apply_schedule, resolve_model, schedule_settings
    from workbench.errors import WorkbenchError
    from workbench.extract import ExtractConfig, default_prompts, parse_int_list, plan
    from workbench.intervene import entry_bounds, run_intervene

    if args.model and ZOO.get(args.model) is not None and ZOO[args.model].sampler != "causal_few_step":
        few_step = ", ".join(n for n, m in ZOO.items() if m.sampler == "causal_few_step")
        raise WorkbenchError(f"--model {args.model}: its sampler is {ZOO[args.model].sampler}; intervene runs the "
                             f"causal few-step rollout (models {few_step})")
    resolve_model(args)  # --model NAME, or the zoo's default (the DMD student), as extract and generate do
    apply_schedule(args)
    check_frames(args.frames)
    seeds = parse_int_list(args.seeds, what="seed", all_ok=False)
    if not seeds:
        raise WorkbenchError("--seeds needs numbers, e.g. 0 or 0-2")
    if args.prompt and args.prompts:
        raise WorkbenchError("give --prompt TEXT or --prompts FILE, not both")
    if args.prompts:
        from models.video import read_prompts

        prompts = read_prompts(args.prompts)
    else:
        prompts = args.prompt or default_prompts(args.wan_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ExtractConfig(prompts=prompts, seeds=seeds, num_frames=args.frames, height=args.height, width=args.width,
                        **schedule_settings(args), model=args.model,
                        wan_dir=args.wan_dir, checkpoint=args.checkpoint, use_ema=args.use_ema,
                        trust_pickle=args.trust_pickle,
                        device=device, dtype=args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"),
                        out=args.out, mode="overwrite" if args.overwrite else "resume", progress=not args.no_progress,
                        stats=["attn_mass"], layers=parse_int_list(args.capture, what="layer") if args.capture else None)
    try:
        p = plan(cfg)  # every check of the rollout before the entries are read
    except WorkbenchError as err:  # (extract's hint names a flag this command does not have)
        from workbench.chunking import FIRST_FRAME_HINT

        if FIRST_FRAME_HINT not in str(err):
            raise
        raise WorkbenchError(str(err).replace(FIRST_FRAME_HINT, "; intervene runs chunks of equal size only")) \
            from None
    entries = entries_from_args(args, **entry_bounds(p))
    command = shlex.join(args.argv)
    run_intervene(cfg, entries, world=args.world, command=command, capture=bool(args.capture),
                  save_videos=args.save_videos)
    return 0
