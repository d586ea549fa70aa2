"""`workbench train`: train a Self-Forcing model the way the released models were trained, with attention probes."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

HELP = ("train Self-Forcing models (ODE init, DMD, SiD, GAN; text- or image-to-video) or a teacher (diffusion), "
        "probing attention on the way")

EPILOG = """\
The config is one of the researchers' YAMLs (configs/self_forcing_dmd.yaml, self_forcing_sid.yaml), read
unchanged and merged onto configs/default_config.yaml; unknown keys are errors. Model folders are read from
model_root/<name> (model_kwargs.model_name: the generator, real_name: the teacher, fake_name: the critic).
The losses and gradients are those of the researchers' code, including four behaviours the paper does not
describe; --set score_timestep_shift=null kv_cache_gradient=detached text_kv_gradient=every_exit
unused_param_grads=none gives the paper's gradient (docs/training.md).

examples:
  # the whole recipe on a CPU in minutes, with the embedded toy model (data/embedded):
  workbench train --config configs/tiny_ode.yaml --logdir runs/tiny_ode --make-ode-pairs   # teacher ODE pairs
  workbench train --config configs/tiny_ode.yaml --logdir runs/tiny_ode                    # ODE init
  workbench train --config configs/tiny_dmd.yaml --logdir runs/tiny_dmd                    # DMD, with probes
  workbench train --config configs/tiny_teacher.yaml --logdir runs/tiny_teacher            # diffusion teacher
  workbench train --config configs/world_gan.yaml --logdir runs/world_gan     # GAN on world videos (see the file)
  workbench train --config configs/world_i2v_dmd.yaml --logdir runs/world_i2v  # image-to-video DMD (see the file)

  # the released recipe (Wan2.1 folders under wan_models/, 8 GPUs):
  torchrun --nproc_per_node 8 -m workbench.cli train --config configs/self_forcing_dmd.yaml \\
      --logdir runs/sf_dmd --set generator_ckpt=checkpoints/ode_init.pt probe.every=50 \\
      'probe.prompts=[A majestic eagle soaring through a cloudy sky]' probe.layers=[0,15,29]

  workbench train --config configs/tiny_dmd.yaml --logdir runs/tiny_dmd --resume    # continue the latest checkpoint

