"""One sample, one path: seeded noise -> a sampler with a statistics probe attached -> the store's arrays.

`workbench extract` (workbench/extract.py `_one_sample`) and the training probes (training/probes.py) capture a
sample through `capture_sample`; `workbench generate` draws the same noise (models/common/rollout.py `seeded_noise`)
and keeps the latents instead. The noise of (seed, shape) is the same bits on every path, so a sample of a
store can be regenerated with `generate`, and a training probe's sample is the one `extract` would capture with
the same checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from workbench.capture import StatsProbe
from workbench.errors import WorkbenchError
from workbench.hooks import attach


def capture_sample(model, probe: StatsProbe, run: Callable[[], object], num_frames: int,
                   from_frame: int = 0) -> dict[str, np.ndarray]:
    """{stat: [S, L, H, F(, key dim)]} of one sample: the probe forgets the last rollout, `run()` runs the
    sampler with it attached, and every captured (kind, step, layer) must have been seen for the query frames
    `from_frame`..`num_frames - 1` (WorkbenchError naming the first missing ones otherwise). Image-to-video
    starts at frame 1: frame 0 is the image's latent, which only has a context pass."""
    probe.reset()
    with attach(model, probe):
        run()
    missing = probe.missing_steps(num_frames, from_frame=from_frame)
    if missing:
        raise WorkbenchError(f"the rollout did not produce every captured (kind, step, layer): {missing[:5]}")
    return {stat: values[0] for stat, values in probe.results().items()}
