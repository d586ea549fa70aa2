"""`workbench evaluate`: how well models follow the miniature world's prompts, and how they drift on long rollouts.

    models (--model, or the shared model arguments) x lengths (--frames 21,84,168) x prompts (colour x shape x
    direction, models/world.py) x seeds
      --extract's rollout (workbench/extract.py: plan, load_model, sample_rollout; a sliding KV window with sink
        frames past 21 latent frames)--> latents
      --the model folder's VAE, streamed chunk by chunk--> pixels [3, T, 96, 128]
      --studies/world_metrics.py: tracker + scores--> per-video numbers and per-frame curves
      --workbench/scores.py--> OUT/scores/ (each video's score, kept as it comes: a stopped run resumes)
      --studies/world_report.py--> videos.csv, curves.csv, summary.csv, summary.md, evaluate.html, the console table

Every seed draws the same noise for every model, so models are compared on paired videos. Metrics and units:
docs/world_metrics.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from workbench.commands import add_model_arguments, check_sampler_numbers
from workbench.progress import printable

HELP = "score models on the miniature world: prompt adherence, trajectory error, consistency, drift"

EPILOG = """\
examples:
  workbench evaluate                                     # the embedded default, the whole 4x2x4 grid x 3 seeds
  workbench evaluate --colours red --shapes square --seeds 0 --frames 21 --out runs/eval_quick
  workbench evaluate --model df=runs/df/model.pt --model sf=runs/dmd/model.pt,ema \\
      --frames 21,84,168 --device cuda --workers 8 --out runs/eval_sf_vs_df      # compares sf against df
  workbench evaluate --model teacher=runs/teacher/model.pt,sampler=bidirectional --frames 21

  workbench evaluate --model teacher --model df --model dmd --frames 21,84,168     # the embedded zoo by name

