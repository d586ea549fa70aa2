"""A researcher's own model folders and checkpoints, and the mistakes made with them (found by trying the
workbench with official-format folders): each is refused in one line before any work, or, where a run is made,
the store knows exactly which weights and text encoder made it.

- a store takes samples of one DiT (every shard of a sharded folder counted) and one text encoder;
- a device this machine does not have, a --wan-dir that does not exist or holds no DiT weights, a folder without
  the VAE generate decodes with: one line, before any weights are read;
- a checkpoint of another size without --wan-dir says that the embedded toy config was used;
- the Wan folder's own weights in the default (few-step) sampler get a note saying so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import models.wan.text_encoder
from conftest import tiny_model
from models.wan.checkpoint import save_self_forcing
from models.wan.embedded import EMBEDDED_DIR
from workbench.cli import main as cli_main

FAST = ["--layer", "0", "--steps", "0", "--frames", "3", "--no-progress"]


def _error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"workbench {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def folder(tmp_path) -> Path:
    """An official-format Wan folder at toy size (a copy of the embedded one, its own DiT, T5, VAE, tokenizer)."""
    return shutil.copytree(EMBEDDED_DIR, tmp_path / "wan", ignore=shutil.ignore_patterns("checkpoints", "*.py"))


def test_a_store_takes_samples_of_one_text_encoder_and_one_set_of_shards(folder, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = str(tmp_path / "s.zarr")
    assert cli_main(["extract", *FAST, "--wan-dir", str(folder), "--out", out]) == 0
    t5 = folder / models.wan.text_encoder.WEIGHTS_NAME
    sd = torch.load(t5, weights_only=True)
    name = sorted(sd)[0]
    sd[name] = sd[name] * 0
    torch.save(sd, t5)  # another text encoder, the same DiT
    capsys.readouterr()
    assert cli_main(["extract", *FAST, "--wan-dir", str(folder), "--out", out, "--seed", "1"]) != 0
    assert "text_encoder" in _error(capsys, "extract")

    # a sharded DiT: a change in any shard is another model
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    from models.wan.checkpoint import save_wan_folder
    from models.wan.config import WanConfig

    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    (sharded / "diffusion_pytorch_model.safetensors").unlink()
    config = WanConfig.from_json(folder / "config.json")
    save_wan_folder(sharded, config, weights, shard_size=50, video_size=(96, 128))  # (tensors a shard)
    shards = sorted(sharded.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1
    out2 = str(tmp_path / "sh.zarr")
    assert cli_main(["extract", *FAST, "--wan-dir", str(sharded), "--out", out2]) == 0
    import xarray as xr

    ds = xr.open_zarr(out2, consolidated=False)
    assert Path(str(ds["checkpoint"].values[0])).is_file()  # the index, a file that is there
    last = load_file(shards[-1])
    key = sorted(last)[0]
    last[key] = last[key] + 1
    save_file(last, shards[-1])
    capsys.readouterr()
    assert cli_main(["extract", *FAST, "--wan-dir", str(sharded), "--out", out2, "--seed", "1"]) != 0
    assert "model.weights" in _error(capsys, "extract")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
@pytest.mark.parametrize("argv", [["extract", "--layer", "0", "--device", "cuda"], ["generate", "--device", "cuda:0"],
                                  ["info", "--device", "cuda"], ["intervene", "--ablate", "0:0", "--device", "cuda"]])
def test_a_device_this_machine_lacks_is_one_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv) == 2
    assert "this machine has no CUDA GPU" in _error(capsys, argv[0])
    assert cli_main(["extract", "--layer", "0", "--device", "gpu"]) == 2
    assert "device 'gpu': use cpu, cuda or cuda:N" in _error(capsys, "extract")
    assert list(tmp_path.iterdir()) == []


def test_folders_without_what_a_command_reads_are_one_line(folder, tmp_path, capsys, monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("work started before the request was checked")

    monkeypatch.setattr(models.wan.text_encoder.TextEncoder, "from_wan_dir", refuse)
    assert cli_main(["extract", "--layer", "0", "--wan-dir", str(tmp_path / "Wan2.1-T2V-1.3b")]) == 2
    assert f"--wan-dir '{tmp_path / 'Wan2.1-T2V-1.3b'}' does not exist" in _error(capsys, "extract")
    (folder / "google").rename(tmp_path / "tokenizer_elsewhere")  # the text encoder's files, checked up front
    assert cli_main(["generate", "--wan-dir", str(folder), "--out", str(tmp_path / "g")]) == 2
    assert "tokenizer folder not found" in _error(capsys, "generate")
    (tmp_path / "tokenizer_elsewhere").rename(folder / "google")
    t5 = folder / "models_t5_umt5-xxl-enc-bf16.pth"
    t5.rename(tmp_path / "t5.pth")
    assert cli_main(["extract", "--layer", "0", "--wan-dir", str(folder), "--out", str(tmp_path / "x.zarr")]) == 2
    assert "text encoder weights" in _error(capsys, "extract") and not list(tmp_path.glob(".x.zarr.lock*"))
    (tmp_path / "t5.pth").rename(t5)
    (folder / "Wan2.1_VAE.pth").unlink()
    assert cli_main(["generate", "--wan-dir", str(folder), "--out", str(tmp_path / "g")]) == 2
    assert "has no Wan2.1_VAE.pth: the VAE decodes the videos" in _error(capsys, "generate")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    assert cli_main(["extract", "--layer", "0", "--wan-dir", str(folder), "--out", str(tmp_path / "x.zarr")]) == 2
    assert "has no DiT weights: neither diffusion_pytorch_model.safetensors nor" in _error(capsys, "extract")
    assert not (tmp_path / "g").exists() and not (tmp_path / "x.zarr").exists()


def test_a_checkpoint_of_another_size_without_wan_dir_says_which_config_ran(tmp_path, capsys):
    ckpt = tmp_path / "sf.pt"
    save_self_forcing(ckpt, generator=tiny_model().state_dict())
    assert cli_main(["extract", *FAST, "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.zarr")]) != 0
    err = _error(capsys, "extract")
    assert "does not fit the model" in err and "the weights are a model of 2 layers of width 64" in err
    assert "No --wan-dir was given, so the model was built from the embedded toy model's config.json" in err


def test_the_wan_folders_own_weights_in_the_few_step_sampler_get_a_note(folder, tmp_path, capsys):
    assert cli_main(["extract", *FAST, "--wan-dir", str(folder), "--out", str(tmp_path / "a.zarr")]) == 0
    assert "note: the Wan folder's own weights (no --checkpoint) ran in the causal few-step sampler" \
        in capsys.readouterr().out
    assert cli_main(["extract", *FAST, "--wan-dir", str(folder), "--sampler", "causal_few_step",
                     "--out", str(tmp_path / "b.zarr")]) == 0
    assert "note:" not in capsys.readouterr().out  # asked for by name


def test_info_gives_the_kv_cache_per_layer_and_in_all(capsys):
    """21 latent frames of 1560 tokens, keys and values of width 1536 in bf16: 192 MiB a layer, 5.62 GiB for 30."""
    assert cli_main(["info", "--preset", "wan2.1-t2v-1.3b", "--device", "cpu"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("KV cache"))
    assert line.split(None, 3)[3] == ("32760 tokens per layer, 192 MiB of keys and values per layer in bf16, 5.62 GiB "
                                      "over the 30 layers")
