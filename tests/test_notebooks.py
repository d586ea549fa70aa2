"""The study notebooks execute top to bottom (nbclient, kernel python3) on a small store, and their paired
.ipynb files are in sync with the jupytext .py sources and carry no outputs.

Each notebook asserts the invariants it relies on (rows sum to 1, NaN exactly outside the key window, ...), so a
run that finishes checked real properties of the store it was given. The stores come from two fixtures,
`store_for_notebooks` and `wan_store_for_notebooks`: real stores that `workbench extract` makes from the
embedded default model (the few-step causal rollout and the bidirectional Wan sampler). Planted-structure checks
of the studies library live in test_studies_*.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")


REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py"))
PROMPT = "A medieval castle standing on a foggy mountain, twilight lighting"


@pytest.fixture(scope="session")
def store_for_notebooks(tmp_path_factory) -> Path:
    """The store the notebooks run on (their `store` / `store_b` parameter): real attention of the embedded
    default (causal few-step rollout, 21 frames in chunks of 3), layers 0-1, two seeds, made by `extract`."""
    from workbench.extract import ExtractConfig, run_extract

    path = tmp_path_factory.mktemp("nb") / "self_forcing.zarr"
    run_extract(ExtractConfig(layers=[0, 1], prompts=[PROMPT], seeds=[0, 1], out=str(path), progress=False),
                command=["test"], log=lambda *_: None)
    return path


@pytest.fixture(scope="session")
def wan_store_for_notebooks(tmp_path_factory) -> Path:
    """Store A of 03_wan_vs_self_forcing: the same weights through the bidirectional (Wan) sampler with CFG and
    4 UniPC steps, same prompt and seeds."""
    from workbench.extract import ExtractConfig, run_extract

    path = tmp_path_factory.mktemp("nb") / "wan.zarr"
    run_extract(ExtractConfig(layers=[0, 1], prompts=[PROMPT], seeds=[0, 1], out=str(path), progress=False,
                              sampler="bidirectional", num_inference_steps=4), command=["test"], log=lambda *_: None)
    return path


def parameters_for(name: str, store: Path, wan_store: Path) -> dict:
    if name.startswith("03_"):
        return {"store_a": str(wan_store), "store_b": str(store), "layer": 1}
    return {"store": str(store), "layer": 1}


def inject_parameters(nb, params: dict):
    """Insert a cell tagged `injected-parameters` right after the `parameters` cell (papermill's convention)."""
    index = next((i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])), None)
    assert index is not None, "a study notebook needs one cell tagged 'parameters'"
    source = "\n".join(f"{key} = {value!r}" for key, value in params.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, store_for_notebooks, wan_store_for_notebooks, tmp_path, monkeypatch):
    # the kernel is a child process: it finds `studies` through PYTHONPATH (tests/conftest.py) and draws figures as
    # small JSON
    monkeypatch.setenv("PLOTLY_RENDERER", "json")
    nb = jupytext.read(path)
    nb = inject_parameters(nb, parameters_for(path.stem, store_for_notebooks, wan_store_for_notebooks))
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell, if an assertion fails
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})
               or "application/json" in o.get("data", {})]
    assert figures, "the notebook drew no figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_ipynb_is_paired_and_clean(path):
    ipynb = path.with_suffix(".ipynb")
    assert ipynb.exists(), f"run `jupytext --sync {path.name}` to create {ipynb.name}"
    source = jupytext.read(path)
    paired = nbformat.read(ipynb, as_version=4)
    strip = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert strip(paired) == strip(source), f"{ipynb.name} is out of sync: run `jupytext --sync {path.name}`"
    for cell in paired.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{ipynb.name} has outputs committed"
    params = [c for c in source.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one cell tagged 'parameters'"
    assert "runs/embedded.zarr" in params[0].source


def test_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["01_overview", "02_sinks_and_recency", "03_wan_vs_self_forcing",
                                           "04_researchers_figures"]


@pytest.mark.notebook
def test_notebook_assertions_catch_a_broken_store(store_for_notebooks, tmp_path, monkeypatch):
    """The invariants a notebook asserts are real checks: a store whose row attends a future frame fails."""
    import shutil

    import zarr

    broken = shutil.copytree(store_for_notebooks, tmp_path / "broken.zarr")
    mass = zarr.open_array(broken / "attn_mass", mode="r+")
    mass[0, 0, 0, 0, 4, 10] = 0.5  # query frame 4 (chunk 1) attending key frame 10 (chunk 3)
    monkeypatch.setenv("PLOTLY_RENDERER", "json")
    nb = inject_parameters(jupytext.read(REPO / "notebooks" / "01_overview.py"), {"store": str(broken)})
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="rows must sum to 1"):
        client.execute()


