"""Train the embedded zoo on the miniature world, stage by stage, and write the files that data/embedded ships.

How it fits: every DiT of the zoo (models/wan/embedded.py `ZOO`) is trained by `workbench train` from a shipped
config (configs/zoo_*.yaml); this driver runs those configs in order in one process (on a GPU the CUDA start
and the model loads are paid once), points their paths at one work folder, keeps each stage inside a time
budget, and assembles the results in data/embedded's layout. docs/zoo.md describes the recipe and its results.

    python3 -m training.zoo --budget 480 --out $OUT        # every stage in one call (too short to train the
                                                           # DiTs well: docs/zoo.md plans three calls)
    python3 -m training.zoo --stages dmd,sid,check,ship     # later stages (they need the earlier ones' outputs)
    python3 -m training.zoo --short --device cpu --work /tmp/zoo   # every stage, shortened, on a CPU (the test)

Stages, in order; each is skipped when its output exists (so a second call continues a first one):
    vae        training/world_vae.py into WORK/vae/ (skipped with --vae FILE: that VAE instead)
    init       WORK/init/: a Wan folder with the seeded DiT init (models/wan/embedded.py), the umT5 encoder and
               tokenizer of data/embedded, and the VAE
    data       the world latent set of configs/zoo_teacher.yaml (training/world_data.py) in WORK/world_latents/
    teacher    configs/zoo_teacher.yaml -> WORK/teacher/: a Wan folder with the teacher's EMA weights, the text
               encoder and the VAE; the students' checkpoints go to WORK/teacher/checkpoints/ (data/embedded's
               layout)
    df         configs/zoo_df.yaml        -> checkpoints/diffusion_forcing.pt
    ode_pairs  configs/zoo_ode.yaml --make-ode-pairs -> WORK/ode_pairs.pt
    ode        configs/zoo_ode.yaml       -> checkpoints/ode_init.pt
    dmd        configs/zoo_dmd.yaml       -> checkpoints/self_forcing_dmd.pt
    sid        configs/zoo_sid.yaml       -> checkpoints/self_forcing_sid.pt
    gan        configs/zoo_gan.yaml       -> checkpoints/self_forcing_gan.pt: the researchers' GAN trainer, the
               generator from the ODE student, the discriminator the teacher with the classification branch, real
               videos = world latents (`data_path: world`; the data stage's file when its settings match).
               Only on request (not in `all`) and not shipped: the check stage scores it beside the others
    check      every trained model samples the prompt grid; a quick pixel tracker reads colour, shape and
               direction back (training/zoo_check.py `quick_track`), and the word check measures how much each
               prompt word steers its flow prediction (training/word_check.py) -> WORK/check.json
    ship       WORK/ship/data/embedded/: the zoo as data/embedded ships it (DiT weights in bf16)

Time budget (--budget SECONDS): each training stage gets a share of the time left (`WEIGHTS`); a stage whose
share runs out stops at the end of a chunk of steps and saves its checkpoint. The log gives, per stage, the
steps run, the seconds, and the first and last losses. --out DIR writes zoo_log.txt, zoo_report.json, and tar
files of at most 15 MiB each: zoo_state.tar.* (WORK/teacher with every student trained so far, the report,
and the trainer checkpoint of any stage cut short: what a later call on a fresh machine needs to resume) and,
after ship, zoo_embedded.tar.* (data/embedded/...: untar at the repository root to install the zoo).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from training.zoo_check import check_models
from training.zoo_ship import copy_text_and_vae, ship, write_tars

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("vae", "init", "data", "teacher", "df", "ode_pairs", "ode", "dmd", "sid", "gan", "check", "ship")
ON_REQUEST = ("gan",)  # stages that `--stages all` leaves out
CONFIGS = {"teacher": "configs/zoo_teacher.yaml", "df": "configs/zoo_df.yaml", "ode_pairs": "configs/zoo_ode.yaml",
           "ode": "configs/zoo_ode.yaml", "dmd": "configs/zoo_dmd.yaml", "sid": "configs/zoo_sid.yaml",
           "gan": "configs/zoo_gan.yaml"}
ZOO_OF_STAGE = {"df": "df", "ode": "ode", "dmd": "dmd", "sid": "sid"}  # stage -> models.wan.embedded.ZOO name
# shares of the time budget (data and ode_pairs are fixed work: their share is an estimate)
WEIGHTS = {"vae": 1.2, "data": 0.4, "teacher": 3.5, "df": 1.2, "ode_pairs": 0.8, "ode": 0.6, "dmd": 2.0, "sid": 1.2,
           "gan": 1.5, "check": 0.3}
SHORT = {  # --short: every stage in seconds on a CPU (6 latent frames, batches of 2, 3 steps)
    "*": ["image_or_video_shape=[1,6,16,12,16]", "num_training_frames=6", "batch_size=2", "total_batch_size=2",
          "log_iters=2", "max_steps=3", "mixed_precision=false"],
    "teacher": ["world.num_videos=4", "world.batch=2", "ema_start_step=1"],
    "df": ["world.num_videos=4", "world.batch=2", "ema_start_step=1"],
    "ode": ["ode_pairs.num_pairs=2", "ode_pairs.steps=4", "ode_pairs.keep=[0,1,2,3]", "ode_pairs.batch_size=2"],
    "dmd": ["dfake_gen_update_ratio=2", "ema_start_step=1"],
    "sid": ["dfake_gen_update_ratio=2", "ema_start_step=1"],
    "gan": ["dfake_gen_update_ratio=2", "ema_start_step=1", "discriminator_warmup_steps=1", "world.num_videos=4",
            "world.batch=2"],
}
SHORT_CHECK_FRAMES = 3  # --short: the check stage samples and word-checks one chunk of latent frames (half the time)


class Zoo:
    """One run of the driver: the work folder, the options, the clock and the report."""

    def __init__(self, work: Path, *, device: str, short: bool, budget: float | None, vae: Path | None,
                 source: Path, progress: bool, log=print, sets: list[str] | None = None, keep_going: bool = False,
                 more: list[str] | None = None, init_from: Path | None = None, teacher: Path | None = None,
                 text_len: int | None = None):
        from dataclasses import replace

        from models.wan.embedded import EMBEDDED_CONFIG

        self.work, self.device, self.short = Path(work), device, short
        # the DiT config every folder of this run is written with: the embedded one, with the text length (how many
        # text positions the umT5 context is padded to; the weights do not depend on it) of --text-len, else of
        # this work folder's init (a continued run keeps it), else 512
        made = self.work / "init" / "config.json"
        earlier = json.loads(made.read_text()).get("text_len") if made.is_file() else None
        if text_len is not None and earlier is not None and text_len != earlier:
            raise SystemExit(f"--text-len {text_len}: the work folder {self.work} was made with text_len {earlier}; "
                             "use that, or another --work")
        text_len = text_len or earlier or EMBEDDED_CONFIG.text_len
        self.model_config = replace(EMBEDDED_CONFIG, text_len=text_len)
        self.init_from = Path(init_from) if init_from is not None else None  # a Wan folder whose DiT starts the teacher
        self.given_teacher = Path(teacher) if teacher is not None else None  # a trained teacher folder, not trained here
        self.more = set(more or [])  # training stages to continue (from WORK/logs/STAGE) although their output exists
        self.keep_going = keep_going  # a failed stage is logged and recorded; the later stages still run
        self.given_vae = Path(vae) if vae is not None else None  # None: the vae stage trains one
        self.sets = list(sets or [])  # extra overrides: "key=value" for every config, "stage:key=value" for one
        self.source = Path(source)  # where the text encoder and tokenizer come from
        self.progress, self.log = progress, log
        self.start = time.perf_counter()
        self.deadline = None if budget is None else self.start + budget
        self.report: dict = {"device": device, "short": short, "budget_s": budget, "stages": {}}
        earlier = self.work / "zoo_report.json"
        if earlier.is_file():  # a continued run: the stages done before keep their records
            self.report["stages"] = json.loads(earlier.read_text()).get("stages", {})
        self.teacher_dir = self.work / "teacher"

    # --- bookkeeping ----------------------------------------------------------------------------------------

    def stage_deadline(self, stage: str, todo: list[str]) -> float | None:
        """This stage's share of the time left, by WEIGHTS over the stages still to run."""
        if self.deadline is None:
            return None
        left = self.deadline - time.perf_counter()
        total = sum(WEIGHTS.get(s, 0.0) for s in todo) or 1.0
        return time.perf_counter() + max(0.0, left) * WEIGHTS.get(stage, 0.0) / total

    def continued(self, stage: str, seconds: float, summary: dict) -> dict:
        """Totals over every call for a training stage that went on from earlier training: resumed from this work
        folder's checkpoint (`--continue`), or a teacher started from a shipped one (`--init-from`, whose steps
        restart at 0). `seconds_total`, `calls`, the loss the first call started from and, when shipped steps
        came before this folder's, `steps_total`; so the report and ZOO.md say how long the model trained in all."""
        if summary.get("resumed_from") is not None:
            before = self.report["stages"].get(stage, {})
            shipped_steps = before.get("steps_total", before.get("steps", 0)) - before.get("steps", 0)
        elif stage == "teacher" and self.given_teacher is None:  # (--teacher: copied as it is, nothing trained)
            before = self.report["stages"].get("init", {}).get("earlier", {})
            shipped_steps = before.get("steps_total", before.get("steps", 0))
        else:
            return {}
        if "seconds" not in before or "steps" not in summary:
            return {}
        losses = {k: {**v, "first": before[k]["first"]} for k, v in summary.items()
                  if k.endswith("_loss") and isinstance(v, dict) and isinstance(before.get(k), dict)}
        return {"seconds_total": round(before.get("seconds_total", before["seconds"]) + seconds, 1),
                "calls": before.get("calls", 1) + 1, **losses,
                **({"steps_total": shipped_steps + summary["steps"]} if shipped_steps else {})}

    def record(self, stage: str, **values) -> None:
        self.report["stages"][stage] = {**self.report["stages"].get(stage, {}), **values}
        self.report["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        from models.files import atomic_write

        atomic_write(self.work / "zoo_report.json",
                     lambda p: Path(p).write_text(json.dumps(self.report, indent=1, default=str) + "\n"))

    def overrides(self, stage: str) -> list[str]:
        """Where this work folder puts things, the device, and the --short settings."""
        w = self.work
        out = [f"model_root={w}", f"device={self.device}"]
        if stage in ("teacher", "df", "data", "gan"):
            out.append(f"world.cache_dir={w / 'world_latents'}")
        if stage in ("ode_pairs", "ode"):
            out.append(f"data_path={w / 'ode_pairs.pt'}")
        if stage in ("dmd", "sid", "gan"):
            out.append(f"generator_ckpt={self.checkpoint('ode')}")
        key = {"ode_pairs": "ode", "data": "teacher"}.get(stage, stage)
        if self.short:
            out += SHORT["*"] + SHORT.get(key, [])
        for item in self.sets:
            target, _, setting = item.partition(":") if ":" in item.split("=")[0] else ("", "", item)
            if not target or target in (key, stage):  # ode_pairs reads the ode config: both names select it
                out.append(setting)
        return out

    def config(self, stage: str):
        from training.checks import load_train_config

        return load_train_config(ROOT / CONFIGS["teacher" if stage == "data" else stage], self.overrides(stage))

    def checkpoint(self, zoo_stage: str) -> Path:
        from models.wan.embedded import ZOO

        entry = gan_model() if zoo_stage == "gan" else ZOO[ZOO_OF_STAGE[zoo_stage]]
        return entry.checkpoint_path(self.teacher_dir)

    def vae_file(self) -> Path:
        return self.given_vae or self.work / "vae" / "Wan2.1_VAE.pth"

    def done(self, stage: str) -> bool:
        if stage in self.more:
            return False
        w = self.work
        return {"vae": self.vae_file().is_file(),
                "init": (w / "init" / "config.json").is_file(),
                "data": self._data_done(),
                "teacher": (self.teacher_dir / "diffusion_pytorch_model.safetensors").is_file(),
                "ode_pairs": (w / "ode_pairs.pt").is_file(),
                "check": False, "ship": False}.get(stage) or ((stage in ZOO_OF_STAGE or stage == "gan")
                                                  and self.checkpoint(stage).is_file())

    def _data_done(self) -> bool:
        from training.world_data import world_dataset_path

        if not self.vae_file().is_file():
            return False
        cfg, _ = self.config("data")
        return world_dataset_path(self.vae_file(), cfg.world.num_videos, cfg.world.seed,
                                  cfg.image_or_video_shape[1], cfg.world.cache_dir).is_file()

    # --- the stages -----------------------------------------------------------------------------------------

    def run(self, stages: list[str]) -> dict:
        needs = {**NEEDS, "teacher": ()} if self.given_teacher is not None else NEEDS
        stages = with_prerequisites(stages, self.done, needs)
        own_start = any(item.split("=")[0] in ("generator_ckpt", "gan:generator_ckpt") for item in self.sets)
        if "gan" in stages and "ode" not in stages and not self.done("ode") and not own_start:
            raise SystemExit(f"--stages gan starts from the ODE student, and {self.checkpoint('ode')} is missing: add "
                             "the ode stage, copy a trained one there (data/embedded/checkpoints/ode_init.pt), or "
                             "--set gan:generator_ckpt=FILE")
        self.log(f"zoo: work folder {self.work}, device {self.device}, stages {', '.join(stages)}"
                 + (f", budget {self.report['budget_s']:.0f} s" if self.deadline else "") + (" (short)" if self.short else ""))
        for i, stage in enumerate(stages):
            if self.done(stage):
                self.log(f"[{stage}] already done in {self.work}; skipped")
                continue
            t0 = time.perf_counter()
            self.log(f"[{stage}] start at {t0 - self.start:.0f} s")
            deadline = self.stage_deadline(stage, stages[i:])
            try:
                summary = getattr(self, f"stage_{stage}")(deadline) or {}
            except Exception as exc:  # noqa: BLE001 - with keep_going, later independent stages still run
                if not self.keep_going:
                    raise
                import traceback

                self.log(f"[{stage}] FAILED after {time.perf_counter() - t0:.1f} s:\n" + traceback.format_exc())
                self.record(stage, failed=f"{type(exc).__name__}: {exc}")
                continue
            seconds = time.perf_counter() - t0
            self.record(stage, **{"seconds": round(seconds, 1), "device": self.device, **summary,
                                  **self.continued(stage, seconds, summary)})
            self.log(f"[{stage}] done in {seconds:.1f} s: " + json.dumps(summary, default=str)[:600])
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        self.log(f"zoo: finished in {time.perf_counter() - self.start:.0f} s")
        return self.report

    def stage_vae(self, deadline) -> dict:
        from training.world_vae import VAETrainConfig, train

        cfg = VAETrainConfig(steps=20000, batch=64, frames=9, crop=64, lr=4e-4, log_every=100, save_every=1000,
                             device=self.device)  # on a GPU: until the time share runs out
        if self.short:
            cfg = VAETrainConfig(steps=2, batch=2, frames=5, crop=32, eval_videos=1, eval_frames=5, log_every=1,
                                 device=self.device)
        metrics = train(cfg, self.work / "vae", log=self.log, deadline=deadline)
        return {k: metrics[k] for k in ("psnr_db", "psnr_db_worst", "train_seconds", "steps", "fit_psnr_db")}

    def stage_init(self, deadline) -> dict:
        """WORK/init: the seeded DiT init with the text encoder, tokenizer and VAE (a complete Wan folder)."""
        from models.wan.checkpoint import save_wan_folder
        from models.wan.embedded import EMBEDDED_VIDEO_SIZE, make_embedded_state_dict

        folder = self.work / "init"
        copy_text_and_vae(self.source, self.vae_file(), folder)
        text = {"text_len": self.model_config.text_len}
        if self.init_from is None:
            save_wan_folder(folder, self.model_config, make_embedded_state_dict(), video_size=EMBEDDED_VIDEO_SIZE)
            return {"folder": str(folder), **text}
        save_wan_folder(folder, self.model_config, zoo_dit(self.init_from), video_size=EMBEDDED_VIDEO_SIZE)
        return {"folder": str(folder), "from": str(self.init_from), "earlier": earlier_teacher(self.init_from), **text}

    def stage_data(self, deadline) -> dict:
        from training.world_data import make_world_dataset, world_dataset_path

        cfg, _ = self.config("data")
        w, frames = cfg.world, cfg.image_or_video_shape[1]
        path = world_dataset_path(self.vae_file(), w.num_videos, w.seed, frames, w.cache_dir)
        make_world_dataset(path, self.vae_file(), w.num_videos, w.seed, frames, device=self.device, batch=w.batch,
                           progress=self.progress, log=self.log)
        return {"file": str(path), "videos": w.num_videos, "latent_frames": frames}

    def stage_teacher(self, deadline) -> dict:
        from models.wan.checkpoint import read_self_forcing, save_wan_folder
        from models.wan.embedded import EMBEDDED_VIDEO_SIZE

        if self.given_teacher is not None:  # --teacher FOLDER: that teacher, as it is
            copy_text_and_vae(self.source, self.vae_file(), self.teacher_dir)
            save_wan_folder(self.teacher_dir, self.model_config, zoo_dit(self.given_teacher),
                            video_size=EMBEDDED_VIDEO_SIZE)
            return {**earlier_teacher(self.given_teacher), "from": str(self.given_teacher)}
        summary, ckpt = self.train_config("teacher", deadline)
        blob = torch.load(ckpt, map_location="cpu", weights_only=True)
        key = "generator_ema" if "generator_ema" in blob else "generator"
        copy_text_and_vae(self.source, self.vae_file(), self.teacher_dir)
        save_wan_folder(self.teacher_dir, self.model_config, read_self_forcing(ckpt, key),
                        video_size=EMBEDDED_VIDEO_SIZE)
        return {**summary, "weights": key}

    def stage_df(self, deadline) -> dict:
        return self.train_and_publish("df", deadline)

    def stage_ode_pairs(self, deadline) -> dict:
        from training.ode_pairs import build_ode_pairs

        cfg, _ = self.config("ode_pairs")
        build_ode_pairs(cfg, log=self.log, progress=self.progress)
        op = cfg.ode_pairs
        return {"pairs": op.num_pairs, "steps": op.steps, "guidance_scale": op.guidance_scale}

    def stage_ode(self, deadline) -> dict:
        return self.train_and_publish("ode", deadline)

    def stage_dmd(self, deadline) -> dict:
        return self.train_and_publish("dmd", deadline)

    def stage_sid(self, deadline) -> dict:
        return self.train_and_publish("sid", deadline)

    def stage_gan(self, deadline) -> dict:
        return self.train_and_publish("gan", deadline)

    def stage_check(self, deadline) -> dict:
        cfg, _ = self.config("teacher")
        frames = SHORT_CHECK_FRAMES if self.short else cfg.image_or_video_shape[1]
        result = check_models(self.teacher_dir, self.device, frames=frames, short=self.short,
                              log=self.log, shift=cfg.model_kwargs.timestep_shift, extra=(gan_model(),))
        from models.files import atomic_write

        atomic_write(self.work / "check.json", lambda p: Path(p).write_text(json.dumps(result, indent=1) + "\n"))
        return {name: {k: v for k, v in r.items() if k != "per_video"} for name, r in result.items()}

    def stage_ship(self, deadline) -> dict:
        out = ship(self.teacher_dir, self.work / "ship" / "data" / "embedded", self.report, CONFIGS)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        return {"folder": str(out), "bytes": size}

    # --- training through `workbench train`'s own code path --------------------------------------------------

    def train_and_publish(self, stage: str, deadline) -> dict:
        summary, ckpt = self.train_config(stage, deadline)
        target = self.checkpoint(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(ckpt, tmp)
        os.replace(tmp, target)
        return {**summary, "checkpoint": str(target)}

    def train_config(self, stage: str, deadline) -> tuple[dict, Path]:
        """`workbench train --config CONFIGS[stage] --logdir WORK/logs/stage` (resuming a checkpoint there), cut
        short when the deadline comes. Returns (summary, the final model.pt)."""
        from training.build import build_trainer, describe
        from training.checkpoints import latest_checkpoint

        cfg, sets_sid_alpha = self.config(stage)
        logdir = self.work / "logs" / stage
        resume = "latest" if latest_checkpoint(logdir) is not None else None
        self.log(f"[{stage}] workbench train --config {CONFIGS[stage]} --logdir {logdir} --set "
                 + " ".join(self.overrides(stage)))
        trainer = build_trainer(cfg, logdir, sets_sid_alpha=sets_sid_alpha, resume=resume, log=self.log,
                                progress=self.progress)
        self.log(f"[{stage}] {describe(trainer)}")
        end, first = int(cfg.max_steps), trainer.step
        chunk = max(1, min(100, end // 20))
        stopped_early = False
        while trainer.step < end:
            t0, s0 = time.perf_counter(), trainer.step
            trainer.train(max_steps=min(end, s0 + chunk), save_at_end=False)
            if trainer.interrupted:  # Ctrl-C or SIGTERM stopped the trainer after a step (saved): stop the driver
                trainer.close()
                if trainer.stop_signal == signal.SIGTERM:
                    sys.exit(128 + signal.SIGTERM)  # (as the driver's own SIGTERM handler exits)
                raise KeyboardInterrupt
            per_step = (time.perf_counter() - t0) / max(1, trainer.step - s0)
            if deadline is not None and trainer.step < end and time.perf_counter() + per_step * chunk > deadline:
                stopped_early = True
                self.log(f"[{stage}] time budget reached at step {trainer.step} of {end} ({per_step:.3f} s/step)")
                break
        if trainer.last_saved != trainer.step:
            trainer.save()
        trainer.close()
        history = trainer.history
        summary = {"steps": trainer.step, "max_steps": end, "stopped_early": stopped_early,
                   "resumed_from": first if first else None, **loss_summary(history)}
        folder = latest_checkpoint(logdir)
        del trainer
        return summary, folder / "model.pt"


def gan_model():
    """The GAN student as a zoo entry (models/wan/embedded.py `ZooModel`), for the check stage; not in `ZOO`, as
    data/embedded does not ship it."""
    from models.wan.embedded import ZooModel

    return ZooModel("gan", "causal student trained by the GAN trainer from the ODE student (EMA), 4 warped steps",
                    "checkpoints/self_forcing_gan.pt", True, "causal_few_step")


def zoo_dit(folder: Path) -> dict:
    """The DiT weights of the Wan folder `folder` in float32, after checking it has the zoo's shape (any text_len:
    the weights do not depend on it)."""
    from dataclasses import replace

    from models.wan.checkpoint import read_wan_folder
    from models.wan.embedded import EMBEDDED_CONFIG

    config, state = read_wan_folder(folder)
    if replace(config, text_len=EMBEDDED_CONFIG.text_len) != EMBEDDED_CONFIG:
        raise SystemExit(f"{folder}: its DiT config {config} is not the zoo's ({EMBEDDED_CONFIG})")
    return {k: v.float() for k, v in state.items()}


def earlier_teacher(folder: Path) -> dict:
    """How the teacher in the shipped zoo `folder` was trained (its checkpoints/zoo_report.json, written by
    `ship`): steps, seconds and calls, so that training it further reports the totals; {} when unknown."""
    report = Path(folder) / "checkpoints" / "zoo_report.json"
    if not report.is_file():
        return {}
    st = json.loads(report.read_text()).get("stages", {}).get("teacher", {})
    keep = ("steps", "steps_total", "seconds", "seconds_total", "calls", "device", "generator_loss")
    return {k: st[k] for k in keep if k in st}


# the cheap inputs a stage reads from this work folder (gan's trainer encodes its own world set when it is missing)
NEEDS = {"teacher": ("init", "data"), "df": ("data",)}


def with_prerequisites(stages: list[str], done, needs: dict = NEEDS) -> list[str]:
    """`stages` plus the inputs they read (`needs`) that are not done yet (e.g. `init` on a fresh machine that
    continues a teacher from a state tar), in STAGES order."""
    wanted = set(stages) | {need for s in stages for need in needs.get(s, ()) if not done(need)}
    return [s for s in STAGES if s in wanted]


def loss_summary(history: list[dict]) -> dict:
    """Mean of every *_loss over the first and the last tenth of the logged rows."""
    out = {}
    keys = sorted({k for row in history for k in row if k.endswith("_loss")})
    for k in keys:
        values = [row[k] for row in history if k in row]
        n = max(1, len(values) // 10)
        out[k] = {"first": round(float(np.mean(values[:n])), 5), "last": round(float(np.mean(values[-n:])), 5)}
    if history:
        out["s_per_step"] = round(float(np.median([row["seconds"] for row in history])), 4)
    return out


def main(argv=None) -> int:
    from workbench.help_text import HelpFormatter  # (--help fitted to the terminal)

    ap = argparse.ArgumentParser(prog="python3 -m training.zoo", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--stages", default="all",
                    help=f"comma-separated, or all ({', '.join(s for s in STAGES if s not in ON_REQUEST)}; "
                         f"on request: {', '.join(ON_REQUEST)})")
    ap.add_argument("--work", help="work folder (default: runs/zoo, or runs/zoo_short with --short)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--budget", type=float, help="seconds for all the stages asked for (default: no limit)")
    ap.add_argument("--short", action="store_true",
                    help="every stage shortened (6 frames, 3 steps; the check samples 3 frames): a CPU test")
    ap.add_argument("--vae", help="use this Wan2.1_VAE.pth instead of training one (the vae stage)")
    ap.add_argument("--init-from", metavar="FOLDER",
                    help="start the teacher from the DiT of this Wan folder (a shipped zoo: data/embedded) instead of "
                         "the seeded init, to train it further on a fresh machine (fresh optimiser; the report adds "
                         "the steps and seconds of its checkpoints/zoo_report.json)")
    ap.add_argument("--teacher", metavar="FOLDER",
                    help="use the teacher of this Wan folder (a shipped zoo: data/embedded) as it is: the teacher "
                         "stage copies it instead of training (for ODE pairs and students from a shipped teacher)")
    ap.add_argument("--source", default=str(ROOT / "data" / "embedded"),
                    help="the folder whose text encoder and tokenizer the zoo uses (default: data/embedded)")
    ap.add_argument("--text-len", type=int, metavar="N",
                    help="pad the umT5 context to N text positions instead of the embedded config's 512 (written "
                         "into every folder's config.json; a world prompt is 6 tokens)")
    ap.add_argument("--set", nargs="+", action="extend", default=[], metavar="[STAGE:]KEY=VALUE",
                    help="config overrides for every stage, or for one (teacher:max_steps=500)")
    ap.add_argument("--continue", dest="more", default="", metavar="STAGES",
                    help="comma-separated training stages (teacher, df, ode, dmd, sid) to train further from their "
                         "latest checkpoint in WORK/logs/STAGE although their output exists (raise max_steps with "
                         "--set STAGE:max_steps=N); their outputs are rewritten")
    ap.add_argument("--out", help="also write zoo_log.txt, zoo_report.json and the tar parts here")
    ap.add_argument("--keep-going", action="store_true",
                    help="a stage that fails is logged and the later stages still run (those that need its output "
                         "fail in turn); for unattended GPU runs")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    stages = ([s for s in STAGES if s not in ON_REQUEST] if args.stages == "all"
              else [s.strip() for s in args.stages.split(",") if s.strip()])
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; the stages are {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]
    targets = sorted({item.partition(":")[0] for item in args.set if ":" in item.split("=")[0]} - set(STAGES))
    if targets:
        ap.error(f"--set {targets[0]}:...: no stage {targets[0]!r}; the stages are {', '.join(STAGES)}")
    more = [s.strip() for s in args.more.split(",") if s.strip()]
    bad = [s for s in more if s not in ("teacher", "df", "ode", "dmd", "sid", "gan") or s not in stages]
    if bad:
        ap.error(f"--continue {','.join(bad)}: only training stages that --stages also runs (teacher, df, ode, dmd, "
                 f"sid, gan) can be continued")
    for flag, folder in (("--init-from", args.init_from), ("--teacher", args.teacher)):
        if folder is not None and not (Path(folder) / "diffusion_pytorch_model.safetensors").is_file():
            ap.error(f"{flag} {folder}: not a Wan folder (no diffusion_pytorch_model.safetensors in it)")
    if args.text_len is not None and not 8 <= args.text_len <= 512:
        ap.error(f"--text-len {args.text_len}: use 8 to 512 (a world prompt is 6 tokens with </s>)")
    if args.init_from and args.teacher:
        ap.error("--init-from trains the teacher further, --teacher uses one as it is: give one of them")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(args.work or ("runs/zoo_short" if args.short else "runs/zoo"))
    out = Path(args.out) if args.out else None
    lines: list[str] = []

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        lines.append(line)
        print(line, flush=True)

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 teacher sampling (ODE pairs) and checks: TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    zoo = Zoo(work, device=device, short=args.short, budget=args.budget, vae=args.vae,
              source=Path(args.source), progress=not args.no_progress, log=log, sets=args.set,
              keep_going=args.keep_going, more=more, init_from=args.init_from, teacher=args.teacher, text_len=args.text_len)
    work.mkdir(parents=True, exist_ok=True)
    # `timeout` and job schedulers stop with SIGTERM: exit through the finally below, so that the log, the report
    # and the tars of what is done still reach --out (checkpoints are written atomically, so none is half-written)
    # (what the finally below imports, imported first: a SIGTERM inside a stage's first import of yaml, say, would
    # leave that module half-initialised, and the finally's own import of it would fail instead of writing --out)
    import training.checkpoints  # noqa: F401

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        zoo.run(stages)
    finally:
        signal.signal(signal.SIGTERM, previous)  # (a caller in the same process gets its own handling back)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "zoo_log.txt").write_text("\n".join(lines) + "\n")
            if (work / "zoo_report.json").is_file():
                shutil.copyfile(work / "zoo_report.json", out / "zoo_report.json")
            write_tars(work, out, log=log)
            (out / "zoo_log.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
