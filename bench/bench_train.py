"""Benchmark: one Self-Forcing DMD iteration of the 1.3B models at 21 latent frames (480x832), random weights.

A DMD iteration = one generator update (a 7-chunk rollout with gradient at the exit step, then the teacher
with CFG and the critic on the generated video) + one critic update (a no-grad rollout, then the critic's flow
loss with gradient). Generator, critic (fake score) and teacher (real score) are 1.3B Wan models with random
weights: generator and critic keep float32 master weights and AdamW state, compute in bf16 through FSDP2
mixed precision (the researchers' setup); the frozen teacher is stored in bf16. Activation checkpointing on,
batch 1 per GPU, text context random (no umT5). The exit step decides the cost of a rollout (exit k runs
k + 1 denoising forwards per chunk), so each exit step is timed.

    python bench/bench_train.py                                   # one H200
    torchrun --nproc_per_node 2 bench/bench_train.py --fsdp       # two H200s, FSDP over both (global batch 2)
    options: --exits 0 3  --repeats 2  --loss dmd|sid  --no-checkpointing
    python bench/bench_train.py --tiny                            # a CPU smoke test of this script (tiny models)

Prints a table (seconds per generator / critic update, peak memory) and checks itself: losses finite, the
generator and critic change, the teacher does not. Random weights: numbers are speed and memory, not quality.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def random_model(causal: bool, dtype, seed: int, device, size: str = "wan2.1-t2v-1.3b"):
    from models.wan.config import preset
    from models.wan.model import WanModel

    with torch.device("meta"):
        model = WanModel(preset(size), causal=causal)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)  # the same weights on every rank
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.to(dtype).eval()


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fsdp", action="store_true", help="run under torchrun with several GPUs")
    ap.add_argument("--exits", type=int, nargs="+", default=[0, 1, 2, 3], help="exit steps to time (0-3)")
    ap.add_argument("--repeats", type=int, default=1, help="timed iterations per exit step")
    ap.add_argument("--loss", default="dmd", choices=["dmd", "sid"])
    ap.add_argument("--no-checkpointing", action="store_true", help="activation checkpointing off")
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--tiny", action="store_true", help="tiny models, 6 frames of 4x6, CPU allowed (smoke test)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("needs a CUDA GPU (or --tiny for a CPU smoke test)")
        return 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.fsdp and world < 2:
        print("--fsdp: launch with torchrun --nproc_per_node N (N >= 2)")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True  # as the researchers' trainer
    torch.backends.cudnn.allow_tf32 = True

    from training import distributed as fsdp
    from training.checks import check_config, load_train_config
    from training.data import PromptSource
    from training.text import HashTextEncoder
    from training.trainer import Models, Trainer

    d = fsdp.setup("cuda" if cuda else "cpu")
    root = Path(__file__).resolve().parents[1]
    scratch = tempfile.TemporaryDirectory(prefix="bench_train_")  # (the trainer's logdir; removed at the end)
    logdir = Path(scratch.name)
    size, (h, w), text = ("tiny", (4, 6), (16, 32)) if args.tiny else ("wan2.1-t2v-1.3b", (60, 104), (512, 4096))
    frames = 6 if args.tiny else args.frames
    overrides = [f"distribution_loss={args.loss}", f"total_batch_size={d.world}", "batch_size=1",
                 f"device={d.device.type}", "mixed_precision=true",
                 f"gradient_checkpointing={'false' if args.no_checkpointing else 'true'}",
                 "generator_ckpt=random", "seed=1", "log_iters=1000000", "dfake_gen_update_ratio=1",
                 f"image_or_video_shape=[1,{frames},16,{h},{w}]", f"num_training_frames={frames}"]
    cfg, _ = load_train_config(root / "configs" / "self_forcing_dmd.yaml", overrides)
    plan = check_config(cfg, d.world)
    t0 = time.perf_counter()
    teacher_dtype = torch.bfloat16 if cuda else torch.float32
    models = Models(random_model(True, torch.float32, 1, d.device, size),
                    random_model(False, torch.float32, 2, d.device, size),
                    random_model(False, teacher_dtype, 3, d.device, size))
    trainer = Trainer(cfg, models, HashTextEncoder(*text, d.device), logdir, d=d, plan=plan,
                      data=PromptSource(["A majestic eagle soaring through a cloudy sky, cinematic lighting"], 1),
                      progress=False, log=lambda *_: None)
    build_s = time.perf_counter() - t0
    n_chunks = frames // 3

    def probe_param(model):  # (the local shard of) one block weight, to see that an update happened
        p = model.blocks[0].self_attn.q.weight
        return (p.to_local() if hasattr(p, "to_local") else p).detach().float().clone()

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t, torch.cuda.max_memory_allocated() if cuda else 0

    def gen_update():
        return trainer.update(trainer.generator, trainer.gen_opt, trainer.generator_loss, 10.0, "generator")

    def critic_update():
        return trainer.update(trainer.critic, trainer.critic_opt, trainer.critic_loss, 10.0, "critic")

    failures = []
    # warm-up (torch.compile of the fused pointwise kernels, cuDNN plans, allocator) at the first exit step
    trainer.exit_indices = lambda stream: [args.exits[0]] * n_chunks
    t = time.perf_counter()
    g0, c0, r0 = probe_param(trainer.generator), probe_param(trainer.critic), probe_param(trainer.teacher)
    gen_update()
    critic_update()
    warm_s = time.perf_counter() - t
    if torch.equal(g0, probe_param(trainer.generator)):
        failures.append("the generator update did not change the generator")
    if torch.equal(c0, probe_param(trainer.critic)):
        failures.append("the critic update did not change the critic")
    if not torch.equal(r0, probe_param(trainer.teacher)):
        failures.append("the teacher changed")
    static = torch.cuda.memory_allocated() if cuda else 0

    rows = []
    for i, k in enumerate(args.exits):
        trainer.exit_indices = lambda stream, k=k: [k] * n_chunks
        if i > 0:  # an untimed iteration first: exit 0 fills the cross-attention cache with gradient (new graphs)
            gen_update(), critic_update()
        for _ in range(args.repeats):
            g_logs, g_s, g_mem = timed(gen_update)
            c_logs, c_s, c_mem = timed(critic_update)
            trainer.step += 1
            for name, v in {**g_logs, **c_logs}.items():
                if not torch.isfinite(torch.tensor(v)):
                    failures.append(f"exit {k}: {name} = {v}")
            if g_logs["generator_grad_norm"] <= 0:
                failures.append(f"exit {k}: zero generator gradient")
            rows.append((k, g_s, c_s, g_mem, c_mem, g_logs["generator_loss"], c_logs["critic_loss"]))

    if d.main:
        name = torch.cuda.get_device_properties(d.device).name if cuda else platform.processor() or "cpu"
        print(f"# bench_train: Self-Forcing {args.loss.upper()} iteration, {size} generator + critic + teacher, "
              f"{frames} latent frames x {h}x{w}, batch 1/GPU")
        print(f"# {name} x {d.world}, torch {torch.__version__}, python {platform.python_version()}, "
              f"checkpointing {'off' if args.no_checkpointing else 'on'}, FSDP2 (fp32 master, bf16 compute)")
        print(f"# build {build_s:.1f} s, warm-up iteration {warm_s:.1f} s, memory after warm-up "
              f"{gib(static):.1f} GiB (weights, grads, AdamW states) on rank 0")
        print()
        print("| exit step | generator update (s) | critic update (s) | DMD iteration (s) | peak mem gen (GiB) "
              "| peak mem critic (GiB) | generator loss | critic loss |")
        print("|---|---|---|---|---|---|---|---|")
        for k, g_s, c_s, g_mem, c_mem, gl, cl in rows:
            print(f"| {k} | {g_s:.2f} | {c_s:.2f} | {g_s + c_s:.2f} | {gib(g_mem):.1f} | {gib(c_mem):.1f} "
                  f"| {gl:.4g} | {cl:.4g} |")
        mean = statistics.mean(g + c for _, g, c, *_ in rows)
        peak = max(max(r[3], r[4]) for r in rows)
        print(f"\nmean over exit steps {sorted(set(args.exits))}: {mean:.2f} s per DMD iteration "
              f"(global batch {d.world}); peak memory {gib(peak):.1f} GiB per GPU")
        print(f"a training step with dfake_gen_update_ratio 5 costs on average 1/5 generator update + 1 critic "
              f"update: {statistics.mean(r[1] for r in rows) / 5 + statistics.mean(r[2] for r in rows):.2f} s")
        print("self-check:", "OK" if not failures else "FAILED: " + "; ".join(failures))
    if d.world > 1:
        d.barrier()
        torch.distributed.destroy_process_group()
    scratch.cleanup()
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
