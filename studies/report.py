"""Self-contained HTML reports of one store or of a comparison (plotly.js inlined: they open offline).

    build_report(store, "report.html")               what one store holds: checks, head metrics, taxonomy,
                                                     per-layer head grids, last-chunk bars, step slider, recency
    build_compare_report(store_a, store_b, "c.html") matched steps, metric maps A / B / B - A, JS divergence,
                                                     heads ranked by change, the top heads' heatmaps side by side

Each figure is a `<div id="fig-...">` plus a `<script type="application/json" id="fig-...-json">` holding the
plotly figure (data, layout, frames) that a few lines of JS hand to `Plotly.newPlot`; tests and scripts can read
a report's numbers back from that JSON. Files are written atomically (temp file, then rename).
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from studies import compare as compare_mod
from studies import figures, metrics, no_window_words, unfinished_note
from studies.page import TABLE_ROWS, Page, html_out, write_atomic
from workbench.errors import WorkbenchError
from workbench.store import chunk_sizes, image_of, named

MAX_DETAIL_LAYERS = 8  # per-layer sections when no layer is named: evenly spaced, first and last included
OVERVIEW_METRICS = ("sink_mass", "own_chunk_mass", "local_mass", "early_mass", "mean_distance", "entropy_norm")

def _open(store) -> tuple[xr.Dataset, str]:
    if isinstance(store, xr.Dataset):
        return store, str(store.encoding.get("source", "in-memory store"))
    from studies import load_store

    return load_store(store), str(store)


def _detail_layers(ds: xr.Dataset, layers) -> list[int]:
    have = [int(x) for x in ds.layer.values]
    if isinstance(layers, str) and layers == "all":
        return have
    if isinstance(layers, str) and layers.strip().isdigit():  # (a layer as text: "3")
        layers = int(layers)
    if layers is not None:
        layers = [layers] if np.isscalar(layers) else list(layers)
        bad = [x for x in layers if x not in have]
        if bad:
            raise WorkbenchError(f"layer {bad[0]} is not in the store; it has layers {have}")
        return list(dict.fromkeys(int(x) for x in layers))  # (a layer named twice is shown once)
    if len(have) <= MAX_DETAIL_LAYERS:
        return have
    idx = np.unique(np.linspace(0, len(have) - 1, MAX_DETAIL_LAYERS).round().astype(int))
    return [have[i] for i in idx]


def model_facts(ds: xr.Dataset) -> dict[str, str]:
    """What names the model a store holds (its samples carry one): family, sampler, checkpoint, which entry of it
    ran (EMA or not), the checkpoint file's sha256 (first 12 hex; the same for its EMA and non-EMA entries), the
    rollout's length and video size and the attention window. A probe
    store's checkpoint and sha256 are the training's start; one train step of it (`ds.sel(train_step=N)`) is named
    by that step."""
    first = ds.isel(sample=0)
    model = (ds.attrs.get("fingerprint_fields") or {}).get("model", {})
    sha = str(first["checkpoint_sha256"].values) if "checkpoint_sha256" in ds.coords else model.get("weights", "?")
    text = str(model.get("text_encoder", "?"))
    family = str(first["model_family"].values) if "model_family" in ds.coords else "?"
    training = "train_step" in ds.dims  # (a probe store: the generator as it was trained, at each train step)
    at_step = int(ds["train_step"]) if "train_step" in ds.coords and ds["train_step"].ndim == 0 else None
    start = ("training started from " if training else
             f"train step {at_step} of the training that started from " if at_step is not None else "")
    return {
        "model folder (--wan-dir)": _model_folder(ds),
        "model family": family,
        "sampler": str(first["sampler"].values) if "sampler" in ds.coords else "?",
        "checkpoint": start + str(first["checkpoint"].values) if "checkpoint" in ds.coords else "?",
        "weights entry": _weights_entry(model, training, at_step, family),
        "checkpoint file sha256": sha[:12] + ("..." if len(sha) > 12 else "")
                                  + (" (training's start)" if start else ""),
        "latent frames": str(ds.sizes["query_frame"]) if "query_frame" in ds.dims else "?",
        "video size (height x width)": "?" if (size := pixel_size(ds)) is None else f"{size[0]} x {size[1]} pixels",
        "text encoder sha256 (weights, tokenizer, text_len)": text[:12] + ("..." if len(text) > 12 else ""),
        "KV cache": _cache_words(ds, first),
        **({"image (image-to-video: frame 0, its context pass only)": f"{image[0]} (sha256 {image[1][:12]}...)"}
           if (image := image_of(ds.attrs)) else {}),
    }


def pixel_size(ds: xr.Dataset) -> tuple[int, int] | None:
    """(height, width) in pixels of the store's rollout, from its latent frame size (None if unrecorded)."""
    from models.wan.config import VAE_STRIDE as SPATIAL_STRIDE

    grid = compare_mod.latent_grid(ds)
    return None if grid is None else (SPATIAL_STRIDE * grid[0], SPATIAL_STRIDE * grid[1])


def _cache_words(ds: xr.Dataset, first) -> str:
    """The attention window in words: "no KV window (every earlier frame attended)" (a causal model without one;
    the bidirectional: every frame), else "window W latent frames, S sink frames" ("-1 / 0" read alike for both)."""
    if "local_attn_size" not in ds.coords:
        return "?"
    size, sink = int(first["local_attn_size"]), int(first["sink_size"])
    if size < 0:
        bidirectional = "sampler" in ds.coords and str(first["sampler"].values) == "bidirectional"
        return no_window_words(bidirectional)
    return f"window {size} latent frames, {sink} sink frames"


