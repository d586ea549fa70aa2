"""Benchmark: the 1.3B graphed rollout (21 latent frames, 480x832, 35 DiT forwards, random bf16 weights) with a
boolean module flag of the model's code on and off, alternating; by default `--flag
models.wan.model:DIRECT_KV_WRITES` (the chunk's keys/values made in the KV cache's slots, or copied in after,
the path before session 21); the others in the key: `models.wan.model:CONTIGUOUS_TOKENS` (the tokens made row-major
once per forward) and `models.wan.fused:NORM_KERNELS` (the LayerNorms as one-pass Triton row kernels), both session
22, and `models.wan.model:CACHE_ONLY_SKIPS_LAST_BLOCK` (the context pass stops the last block once its keys/values
are written; session 30), `models.wan.fused:RESIDUAL_NORMS` (the gated residuals added in the passes of the norms
after them; session 40). The flag must be part of the rollout graphs' key (models/common/rollout.py), so that
each setting records its own graphs. The two settings alternate for `--rounds` rounds of `--repeats` timed
rollouts each, so that the GPU's drift (its clock under the 700 W limit, bench/gpu_power.py) falls on both;
every round prints its clock and power, and the latents of the two are compared. Optionally (`--capture`) the
same for an all-layer fused capture (`--skip-plain`: only it, for a flag of the capture's own work, such as
`models.common.triton_attention:MEANS_FIRST` or `MEANS_PAIRED`, the frame means' order and launches, session 39).

    python bench/bench_flag_ab.py [--flag MODULE:NAME] [--rounds 3] [--repeats 3] [--capture [--skip-plain]]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_rollout import random_model, rollout_inputs, run_rollout, timed  # noqa: E402
from gpu_power import sampler  # noqa: E402
from models.common.rollout import release_graphs  # noqa: E402
from workbench.capture import CaptureSpec, Geometry, StatsProbe  # noqa: E402
from workbench.hooks import attach  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--capture", action="store_true", help="also alternate an all-layer fused capture")
    ap.add_argument("--skip-plain", action="store_true", help="with --capture: only the capture")
    ap.add_argument("--flag", default="models.wan.model:DIRECT_KV_WRITES",
                    help="MODULE:NAME of the boolean flag to alternate (part of the rollout graphs' key)")
    args = ap.parse_args()
    module_name, _, flag = args.flag.partition(":")
    module = importlib.import_module(module_name)
    if not isinstance(getattr(module, flag, None), bool):
        ap.error(f"--flag {args.flag!r}: {module_name} has no boolean {flag!r}")
    default = getattr(module, flag)
    sampler.start()
    print(f"# bench_flag_ab  {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"{torch.cuda.get_device_name()}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"# command: {' '.join(sys.argv)}")
    model = random_model()
    noise, context, g = rollout_inputs()
    spec = CaptureSpec(tuple(range(30)), tuple(range(12)), (0, 1, 2, 3, 4), ("attn_mass", "attn_logit"))
    geo = Geometry(batch=1, num_frames=21, frame_seq_len=1560, text_len=512)
    setups = ([] if args.skip_plain and args.capture else [("plain", None)]) + \
        ([("fused capture, all 30 layers", "fused")] if args.capture else [])
    for name, mode in setups:
        model.attention_kernel = "auto" if mode is None else "triton"
        times = {True: [], False: []}
        latents = {}
        for r in range(args.rounds):
            for on in (True, False):
                setattr(module, flag, on)
                release_graphs(model)
                torch.cuda.reset_peak_memory_stats()
                probe = None if mode is None else StatsProbe(spec, geo, "cuda", mode=mode, kernel="triton")

                def once():
                    if probe is None:
                        return run_rollout(model, noise, context, g, cuda_graphs=True)
                    probe.reset()
                    with attach(model, probe):
                        return run_rollout(model, noise, context, g, cuda_graphs=True)

                t, ts = timed(once, args.repeats, 2)
                times[on] += ts
                if probe is None:  # the latents of this setting, for the comparison below
                    latents[on] = run_rollout(model, noise, context, torch.Generator(device="cuda").manual_seed(7),
                                              cuda_graphs=True)
                peak = torch.cuda.max_memory_allocated() / 2**30
                print(f"| {name}, round {r + 1}, {flag}={on} | {t:.3f} s ({', '.join(f'{x:.3f}' for x in ts)}) | "
                      f"peak {peak:.2f} GiB |")
        a, b = statistics.median(times[True]), statistics.median(times[False])
        print(f"# {name}: {flag}=True {a:.3f} s, False {b:.3f} s (medians of {len(times[True])} rollouts each): "
              f"{100 * (a / b - 1):+.1f}%")
        if mode is None:
            d = (latents[True].float() - latents[False].float()).abs().max().item()
            print(f"# {name}: latents bitwise equal: {torch.equal(latents[True], latents[False])} (max |diff| {d:.3e})")
        release_graphs(model)
    setattr(module, flag, default)


if __name__ == "__main__":
    main()
