"""studies.report and the `workbench report` / `workbench compare` commands: the HTML is self-contained (plotly.js
inlined), holds the figures (div ids and the figure JSON, with the store's numbers and titles) and the tables.
If chromium is installed, a report is also rendered headless and every figure must draw."""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from studies import commands, compare, load_store, report, synthetic
from workbench.errors import WorkbenchError


class ReportParser(HTMLParser):
    """Collects figure divs, the figure JSON scripts, external script sources, tables and headings."""

    def __init__(self):
        super().__init__()
        self.divs, self.figures, self.external, self.tables, self.headings = [], {}, [], 0, []
        self._json_id, self._in_heading, self._buffer = None, False, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "plotly-graph-div" in (attrs.get("class") or ""):
            self.divs.append(attrs["id"])
        if tag == "script":
            if attrs.get("src"):
                self.external.append(attrs["src"])
            if attrs.get("type") == "application/json":
                self._json_id, self._buffer = attrs["id"], []
        if tag == "table":
            self.tables += 1
        if tag in ("h1", "h2", "h3"):
            self._in_heading, self._buffer = True, []

    def handle_data(self, data):
        if self._json_id or self._in_heading:
            self._buffer.append(data)

    def handle_endtag(self, tag):
        if tag == "script" and self._json_id:
            self.figures[self._json_id[: -len("-json")]] = json.loads("".join(self._buffer))
            self._json_id = None
        if tag in ("h1", "h2", "h3") and self._in_heading:
            self.headings.append("".join(self._buffer))
            self._in_heading = False


def array(value) -> np.ndarray:
    """A trace array from figure JSON: plotly writes numpy arrays as {dtype, bdata (base64), shape}."""
    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        return out.reshape([int(n) for n in str(shape).split(",")]) if shape else out
    return np.array(value, dtype=float)


def parse(path: Path) -> tuple[ReportParser, str]:
    text = path.read_text(encoding="utf-8")
    parser = ReportParser()
    parser.feed(text)
    return parser, text


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    sf = synthetic.write_store(root / "sf.zarr", "causal", layers=(0, 1), num_heads=12, seeds=(1, 2), noise=0.1)
    wan = synthetic.write_store(root / "wan.zarr", "bidirectional", layers=(0, 1), num_heads=12, seeds=(2, 3),
                                noise=0.1, roles=lambda l, h: "global" if h == 0 else synthetic.planted_role(l, h))
    return {"sf": sf, "wan": wan, "root": root}


@pytest.fixture(scope="module")
def store_report(stores):
    return report.build_report(stores["sf"], stores["root"] / "sf.html")


@pytest.fixture(scope="module")
def compare_report(stores):
    return report.build_compare_report(stores["wan"], stores["sf"], stores["root"] / "cmp.html")


def test_report_is_self_contained(store_report):
    parser, text = parse(store_report)
    assert parser.external == []  # nothing fetched: opens offline
    assert "plotly.js v" in text[:100_000]  # the library itself is inlined
    assert sorted(parser.divs) == sorted(parser.figures)  # every div has its figure JSON


def test_report_holds_the_figures(stores, store_report):
    parser, text = parse(store_report)
    for layer in (0, 1):
        for kind in ("bars", "steps", "recency"):
            assert f"fig-{kind}-layer{layer}" in parser.figures
        assert f"fig-grid-layer{layer}" not in parser.figures  # the heatmaps once: the step slider holds them
    for name in ("taxonomy", "overview-sink_mass", "overview-own_chunk_mass", "overview-local_mass",
                 "overview-mean_distance", "overview-entropy_norm"):
        assert f"fig-{name}" in parser.figures
    grid = parser.figures["fig-steps-layer1"]
    assert "attn_mass · layer 1 · step 0 (t=1000, denoise)" in grid["layout"]["title"]["text"]
    assert len(grid["data"]) == 12 and grid["data"][0]["type"] == "heatmap"
    ds = load_store(stores["sf"])
    expected = ds["attn_mass"].sel(layer=1, step=0, head=4).mean("sample").values
    z = array(grid["data"][4]["z"])  # NaN where not attended
    np.testing.assert_allclose(z, expected, atol=1e-6)
    bars = parser.figures["fig-bars-layer0"]
    assert "sink_delta = v[0] - mean(v[1:-1])" in bars["layout"]["title"]["text"]
    assert len(parser.figures["fig-steps-layer0"]["frames"]) == 5
    assert "Layer 0" in parser.headings and "Checks" in parser.headings


def test_report_tables(store_report):
    parser, text = parse(store_report)
    assert parser.tables >= 5  # facts, samples, steps, checks, head metrics
    for word in ("p0000-s1", "833.3", "context", "rows sum to 1", "deep_sink", "entropy_norm", "sink_mass"):
        assert word in text
    assert "False" not in text.split(">Checks</h2>")[1].split("</table>")[0]  # every check holds


def test_report_layer_and_sample_options(stores, tmp_path):
    out = report.build_report(stores["sf"], tmp_path / "l1.html", layer=1, sample="p0000-s2", step=2)
    parser, _ = parse(out)
    assert "fig-steps-layer1" in parser.figures and "fig-steps-layer0" not in parser.figures
    slider = parser.figures["fig-steps-layer1"]
    assert "p0000-s2" in slider["layout"]["title"]["text"] and "t=833.3" in slider["layout"]["title"]["text"]
    assert slider["layout"]["sliders"][0]["active"] == 2  # it opens at the step asked for
    text = out.read_text()
    assert "<th>in this report</th>" in text and "<td>p0000-s2</td>" in text  # the samples table says which one
    ds = load_store(stores["sf"])
    np.testing.assert_allclose(array(slider["data"][3]["z"]),
                               ds["attn_mass"].sel(sample="p0000-s2", layer=1, step=2, head=3).values, atol=1e-6)
    with pytest.raises(WorkbenchError, match=r"layer 4 is not in the store; it has layers \[0, 1\]"):
        report.build_report(stores["sf"], tmp_path / "bad.html", layer=4)
    with pytest.raises(WorkbenchError, match="sample 'p0000-s9'"):
        report.build_report(stores["sf"], tmp_path / "bad.html", sample="p0000-s9")
    assert not (tmp_path / "bad.html").exists()