what it writes (logdir): losses.csv (one row per step; also TensorBoard / wandb when asked for),
checkpoint_model_{step:06d}/model.pt (generator, critic, and generator_ema in checkpoints after step ema_start_step:
the researchers' format, loadable by `workbench extract --checkpoint` and their inference.py) with training_state.pt
beside it (for --resume),
probes.zarr (the probe set's attention statistics along train_step; docs/store.md), config.yaml.
Global batch total_batch_size = ranks x batch_size x gradient-accumulation steps.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help=HELP, description=HELP, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="YAML", help="a training config (researchers' format)")
    p.add_argument("--logdir", required=True, metavar="DIR", help="where checkpoints, losses and probes go")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. lr=1e-5 probe.every=10 (OmegaConf dot-list; repeat --set or "
                        "list several)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (default: the config's max_steps; "
                                                 "0 = until interrupted)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from a checkpoint folder (default: the latest in --logdir; with none there, e.g. "
                        "a run stopped before its first checkpoint, from step 0: a job script may always pass it)")
    p.add_argument("--device", help="cpu or cuda (default: the config's device, else cuda if available)")
    p.add_argument("--tensorboard", action="store_true", help="also log to logdir/tensorboard")
    p.add_argument("--wandb", action="store_true", help="also log to wandb (needs the wandb package)")
    p.add_argument("--make-ode-pairs", action="store_true",
                   help="instead of training: make ODE pairs with the teacher (real_name) into data_path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from models.errors import ModelInputError
    from training.errors import TrainingError

    try:
        return _run(args)
    except TrainingError:
        raise
    except ModelInputError as err:  # missing files, bad checkpoints: one clear line (a WorkbenchError)
        raise TrainingError.of(err) from None


def _run(args) -> int:
    from pathlib import Path

    from models.errors import ModelInputError
    from training.checks import load_train_config
    from training.ode_pairs import build_ode_pairs

    overrides = list(args.set)
    if args.device:
        overrides.append(f"device={args.device}")
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    cfg, sets_sid_alpha = load_train_config(args.config, overrides)
    from models.files import check_writable_dir  # outputs checked before any work (nothing created yet)

    check_writable_dir(Path(str(cfg.data_path)).parent if args.make_ode_pairs else args.logdir)
    extra = [name for name, on in (("tensorboard", args.tensorboard), ("wandb", args.wandb)) if on]
    if extra:
        cfg.loggers = list(dict.fromkeys(list(cfg.loggers) + extra))
    if args.make_ode_pairs:
        build_ode_pairs(cfg, progress=not args.no_progress)
        return 0
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:  # one training run per logdir (refused at once, naming the holder)
        from models.files import stale_temporaries
        from training.config import without_secrets
        from workbench.store_lock import StoreLock

        lock = StoreLock(args.logdir, what="a training log folder", option="--logdir",
                         command=shlex.join(without_secrets(sys.argv))).acquire()
        for path in stale_temporaries(args.logdir, older_than_s=0) if Path(args.logdir).is_dir() else []:
            path.unlink(missing_ok=True)  # with the lock held, no other writer is there: a killed write's part
            print(f"removed {path}: the temporary file of a write that was killed")
    try:
        return _train(args, cfg, sets_sid_alpha)
    except ModelInputError:
        # a refusal (a check of build_trainer: device, resume, config) before the log folder was made leaves no lock
        # file beside it either (removed while held: no other run can hold it meanwhile)
        if lock is not None and not Path(args.logdir).exists():
            lock.file.unlink(missing_ok=True)
        raise
    finally:
        if lock is not None:
            lock.release()


def _train(args, cfg, sets_sid_alpha) -> int:
    import torch.distributed as dist

    from training.build import build_trainer, describe
    from training.config import without_secrets
    from training.checkpoints import latest_checkpoint

    trainer = build_trainer(cfg, args.logdir, sets_sid_alpha=sets_sid_alpha, resume=args.resume,
                            progress=not args.no_progress,
                            command=shlex.join(without_secrets(getattr(args, "argv", None) or ["workbench", "train"])))
    try:
        if trainer.d.main:
            print(describe(trainer))
        trainer.train()
        trainer.close()
        if trainer.d.main:
            last = trainer.history[-1] if trainer.history else {}
            losses = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.endswith("_loss"))
            end = trainer.cfg.max_steps
            idle = (f"nothing to train: max_steps {end} is not past the checkpoint's step {trainer.step} (give a "
                    "larger --max-steps to go on)" if end and trainer.step >= end and not trainer.history
                    else "no step finished in this run")
            print(f"step {trainer.step}: " + (losses or idle))
            # only what is on disk: an interrupt before the first step leaves no losses and no checkpoint
            csv, ckpt = trainer.logdir / "losses.csv", trainer.logdir / f"checkpoint_model_{trainer.step:06d}"
            print("; ".join([f"losses: {csv}" if csv.is_file() else "no losses written",
                             f"checkpoint: {ckpt}" if ckpt.is_dir() else "no checkpoint saved"]))
            if trainer.probes is not None and trainer.probes.path.exists():
                from studies.training import table

                print(table(trainer.probes.path))
            if trainer.interrupted:  # a stopped run is not a finished one: a script's `train && evaluate` stops here
                how = "Ctrl-C" if trainer.stop_signal == 2 else "SIGTERM"
                since = "the last checkpoint" if latest_checkpoint(trainer.logdir) else "step 0 (no checkpoint yet)"
                print(f"workbench train: stopped by {how} at step {trainer.step}; the same command with --resume "
                      f"goes on from {since}", file=sys.stderr)
        if dist.get_world_size() > 1:
            trainer.d.barrier()
        return 128 + trainer.stop_signal if trainer.interrupted else 0  # (130 Ctrl-C, 143 SIGTERM: as the shell says)
    finally:  # torchrun's group, ended here rather than in the interpreter's teardown (where NCCL warns, and a rank
        # may abort: 'terminate called without an active exception'); a group the caller made stays the caller's
        if trainer.d.owns_group and trainer.d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
