"""Training checkpoints: `save` and `resume` (`Checkpoints`, a part of training/trainer.py's `Trainer`) and
`latest_checkpoint` (what `--resume latest` continues from).

`logdir/checkpoint_model_{step:06d}/model.pt` in the researchers' format (`generator`, `critic`,
`generator_ema` once step > ema_start_step; keys `model.`-prefixed) and `training_state.pt` beside it (step,
seed, optimiser states, the config, and `start_weights`: the file the run started from and its sha256) for
`--resume`. A resumed run continues exactly as the uninterrupted one. Both files are written atomically, model.pt
last: a folder with both is complete; a save that fails midway (a full disk) removes the folder it made. The step's
row of losses.csv is written before its checkpoint (training/trainer.py), so a resume from it keeps the row.

A resume reads the generator's weights from the checkpoint; of `generator_ckpt` it needs only the sha256 (the probe
store's labels hash it), so `resumed_start_weights` lets it go on from the recorded one once the file is gone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from models.files import atomic_torch_save
from training import distributed as fsdp
from training.config import recorded
from training.ema import EMA
from training.errors import TrainingError


class Checkpoints:
    """The checkpoint methods of `Trainer` (training/trainer.py)."""

    def save(self) -> Path:
        """logdir/checkpoint_model_{step:06d}/{training_state.pt, model.pt}; every rank must call it."""
        from models.wan.checkpoint import save_self_forcing

        folder = self.logdir / f"checkpoint_model_{self.step:06d}"
        for model in (self.generator, self.critic):
            fsdp.reshard(model)
        models = {"generator": fsdp.full_state_dict(self.generator)}
        if self.critic is not None:
            models["critic"] = fsdp.full_state_dict(self.critic)
        if self.ema is not None and self.cfg.ema_start_step < self.step:
            models["generator_ema"] = self.ema.full_state_dict()
        state = {"step": self.step, "seed": self.seed, "world": self.d.world,
                 "generator_optimizer": fsdp.optimizer_state(self.gen_params, self.gen_opt)}
        if self.critic is not None:
            state["critic_optimizer"] = fsdp.optimizer_state(self.critic_params, self.critic_opt)
        if self.start_weights is not None:  # (a resume without generator_ckpt's file reads its sha256 here)
            state["start_weights"] = dict(self.start_weights)
        if self.d.main:
            state["config_yaml"] = OmegaConf.to_yaml(recorded(self.cfg))
            new = not folder.exists()
            try:
                atomic_torch_save(state, folder / "training_state.pt")
                save_self_forcing(folder / "model.pt", **models)  # last: a folder with model.pt is complete
            except BaseException:  # (a full disk, Ctrl-C: no half checkpoint left holding the space asked for)
                if new:
                    import shutil

                    shutil.rmtree(folder, ignore_errors=True)
                raise
            self.log(f"saved {folder / 'model.pt'}")
        self.d.barrier()
        self.last_saved = self.step
        return folder

    def resume(self, path) -> int:
        """Load a checkpoint folder written by `save` (weights, optimiser states, step, seed)."""
        from models.wan.checkpoint import load_tensors, strip_prefixes

        folder = Path(path)
        if not folder.exists():
            raise TrainingError(f"--resume {str(path)!r} does not exist: give a checkpoint folder (LOGDIR/"
                                "checkpoint_model_NNNNNN) or latest (the newest in --logdir)")
        folder = checkpoint_folder(folder)
        model_pt, state_pt = folder / "model.pt", folder / "training_state.pt"
        if not model_pt.is_file() or not state_pt.is_file():
            raise TrainingError(f"{str(folder)!r} is not a complete checkpoint (model.pt and training_state.pt)")
        for pt in (model_pt, state_pt):
            check_checksums(pt)
        blob = load_tensors(model_pt, verify=False)  # (its checksums: just read)
        try:
            state = torch.load(state_pt, map_location="cpu", weights_only=True)
        except Exception as e:  # (a truncated or corrupt file)
            raise TrainingError(f"cannot read {state_pt} ({type(e).__name__}: {str(e).splitlines()[0]}): a truncated "
                                f"or corrupt checkpoint; {CORRUPT_ADVICE}") from None
        check_resumed_config(self.cfg, state.get("config_yaml"), folder)
        check_resumed_betas(state, self.gen_opt, self.critic_opt if self.critic is not None else None, folder)
        fsdp.load_full(self.generator, strip_prefixes(blob["generator"]))
        fsdp.load_optimizer_state(self.gen_params, self.gen_opt, state["generator_optimizer"])
        if self.critic is not None:
            if "critic" not in blob:
                raise TrainingError(f"{model_pt} has no critic; it is not a score-distillation checkpoint")
            fsdp.load_full(self.critic, strip_prefixes(blob["critic"]))
            fsdp.load_optimizer_state(self.critic_params, self.critic_opt, state["critic_optimizer"])
        self.step, self.seed = int(state["step"]), int(state["seed"])
        self.last_saved = self.step
        # the run's start weights as its start recorded them (checkpoints before the record: this resume's hash)
        recorded, now = state.get("start_weights"), self.start_weights
        if recorded and now and recorded.get("sha256") != now.get("sha256") and self.d.main:
            self.log(f"note: generator_ckpt {now.get('file')} is not the file this run started from (sha256 "
                     f"{str(now.get('sha256'))[:12]}, the run's start {str(recorded.get('sha256'))[:12]}); the "
                     "generator's weights come from the checkpoint, so training goes on as it would have")
        self.start_weights = recorded or now
        if "generator_ema" in blob:
            self.ema = EMA(self.gen_params, self.cfg.ema_weight)
            self.ema.load_full(strip_prefixes(blob["generator_ema"]))
        # else: an EMA due at this step is made from these weights by train(), as the uninterrupted run did
        if self.d.main:
            self.log(f"resumed from {folder} at step {self.step}")
        return self.step


# (an earlier checkpoint resumed in the logdir would write over the later ones: check_no_later_checkpoints)
CORRUPT_ADVICE = ("move that checkpoint folder out of the logdir (--resume latest then takes the one before it), or "
                  "continue an earlier one in a new --logdir")


def check_checksums(path) -> None:
    """The checkpoint's bytes against the CRC-32s torch.save wrote (models/files.py `verify_checksums`, read every
    time: a resume is where a bad disk would show), before a run resumes from it."""
    from models.errors import CheckpointError
    from models.files import verify_checksums

    try:
        verify_checksums(path, memo_dir=None)
    except CheckpointError as err:
        raise TrainingError(f"{err}; {CORRUPT_ADVICE}") from None


def latest_checkpoint(logdir) -> Path | None:
    """The newest complete checkpoint folder in a logdir."""
    complete = complete_checkpoints(logdir)
    return complete[-1] if complete else None


def resumed_start_weights(cfg, logdir, resume) -> dict | None:
    """On a resume (`resume`: a checkpoint folder or file, or "latest") whose `generator_ckpt` file is gone (moved,
    deleted, another machine): the start weights its checkpoint recorded ({"file", "sha256"}), so that the resume
    needs only the checkpoint. None where the file is there (hashed as at the start) or for a start from step 0
    (`check_files` then refuses the missing file); a checkpoint saved before the record is refused, naming it."""
    ckpt = cfg.generator_ckpt
    if resume is None or not ckpt or Path(ckpt).is_file():
        return None
    folder = latest_checkpoint(logdir) if resume == "latest" else Path(resume)
    if folder is None or not folder.exists():  # (a restart from step 0, or a --resume check_files' error precedes)
        return None
    folder = checkpoint_folder(folder)
    state_pt = folder / "training_state.pt"
    if not state_pt.is_file():  # (not a complete checkpoint: check_files names the missing file, as before)
        return None
    try:  # (mmap: the optimiser states are not read)
        state = torch.load(state_pt, map_location="cpu", weights_only=True, mmap=True)
        start = state.get("start_weights")
    except Exception:  # (truncated or corrupt: Trainer.resume names it once the file is back)
        start = None
    if not (isinstance(start, dict) and isinstance(start.get("sha256"), str)):
        raise TrainingError(f"generator_ckpt {ckpt!r} does not exist, and --resume {str(folder)!r} records no "
                            "sha256 of the run's start weights (saved before checkpoints recorded it, or unreadable), "
                            "which the probe store's labels hash: put the file the run started from back at that "
                            "path for this resume (the checkpoints it saves record it)")
    return start


def checkpoint_folder(path) -> Path:
    """The checkpoint folder a --resume path names: the folder, or the one a file of it (model.pt) is in."""
    path = Path(path)
    return path.parent if path.is_file() or path.suffix == ".pt" else path


def complete_checkpoints(logdir) -> list[Path]:
    """The complete checkpoint folders of a logdir (model.pt and training_state.pt), oldest first."""
    folders = sorted(Path(logdir).glob("checkpoint_model_*"))
    return [f for f in folders if (f / "model.pt").is_file() and (f / "training_state.pt").is_file()]


def check_no_later_checkpoints(logdir, resume) -> None:
    """A resume from an earlier checkpoint of a logdir that holds later ones would write over them (in place: an
    `extract` reading one would mix files) and append its probes under train steps the store holds: refused,
    naming them. (A checkpoint folder's step is in its name, checkpoint_model_NNNNNN.)"""
    folder = checkpoint_folder(resume)
    try:
        step = int(folder.name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return  # (not a folder `save` named: nothing to compare)
    later = [f.name for f in complete_checkpoints(logdir) if int(f.name.rsplit("_", 1)[1]) > step]
    if later:
        raise TrainingError(f"--resume {str(resume)!r}: {logdir} holds later checkpoints ({', '.join(later[:3])}"
                            f"{' ...' if len(later) > 3 else ''}) that this run would write over, with their losses "
                            "and probes; resume the latest (--resume latest), or continue this one in a new --logdir")


# what a resumed run may set otherwise than the run it continues: how long and how it logs, where it runs
# and what it probes (probes change nothing the steps compute; the probe store refuses settings that change its
# layout, naming them)
CHANGEABLE_ON_RESUME = ("max_steps", "log_iters", "loggers", "device", "gradient_checkpointing", "data_on_device",
                        "wandb_host", "wandb_key", "wandb_entity", "wandb_project", "probe")


def check_resumed_betas(state: dict, gen_opt, critic_opt, folder) -> None:
    """A checkpoint's AdamW betas are what this run's optimisers are made with (the same config gives the same
    betas, except where the rule changed: the GAN discriminator's runs (0.9, beta2_critic) through a warm-up since
    2026-12-05, as the researchers' trainer); a resume would otherwise put the old ones back silently."""
    for name, opt in (("generator", gen_opt), ("critic", critic_opt)):
        saved = (state.get(f"{name}_optimizer") or {}).get("param_groups") or []
        if opt is None or not saved:
            continue
        then = [tuple(g.get("betas", ())) for g in saved]
        now = [tuple(g["betas"]) for g in opt.param_groups]
        if then != now:
            raise TrainingError(f"--resume: {folder}'s {name} optimiser ran AdamW betas {then[0]}, this run's are "
                                f"{now[0]} (a GAN discriminator's betas with a warm-up follow the researchers' trainer "
                                "since 2026-12-05: (0.9, beta2_critic)); its moments were made under the old ones, so "
                                "it does not resume: start a new --logdir (--set generator_ckpt=...model.pt starts "
                                "from its generator's weights; the critic starts anew)")


def check_same_run(cfg, logdir, resume) -> None:
    """A resume from another logdir's checkpoint continues that run here (the checkpoint's config is this run's:
    `check_resumed_config`): a logdir holding a run of other settings (its config.yaml, written at its start) would
    get the checkpoint's steps appended to its own losses and probes (two runs in one file): refused, naming the
    settings."""
    folder = checkpoint_folder(Path(resume).resolve())  # (through a link: the logdir it is in)
    mine = Path(logdir) / "config.yaml"
    if folder.parent == Path(logdir).resolve() or not mine.is_file():
        return
    try:
        changed = config_changes(cfg, mine.read_text())
    except Exception as err:  # (not YAML, or not a config)
        raise TrainingError(f"--resume {str(resume)!r}: {mine} cannot be read as a config ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); {logdir} may hold another run: "
                            "use a new --logdir") from None
    if changed:
        shown = "; ".join(f"{k}: {then!r} here, {now!r} in the resumed run" for k, then, now in changed[:4])
        more = " ..." if len(changed) > 4 else ""
        raise TrainingError(f"--resume {str(resume)!r}: {logdir} holds another run ({shown}{more}); its losses "
                            "and probes would take that run's steps: continue it in its own logdir "
                            f"({folder.parent}) or a new --logdir")


def unread_keys(cfg) -> set[str]:
    """Keys the run's trainer does not read, so a checkpoint's value may differ: `lr_critic` without a critic (ODE
    and diffusion training) or under a GAN's own `critic_lr` (checkpoints before lr_critic defaulted to lr hold the
    old 4e-7 there)."""
    if cfg.trainer in ("ode", "diffusion") or (cfg.trainer == "gan" and cfg.get("critic_lr") is not None):
        return {"lr_critic"}
    return set()


def changeable(cfg) -> list[str]:
    """The keys a resume may change (CHANGEABLE_ON_RESUME), less gradient_checkpointing where the text keys/values'
    gradient follows it (the researchers' text_kv_gradient: models/common/kv_cache.py): there it changes the
    gradient, elsewhere only memory and time."""
    follows = cfg.get("text_kv_gradient") == "follows_checkpointing"
    return [k for k in CHANGEABLE_ON_RESUME if not (follows and k == "gradient_checkpointing")]


def config_changes(cfg, saved_yaml: str) -> list[tuple[str, object, object]]:
    """(key, saved value, this run's) for each setting that shapes the steps and differs: the keys a saved config
    lacks (added to the schema since) at their defaults, keys the trainer does not read and `changeable` ones left
    out."""
    from training.config import SelfForcingConfig, flat

    now = flat(OmegaConf.to_container(cfg, resolve=True))
    defaults = flat(OmegaConf.to_container(OmegaConf.structured(SelfForcingConfig), resolve=True))
    then = defaults | flat(OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=True))
    free, unread = set(changeable(cfg)), unread_keys(cfg)
    return [(k, then.get(k), now.get(k)) for k in sorted(now.keys() | then.keys())
            if now.get(k) != then.get(k) and k.split(".")[0] not in free and k not in unread]


def check_resumed_config(cfg, saved_yaml: str | None, folder, *, started: bool = False) -> None:
    """A resumed run continues the checkpoint's run: its optimiser state holds the learning rates, its state the
    seed, and every other setting shapes what the steps compute. A config that differs from the checkpoint's
    (--set lr=..., seed=...) is refused, naming each key with both values, unless the key only says how long or
    how the run goes on (CHANGEABLE_ON_RESUME). `started`: `saved_yaml` is the config.yaml of a logdir whose run
    stopped before its first checkpoint (a restart from step 0 replaces its losses and probes)."""
    if not saved_yaml:  # (checkpoints written before the config was kept)
        return
    diffs = config_changes(cfg, saved_yaml)
    changed = [k for k, _, _ in diffs]
    then, now = {k: a for k, a, _ in diffs}, {k: b for k, _, b in diffs}
    if changed == ["lr_critic"] and then.get("lr_critic") == 4e-7 and now.get("lr_critic") == cfg.get("lr"):
        raise TrainingError(f"--resume continues the run of {folder}, whose critic trained at lr_critic 4e-07, the "
                            "default before 2026-12-05 for a config without lr_critic; such a config now trains the "
                            f"critic at lr ({cfg.get('lr')!r}), as the researchers' trainer does: give --set "
                            "lr_critic=4e-7 to go on as it ran, or start a new --logdir")
    if changed and started:
        shown = "; ".join(f"{k}: {then.get(k)!r} there, {now.get(k)!r} now" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise TrainingError(f"--resume: {folder} holds a run of another config that stopped before its first "
                            f"checkpoint ({shown}{more}); drop those overrides to start it again from step 0, or "
                            "use a new --logdir (or remove that run's losses.csv, probes and config.yaml)")
    if changed:
        shown = "; ".join(f"{k}: {then.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise TrainingError(f"--resume continues the run of {folder}, whose config differs from this one ({shown}"
                            f"{more}); a resumed run keeps the checkpoint's settings (its optimiser state holds the "
                            f"learning rates, its state the seed): drop those overrides, or start a new --logdir "
                            f"(--set generator_ckpt=...model.pt starts from its generator's weights; a critic starts "
                            f"anew). Only "
                            f"{', '.join(changeable(cfg))} may change"
                            + ("" if "gradient_checkpointing" in changeable(cfg) else " (gradient_checkpointing "
                               "too where text_kv_gradient is every_exit or first_forward)"))
