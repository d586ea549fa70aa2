"""`workbench report` and `workbench compare`: HTML reports of stores, from the command line.

`register(subparsers)` adds both subcommands to the `workbench` CLI (workbench/cli.py lists this module in
COMMANDS). xarray and plotly are imported inside the run functions, so `workbench --help` stays quick.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from studies import unfinished_note

REPORT_HELP = "an HTML report of a store: checks, head metrics and classes, per-head heatmaps; of an effects store (workbench intervene): ranked effects and per-frame curves"
REPORT_DESCRIPTION = """\
Write a self-contained HTML report (plotly.js inlined: it opens offline) of one attention store:
the store's samples and steps, its invariants checked (rows sum to 1, NaN exactly outside the key window),
layer x head maps of the head metrics (sink mass, own-chunk mass, local mass, mean distance, entropy),
the head taxonomy (sink, local, global, deep_sink, mixed: the first rule that holds, each stated on the page
and in studies/metrics.py) and, per layer, the per-head query x key frame heatmaps, the last chunk's bars with
sink_delta = v[0] - mean(v[1:-1]), a step slider and the recency profile.
"""
REPORT_EPILOG = """\
examples:
  workbench report runs/embedded.zarr --out runs/embedded.html
  workbench report runs/layer3.zarr --out runs/l3.html --layer 3 --sample p0000-s42 --step 0
  workbench extract --layer 5 --stats attn_mass,attn_key_token --token-layers 5 --out runs/k.zarr
  workbench generate --seed 42 --out runs/k       # the same sample's video: its frames go under the key-token maps
  workbench report runs/k.zarr
"""

COMPARE_HELP = "what changed between two stores (e.g. Wan vs Self-Forcing), as an HTML report"
COMPARE_DESCRIPTION = """\
Compare two attention stores head by head and write a self-contained HTML report. Samples are paired
by (prompt, seed), or, for stores made with different seeds, every sample of A with every sample of B of
the same prompt (--pair-by); steps one to one by the nearest timestep (same phase, within --tolerance; a
step is in one pair at most), because the Wan sampler and the few-step rollout do not share step indices; a
CFG store contributes its --cfg branch.

The report lists the matched samples and steps, ranks heads by the Jensen-Shannon divergence (bits)
between their key-frame distributions, and shows each metric for A, B and B - A.
"""
COMPARE_EPILOG = """\
examples:
  workbench compare runs/wan.zarr runs/self_forcing.zarr --out runs/wan_vs_sf.html
  workbench compare runs/a.zarr runs/b.zarr --out runs/c.html --tolerance 5 --layer 0 --layer 4
  workbench compare runs/seed0.zarr runs/seed1.zarr --pair-by prompt       # stores of different seeds
  workbench compare runs/train/probes.zarr runs/train/probes.zarr --train-step 0 --train-step 500   # training