@pytest.mark.notebook
def test_an_executed_notebook_converts_to_html_with_its_figures(store_for_notebooks, tmp_path, monkeypatch):
    """`jupyter nbconvert --to html` of an executed notebook shows its figures: the notebooks choose plotly's
    renderer (`figures.use_notebook_renderer`), since plotly's own choice in a kernel (the plotly mimetype alone)
    leaves nbconvert's HTML without a figure. Rendered in headless chromium when it is installed."""
    import shutil
    import subprocess

    exporter = pytest.importorskip("nbconvert").HTMLExporter()
    monkeypatch.delenv("PLOTLY_RENDERER", raising=False)  # as a user has it
    nb = inject_parameters(jupytext.read(REPO / "notebooks" / "01_overview.py"),
                           {"store": str(store_for_notebooks), "layer": 1})
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    drawn = [c for c in nb.cells if c.cell_type == "code"
             and any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in c.get("outputs", []))]
    assert len(drawn) >= 6
    html, _ = exporter.from_notebook_node(nb)
    assert html.count('class="plotly-graph-div"') == len(drawn)
    page = tmp_path / "01_overview.html"
    page.write_text(html, encoding="utf-8")
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if chromium:
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                              "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
        assert dom.count('class="main-svg"') >= len(drawn)  # plotly drew every figure


README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    """The `workbench ...` commands of the README's bash blocks (continuation lines joined, comments dropped)."""
    text = "\n".join(re.findall(r"```bash\n(.*?)```", README, re.S)).replace("\\\n", " ").replace(" && ", "\n")
    lines = [re.sub(r"\s+#.*", "", line).strip() for line in text.splitlines()]
    return [line[line.index("workbench"):] for line in lines if "workbench" in line]


def test_every_notebook_store_is_made_by_a_readme_command():
    """Each notebook's default store comes from a README command; notebook 03's store A (Wan's sampler) from a
    bidirectional one, and the notebook's own hint says the same."""
    commands = readme_commands()
    for path in NOTEBOOKS:
        params = next(c for c in jupytext.read(path).cells if "parameters" in c.metadata.get("tags", []))
        for name, store in re.findall(r'^(store\w*) = "([^"]+)"', params.source, re.M):
            makers = [c for c in commands if c.startswith("workbench extract") and c.endswith(f"--out {store}")]
            assert makers, f"{path.name}: no README command makes {store}"
            if name == "store_a":  # Wan's sampler: asked for, or the zoo's teacher, which samples that way
                wan = ("--sampler bidirectional", "--model teacher")
                assert all(any(w in c for w in wan) for c in makers), makers
                hint = params.source.split(f'{name} = "{store}"')[0].rsplit("store_", 1)[-1].replace("\n# ", " ")
                assert any(w in hint for w in wan) and f"--out {store}" in hint


def test_readme_outputs_go_under_runs():
    """Outputs of the README's commands land in runs/ (ignored by git), not the repository root: a store made later
    would otherwise record a dirty git_commit."""
    for command in readme_commands():
        for flag, value in re.findall(r"(--out|--logdir)\s+(\S+)", command):
            assert value.startswith("runs/"), command
    gitignore = (REPO / ".gitignore").read_text().split()
    assert "/runs/" in gitignore


def test_notebooks_suggest_only_installed_tools():
    """A tool a notebook tells the reader to run is installed by the notebooks (or dev) extra."""
    import importlib.util

    for path in NOTEBOOKS:
        text = path.read_text()
        for tool in ("papermill", "nbconvert", "voila", "jupytext"):
            if re.search(rf"\b{tool}\b", text):
                assert importlib.util.find_spec(tool) is not None, f"{path.name} suggests {tool}, not installed"


def test_no_file_names_a_path_of_one_machine():
    """Docs and code use repo-relative paths (docs/dev/HELPERS.md named the paths of one machine)."""
    skip = {"runs", "build", "out", "__pycache__", "node_modules"}
    files = [p for p in REPO.rglob("*") if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".toml", ".ipynb", ".txt")
             and not any(part.startswith(".") or part in skip or part.endswith(".egg-info")
                         for part in p.relative_to(REPO).parts)]
    assert len(files) > 50
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        assert not re.search(r"(?<![\w.])/(work|home|root)/\w", text), path
        # nor do they cite the reference notes outside the repository by file name and section number
        assert not re.search(r"\b(selfforcing|perf_anchors|interp_anchors|gpu_baseline)\.md\b", text), path