--model [LABEL=]SOURCE[,ema][,sampler=NAME] (repeat for several models): SOURCE is a model of the embedded zoo
(teacher, df, ode, dmd, sid: its checkpoint, EMA and sampler settings, docs/zoo.md), `embedded`, an
official-format Wan folder, or a Self-Forcing checkpoint (.pt) on top of --wan-dir (default: the embedded
folder); `ema` loads generator_ema; the sampler defaults to --sampler. Without --model, the shared model
arguments pick one model (none: the zoo's DMD student, the embedded default).

Rollouts longer than 21 latent frames (causal samplers only) keep a sliding KV window of --local-attn-size latent
frames whose first --sink-size frames stay (the sink). Writes into --out: videos.csv (one row per video),
curves.csv (per-frame means), summary.csv and summary.md (model x metric), evaluate.html (the table and the drift
figure); with two models, also how the second compares with the first (or --compare A,B).

Each video's score is kept in OUT/scores/ as it is made: running the same command again (after Ctrl-C, a kill, or
with more seeds) scores only the videos not yet there (docs/world_metrics.md, "Kept scores and resuming").
"""

LONG = 21  # latent frames a model is trained on; longer rollouts need a sliding window


@dataclass(frozen=True)
class ModelChoice:
    """One model to evaluate: a label for the tables, the weights, and how to sample from it."""

    label: str
    wan_dir: str | None  # None: the embedded default
    checkpoint: str | None
    use_ema: bool
    sampler: str
    num_inference_steps: int | None = None  # the multi-step samplers; None: --num-inference-steps, else 50
    guidance_scale: float | None = None  # None: --guidance-scale, else 5.0
    model: str | None = None  # the zoo's name for these weights (ExtractConfig.model)


def model_names() -> dict[str, ModelChoice]:
    """Short names for --model: the embedded zoo (models/wan/embedded.py ZOO) with each model's own sampler settings."""
    from models.wan.embedded import ZOO

    return {name: ModelChoice(name, None, str(m.checkpoint_path()) if m.checkpoint else None, m.use_ema, m.sampler,
                              m.num_inference_steps, m.guidance_scale, name) for name, m in ZOO.items()}


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = p.add_argument_group("the prompt x seed grid (default: every colour x shape x direction, seeds 0-2)")
    grid.add_argument("--colours", help="comma list (default: red,green,blue,yellow)")
    grid.add_argument("--shapes", help="comma list (default: square,circle)")
    grid.add_argument("--directions", help="comma list (default: left,right,up,down)")
    grid.add_argument("--prompt", action="append", metavar="TEXT",
                      help="a prompt instead of the grid (repeat for several); it must name one colour, shape and "
                           "direction of the world")
    grid.add_argument("--seeds", "--seed", default="0-2", help="seeds: 0, 0-2 or 1,5,9 (default: %(default)s)")
    run_group = p.add_argument_group("the rollouts")
    run_group.add_argument("--frames", default=str(LONG),
                           help="latent frame counts, comma list, multiples of 3, e.g. 21,84,168 (default: %(default)s)")
    run_group.add_argument("--local-attn-size", type=int, default=LONG,
                           help="KV window in latent frames for rollouts longer than 21 (default: %(default)s)")
    run_group.add_argument("--sink-size", type=int, default=3,
                           help="sink frames kept at the front of that window (default: %(default)s)")
    run_group.add_argument("--sampler", default=None,
                           choices=["causal_few_step", "causal_multi_step_cfg", "bidirectional"], metavar="NAME",
                           help="causal_few_step, causal_multi_step_cfg or bidirectional: the sampler of every "
                                "model whose --model names none (,sampler=NAME) (default: a zoo "
                                "model's own, e.g. the embedded default's causal_few_step; else causal_few_step)")
    run_group.add_argument("--num-inference-steps", type=int,
                           help="multi-step samplers (default: a zoo model's own, else 50)")
    run_group.add_argument("--guidance-scale", type=float, help="multi-step samplers (default: a zoo model's own, else 5.0)")
    models = p.add_argument_group("which models (default: the embedded default)")
    models.add_argument("--model", action="append", metavar="SPEC",
                        help="[LABEL=]SOURCE[,ema][,sampler=NAME]; repeat for several (see below)")
    add_model_arguments(models, model_option=False)
    out = p.add_argument_group("output")
    out.add_argument("--out", default="runs/evaluate", help="output folder (default: %(default)s)")
    out.add_argument("--compare", metavar="A,B", help="compare model B against model A (labels); default: the two "
                                                      "models when there are exactly two")
    out.add_argument("--save-videos", action="store_true", help="also write each video (mp4 + PNG grid) under videos/")
    out.add_argument("--workers", type=int, default=None,
                     help="processes that track videos while the model runs (default: 0 on the CPU, up to 8 on a GPU)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------ models
def select_models(args) -> list[ModelChoice]:
    """The models a command line names: each --model SPEC, or else one model from the shared model arguments."""
    from workbench.errors import WorkbenchError

    if not args.model:
        from models.wan.embedded import default_model

        zoo = default_model() if not (args.wan_dir or args.checkpoint or args.use_ema) else None
        if zoo is not None:  # the embedded default: the zoo's DMD student (with --sampler: under that sampler)
            own = model_names()[zoo.name]
            return [dataclasses.replace(own, sampler=args.sampler or own.sampler)]
        label = (Path(args.checkpoint).stem if args.checkpoint else Path(args.wan_dir).name if args.wan_dir
                 else "embedded") + ("-ema" if args.use_ema else "")
        return [ModelChoice(label, args.wan_dir, args.checkpoint, args.use_ema, args.sampler or "causal_few_step")]
    from studies.world_report import COMPARE_COLUMNS

    choices = [parse_model_spec(spec, args) for spec in args.model]
    for spec, c in zip(args.model, choices):  # (typed, or a file's or folder's name)
        if c.label in COMPARE_COLUMNS:
            raise WorkbenchError(f"--model {spec!r}: label {c.label!r} is a column of the comparison table "
                                 f"({', '.join(COMPARE_COLUMNS)}); give it another: --model LABEL=SOURCE")
    labels = [c.label for c in choices]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise WorkbenchError(f"--model labels must differ; {dup} is given twice (name them: --model LABEL=SOURCE)")
    return choices


def parse_model_spec(spec: str, args) -> ModelChoice:
    """[LABEL=]SOURCE[,ema][,sampler=NAME] -> ModelChoice; SOURCE: a short name, `embedded`, a Wan folder or a
    checkpoint file (on top of --wan-dir, or the embedded folder)."""
    from models.common.rollout import SAMPLERS
    from workbench.errors import WorkbenchError

    label, _, rest = spec.partition("=") if "=" in spec.split(",")[0] else ("", "", spec)
    source, *options = [x.strip() for x in rest.split(",")]
    source = os.path.expanduser(source) if source.startswith("~") else source  # (a path, as workbench/cli.py's)
    use_ema, sampler = False, args.sampler or "causal_few_step"
    for opt in options:
        if opt == "ema":
            use_ema = True
        elif opt.startswith("sampler=") and opt[8:] in SAMPLERS:
            sampler = opt[8:]
        else:
            raise WorkbenchError(f"--model {spec!r}: unknown option {opt!r}; use ema or sampler=NAME with NAME one of "
                                 f"{', '.join(SAMPLERS)}")
    import re

    if label and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", label):
        raise WorkbenchError(f"--model {spec!r}: label {label!r} names folders under --out and columns of the "
                             "tables; use ASCII letters, digits, ., - or _ (no leading .)")
    names = model_names()
    if source in names:
        from models.wan.embedded import ZOO

        if not ZOO[source].shipped():
            raise WorkbenchError(f"--model {spec!r}: the zoo's {source!r} model is not in data/embedded yet "
                                 "(`python -m training.zoo` trains the zoo)")
        base = names[source]
        if use_ema and not base.use_ema:
            raise WorkbenchError(f"--model {spec!r}: the zoo's {source!r} model has no EMA weights; drop ',ema'")
        return ModelChoice(label or source, base.wan_dir, base.checkpoint, base.use_ema,
                           sampler if "sampler=" in rest else args.sampler or base.sampler, base.num_inference_steps,
                           base.guidance_scale, source)
    if source == "embedded":  # the folder's own DiT (in the zoo: the teacher's weights), named as a folder
        from models.wan.embedded import require_embedded_dir

        return ModelChoice(label or "embedded", str(require_embedded_dir()), None, use_ema, sampler)
    path = Path(source)
    if path.is_dir():
        from workbench.store import named

        return ModelChoice(label or named(path).name, str(path), None, use_ema, sampler)  # (`.`, `..`: its name)
    if path.is_file():
        return ModelChoice(label or path.stem, args.wan_dir, str(path), use_ema, sampler)
    names = ", ".join(["embedded", *names])
    raise WorkbenchError(f"--model {spec!r}: {source!r} is no model name ({names}), Wan folder or checkpoint file")


# ------------------------------------------------------------------------------------------------ grid
def select_prompts(args) -> list[str]:
    """The prompts: each --prompt (checked against the world's grammar), or the colour x shape x direction grid."""
    from models import world
    from workbench.errors import WorkbenchError

    if args.prompt:
        for prompt in args.prompt:
            try:
                world.parse_prompt(prompt)
            except ValueError as err:
                raise WorkbenchError(str(err)) from None
        return list(args.prompt)
    picked = []
    for what, text, vocab in (("colour", args.colours, world.COLOURS), ("shape", args.shapes, world.SHAPES),
                              ("direction", args.directions, world.DIRECTIONS)):
        words = [w.strip() for w in text.split(",") if w.strip()] if text is not None else list(vocab)
        bad = [w for w in words if w not in vocab]
        if not words:
            raise WorkbenchError(f"--{what}s {text!r}: give at least one of {', '.join(vocab)} (comma-separated)")
        if bad:
            raise WorkbenchError(f"--{what}s {text!r}: unknown {what} {bad[0]!r}; the world knows {', '.join(vocab)}")
        picked.append(words)
    return [world.prompt_for(c, s, d) for c in picked[0] for s in picked[1] for d in picked[2]]


def parse_lengths(text: str) -> list[int]:
    from workbench.errors import WorkbenchError
    from workbench.inputs import parse_int_list

    lengths = parse_int_list(text, what="--frames value")
    if not lengths or any(f < 3 or f % 3 for f in lengths):
        raise WorkbenchError(f"--frames {text!r}: latent frame counts must be multiples of 3 (chunks of 3), e.g. "
                             "21,84,168")
    return lengths


# ------------------------------------------------------------------------------------------------ run
def run(args) -> int:
    import torch

    from models.files import check_writable_dir, check_writable_tree
    from models.video import ensure_writable_dir, mp4_available
    from workbench.errors import WorkbenchError
    from workbench.inputs import parse_int_list
    from workbench.store_lock import StoreLock

    # --- everything that can be wrong, before any work (the output folder is made once all of it passed)
    check_writable_dir(args.out)
    check_writable_tree(args.out)  # (a resumed folder: its scores/ folders take each new score)
    check_sampler_numbers(args)
    if args.sink_size < 0:  # (a length without a window would not read it)
        raise WorkbenchError(f"--sink-size {args.sink_size}: give 0 or more (the first frames a long run's KV window "
                             "keeps)")
    if args.save_videos and not mp4_available():
        raise WorkbenchError("--save-videos writes mp4 files, which need the video extra: pip install -e '.[video]'")
    prompts = select_prompts(args)
    seeds = parse_int_list(args.seeds, what="seed", all_ok=False)
    if not seeds:
        raise WorkbenchError("--seeds needs numbers, e.g. 0 or 0-2")
    lengths = parse_lengths(args.frames)
    choices = select_models(args)
    compare = _compare_pair(args.compare, [c.label for c in choices])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    plans, skipped = plan_runs(args, choices, prompts, seeds, lengths, device, dtype)
    workers = args.workers if args.workers is not None else (min(8, (os.cpu_count() or 2) - 1)
                                                             if device.startswith("cuda") else 0)
    if workers < 0:
        raise WorkbenchError(f"--workers {workers}: use 0 (track in this process) or more")
    out = ensure_writable_dir(args.out)
    lock = StoreLock(out, what="an evaluate folder").acquire()  # one run writes a folder; refused at once
    try:
        return _run(args, out, choices, plans, skipped, prompts, seeds, compare, device, dtype, workers)
    finally:
        lock.release()


def _run(args, out, choices, plans, skipped, prompts, seeds, compare, device, dtype, workers) -> int:
    import shlex
    import time

    from models.video import nan_drawn_black
    from studies import world_metrics, world_report
    from workbench import scores
    from workbench.errors import Terminated
    from workbench.progress import progress_bar
    from workbench.store import sample_id

    # --- what an earlier run of the same models and settings already scored (workbench/scores.py)
    keys = {k: scores.run_key(p) for k, p in plans.items()}
    jobs = [(*k, i, seed) for k in plans for i in range(len(prompts)) for seed in seeds]  # (label, frames, i, seed)
    done = {}
    for job in jobs:
        label, frames, i, seed = job
        kept = scores.load(scores.score_path(out, *job), keys[label, frames], prompts[i], seed)
        if kept is not None and (not args.save_videos or _video_path(out, *job).is_file()):
            done[job] = kept
    if done:
        print(f"resuming: {len(done)} of {len(jobs)} video(s) were scored by an earlier run of the same models and "
              f"settings ({out / scores.FOLDER}); scoring the other {len(jobs) - len(done)}", flush=True)

    # --- rollouts, decoded and scored; each score kept on disk as it comes
    title = f"Miniature-world evaluation: {', '.join(c.label for c in choices)}"
    setup = (f"{len(prompts)} prompt(s) x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}) per model and length; past "
             f"{LONG} latent frames a KV window of {args.local_attn_size} frames with {args.sink_size} sink frames; "
             f"{device}, {dtype}.")
    command = shlex.join(args.argv)

    def keep(job, score):
        label, frames, i, seed = job
        scores.save(scores.score_path(out, *job), keys[label, frames], prompts[i], seed, score)
        done[job] = score

    pool = _pool(workers) if len(done) < len(jobs) else None
    pending, started, new = [], time.time(), len(jobs) - len(done)
    diverged = []  # the videos of rollouts that were not finite (NaN or inf)
    bar = progress_bar(total=len(jobs), initial=len(done), desc="evaluate", unit="video", disable=args.no_progress)
    try:
        for c in choices:
            todo = [k for k in plans if k[0] == c.label and any((*k, i, s) not in done for i in range(len(prompts))
                                                                    for s in seeds)]
            if not todo:
                continue
            vae, contexts, negative = _load_text_and_vae(plans[todo[0]], prompts, device, dtype)
            for key in todo:
                p = plans[key]
                bar.set_postfix_str(f"{c.label}, {key[1]} latent frames")
                model = _load(p, device, dtype)
                for i, prompt in enumerate(prompts):
                    for seed in seeds:
                        job = (*key, i, seed)
                        if job in done:
                            continue
                        video = _one_video(model, p, vae, contexts[i], negative, seed, device, dtype)
                        shown, note = nan_drawn_black(video)
                        if note:  # (its activations overflowed: scored as a blank video, and said)
                            diverged.append(f"{c.label} at {key[1]} latent frames, {sample_id(i, seed)}")
                        if args.save_videos:
                            _save_video(shown, _video_path(out, *job), f"{c.label} · {key[1]} latent frames · seed "
                                        f"{seed} · {sample_id(i, seed)}{note} · \"{prompt}\"")
                        if pool:
                            pending.append((job, pool.submit(world_metrics.score_rollout_video, video, prompt)))
                            _wait_for_room([f for _, f in pending], 2 * workers)
                            pending = _keep_finished(pending, keep)
                        else:
                            keep(job, world_metrics.score_rollout_video(video, prompt))
                        bar.update(1)
                del model
        for job, future in progress_bar(pending, desc="track", unit="video", disable=args.no_progress or not pending):
            keep(job, future.result())
    except KeyboardInterrupt as err:  # (Ctrl-C, or SIGTERM: Terminated)
        if pool:
            _keep_finished(pending, keep)
        bar.close()  # (before the message: a bar closed after it is drawn again under it)
        sigterm = isinstance(err, Terminated)
        print(f"\nworkbench evaluate: {'terminated (SIGTERM)' if sigterm else 'interrupted'}: {len(done)} of "
              f"{len(jobs)} video(s) scored "
              f"and kept in {out / scores.FOLDER}; run the same command again to go on from there", file=sys.stderr)
        return 143 if sigterm else 130
    finally:
        bar.close()
        if pool:
            pool.shutdown(cancel_futures=True)
    results = [(job[0], job[1], job[3], done[job]) for job in jobs]
    reused = len(jobs) - new
    notes = [setup, f"{new} video(s) in {time.time() - started:.0f} s" + (f", {reused} kept from an earlier run."
                                                                         if reused else "."),
             *skipped, *diverged_notes(diverged),
             f"command: {printable(command)}"]  # (prompts as given: their control characters escaped)
    paths = world_report.write_results(out, results, title=title, notes=notes, compare=compare)

    # --- what a user reads
    videos = world_report.videos_frame(results)
    print(world_report.table_text(world_report.summary(videos)))
    if compare:
        rows, lines = world_report.compare_models(videos, *compare)
        print(f"\n{compare[1]} vs {compare[0]}:")
        for line in lines:
            print(f"  {line}")
        print("\n" + world_report.comparison_text(rows, *compare))
    for line in [*skipped, *diverged_notes(diverged)]:
        print(f"note: {line}")
    print(f"\nwrote {', '.join(p.name for p in paths.values())} to {out}")
    return 0


def diverged_notes(videos: list[str]) -> list[str]:
    """The note on the videos whose rollout was not finite, this run's (a later run that reuses their scores
    keeps them as they were scored)."""
    if not videos:
        return []
    return [f"{len(videos)} rollout(s) were not finite (NaN or inf: the activations overflowed), each scored as a "
            f"blank video (the tracker finds nothing: adherent 0, detected 0): {'; '.join(videos[:5])}"
            + (f" and {len(videos) - 5} more" if len(videos) > 5 else "")]


def plan_runs(args, choices, prompts, seeds, lengths, device, dtype):
    """extract's plan of every (model, length), validated without loading weights: {(label, frames): Plan}, and
    the notes of what is skipped (bidirectional samplers past 21 latent frames)."""
    from models import world
    from models.wan.folder import present, wan_parts
    from workbench.errors import WorkbenchError
    from workbench.extract import ExtractConfig, plan
    from workbench.weights import check_vae_file

    plans, skipped = {}, []
    for c in choices:
        for frames in lengths:
            if c.sampler == "bidirectional" and frames > LONG:
                skipped.append(f"{c.label}: skipped {frames} latent frames (a bidirectional sampler has no sliding "
                               "window)")
                continue
            window = frames > LONG
            cfg = ExtractConfig(
                prompts=prompts, seeds=seeds, num_frames=frames, model=c.model, wan_dir=c.wan_dir,
                checkpoint=c.checkpoint,
                use_ema=c.use_ema, trust_pickle=args.trust_pickle, sampler=c.sampler,
                num_inference_steps=_setting(args.num_inference_steps, c.num_inference_steps, "num_inference_steps"),
                guidance_scale=_setting(args.guidance_scale, c.guidance_scale, "guidance_scale"),
                local_attn_size=args.local_attn_size if window else -1, sink_size=args.sink_size if window else 0,
                height=world.HEIGHT, width=world.WIDTH, device=device, dtype=dtype)
            plans[c.label, frames] = plan(cfg)
            vae_parts = wan_parts(plans[c.label, frames].wan_dir)
            if not present(vae_parts.vae):
                raise WorkbenchError(f"model {c.label!r}: no VAE at {vae_parts.describe('vae')} (evaluate decodes "
                                     "with the model folder's VAE)")
            check_vae_file(plans[c.label, frames].wan_dir)
    if not plans:
        raise WorkbenchError("nothing to run: " + "; ".join(skipped))
    return plans, skipped


def _setting(given, model_own, key: str):
    """A sampler setting: the command line's, else the model's own (zoo models), else the shared default."""
    from workbench.commands import SAMPLER_DEFAULTS

    return given if given is not None else model_own if model_own is not None else SAMPLER_DEFAULTS[key]


def _compare_pair(text: str | None, labels: list[str]):
    from workbench.errors import WorkbenchError

    if text is None:
        return tuple(labels) if len(labels) == 2 else None
    pair = [x.strip() for x in text.split(",")]
    unknown = [x for x in pair if x not in labels]
    if len(pair) != 2 or unknown or pair[0] == pair[1]:
        why = (f"{unknown[0]!r} is not a model of this run" if unknown and len(pair) == 2 else
               "the same model twice" if len(pair) == 2 and pair[0] == pair[1] else "not two labels")
        raise WorkbenchError(f"--compare {text!r}: {why}; give two different model labels A,B of {labels} (--model "
                             "LABEL=SOURCE names them)")
    return tuple(pair)


def _pool(workers: int):
    if workers == 0:
        return None
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread)


