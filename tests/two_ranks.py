"""`python -m torch.distributed.run --standalone --nproc_per_node=2 ...` for the tests that run two CPU processes
(gloo), with what a failure needs to be read.

gloo's TCP transport aborts a process (SIGABRT, from a C++ exception in its own I/O thread) on some socket errors;
once, in CI on a loaded 2-core machine, a rank of tests/test_training_cli.py's two-process training died so in the
middle of a step, its peer reporting 'Connection reset by peer'. Our code cannot kill a rank by a signal (its errors
are Python exceptions: exit status 1), so a run in which a rank was killed by a signal other than the SIGTERM
torchrun sends the others runs once more, after `fresh` (what the run writes) is removed, and the first attempt's
report is kept as a warning. Any other failure, or a second signal, is the test's to judge. A failed run's message
(`report`) puts each rank's error lines before the tail, which alone showed only the peer's side."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ERROR_LINES = re.compile(r"terminate called|what\(\)|Error|error:|Traceback|exitcode")


def torchrun(args: list[str], *, fresh=(), timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `args` (a script or `-m module ...`) under torchrun with 2 processes of one thread each (OMP_NUM_THREADS=1
    in `env`, default this process's environment); subprocess.run's other keyword arguments (cwd) pass through,
    output captured as text. torchrun's agent leaves a `torchelastic_*` folder in the temporary folder of every run:
    the run gets a TMPDIR of its own, removed after it."""
    with tempfile.TemporaryDirectory(prefix="torchrun-") as tmp:
        return _torchrun(args, fresh=fresh, timeout=timeout, tmp=tmp, **kwargs)


def _torchrun(args, *, fresh, timeout, tmp, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *map(str, args)]
    kwargs["env"] = {**kwargs.get("env", os.environ), "OMP_NUM_THREADS": "1", "TMPDIR": tmp}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    sig = killed_by_signal(run.stderr) if run.returncode else None
    if sig is None:
        return run
    warnings.warn(f"a rank was killed by signal {sig} (gloo's transport; not our code): run once more. "
                  f"First attempt:\n{report(run)}")
    for path in map(Path, fresh):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def killed_by_signal(stderr: str) -> int | None:
    """The signal that killed a rank (exitcode -N in torchrun's report of its failures), SIGTERM aside: torchrun
    ends the other ranks with it. Any rank, not only the 'Root Cause': torchrun names the failure of the earliest
    whole second, rank 0 first, so a peer that exits with an error in the same second as the aborted rank is named
    instead."""
    if "Root Cause" not in stderr:
        return None
    start = stderr.rfind("Failures:")
    codes = re.findall(r"exitcode\s*:\s*-(\d+)", stderr[start if start >= 0 else stderr.rfind("Root Cause"):])
    return next((int(c) for c in codes if int(c) != 15), None)


def report(run: subprocess.CompletedProcess, tail: int = 3000) -> str:
    """A failed run, readable: the first 40 error lines of every rank (stderr), then the tails of stdout and
    stderr."""
    lines = [line for line in run.stderr.splitlines() if ERROR_LINES.search(line)][:40]
    return ("error lines:\n" + "\n".join(lines) + f"\n--- stdout tail:\n{run.stdout[-tail:]}"
            f"\n--- stderr tail:\n{run.stderr[-tail:]}")
