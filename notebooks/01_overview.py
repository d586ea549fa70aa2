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
# # 01 · Overview of an attention store
#
# What one store holds (its samples, steps and checks), how every captured head attends (the head taxonomy and
# layer x head maps of the head metrics), and one layer in detail. The store layout is `docs/store.md`; the
# metrics are defined in `studies/metrics.py`.
#
# Make the default store with the README's notebook command (below, in the parameters cell), or run this notebook
# on another store: set `store` (and `layer`) in the parameters cell.

# %% tags=["parameters"]
# made by: workbench extract --layers 0-5 --prompt "a blue circle moving up" --seed 0,1 --out runs/embedded.zarr
store = "runs/embedded.zarr"
layer = None  # None: the first captured layer
sample = None  # None: the mean over samples; or a sample id such as "p0000-s42"

# %%
import numpy as np

from studies import figures, load_store, metrics
from studies.report import checks_table, steps_table

figures.use_notebook_renderer()  # figures that JupyterLab and `jupyter nbconvert --to html` both draw
ds = load_store(store)
layer = metrics.default_layer(ds) if layer is None else layer
step0 = int(ds.step.values[0])  # the first denoising step (t = 1000 for the few-step rollout)
ds

# %% [markdown]
# ## The invariants this notebook relies on
# Every captured row of `attn_mass` is a distribution over key frames (sums to 1), and NaN marks exactly the
# key frames the call could not attend: above the block-causal staircase, or outside the KV window.

# %%
assert metrics.row_sum_error(ds) < 1e-3, "attn_mass rows must sum to 1 over the attended key frames"
assert metrics.nan_pattern_mismatches(ds) == 0, "NaN must be exactly outside the expected key window"
assert metrics.logit_nan_matches_mass(ds), "attn_logit must be NaN exactly where attn_mass is"
checks_table(ds)

# %% [markdown]
# ## Samples and steps

# %%
steps_table(ds)

# %%
{str(s): (str(p), int(seed)) for s, p, seed in zip(ds.sample.values, ds["prompt"].values, ds["seed"].values)}

# %% [markdown]
# ## Head taxonomy
# Head metrics averaged over the last chunk's query frames (the researchers' `last_block`). First rule that holds:
# sink (mass on frame 0 at least 0.5, and above uniform attention's share), local (mass on keys less than 3 frames
# away at least 0.5), deep_sink (mass on the oldest half of the attended frames at least 0.6), global (normalised
# entropy at least 0.85), else mixed (studies/metrics.py says each rule).

# %%
hm = metrics.head_metrics(ds, sample=sample)
classes = metrics.classify_heads(hm)
assert set(np.unique(classes.values.astype(str))) <= set(metrics.CLASSES)
assert float(hm.sink_mass.min()) >= 0 and float(hm.sink_mass.max()) <= 1 + 1e-3
frames = hm.attrs["query_frames"]
figures.taxonomy_map(classes.sel(step=step0), title=f"head classes · {metrics.step_label(ds, step0)} · query frames "
                                                   f"{frames[0]}-{frames[-1]} · {figures.samples_label(ds, sample)}")

# %%
classes.sel(step=step0).to_pandas()

# %%
figures.layer_head_map(hm.sink_mass.sel(step=step0), zmin=0, zmax=1)

# %%
figures.layer_head_map(hm.local_mass.sel(step=step0), zmin=0, zmax=1)

# %%
figures.layer_head_map(hm.mean_distance.sel(step=step0))

# %%
figures.layer_head_map(hm.entropy_norm.sel(step=step0), zmin=0, zmax=1)

# %% [markdown]
# ## One layer in detail
# Query frame x key frame attention mass per head (origin lower: query frame 0 at the bottom) at the first
# denoising step; the slider moves through the other steps of the chunk schedule (the last step of the few-step
# rollout is the context pass).

# %%
figures.step_slider(ds, layer, sample=sample, start=step0)