def _weights_entry(model: dict, training: bool, at_step: int | None, family: str) -> str:
    """Which state dict ran, from the store's fingerprint fields and model family (a checkpoint ran: self_forcing;
    a Wan folder's own DiT: wan); a probe store: the generator as it was being trained."""
    if training:
        return "the generator being trained, at each train step"
    if at_step is not None:
        return f"the generator being trained, at train step {at_step}"
    if not model:
        return "?"
    if model.get("key") == "ema":
        return "generator_ema (EMA)"
    return {"self_forcing": "generator", "wan": "the folder's own DiT"}.get(family, "generator, or the folder's own DiT")


def _model_folder(ds: xr.Dataset) -> str:
    """The model folder (--wan-dir) of the run that made the store, from its `config_yaml` attr (`extract:` or
    another command's section): the embedded default's when it names none, '?' when the store records none."""
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.create(ds.attrs["config_yaml"]))
    except Exception:  # noqa: BLE001 - a store of another tool's making: nothing to show
        return "?"
    if "model_root" in config:  # a training run's: model_root / model_kwargs.model_name
        return f"{config['model_root']}/{(config.get('model_kwargs') or {}).get('model_name', '?')}"
    section = next((v for v in config.values() if isinstance(v, dict) and "wan_dir" in v), None)
    return "?" if section is None else str(section["wan_dir"] or "the embedded default (data/embedded)")


def _store_summary(page: Page, ds: xr.Dataset, source: str, sample: str | None = None):
    facts = {
        "store": source,
        "created": ds.attrs.get("created_utc", "?"),
        **model_facts(ds),
        "frames / frames per chunk": f"{ds.sizes['query_frame']} / " + (
            str(chunk_sizes(ds["query_chunk"].values)) if "query_chunk" in ds.coords
            else str(ds.attrs.get("num_frame_per_block", "?"))),
        "layers captured (of num_layers)": f"{[int(x) for x in ds.layer.values]} (of {ds.attrs.get('num_layers', '?')})",
        "heads captured (of num_heads)": f"{ds.sizes['head']} (of {ds.attrs.get('num_heads', '?')})",
        "statistics": ", ".join(ds.attrs.get("stats", list(ds.data_vars))),
        "computed with (dtype, attention kernel, capture mode)": _computed_with(ds.attrs),
        "git commit / workbench": f"{ds.attrs.get('git_commit', '?')} / {ds.attrs.get('workbench_version', '?')}",
    }
    page.table(pd.DataFrame({"": list(facts.values())}, index=list(facts)), index=True)
    page.h("Samples")  # (a heading of the level after the page's h1: a screen reader's outline has no gap)
    samples = pd.DataFrame({
        "sample": [str(s) for s in ds.sample.values],
        "prompt": [str(p) for p in ds["prompt"].values],
        "seed": [int(s) for s in ds["seed"].values],
    })
    if sample is not None:  # (--sample: the report's maps and metrics read that one)
        samples["in this report"] = ["yes" if s == sample else "" for s in samples["sample"]]
    page.table(samples, index=False)
    page.h("Steps")
    page.table(steps_table(ds), index=False)


def _computed_with(attrs: dict) -> str:
    """'bfloat16, gluon, fused' (docs/store.md: dtype, attn_backend, capture_mode), with the call shapes a kernel
    refused at run time when there were any (attr attn_refused)."""
    words = ", ".join(str(attrs.get(k, "?")) for k in ("dtype", "attn_backend", "capture_mode"))
    refused = attrs.get("attn_refused") or []
    return words + (f"; {len(refused)} call shape(s) refused by a kernel at run time ran the next kernel of the "
                    f"order (attr attn_refused): {refused[0]}{' ...' if len(refused) > 1 else ''}" if refused else "")


def steps_table(ds: xr.Dataset) -> pd.DataFrame:
    """step, timestep, phase, cfg, denoise_index of a store."""
    cols = {"step": [int(s) for s in ds.step.values]}
    for name in ("timestep", "phase", "cfg", "denoise_index"):
        if name in ds.coords:
            cols[name] = [v.item() if hasattr(v, "item") else str(v) for v in ds[name].values]
    return pd.DataFrame(cols)


def checks_table(ds: xr.Dataset) -> pd.DataFrame:
    """The store invariants of docs/store.md, each with its value and whether it holds."""
    err = metrics.row_sum_error(ds)
    mism = metrics.nan_pattern_mismatches(ds)
    rows = [
        {"check": "attn_mass rows sum to 1 (max |sum - 1|)", "value": f"{err:.2e}", "holds": err < 1e-3},
        {"check": "NaN exactly outside the expected key window (entries that differ)", "value": str(mism),
         "holds": mism == 0},
    ]
    if "attn_logit" in ds:
        same = metrics.logit_nan_matches_mass(ds)
        rows.append({"check": "attn_logit NaN exactly where attn_mass is NaN", "value": str(same), "holds": same})
    else:  # not a check that passed: there is nothing to check
        rows.append({"check": "attn_logit NaN exactly where attn_mass is NaN", "value": "no attn_logit in the store",
                     "holds": "n/a"})
    return pd.DataFrame(rows)


def _head_table(hm: xr.Dataset, classes: xr.DataArray) -> pd.DataFrame:
    df = hm.drop_vars([c for c in hm.coords if c not in ("layer", "head")]).to_dataframe(dim_order=["layer", "head"])
    df["class"] = classes.transpose("layer", "head").to_series()
    return df