def test_compare_report(compare_report):
    parser, text = parse(compare_report)
    assert parser.external == [] and sorted(parser.divs) == sorted(parser.figures)
    for name in ("fig-js", "fig-js-match0", "fig-taxonomy-a", "fig-taxonomy-b", "fig-compare-sink_mass",
                 "fig-compare-local_mass", "fig-compare-mean_distance"):
        assert name in parser.figures
    assert "fig-compare-own_chunk_mass" not in parser.figures  # meaningless against the one-chunk sampler
    tops = [fig for k, fig in parser.figures.items() if k.startswith("fig-top-L")]
    assert tops and all(len(fig["data"]) == 2 and {t["coloraxis"] for t in fig["data"]} == {"coloraxis"}
                        for fig in tops)  # A and B side by side on one colour scale
    for heading in ("Matched samples", "Matched steps", "Heads ranked by change"):
        assert heading in parser.headings
    # classes over the matched steps, not one step as each store's report: said (they differed unexplained)
    import re

    assert not re.search(r"t_[AB]=\d+\.\d\d", text)  # timesteps to 0.1 (833.3), as the Steps tables
    assert "t_A=833.3" in text or "t_B=833.3" in text
    said = re.search(r"averaged over the (\d+) matched (?:denoising )?steps(?:, not the \d+ context pass(?:es)?)?, "
                     r"where a store's own report reads one step", text)
    c = compare.compare_stores(*(load_store(s) for s in (compare_report.parent / "wan.zarr",
                                                          compare_report.parent / "sf.zarr")))
    assert said and int(said.group(1)) == len(compare.averaged_matches(c)), said  # (the means leave out a context pass)
    section = text.split(">Matched samples</h2>")[1].split("</table>")[0]
    assert "p0000-s2" in text and "p0000-s3" not in section.split("<table")[1]  # not in a pair, and named so:
    assert "Not compared, in no pair: 1 sample(s) of A with no partner in B (p0000-s3)" in section
    assert "937.5" in text and "bits" in text
    sink_map = parser.figures["fig-compare-sink_mass"]
    assert [a["text"] for a in sink_map["layout"]["annotations"]][:2] == ["A: wan.zarr", "B: sf.zarr"]
    assert sink_map["layout"]["annotations"][2]["text"].startswith("B - A (largest |B - A|: ")
    ranked = text.split(">Heads ranked by change</h2>")[1].split("</table>")[0]
    assert ranked.split("</thead>")[0].count("<tr") == 1  # one header row (an index name made a second, empty one)
    first = ranked.split("</thead>")[1].split("<tr")[1]
    assert "<th>rank</th>" in ranked and first.split("<td>")[1].startswith("1<")  # ranks count from 1


def cli():
    parser = argparse.ArgumentParser(prog="workbench")
    commands.register(parser.add_subparsers(dest="command"))
    return parser


def test_commands(stores, tmp_path, capsys):
    parser = cli()
    args = parser.parse_args(["report", str(stores["sf"]), "--out", str(tmp_path / "r.html"), "--layer", "0"])
    assert args.func(args) == 0 and (tmp_path / "r.html").exists()
    said = capsys.readouterr().out
    assert f"wrote {tmp_path / 'r.html'}" in said and f"wrote {tmp_path / 'r.csv'}" in said
    heads = pd.read_csv(tmp_path / "r.csv")  # (the head table beside the page: a row per layer and head)
    assert {"layer", "head", "sink_mass", "class"} <= set(heads) and len(heads) == len(load_store(stores["sf"]).layer) \
        * len(load_store(stores["sf"])["head"])
    args = parser.parse_args(["compare", str(stores["wan"]), str(stores["sf"]), "--out", str(tmp_path / "c.html"),
                              "--tolerance", "5", "--cfg", "uncond"])
    assert args.func(args) == 0
    assert "fig-js" in parse(tmp_path / "c.html")[0].figures
    out = capsys.readouterr().out.splitlines()  # each side's model named, as the page's Models table does
    assert out[0].startswith("A = wan.zarr: ") and out[1].startswith("B = sf.zarr: ") and "sha256" in out[0]
    assert out[1].endswith(" latent frames, no KV window (every earlier frame attended)")  # (a causal model: it
    # read "global attention" beside the bidirectional teacher's; two windows read alike before)
    table = pd.read_csv(tmp_path / "c.csv", index_col="rank")  # (the ranked heads for a paper: ranks from 1)
    assert list(table.index[:3]) == [1, 2, 3] and {"layer", "head", "js_bits", "class_a", "class_b"} <= set(table)
    assert table.js_bits.is_monotonic_decreasing and f"wrote {tmp_path / 'c.html'} and {tmp_path / 'c.csv'}" in \
        "\n".join(out)
    assert ">Models</h2>" in (tmp_path / "c.html").read_text()
    assert "<td>no KV window (every earlier frame attended)</td>" in (tmp_path / "c.html").read_text()  # (in words:
    # "-1 / 0" read alike for a causal and a bidirectional model)
    args = parser.parse_args(["report", str(stores["sf"]), "--layer", "9"])
    with pytest.raises(WorkbenchError, match="layer 9"):
        args.func(args)
    disjoint = synthetic.write_store(tmp_path / "other.zarr", "causal", seeds=(99,))
    args = parser.parse_args(["compare", str(stores["sf"]), str(disjoint), "--out", str(tmp_path / "x.html"),
                              "--pair-by", "seed"])
    with pytest.raises(WorkbenchError, match=r"share no \(prompt, seed\).*--pair-by prompt"):
        args.func(args)
    with pytest.raises(WorkbenchError, match="no store at"):
        args = parser.parse_args(["report", str(tmp_path / "missing.zarr")])
        args.func(args)


