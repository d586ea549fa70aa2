"""Where attention goes, in three regions: key frame 0, the rest of the query's own chunk, everything else; how
local it is (the share on the query's own frame, the mean distance in frames to the keys); and the table
`workbench extract` prints when it finishes, per layer and head, with a line that names the most local head,
the widest and the one most drawn to frame 0.

The regions are defined once here for every summary printed or logged after a run: `summary_table` below, the
training probes' logged means (training/probes.py) and the across-training study (studies/training.py). Only
denoising steps count (context passes re-encode clean frames; of a CFG store, the cond branch), and only query
frames after the first chunk when the store has several chunks (the first chunk's frame 0 is its own chunk, so it
would count twice). A store of one chunk (bidirectional) has no "own chunk" apart from the whole video: its second
region is every frame other than frame 0. Reads stores only (workbench/store.py).
"""

from __future__ import annotations

import xarray as xr

from workbench.progress import shell_word


def counted(mass: xr.DataArray) -> xr.DataArray:
    """`attn_mass` at the steps and query frames every summary counts: denoising steps only (of a CFG store, its
    cond branch: the prompt's forward, as `workbench compare` takes by default; the uncond one attends under the
    negative prompt; a store of uncond steps alone: those), and the query frames after the first chunk when the
    store has several chunks."""
    m = mass.where(mass.phase == "denoise", drop=True)
    if "cfg" in m.coords and bool((m.cfg == "uncond").any()) and bool((m.cfg != "uncond").any()):
        m = m.where(m.cfg != "uncond", drop=True)  # (a store of uncond steps alone: those)
    return m.where(m.query_chunk > 0, drop=True) if bool((mass.query_chunk > 0).any()) else m


def frame0_own_rest(mass: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray, xr.DataArray]:
    """(frame 0, own chunk less frame 0, rest) of `attn_mass` [..., step, ..., query_frame, key_frame] with
    the store's `phase`, `query_chunk` and `key_chunk` coordinates; each summed over key frames, over the
    denoising steps and counted query frames only. NaN cells (frames a query did not attend) count as 0."""
    m = counted(mass)
    first = m.sel(key_frame=0).fillna(0)  # (evicted by a window without a sink: 0, not left out of the mean)
    own = m.where((m.key_chunk == m.query_chunk) & (m.key_frame > 0)).sum("key_frame")
    return first, own, m.sum("key_frame") - own - first


def locality(mass: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray]:
    """(same frame, mean distance) of `attn_mass`, over the same steps and query frames as `frame0_own_rest`:
    the mass on the query's own frame, and the mass-weighted mean of |query_frame - key_frame| in frames (0: a
    head that looks only at its own frame; larger: further back, or ahead in a bidirectional model)."""
    m = counted(mass)
    same = m.where(m.key_frame == m.query_frame).sum("key_frame")
    distance = abs(m.query_frame - m.key_frame)
    return same, (m * distance).sum("key_frame") / m.sum("key_frame")