# ------------------------------------------------------------------------------------------------ reports
def build_report(
    store,
    out_html: str | Path,
    *,
    layer: int | list[int] | str | None = None,
    sample: str | None = None,
    step: int | None = None,
    query_frames=None,
    thresholds: metrics.TaxonomyThresholds | None = None,
    video: str | Path | None = None,
) -> Path:
    """Write an HTML report of one store (a path or an opened Dataset) to `out_html`; returns the path.

    `layer`: the layer(s) that get a detailed section, or "all" (default: every captured layer, at most 8 evenly
    spaced);
    `sample`: one sample id (default: the mean over samples); `step`: the step of the overview maps and head grids
    (default: the first captured denoising step: step 0, t = 1000, the researchers' choice, when it was captured);
    `query_frames`: the rows the head metrics average over (default "last_chunk", `metrics.query_frames_for`);
    `video`: the sample's mp4 (or a folder of `workbench generate` outputs) whose frames go under the key-token
    maps (default: found beside the store as `workbench view` finds it)."""
    out_html = html_out(out_html)
    ds, source = _open(store)
    from studies.effects_report import build_effects_report, is_effects_store

    if is_effects_store(ds):  # `workbench intervene`'s store: its own page
        given = [f"--{name}" for name, value in (("layer", layer), ("sample", sample), ("step", step),
                                                 ("query-frames", query_frames), ("video", video))
                 if value is not None]
        if given:
            raise WorkbenchError(f"{', '.join(given)}: an effects store's report (workbench intervene) shows every "
                                 "entry's effect over all its samples and frames and takes none of these; they are "
                                 "for attention stores")
        return build_effects_report(ds if not isinstance(store, (str, Path)) else store, out_html)
    step = metrics.default_step(ds) if step is None and "step" in ds.dims else step
    query_frames = "last_chunk" if query_frames is None else query_frames
    if "train_step" in ds.dims:
        if video is not None:
            raise WorkbenchError("--video: a training probe store's report draws no key-token maps to put frames under")
        return _training_report(ds, source, out_html, layer=layer, sample=sample, step=step,
                                query_frames=query_frames, thresholds=thresholds)
    detail = _detail_layers(ds, layer)
    held = [int(t) for t in ds.token_layer.values] if "attn_key_token" in ds else []
    if video is not None and not set(held) & set(detail):  # (it would be read for nothing, and said nothing)
        why = (f"its key-token layers {held} are not among the layers shown ({detail}): add --layer N" if held else
               "the store has no attn_key_token (extract with --stats ...,attn_key_token --token-layers N)")
        raise WorkbenchError(f"--video puts each key frame's picture under its key-token map, and {why}")
    metrics.select(ds, sample=sample, step=step)  # fail early on a bad sample or step
    hm = metrics.head_metrics(metrics.select(ds, step=step), query_frames=query_frames, sample=sample)
    classes = metrics.classify_heads(hm, thresholds)
    frames = hm.attrs["query_frames"]

    page = Page(f"Attention report: {named(source).name}")
    page.p(f"Made {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by <code>studies.report.build_report</code>. "
           "Metrics are defined in <code>studies/metrics.py</code>; the store layout in <code>docs/store.md</code>.")
    if note := unfinished_note(ds.attrs):
        page.p(f"<b>Unfinished:</b> {html.escape(note)}")
    _store_summary(page, ds, source, sample)
    page.h("Checks")
    page.table(checks_table(ds), index=False)

    page.h(f"Overview at {metrics.step_label(ds, step)}")
    page.p(f"Head metrics averaged over {metrics.span_text('query frame', frames[0], frames[-1])} ({query_frames}) "
           "and "
           f"{'sample ' + html.escape(sample) if sample else 'all samples'}, at this one step (the summary "
           "<code>workbench extract</code> prints averages every denoising step and "
           f"{'the query frames after chunk 0' if metrics.num_chunks(ds) > 1 else 'every query frame'}, so its "
           "numbers differ; <code>--step N</code> and <code>--query-frames history</code> choose others "
           "here). Classes: sink (mass on frame 0 &ge; "
           "threshold and "
           f"above uniform attention's share), local (mass on keys less than {metrics.default_local_window(ds)} "
           "frame(s) from the query, of rows that attended keys farther), deep_sink (mass on the "
           "oldest half of the attended frames), global (normalised entropy high), mixed (none; no_values: no "
           "row of the head holds a number, attention that was not finite); the first that "
           "holds. Thresholds: "
           + ", ".join(f"{k}={v}" for k, v in classes.attrs.items() if k.endswith(("_min", "_entropy"))) + ".")
    one_chunk = metrics.num_chunks(ds) == 1
    if one_chunk:
        bidirectional = "sampler" in ds.coords and "bidirectional" in set(map(str, ds["sampler"].values))
        how = ("every frame denoised together, as the bidirectional sampler does" if bidirectional else
               f"a video of {ds.sizes['key_frame']} frame(s), as short as a chunk")
        page.p(f"One chunk ({how}): own_chunk_mass and sink_chunk_mass are 1 by definition and not drawn.")
    at = hm.sel(step=step)
    page.figure(figures.taxonomy_map(classes.sel(step=step), title=f"head classes · {metrics.step_label(ds, step)}"),
                "fig-taxonomy")
    empty = [name for name in OVERVIEW_METRICS if name in at and not bool(at[name].notnull().any())
             and not (one_chunk and name in ("own_chunk_mass", "sink_chunk_mass"))]
    if empty:  # (a map of nothing is left out: say which, and why)
        why = {"local_mass": f"no row attended a key {metrics.default_local_window(ds)} or more frames away",
               "entropy_norm": "every row attended one key frame"}
        if not bool(at["sink_mass"].notnull().any()):  # (no row holds a number: the checks above fail on them)
            why = dict.fromkeys(empty, "every row of attn_mass is NaN: the attention was not finite")
        page.p("Not drawn, having no value at this step for these query frames: "
               + "; ".join(f"{name} ({why.get(name, 'no attended rows')})" for name in empty) + ".")
    for name in OVERVIEW_METRICS:
        if one_chunk and name in ("own_chunk_mass", "sink_chunk_mass"):
            continue
        if name in at and bool(at[name].notnull().any()):
            zmax = 1.0 if at[name].attrs.get("units") in figures.UNIT_INTERVAL else None
            page.figure(figures.layer_head_map(at[name], zmin=0 if zmax else None, zmax=zmax,
                                               title=f"{name}: {at[name].attrs.get('long_name', '')}"),
                        f"fig-overview-{name}")
    page.h("Head metrics and classes", 3)
    heads_table = _head_table(at, classes.sel(step=step))
    page.table(heads_table, shown=TABLE_ROWS)
    # the same table as CSV beside the page, for a paper or a spreadsheet (units: the long names above and
    # docs/store.md; probabilities, frames, nats)
    # (written after the page: a failed report leaves neither); each row says what it averages, as the page does
    csv_text = heads_table.assign(step=step, query_frames=f"{frames[0]}-{frames[-1]}",
                                  samples=sample or "all").to_csv(float_format="%.6g")
    page.p(f"The table as CSV: <code>{html.escape(Path(out_html).with_suffix('.csv').name)}</code> (step {step}, "
           f"{metrics.span_text('query frame', frames[0], frames[-1])}, "
           f"{'sample ' + html.escape(sample) if sample else 'all samples'}).")

    # the slider leaves out CFG's uncond forwards (half of a Wan store's steps, and the bulk of the HTML)
    slider_steps = [int(s) for s, c in zip(ds.step.values, ds["cfg"].values) if str(c) != "uncond" or int(s) == step] \
        if "cfg" in ds.coords else None
    # cross-attention over the prompt's tokens: the samples of one prompt (token labels differ between prompts); a
    # CFG uncond step of a store made before its negative prompt's tokens were recorded has no labels to show
    cross = "cross_mass" in ds and not ("uncond_token" not in ds.coords and "cfg" in ds.coords
                                        and str(ds["cfg"].sel(step=step).values) == "uncond")
    prompts = sorted(set(map(str, ds["prompt"].values)))
    if cross and sample is None and len(prompts) > 1:
        page.p(html.escape(f"The cross-attention figures show the samples of the first prompt, "
                           f"{str(ds['prompt'].values[0])!r}, of the store's {len(prompts)}: --sample ID shows "
                           "another."))
    for lay in detail:
        page.h(f"Layer {lay}")
        # the per-head heatmaps once: the slider opens at `step` and moves through the others
        page.figure(figures.step_slider(ds, lay, sample=sample, steps=slider_steps, start=step), f"fig-steps-layer{lay}")
        page.figure(figures.last_chunk_bars(ds, lay, step=step, sample=sample), f"fig-bars-layer{lay}")
        prof = metrics.recency_profile(metrics.select(ds, sample=sample, layer=lay, step=step))
        prof = prof.mean("sample", skipna=True).isel(layer=0, step=0)
        title = f"recency profile · layer {lay} · {metrics.step_label(ds, step)} · every query frame"
        page.figure(figures.recency_lines(prof, title=title),
                    f"fig-recency-layer{lay}")
        if "attn_frame_entropy" in ds:  # (per query token, then averaged: not the entropy of attn_mass's rows)
            rows = metrics.select(ds, sample=sample, layer=lay, step=step)["attn_frame_entropy"]
            rows = rows.mean("sample", skipna=True).isel(layer=0, step=0)
            page.figure(figures.metric_by_query_frame(rows, title=(
                f"attn_frame_entropy · layer {lay} · {metrics.step_label(ds, step)}<br><sup>each query token's "
                "entropy over key frames, averaged over the frame's tokens (nat; ln n for uniform over n frames)"
                "</sup>")), f"fig-entropy-layer{lay}")
        if cross:
            page.figure(figures.cross_tokens(ds, lay, step=step, sample=sample), f"fig-cross-layer{lay}")
    token_layers, others = [t for t in held if t in detail], [t for t in held if t not in detail]
    if token_layers:  # (the token layers among the detailed ones: --layer picks them too)
        last = int(ds.query_frame.values[-1])
        pictures, where = key_frame_pictures(ds, source, sample, video)
        page.h("Inside the key frames")
        page.p("Where the last query frame's attention lands inside each key frame it attends (attn_key_token, "
               "mean over heads): each image is that frame's share of it, so that frames of little mass show their "
               "pattern too; their masses are in the titles. <code>studies.figures.key_token_maps</code> draws the "
               "masses themselves, one head, or another query frame. " + where)
        for tl in token_layers:
            tokens = metrics.select(ds, sample=sample, step=step)["attn_key_token"].sel(token_layer=tl,
                                                                                       query_frame=last)
            if not bool(tokens.notnull().any()):
                page.p(f"Token layer {tl}: not drawn, every value of attn_key_token for query frame {last} is NaN "
                       "(the attention was not finite: the rollout's activations overflowed).")
                continue
            page.figure(figures.key_token_maps(ds, tl, query_frame=last, step=step, sample=sample, within_frame=True,
                                               frames=pictures), f"fig-key-tokens-layer{tl}")
    if others:
        page.p(f"The store also holds key-token maps (attn_key_token) of layers {others}, not detailed here: "
               "--layer N draws them.")
    if len(detail) < ds.sizes["layer"]:
        page.p(f"Detailed sections for layers {detail} of {ds.sizes['layer']}; pass --layer N to choose others.")
    drawn = {"attn_mass", "attn_key_token", "attn_frame_entropy", *(["cross_mass"] if cross else [])}
    if rest := [str(v) for v in ds.data_vars if str(v) not in drawn]:  # (a plugin's statistic: said, not dropped)
        page.p(html.escape("Also in the store, not drawn here: " + ", ".join(
            f"{v} ({ds[v].attrs.get('long_name', 'no long_name')}, {ds[v].attrs.get('units', 'no unit')})"
            for v in rest) + "; studies.figures draws those over query and key frames (head_grid(ds, layer, "
            "var=NAME): the researchers' logit grid with attn_logit); any opens with xarray (xr.open_zarr(STORE, "
            "consolidated=False))."))
    written = write_atomic(page.render(), out_html)
    from models.files import atomic_write_text

    atomic_write_text(Path(out_html).with_suffix(".csv"), csv_text)
    return written


