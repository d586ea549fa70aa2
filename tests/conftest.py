"""Shared fixtures: small seeded models that keep the real frame structure (chunks of 3 latent frames), and the
embedded maker of Wan VAE / umT5 weights (data/embedded/make_text_and_vae.py)."""

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.wan.config import preset
from models.wan.model import WanModel

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "embedded"
# the subprocesses tests start (`python -m workbench.cli ...`) import this tree, not another installed copy
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: the N worker processes are the parallelism, one
    torch.set_num_threads(1)               # intra-op thread each (N x default threads oversubscribes the cores)
    os.environ["OMP_NUM_THREADS"] = "1"    # and so do the processes tests start (whose numbers some compare bitwise)


# `pytest -n 2 --dist loadfile` hands whole files to the workers in the order of collection (`pytest_configure`
# turns off xdist's own order, by number of tests): the slowest files first (each 50-180 s of the suite's ~1700 s on 2
# cores, `--durations=0`), so that none is left running alone at the end while the other worker idles
SLOW_FILES = ("test_kernels.py", "test_zoo.py", "test_store_integrity.py", "test_training_cli.py", "test_extract.py",
              "test_reports.py", "test_world_metrics.py", "test_nnsight.py", "test_intervene.py", "test_view.py",
              "test_generate_modes.py", "test_evaluate.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # (pytest-xdist 3.6+; without xdist there is nothing to order)
        config.option.loadscopereorder = False
    if getattr(config.option, "numprocesses", None):  # `-n N`: numpy's OpenBLAS takes its thread count when numpy
        # loads, in a worker before this file sets OMP_NUM_THREADS (a plugin imports numpy first); the workers,
        # started after this, inherit one BLAS thread (two per worker on 2 cores made the tracker test 2x slower)
        os.environ["OPENBLAS_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: first.get(item.path.name, len(SLOW_FILES)))  # (stable: each file's own order kept)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def caches_outside_home(tmp_path_factory):
    """The file-hash memo (models/files.py, ~/.cache/sf-workbench) and the notebook kernels' IPython profile
    (~/.ipython) go to this run's temporary folder, not the user's home. Set in os.environ, so the CLI subprocesses
    and notebook kernels that tests start inherit them (each xdist worker runs this fixture itself); a test that
    needs another value sets its own with monkeypatch."""
    names = {"WORKBENCH_CACHE": "workbench-cache", "IPYTHONDIR": "ipython"}
    saved = {name: os.environ.get(name) for name in names}
    for name, folder in names.items():
        os.environ[name] = str(tmp_path_factory.mktemp(folder))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# a small Wan2.1 VAE with the real layout (4 base channels instead of 96)
SMALL_VAE = dict(base_dim=4, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, temperal_downsample=(False, True, True))


def skip_unless_tested_triton() -> None:
    """Skip (the whole module when called at import) unless triton is installed at a version the kernels were
    tested with (models/common/triton_version.py; WORKBENCH_TRITON_UNTESTED=1 runs them on any)."""
    pytest.importorskip("triton")
    from models.common import triton_version

    if not triton_version.usable():
        pytest.skip(f"triton {triton_version.version()} is not a version the kernels were tested with "
                    f"({triton_version.TESTED}); WORKBENCH_TRITON_UNTESTED=1 runs them", allow_module_level=True)


def triton_module(name: str, *deps: str):
    """The Triton kernel module `name`, interpreted on a machine without CUDA: the test module set
    TRITON_INTERPRET=1 before importing it, but when an earlier test module imported it compiled, it (and its
    `deps`, in order) are decorated again."""
    skip_unless_tested_triton()
    common = importlib.import_module("models.common.triton_common")
    module = importlib.import_module(name)
    if not torch.cuda.is_available() and not common.INTERPRET:
        for dep in ("models.common.triton_common", *deps):
            importlib.reload(importlib.import_module(dep))
        module = importlib.reload(module)
    return module


def run_triton_check(script: str, device: str) -> None:
    """Run a kernel check script (`python -c script device`) in a fresh process from the repository root: on "cpu"
    under Triton's interpreter, on "cuda" compiled (TRITON_INTERPRET removed, even where a test module set it in
    this process). It must exit 0 and print "ok"."""
    skip_unless_tested_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", script, device], env=env, capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def embedded_maker():
    """data/embedded/make_text_and_vae.py as a module: Wan VAE / umT5 key names, shapes and seeded weights."""
    spec = importlib.util.spec_from_file_location("make_text_and_vae", EMBEDDED / "make_text_and_vae.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def small_sd():
    """The seeded state dict of the SMALL_VAE layout."""
    make = embedded_maker()
    return make.wan_vae_state_dict(make.wan_vae_shapes(**SMALL_VAE), seed=11)


def push_in_chunks(stream, latents, chunks):
    """Push latents [B, F, C, h, w] into a stream decoder in chunks of the given frame counts; checks each
    chunk's frame count (1 + 4 (n - 1) for the first, 4 n after) and returns the frames concatenated."""
    parts, start = [], 0
    for n in chunks:
        part = stream.push(latents[:, start:start + n])
        assert part.shape[2] == (1 + 4 * (n - 1) if start == 0 else 4 * n)
        parts.append(part)
        start += n
    return torch.cat(parts, dim=2)


def tiny_model(causal=True, seed=0, **overrides) -> WanModel:
    torch.manual_seed(seed)
    model = WanModel(preset("tiny", **overrides), causal=causal).eval()
    with torch.no_grad():  # peaked attention, so that wrong masks or positions show in the outputs
        for block in model.blocks:
            for attn in (block.self_attn, block.cross_attn):
                attn.norm_q.weight.uniform_(1.0, 3.0)
                attn.norm_k.weight.uniform_(1.0, 3.0)
    return model


@pytest.fixture
def one_thread():
    """Tiny models: one thread is ~40x faster than two on a busy 2-core machine (op overhead, not FLOPs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    return tiny_model()


def diverging_checkpoint(path):
    """The embedded DMD student (data/embedded/checkpoints/self_forcing_dmd.pt) with block 1's FFN output weights
    scaled to a largest |value| of 1e20: every weight finite, so the load's checks accept it, but its activations
    overflow and the rollout's latents are NaN from the first chunk on (at 1e19 they stay finite)."""
    ck = torch.load(EMBEDDED / "checkpoints" / "self_forcing_dmd.pt", map_location="cpu", weights_only=True)
    for part in ("generator", "generator_ema"):
        w = ck[part]["model.blocks.1.ffn.2.weight"]
        ck[part]["model.blocks.1.ffn.2.weight"] = w * (1e20 / w.abs().max())
    torch.save(ck, path)
    return path
