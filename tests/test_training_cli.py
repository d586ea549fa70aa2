"""`workbench train` end to end on the embedded toy model (data/embedded): ODE pairs from the teacher, ODE
initialisation, DMD from that checkpoint with probes, resume; and the clear errors before any work."""

import argparse
import shutil

import pytest
import torch

from models.wan.embedded import EMBEDDED_DIR
from training.errors import TrainingError

FAST_ODE = ["ode_pairs.num_pairs=2", "ode_pairs.steps=8", "ode_pairs.keep=[0,2,4,6]", "device=cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def train(*argv):
    from training.commands import register

    parser = argparse.ArgumentParser(prog="workbench")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--no-progress", *map(str, argv)])
    args.argv = ["workbench", "train", "--no-progress", *map(str, argv)]  # (as workbench.cli.main records it)
    return args.func(args)


def test_ode_then_dmd_with_probes_then_resume(tmp_path, capsys):
    from models.common.rollout import causal_few_step
    from models.common.scheduler import FlowMatchScheduler
    from models.wan.checkpoint import load_wan
    from training.logger import read_losses
    from workbench.store import open_store

    pairs = tmp_path / "pairs.pt"
    ode = ["--config", "configs/tiny_ode.yaml", "--logdir", tmp_path / "ode", "--set", f"data_path={pairs}",
           "log_iters=2", *FAST_ODE]
    assert train(*ode, "--make-ode-pairs") == 0
    blob = torch.load(pairs, weights_only=True)
    assert blob["kind"] == "ode_pairs" and blob["latents"].shape == (2, 5, 6, 16, 12, 16)
    with pytest.raises(TrainingError, match="already exists"):
        train(*ode, "--make-ode-pairs")
    for keep in ("[2,0,4,6]", "[0,2,2,6]"):  # (the trajectory came in step order under keep's labels)
        with pytest.raises(TrainingError, match=r"^ode_pairs.keep \[.*\]: give steps in \[0, 8\) "
                                                r"\(ode_pairs.steps 8\), increasing, each once"):
            train(*ode, "--set", f"ode_pairs.keep={keep}", f"data_path={tmp_path / 'other.pt'}", "--make-ode-pairs")
    assert train(*ode, "--max-steps", 4) == 0
    init = tmp_path / "ode" / "checkpoint_model_000004" / "model.pt"
    assert sorted(torch.load(init, weights_only=True)) == ["generator"]

    dmd = ["--config", "configs/tiny_dmd.yaml", "--logdir", tmp_path / "dmd", "--set", f"generator_ckpt={init}",
           "dfake_gen_update_ratio=2", "ema_start_step=1", "log_iters=2", "probe.every=2", "probe.layers=[0]",
           "device=cpu", "wandb_key=k123secret"]
    assert train(*dmd, "--max-steps", 3) == 0
    out = capsys.readouterr().out
    assert "DMD training" in out and "attention across training" in out
    rows = read_losses(tmp_path / "dmd")
    assert [r["step"] for r in rows] == [1, 2, 3] and "generator_loss" in rows[0] and "generator_loss" not in rows[1]
    ds = open_store(tmp_path / "dmd" / "probes.zarr")
    assert ds["train_step"].values.tolist() == [0, 2] and ds["layer"].values.tolist() == [0]
    from models.wan.text_encoder import wan_dir_encoder_identity

    assert ds.attrs["fingerprint_fields"]["model"]["text_encoder"] == wan_dir_encoder_identity("data/embedded")
    with pytest.raises(TrainingError, match="--resume"):  # a logdir with checkpoints is not overwritten
        train(*dmd, "--max-steps", 4)
    # the wandb key logs in; it is written nowhere (config.yaml, the checkpoint's state, the probe store)
    state = torch.load(tmp_path / "dmd" / "checkpoint_model_000003" / "training_state.pt", weights_only=False)
    for text in ((tmp_path / "dmd" / "config.yaml").read_text(), state["config_yaml"], ds.attrs["config_yaml"]):
        assert "k123secret" not in text and "wandb_key: (given; not recorded)" in text
    assert "k123secret" not in ds.attrs["command"] and "'wandb_key=(given; not recorded)'" in ds.attrs["command"]
    # from the latest, step 3; where it logs may change (another wandb project)
    assert train(*dmd, "--max-steps", 4, "--resume", "--set", "wandb_project=elsewhere", "wandb_host=h") == 0
    assert [r["step"] for r in read_losses(tmp_path / "dmd")] == [1, 2, 3, 4]
    ds = open_store(tmp_path / "dmd" / "probes.zarr")
    assert ds["train_step"].values.tolist() == [0, 2, 4]
    # provenance as an extract store's: when, the command line (the resumed run listed too), how it was computed
    assert ds.attrs["command"].startswith("workbench train --no-progress --config configs/tiny_dmd.yaml")
    assert "--resume" not in ds.attrs["command"] and "--resume" in ds.attrs["runs"][-1]["command"]
    assert ds.attrs["created_utc"] and ds.attrs["capture_mode"] == "exact" and ds.attrs["dtype"] == "float32"
    assert ds.attrs["attn_backend"]
    # the checkpoint loads in the inference pipeline, on the embedded Wan folder
    ckpt = tmp_path / "dmd" / "checkpoint_model_000004" / "model.pt"
    s = FlowMatchScheduler(5.0)
    for use_ema in (False, True):
        model = load_wan(EMBEDDED_DIR, checkpoint=ckpt, use_ema=use_ema)
        video = causal_few_step(model, torch.randn(1, 6, 16, 12, 16), torch.randn(1, 512, 64),
                                timesteps=s.warp([1000, 750, 500, 250]), scheduler=s)
        assert torch.isfinite(video).all()
    # a checkpoint of this run resumed into a logdir that holds another run: refused (the steps were appended to
    # that run's losses and probes, rc 0)
    other = [tmp_path / "other" if a == tmp_path / "dmd" else a for a in dmd]
    assert train(*other, "--max-steps", 1, "--set", "seed=5") == 0
    before = read_losses(tmp_path / "other")
    with pytest.raises(TrainingError, match=r"holds another run \(seed: 5 here, .* in the resumed run\); its "
                                            r"losses and probes"):
        train(*other, "--max-steps", 5, "--resume", tmp_path / "dmd" / "checkpoint_model_000004")
    assert read_losses(tmp_path / "other") == before
    capsys.readouterr()
    assert train(*dmd, "--max-steps", 4, "--resume") == 0  # (already there: said, not "no step finished")
    assert "step 4: nothing to train: max_steps 4 is not past the checkpoint's step 4" in capsys.readouterr().out
    shutil.copy("data/embedded/checkpoints/ode_init.pt", init)  # the start weights replaced since the run began
    with pytest.raises(TrainingError, match=r"probes.zarr holds the probes of a run that started from weights of "
                                            r"sha256 [0-9a-f]{12}\.\.\.; this run's start weights .* hash"):
        train(*dmd, "--max-steps", 5, "--resume")


def test_a_resume_needs_only_its_checkpoint(tmp_path, capsys):
    """A resume reads the generator's weights from its checkpoint; of generator_ckpt it read only the sha256 the
    probe store's labels hash, yet refused once the file was moved or deleted. Checkpoints now record the start
    weights' sha256 and a resume goes on from it; a start from step 0 still needs the file, and a checkpoint saved
    before the record resumes as before: with the file there (its checkpoints then record it)."""
    from models.files import weights_sha256
    from training.logger import read_losses
    from workbench.store import open_store

    init = tmp_path / "ode_init.pt"
    shutil.copy(EMBEDDED_DIR / "checkpoints" / "ode_init.pt", init)
    sha = weights_sha256(init)
    log = tmp_path / "dmd"
    argv = ["--config", "configs/tiny_dmd.yaml", "--logdir", log, "--set", f"generator_ckpt={init}", "device=cpu",
            "log_iters=1", "probe.every=1", "probe.layers=[0]"]
    assert train(*argv, "--max-steps", 1) == 0

    def recorded(step):
        state = torch.load(log / f"checkpoint_model_{step:06d}" / "training_state.pt", weights_only=True)
        return state.get("start_weights")

    init.unlink()  # (moved, deleted, or a resume on another machine)
    assert train(*argv, "--max-steps", 2, "--resume") == 0
    assert [r["step"] for r in read_losses(log)] == [1, 2]
    assert recorded(1) == recorded(2) == {"file": str(init), "sha256": sha}
    ds = open_store(log / "probes.zarr")  # (the same fingerprint: the store goes on)
    assert ds["train_step"].values.tolist() == [0, 1, 2] and ds.attrs["fingerprint_fields"]["model"]["weights"] == sha
    missing = r"generator_ckpt '.*ode_init.pt' does not exist \(a Self-Forcing .pt"
    with pytest.raises(TrainingError, match=missing):  # a start from step 0 reads the file
        train(*[tmp_path / "new" if a == log else a for a in argv], "--max-steps", 1)
    with pytest.raises(TrainingError, match=missing):  # (--resume with no checkpoint: from step 0)
        train(*[tmp_path / "new" if a == log else a for a in argv], "--max-steps", 1, "--resume")
    # a checkpoint saved before checkpoints recorded the start weights: the file is needed, as before
    state_pt = log / "checkpoint_model_000002" / "training_state.pt"
    state = torch.load(state_pt, weights_only=True)
    del state["start_weights"]
    torch.save(state, state_pt)
    with pytest.raises(TrainingError, match=r"generator_ckpt '.*ode_init.pt' does not exist, and --resume "
                                            r"'.*checkpoint_model_000002' records no sha256 of the run's start"):
        train(*argv, "--max-steps", 3, "--resume")
    shutil.copy(EMBEDDED_DIR / "checkpoints" / "ode_init.pt", init)
    assert train(*argv, "--max-steps", 3, "--resume") == 0
    assert [r["step"] for r in read_losses(log)] == [1, 2, 3] and recorded(3) == {"file": str(init), "sha256": sha}
    # another file at that path, in a run without probes: the resume goes on (its weights are the checkpoint's)
    # and says so
    log = tmp_path / "plain"
    plain = [log if a == tmp_path / "dmd" else a for a in argv[:-2]] + ["--set", "probe.every=0"]
    assert train(*plain, "--max-steps", 1) == 0
    blob = torch.load(init, weights_only=True)
    torch.save({"generator": {k: v + 1 for k, v in blob["generator"].items()}}, init)
    capsys.readouterr()
    assert train(*plain, "--max-steps", 2, "--resume") == 0
    said = capsys.readouterr().out
    assert f"note: generator_ckpt {init} is not the file this run started from" in said and sha[:12] in said
    assert recorded(2) == {"file": str(init), "sha256": sha}  # (the run's start, as recorded)


def test_a_resume_may_change_what_it_probes(tmp_path, capsys):
    """Probes change nothing the steps compute, so a resume may probe otherwise (they were refused as a change of
    the run's config). A probe store of other probe settings is refused before any weights load, naming what
    differs; another probe.store starts at the resume's steps; probe.every may change in the same store."""
    from training.errors import TrainingError
    from workbench.store import open_store

    log = tmp_path / "dmd"
    argv = ["--config", "configs/tiny_dmd.yaml", "--logdir", log, "--set",
            f"generator_ckpt={EMBEDDED_DIR / 'checkpoints' / 'ode_init.pt'}", "device=cpu", "probe.every=1"]
    assert train(*argv, "probe.layers=[0]", "--max-steps", 1) == 0
    capsys.readouterr()
    with pytest.raises(TrainingError, match=r"probes.zarr holds probes of other settings \(layout.layers: \[0\] in "
                                            r"the store, \[1\] in this run\); use a new logdir, or name another "
                                            r"probe.store"):
        train(*argv, "probe.layers=[1]", "--max-steps", 2, "--resume")
    assert "resumed from" not in capsys.readouterr().out  # (refused before the weights load)
    import zarr  # a probe store of an older workbench, its settings not recorded by name: its config's probe settings

    attrs = zarr.open_group(log / "probes.zarr", mode="r+").attrs
    fields = attrs["fingerprint_fields"]
    attrs["fingerprint_fields"] = {"model": {k: fields["model"][k] for k in ("weights", "text_encoder")}}
    with pytest.raises(TrainingError, match=r"other settings \(probe.layers: \[0\] in the store, \[1\] in this "
                                            r"run\); use a new logdir"):
        train(*argv, "probe.layers=[1]", "--max-steps", 2, "--resume")
    assert train(*argv, "probe.layers=[1]", "probe.store=layer1.zarr", "--max-steps", 2, "--resume") == 0
    assert open_store(log / "layer1.zarr")["train_step"].values.tolist() == [1, 2]
    assert train(*argv, "probe.layers=[0]", "probe.every=2", "--max-steps", 4, "--resume") == 0
    assert open_store(log / "probes.zarr")["train_step"].values.tolist() == [0, 1, 2, 4]
    # a --resume from step 0 (a run stopped before its first checkpoint) replaces that run's probes, whatever
    # settings they had (they were refused as a store of other settings)
    import shutil

    for folder in log.glob("checkpoint_model_*"):
        shutil.rmtree(folder)
    assert train(*argv, "probe.layers=[1]", "--max-steps", 1, "--resume") == 0
    ds = open_store(log / "probes.zarr")
    assert ds["train_step"].values.tolist() == [0, 1] and ds["layer"].values.tolist() == [1]


def test_clear_errors_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: score_distillation\ndenoise_steps: [1000]\n")
    with pytest.raises(TrainingError, match="denoise_steps"):
        train("--config", bad, "--logdir", tmp_path / "x")
    with pytest.raises(TrainingError, match=r"generator_ckpt 'missing/ode_init.pt' does not exist \(a relative path: "
                                            r"read from the current folder, "):
        train("--config", "configs/tiny_dmd.yaml", "--logdir", tmp_path / "x", "--set", "generator_ckpt=missing/ode_init.pt")
    with pytest.raises(TrainingError, match=r"total_batch_size 3 does not divide into batch_size 2 x 1 rank"):
        train("--config", "configs/tiny_dmd.yaml", "--logdir", tmp_path / "x", "--set", "total_batch_size=3",
              "batch_size=2")
    with pytest.raises(TrainingError, match="wan_models/Wan2.1-T2V-1.3B"):  # the shipped config, no model folders
        train("--config", "configs/self_forcing_dmd.yaml", "--logdir", tmp_path / "x", "--set",
              f"generator_ckpt={bad}", f"data_path={bad}")
    with pytest.raises(TrainingError, match="probe layers"):
        train("--config", "configs/tiny_ode.yaml", "--logdir", tmp_path / "y", "--set", f"data_path={bad}",
              "probe.every=1", "probe.prompts=[x]", "probe.layers=[6]")
    with pytest.raises(TrainingError, match="probe.heads is empty: give the heads to capture, or null for all"):
        train("--config", "configs/tiny_ode.yaml", "--logdir", tmp_path / "y", "--set", f"data_path={bad}",
              "probe.every=1", "probe.prompts=[x]", "probe.heads=[]")
    with pytest.raises(TrainingError, match=r"--resume '.*nope' does not exist: give a checkpoint folder"):
        train("--config", "configs/tiny_teacher.yaml", "--logdir", tmp_path / "x", "--resume", tmp_path / "nope")
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # (no lock files of the refused runs either)
    logdir = tmp_path / "rolled"  # a resume from an earlier checkpoint would write over the later ones
    for step in (2, 4, 6):
        (logdir / f"checkpoint_model_{step:06d}").mkdir(parents=True)
        for name in ("model.pt", "training_state.pt"):
            (logdir / f"checkpoint_model_{step:06d}" / name).write_bytes(b"")
    with pytest.raises(TrainingError, match=r"holds later checkpoints \(checkpoint_model_000004, "
                                            r"checkpoint_model_000006\) that this run would write over"):
        train("--config", "configs/tiny_teacher.yaml", "--logdir", logdir, "--resume",
              logdir / "checkpoint_model_000002" / "model.pt")


def test_help_teaches():
    from training.commands import EPILOG, HELP, register

    parser = argparse.ArgumentParser(prog="workbench")
    register(parser.add_subparsers(dest="command"))
    text = parser.format_help()
    assert "train" in text and "Self-Forcing" in HELP
    assert "--make-ode-pairs" in EPILOG and "torchrun" in EPILOG and "--resume" in EPILOG


def test_benchmark_script_runs(tmp_path):
    """bench/bench_train.py --tiny: the GPU benchmark's code path (random models, FSDP, forced exit steps,
    self-check) on tiny models on the CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "bench/bench_train.py", "--tiny", "--exits", "3", "0"], cwd=root,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "self-check: OK" in done.stdout and "| 3 |" in done.stdout and "| 0 |" in done.stdout


def test_an_interrupt_before_the_first_step_claims_no_files(tmp_path, capsys, monkeypatch):
    """Ctrl-C before any step finished: a clean stop that says nothing was saved and names no losses file or
    checkpoint folder, since none exists; the exit status is 130 (a stopped run is not a finished one, so a
    script's `train && evaluate` does not go on)."""
    from training.trainer import Trainer

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "iteration", interrupted)
    log = tmp_path / "dmd"
    assert train("--config", "configs/tiny_dmd.yaml", "--logdir", log, "--max-steps", 2, "--set",
                 f"generator_ckpt={EMBEDDED_DIR / 'checkpoints' / 'ode_init.pt'}", "device=cpu") == 130
    out, err = capsys.readouterr()
    assert "stopped by Ctrl-C at step 0; the same command with --resume goes on from step 0 (no checkpoint yet)" in err
    assert "interrupted at step 0; no finished step to save" in out and "saving a checkpoint" not in out
    assert "step 0: no step finished in this run" in out and "no losses written; no checkpoint saved" in out
    assert not list(log.glob("checkpoint_model_*")) and "checkpoint_model_000000" not in out


@pytest.mark.parametrize("save_at_end", [True, False])
def test_sigterm_stops_after_the_step_and_saves(tmp_path, capsys, monkeypatch, save_at_end):
    """SIGTERM (kill, timeout, SLURM, Kubernetes) is a Ctrl-C: the step under way finishes, a checkpoint is saved,
    the exit status is 143 (128 + 15); it killed the run at once, every step since the last checkpoint lost. Also
    with train(save_at_end=False), as the zoo driver trains in pieces (its interrupt saved nothing)."""
    import functools
    import os
    import signal

    from training.trainer import Trainer

    monkeypatch.setattr(Trainer, "train", functools.partialmethod(Trainer.train, save_at_end=save_at_end))
    step = Trainer.iteration

    def term_in_step_1(self):
        if self.step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self)

    monkeypatch.setattr(Trainer, "iteration", term_in_step_1)
    log = tmp_path / "dmd"
    assert train("--config", "configs/tiny_dmd.yaml", "--logdir", log, "--max-steps", 3, "--no-progress", "--set",
                 f"generator_ckpt={EMBEDDED_DIR / 'checkpoints' / 'ode_init.pt'}", "device=cpu", "log_iters=10") == 143
    out, err = capsys.readouterr()
    assert "SIGTERM: stopping after this step and saving a checkpoint" in out
    assert "stopped by SIGTERM at step 1; the same command with --resume" in err
    assert (log / "checkpoint_model_000001" / "model.pt").is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGINT) is \
        signal.default_int_handler  # (given back)