def test_report_default_out_path(stores, tmp_path):
    store = shutil.copytree(stores["sf"], tmp_path / "copy.zarr")
    args = cli().parse_args(["report", str(store), "--layer", "1"])
    args.func(args)
    assert (tmp_path / "copy.html").exists()


def test_compare_default_out_is_named_by_its_stores(stores, tmp_path, monkeypatch):
    """Every compare wrote runs/compare.html by default: the next pair's report replaced the last one's."""
    monkeypatch.chdir(tmp_path)
    for a, b in (("wan", "sf"), ("sf", "wan")):
        args = cli().parse_args(["compare", str(stores[a]), str(stores[b]), "--cfg", "uncond"])
        assert args.func(args) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "compare_sf_vs_wan.csv", "compare_sf_vs_wan.html", "compare_wan_vs_sf.csv", "compare_wan_vs_sf.html"]


def test_help_teaches(capsys):
    for command in ("report", "compare"):
        with pytest.raises(SystemExit):
            cli().parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert "examples:" in out and f"workbench {command} " in out


def test_workbench_cli_lists_the_commands(stores, tmp_path):
    from workbench.cli import COMMAND_MODULES, main

    assert "studies.commands" in COMMAND_MODULES, "add 'studies.commands' to COMMAND_MODULES in workbench/cli.py"
    assert main(["report", str(stores["sf"]), "--out", str(tmp_path / "m.html"), "--layer", "0"]) == 0
    assert main(["report", str(stores["sf"]), "--layer", "9"]) == 2  # one clear line, no traceback


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
def test_report_renders_in_headless_chromium(compare_report):
    parser, _ = parse(compare_report)
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--dump-dom",
         compare_report.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    dom = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    # Plotly.newPlot marks each drawn div js-plotly-plot and gives it an svg.main-svg
    assert dom.count("js-plotly-plot") >= len(parser.figures)
    assert dom.count('class="main-svg"') >= len(parser.figures)


def test_a_printed_report_keeps_its_figures_and_tables_whole(store_report, tmp_path):
    """Printed (to PDF too), a figure or table wider than the page was cut at its edge: a heatmap's colour bar and
    the head table's last columns were gone, with nothing to say so. Each gets the zoom that fits it on an A4
    landscape page; every figure has a name a screen reader reads (its title) and no 'share to the cloud' button."""
    from browser import chromium

    from studies.page import PRINT_WIDTH

    with chromium() as browser:
        page = browser.new_page()
        page.goto(store_report.as_uri())
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length === "
                               "document.querySelectorAll('.plotly-graph-div').length")
        boxes = page.evaluate("""[...document.querySelectorAll('.figure, .tablewrap')].map(el => ({
            width: Math.max(...[...el.querySelectorAll('.svg-container, table')].map(
                c => c.getBoundingClientRect().width)),
            name: el.getAttribute('aria-label'), figure: el.classList.contains('figure')}))""")
        page.emulate_media(media="print")  # (the widths as drawn on screen; the zoom the print gives each)
        zooms = page.evaluate("[...document.querySelectorAll('.figure, .tablewrap')].map(el => "
                              "Number(getComputedStyle(el).zoom))")
        for b, zoom in zip(boxes, zooms):
            b["zoom"] = zoom
        wide = [b for b in boxes if b["width"] * b["zoom"] > PRINT_WIDTH + 2]
        assert not wide, wide
        assert any(b["zoom"] < 1 for b in boxes)  # (the report has boxes wider than the page: they shrank)
        assert all(b["zoom"] == 1 for b in boxes if b["width"] <= PRINT_WIDTH)  # (narrower ones keep their size)
        assert any(b["width"] <= PRINT_WIDTH for b in boxes)
        assert all(b["name"] for b in boxes if b["figure"])
        assert page.locator("[data-title='Share chart']").count() == 0
        pdf = page.pdf(path=str(tmp_path / "report.pdf"))
    assert pdf[:5] == b"%PDF-"
    assert "<h2 id=\"s0\">Samples</h2>" in store_report.read_text()  # (h1 then h2: an outline with no gap)


def test_report_of_a_cfg_store(stores, tmp_path):
    out = report.build_report(stores["wan"], tmp_path / "wan.html", layer=0)
    parser, text = parse(out)
    slider = parser.figures["fig-steps-layer0"]
    assert len(slider["frames"]) == 8  # the cond forwards of 8 denoising steps; uncond left out
    assert [s["label"].split(" ")[0] for s in slider["layout"]["sliders"][0]["steps"]] == [str(2 * i) for i in range(8)]
    assert "bidirectional" in text and "uncond" in text  # the steps table still lists every forward


# ------------------------------------------------------------------------------------------------------
# What a new user saw (issue 13): crowded legends, squashed colour bars, grids twice, per-step colour scales,
# training-probe stores refused


