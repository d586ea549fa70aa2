"""The benchmarks' helpers that run without a GPU: bench/gpu_power.py's parsing of nvidia-smi samples and its
summary over the timed intervals only."""

import datetime
import io
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from gpu_power import Sampler  # noqa: E402


def test_power_sampler_parses_and_keeps_only_the_timed_intervals():
    t0 = datetime.datetime(2026, 12, 4, 6, 0, 0)
    lines = ["timestamp, clocks.current.sm [MHz], power.draw [W], power.limit [W], temperature.gpu\n"]  # a header
    for i, (mhz, watts) in enumerate([(1980, 120.0), (1700, 690.0), (1750, 680.0), (1980, 130.0)]):
        stamp = (t0 + datetime.timedelta(seconds=i)).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]
        lines.append(f"{stamp}, {mhz}, {watts:.2f}, 700.00, 41\n")
    lines.append("2026/12/04 06:00:09.000, [N/A], 100.00, 700.00, 41\n")  # unreadable: skipped
    s = Sampler()
    s.proc = types.SimpleNamespace(stdout=io.StringIO("".join(lines)))
    s._read()
    assert len(s.samples) == 4
    start = t0.timestamp()
    got = s.within([(start + 0.5, start + 2.5)])  # the second and third samples
    assert [x[1] for x in got] == [1700.0, 1750.0]
    text = s.describe([(start + 0.5, start + 2.5)])
    assert text.startswith("SM clock 1725 MHz (1700-1750), power 685 W (max 690, limit 700 W), 2 samples"), text
    assert s.describe([(start + 10, start + 11)]) == "no clock/power samples"
