"""Toy-world evaluation results: per-video rows -> the model x metric table, per-frame drift curves, a plotly
figure, an HTML page, and the comparison of two models (does one accumulate less error over long rollouts?).

How it fits: `workbench evaluate` scores each generated video with `studies.world_metrics.score_video` and hands
the scores here; everything below also works on a `videos.csv` / `curves.csv` read back with pandas, so results
can be re-tabulated or compared without re-running models:

    videos = pd.read_csv("runs/evaluate/videos.csv")
    print(table_text(summary(videos)))
    rows, lines = compare_models(videos, "df", "sf")     # B vs A, paired by (prompt, seed, length)

Metric definitions and units: docs/world_metrics.md.
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from studies import world_metrics as wm
from studies.page import number

# The table's rows: (column of videos.csv, label with units, scale, format, better: +1 higher, -1 lower, 0 neither)
TABLE = [
    ("adherent", "adherent: shown in half the frames, colour, shape, direction as prompted (%)", 100, "{:.0f}", 1),
    ("colour_ok", "colour as prompted (%)", 100, "{:.0f}", 1),
    ("shape_ok", "shape as prompted (%)", 100, "{:.0f}", 1),
    ("direction_ok", "direction as prompted (%)", 100, "{:.0f}", 1),
    ("detected", "frames with the object detected (%)", 100, "{:.0f}", 1),
    ("confidence", "detection confidence (0-1)", 1, "{:.3f}", 1),
    ("trajectory_error", "trajectory error vs the named motion (px, RMS)", 1, "{:.2f}", -1),
    ("speed", "speed along the named direction (px/frame)", 1, "{:.2f}", 0),
    ("colour_error", "colour error (RGB distance)", 1, "{:.3f}", -1),
    ("area", "object area (px)", 1, "{:.0f}", 0),
    ("area_change", "area change per frame (fraction)", 1, "{:.3f}", -1),
    ("colour_change", "colour change per frame (RGB)", 1, "{:.4f}", -1),
    ("background_change", "background change per frame (RGB, RMS)", 1, "{:.4f}", -1),
    ("background_misfit", "background misfit (RGB, RMS)", 1, "{:.4f}", -1),
    ("jitter", "jitter (px/frame^2, RMS)", 1, "{:.3f}", -1),
    ("confidence_drift", "confidence drift, last - first quarter", 1, "{:+.3f}", 1),
    ("colour_drift", "colour error drift, last - first quarter (RGB)", 1, "{:+.3f}", -1),
    ("trajectory_drift", "trajectory error drift, last - first quarter (px)", 1, "{:+.2f}", -1),
]
# the per-frame panels, named as the table's rows (TABLE) name the same numbers
FIGURE_CURVES = [("confidence", "detection confidence (0-1)"), ("trajectory_error", "trajectory error (px)"),
                 ("colour_error", "colour error (RGB distance)"),
                 ("background_change", "background change per frame (RGB, RMS)")]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
DASHES = ["solid", "dash", "dot", "dashdot"]


# ------------------------------------------------------------------------------------------------ tables
def videos_frame(results) -> pd.DataFrame:
    """One row per video from (model, latent_frames, seed, VideoScore) tuples."""
    rows = [{"model": m, "latent_frames": int(f), "seed": int(s), **score.row()} for m, f, s, score in results]
    return pd.DataFrame(rows)


def curves_frame(results) -> pd.DataFrame:
    """The per-frame curves of (model, latent_frames, seed, VideoScore) tuples, averaged over the videos of each
    (model, latent_frames) (NaN frames left out): columns model, latent_frames, frame, one per curve, `detected`
    (the share of videos whose object was detected in that frame) and `videos`."""
    groups: dict[tuple[str, int], list] = {}
    for m, f, _, score in results:
        groups.setdefault((m, int(f)), []).append(score.curves)
    parts = []
    for (m, f), curves in groups.items():
        T = min(len(c["confidence"]) for c in curves)
        part = {"model": m, "latent_frames": f, "frame": np.arange(T)}
        for name in wm.CURVES:
            stack = np.stack([c[name][:T] for c in curves])  # [videos, T]
            with warnings.catch_warnings():  # a frame no video detected the object in is NaN, quietly
                warnings.simplefilter("ignore", RuntimeWarning)
                part[name] = np.nanmean(stack, axis=0)
        part["detected"] = np.mean([c["confidence"][:T] >= wm.DETECTED for c in curves], axis=0)
        part["videos"] = len(curves)
        parts.append(pd.DataFrame(part))
    return pd.concat(parts, ignore_index=True)


def summary(videos: pd.DataFrame) -> pd.DataFrame:
    """Mean of each number over the videos of each (model, latent_frames), NaN left out; `videos` counts them, and
    `NUMBER_videos` the videos each mean is over where that is fewer for some row (a video that lost its object
    has no trajectory error: its mean is over the others). Models keep the order they first appear in."""
    cols = [c for c, *_ in TABLE if c in videos]
    groups = videos.groupby(["model", "latent_frames"], sort=False)
    out = groups[cols].mean()
    out.insert(0, "videos", groups.size())
    counts = groups[cols].count()
    for c in cols:
        if (counts[c] < out["videos"]).any():
            out[f"{c}_videos"] = counts[c]
    return out


def table_blocks(summ: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The model x metric table, one block per length: (title, strings with metrics down and models across)."""
    blocks = []
    for frames, block in summ.groupby(level="latent_frames", sort=False):
        cells = {"videos": [str(int(v)) for v in block["videos"]]}
        for col, label, scale, fmt, _ in TABLE:
            if col in block:
                over = block.get(f"{col}_videos", block["videos"])  # (a mean over fewer videos says over how many)
                cells[label] = ["-" if not np.isfinite(v) else number(v * scale, fmt)
                                + ("" if n == total else f" ({int(n)} of {int(total)})")
                                for v, n, total in zip(block[col], over, block["videos"])]
        table = pd.DataFrame(cells, index=[m for m, _ in block.index]).T
        blocks.append((f"{frames} latent frames ({1 + 4 * (frames - 1)} pixel frames)", table))
    return blocks


