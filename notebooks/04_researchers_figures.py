# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · The researchers' figures, from a store
#
# The figures of the researchers' attention-extraction fork (their notebook `extract_all_attention.ipynb`):
# the grid of per-head query x key frame heatmaps (3 x 4 for Wan's 12 heads; one row of 4 for the embedded
# default) of the **mean pre-softmax logit** (`attn_logit`, their
# `full_frame_attention`; RdBu_r, symmetric, origin lower), the per-head bars of the last chunk's attention over key
# frames (their `last_block_frame_attention`) titled with their sink score, `sink_delta = v[0] - mean(v[1:-1])` (a
# head whose spike is on frame 1, not 0, scores below zero; the head table's `sink_mass` is v[0] alone), and the
# diagonal and
# column-0 means. The fork used the first denoising step (t = 1000) only; the store has every step. The same
# figures with the softmax mass (`attn_mass`) follow: that is what "sink" usually means.

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
denoise = ds.step.where(ds["phase"] == "denoise", drop=True)
step = int(denoise[ds["timestep"].sel(step=denoise).argmax("step")])  # the fork's step: the first denoise, t = 1000
metrics.step_label(ds, step)

# %% [markdown]
# ## Invariants
# `attn_logit` is NaN exactly where `attn_mass` is (where the fork wrote 0), and that is exactly above the
# block-causal staircase (or outside the KV window): the chunk's own frames are attended bidirectionally, later
# chunks not at all. The last chunk is the last `num_frame_per_block` frames (18, 19, 20 for 21 frames).

# %%
nfpb = int(ds.attrs.get("num_frame_per_block", 3))
assert metrics.logit_nan_matches_mass(ds)
assert metrics.nan_pattern_mismatches(ds) == 0
assert metrics.row_sum_error(ds) < 1e-3
last = metrics.query_frames_for(ds, "last_chunk")
if {str(s) for s in ds["sampler"].values} != {"bidirectional"}:
    assert last == [int(f) for f in ds.query_frame.values[-nfpb:]], last
    assert bool(ds["query_chunk"].diff("query_frame").isin([0, 1]).all()), "chunks are contiguous, in order"

# %% [markdown]
# ## Fig. 1: per-head heatmaps of the mean logit

# %%
figures.head_grid(ds, layer, step=step, sample=sample, var="attn_logit")

# %% [markdown]
# ## Fig. 2: the last chunk over key frames, per head

# %%
figures.last_chunk_bars(ds, layer, step=step, sample=sample, var="attn_logit")

# %% [markdown]
# ## Statistics (as the fork's `run_extraction_each.py` prints them per layer)
# `diag_mean`: mean of the query_frame == key_frame entries; `col0_mean`: mean of key frame 0 over the query frames
# that attended it (the fork's "non-zero column-0 mean"); of the last chunk's profile v: `first` = v[0],
# `mid` = mean(v[1:-1]), `last` = v[-1], `sink` = first - mid.

# %%
stats = metrics.researcher_stats(ds, layer=layer, step=step, var="attn_logit", sample=sample)
assert np.allclose(stats["sink"], stats["first"] - stats["mid"], equal_nan=True)
stats.to_pandas()

# %%
{
    "layer": layer,
    "range [min, max]": (round(stats.attrs["min"], 2), round(stats.attrs["max"], 2)),
    "diag mean": round(float(stats.diag_mean.mean()), 3),
    "col-0 mean": round(float(stats.col0_mean.mean()), 3),
    "head-mean first / mid / last": tuple(round(float(stats[k].mean()), 3) for k in ("first", "mid", "last")),
    "sink head-mean [mean, min, max]": (round(float(stats.sink.mean()), 3), round(float(stats.sink.min()), 3),
                                        round(float(stats.sink.max()), 3)),
}

# %% [markdown]
# ## The same with the softmax mass
# The mean logit measures how the mean query and key directions align and is blind to how concentrated attention
# is (a head can put all its mass on one frame with a modest mean logit); the mass is the fraction of
# attention that lands on each frame.

# %%
figures.head_grid(ds, layer, step=step, sample=sample, var="attn_mass")

# %%
figures.last_chunk_bars(ds, layer, step=step, sample=sample, var="attn_mass")

# %%
mass_stats = metrics.researcher_stats(ds, layer=layer, step=step, var="attn_mass", sample=sample)
assert float(mass_stats["first"].max()) <= 1 + 1e-3 and float(mass_stats["first"].min()) >= 0
mass_stats.to_pandas()
