"""The model under nnsight 0.8.1: the recipe of docs/nnsight.md runs as written and reproduces the store's
attn_mass / attn_logit bitwise; the same holds for a windowed bfloat16 run, and wrapping changes no output.

nnsight patches the process it is imported in (Tensor.backward, optional PYMOUNT), so every nnsight run here
is a subprocess; the stores are made in-process by `workbench extract`.
"""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workbench.cli import main as cli_main

pytest.importorskip("nnsight")

REPO = Path(__file__).resolve().parents[1]


def run_script(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(path)], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_docs_recipe_runs_as_written(tmp_path, monkeypatch):
    """Every ```python block of docs/nnsight.md, in order, as one file, after the ```bash block's command."""
    doc = (REPO / "docs" / "nnsight.md").read_text()
    (bash,) = re.findall(r"```bash\n(.*?)```", doc, re.S)
    argv = bash.split()
    assert argv[0] == "workbench"
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv[1:] + ["--no-progress"]) == 0
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert len(blocks) == 3  # the reading recipe (two blocks, one file) and the editing recipe (its own file)
    script = tmp_path / "recipe.py"
    script.write_text("\n".join(blocks[:2]))
    r = run_script(script, tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "nnsight reproduces runs/layer3.zarr exactly" in r.stdout
    assert "agree with the store" in r.stdout


def test_docs_editing_recipe_matches_the_workbench_head_ablation(tmp_path):
    """The third ```python block of docs/nnsight.md: nnsight zeroes a head's attention output in every forward,
    and the video equals the workbench's HeadAblation bitwise (and differs from the plain one)."""
    doc = (REPO / "docs" / "nnsight.md").read_text()
    script = tmp_path / "edit.py"
    script.write_text(re.findall(r"```python\n(.*?)```", doc, re.S)[2])
    r = run_script(script, tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "nnsight's edit equals the workbench's head ablation bitwise" in r.stdout


CHECKS = textwrap.dedent('''
    from workbench.nnsight_recipe import FrameMatrices, extract_rollout, import_nnsight

    nnsight = import_nnsight()
    import numpy as np
    import torch

    from workbench.extract import ExtractConfig
    from workbench.store import open_store

    assert not hasattr({}, "save")  # PYMOUNT is off
    cfg = ExtractConfig(layers=[0, 4], local_attn_size=9, sink_size=3, dtype="bfloat16", prompts=PROMPTS, seeds=[5],
                        num_frames=15)
    model, drive, forwards = extract_rollout(cfg, prompt_index=1)
    plain = drive(5)
    wrapped = nnsight.NNsight(model)
    frames = {layer: FrameMatrices(num_frames=15, num_steps=5) for layer in (0, 4)}
    with wrapped.trace(5, fn=drive) as tracer:
        for _ in tracer.iter[:forwards]:
            for layer in (0, 4):
                q, k, v, call, _ = wrapped.blocks[layer].self_attn.attend.inputs[0]
                frames[layer].add(call, q, k, v)
        latents = nnsight.save(tracer.result)
    assert forwards == 25  # 5 chunks of 3 frames, 5 forwards each
    assert torch.equal(latents, plain)  # tracing changes nothing
    assert torch.equal(drive(5), plain)  # nor does the wrapper outside a trace
    store = open_store("w.zarr").sel(sample="p0001-s5")
    for layer in (0, 4):
        for name, values in frames[layer].arrays().items():
            np.testing.assert_array_equal(values, store[name].sel(layer=layer).values)
    # the comparison tells layers apart, and the window really evicted frames 3-8 for the last chunk
    assert np.nanmax(np.abs(frames[0].arrays()["attn_mass"] - store.attn_mass.sel(layer=4).values)) > 1e-2
    seen = ~np.isnan(frames[4].arrays()["attn_mass"][0, 0, 14])
    assert np.flatnonzero(seen).tolist() == [0, 1, 2] + list(range(9, 15))
    print("windowed bfloat16 layers 0 and 4 reproduced")
''')


def test_nnsight_reads_reproduce_a_windowed_bf16_store(tmp_path, monkeypatch):
    prompts = ["a red fox running through fresh snow", "a small blue boat on a misty lake"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["extract", "--layers", "0,4", "--local-attn-size", "9", "--sink-size", "3", "--dtype",
                     "bfloat16", "--prompts", str(prompt_file), "--seed", "5", "--frames", "15", "--out", "w.zarr",
                     "--no-progress"]) == 0
    script = tmp_path / "checks.py"
    script.write_text(f"PROMPTS = {prompts!r}\n" + CHECKS)
    r = run_script(script, tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "reproduced" in r.stdout


def test_the_recipe_runs_an_image_to_video_rollout_as_extract_does(tmp_path):
    """With `image` set, `extract_rollout`'s drive starts from the image's latent as frame 0 (it ran a text-to-video
    rollout: other numbers than the store's, without a word), and `forwards` leaves out the image chunk's denoising
    steps, which never run."""
    from PIL import Image

    Image.new("RGB", (64, 48), (40, 200, 60)).save(tmp_path / "first.png")
    script = tmp_path / "i2v.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        from workbench.nnsight_recipe import FrameMatrices, extract_rollout, import_nnsight

        nnsight = import_nnsight()
        from workbench.extract import ExtractConfig, run_extract
        from workbench.store import open_store

        cfg = ExtractConfig(layers=[3], image="first.png", independent_first_frame=True, num_frames=7,
                            prompts=["a green circle moving up"], out="s.zarr", progress=False)
        run_extract(cfg, log=lambda *a: None)
        model, drive, forwards = extract_rollout(cfg)
        wrapped = nnsight.NNsight(model)
        attend = wrapped.blocks[3].self_attn.attend
        frames = FrameMatrices(num_frames=7, num_steps=5)
        with wrapped.trace(42, fn=drive) as tracer:
            seen = nnsight.save([])
            for _ in tracer.iter[:forwards]:
                q, k, v, call, _o = attend.inputs[0]
                frames.add(call, q, k, v)
                seen.append(call.labels.phase)
        store = open_store("s.zarr").sel(layer=3, sample="p0000-s42")
        print("forwards", forwards, len(seen))
        for name, value in frames.arrays().items():
            print(name, np.array_equal(value, store[name].values, equal_nan=True))
    """))
    r = run_script(script, tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.splitlines()
    assert "forwards 11 11" in lines  # chunks [1, 3, 3]: the image's context pass, then 2 x (4 steps + context)
    assert "attn_mass True" in lines and "attn_logit True" in lines, r.stdout


def test_the_last_layer_is_visited_once_per_forward_under_nnsight(tmp_path):
    """docs/nnsight.md: every `Attend` module is visited once per DiT forward. The last layer's too: a context pass
    stops its last block early only while nothing watches that block (models/wan/model.py `watched`), and nnsight's
    tracing installs its controller on the modules it reads (7 context passes of 35 forwards were missed)."""
    script = tmp_path / "last.py"
    script.write_text(textwrap.dedent("""
        from workbench.nnsight_recipe import extract_rollout, import_nnsight

        nnsight = import_nnsight()
        from workbench.extract import ExtractConfig

        model, drive, forwards = extract_rollout(ExtractConfig(layers=[0]))
        wrapped = nnsight.NNsight(model)
        last = len(model.blocks) - 1
        for kind in ("self_attn", "cross_attn"):
            attend = getattr(wrapped.blocks[last], kind).attend
            with wrapped.trace(42, fn=drive) as tracer:
                phases = nnsight.save([])
                for _ in tracer.iter[:forwards]:
                    phases.append(attend.inputs[0][3].labels.phase)
            print(kind, last, forwards, len(phases), phases.count("context"))
        # the cross-attention's norm, whose pass also adds the self-attention's residual while nothing watches it
        with wrapped.trace(42, fn=drive) as tracer:
            rows = nnsight.save([])
            for _ in tracer.iter[:forwards]:
                rows.append(wrapped.blocks[last].norm3.output.shape[1])
        print("norm3", last, forwards, len(rows), rows.count(rows[0]) if len(set(rows)) == 1 else -1)
    """))
    r = run_script(script, tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["self_attn", "cross_attn", "norm3"]
    last, forwards, visits, same = map(int, lines.pop().split()[1:])
    assert visits == forwards == same == 35, lines
    for line in lines:
        last, forwards, visits, context = map(int, line.split()[1:])
        assert last > 0 and visits == forwards == 35 and context == 7, line