def key_frame_pictures(ds: xr.Dataset, source: str, sample: str | None, video=None) -> tuple[np.ndarray | None, str]:
    """One picture per latent frame of a sample's video (uint8 [key_frame, H, W, 3]: the last of the pixel frames
    the VAE decodes from it) for the key-token maps, and a sentence for the page saying where they come from, or
    why there are none and how to get them. The video is found as `workbench view` finds it (workbench/view/
    sources.py: `video`, else STORE.mp4 or pPPPP-sS.mp4 beside the store or in the folder named like it) and
    checked against the store's run; a named `video` that does not fit is an error, a found one a sentence."""
    from models.video import mp4_available
    from workbench.view.sources import (find_videos, generate_command, pixel_span, read_video, video_mismatch,
                                        videos_folder)

    ids = [str(s) for s in ds["sample"].values]
    if sample is None and len(ids) > 1:
        if video is not None:
            raise WorkbenchError(f"--video: the maps are a mean over the store's {len(ids)} samples; name the "
                                 "video's sample with --sample")
        return None, "(--sample ID draws one sample's maps over the frames of its video.)"
    chosen = sample or ids[0]
    store = named(source)
    if video is None and not (store / "zarr.json").is_file():  # (an in-memory Dataset: nothing to look beside)
        return None, ""
    i = ids.index(chosen)
    out = videos_folder(store)  # (a store named without .zarr: beside it)
    make = f"`{generate_command(ds, i, out)}`"
    found = find_videos(store, None if video is None else str(video), ids, chosen).get(chosen)
    if found is None:
        if video is not None:  # (a folder without this sample's video)
            raise WorkbenchError(f"--video {str(video)!r} holds no {chosen}.mp4, the video of sample {chosen}")
        return None, f"(To see each key frame's picture under its map, make the sample's video: {make}.)"
    redo = f"make this sample's with {make[:-1]} --overwrite`" if found.parent == out else f"make it with {make}"
    if why := video_mismatch(ds, chosen, found):
        if video is not None:
            raise WorkbenchError(why)
        return None, f"(The video found, {found}, is not this store's sample: {why.split(': ', 1)[-1]}; {redo}.)"
    if not mp4_available():
        return None, ("(Reading the sample's video needs the video extra (ffmpeg): pip install -e '.[video]'; "
                      "`workbench generate` writes mp4 files with it too.)")
    F = ds.sizes["key_frame"]
    try:
        frames, _ = read_video(found, pixel_span(F - 1)[1])  # [T, H, W, 3], T = 1 + 4 (F - 1)
    except WorkbenchError as err:
        if video is not None:
            raise
        return None, f"({err}; {redo}.)"
    size = pixel_size(ds)  # (H, W)
    if size is not None and tuple(frames.shape[1:3]) != size:
        why = (f"{found} is {frames.shape[2]} x {frames.shape[1]} pixels, the store's rollout {size[1]} x {size[0]}: "
               "another run's video")
        if video is not None:
            raise WorkbenchError(why)
        return None, f"({why}.)"
    pictures = frames[[pixel_span(f)[1] - 1 for f in range(F)]]
    checked = found.with_suffix(".safetensors").is_file()
    return pictures, (f"Under each map, the key frame's picture: the last of its pixel frames in {found} (sample "
                      f"{chosen}" + ("" if checked else f"; not checked against the store's run: no "
                                     f"{found.with_suffix('.safetensors').name} beside it, as `workbench generate` "
                                     "writes") + ").")


