"""The import graph of models/, workbench/, training/ and studies/: no cycle (counting imports inside functions too,
which is how models/attention.py and models/cuda_attention.py used to import each other), the layering the
project keeps (models/ imports nothing of the rest), every module importable on its own, and the old module paths
kept for users' scripts (docs/architecture.md, "Old paths kept for user scripts"): each is the new module itself,
and no code of this repository imports through one."""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "workbench", "training", "studies")

# old path -> new module. Each old path is a module that makes itself an alias of the new one.
COMMON = ("attention", "attention_kernels", "cuda_attention", "flex", "triton_attention", "triton_attention_plan",
          "triton_common", "kv_cache", "rollout", "scheduler", "labels", "window", "chunks")
WAN = ("config", "checkpoint", "fused", "rope", "triton_rope", "text_encoder", "vae", "embedded", "accel",
       "vae_fast", "triton_vae")
OLD_PATHS = {**{f"models.{m}": f"models.common.{m}" for m in COMMON},
             **{f"models.{m}": f"models.wan.{m}" for m in WAN},
             "models.sf_config": "training.config", "training.study": "studies.training"}
# and models/wan.py, now the package models/wan/: its names are read from models.wan.model (models/wan/__init__.py)
from training.trainer import MOVED as MOVED_FROM_TRAINER  # noqa: E402 (names split out of training/trainer.py)


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_name(path): path for pkg in PACKAGES for path in (ROOT / pkg).rglob("*.py")}


def _graph(modules) -> dict[str, set[str]]:
    """module -> the repository modules it imports anywhere in its body (a submodule, else its package)."""
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):  # (a package's own __init__)
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


# ------------------------------------------------------------------------------------------------ the graph


def test_no_import_cycle():
    graph = _graph(_modules())
    assert len(graph) > 120 and "models.common.attention_kernels" in graph["models.common.attention"]  # it is read
    assert "training.trainer" in graph["training.gan"] and "studies.page" in graph["studies.report"]
    assert _cycles(graph) == []


# The layers, bottom up: models <- workbench <- training, studies (design: studies read stores, training uses models
# and workbench probes). The imports that go against that order, each for a reason (docs/architecture.md):
UPWARD = {
    # the command line dispatches to every layer's commands
    "workbench.cli": {"studies", "studies.commands", "training", "training.commands"},
    "workbench.commands": {"training.config"},  # --config reads the researchers' training YAML
    "workbench.commands.evaluate": {"studies", "studies.world_metrics", "studies.world_report"},
    # the miniature world's video scores (a pixel tracker over decoded frames, no model) of intervene's effects
    "workbench.intervene": {"studies.world_metrics"},
    "workbench.scores": {"studies", "studies.world_metrics"},
    "training.commands": {"studies.training"},  # the probes' table after a run
}
# what the studies take from models/: file writing, video reading, chunk/label/window arithmetic, the world's
# definition, the zoo's names, the VAE's stride: helpers and constants, never a module that builds or runs a model
STUDIES_FROM_MODELS = {"models", "models.files", "models.video", "models.errors", "models.world",
                       "models.common.chunks", "models.common.labels", "models.common.window", "models.wan.embedded",
                       "models.wan.config"}
LAYER = {"models": 0, "workbench": 1, "training": 2, "studies": 2}


def test_the_layers_import_downwards():
    graph = _graph(_modules())
    up = {}
    for m, targets in graph.items():
        if m in OLD_PATHS:
            continue
        for t in targets:
            a, b = m.split(".")[0], t.split(".")[0]
            if LAYER[b] > LAYER[a] or (LAYER[b] == LAYER[a] and a != b):  # (training, studies: not each other)
                up.setdefault(m, set()).add(t)
    extra = {m: ts - UPWARD.get(m, set()) for m, ts in up.items() if ts - UPWARD.get(m, set())}
    assert extra == {}, "imports against the layering; move the code down, or add the edge with its reason"
    studies_models = {t for m, ts in graph.items() if m.startswith("studies") for t in ts if t.startswith("models")}
    assert studies_models <= STUDIES_FROM_MODELS, studies_models - STUDIES_FROM_MODELS
    assert {"models.wan.model", "models.common.rollout", "models.wan.vae"}.isdisjoint(STUDIES_FROM_MODELS)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_models_import_nothing_of_the_rest():
    graph = _graph(_modules())
    assert "training.config" in graph["models.sf_config"]  # (the one old path of models/ that leads outside)
    outside = {(m, t) for m, targets in graph.items() if m.startswith("models") and m not in OLD_PATHS
               for t in targets if not t.startswith("models")}
    assert outside == set()


def test_every_module_imports_on_its_own():
    """Each module of the four packages imports in a fresh interpreter (one per module would be slow: one
    interpreter imports them in order, each module's failure reported with its name)."""
    names = sorted(_modules())
    code = f"""
import importlib, json
bad = {{}}
for name in {names!r}:
    try:
        importlib.import_module(name)
    except Exception as err:
        bad[name] = repr(err)
print(json.dumps(bad))
"""
    res = _run(code)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {}