def _one_thread() -> None:
    """In a tracking worker, before numpy loads: one BLAS thread each (the workers are the parallelism)."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"


def _wait_for_room(futures, limit: int) -> None:
    """Block while more than `limit` videos wait to be tracked (each holds its pixels in memory)."""
    from concurrent.futures import FIRST_COMPLETED, wait

    while sum(not f.done() for f in futures) > limit:
        wait([f for f in futures if not f.done()], return_when=FIRST_COMPLETED)


def _load_text_and_vae(p, prompts, device, dtype):
    """The text encoder's contexts of every prompt (and the empty negative prompt for CFG samplers) and the VAE,
    both from the model's folder."""
    import torch

    from models.wan.folder import wan_parts
    from models.wan.text_encoder import TextEncoder, prompt_cache_dir
    from models.wan.vae import WanVAE
    from workbench.extract import _dtype

    encoder = TextEncoder.from_wan_dir(p.wan_dir, device=torch.device(device), cache_dir=prompt_cache_dir())
    contexts = [encoder.encode([prompt]) for prompt in prompts]
    negative = encoder.encode([p.cfg.negative_prompt]) if p.cfg.sampler != "causal_few_step" else None
    vae = WanVAE.from_file(wan_parts(p.wan_dir).vae, device=device, dtype=_dtype(dtype))
    return vae, contexts, negative


