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
    check      every trained model samples the prompt grid; a quick pixel tracker reads colour, shape and
               direction back (`quick_track`) -> WORK/check.json
    ship       WORK/ship/data/embedded/: the zoo as data/embedded ships it (DiT weights in bf16)

Time budget (--budget SECONDS): each training stage gets a share of the time left (`WEIGHTS`); a stage whose
share runs out stops at the end of a chunk of steps and saves its checkpoint. The log gives, per stage, the
steps run, the seconds, and the first and last losses. --out DIR writes zoo_log.txt, zoo_report.json, and tar
files of at most 15 MiB each: zoo_state.tar.* (WORK/teacher without the DMD/SiD checkpoints: what the later
stages need, to resume on a fresh machine) and, after ship, zoo_embedded.tar.* (data/embedded/...: untar at the
repository root to install the zoo).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from models import world

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("vae", "init", "data", "teacher", "df", "ode_pairs", "ode", "dmd", "sid", "check", "ship")
CONFIGS = {"teacher": "configs/zoo_teacher.yaml", "df": "configs/zoo_df.yaml", "ode_pairs": "configs/zoo_ode.yaml",
           "ode": "configs/zoo_ode.yaml", "dmd": "configs/zoo_dmd.yaml", "sid": "configs/zoo_sid.yaml"}
ZOO_OF_STAGE = {"df": "df", "ode": "ode", "dmd": "dmd", "sid": "sid"}  # stage -> models.wan.embedded.ZOO name
WEIGHTS = {"vae": 1.2, "data": 0.4, "teacher": 3.5, "df": 1.2, "ode_pairs": 0.8, "ode": 0.6, "dmd": 2.0, "sid": 1.2,
           "check": 0.3}  # shares of the time budget (data and ode_pairs are fixed work: their share is an estimate)
SHORT = {  # --short: every stage in seconds on a CPU (6 latent frames, batches of 2, 3 steps)
    "*": ["image_or_video_shape=[1,6,16,12,16]", "num_training_frames=6", "batch_size=2", "total_batch_size=2",
          "log_iters=2", "max_steps=3", "mixed_precision=false"],
    "teacher": ["world.num_videos=4", "world.batch=2", "ema_start_step=1"],
    "df": ["world.num_videos=4", "world.batch=2", "ema_start_step=1"],
    "ode": ["ode_pairs.num_pairs=2", "ode_pairs.steps=4", "ode_pairs.keep=[0,1,2,3]", "ode_pairs.batch_size=2"],
    "dmd": ["dfake_gen_update_ratio=2", "ema_start_step=1"],
    "sid": ["dfake_gen_update_ratio=2", "ema_start_step=1"],
}
PART_BYTES = 15 * 2 ** 20