def test_light_modules_do_not_import_torch():
    """What the CLI's --help, the studies and the family description import stays torch-free (the moves did not
    change that: models/wan/__init__.py reads the old module's names lazily)."""
    light = ["models.family", "models.wan.config", "models.common.chunks", "models.common.window",
             "models.common.labels", "models.world", "workbench.cli", "studies", "models.config", "workbench.inputs"]
    res = _run(f"import sys\nfor m in {light!r}:\n    __import__(m)\n"
               "from studies.commands import layer_list\nassert layer_list(['0-3', '5']) == [0, 1, 2, 3, 5]\n"
               "print('torch' in sys.modules)")  # (report and compare read --layer: it imported the extract stack)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_a_model_built_on_meta_imports_no_compiler():
    """`workbench info` builds the model on the meta device; the blocks' random initial modulation went through
    torch's reference ops there, which import torch._dynamo and sympy: 3 of its 5 s on a 2-core CPU."""
    res = _run("import sys, torch\nfrom models.wan.config import preset\nfrom models.wan.model import WanModel\n"
               "with torch.device('meta'):\n    model = WanModel(preset('tiny'), causal=True)\n"
               "assert model.blocks[0].modulation.is_meta\n"
               "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


# -------------------------------------------------------------------------------------------- the old paths


def test_old_paths_are_the_new_modules():
    for old, new in OLD_PATHS.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    import models.wan
    import models.wan.model as model

    public = [n for n in vars(model) if not n.startswith("_")]
    assert "WanModel" in public and "through_cache" in public
    # a name that is also a submodule is the submodule (models.wan.checkpoint; the old module's `checkpoint` was
    # torch.utils.checkpoint's function, which no script would import from here)
    submodules = {p.stem for p in (ROOT / "models" / "wan").glob("[a-z]*.py")}
    assert [n for n in public if getattr(models.wan, n) is not getattr(model, n)] == ["checkpoint"]
    assert all(getattr(models.wan, n) is importlib.import_module(f"models.wan.{n}") for n in submodules)
    assert set(models.wan.__all__) == set(public)  # `from models.wan import *`, as from the old module


def test_every_alias_module_is_listed_and_documented():
    aliases = {_name(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
               if "sys.modules[__name__] =" in p.read_text()}
    assert aliases == set(OLD_PATHS)
    doc = (ROOT / "docs" / "architecture.md").read_text()
    for old, new in OLD_PATHS.items():
        assert f"{old.replace('.', '/')}.py" in doc and new.replace(".", "/") in doc, old
    assert "models/wan.py" in doc


def test_every_long_module_is_named_with_its_reason():
    """docs/architecture.md lists the modules over 500 lines and why each is long: a module that grows past 500
    lines is named there (the list had gone stale: seven were missing and four counts were off by 70-300 lines)."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc[doc.index("Modules over 500 lines"):]
    section = section[:section.index("\n\n")]
    long = sorted(str(p.relative_to(ROOT)) for p in _modules().values() if len(p.read_text().splitlines()) > 500)
    assert long and [p for p in long if p not in section] == []


def test_names_moved_out_of_the_trainer_still_import_from_it():
    import training.trainer

    for name, module in MOVED_FROM_TRAINER.items():
        assert getattr(training.trainer, name) is getattr(importlib.import_module(module), name), name
    assert {"check_config", "build_trainer", "latest_checkpoint", "build_ode_pairs"} <= set(MOVED_FROM_TRAINER)


def test_old_embedded_command_still_runs():
    res = subprocess.run([sys.executable, "-m", "models.embedded", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and "--from-checkpoint" in res.stdout, res.stderr


def _old_path_uses(path: Path) -> list[str]:
    """Imports (and dotted-name strings, as monkeypatch targets) of an old path in one file."""
    wan_modules = {p.stem for p in (ROOT / "models" / "wan").glob("[a-z]*.py")}
    old_modules = set(OLD_PATHS) | {"models.wan"}  # (models.wan as a module: only its submodules are new paths)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name in OLD_PATHS or a.name == "models.wan"]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if node.module in OLD_PATHS:
                out.append(node.module)
            elif node.module == "models.wan":
                out += [f"models.wan.{a.name}" for a in node.names if a.name not in wan_modules]
            elif node.module in ("models", "training"):
                out += [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in old_modules]
            elif node.module == "training.trainer":
                out += [f"training.trainer.{a.name}" for a in node.names if a.name in MOVED_FROM_TRAINER]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value:
            out += [node.value for old in OLD_PATHS if node.value == old or node.value.startswith(old + ".")]
    return out


def _python_files() -> list[str]:
    """The repository's Python files, relative to ROOT: git's list in a checkout; in an unpacked archive (no .git)
    every .py file outside hidden folders and virtual environments."""
    if (ROOT / ".git").exists():
        return subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.split()
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                  if not any(part.startswith(".") or part in ("venv", "build", "__pycache__")
                             for part in p.relative_to(ROOT).parts[:-1]))


def test_no_code_here_imports_an_old_path():
    files = _python_files()
    skip = {f"{old.replace('.', '/')}.py" for old in OLD_PATHS} | {"tests/test_imports.py"}  # (which names them)
    assert len(files) > 150
    found = {f: uses for f in files if f not in skip and (uses := _old_path_uses(ROOT / f))}
    assert found == {}


def test_old_path_finder_finds_them(tmp_path):
    src = tmp_path / "user.py"
    src.write_text("import models.rollout\nfrom models.config import preset\nfrom models import attention, world\n"
                   "from models.wan import WanModel, vae\nfrom training.study import table\n"
                   "x = 'models.rollout._rollout_graphs'\nfrom models.wan.model import WanModel\n"
                   "from training.trainer import Trainer, check_config\n")
    assert _old_path_uses(src) == ["models.rollout", "models.config", "models.attention", "models.wan.WanModel",
                                   "training.study", "training.trainer.check_config", "models.rollout._rollout_graphs"]