def test_a_run_stopped_before_its_first_checkpoint_goes_on_with_resume(tmp_path, capsys, monkeypatch):
    """A run killed before its first checkpoint left losses.csv (and probes) but nothing to resume: a new run was
    refused (the files of an earlier run) and so was --resume (no checkpoint). --resume now starts from step 0,
    replacing those files; a config other than that run's is refused, as on any resume."""
    import csv

    from training.trainer import Trainer
    from workbench.store import open_store

    step = Trainer.iteration

    def killed_in_step_2(self):
        if self.step == 1:
            raise KeyboardInterrupt  # (a second Ctrl-C in a step: nothing saved, as after a kill)
        return step(self)

    log = tmp_path / "dmd"
    argv = ["--config", "configs/tiny_dmd.yaml", "--logdir", log, "--max-steps", 2, "--no-progress", "--set",
            f"generator_ckpt={EMBEDDED_DIR / 'checkpoints' / 'ode_init.pt'}", "device=cpu", "log_iters=10",
            "probe.every=1"]
    monkeypatch.setattr(Trainer, "iteration", killed_in_step_2)
    assert train(*argv) == 130
    assert (log / "losses.csv").is_file() and not list(log.glob("checkpoint_model_*"))
    monkeypatch.setattr(Trainer, "iteration", step)
    with pytest.raises(TrainingError, match="losses.csv exists from an earlier run; use --resume"):
        train(*argv)
    with pytest.raises(TrainingError, match=r"holds a run of another config that stopped before its first checkpoint "
                                            r"\(lr: 0.0001 there, 0.001 now\); drop those overrides"):
        train(*argv, "lr=1e-3", "--resume")  # (it spoke of a checkpoint, which there is not)
    capsys.readouterr()
    assert train(*argv, "--resume") == 0
    out = capsys.readouterr().out
    assert "holds no complete checkpoint (the run there stopped before its first one): starting from step 0, " \
           "replacing its losses and probes" in out
    with open(log / "losses.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2]
    assert list(open_store(log / "probes.zarr").train_step.values) == [0, 1, 2]
    assert (log / "checkpoint_model_000002" / "model.pt").is_file()


def test_one_training_run_per_logdir_and_a_killed_writes_part_goes_at_once(tmp_path, capsys, monkeypatch):
    """A second `train` on a logdir another process trains into is refused at once, naming the holder; the run
    that holds the lock removes what a killed write left there, however recent (no other writer can be there),
    and a live process's temporary file stays."""
    import subprocess
    import sys

    from models.files import temporary_path
    from training.trainer import Trainer
    from workbench.store import StoreLock

    log = tmp_path / "dmd"
    ck = log / "checkpoint_model_000015"
    ck.mkdir(parents=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    killed = ck / f".model.pt.{gone.pid}-0123abcd.tmp.pt"  # a moment ago, by a process now gone
    killed.write_bytes(b"part of a checkpoint")
    alive = temporary_path(ck / "training_state.pt")  # this (live) process's name
    alive.write_bytes(b"being written")
    argv = ("--config", "configs/tiny_dmd.yaml", "--logdir", log, "--max-steps", 0, "--set",
            f"generator_ckpt={EMBEDDED_DIR / 'checkpoints' / 'ode_init.pt'}", "device=cpu")
    with StoreLock(log, what="a training log folder", option="--logdir"):
        with pytest.raises(TrainingError, match="is being written by this process itself .* choose another --logdir") \
                as refused:
            train(*argv)
    assert refused.value.exit_status == 75  # (the CLI's exit status: try again later, not bad input's 2)
    assert killed.exists()  # (nothing done by the refused run)
    monkeypatch.setattr(Trainer, "train", lambda self: None)
    assert train(*argv) == 0
    assert f"removed {killed}" in capsys.readouterr().out
    assert not killed.exists() and alive.exists()


def test_set_repeated_keeps_every_override():
    """`--set A=1 --set B=2` kept only B (argparse's store), silently: a prompt file given first was not found."""
    import argparse

    from training.commands import register

    parser = argparse.ArgumentParser(prog="workbench")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--config", "c.yaml", "--logdir", "x", "--set", "lr=1e-5", "--set", "a.b=2",
                              "c=3"])
    assert args.set == ["lr=1e-5", "a.b=2", "c=3"]


