"""tests/two_ranks.py, the torchrun runner of the two-process tests: a rank killed by a signal (as gloo's transport
aborts) runs once more after its outputs are removed; a rank's Python error does not, and its message reaches
the report."""

import pytest

from two_ranks import killed_by_signal, report, torchrun

SCRIPT = """import os, sys, pathlib
import torch.distributed as dist
dist.init_process_group("gloo")
out = pathlib.Path(sys.argv[1])
mode = sys.argv[2]
if int(os.environ["RANK"]) == 1:
    if mode == "abort" and not out.exists():
        out.write_text("first attempt")
        os.abort()
    if mode == "raise":
        raise ValueError("rank 1's own error")
dist.barrier()
dist.destroy_process_group()
"""


def test_a_rank_killed_by_a_signal_runs_once_more_and_a_python_error_does_not(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    marker, written = tmp_path / "marker", tmp_path / "written"
    (written / "part").mkdir(parents=True)  # (stands for what the first attempt wrote)
    with pytest.warns(UserWarning, match="killed by signal 6") as said:
        run = torchrun([script, marker, "abort"], fresh=[written, tmp_path / "absent"], timeout=120)
    assert run.returncode == 0, report(run)
    assert not written.exists()
    assert marker.read_text() == "first attempt"  # (the second attempt found it: rank 1 went on)
    assert "exitcode" in str(said[0].message)
    raised = torchrun([script, marker, "raise"], timeout=120)
    assert raised.returncode != 0 and killed_by_signal(raised.stderr) is None
    assert "ValueError: rank 1's own error" in report(raised).partition("--- stdout tail")[0]
