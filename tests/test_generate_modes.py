"""`workbench generate` beyond one process and one text prompt: torchrun sharding (the same files as a
single-process run), --compile and --fp8, and image-to-video (--image)."""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from workbench.cli import main

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving down"]


def test_torchrun_two_cpu_processes_write_the_single_process_files(tmp_path):
    """`python -m torch.distributed.run --nproc_per_node=2` (gloo): 3 prompts x 2 seeds dealt over 2 ranks; every
    sample's file has the single-process name and bitwise the single-process latents."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["generate", "--prompts", str(prompts), "--seed", "3,4", "--frames", "6", "--no-video", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "workbench.cli", *common, "--out", str(tmp_path / "dist")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert dist.returncode == 0, dist.stderr[-3000:]
    assert dist.stdout.count("wrote 6 sample(s)") == 1 and "(2 processes)" in dist.stdout  # rank 0 reports once
    single = subprocess.run([sys.executable, "-m", "workbench.cli", *common, "--out", str(tmp_path / "one")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert names == [f"p{i:04d}-s{s}.safetensors" for i in range(3) for s in (3, 4)]
    assert sorted(p.name for p in (tmp_path / "dist").glob("*.safetensors")) == names
    for name in names:
        a, b = load_file(str(tmp_path / "dist" / name)), load_file(str(tmp_path / "one" / name))
        assert torch.equal(a["latents"], b["latents"]), name
    first = [load_file(str(tmp_path / "one" / n))["latents"] for n in names[:2]]
    assert not torch.equal(first[0], first[1])  # the samples differ (a mix-up would show)


def test_live_is_refused_under_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    import workbench.extract as extract_mod

    monkeypatch.setattr(extract_mod, "_dist", lambda: (0, 2, False))
    assert main(["generate", "--prompt", "x", "--live", "--out", str(tmp_path / "o")]) == 2
    assert "without torchrun" in capsys.readouterr().err