def test_one_layer_maps_have_room_for_their_legend_and_colour_bar(tmp_path):
    """A one-layer store: the class names are legend entries (not five colour-bar ticks on a 28-pixel strip) and
    every layer x head map keeps at least MIN_MAP_ROWS_PX of plot height for its colour bar."""
    from studies import figures

    store = synthetic.write_store(tmp_path / "one.zarr", "causal", layers=(3,), num_heads=4)
    parser, _ = parse(report.build_report(store, tmp_path / "one.html"))
    taxonomy = parser.figures["fig-taxonomy"]
    assert taxonomy["data"][0]["showscale"] is False
    legend = [t["name"] for t in taxonomy["data"][1:] if t.get("showlegend")]
    assert legend == [c for c in figures.CLASS_COLOURS if c != "no_values"]  # (no_values: only where a head has it)
    for name, fig in parser.figures.items():
        if name.startswith(("fig-overview-", "fig-taxonomy")):
            margin = fig["layout"].get("margin", {})
            plot = fig["layout"]["height"] - margin.get("t", 100) - margin.get("b", 80)
            assert plot >= figures.MIN_MAP_ROWS_PX - 20, (name, fig["layout"]["height"])


def test_compare_draws_every_step_on_one_colour_scale(compare_report):
    parser, _ = parse(compare_report)
    maps = {k: v for k, v in parser.figures.items() if k == "fig-js" or k.startswith("fig-js-match")}
    assert len(maps) >= 3
    scales = {(fig["data"][0]["zmin"], fig["data"][0]["zmax"]) for fig in maps.values()}
    assert len(scales) == 1
    zmin, zmax = scales.pop()
    largest = max(np.nanmax(array(fig["data"][0]["z"])) for fig in maps.values())
    assert zmin == 0 and zmax == pytest.approx(largest, rel=1e-6)  # the scale ends at the largest divergence


def probe_store(path, train_steps=(0, 2, 4)):
    """A training probe store (docs/store.md) written as training.probes writes it, one append along train_step per
    probe; the planted roles blur as training goes on (noise 0, 0.2, 0.4)."""
    import xarray as xr

    from workbench.store import StoreWriter

    with StoreWriter(path, "synthetic:probe", append_dim="train_step", completed_attr="completed_train_steps",
                     mode="overwrite") as writer:
        for i, t in enumerate(train_steps):
            parts = synthetic.sample_datasets("causal", layers=(0, 1), num_heads=4, seeds=(0, 1), noise=0.2 * i,
                                              rng_seed=i)
            ds = xr.concat(parts, dim="sample", data_vars="all", coords="different", compat="equals",
                           combine_attrs="override").expand_dims(train_step=np.array([t], dtype=np.int64))
            for name in ds.data_vars:
                ds[name].attrs = parts[0][name].attrs
            ds.attrs.pop("completed", None)
            writer.write(ds, t)
    return path


def test_report_of_a_training_probe_store(tmp_path):
    """`workbench report probes.zarr` shows attention over train_step (it used to refuse the extra dim)."""
    from workbench.cli import main

    store = probe_store(tmp_path / "probes.zarr")
    assert main(["report", str(store), "--out", str(tmp_path / "p.html")]) == 0
    parser, text = parse(tmp_path / "p.html")
    assert "training probes" in parser.headings[0]
    sink = parser.figures["fig-training-sink_mass"]
    line = next(t for t in sink["data"] if t["name"] == "head 0" and t["xaxis"] == "x")  # layer 0, head 0: sink
    assert [int(x) for x in line["x"]] == [0, 2, 4]
    ds = load_store(store)
    from studies import metrics

    expected = metrics.head_metrics(ds.sel(step=[0])).sink_mass.sel(step=0, layer=0, head=0).values
    np.testing.assert_allclose(array(line["y"]), expected, rtol=1e-5)
    assert expected[0] == pytest.approx(1.0) and expected[-1] < 0.9  # the planted sink blurs with the noise
    slider = parser.figures["fig-train-steps-layer1"]
    assert [s["label"] for s in slider["layout"]["sliders"][0]["steps"]] == ["0", "2", "4"]
    assert slider["layout"]["sliders"][0]["active"] == 2  # opens at the last train step
    table = pd.read_csv(tmp_path / "p.csv")  # every train step's head table beside the page (none was written)
    assert sorted(set(table.train_step)) == [0, 2, 4] and len(table) == 3 * ds.sizes["layer"] * ds.sizes["head"]
    row = table[(table.train_step == 0) & (table.layer == 0) & (table["head"] == 0)].iloc[0]
    assert row.sink_mass == pytest.approx(expected[0], rel=1e-5) and row["class"] == "sink"


def test_checks_table_says_n_a_for_a_statistic_the_store_lacks(stores):
    """A store without attn_logit gets "n/a" for the attn_logit check, never a check that held."""
    ds = load_store(stores["sf"])
    assert bool(report.checks_table(ds).iloc[2]["holds"])
    table = report.checks_table(ds.drop_vars("attn_logit"))
    row = table[table.check.str.startswith("attn_logit")].iloc[0]
    assert (row["value"], row["holds"]) == ("no attn_logit in the store", "n/a")