def _training_report(ds: xr.Dataset, source: str, out_html, *, layer, sample, step, query_frames,
                     thresholds) -> Path:
    """The report of a training probe store (dims train_step, sample, ...): how each head's attention moved as
    training went on, at one step of the rollout."""
    detail = _detail_layers(ds, layer)
    metrics.select(ds, sample=sample, step=step)  # fail early on a bad sample or step
    hm = metrics.head_metrics(metrics.select(ds, step=step), query_frames=query_frames, sample=sample)
    hm = hm.sel(step=step)  # (train_step, layer, head)
    train_steps = [int(t) for t in ds.train_step.values]
    last = train_steps[-1]
    classes = metrics.classify_heads(hm, thresholds)
    frames = hm.attrs["query_frames"]

    page = Page(f"Attention report: {named(source).name} (training probes)")
    page.p(f"Made {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by <code>studies.report.build_report</code>. A training "
           "probe store: the probe set's attention, captured every few training steps along <code>train_step</code> "
           "(<code>docs/store.md</code>, Training probe stores).")
    _store_summary(page, ds, source, sample)
    how = (html.escape(f" ({ds.attrs['trainer']} training, loss {ds.attrs['loss']})")  # (a shared store's attrs)
           if {"trainer", "loss"} <= set(ds.attrs) else "")
    page.p(f"Train steps: {', '.join(str(t) for t in train_steps)}{how}.")
    page.h("Checks")
    page.table(checks_table(ds), index=False)

    page.h(f"Attention across training at {metrics.step_label(ds, step)}")
    page.p(f"Head metrics averaged over {metrics.span_text('query frame', frames[0], frames[-1])} ({query_frames}) "
           "and "
           f"{'sample ' + html.escape(sample) if sample else 'all samples'}, at each train step; a panel per layer, "
           "a line per head.")
    for name in ("sink_mass", "own_chunk_mass", "local_mass", "mean_distance", "entropy_norm"):
        if bool(hm[name].notnull().any()):
            page.figure(figures.metric_over_training(hm[name].sel(layer=detail)), f"fig-training-{name}")
    page.h(f"Head classes at train step {last}", 3)
    page.figure(figures.taxonomy_map(classes.sel(train_step=last), title=f"head classes · train step {last} · "
                                     f"{metrics.step_label(ds, step)}"), "fig-taxonomy")
    page.table(_head_table(hm.sel(train_step=last), classes.sel(train_step=last)), shown=TABLE_ROWS)
    # every train step's table as CSV beside the page (an attention store's report writes its one step's)
    csv_text = pd.concat([_head_table(hm.sel(train_step=t), classes.sel(train_step=t)).assign(train_step=t)
                          for t in train_steps]).assign(step=step, query_frames=f"{frames[0]}-{frames[-1]}",
                                                        samples=sample or "all").to_csv(float_format="%.6g")
    page.p(f"The table at every train step as CSV: <code>{html.escape(Path(out_html).with_suffix('.csv').name)}"
           f"</code> (step {step}, {metrics.span_text('query frame', frames[0], frames[-1])}, "
           f"{'sample ' + html.escape(sample) if sample else 'all samples'}).")
    for lay in detail:
        page.h(f"Layer {lay}")
        page.figure(figures.train_step_slider(ds, lay, step=step, sample=sample), f"fig-train-steps-layer{lay}")
    if len(detail) < ds.sizes["layer"]:
        page.p(f"Detailed sections for layers {detail} of {ds.sizes['layer']}; pass --layer N to choose others.")
    path = write_atomic(page.render(), out_html)
    write_atomic(csv_text, Path(out_html).with_suffix(".csv"))  # (after the page: a failed report leaves neither)
    return path


