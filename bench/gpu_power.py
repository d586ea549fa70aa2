"""The GPU's SM clock and power draw while a benchmark times something: is the run power-limited?

An H200 draws up to its 700 W limit on the graphed 1.3B rollout; there the driver lowers the SM clock below its
1980 MHz boost (bench/RESULTS.md, session 20), so a rollout's kernels take longer inside the graphs than the
same kernels with idle gaps between them (eager runs, profiles). The benchmarks print the clock and power of
their timed runs beside the times, so that a reader can tell slower code from a hotter GPU.

    from gpu_power import sampler
    sampler.start()                       # once; no-op without nvidia-smi
    t0 = time.time(); work(); t1 = time.time()
    print(sampler.describe([(t0, t1)]))   # "SM clock 1745 MHz (1635-1980), power 684 W (max 695, limit 700 W)"

Samples come from `nvidia-smi --query-gpu=... -lms 100` in a background process (GPU 0, or the first of
CUDA_VISIBLE_DEVICES); only samples whose timestamps fall inside the given intervals count.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import threading

FIELDS = "timestamp,clocks.sm,power.draw,power.limit,temperature.gpu"


class Sampler:
    def __init__(self, period_ms: int = 100):
        self.period_ms = period_ms
        self.samples: list[tuple[float, float, float, float, float]] = []  # (unix time, MHz, W, limit W, deg C)
        self.proc = None

    def start(self) -> "Sampler":
        if self.proc is not None or shutil.which("nvidia-smi") is None:
            return self
        gpu = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
        self.proc = subprocess.Popen(["nvidia-smi", "-i", gpu, f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits",
                                      f"-lms={self.period_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                stamp, mhz, watts, limit, temp = (p.strip() for p in line.split(","))
                t = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()  # local time, as time.time()
                self.samples.append((t, float(mhz), float(watts), float(limit), float(temp)))
            except ValueError:  # a header, "[N/A]" or a partial line
                continue

    def within(self, intervals) -> list[tuple[float, float, float, float, float]]:
        return [s for s in list(self.samples) if any(a <= s[0] <= b for a, b in intervals)]

    def describe(self, intervals) -> str:
        got = self.within(intervals)
        if not got:
            return "no clock/power samples" + ("" if self.proc else " (no nvidia-smi)")
        mhz, watts = [s[1] for s in got], [s[2] for s in got]
        return (f"SM clock {sum(mhz) / len(mhz):.0f} MHz ({min(mhz):.0f}-{max(mhz):.0f}), power "
                f"{sum(watts) / len(watts):.0f} W (max {max(watts):.0f}, limit {got[-1][3]:.0f} W), "
                f"{len(got)} samples")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc = None


sampler = Sampler()
