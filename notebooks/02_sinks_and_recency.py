# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Sinks and recency
#
# How much attention lands on the first frame (the sink) and the first chunk, how much on the query's own chunk,
# and how attention decays with the distance `query_frame - key_frame`; per query frame, per step, per head.
# Definitions: `studies/metrics.py`.

# %% tags=["parameters"]
# made by: workbench extract --layers 0-5 --prompt "a blue circle moving up" --seed 0,1 --out runs/embedded.zarr
store = "runs/embedded.zarr"
layer = None  # None: the first captured layer
sample = None  # None: the mean over samples; or a sample id such as "p0000-s42"

# %%
import numpy as np

from studies import figures, load_store, metrics

figures.use_notebook_renderer()  # figures that JupyterLab and `jupyter nbconvert --to html` both draw
ds = load_store(store)
layer = metrics.default_layer(ds) if layer is None else layer
step0 = int(ds.step.values[0])
sub = metrics.select(ds, sample=sample, layer=layer)
who = figures.samples_label(ds, sample)  # (in every title: which sample, or how many a mean is over)
rows = metrics.row_metrics(sub)  # (sample, step, layer, head, query_frame)
rows

# %% [markdown]
# ## Invariants
# Masses are probabilities; the entropy is normalised to [0, 1]; and a causal rollout never attends to a key frame
# after the query's chunk, so its recency profile is NaN for distances of a whole chunk or more into the future.

# %%
assert metrics.row_sum_error(sub) < 1e-3
assert metrics.nan_pattern_mismatches(sub) == 0
for name in ("sink_mass", "sink_chunk_mass", "own_chunk_mass", "local_mass", "early_mass"):
    values = rows[name].values
    assert np.nanmin(values) >= -1e-6 and np.nanmax(values) <= 1 + 1e-3, name
assert np.nanmin(rows.entropy_norm.values) >= -1e-6 and np.nanmax(rows.entropy_norm.values) <= 1 + 1e-6
assert bool((rows.sink_mass <= rows.sink_chunk_mass + 1e-6).all()), "frame 0 is part of the first chunk"

profile = metrics.recency_profile(sub)  # (sample, step, layer, head, distance)
nfpb = int(ds.attrs.get("num_frame_per_block", 3))
samplers = {str(s) for s in ds["sampler"].values}
if "bidirectional" not in samplers:
    assert bool(profile.sel(distance=profile.distance <= -nfpb).isnull().all()), "a causal store saw the future"
assert np.nanmin(profile.values) >= -1e-6 and np.nanmax(profile.values) <= 1 + 1e-3

# %% [markdown]
# ## Per query frame (first denoising step)

# %%
at = rows.sel(step=step0).mean("sample").isel(layer=0)
figures.metric_by_query_frame(at.sink_mass,
                              title=f"mass on frame 0 · layer {layer} · {metrics.step_label(ds, step0)} · {who}")

# %%
figures.metric_by_query_frame(at.own_chunk_mass, title=f"mass on the query's own chunk · layer {layer} · "
                                                      f"{metrics.step_label(ds, step0)} · {who}")

# %%
# signed: query_frame - key_frame, negative where keys lie ahead of the query (a bidirectional store)
figures.metric_by_query_frame(at.mean_distance, title=f"mass-weighted mean query_frame - key_frame · layer {layer} · "
                                                     f"{metrics.step_label(ds, step0)} · {who}")

# %% [markdown]
# ## Recency profile
# Mean attention mass at each distance, averaged over the query frames that could attend that far back. The
# largest distances are reached only from the last frames to the first chunk's (shaded, points open; with a
# window and sink frames: the distances only the sink frames reach): a head that keeps mass on frame 0, the sink,
# lifts the tail there, which is not attention that far back in general.

# %%
figures.recency_lines(profile.sel(step=step0).mean("sample").isel(layer=0),
                      title=f"recency profile · layer {layer} · {metrics.step_label(ds, step0)} · {who}")

# %% [markdown]
# The same without the sink frames (frame 0, or the cache's sink frames of a store made with `--sink-size`): at
# distance d such a frame is one of the (frames - d) pairs averaged, yet a sink head's mass there lifts their mean
# well before the shaded distances. Left out, the lines show how attention decays with distance.

# %%
sinks = list(range(max(1, int(ds.sink_size.values.max())))) if "sink_size" in ds.coords else [0]
no_sink = metrics.recency_profile(sub, exclude_key_frames=sinks)
figures.recency_lines(no_sink.sel(step=step0).mean("sample").isel(layer=0),
                      title=f"recency profile without key frame{'s' if len(sinks) > 1 else ''} "
                            f"{sinks[0]}{'-' + str(sinks[-1]) if len(sinks) > 1 else ''} · layer {layer} · "
                            f"{metrics.step_label(ds, step0)} · {who}")

# %% [markdown]
# ## Across denoising steps
# Do sinks strengthen or fade as the queries get less noisy? Head metrics over the last chunk, per denoising step
# (the context pass, which refreshes the KV cache at the context noise, is not one and is left out).

# %%
denoising = sub.sel(step=sub.phase == "denoise") if "phase" in sub.coords else sub
hm = metrics.head_metrics(denoising)
last = f"query frames {hm.attrs['query_frames'][0]}-{hm.attrs['query_frames'][-1]}"  # the last chunk's
figures.metric_by_step(hm.sink_mass.isel(layer=0), title=f"mass on frame 0 ({last}) · layer {layer} · {who}")

# %%
figures.metric_by_step(hm.entropy_norm.isel(layer=0), title=f"normalised entropy ({last}) · layer {layer} · {who}")