def compare_summary(c, ranking, name_a: str, name_b: str, rows: int = 5, stores=None) -> str:
    """A few lines for the terminal: the models (`stores`: the two stores, when given), the matched samples and
    steps, then the `rows` heads whose attention over key frames moved most (JS divergence in bits, mean over
    matched steps) with each side's head class (of its metrics averaged over the matched steps)."""
    lines = [f"{side} = {name.removeprefix(side + ': ')}: {_model_line(ds)}"
             for side, name, ds in zip("AB", (name_a, name_b), stores or ())]
    who = "" if stores else f"A = {name_a.removeprefix('A: ')}, B = {name_b.removeprefix('B: ')}: "
    unpaired = compare_mod.unpaired(c)
    lines += [f"{who}{len(c.pairs)} sample pair(s) paired by {'prompt and seed' if c.pair_by == 'seed' else 'prompt'}"
              + (f" (not compared: {unpaired})" if unpaired else "")
              + f", {c.js_bits.sizes['match']} matched step(s), query frames {c.query_frames}",
              *[f"note: {n}" for n in c.notes],
              "heads whose attention over key frames changed most (Jensen-Shannon, bits; 0 = same, 1 = disjoint; "
              f"{compare_mod.over_steps_words(c, short=False)}, the classes too):",
              f"{'layer':>6}{'head':>6}{'js_bits':>9}  class A -> class B"]
    for _, row in ranking.head(rows).iterrows():
        lines.append(f"{int(row['layer']):>6}{int(row['head']):>6}{row['js_bits']:>9.3f}  "
                     f"{row['class_a']} -> {row['class_b']}")
    median = float(ranking["js_bits"].median())
    lines.append(f"median over the {len(ranking)} heads: {median:.3f} bits")
    return "\n".join(lines)


def _model_line(ds: xr.Dataset) -> str:
    f = model_facts(ds)
    cache = "" if f["KV cache"] == "?" else f", {f['KV cache']}"
    size = "" if (s := f["video size (height x width)"]) == "?" else f" of {s}"
    return (f"{f['checkpoint']} ({f['weights entry']}, sha256 {f['checkpoint file sha256']}), {f['model family']}, "
            f"{f['sampler']}, {f['latent frames']} latent frames{size}{cache}")


