"""Command-line values that need no model: lists of layers, heads, steps or seeds (`parse_int_list`), devices
(`check_device`), prompts (`check_prompts`) and where a store given by a relative path is (`find_store`: the
working directory, the folders above it, the repository). Light to import (no torch at import time), so that
`workbench report --layer 3`, `compare` and `info` do not load the extract machinery (torch, transformers, zarr)
to read a number: 2 s of `report`'s 4 on a 2-core CPU. workbench/extract.py re-exports the first two,
studies/__init__.py the last.
"""

from __future__ import annotations

import re
from pathlib import Path

from workbench.errors import WorkbenchError

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_int_list(text: str | None, *, what: str, upper: int | None = None, owner: str = "the model",
                   all_ok: bool = True) -> list[int] | None:
    """'3', '0-29', '0,4,8-11' or 'all' -> sorted ints (None for 'all'); a clear error otherwise ('3-', '-1',
    '1,,2', '' and a range written high to low included). `upper`: values must lie in 0..upper-1 (of `owner`, as
    the error says); `all_ok=False`: 'all' is refused (seeds: there is no such list)."""
    if text is not None and str(text).strip() == "all" and not all_ok:
        raise WorkbenchError(f"{what} 'all': give numbers, e.g. 0 or 0-3")
    if text is None or str(text).strip() == "all":
        return None
    values: set[int] = set()
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise WorkbenchError(f"{what} {text!r}: use a number, a range like 0-29, a list like 0,4,8"
                                 + (", or 'all'" if all_ok else ""))
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise WorkbenchError(f"{what} {text!r}: the range {a}-{b} is empty; write it low to high ({b}-{a})")
        values.update(range(a, b + 1))
    if upper is not None:
        bad = sorted(v for v in values if not 0 <= v < upper)
        if bad:
            raise WorkbenchError(f"{what} {bad} out of range: {owner} has {what}s 0-{upper - 1}")
    return sorted(values)


def check_prompts(prompts) -> None:
    """A WorkbenchError for no prompts, or an empty or blank one (`--prompt ""`, a prompt file of empty lines)."""
    if not prompts or any(not p.strip() for p in prompts):
        raise WorkbenchError("no prompts to run (an empty prompt or prompt file)")


def check_device(name: str) -> str:
    """`name` if it is a device this machine has (cpu, cuda, cuda:N), else a WorkbenchError saying what is."""
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise WorkbenchError(f"device {name!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WorkbenchError(f"device {name!r}: this machine has no CUDA GPU that torch {torch.__version__} can "
                                 "use; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise WorkbenchError(f"device {name!r}: this machine has cuda:0-{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise WorkbenchError(f"device {name!r}: use cpu, cuda or cuda:N")
    return name


def store_folders() -> list[Path]:
    """Where a relative store path is looked for, in order: the working directory, each folder above it (a
    notebook runs in its own folder, e.g. `notebooks/`, next to the `runs/` its commands wrote), and the
    repository root."""
    cwd = Path.cwd()
    return list(dict.fromkeys([cwd, *cwd.parents, REPO_ROOT]))


def find_store(path: str | Path) -> Path:
    """Resolve a store path: as given (absolute, or relative to the working directory), else relative to the first
    folder above the working directory that has it, else to the repository root (`store_folders`); a path found
    nowhere comes back as given."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    for folder in store_folders():
        if (folder / path).exists():
            return folder / path
    return path
