"""The study notebooks execute top to bottom (nbclient, kernel python3) on a small store, and their paired
.ipynb files are in sync with the jupytext .py sources and carry no outputs.

Each notebook asserts the invariants it relies on (rows sum to 1, NaN exactly outside the key window, ...), so a
run that finishes checked real properties of the store it was given. The stores come from two fixtures,
`store_for_notebooks` and `wan_store_for_notebooks`: real stores that `workbench extract` makes from the
embedded default model (the few-step causal rollout and the bidirectional Wan sampler). Planted-structure checks
of the studies library live in test_studies_*.py.
"""

from __future__ import annotations

import os
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
    # the kernel is a child process: it finds `studies` through PYTHONPATH and draws figures as small JSON
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
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
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PLOTLY_RENDERER", "json")
    nb = inject_parameters(jupytext.read(REPO / "notebooks" / "01_overview.py"), {"store": str(broken)})
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="rows must sum to 1"):
        client.execute()