class Zoo:
    """One run of the driver: the work folder, the options, the clock and the report."""

    def __init__(self, work: Path, *, device: str, short: bool, budget: float | None, vae: Path | None,
                 source: Path, progress: bool, log=print, sets: list[str] | None = None, keep_going: bool = False,
                 more: list[str] | None = None):
        self.work, self.device, self.short = Path(work), device, short
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
        if stage in ("teacher", "df", "data"):
            out.append(f"world.cache_dir={w / 'world_latents'}")
        if stage in ("ode_pairs", "ode"):
            out.append(f"data_path={w / 'ode_pairs.pt'}")
        if stage in ("dmd", "sid"):
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

        return ZOO[ZOO_OF_STAGE[zoo_stage]].checkpoint_path(self.teacher_dir)

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
                "check": False, "ship": False}.get(stage) or (stage in ZOO_OF_STAGE and self.checkpoint(stage).is_file())

    def _data_done(self) -> bool:
        from training.world_data import world_dataset_path

        if not self.vae_file().is_file():
            return False
        cfg, _ = self.config("data")
        return world_dataset_path(self.vae_file(), cfg.world.num_videos, cfg.world.seed,
                                  cfg.image_or_video_shape[1], cfg.world.cache_dir).is_file()

    # --- the stages -----------------------------------------------------------------------------------------

    def run(self, stages: list[str]) -> dict:
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
            self.record(stage, seconds=round(seconds, 1), **summary)
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
            cfg = VAETrainConfig(steps=2, batch=2, frames=5, crop=32, eval_videos=1, log_every=1, device=self.device)
        metrics = train(cfg, self.work / "vae", log=self.log, deadline=deadline)
        return {k: metrics[k] for k in ("psnr_db", "psnr_db_worst", "train_seconds", "steps", "fit_psnr_db")}

    def stage_init(self, deadline) -> dict:
        """WORK/init: the seeded DiT init with the text encoder, tokenizer and VAE (a complete Wan folder)."""
        from models.wan.checkpoint import save_wan_folder
        from models.wan.embedded import EMBEDDED_CONFIG, EMBEDDED_VIDEO_SIZE, make_embedded_state_dict

        folder = self.work / "init"
        copy_text_and_vae(self.source, self.vae_file(), folder)
        save_wan_folder(folder, EMBEDDED_CONFIG, make_embedded_state_dict(), video_size=EMBEDDED_VIDEO_SIZE)
        return {"folder": str(folder)}

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
        from models.wan.embedded import EMBEDDED_CONFIG, EMBEDDED_VIDEO_SIZE

        summary, ckpt = self.train_config("teacher", deadline)
        blob = torch.load(ckpt, map_location="cpu", weights_only=True)
        key = "generator_ema" if "generator_ema" in blob else "generator"
        copy_text_and_vae(self.source, self.vae_file(), self.teacher_dir)
        save_wan_folder(self.teacher_dir, EMBEDDED_CONFIG, read_self_forcing(ckpt, key), video_size=EMBEDDED_VIDEO_SIZE)
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

    def stage_check(self, deadline) -> dict:
        cfg, _ = self.config("teacher")
        result = check_models(self.teacher_dir, self.device, frames=cfg.image_or_video_shape[1], short=self.short,
                              log=self.log)
        from models.files import atomic_write

        atomic_write(self.work / "check.json", lambda p: Path(p).write_text(json.dumps(result, indent=1) + "\n"))
        return {name: {k: v for k, v in r.items() if k != "per_video"} for name, r in result.items()}

    def stage_ship(self, deadline) -> dict:
        out = ship(self.teacher_dir, self.work / "ship" / "data" / "embedded", self.report)
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


def copy_text_and_vae(source: Path, vae_file: Path, folder: Path) -> None:
    """The umT5 encoder and tokenizer of `source` and the VAE file into the Wan folder `folder`."""
    from models.wan.text_encoder import TOKENIZER_SUBDIR
    from models.wan.text_encoder import WEIGHTS_NAME as T5_WEIGHTS_NAME

    folder.mkdir(parents=True, exist_ok=True)
    tok = folder / TOKENIZER_SUBDIR
    if tok.exists():
        shutil.rmtree(tok)
    shutil.copytree(source / TOKENIZER_SUBDIR, tok)
    for src, name in ((source / T5_WEIGHTS_NAME, T5_WEIGHTS_NAME), (vae_file, "Wan2.1_VAE.pth")):
        tmp = folder / f".{name}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, folder / name)


# ------------------------------------------------------------------------------------------------------
# check: does each model do what its prompt says?