@pytest.mark.parametrize("own_group", [False, True])
def test_torchrun_two_cpu_processes_train_and_end_their_group(tmp_path, own_group):
    """`python -m torch.distributed.run --nproc_per_node=2 -m workbench.cli train` (gloo, the tiny teacher, 2 steps):
    one global batch over both ranks, rank 0 alone prints and writes the losses and the checkpoint, and each rank
    ends the process group itself before its interpreter's teardown (where NCCL warns and a rank may abort); a
    group the script made before calling the CLI stays the script's."""
    from training.logger import read_losses
    from two_ranks import report, torchrun

    script = tmp_path / "run.py"  # the CLI with a line saying whether the group is still there at its end
    script.write_text("import os, sys, torch.distributed as dist\nfrom workbench.cli import main\n"
                      + ("dist.init_process_group('gloo')\n" if own_group else "")
                      + "status = main(sys.argv[1:])\n"  # (one write: the two ranks' lines never interleave)
                      "os.write(2, f'group left: {dist.is_initialized()}\\n'.encode())\nsys.exit(status)\n")
    r = torchrun([script, "train", "--no-progress", "--config", "configs/tiny_teacher.yaml", "--logdir", tmp_path / "t",
                  "--max-steps", "2", "--set", "device=cpu"], fresh=[tmp_path / "t"])
    assert r.returncode == 0, report(r)
    assert "global batch 4 = 2 rank(s)" in r.stdout and r.stdout.count("step 2: generator_loss") == 1, r.stdout
    assert [row["step"] for row in read_losses(tmp_path / "t")] == [1, 2]
    assert (tmp_path / "t" / "checkpoint_model_000002" / "model.pt").is_file()
    assert r.stderr.count(f"group left: {own_group}") == 2, r.stderr[-3000:]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_stopped_ode_pairs_close_their_progress_bar(tmp_path, monkeypatch, stop):
    """build_ode_pairs stopped midway (Ctrl-C; a notebook's stop button) or failing closes its progress bar (an open
    one is drawn again under every later output of the session) and writes no data set."""
    from tqdm import tqdm

    import training.rollout
    from training.config import load_config
    from training.ode_pairs import build_ode_pairs

    def stopped(*args, on_forward, **kw):
        on_forward()
        raise stop("stopped")

    monkeypatch.setattr(training.rollout, "make_ode_pairs", stopped)
    cfg = load_config("configs/tiny_ode.yaml", overrides=[f"data_path={tmp_path / 'pairs.pt'}", *FAST_ODE])
    before = set(tqdm._instances)
    with pytest.raises(stop) as caught:  # (kept, with its frames, as Jupyter keeps the last one)
        build_ode_pairs(cfg, log=lambda *a: None, progress=True)
    assert set(tqdm._instances) == before, caught
    assert not (tmp_path / "pairs.pt").exists()