def summary_table(store_path, max_rows: int = 48) -> str:
    """Per layer and head (mean over samples, denoising steps and the query frames after the first chunk): the
    attention mass on frame 0, on the rest of the query's own chunk, on everything else, on the query's own frame,
    and the mean distance to the keys in frames; then a one-line reading (`reading`). Heads are never
    averaged across layers (head 0 of one layer has nothing to do with head 0 of another). Up to `max_rows`
    (layer, head) rows; more heads are shown as layer x head grids."""
    from workbench.store import open_store

    ds = open_store(store_path)
    if "attn_mass" not in ds:
        return f"wrote {store_path}"
    context = [int(s) for s, ph in zip(ds.step.values, ds.phase.values) if str(ph) == "context"] \
        if "phase" in ds.coords else []
    passes = f" ({format_int_list(context)}: the context pass{'es' if len(context) > 1 else ''})" \
        if context and len(context) < ds.sizes["step"] else ""
    image = (f"; frame 0 is the image {str(ds.attrs['image'])!r} (its chunk has its context pass only)"
             if ds.attrs.get("image") else "")
    wrote = (f"wrote {store_path}: {ds.sizes['sample']} sample(s), layers {format_int_list(ds.layer.values)}, "
             f"steps {format_int_list(ds.step.values)}{passes}{image}")
    opening = (f"open it with xarray: xr.open_zarr({str(store_path)!r}, consolidated=False), or "
               f"`workbench report {shell_word(store_path)}`")
    if not bool((ds.phase == "denoise").any()):  # (a table of NaN otherwise, and heads named from it)
        return "\n".join([wrote, "no summary: it averages denoising steps, and every step captured is a context pass "
                          "(phase 'context': the KV cache rewritten at the context noise)", opening])
    chunked = bool((ds.query_chunk > 0).any())
    # a counted row attends at least its own frame, so a row of NaN alone is attention that was not finite (a
    # rollout whose activations overflowed): summed as NaN-skipped it would print as 0 mass, and name heads from it
    rows_nan = ~counted(ds.attn_mass).notnull().any("key_frame")
    if bool(rows_nan.all()):
        return "\n".join([wrote, "no summary: every counted row of attn_mass is NaN (the attention was not finite: "
                          "the rollout's activations overflowed, or its inputs were NaN)", opening])
    warn = (f"warning: {int(rows_nan.sum())} of {rows_nan.size} counted rows of attn_mass are NaN (attention that was "
            f"not finite); the table and the reading leave them out" if bool(rows_nan.any()) else None)
    first, own, rest = (x.where(~rows_nan) for x in frame0_own_rest(ds.attn_mass))
    dims = [d for d in ("sample", "step", "query_frame") if d in first.dims]
    same, distance = (x.where(~rows_nan) for x in locality(ds.attn_mass))
    m = counted(ds.attn_mass)
    # frame 0's share under uniform attention, counted as the frame 0 column counts it: 0 in rows that do not
    # attend frame 0 (a window without a sink evicted it)
    uniform = float((m.isel(key_frame=0).notnull() / m.notnull().sum("key_frame")).mean())
    first, own, rest, same, distance = (x.mean(dims).transpose("layer", "head").values
                                        for x in (first, own, rest, same, distance))
    layers, heads = [int(v) for v in ds.layer.values], [int(v) for v in ds["head"].values]
    rows = "query frames after chunk 0" if chunked else "all query frames, the video being one chunk"
    captured = {str(c) for c in ds["cfg"].values} if "cfg" in ds.coords else set()
    branches = {str(c) for c in m.cfg.values} if "cfg" in m.coords else set()  # (what counted kept)
    counted_steps = sorted({int(s) for s in m.step.values})  # (the denoising steps captured: --steps may pick some)
    listed = format_int_list(counted_steps)
    if len(counted_steps) == 1:
        steps = f"denoising step {listed}"
    elif len(listed) <= 24:
        steps = f"denoising steps {listed}"
    else:  # (a 40-step CFG store's 0,2,4,...: the count and the range)
        steps = f"{len(counted_steps)} denoising steps ({counted_steps[0]}-{counted_steps[-1]})"
    if "uncond" in captured and branches == {"cond"}:
        steps += ", CFG branch cond (the prompt's)"
    elif branches == {"uncond"}:
        steps += ", CFG branch uncond (the negative prompt's: the only one captured)"
    lines = [wrote, *([warn] if warn else []),
             f"attention mass per layer and head (mean over samples; {steps}; {rows}):"]
    own_name = "own chunk" if chunked else "other frames"
    if len(layers) * len(heads) <= max_rows:  # (one chunk: no "rest", every frame but 0 is "other frames")
        lines.append(f"{'layer':>6} {'head':>5} {'frame 0':>9} {own_name:>12}" + (f" {'rest':>8}" if chunked else "")
                     + f" {'same frame':>11} {'mean |q-k|':>11}"
                     + ("   (own chunk: the query's chunk, frame 0 excepted; rest: earlier chunks' frames, frame 0 "
                        "excepted)" if chunked else ""))
        for i, layer in enumerate(layers):
            for j, head in enumerate(heads):
                lines.append(f"{layer:>6} {head:>5} {_fmt(first[i, j]):>9} {_fmt(own[i, j]):>12}"
                             + (f" {_fmt(rest[i, j]):>8}" if chunked else "")
                             + f" {_fmt(same[i, j]):>11} {_fmt(distance[i, j], 2):>11}")
    else:
        for name, grid in (("frame 0", first), (own_name, own), ("the query's own frame", same)):
            lines.append(f"mass on {name} (a row per layer, a column per head):")
            lines.append(f"{'layer':>6} " + " ".join(f"{'h' + str(h):>6}" for h in heads))
            lines += [f"{layer:>6} " + " ".join(f"{_fmt(v):>6}" for v in grid[i]) for i, layer in enumerate(layers)]
    lines += [reading(layers, heads, first, same, distance, uniform),
              opening + " (its head table reads the last chunk's query frames at one step: sink_mass is frame 0's "
              "share there, mean_abs_distance the mean |q-k|)"]
    return "\n".join(lines)


def reading(layers: list[int], heads: list[int], first, same, distance, uniform: float | None = None) -> str:
    """One sentence over the [layer, head] grids: the most local head, the widest, the one most drawn to frame 0
    (beside `uniform`, frame 0's share if every attended frame got the same: a head at or below it is no sink)."""
    def name(grid, pick):
        i, j = divmod(int(pick(grid)), grid.shape[1])
        return f"layer {layers[i]} head {heads[j]}", (i, j)

    import numpy as np

    local, li = name(same, np.nanargmax)  # (a head of NaN rows alone is no pick: argmax would take its NaN)
    wide, wi = name(distance, np.nanargmax)
    sink, si = name(first, np.nanargmax)
    start = (f"reading: most local {local} ({_fmt(same[li], 2)} of its attention on its own frame); widest {wide} "
             f"(keys {_fmt(distance[wi], 1)} frames away on average); ")
    if uniform is not None and uniform >= 1:  # (a video of one key frame)
        return start + "frame 0 is the only key frame the rows attend, so no head can be told drawn to it"
    digits = 2  # (more where the two would print the same: "0.13; uniform attention would give it 0.13")
    while uniform is not None and digits < 5 and _fmt(first[si], digits) == _fmt(uniform, digits):
        digits += 1
    if uniform is not None and first[si] <= uniform:  # then no head is drawn to frame 0
        return start + (f"no head is drawn to frame 0: each gives it no more than uniform attention would "
                        f"({_fmt(uniform, digits)}; the most, {sink}, {_fmt(first[si], digits)})")
    return (start + f"most drawn to frame 0: {sink} ({_fmt(first[si], digits)}"
            + (f"; uniform attention would give it {_fmt(uniform, digits)}" if uniform is not None else "") + ")")


def format_int_list(values) -> str:
    """The inverse of workbench/extract.py `parse_int_list`: [0, 1, 2, 3, 7, 9, 10] -> '0-3,7,9-10'."""
    values = sorted(int(v) for v in values)
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _fmt(x: float, digits: int = 3) -> str:
    """A rounded number, never '-0.000' (a sum of float32 masses can come out a hair below zero)."""
    return f"{round(float(x), digits) + 0.0:.{digits}f}"