def table_text(summ: pd.DataFrame, markdown: bool = False) -> str:
    """The model x metric table as console text (or markdown), one block per length."""
    return "\n\n".join(_render([title, *table.columns], [[i, *r] for i, r in zip(table.index, table.to_numpy())],
                                 markdown) for title, table in table_blocks(summ))


def _render(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:  # (a | in a cell would start another column)
        head, rows = [c.replace("|", "\\|") for c in head], [[c.replace("|", "\\|") for c in r] for r in rows]
        lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


# ------------------------------------------------------------------------------------------------ compare
COMPARE_COLUMNS = ("latent_frames", "metric", "label", "pairs", "ties")  # compare_models' own columns (not labels)


def compare_models(videos: pd.DataFrame, a: str, b: str) -> tuple[pd.DataFrame, list[str]]:
    """Model b against model a, paired by (latent_frames, prompt, seed): per length and metric the means of a and
    b over the pairs where both have a value (a video without its object has no trajectory), b - a and the share
    of pairs where b is better (columns named by the models: "sf - df", "sf better (share of
    pairs)"; ties count half; metrics without a better direction get none). Also one sentence per length on drift:
    which model's trajectory error grows less from the first to the last quarter of the video (the Self-Forcing
    claim: less error accumulated over a long rollout)."""
    have = list(dict.fromkeys(videos["model"]))
    for name in (a, b):
        if name not in have:
            raise ValueError(f"model {name!r} is not in the results; they hold {have}")
    key = ["latent_frames", "prompt", "seed"]
    pairs = videos[videos.model == a].merge(videos[videos.model == b], on=key, suffixes=("_a", "_b"))
    if pairs.empty:
        raise ValueError(f"models {a!r} and {b!r} share no (latent_frames, prompt, seed): nothing to compare")
    rows, lines = [], []
    for frames, p in pairs.groupby("latent_frames", sort=True):
        for col, label, scale, _, better in TABLE:
            va, vb = p[f"{col}_a"].to_numpy(float), p[f"{col}_b"].to_numpy(float)
            ok = np.isfinite(va) & np.isfinite(vb)
            wins = np.nan
            ties = int((vb[ok] == va[ok]).sum())
            if better and ok.any():
                d = better * (vb[ok] - va[ok])
                wins = float(((d > 0) + 0.5 * (d == 0)).mean())
            rows.append({"latent_frames": frames, "metric": col, "label": label,  # (every number over the pairs
                         a: va[ok].mean() * scale if ok.any() else np.nan,  # where both have a value, so that
                         b: vb[ok].mean() * scale if ok.any() else np.nan,  # b - a is the difference of a and b)
                         f"{b} - {a}": np.mean(vb[ok] - va[ok]) * scale if ok.any() else np.nan,
                         f"{b} better (share of pairs)": wins, "pairs": int(ok.sum()), "ties": ties})
        da, db = p["trajectory_drift_a"].to_numpy(float), p["trajectory_drift_b"].to_numpy(float)
        ok = np.isfinite(da) & np.isfinite(db)
        if ok.any():
            winner = b if db[ok].mean() < da[ok].mean() else a
            wins = int(((db < da) if winner == b else (da < db))[ok].sum())
            losses = int(((da < db) if winner == b else (db < da))[ok].sum())
            p_value = sign_test(wins, losses)
            verdict = ("" if p_value < 0.05 else
                       ": not significant at the 5% level, more prompts or seeds would tell")
            change = (f"{frames} latent frames: the trajectory error changes by {da[ok].mean():+.2f} px ({a}) "
                      f"and {db[ok].mean():+.2f} px ({b}) from the first to the last quarter of the video: ")
            if da[ok].mean() == db[ok].mean():  # no model to name
                change += (f"the two accumulate the same error on average ({int((da == db)[ok].sum())} of "
                           f"{int(ok.sum())} paired videos tie)")
            else:
                pairs = (f"less in {wins} of {int(ok.sum())} paired videos" if wins > losses else
                         f"though less in only {wins} of {int(ok.sum())} paired videos and more in {losses}: the mean "
                         "rests on a few large differences")
                change += (f"{winner} accumulates less error on average, {pairs} (two-sided sign test p = "
                           f"{p_value:.2g}{verdict})")
            lines.append(change + f"; adherent {np.nanmean(p['adherent_a']):.0%} ({a}), "
                                  f"{np.nanmean(p['adherent_b']):.0%} ({b})")
        else:
            lines.append(f"{frames} latent frames: no paired video with a trajectory in both models")
    return pd.DataFrame(rows), lines


def comparison_blocks(rows: pd.DataFrame, a: str, b: str) -> list[tuple[list[str], list[list[str]]]]:
    """compare_models' table as text, a (header, rows) block per length: each number in its metric's format
    (TABLE), the difference signed, the share of pairs as a percentage ("all tie" when no pair differs: ties
    count half, so 50% would read as "better half the time")."""
    formats = {col: fmt for col, _, _, fmt, _ in TABLE}
    blocks = []
    for frames, part in rows.groupby("latent_frames", sort=True):
        body = []
        for _, r in part.iterrows():
            fmt = formats.get(r["metric"], "{:.3g}")
            num = lambda v, f=fmt: "-" if not np.isfinite(v) else number(v, f)  # noqa: E731
            share = r[f"{b} better (share of pairs)"]
            signed = fmt if "+" in fmt else fmt.replace("{:", "{:+")  # (a difference shows its sign)
            shown = ("-" if not np.isfinite(share) else
                     "all tie" if r["pairs"] and r["ties"] == r["pairs"] else f"{share:.0%}")
            body.append([r["label"], num(r[a]), num(r[b]), num(r[f"{b} - {a}"], signed), shown, str(r["pairs"])])
        blocks.append(([f"{frames} latent frames", a, b, f"{b} - {a}", f"{b} better", "pairs"], body))
    return blocks


COMPARISON_NOTE = ("each row is over its pairs (the same prompt and seed), those where both models have a value; "
                   "in 'better' a tie counts half")


def comparison_text(rows: pd.DataFrame, a: str, b: str, markdown: bool = False) -> str:
    """comparison_blocks as console text (or markdown), with COMPARISON_NOTE under them."""
    blocks = [_render(head, body, markdown) for head, body in comparison_blocks(rows, a, b)]
    return "\n\n".join(blocks + [f"({COMPARISON_NOTE})"])


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of `wins` against `losses` (ties left out): the probability, with either side as
    likely in each pair, of a split at least this uneven. 1.0 with no untied pair."""
    from math import comb

    n, k = wins + losses, max(wins, losses)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(comb(n, i) for i in range(k, n + 1)) / 2 ** n)


# ------------------------------------------------------------------------------------------------ figure
def drift_figure(curves: pd.DataFrame, title: str = "drift over the rollout") -> go.Figure:
    """Per-frame curves (mean over the grid) of each model and length, one panel per curve, the legend at the top
    right, beside the first panel (readable without scrolling down to it), never over a plot."""
    names = [c for c in FIGURE_CURVES if c[0] in curves]
    fig = make_subplots(rows=len(names), cols=1, shared_xaxes=True, vertical_spacing=0.04,
                        subplot_titles=[label for _, label in names])
    models = list(dict.fromkeys(curves["model"]))
    lengths = sorted(set(curves["latent_frames"]))
    for (model, frames), part in curves.groupby(["model", "latent_frames"], sort=False):
        colour = COLOURS[models.index(model) % len(COLOURS)]
        dash = DASHES[lengths.index(frames) % len(DASHES)]
        for row, (col, label) in enumerate(names, start=1):
            fig.add_trace(go.Scatter(
                x=part["frame"].to_numpy(), y=part[col].to_numpy(np.float32), mode="lines",
                line=dict(color=colour, dash=dash, width=1.5), name=f"{model}, {frames} latent frames",
                legendgroup=f"{model}-{frames}", showlegend=row == 1,
                hovertemplate=f"{html.escape(model)}, {frames} latent frames<br>pixel frame %{{x}}<br>{label} "
                              "%{y:.4g}<extra></extra>"), row=row, col=1)
    for row, (col, _) in enumerate(names, start=1):
        if not np.isfinite(curves[col].to_numpy(float)).any():
            fig.add_annotation(text="no frame with a detected object", showarrow=False, font=dict(color="#888"),
                               xref=f"x{row if row > 1 else ''} domain", yref=f"y{row if row > 1 else ''} domain",
                               x=0.5, y=0.5)
    if "confidence" in curves:
        fig.update_yaxes(range=[-0.02, 1.02], row=[c for c, _ in names].index("confidence") + 1, col=1)
    fig.update_xaxes(title_text="pixel frame (4 per latent frame)", row=len(names), col=1)
    fig.update_layout(title=title, height=230 * len(names) + 120, width=1200, template="plotly_white",
                      margin=dict(t=70, b=40, l=60, r=250),
                      legend=dict(orientation="v", yanchor="top", y=1, xanchor="left", x=1.02))
    return fig


# ------------------------------------------------------------------------------------------------ writing
def write_results(out_dir, results, *, title: str, notes: list[str] | None = None,
                  compare: tuple[str, str] | None = None) -> dict[str, Path]:
    """Write videos.csv, curves.csv, summary.csv, summary.md and evaluate.html (the table, the comparison and the
    drift figure) into out_dir, each atomically. Returns {name: path}."""
    from studies.page import Page, write_atomic

    out_dir = Path(out_dir)
    videos, curves = videos_frame(results), curves_frame(results)
    summ = summary(videos)
    compared = compare_models(videos, *compare) if compare else None
    md = [f"# {title}", "", *(notes or []), "", table_text(summ, markdown=True)]
    if compared:
        md += ["", f"## {compare[1]} vs {compare[0]}", "", *[f"- {line}" for line in compared[1]], "",
               comparison_text(compared[0], *compare, markdown=True)]
    page = Page(title)
    for note in notes or []:
        page.p(html.escape(note))
    for caption, table in table_blocks(summ):
        page.h(caption, 3)
        page.table(table, index=True)
    if compared:
        page.h(f"{compare[1]} vs {compare[0]}")
        for line in compared[1]:
            page.p(html.escape(line))
        for head, body in comparison_blocks(compared[0], *compare):  # (as the console and summary.md show it)
            page.table(pd.DataFrame(body, columns=head), index=False)
        page.p(html.escape(f"({COMPARISON_NOTE})"))
    page.h("Drift over the rollout")
    page.p("Mean over the prompt x seed grid at each pixel frame; frames where the object was not detected are left "
           "out of the error curves. Definitions and units: docs/world_metrics.md.")
    page.figure(drift_figure(curves), "fig-drift")
    paths = {name: out_dir / name for name in ("videos.csv", "curves.csv", "summary.csv", "summary.md",
                                                  "evaluate.html")}
    write_atomic(videos.to_csv(index=False), paths["videos.csv"])
    write_atomic(curves.to_csv(index=False), paths["curves.csv"])
    write_atomic(summ.to_csv(), paths["summary.csv"])
    write_atomic("\n".join(md) + "\n", paths["summary.md"])
    write_atomic(page.render(), paths["evaluate.html"])
    return paths

