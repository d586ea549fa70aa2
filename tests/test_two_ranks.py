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


def test_an_aborted_rank_is_seen_when_torchrun_names_its_peer_as_the_root_cause():
    """torchrun names the failure of the earliest whole second, rank 0 first: a peer that exits with an error
    (its collective's 'Connection reset by peer') in the second of the abort is the 'Root Cause'."""
    def failures(*ranks):  # torchrun's report: the other failures, then the root cause
        entry = "  [{0}]:\n    rank      : {0} (local_rank: {0})\n    exitcode  : {1} (pid: 10{0})\n"
        others = "".join(entry.format(*r) for r in ranks[1:]) or "  <NO_OTHER_FAILURES>\n"
        return f"ChildFailedError:\n  Failures:\n{others}  ----\n  Root Cause (first observed failure):\n" + \
            entry.format(*ranks[0])

    assert killed_by_signal(failures((0, 1), (1, -6))) == 6
    assert killed_by_signal(failures((1, -6), (0, -15))) == 6
    assert killed_by_signal(failures((0, 1), (1, -15))) is None  # (torchrun's own SIGTERM of the others)
    assert killed_by_signal(failures((1, 1))) is None
    assert killed_by_signal("exitcode  : -6 in a log line, no torchrun report") is None
