"""Loss logging on rank 0: a CSV file (always), TensorBoard and wandb when installed and asked for.

`logdir/losses.csv` has one row per train step: `step`, then every value the step logged (generator loss
only on generator steps, blank otherwise). Resuming from step s keeps the rows up to s and appends.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from models.files import atomic_write_text
from training.errors import TrainingError

KNOWN = ("csv", "tensorboard", "wandb")


def check_loggers(names) -> None:
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise TrainingError(f"unknown logger(s) {unknown}; use {list(KNOWN)}")
    for name, module in (("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")):
        if name in names:
            try:
                __import__(module)
            except Exception as err:
                pkg = "tensorboard" if name == "tensorboard" else "wandb"
                raise TrainingError(f"logger {name!r} needs the {pkg} package (pip install {pkg}): {err}") from None


def wandb_settings(config) -> dict[str, str]:
    """The config's wandb_host / wandb_key / wandb_entity / wandb_project that are set: empty values and the
    placeholders of the researchers' configs (`wandb_project: WANDB_PROJECT`) leave wandb's own settings
    (environment, `wandb login`) in charge."""
    out = {}
    for name in ("host", "key", "entity", "project"):
        value = str(getattr(config, f"wandb_{name}", "") or "") if config is not None else ""
        if value and value != f"WANDB_{name.upper()}":
            out[name] = value
    return out


def own_of(settings: dict, *names: str) -> dict:
    """The items of `settings` named, for wandb.login / wandb.init."""
    return {n: settings[n] for n in names if n in settings}


class Logger:
    def __init__(self, logdir, names, *, resume_step: int | None = None, config=None, run_name: str = "train"):
        self.path = Path(logdir) / "losses.csv"
        self.columns: list[str] = ["step"]
        self.rows: list[dict] = []
        if self.path.exists():
            if resume_step is None:
                raise TrainingError(f"{self.path} exists from an earlier run; use --resume or a new --logdir")
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [r for r in reader if int(r["step"]) <= resume_step]
            self._rewrite()
        self.tb = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(logdir) / "tensorboard"))
        if "wandb" in names:
            import wandb

            from omegaconf import OmegaConf

            from training.config import recorded

            own = wandb_settings(config)
            if "key" in own or "host" in own:
                wandb.login(**own_of(own, "key", "host"))
            public = OmegaConf.to_container(recorded(config), resolve=True) if config is not None else None
            self.wandb = wandb.init(config=public,
                                    name=run_name, dir=str(logdir), **own_of(own, "entity", "project"))

    def _rewrite(self) -> None:
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buffer.getvalue())

    def log(self, step: int, values: dict) -> None:
        row = {"step": step, **{k: repr(v) if isinstance(v, float) else v for k, v in values.items()}}  # exact
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        if new or not self.path.exists():
            self.columns += new
            self._rewrite()
        else:
            line = io.StringIO(newline="")
            csv.DictWriter(line, fieldnames=self.columns).writerow(row)
            data = memoryview(line.getvalue().encode("utf-8"))
            with open(self.path, "ab", buffering=0) as f:  # (unbuffered: what failed is not written again later)
                start = f.seek(0, os.SEEK_END)
                try:
                    while data:
                        data = data[f.write(data):]
                except BaseException:  # a full disk midway (or Ctrl-C): no half row for a resume to keep as a step
                    os.ftruncate(f.fileno(), start)  # (truncating needs no space)
                    raise
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in numeric.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_losses(logdir) -> list[dict]:
    """The rows of logdir/losses.csv (values as floats, blanks dropped)."""
    with open(Path(logdir) / "losses.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