def test_training_reads_its_prompts_from_the_prompt_cache(tmp_path, monkeypatch):
    """`train` shares the commands' prompt cache (models/wan/text_encoder.py `prompt_cache_dir`): a second run whose
    prompts the first encoded loads no text encoder (umT5-XXL's 11 GB and transformers' import at every start) and
    trains bitwise as the first did; WORKBENCH_PROMPT_CACHE=0 loads it again."""
    from models.wan.text_encoder import TextEncoder
    from training.logger import read_losses

    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))  # (empty: not the session's)
    loads = []
    real = TextEncoder._load_now
    monkeypatch.setattr(TextEncoder, "_load_now", lambda self: (loads.append(self), real(self))[1])
    argv = ["--config", "configs/tiny_teacher.yaml", "--max-steps", 1, "--set", "device=cpu"]

    def run(name):
        assert train(*argv, "--logdir", tmp_path / name) == 0
        return [{k: v for k, v in row.items() if k != "seconds"} for row in read_losses(tmp_path / name)]

    first = run("a")
    assert len(loads) == 1 and any((tmp_path / "cache" / "prompts").rglob("*"))
    assert run("b") == first and len(loads) == 1
    monkeypatch.setenv("WORKBENCH_PROMPT_CACHE", "0")
    assert run("c") == first and len(loads) == 2