def _train_steps(sides, steps: list[int]) -> list[tuple[xr.Dataset, str]]:
    """Each (store, name, source) of a comparison with its train step selected when it is a training probe store
    (`steps`: one for every probe store, or A's and B's), the name saying which; a WorkbenchError when a probe
    store has no step or a step names no probe store's."""
    probes = ["train_step" in ds.dims for ds, _, _ in sides]
    if len(steps) > 2:
        raise WorkbenchError(f"--train-step given {len(steps)} times: give it once (every probe store) or twice "
                             "(A's, then B's)")
    if steps and not any(probes):
        raise WorkbenchError(f"--train-step {steps[0]}: neither store is a training probe store (workbench train's "
                             "probes.zarr, with a train_step dim)")
    per_side = [steps[0] if p else None for p in probes] if len(steps) == 1 else steps or [None, None]
    out = []
    for side, (ds, name, src), probe, step in zip("AB", sides, probes, per_side):
        have = [int(s) for s in ds["train_step"].values] if probe else []
        if probe and step is None:
            raise WorkbenchError(f"{side} ({src}) is a training probe store (train steps {have}): choose one with "
                                 "--train-step N (twice for A and B, e.g. --train-step 0 --train-step 500)")
        if step is not None and not probe:
            raise WorkbenchError(f"--train-step {step} for {side}: {src} is not a training probe store")
        if step is not None and step not in have:
            raise WorkbenchError(f"--train-step {step}: {side} ({src}) holds train steps {have}")
        out.append((ds, name) if step is None else (ds.sel(train_step=step), f"{name} (train step {step})"))
    return out


def _distinct_names(src_a: str, src_b: str) -> tuple[str, str]:
    """Short names of two stores that tell them apart: their folder names, with as many parent folders as it takes
    (runs/a/dmd.zarr, runs/b/dmd.zarr -> a/dmd.zarr, b/dmd.zarr); the same store twice: A: NAME and B: NAME."""
    pa, pb = Path(src_a).resolve().parts, Path(src_b).resolve().parts
    if pa == pb:
        return f"A: {pa[-1]}", f"B: {pb[-1]}"
    k = 1
    while pa[-k:] == pb[-k:] and k < min(len(pa), len(pb)):
        k += 1
    return str(Path(*pa[-k:])), str(Path(*pb[-k:]))


