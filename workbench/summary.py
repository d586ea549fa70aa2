"""Where attention goes, in three regions: key frame 0, the rest of the query's own chunk, everything else.

One definition for the summaries printed and logged after a run: `workbench extract`'s table
(workbench/extract.py `summary_table`), the training probes' logged means (training/probes.py) and the
across-training study (training/study.py). Only denoising steps count (context passes re-encode clean
frames), and only query frames after the first chunk when the store has several chunks (the first chunk's
frame 0 is its own chunk, so it would count twice). A store of one chunk (bidirectional) has no "own chunk"
apart from the whole video: its second region is every frame other than frame 0.
"""

from __future__ import annotations

import xarray as xr


def frame0_own_rest(mass: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """(frame 0, own chunk less frame 0, rest) of `attn_mass` [..., step, ..., query_frame, key_frame] with
    the store's `phase`, `query_chunk` and `key_chunk` coordinates; each summed over key frames, over the
    denoising steps and counted query frames only. NaN cells (frames a query did not attend) count as 0."""
    m = mass.where(mass.phase == "denoise", drop=True)
    if bool((mass.query_chunk > 0).any()):
        m = m.where(m.query_chunk > 0, drop=True)
    first = m.sel(key_frame=0)
    own = m.where((m.key_chunk == m.query_chunk) & (m.key_frame > 0)).sum("key_frame")
    return first, own, m.sum("key_frame") - own - first