"""

QUERY_FRAMES_HELP = ("query frames the head metrics average over: last_chunk (the researchers' last block, "
                     "default), history (every chunk but the first) or all")


def register(subparsers) -> None:
    report = subparsers.add_parser("report", help=REPORT_HELP, description=REPORT_DESCRIPTION, epilog=REPORT_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("store", help="the store to report on (a *.zarr folder written by `workbench extract`)")
    report.add_argument("--out", default=None,
                        help="HTML file to write (default: the store path with .html, e.g. runs/embedded.html); for an "
                             "attention store also the same name with .csv (the head metrics and classes), for an "
                             "effects store with .png (the per-frame curves) and, for a sweep, _heads.png")
    report.add_argument("--layer", "--layers", action="append", metavar="N",
                        help="layers to show in detail: 3, 0-5, 0,4 or all; repeatable (default: every captured layer, "
                             "at most 8)")
    report.add_argument("--sample", metavar="ID", help="one sample id, e.g. p0000-s42 (default: mean over samples)")
    report.add_argument("--step", type=int, default=None,
                        help="step of the overview maps and heatmaps (default: the first captured denoising step; "
                             "step 0, t=1000, when it was captured)")
    report.add_argument("--query-frames", default=None, choices=["last_chunk", "history", "all"],
                        help=QUERY_FRAMES_HELP)  # (None: last_chunk, and a given one is refused for effects stores)
    report.add_argument("--video", metavar="MP4|FOLDER",
                        help="the sample's video (or a folder of `workbench generate` outputs, pPPPP-sS.mp4): its "
                             "frames go under the key-token maps (attn_key_token); default: found beside the store "
                             "as `workbench view` finds it (runs/x.mp4, or runs/x/pPPPP-sS.mp4 for runs/x.zarr)")
    report.set_defaults(func=run_report)

    compare = subparsers.add_parser("compare", help=COMPARE_HELP, description=COMPARE_DESCRIPTION,
                                    epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_argument("store_a", metavar="A.zarr", help="the reference store (differences are B - A)")
    compare.add_argument("store_b", metavar="B.zarr", help="the store compared with it")
    compare.add_argument("--out", help="HTML file to write (default: runs/compare_A_vs_B.html, A and B the stores' "
                                       "names), and beside it the ranked heads as CSV (the same name, .csv)")
    compare.add_argument("--tolerance", type=float, default=20.0,
                         help="largest |timestep_A - timestep_B| of a matched step, in timestep units of [0, 1000] "
                              "(default 20)")
    compare.add_argument("--cfg", default="cond", choices=["cond", "uncond"],
                         help="the CFG branch a CFG store contributes (default: cond)")
    compare.add_argument("--layer", "--layers", action="append", metavar="N",
                         help="restrict to these layers: 3, 0-5, 0,4 or all; repeatable (default: every layer both "
                              "stores hold)")
    compare.add_argument("--query-frames", default="last_chunk", choices=["last_chunk", "history", "all"],
                         help=QUERY_FRAMES_HELP + "; a bidirectional store's earlier rows attend frames a causal "
                              "store's cannot (a note says how much of their mass goes there), its last chunk's the "
                              "same frames")
    compare.add_argument("--train-step", type=int, action="append", metavar="N",
                         help="the train step of a training probe store (workbench train's probes.zarr) to compare; "
                              "once: for every probe store among A and B, twice: A's then B's")
    compare.add_argument("--top", type=int, default=4, help="heads shown as heatmaps, most changed first (default 4)")
    compare.add_argument("--pair-by", default="auto", choices=["auto", "seed", "prompt"],
                         help="seed: samples with the same prompt and seed; prompt: every sample of A with every "
                              "sample of B of the same prompt (stores made with different seeds; the divergence "
                              "then includes the spread between seeds); auto: seed when the stores share a "
                              "(prompt, seed), else prompt (default: auto)")
    compare.set_defaults(func=run_compare)


def layer_list(given) -> list[int] | str | None:
    """--layer as given, once or repeated, each 3, 0-5, 0,4 or all -> the layers in order, once each; "all"; None
    when not given (the command's default)."""
    from workbench.inputs import parse_int_list

    if not given:
        return None
    parsed = [parse_int_list(str(g), what="layer") for g in given]
    if any(p is None for p in parsed):
        return "all"
    return list(dict.fromkeys(x for p in parsed for x in p))


def writable_output(path) -> Path:
    """The HTML file to write, its folder checked before any work (a clear error if it cannot be written)."""
    from models.files import check_writable_dir
    from studies.page import html_out

    path = html_out(path, "--out")
    check_writable_dir(path.parent)
    return path


def run_report(args) -> int:
    from models.errors import ModelInputError
    from studies import find_store
    from studies.report import build_report

    from workbench.errors import WorkbenchError
    from workbench.store import beside, named

    try:  # (beside the store it opens: one found in a folder above the working directory too)
        out = writable_output(args.out if args.out else beside(find_store(named(args.store)), ".html"))
    except ModelInputError as err:
        if args.out:
            raise
        from workbench.progress import shell_word

        raise WorkbenchError(f"{err}; the report goes beside the store unless --out FILE names another place, e.g. "
                             f"--out {shell_word(beside(Path(named(args.store).name), '.html'))}") from None
    start = time.time()
    path = build_report(args.store, out, layer=layer_list(args.layer), sample=args.sample, step=args.step,
                        query_frames=args.query_frames, video=args.video)
    print(f"wrote {path}")
    for extra in (path.with_suffix(".csv"), path.with_suffix(".png"), path.with_name(path.stem + "_heads.png")):
        if extra.is_file() and extra.stat().st_mtime >= start - 1:  # (the head table; an effects store's images)
            print(f"wrote {extra}")
    if note := unfinished_note(_attrs(args.store)):
        print(f"note: {note}")
    return 0


def _attrs(store) -> dict:
    """A store's attributes (its zarr group's), {} where they cannot be read."""
    try:
        import zarr

        from studies import find_store

        return dict(zarr.open_group(str(find_store(store)), mode="r").attrs)
    except Exception:  # (the report itself has said what is wrong with the store)
        return {}


def run_compare(args) -> int:
    from studies.report import build_compare_report
    from workbench.store import named

    # (one default file for every pair was replaced, without a word, by the next compare)
    out = args.out or f"runs/compare_{named(args.store_a).stem}_vs_{named(args.store_b).stem}.html"
    path = build_compare_report(args.store_a, args.store_b, writable_output(out), tolerance=args.tolerance,
                                cfg=args.cfg, layers=None if (layers := layer_list(args.layer)) == "all" else layers,
                                query_frames=args.query_frames, top=args.top,
                                pair_by=args.pair_by, train_steps=args.train_step or (), log=print)
    print(f"wrote {path} and {path.with_suffix('.csv')} (the ranked heads)")
    return 0