def build_compare_report(
    store_a,
    store_b,
    out_html: str | Path,
    *,
    tolerance: float = 20.0,
    cfg: str = "cond",
    query_frames="last_chunk",
    layers=None,
    top: int = 4,
    thresholds: metrics.TaxonomyThresholds | None = None,
    pair_by: str = "auto",
    train_steps=(),
    log=None,
    csv: bool = True,
) -> Path:
    """Write an HTML comparison of two stores (paths or opened Datasets) to `out_html`; returns the path. `csv`: the
    ranked heads also as a CSV file beside it (the same name with .csv; js_bits in bits, d_METRIC = B - A in the
    metric's unit, class_a / class_b the head classes, label_a / label_b the sides' names as the page gives them,
    store_a / store_b the stores as they were named).
    Alignment and divergence as in `studies.compare.compare_stores`; `top` heads get side-by-side heatmaps.
    `train_steps`: the train step of each training probe store (one: for every probe store; two: A's, B's).
    `log` (e.g. print) also gets a short summary: what was matched and the most-changed heads."""
    if top < 0:
        raise WorkbenchError(f"top {top} must be 0 or more (the number of most-changed heads to draw)")
    out_html = html_out(out_html)
    a, src_a = _open(store_a)
    b, src_b = _open(store_b)
    name_a, name_b = _distinct_names(src_a, src_b)
    (a, name_a), (b, name_b) = _train_steps([(a, name_a, src_a), (b, name_b, src_b)], list(train_steps))
    c = compare_mod.compare_stores(a, b, tolerance=tolerance, cfg=cfg, query_frames=query_frames, layers=layers,
                                   thresholds=thresholds, name_a=name_a, name_b=name_b, pair_by=pair_by)
    ranking = compare_mod.rank_heads(c)
    if log is not None:
        log(compare_summary(c, ranking, name_a, name_b, stores=(a, b)))

    page = Page(f"Comparison: {name_a} vs {name_b}")
    page.p(f"A = <code>{html.escape(src_a)}</code>, B = <code>{html.escape(src_b)}</code>. Differences are B - A. "
           "Jensen-Shannon divergence between the key-frame distributions of each query row, in bits (0 = same, "
           f"1 = disjoint), averaged over sample pairs and query frames {c.query_frames}.")
    page.h("Models")
    page.table(pd.DataFrame({f"A: {name_a.removeprefix('A: ')}": model_facts(a),
                             f"B: {name_b.removeprefix('B: ')}": model_facts(b)}))
    page.h("Matched samples")
    if c.pair_by == "prompt":
        page.p("The stores share no (prompt, seed), so every sample of A is paired with every sample of B of the same "
               "prompt: the divergences include the spread between seeds (comparing a store with itself with "
               "<code>--pair-by prompt</code> measures that spread).")
    elif (a.sizes["query_frame"] == b.sizes["query_frame"]
          and compare_mod.latent_grid(a) == compare_mod.latent_grid(b)):  # (else a note says what differs)
        page.p("Samples paired by prompt and seed: the two models started from the same noise.")
    for note in c.notes:
        page.p(html.escape(f"Note: {note}."))
    if unpaired := compare_mod.unpaired(c):
        page.p(html.escape(f"Not compared, in no pair: {unpaired}."))
    page.table(c.pairs, index=False)
    page.h("Matched steps")
    page.p(f"Steps of A and B paired one to one by the nearest timestep, same phase, within {tolerance:g} (CFG "
           f"branch '{cfg}'); the closest pairs are taken first and a step is in one pair at most, so a store "
           "with many steps near one timestep weighs it once.")
    page.table(c.steps)
    if len(c.unmatched_a) or len(c.unmatched_b):
        page.h("Unmatched steps", 3)
        page.table(pd.concat({name_a: c.unmatched_a, name_b: c.unmatched_b}, names=["store", "row"]))

    page.h("Heads ranked by change")
    one_chunk = [side for side, ds in (("A", a), ("B", b)) if metrics.num_chunks(ds) == 1]
    steps = len(compare_mod.averaged_matches(c))  # (the denoising ones: a context pass is left out of the means)
    over = (f" Each side's metrics and class are averaged over the "
            f"{compare_mod.over_steps_words(c, short=False).removeprefix('mean of ')}, where a store's own report "
            "reads one step (its first denoising step unless --step says): a head's class here can differ from the "
            "one its report gives." if steps > 1 else "")
    single = (f" {' and '.join(one_chunk)} is one chunk (the bidirectional sampler), whose last chunk is every "
              "frame: compared here on the other's last chunk only, its metrics and classes can differ from its own "
              "report's, which average over all its frames." if query_frames == "last_chunk" and len(one_chunk) == 1
              else "")
    page.p(f"Query frames compared: {c.query_frames}, the frames both stores select ({query_frames!r} of each, "
           "intersected)." + over + single)
    page.table(ranking, float_format="{:.4f}", shown=TABLE_ROWS)
    if csv:
        page.p(f"The whole table as CSV: <code>{html.escape(Path(out_html).with_suffix('.csv').name)}</code>.")
    # one colour scale for the mean and every step, so that the maps can be compared by eye
    finite = c.js_bits.values[np.isfinite(c.js_bits.values)]
    top_js = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    page.figure(figures.layer_head_map(compare_mod.over_steps(c, c.js_bits), zmin=0, zmax=top_js,
                                       title=f"Jensen-Shannon divergence (bits), {compare_mod.over_steps_words(c)}"),
                "fig-js")
    page.p(f"Per matched step, on the same colour scale (0 to {top_js:.3g} bits):")
    for m in range(len(c.steps)):
        page.figure(figures.layer_head_map(c.js_bits.sel(match=m), zmin=0, zmax=top_js,
                                           title=f"JS divergence (bits) · t_A="
                                                 f"{metrics.timestep_text(c.steps.timestep_a[m])} t_B="
                                                 f"{metrics.timestep_text(c.steps.timestep_b[m])}"), f"fig-js-match{m}")

    over = compare_mod.over_steps_words(c)
    page.h(f"Metrics: A, B and B - A ({compare_mod.over_steps_words(c, short=False)}, as in the ranking)")
    class_a, class_b = compare_mod.mean_classes(c)
    page.figure(figures.taxonomy_map(class_a, title=f"head classes · {name_a} · {over}"), "fig-taxonomy-a")
    page.figure(figures.taxonomy_map(class_b, title=f"head classes · {name_b} · {over}"), "fig-taxonomy-b")
    for name in c.diff.data_vars:
        ma, mb = (compare_mod.over_steps(c, m[name], keep_attrs=True) for m in (c.metrics_a, c.metrics_b))
        if bool(ma.notnull().any()) and bool(mb.notnull().any()):
            page.figure(figures.compare_maps(ma, mb, names=(name_a, name_b),
                                             title=f"{name}: {ma.attrs.get('long_name', '')} · {over}"),
                        f"fig-compare-{name}")

    page.h(f"Top {min(top, len(ranking))} heads: query x key frame heatmaps (first matched step: "
           f"t_A={metrics.timestep_text(c.steps.timestep_a[0])}, t_B={metrics.timestep_text(c.steps.timestep_b[0])})")
    sa, sb = int(c.steps.step_a[0]), int(c.steps.step_b[0])
    samples_a, samples_b = list(dict.fromkeys(c.pairs.sample_a)), list(dict.fromkeys(c.pairs.sample_b))
    for row in ranking.head(top).itertuples():  # A left, B right, one colour scale
        fig = figures.head_pair(a.sel(sample=samples_a), b.sel(sample=samples_b), row.layer, row.head, step_a=sa,
                                step_b=sb, names=(name_a, name_b))
        fig.update_layout(title=f"attn_mass · layer {row.layer} head {row.head} · JS {row.js_bits:.3f} bits "
                                f"({compare_mod.over_steps_words(c)}, query frames "
                                f"{c.query_frames[0]}-{c.query_frames[-1]})")
        page.figure(fig, f"fig-top-L{row.layer}H{row.head}")
    if csv:  # (the ranking as a table for a paper or a spreadsheet)
        from models.files import atomic_write_text

        table = ranking.assign(label_a=name_a.removeprefix("A: "), label_b=name_b.removeprefix("B: "),
                               store_a=src_a, store_b=src_b)
        atomic_write_text(Path(out_html).with_suffix(".csv"), table.to_csv(float_format="%.6g"))
    return write_atomic(page.render(), out_html)
