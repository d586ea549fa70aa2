"""The table `workbench extract` prints when it finishes: per layer and head, where the attention mass of a store
goes (frame 0, the query's own chunk, the rest). Reads the store only (workbench/store.py)."""

from __future__ import annotations

from workbench.extract import format_int_list

def summary_table(store_path, max_rows: int = 48) -> str:
    """Per layer and head (mean over samples, denoising steps and the query frames after the first chunk): the
    attention mass on frame 0, on the rest of the query's own chunk, and on everything else. Heads are never
    averaged across layers (head 0 of one layer has nothing to do with head 0 of another). Up to `max_rows`
    (layer, head) rows; more heads are shown as layer x head grids."""
    from workbench.store import open_store

    ds = open_store(store_path)
    if "attn_mass" not in ds:
        return f"wrote {store_path}"
    chunked = bool((ds.query_chunk > 0).any())
    m = ds.attn_mass.where(ds.phase == "denoise", drop=True)
    m = m.where(m.query_chunk > 0, drop=True) if chunked else m
    own = m.where((m.key_chunk == m.query_chunk) & (m.key_frame > 0)).sum("key_frame")  # frame 0 has its own column
    first = m.sel(key_frame=0)
    total = m.sum("key_frame")
    dims = [d for d in ("sample", "step", "query_frame") if d in first.dims]
    first, own, rest = (x.mean(dims).transpose("layer", "head").values for x in (first, own, total - own - first))
    layers, heads = [int(v) for v in ds.layer.values], [int(v) for v in ds["head"].values]
    rows = "query frames after chunk 0" if chunked else "all query frames: one chunk"
    lines = [f"wrote {store_path}: {ds.sizes['sample']} sample(s), layers {format_int_list(layers)}, "
             f"steps {format_int_list(ds.step.values)}",
             f"attention mass per layer and head (mean over samples, denoising steps and {rows}):"]
    own_name = "own chunk" if chunked else "other frames"
    if len(layers) * len(heads) <= max_rows:
        lines.append(f"{'layer':>6} {'head':>5} {'frame 0':>9} {own_name:>12} {'rest':>8}"
                     + ("   (own chunk: its frames other than frame 0)" if chunked else ""))
        for i, layer in enumerate(layers):
            for j, head in enumerate(heads):
                lines.append(f"{layer:>6} {head:>5} {_fmt(first[i, j]):>9} {_fmt(own[i, j]):>12} {_fmt(rest[i, j]):>8}")
    else:
        for name, grid in (("frame 0", first), (own_name, own)):
            lines.append(f"mass on {name} (a row per layer, a column per head):")
            lines.append(f"{'layer':>6} " + " ".join(f"{'h' + str(h):>6}" for h in heads))
            lines += [f"{layer:>6} " + " ".join(f"{_fmt(v):>6}" for v in grid[i]) for i, layer in enumerate(layers)]
    lines.append(f"open it with xarray: xr.open_zarr({str(store_path)!r}, consolidated=False), or "
                 f"`workbench report {store_path}`")
    return "\n".join(lines)


def _fmt(x: float, digits: int = 3) -> str:
    """A rounded number, never '-0.000' (a sum of float32 masses can come out a hair below zero)."""
    return f"{round(float(x), digits) + 0.0:.{digits}f}"
