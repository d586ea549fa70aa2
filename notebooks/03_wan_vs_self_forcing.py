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
# # 03 · Wan vs Self Forcing
#
# What Self-Forcing training changed in how heads attend across frames. Store A holds the base Wan weights run
# with the bidirectional sampler, store B the Self-Forcing rollout, with the same prompts and seeds. The two
# samplers do not share step indices, so steps are paired one to one by the nearest timestep (within `tolerance`;
# the closest pairs first, each step in one pair at most), and A's CFG store contributes its `cond` branch.
# Divergences are Jensen-Shannon in bits (0 = same, 1 = disjoint).
# The same comparison as HTML: `workbench compare runs/wan_bidirectional.zarr runs/embedded.zarr --out
# runs/compare.html`. Both default stores are made by the README's notebook commands: A is the zoo's toy "Wan"
# teacher, B the default model, the zoo's Self-Forcing DMD student (distilled from that teacher: ODE
# initialisation, then DMD through its own 4-step causal rollouts), so the divergences show what Self-Forcing
# training and its causal sampler changed in each head.

# %% tags=["parameters"]
# A, the reference: the teacher through Wan's bidirectional sampler. Made by: workbench extract --layers 0-5
# --prompt "a blue circle moving up" --seed 0,1 --model teacher --num-inference-steps 8
# --out runs/wan_bidirectional.zarr
store_a = "runs/wan_bidirectional.zarr"
# B, the Self-Forcing DMD student (the default model). Made by: workbench extract --layers 0-5
# --prompt "a blue circle moving up" --seed 0,1 --sampler causal_few_step --out runs/embedded.zarr
store_b = "runs/embedded.zarr"
layer = None  # None: the first layer both stores hold
sample = None  # None: every sample pair (same prompt and seed, else same prompt); or a sample id of store B
tolerance = 20.0  # largest |t_A - t_B| of a matched step

# %%
import numpy as np

from studies import compare, figures, load_store, metrics

figures.use_notebook_renderer()  # figures that JupyterLab and `jupyter nbconvert --to html` both draw
a, b = load_store(store_a), load_store(store_b)
if sample is not None:
    b = metrics.select(b, sample=sample)
c = compare.compare_stores(a, b, tolerance=tolerance, name_a="A", name_b="B")
layer = int(c.metrics_a.layer.values[0]) if layer is None else layer
for note in [compare.unpaired(c), *c.notes]:  # samples in no pair, lengths or layers that differ
    if note:
        print(f"note: {note}")
c.pairs

# %% [markdown]
# ## Matched steps and the invariants relied on

# %%
assert (c.steps.abs_dt <= tolerance).all(), "a matched step is outside the tolerance"
assert len(c.pairs) >= 1 and all(
    str(a["prompt"].sel(sample=sa).values) == str(b["prompt"].sel(sample=sb).values)
    and (c.pair_by == "prompt" or int(a["seed"].sel(sample=sa)) == int(b["seed"].sel(sample=sb)))
    for sa, sb in zip(c.pairs.sample_a, c.pairs.sample_b)
), "paired samples must share the prompt (and the seed, unless the stores were made with different seeds)"
js = c.js_bits.values
assert np.nanmin(js) >= -1e-9 and np.nanmax(js) <= 1 + 1e-9, "JS divergence in bits lies in [0, 1]"
c.steps

# %%
from IPython.display import display

display(c.unmatched_a)  # steps of A with no step of B at the same timestep (within the tolerance): not compared
display(c.unmatched_b)  # and of B with none in A

# %% [markdown]
# ## Heads ranked by change

# %%
ranking = compare.rank_heads(c)
ranking.head(12).round(4)

# %%
over = compare.over_steps_words(c)  # (the denoising steps: a context pass is another kind of forward)
figures.layer_head_map(compare.over_steps(c, c.js_bits), zmin=0, title=f"JS divergence (bits), {over}")

# %% [markdown]
# ## Metrics side by side (means over the matched denoising steps, as in the ranking; `.sel(match=m)` for one step
# pair)

# %%
mean_a, mean_b = (compare.over_steps(c, m, keep_attrs=True) for m in (c.metrics_a, c.metrics_b))
figures.compare_maps(mean_a.sink_mass, mean_b.sink_mass, title=f"mass on frame 0 · {over}")

# %%
figures.compare_maps(mean_a.local_mass, mean_b.local_mass,
                     title=f"{mean_a.local_mass.attrs['long_name']} · {over}")

# %%
figures.compare_maps(mean_a.mean_abs_distance, mean_b.mean_abs_distance,
                     title="how far a head looks: mass-weighted mean |query_frame - key_frame| (frames)")

# %%
class_a, class_b = compare.mean_classes(c)  # (the ranking's classes)
figures.taxonomy_map(class_a, title=f"head classes · A · {over}")

# %%
figures.taxonomy_map(class_b, title=f"head classes · B · {over}")

# %% [markdown]
# ## The most changed head of the chosen layer, in both stores
#
# A on the left, B on the right, on one colour scale; each averaged over its paired samples at the first matched step.

# %%
top = ranking[ranking.layer == layer].iloc[0]
paired_a = a.sel(sample=list(dict.fromkeys(c.pairs.sample_a)))
paired_b = b.sel(sample=list(dict.fromkeys(c.pairs.sample_b)))
figures.head_pair(paired_a, paired_b, layer, int(top["head"]), step_a=int(c.steps.step_a[0]),
                  step_b=int(c.steps.step_b[0]), names=(f"A ({store_a})", f"B ({store_b})"))