def test_a_long_table_shows_its_first_rows_and_folds_every_other_row():
    import pandas as pd

    from studies.page import FOLD_SLACK, Page

    page = Page("t")
    df = pd.DataFrame({"layer": np.arange(100) // 12, "head": np.arange(100) % 12, "js_bits": np.arange(100) / 1e3})
    page.table(df, index=False, shown=30)
    shown, folded = page.parts[-1].split("<details>")
    assert shown.count("<tr") == 1 + 30 and "the other 70 of 100 rows" in folded
    assert folded.count("<tr") == 1 + 70 and folded.endswith("</details>")  # each row once, under its header
    assert "0.099" in folded and "0.099" not in shown and "0.029" in shown
    page.table(df.head(30 + FOLD_SLACK), index=False, shown=30)  # a few rows over are not worth a fold
    assert "<details>" not in page.parts[-1] and page.parts[-1].count("<tr") == 1 + 30 + FOLD_SLACK


def test_compare_two_train_steps_of_a_probe_store(tmp_path, capsys):
    """--train-step picks a probe store's train step on each side, and the steps name the weights (a slice of a
    probe store was labelled as the training's starting checkpoint, the same on both sides)."""
    from workbench.cli import main

    store = probe_store(tmp_path / "probes.zarr")
    out = tmp_path / "c.html"
    assert main(["compare", str(store), str(store), "--train-step", "0", "--train-step", "4", "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "A = probes.zarr (train step 0): train step 0 of the training that started from" in log
    assert "B = probes.zarr (train step 4): train step 4 of the training that started from" in log
    _, text = parse(out)
    assert "the generator being trained, at train step 4" in text and "probes.zarr (train step 0)" in text
    top_js = lambda log: [float(line.split()[2]) for line in log.split("changed most")[1].splitlines()[2:7]]  # noqa: E731
    assert min(top_js(log)) > 0.1  # the planted roles blurred from step 0 to 4 (noise 0 -> 0.4)
    assert main(["compare", str(store), str(store), "--train-step", "2", "--out", str(out)]) == 0  # both sides
    assert max(top_js(capsys.readouterr().out)) == 0  # one step against itself
    for argv, needle in [([], "A (" + str(store) + ") is a training probe store (train steps [0, 2, 4]): choose one"),
                         (["--train-step", "3"], "--train-step 3: A (" + str(store) + ") holds train steps [0, 2, 4]"),
                         (["--train-step", "0"] * 3, "--train-step given 3 times")]:
        assert main(["compare", str(store), str(store), *argv, "--out", str(out)]) == 2
        assert needle in capsys.readouterr().err


def test_compare_says_when_the_rollouts_differ_in_length_or_layers(tmp_path, capsys):
    """Stores of 21 and 12 latent frames share a seed but not the noise after the first re-noising, and layers one
    store alone holds are left out: both said, on the console and the page (the page claimed the same noise)."""
    a = synthetic.write_store(tmp_path / "a.zarr", "causal", layers=(0, 1), num_heads=4, seeds=(1,))
    b = synthetic.write_store(tmp_path / "b.zarr", "causal", layers=(1, 2), num_heads=4, seeds=(1,), num_frames=12)
    out = report.build_compare_report(a, b, tmp_path / "c.html", query_frames="all", log=print)
    log = capsys.readouterr().out
    assert "note: the rollouts have different lengths (A 21 latent frames, B 12): the same seed draws" in log
    assert "note: layers compared: [1], the ones both stores hold (A has [0, 1], B has [1, 2])" in log
    _, text = parse(out)
    assert "the same noise for the first frames only" in text and "started from the same noise" not in text
    assert "<th>latent frames</th>" in text and "<td>21</td>" in text and "<td>12</td>" in text
    same = report.build_compare_report(a, a, tmp_path / "s.html", log=print)
    notes = [line for line in capsys.readouterr().out.splitlines() if "note:" in line]
    assert notes == ["note: not compared: cross_mass (both); the comparison reads attn_mass only (open a store with "
                     "studies.load_store to read the others)"]  # (the synthetic stores hold cross_mass)
    assert "started from the same noise" in parse(same)[1]


def test_compare_says_when_the_rollouts_differ_in_video_size(tmp_path, capsys):
    """Stores made at another --height/--width pair by seed but drew other noise: a note says so on the console and
    the page, which then does not claim the same noise; the models table gives each side's video size, and the CSV
    names the two stores."""
    import zarr

    made = []
    for name, geometry in (("a", [21, 12, 16]), ("b", [21, 8, 12]), ("c", [21, 12, 16])):
        path = synthetic.write_store(tmp_path / f"{name}.zarr", "causal", layers=(0,), num_heads=2, seeds=(1,))
        zarr.open_group(str(path), mode="r+").attrs.update(fingerprint_fields={"layout": {"geometry": geometry}})
        made.append(path)
    out = report.build_compare_report(made[0], made[1], tmp_path / "ab.html", log=print)
    log = capsys.readouterr().out
    assert ("note: the rollouts have different latent frame sizes (A 12 x 16, B 8 x 12: different --height/--width): "
            "the same seed draws different noise at another size, so the divergences include that") in log
    assert "21 latent frames of 96 x 128 pixels" in log and "21 latent frames of 64 x 96 pixels" in log
    _, text = parse(out)
    assert "started from the same noise" not in text and "different latent frame sizes" in text
    assert "<td>96 x 128 pixels</td>" in text and "<td>64 x 96 pixels</td>" in text
    table = pd.read_csv(out.with_suffix(".csv"))
    assert set(table.store_a) == {str(made[0])} and set(table.store_b) == {str(made[1])}
    assert set(table.label_a) == {"a.zarr"} and set(table.label_b) == {"b.zarr"}
    same = report.build_compare_report(made[0], made[2], tmp_path / "ac.html", log=print)
    assert "different latent frame sizes" not in capsys.readouterr().out
    assert "started from the same noise" in parse(same)[1]


def test_a_one_chunk_store_draws_no_chunk_maps_and_names_its_local_window(stores, store_report, tmp_path):
    """A bidirectional store is one chunk: its own-chunk mass is 1 everywhere (a map of one colour, shown before
    without a word); and local means keys less than the store's window from the query, not 'a chunk's length'."""
    parser, text = parse(report.build_report(stores["wan"], tmp_path / "wan.html"))
    assert "fig-overview-own_chunk_mass" not in parser.figures and "are 1 by definition and not drawn" in text
    assert "local (mass on keys less than 3 frame(s) from the query" in text
    causal, _ = parse(store_report)
    assert "fig-overview-own_chunk_mass" in causal.figures


def test_reports_of_videos_shorter_than_the_sink_statistic_and_the_local_window(stores, tmp_path):
    """A video of 1 or 2 key frames has no sink statistic (v[0] - mean(v[1:-1]) is over nothing): the report says
    n/a instead of refusing (and leaving its CSV behind); in a video no longer than the local window every key is
    local, so no head is called local; a layer named twice is drawn once."""
    from studies import metrics

    two = synthetic.write_store(tmp_path / "two.zarr", "causal", layers=(0,), num_heads=2, num_frames=2,
                                num_frame_per_block=1)
    parser, text = parse(report.build_report(two, tmp_path / "two.html"))
    bars = parser.figures["fig-bars-layer0"]["layout"]
    assert "head 0: sink_delta n/a" in [a["text"] for a in bars["annotations"]] and (tmp_path / "two.csv").exists()
    assert bars["title"]["text"].endswith("(n/a under 3 key frames)</sup>") and bars["xaxis"]["dtick"] == 1
    stats = metrics.researcher_stats(load_store(two), layer=0)
    assert bool(stats.sink.isnull().all()) and bool(stats.mid.isnull().all()) and bool(stats["first"].notnull().all())
    three = synthetic.write_store(tmp_path / "three.zarr", "causal", layers=(0,), num_heads=4, num_frames=3)
    hm = metrics.head_metrics(load_store(three), query_frames="all")
    assert bool(hm.local_mass.isnull().all())  # keys 0-2, window 3 (the chunk): nothing outside it
    assert "local" not in set(metrics.classify_heads(hm).values.ravel().tolist())
    parser, text = parse(report.build_report(three, tmp_path / "three.html"))
    assert "fig-overview-local_mass" not in parser.figures and "fig-overview-sink_mass" in parser.figures
    assert ("Not drawn, having no value at this step for these query frames: local_mass (no row attended a key 3 or "
            "more frames away)") in text  # (a map left out is said)
    # one key frame, or two attended alike: no head is a sink for reaching sink_min, uniform attention's share
    uniform = synthetic.write_store(tmp_path / "uniform.zarr", "causal", layers=(0,), num_heads=4, num_frames=2,
                                    num_frame_per_block=1, roles=lambda layer, head: "global")
    one = synthetic.write_store(tmp_path / "one.zarr", "causal", layers=(0,), num_heads=4, num_frames=1,
                                num_frame_per_block=1)
    for short in (uniform, one):
        hm = metrics.head_metrics(load_store(short))  # (the last chunk's rows)
        assert float(hm.sink_mass.min()) >= 0.5 and "sink" not in set(metrics.classify_heads(hm).values.ravel())
    # rows of 1, 2 and 3 key frames attended alike: sink_mass 11/18 and n_attended 2 on average, whose product
    # (the rule's share before) is above 1; row by row the share is uniform's, so no sink
    uniform3 = synthetic.write_store(tmp_path / "uniform3.zarr", "causal", layers=(0,), num_heads=2, num_frames=3,
                                     num_frame_per_block=1, roles=lambda layer, head: "global")
    hm = metrics.head_metrics(load_store(uniform3), query_frames="all")
    np.testing.assert_allclose(hm.sink_mass, 11 / 18, rtol=1e-6)
    np.testing.assert_allclose(hm.uniform_mass, 11 / 18, rtol=1e-6)
    assert float((hm.sink_mass * hm.n_attended).min()) > 1 and set(metrics.classify_heads(hm).values.ravel()) == {
        "global"}
    assert "sink" in set(metrics.classify_heads(metrics.head_metrics(load_store(two))).values.ravel())
    assert "sink" in set(metrics.classify_heads(metrics.head_metrics(load_store(stores["sf"]))).values.ravel())
    # a store of 21 frames: local_mass counts the rows with keys outside the window (the first chunk's have none)
    rows = metrics.row_metrics(load_store(stores["sf"]))
    assert bool(rows.local_mass.sel(query_frame=[0, 1, 2]).isnull().all())
    assert bool(rows.local_mass.sel(query_frame=list(range(3, 21))).notnull().all())
    # a layer named twice: shown once (it failed on a duplicate figure id)
    parser, _ = parse(report.build_report(stores["sf"], tmp_path / "twice.html", layer=[1, 1]))
    assert [d for d in parser.divs if d == "fig-steps-layer1"] == ["fig-steps-layer1"]
    report.build_compare_report(stores["wan"], stores["sf"], tmp_path / "cmp2.html", layers=[1, 1])


def test_a_report_of_a_store_on_a_read_only_disk_says_where_else_to_write(stores, tmp_path, monkeypatch, capsys):
    """The report goes beside the store by default; where that folder takes no file (a shared read-only disk), the
    error says that --out names another place (it said only that the folder was not writable)."""
    import models.files
    from models.errors import ModelInputError
    from workbench.cli import main

    real = models.files.check_writable_dir

    def read_only(path, **kw):
        if Path(path).resolve() == Path(stores["root"]).resolve():
            raise ModelInputError(f"output folder {str(path)!r} is not writable: Read-only file system")
        return real(path, **kw)

    monkeypatch.setattr(models.files, "check_writable_dir", read_only)
    assert main(["report", str(stores["sf"])]) == 2
    assert "is not writable: Read-only file system; the report goes beside the store unless --out FILE names " \
           "another place, e.g. --out sf.html" in capsys.readouterr().err
    assert main(["report", str(stores["sf"]), "--out", str(tmp_path / "sf.html")]) == 0


def test_layer_options_take_lists_and_both_spellings(stores, tmp_path):
    """report and compare take --layer as extract's --layers does (3, 0-5, 0,4, all; repeatable) and under both
    names, and the seed options answer to --seed and --seeds in every command (one spelling failed with the
    top-level usage line, or was read as another option's prefix)."""
    from studies.commands import layer_list
    from workbench.cli import build_parser, main

    assert layer_list(None) is None and layer_list(["all"]) == "all" and layer_list(["1", "0-1", "3,1"]) == [1, 0, 3]
    assert main(["report", str(stores["sf"]), "--layers", "0-1", "--out", str(tmp_path / "r.html")]) == 0
    parser, _ = parse(tmp_path / "r.html")
    assert {"fig-steps-layer0", "fig-steps-layer1"} <= set(parser.figures)
    assert main(["compare", str(stores["wan"]), str(stores["sf"]), "--layer", "1", "--layer", "1",
                 "--out", str(tmp_path / "c.html")]) == 0
    p = build_parser()
    for command, dest in (("extract", "seed"), ("generate", "seed"), ("intervene", "seeds"), ("evaluate", "seeds")):
        for spelling in ("--seed", "--seeds"):
            assert getattr(p.parse_args([command, spelling, "7"]), dest) == "7"


def test_report_layer_all_details_every_layer(tmp_path):
    """--layer all details every layer, past the default's 8 (it meant the default); a list shows those alone."""
    from workbench.cli import main

    store = synthetic.write_store(tmp_path / "ten.zarr", "causal", layers=range(10), num_heads=2, num_frames=6)
    for given, want in ((["all"], list(range(10))), (["0-1", "7"], [0, 1, 7]), ([], [0, 1, 3, 4, 5, 6, 8, 9])):
        argv = [x for g in given for x in ("--layers", g)]
        assert main(["report", str(store), *argv, "--out", str(tmp_path / "r.html")]) == 0
        parser, text = parse(tmp_path / "r.html")
        assert sorted(int(f.removeprefix("fig-steps-layer")) for f in parser.figures
                      if f.startswith("fig-steps-layer")) == want
        assert text.count('<a href="#s') == len(parser.headings) - 1 - text.count("<h3")  # (a link to each section)


def test_a_shared_stores_sample_ids_and_attrs_reach_the_page_as_text(tmp_path):
    """A colleague's store may hold any text in its sample ids and attrs: `report --sample ID` put the id into the
    page as HTML (a tag in it ran its script), and a probe store's trainer and loss attrs likewise."""
    import xarray as xr
    import zarr

    path = synthetic.write_store(tmp_path / "s.zarr", "causal", layers=(0,), num_heads=2, num_frames=6)
    evil = '<img src=x onerror=alert("sid")>'
    ds = xr.open_zarr(path, consolidated=False).load()
    first = str(ds.sample.values[0])
    ds = ds.assign_coords(sample=[evil if str(s) == first else str(s) for s in ds.sample.values])
    ds.attrs["completed"] = [str(s) for s in ds.sample.values]
    shutil.rmtree(path)
    ds.to_zarr(path, consolidated=False)
    assert str(zarr.open_group(path, mode="r").attrs["completed"][0]) == evil
    text = Path(report.build_report(path, tmp_path / "s.html", sample=evil)).read_text()
    assert evil not in text and "&lt;img src=x onerror=alert(&quot;sid&quot;)&gt;" in text


def test_numbers_that_round_to_zero_have_no_minus(compare_report):
    """'-0.0000' in the ranked table (d_sink_mass) read as a small decrease."""
    from studies.page import Page, number

    assert [number(v, "{:.4f}") for v in (-1e-6, -0.0, 0.0, -0.2, float("-inf"))] == \
        ["0.0000", "0.0000", "0.0000", "-0.2000", "-inf"]
    assert [number(v, "{:+.3g}") for v in (-1e-9, 1e-9)] == ["-1e-09", "+1e-09"]
    assert [number(v, s) for v, s in ((-0.0, "{:+.3g}"), (-0.004, "{:+.2f}"), (-0.001, "{:.0%}"))] == \
        ["+0", "+0.00", "0%"]
    assert [number(v, s) for v, s in ((-0.001, "{:>8.2f}"), (-0.01, "{:.1f} s"), (-0.001, "{: .2f}"), (-3, "{:d}"),
                                      (-0.0, "{:.2e}"))] == ["    0.00", "0.0 s", " 0.00", "-3", "0.00e+00"]
    page = Page("t")
    page.table(pd.DataFrame({"d": [-1e-7, -0.5]}), float_format="{:.4f}")
    assert ">0.0000<" in page.parts[0] and "-0.0000" not in page.parts[0] and ">-0.5000<" in page.parts[0]
    assert "-0.0000" not in compare_report.read_text()


def test_figures_fit_the_window(store_report, compare_report):
    """At 800 px the heatmap and bar rows (1120-1140 px wide) hid their last head and colour bar behind a scroll
    bar, with a title cut: each figure is drawn at most as wide as its box, its title inside it; a window narrower
    than a figure's minimum scrolls it rather than squash it. (One browser serves both widths: each page is loaded
    afresh at its width, so its figures are fitted as in a window opened that wide.)"""
    from browser import chromium

    from studies.page import min_figure_width

    fit = """[...document.querySelectorAll('.figure')].map(f => { const b = f.getBoundingClientRect();
        const s = f.querySelector('.svg-container').getBoundingClientRect(), t = f.querySelector('.gtitle');
        const tb = t ? t.getBoundingClientRect() : b;
        return {id: f.firstChild.id, box: b.width, fig: s.width, scrolls: f.scrollWidth > f.clientWidth + 1,
                title: tb.left >= b.left - 1 && tb.right <= b.right + 1}; })"""
    with chromium(viewport=(800, 900)) as browser:
        page = browser.new_page()
        for width in (800, 1280):
            page.set_viewport_size({"width": width, "height": 900})
            for path in (store_report, compare_report):
                page.goto(path.as_uri())
                assert page.evaluate("window.innerWidth") == width
                page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length === "
                                       "document.querySelectorAll('.plotly-graph-div').length")
                boxes = page.evaluate(fit)
                assert boxes and not [b for b in boxes if b["fig"] > b["box"] + 1 or b["scrolls"] or not b["title"]]
                if width == 800:
                    assert any(json.loads(page.evaluate(f"document.getElementById('{b['id']}-json').textContent"))
                               ["layout"].get("width", 0) > 800 for b in boxes)  # (there were figures to fit)
        page.set_viewport_size({"width": 420, "height": 900})  # (narrower than the minimum: it scrolls)
        page.wait_for_timeout(600)
        figure = parse(compare_report)[0].figures["fig-js"]["layout"]["width"]
        drawn = page.evaluate("document.querySelector('#fig-js .svg-container').getBoundingClientRect().width")
        assert abs(drawn - min_figure_width(figure)) <= 1


def test_the_report_says_what_computed_the_numbers(stores, store_report, tmp_path):
    """The facts table names the dtype, attention kernel and capture mode the store records, and call shapes a
    kernel refused at run time (attr attn_refused), which the page said nothing of."""
    import shutil

    import zarr

    path = tmp_path / "s.zarr"
    shutil.copytree(stores["sf"], path)
    group = zarr.open_group(str(path), mode="r+")
    group.attrs.update(capture_mode="indicator", attn_refused=["cudnn refused q [1, 4680, 12, 128], k ... (shape)",
                                                               "cudnn refused q [1, 1560, 12, 128] ..."])
    _, text = parse(report.build_report(path, tmp_path / "s.html"))
    assert ("<td>float32, synthetic, indicator; 2 call shape(s) refused by a kernel at run time ran the next kernel "
            "of the order (attr attn_refused): cudnn refused q [1, 4680, 12, 128], k ... (shape) ...</td>") in text
    _, plain = parse(store_report)
    assert "<td>float32, synthetic, ?</td>" in plain


def test_a_report_beside_a_store_with_dots_in_its_name_is_its_own(stores, tmp_path, capsys):
    """runs/run.v1.5 (a store named without .zarr) got runs/run.v1.html: the name of another store's report."""
    from workbench.cli import main

    store = tmp_path / "run.v1.5"
    shutil.copytree(stores["sf"], store)
    assert main(["report", str(store)]) == 0
    assert (tmp_path / "run.v1.5.html").is_file() and not (tmp_path / "run.v1.html").exists()
    assert f"wrote {tmp_path / 'run.v1.5.html'}" in capsys.readouterr().out


def test_every_statistic_of_the_store_is_drawn_or_named(stores, tmp_path):
    """attn_frame_entropy was captured but the report neither drew nor named it; a plugin's statistic is named with
    its unit, never silently left out."""
    ds = load_store(stores["sf"])
    dims = ("sample", "step", "layer", "head", "query_frame")
    entropy = np.full([ds.sizes[d] for d in dims], 0.5)
    entropy[..., 1, :] = 1.25  # (head 1)
    ds["attn_frame_entropy"] = (dims, entropy, {"long_name": "attention entropy over key frames", "units": "nat"})
    ds["my_stat"] = (dims, entropy, {"long_name": "my statistic", "units": "bits"})
    path = report.build_report(ds, tmp_path / "e.html", layer=1)
    parser, text = parse(path)
    fig = parser.figures["fig-entropy-layer1"]
    assert [array(t["y"])[0] for t in fig["data"][:2]] == [0.5, 1.25] and "layer 1" in fig["layout"]["title"]["text"]
    assert "Also in the store, not drawn here: attn_logit (" in text and ", my_stat (my statistic, bits)" in text
    plain = parse(report.build_report(load_store(stores["sf"]).drop_vars("attn_logit"), tmp_path / "p.html"))[1]
    assert "not drawn here" not in plain


def test_compare_page_counts_the_steps_its_means_take(stores, tmp_path):
    """A few-step store against itself matches its context pass too, which the means leave out ('mean of 4 matched
    denoising steps, not the 1 context pass' in the same page): the note on classes said 'the 5 matched steps'."""
    import re

    path = report.build_compare_report(stores["sf"], stores["sf"], tmp_path / "self.html")
    text = parse(path)[1]
    c = compare.compare_stores(*(load_store(stores["sf"]) for _ in range(2)))
    assert len(compare.averaged_matches(c)) < len(c.steps)  # (a context pass among the matches)
    said = re.search(r"averaged over the (\d+) matched (denoising )?steps", text)
    assert said and int(said.group(1)) == len(compare.averaged_matches(c)), said.group(0)