def _load(p, device, dtype):
    import torch

    from workbench.extract import _dtype, load_model

    return load_model(p, torch.device(device), _dtype(dtype))


def _one_video(model, p, vae, emb, negative, seed, device, dtype):
    """One rollout exactly as `extract` runs it, decoded: float32 numpy [3, T, H, W] in [-1, 1]."""
    import torch

    from workbench.extract import _dtype, sample_rollout

    latents = sample_rollout(model, p, emb, negative, seed, torch.device(device), _dtype(dtype))  # [1, F, C, h, w]
    stream, step = vae.stream_decoder(), model.num_frame_per_block  # decoded chunk by chunk, as generate does
    pieces = [stream.push(latents[:, f : f + step]) for f in range(0, latents.shape[1], step)]
    return torch.cat(pieces, dim=2)[0].float().cpu().numpy()


def _keep_finished(pending, keep) -> list:
    """Keep (on disk) the score of every finished tracking job; the unfinished ones, still pending."""
    left = []
    for job, future in pending:
        if future.done() and not future.cancelled() and future.exception() is None:
            keep(job, future.result())
        else:
            left.append((job, future))
    return left


def _video_path(out: Path, label: str, frames: int, prompt_index: int, seed: int) -> Path:
    """--save-videos: videos/LABEL/fFRAMES/pPPPP-sS.mp4 (and .png beside it)."""
    from workbench.store import sample_id

    return Path(out) / "videos" / label / f"f{frames}" / f"{sample_id(prompt_index, seed)}.mp4"


def _save_video(video, path: Path, title: str) -> None:
    """The PNG grid first and the mp4 last (each atomic): an mp4 on disk means both are there."""
    from models.video import write_mp4, write_png_grid

    path.parent.mkdir(parents=True, exist_ok=True)
    write_png_grid(video, path.with_suffix(".png"), ncols=9, frames=list(range(0, video.shape[1], 10)),
                   label_frames=True, title=title)
    write_mp4(video, path, fps=16)
