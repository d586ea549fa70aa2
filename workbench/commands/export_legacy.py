"""`workbench export-legacy`: a store's mean logits as the researchers' earlier per-layer `.pt` files."""

from __future__ import annotations

import argparse

HELP = "write a store's mean logits as the old per-layer .pt files (run_extraction_each.py layout)"

EPILOG = """\
examples:
  workbench extract --layer 3 --out runs/layer3.zarr
  workbench export-legacy runs/layer3.zarr                     # -> runs/layer3_legacy/p0000-s42/layer3.pt
  workbench export-legacy runs/sf.zarr --layers 0,4 --samples p0000-s42 --out runs/legacy/
  workbench export-legacy runs/train/probes.zarr --train-step 500 --out runs/legacy_500/   # a training probe store

then, in the old notebooks:
  data = torch.load("runs/layer3_legacy/p0000-s42/layer3.pt", weights_only=True)
  data["full_frame_attention"].float().numpy()                 # [heads, F, F]
  data["last_block_frame_attention"].float().numpy()           # [heads, F]

what is in a file (the layout the researchers' `run_extraction_each.py` wrote; weights_only-safe: plain values
and tensors only):
  full_frame_attention        fp16 [heads, F, F]  attn_logit at --step (default 0: t = 1000, the fork's choice),
                              0 where the frame pair was not attended (above the block staircase, evicted)
  last_block_frame_attention  fp16 [heads, F]     the mean of full_frame_attention over the last chunk's queries
  is_logits True, layer_index, prompt, num_frames, frame_seq_length, num_frame_per_block, num_heads,
  block_sizes, query_frames, key_frames, last_block_query_frames; plus sample, seed, step, timestep, phase,
  cfg (cond, uncond or none), head_indices, checkpoint, use_ema (generator_ema or generator), extraction_method
  'workbench-store'.
One file per (sample, layer) under OUT/<sample>/layer<N>.pt; existing files are replaced.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("export-legacy", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store", help="an attention store (made by `workbench extract`)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: STORE without .zarr, plus _legacy)")
    p.add_argument("--layers", help="layers of the store to export: 3, 0-5, 0,4 or all (default: all)")
    p.add_argument("--samples", help="sample ids, comma-separated, e.g. p0000-s42 (default: all)")
    p.add_argument("--step", type=int, default=0,
                   help="which step of the per-chunk schedule (default: %(default)s, t = 1000)")
    p.add_argument("--train-step", type=int, metavar="N",
                   help="for a training probe store (probes.zarr of `workbench train`): which train step to export")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from workbench.inputs import find_store, parse_int_list
    from workbench.legacy import export_legacy

    store = find_store(args.store)  # (a store above the working directory too, as report finds it)
    if store != Path(args.store):
        print(f"opened {store}")
    args.store = str(store)
    layers = parse_int_list(args.layers, what="layer")
    samples = None if args.samples in (None, "all") else [s.strip() for s in args.samples.split(",") if s.strip()]
    export_legacy(args.store, args.out, layers=layers, samples=samples, step=args.step, train_step=args.train_step)
    return 0