def quick_track(video: np.ndarray, threshold: float = 0.3) -> dict:
    """A decoded world video [3, T, H, W] in [-1, 1] -> the colour whose pixels it shows most (pixels within
    `threshold` of a vocabulary colour in RGB), the shape (share of the object's bounding box it fills: a square
    ~1, a circle ~pi/4) and the direction (the sum of the object's centroid steps, unwrapped on the torus).
    A quick check for the training log; studies/ holds the tested metrics."""
    rgb = (np.transpose(video, (1, 2, 3, 0)) + 1) / 2  # [T, H, W, 3]
    T, H, W, _ = rgb.shape
    masks = {c: np.linalg.norm(rgb - np.asarray(v), axis=-1) < threshold for c, v in world.COLOURS.items()}
    counts = {c: int(m.sum()) for c, m in masks.items()}
    colour = max(counts, key=counts.get)
    mask = masks[colour]  # [T, H, W]
    ys, xs = np.arange(H), np.arange(W)
    centres, fills = [], []
    for m in mask:
        if m.sum() < 8:
            centres.append(None)
            continue
        # circular means: the centroid on the torus
        cy = np.angle((m.sum(1) * np.exp(2j * np.pi * ys / H)).sum()) / (2 * np.pi) * H % H
        cx = np.angle((m.sum(0) * np.exp(2j * np.pi * xs / W)).sum()) / (2 * np.pi) * W % W
        centres.append((cy, cx))
        rolled = np.roll(np.roll(m, H // 2 - int(round(cy)), 0), W // 2 - int(round(cx)), 1)
        rows, cols = np.nonzero(rolled.any(1))[0], np.nonzero(rolled.any(0))[0]
        fills.append(m.sum() / ((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)))
    step = np.zeros(2)
    for a, b in zip(centres[:-1], centres[1:]):
        if a is not None and b is not None:
            d = np.array(b) - np.array(a)
            step += (d + np.array([H, W]) / 2) % np.array([H, W]) - np.array([H, W]) / 2
    axis = int(np.argmax(np.abs(step)))
    direction = ("up", "down")[int(step[0] > 0)] if axis == 0 else ("left", "right")[int(step[1] > 0)]
    shape = "square" if fills and np.median(fills) > 0.89 else "circle"
    return {"colour": colour, "shape": shape, "direction": direction, "visible_frames": len(fills),
            "motion_px": round(float(np.abs(step).max()), 1)}


@torch.no_grad()
def check_models(folder: Path, device: str, *, frames: int = 21, short: bool = False, seeds=(0,), log=print) -> dict:
    """Each zoo model found in `folder` samples every prompt of the grid (template 0) with its own sampler; the
    share of videos whose colour, shape and direction `quick_track` reads back as the prompt names them."""
    from models.wan.checkpoint import load_wan
    from models.wan.embedded import ZOO
    from models.common.rollout import sample
    from models.wan.text_encoder import TextEncoder
    from models.wan.vae import WanVAE

    dev = torch.device(device)
    prompts = world.prompt_grid()
    if short:
        prompts = prompts[::11]
    encoder = TextEncoder.from_wan_dir(folder, device=dev)
    context = encoder.encode(prompts).context.to(dev)
    vae = WanVAE.from_file(folder / "Wan2.1_VAE.pth", device=dev)
    results = {}
    for name, entry in ZOO.items():
        ckpt = entry.checkpoint_path(folder)
        if ckpt is not None and not ckpt.is_file():
            continue
        model = load_wan(folder, checkpoint=ckpt, use_ema=entry.use_ema, causal=entry.sampler != "bidirectional",
                         device=dev)
        negative = encoder.encode([entry.negative_prompt]).context.to(dev).expand(len(prompts), -1, -1)
        steps = 4 if short else entry.num_inference_steps
        t0 = time.perf_counter()
        rows = []
        for seed in seeds:
            gen = torch.Generator(device=dev).manual_seed(seed)
            noise = torch.randn((len(prompts), frames, 16, 12, 16), generator=gen, device=dev)
            latents = sample(model, entry.sampler, noise, context, negative, generator=gen,
                             num_inference_steps=steps, guidance_scale=entry.guidance_scale)
            videos = torch.cat([vae.decode(latents[i:i + 8]) for i in range(0, len(prompts), 8)]).cpu().numpy()
            for p, v in zip(prompts, videos):
                got = quick_track(v)
                want = dict(zip(("colour", "shape", "direction"), world.parse_prompt(p)))
                rows.append({"prompt": p, "seed": seed, **{k: got[k] for k in got},
                             **{f"{k}_ok": got[k] == want[k] for k in want}})
        r = {k: round(float(np.mean([row[f"{k}_ok"] for row in rows])), 3) for k in ("colour", "shape", "direction")}
        r["all"] = round(float(np.mean([all(row[f"{k}_ok"] for k in ("colour", "shape", "direction")) for row in rows])), 3)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        r["per_video"] = rows
        results[name] = r
        log(f"[check] {name}: colour {r['colour']:.2f}, shape {r['shape']:.2f}, direction {r['direction']:.2f}, "
            f"all three {r['all']:.2f} over {len(rows)} videos ({r['seconds']} s)")
        del model
    return results


# ------------------------------------------------------------------------------------------------------
# ship: data/embedded's files


def ship(teacher_dir: Path, out: Path, report: dict) -> Path:
    """Write the zoo in data/embedded's layout into `out`: the Wan folder (teacher DiT in bf16, umT5, tokenizer,
    VAE), the students' checkpoints in bf16 (optimiser-free, keys as written by the trainer) and
    checkpoints/ZOO.md (how each model was trained)."""
    from models.wan.checkpoint import WEIGHTS_NAME, read_wan_folder, save_self_forcing, save_wan_folder
    from models.wan.config import default_video_size
    from models.wan.embedded import ZOO, ZOO_MARKER
    from models.files import atomic_write, load_tensors
    from models.wan.text_encoder import TOKENIZER_SUBDIR
    from models.wan.text_encoder import WEIGHTS_NAME as T5_WEIGHTS_NAME

    out.mkdir(parents=True, exist_ok=True)
    config, state = read_wan_folder(teacher_dir)
    copy_text_and_vae(teacher_dir, teacher_dir / "Wan2.1_VAE.pth", out)
    save_wan_folder(out, config, {k: v.to(torch.bfloat16) for k, v in state.items()},
                    video_size=default_video_size(teacher_dir))
    for entry in ZOO.values():
        src = entry.checkpoint_path(teacher_dir)
        if src is None or not src.is_file():
            continue
        blob = load_tensors(src)
        parts = {k: {n.removeprefix("model."): t.to(torch.bfloat16) for n, t in blob[k].items()}
                 for k in ("generator", "generator_ema", "critic") if k in blob}
        save_self_forcing(entry.checkpoint_path(out), **parts)
    atomic_write(out / ZOO_MARKER, lambda p: Path(p).write_text(zoo_markdown(report)))
    assert (out / WEIGHTS_NAME).is_file() and (out / T5_WEIGHTS_NAME).is_file() and (out / TOKENIZER_SUBDIR).is_dir()
    return out


def zoo_markdown(report: dict) -> str:
    """checkpoints/ZOO.md: what each file is and how it was trained (from the driver's report)."""
    from models.wan.embedded import ZOO

    lines = ["# The embedded zoo", "",
             "Trained on the miniature world (models/world.py) by `python3 -m training.zoo` (training/zoo.py;",
             "docs/zoo.md) on " + str(report.get("device")) + ". Each model: `workbench generate --model NAME`.", "",
             "| name | what | file | config | steps | seconds | last losses |", "|---|---|---|---|---|---|---|"]
    stage_of = {v: k for k, v in ZOO_OF_STAGE.items()} | {"teacher": "teacher"}
    for name, entry in ZOO.items():
        st = report["stages"].get(stage_of[name], {})
        losses = ", ".join(f"{k} {v['last']}" for k, v in st.items() if k.endswith("_loss"))
        lines.append(f"| {name} | {entry.description} | {entry.checkpoint or 'diffusion_pytorch_model.safetensors'} "
                     f"| {CONFIGS[stage_of[name]]} | {st.get('steps', '?')} | {st.get('seconds', '?')} | {losses} |")
    check = report["stages"].get("check", {})
    if check:
        lines += ["", "Quick check (training/zoo.py `quick_track`, the 32 prompts of the grid, seed 0):", "",
                  "| model | colour | shape | direction | all three |", "|---|---|---|---|---|"]
        lines += [f"| {n} | {r['colour']} | {r['shape']} | {r['direction']} | {r['all']} |"
                  for n, r in check.items() if isinstance(r, dict) and "colour" in r]
    return "\n".join(lines) + "\n"


def resumable_checkpoints(work: Path) -> list[Path]:
    """The files of the latest trainer checkpoint (weights, EMA and optimiser states) of each flow-matching stage
    that its time share cut short (the report says stopped_early), so that `--continue STAGE` on a fresh
    machine resumes it where it stopped."""
    from training.checkpoints import latest_checkpoint

    report = work / "zoo_report.json"
    stages = json.loads(report.read_text()).get("stages", {}) if report.is_file() else {}
    files = []
    for stage in ("teacher", "df", "ode"):
        folder = latest_checkpoint(work / "logs" / stage) if stages.get(stage, {}).get("stopped_early") else None
        if folder is not None:
            files += sorted(f for f in folder.iterdir() if f.is_file())
    return files


def write_tars(work: Path, out: Path, log=print) -> list[Path]:
    """zoo_state.tar.* (paths relative to the work folder) and, after ship, zoo_embedded.tar.* (paths relative to
    the repository root), in parts of at most PART_BYTES."""
    written = []
    state_files = [f for f in sorted((work / "teacher").rglob("*")) if f.is_file() and not f.name.startswith(".")
                   and "self_forcing_" not in f.name] + [f for f in [work / "zoo_report.json"] if f.is_file()]
    state_files += resumable_checkpoints(work)
    jobs = [("zoo_state.tar", [(f, f.relative_to(work)) for f in state_files])]
    ship_dir = work / "ship"
    if (ship_dir / "data" / "embedded").is_dir():
        jobs.append(("zoo_embedded.tar", [(f, f.relative_to(ship_dir)) for f in sorted(ship_dir.rglob("*"))
                                          if f.is_file()]))
    for name, files in jobs:
        tar = work / name
        with tarfile.open(tar, "w") as t:
            for f, arc in files:
                t.add(f, arcname=str(arc))
        data = tar.read_bytes()
        for i in range(0, len(data), PART_BYTES):
            part = out / f"{name}.{i // PART_BYTES:02d}"
            part.write_bytes(data[i:i + PART_BYTES])
            written.append(part)
        log(f"wrote {name} ({len(data) / 2**20:.1f} MiB) as {-(-len(data) // PART_BYTES)} part(s) in {out}")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m training.zoo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="all", help=f"comma-separated, or all ({', '.join(STAGES)})")
    ap.add_argument("--work", help="work folder (default: runs/zoo, or runs/zoo_short with --short)")
    ap.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--budget", type=float, help="seconds for all the stages asked for (default: no limit)")
    ap.add_argument("--short", action="store_true", help="every stage shortened (6 frames, 3 steps): a CPU test")
    ap.add_argument("--vae", help="use this Wan2.1_VAE.pth instead of training one (the vae stage)")
    ap.add_argument("--source", default=str(ROOT / "data" / "embedded"),
                    help="the folder whose text encoder and tokenizer the zoo uses (default: data/embedded)")
    ap.add_argument("--set", nargs="+", default=[], metavar="[STAGE:]KEY=VALUE",
                    help="config overrides for every stage, or for one (teacher:max_steps=500)")
    ap.add_argument("--continue", dest="more", default="", metavar="STAGES",
                    help="comma-separated training stages (teacher, df, ode, dmd, sid) to train further from their "
                         "latest checkpoint in WORK/logs/STAGE although their output exists (raise max_steps with "
                         "--set STAGE:max_steps=N); their outputs are rewritten")
    ap.add_argument("--out", help="also write zoo_log.txt, zoo_report.json and the tar parts here")
    ap.add_argument("--keep-going", action="store_true",
                    help="a stage that fails is logged and the later stages still run (those that need its output "
                         "fail in turn); for unattended GPU runs")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    stages = list(STAGES) if args.stages == "all" else [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; the stages are {', '.join(STAGES)}")
    stages = [s for s in STAGES if s in stages]
    targets = sorted({item.partition(":")[0] for item in args.set if ":" in item.split("=")[0]} - set(STAGES))
    if targets:
        ap.error(f"--set {targets[0]}:...: no stage {targets[0]!r}; the stages are {', '.join(STAGES)}")
    more = [s.strip() for s in args.more.split(",") if s.strip()]
    bad = [s for s in more if s not in ("teacher", "df", "ode", "dmd", "sid") or s not in stages]
    if bad:
        ap.error(f"--continue {','.join(bad)}: only training stages that --stages also runs (teacher, df, ode, dmd, "
                 f"sid) can be continued")
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
              keep_going=args.keep_going, more=more)
    work.mkdir(parents=True, exist_ok=True)
    # `timeout` and job schedulers stop with SIGTERM: exit through the finally below, so that the log, the report
    # and the tars of what is done still reach --out (checkpoints are written atomically, so none is half-written)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        zoo.run(stages)
    finally:
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
