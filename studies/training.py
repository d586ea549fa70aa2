"""Attention across training, from a training probe store: where each head's attention goes, step by step.

    attention_over_training(store) -> Dataset (train_step, layer, head) of
        frame0     attention mass on latent frame 0 (the first frame, the "sink" of autoregressive video models)
        own_chunk  mass on the query's own chunk (bidirectional inside a chunk)
        earlier    mass on the other earlier frames
    averaged over samples, denoising steps and query frames after the first chunk (context passes excluded;
    the regions are defined once, in workbench/summary.py)

    table(store) -> text: one row per train step, the layer-and-head means of the three, for a quick look
    (`workbench train` prints it after training).
    figure(store) -> a plotly figure: the three against train_step, one panel per captured layer (head mean,
    one faint line per head).
"""

from __future__ import annotations

import xarray as xr


def attention_over_training(store) -> xr.Dataset:
    """Per (train_step, layer, head): the attention mass on frame 0, on the query's own chunk and on the earlier
    frames; `store` a probe store's path or the Dataset open_store gives."""
    from workbench.store import open_store

    ds = store if isinstance(store, xr.Dataset) else open_store(store)
    if "train_step" not in ds.dims or "attn_mass" not in ds:
        raise ValueError(f"{_name(store)} is not a training probe store with attn_mass (it has dims {dict(ds.sizes)})")
    from workbench.summary import frame0_own_rest

    frame0, own, earlier = frame0_own_rest(ds.attn_mass)
    dims = [d for d in ("sample", "step", "query_frame") if d in frame0.dims]
    out = xr.Dataset({"frame0": frame0.mean(dims), "own_chunk": own.mean(dims), "earlier": earlier.mean(dims)})
    scalars = [name for name, c in out.coords.items() if c.ndim == 0]  # (key_frame=0 and key_chunk=0 of frame 0's
    return out.drop_vars(scalars).load()                                  # selection: they label none of the three)


def _name(store) -> str:
    return "the store" if isinstance(store, xr.Dataset) else str(store)


def table(store) -> str:
    a = attention_over_training(store)
    mean = a.mean(["layer", "head"])
    lines = [f"attention across training ({_name(store)}; mass, mean over layers, heads, denoising steps, later "
             "chunks):",
             f"{'train_step':>10} {'frame 0':>9} {'own chunk':>10} {'earlier':>9}"]
    for s in mean["train_step"].values:
        row = mean.sel(train_step=s)
        lines.append(f"{int(s):>10} {float(row.frame0):>9.4f} {float(row.own_chunk):>10.4f} {float(row.earlier):>9.4f}")
    return "\n".join(lines)


def figure(store):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    a = attention_over_training(store)
    layers = [int(v) for v in a["layer"].values]
    fig = make_subplots(rows=1, cols=len(layers), shared_yaxes=True, subplot_titles=[f"layer {l}" for l in layers])
    colors = {"frame0": "#d62728", "own_chunk": "#1f77b4", "earlier": "#2ca02c"}
    steps = a["train_step"].values
    for col, layer in enumerate(layers, start=1):
        for name, color in colors.items():
            per_head = a[name].sel(layer=layer)
            for h in per_head["head"].values:
                fig.add_trace(go.Scatter(x=steps, y=per_head.sel(head=h).values, mode="lines", opacity=0.2,
                                         line=dict(color=color, width=1), showlegend=False, hoverinfo="skip"),
                              row=1, col=col)
            fig.add_trace(go.Scatter(x=steps, y=per_head.mean("head").values, mode="lines+markers", name=name,
                                     line=dict(color=color, width=3), showlegend=col == 1), row=1, col=col)
    fig.update_xaxes(title_text="train step")
    fig.update_yaxes(title_text="attention mass", row=1, col=1)
    fig.update_layout(title="Where attention goes during training (denoising steps, query chunks after the first)")
    return fig
