"""Benchmark: where a training step of the embedded zoo's tiny DiTs spends its time (docs/zoo.md).

The zoo's DiTs are tiny (6 layers, dim 128; models/wan/embedded.py), so a step on an H200 is bound by launches and
host work, not by FLOPs. This times, for each zoo config (teacher: bidirectional flow matching; df: causal
diffusion forcing; dmd / sid: Self-Forcing score distillation), seconds per step at several batch sizes, and
profiles a few steps (torch.profiler: the top host and device ops, and the share of the wall time the GPU is
busy), so that the zoo's batch sizes and step counts can be chosen from numbers.

    python3 bench/bench_zoo_step.py [--stages teacher,df,dmd] [--batches 64,128,256] [--steps 10] [--profile]
    python3 bench/bench_zoo_step.py --device cpu --stages teacher --batches 2 --steps 1   # a smoke test
    python3 bench/bench_zoo_step.py --device cpu --batches 1 --set image_or_video_shape=[1,21,16,2,2]

The last: a latent of 2x2 pixels (one token per frame) makes the compute negligible, so what is timed is the
host work per step (hooks, dispatch, optimiser, EMA), the fixed cost that bounds the zoo's steps on an H200.
`--set KEY=VALUE` (repeatable) overrides any config key, e.g. `--set adamw_impl=foreach`.

Models start from the zoo's seeded init (`python3 -m training.zoo --stages init`, with the shipped world VAE
data/zoo/Wan2.1_VAE.pth); the flow-matching stages train on the synthetic latent set (same shapes as the
world's), the score-distillation stages use the init as generator, critic and teacher. Numbers are speed only.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

CONFIGS = {"teacher": "configs/zoo_teacher.yaml", "df": "configs/zoo_df.yaml", "dmd": "configs/zoo_dmd.yaml",
           "sid": "configs/zoo_sid.yaml"}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def init_checkpoint(work: Path) -> Path:
    """The init's weights as a Self-Forcing .pt (`generator`, keys prefixed `model.`): DMD/SiD start from one."""
    from safetensors.torch import load_file

    path = work / "init_generator.pt"
    if not path.is_file():
        sd = load_file(work / "init" / "diffusion_pytorch_model.safetensors")
        torch.save({"generator": {f"model.{k}": v for k, v in sd.items()}}, path)
    return path


def make_trainer(stage: str, work: Path, batch: int, device: str, extra: list[str] = ()):
    from training.build import build_trainer
    from training.checks import load_train_config

    sets = [f"model_root={work}", "model_kwargs.model_name=init", f"device={device}", f"batch_size={batch}",
            f"total_batch_size={batch}", "log_iters=1000000", "ema_start_step=0"]
    if stage in ("teacher", "df"):
        sets.append("data_path=synthetic")
    else:
        sets += [f"generator_ckpt={init_checkpoint(work)}", "real_name=init", "fake_name=init"]
    sets += list(extra)
    cfg, sid = load_train_config(ROOT / CONFIGS[stage], sets)
    logdir = Path(tempfile.mkdtemp(prefix=f"zoo_{stage}_", dir=work))
    return build_trainer(cfg, logdir, sets_sid_alpha=sid, log=lambda *_: None, progress=False)


def time_steps(trainer, steps: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.iteration()
    sync(device)
    return (time.perf_counter() - t0) / steps


def profile(trainer, steps: int, device: str, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with prof(activities=acts) as p:
        for _ in range(steps):
            trainer.iteration()
        sync(device)
    wall = time.perf_counter() - t0
    events = p.key_averages()
    out = ["phases (record_function ranges of training/steps.py), per step:"]
    for e in sorted((e for e in events if "/" in e.key and e.key.split("/")[0] in ("generator", "critic")),
                    key=lambda e: -e.cpu_time_total):
        out.append(f"  {e.key:22s} host {e.cpu_time_total / 1e3 / steps:8.1f} ms   device "
                   f"{e.device_time_total / 1e3 / steps:8.1f} ms   ({e.count // steps} per step)")
    out.append(f"  wall {1e3 * wall / steps:.1f} ms per step")
    if device == "cuda":
        busy = sum(e.self_device_time_total for e in events) / 1e6
        launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
        out.append(f"GPU busy {busy:.3f} s of {wall:.3f} s wall ({100 * busy / wall:.0f}%), "
                   f"{launches / steps:.0f} kernel launches per step")
        out.append(events.table(sort_by="self_cuda_time_total", row_limit=rows))
    out.append(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="teacher,df,dmd")
    ap.add_argument("--batches", default="64,128,256")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per (stage, batch), after 3 warm-up steps")
    ap.add_argument("--profile", action="store_true", help="profile 5 steps at the first batch size per stage")
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vae", default=str(ROOT / "data/zoo/Wan2.1_VAE.pth"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every stage (repeatable)")
    args = ap.parse_args(argv)
    from training import zoo

    work = Path(tempfile.mkdtemp(prefix="bench_zoo_"))
    zoo.main(["--stages", "init", "--work", str(work), "--vae", args.vae, "--device", args.device, "--no-progress"])
    rows = []
    for stage in args.stages.split(","):
        for i, batch in enumerate(int(b) for b in args.batches.split(",")):
            trainer = make_trainer(stage, work, batch, args.device, args.set)
            time_steps(trainer, min(3, args.steps), args.device)
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            s = time_steps(trainer, args.steps, args.device)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
            rows.append((stage, batch, s, batch / s, peak))
            print(f"{stage:8s} batch {batch:4d}: {s:.4f} s/step, {batch / s:8.1f} videos/s, peak {peak:.2f} GiB",
                  flush=True)
            if args.profile and i == 0:
                print(profile(trainer, 5, args.device, args.rows), flush=True)
            trainer.close()
            del trainer
    print(f"\n{datetime.date.today()} {platform.node()} {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}"
          f" torch {torch.__version__}: python3 bench/bench_zoo_step.py {' '.join(argv or sys.argv[1:])}")
    print("| stage | batch | s/step | videos/s | peak GiB |\n|---|---|---|---|---|")
    for stage, batch, s, vps, peak in rows:
        print(f"| {stage} | {batch} | {s:.4f} | {vps:.1f} | {peak:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
