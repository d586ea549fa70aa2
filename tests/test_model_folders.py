"""A researcher's own model folders and checkpoints, and the mistakes made with them (found by trying the
workbench with official-format folders): each is refused in one line before any work, or, where a run is made,
the store knows exactly which weights and text encoder made it.

- a store takes samples of one DiT (every shard of a sharded folder counted) and one text encoder;
- a device this machine does not have, a --wan-dir that does not exist or holds no DiT weights, a folder without
  the VAE generate decodes with: one line, before any weights are read;
- a checkpoint of another size without --wan-dir says that the embedded toy config was used;
- the Wan folder's own weights in the default (few-step) sampler get a note saying so;
- a diffusers pipeline folder (written by diffusers' and transformers' own save_pretrained, the text encoder in
  shards) runs as the official folder with the same weights does: the same attention, latents and frames.
"""

from __future__ import annotations

import argparse
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
    assert f"no VAE at '{folder / 'Wan2.1_VAE.pth'}' (the Wan folder's Wan2.1_VAE.pth): the VAE decodes the " \
        "videos" in _error(capsys, "generate")
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
                                      "over the 30 layers (twice that in float32, the dtype on cpu)")
    assert cli_main(["info", "--device", "cpu"]) == 0  # the embedded model's: no longer rounded to 0 MiB
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("KV cache"))
    assert "1008 tokens per layer, 504 KiB of keys and values per layer in bf16, 2.95 MiB over the 6 layers" in line


def test_info_names_the_zoo_model_its_weights_and_its_sampler(capsys):
    """`info` says which zoo model the default is, `info --model NAME` any other's weights and sampler (the
    settings `extract --model NAME` runs with); an unknown name, or --model with a checkpoint to read, is one line."""
    from models.wan.embedded import ZOO

    assert cli_main(["info", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "model: dmd (the embedded default) - the Self-Forcing DMD student (EMA), 4 warped steps"
    assert lines[1].endswith("checkpoints/self_forcing_dmd.pt (generator_ema)")
    assert lines[2] == "sampler: causal_few_step"
    for name, entry in ZOO.items():
        assert cli_main(["info", "--model", name, "--device", "cpu"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"model: {name} - {entry.description}"
        assert ("(generator_ema)" if entry.use_ema else "(generator)" if entry.checkpoint else "DiT)") in lines[1]
        sampler = {"teacher": "bidirectional, 40 steps, CFG 4", "df": "causal_multi_step_cfg, 40 steps, CFG 4"}
        assert lines[2] == f"sampler: {sampler.get(name, 'causal_few_step')}"
        assert lines[3].startswith("dim / ffn_dim")
    for argv, says in ((["--model", "techer"], "unknown model 'techer'; the embedded zoo has teacher, df, ode"),
                       (["--model", "ode", "--checkpoint", "x.pt"], "--model ode names a model of the embedded zoo")):
        assert cli_main(["info", *argv]) == 2
        assert says in capsys.readouterr().err


def test_info_says_what_a_checkpoint_holds_and_which_config_it_fits(tmp_path, capsys):
    """`info --checkpoint`: each state dict of a Self-Forcing .pt (model.-prefixed), its sizes and dtypes, which
    config it fits shape for shape (the one asked for first, then the built-in sizes), an optimiser's nested state
    counted but not fitted, other entries, and the extract commands that load it (runnable as printed: --use-ema on
    a line of its own, --trust-pickle where it was needed); a bare or diffusers-named state dict as well; a VAE is
    no DiT; a folder or a missing file is one line, status 2; lines fit 100 columns."""
    from models.wan.checkpoint import to_diffusers
    from models.wan.config import preset
    from models.wan.model import WanModel

    sd = WanModel(preset("tiny"), causal=True).to(torch.bfloat16).state_dict()
    n = sum(v.numel() for v in sd.values())
    ck = tmp_path / "run" / "checkpoint model 000100.pt"
    ck.parent.mkdir()
    save_self_forcing(ck, generator=sd, generator_ema=sd, critic=sd, step=100,
                      optimizer={"state": {0: {"exp_avg": torch.zeros(3, 4)}}, "param_groups": [{"lr": 1e-5}]})
    assert cli_main(["info", "--checkpoint", str(ck)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"checkpoint: {ck} (") and max(len(x) for x in lines if str(ck) not in x) <= 100
    for i, name in enumerate(("generator", "generator_ema", "critic")):
        assert lines[1 + 2 * i].split() == [name, str(len(sd)), "tensors,", f"{n:,}", "parameters", "(bfloat16)"]
        assert lines[2 + 2 * i].strip() == "Wan DiT, 2 layers, width 64, FFN 128: fits tiny"
    assert lines[7].split()[:2] == ["optimizer", "1"] and lines[8].strip().startswith("nested state")
    assert lines[9] == "  other entries: step 100"  # (the train step it was saved at)
    assert lines[10:] == [f"load it: workbench extract --checkpoint '{ck}' --wan-dir WAN_DIR",
                          "         (WAN_DIR: the Wan2.1 folder of tiny)",
                          "its EMA weights (generator_ema): the same with --use-ema"]
    assert cli_main(["info", "--checkpoint", str(ck), "--preset", "wan2.1-t2v-1.3b"]) == 0
    out = capsys.readouterr().out
    assert "FFN 128: does not fit wan2.1-t2v-1.3b; fits tiny" in out and "model: wan2.1-t2v-1.3b" in out
    zoo = EMBEDDED_DIR / "checkpoints" / "self_forcing_dmd.pt"
    assert cli_main(["info", "--checkpoint", str(zoo)]) == 0
    assert f"load it: workbench extract --checkpoint {zoo}\n" in capsys.readouterr().out  # (the default folder's)
    # a folder asked for: named first, in the command where the weights fit it, else the folder they fit asked for
    assert cli_main(["info", "--checkpoint", str(zoo), "--wan-dir", str(EMBEDDED_DIR)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].strip().endswith(f"FFN 384: fits {EMBEDDED_DIR}")
    assert lines[7] == f"load it: workbench extract --checkpoint {zoo} --wan-dir {EMBEDDED_DIR}"
    assert cli_main(["info", "--checkpoint", str(ck), "--wan-dir", str(EMBEDDED_DIR)]) == 0
    out = capsys.readouterr().out
    assert f"FFN 128: does not fit {EMBEDDED_DIR}; fits tiny" in out and f"--wan-dir {EMBEDDED_DIR}" not in out
    assert f"load it: workbench extract --checkpoint '{ck}' --wan-dir WAN_DIR\n" in out
    run = tmp_path / "logdir" / "checkpoint_model_000040"  # a training run's folder: its step said
    run.mkdir(parents=True)
    save_self_forcing(run / "model.pt", generator=sd)
    torch.save({"step": 40}, run / "training_state.pt")
    assert cli_main(["info", "--checkpoint", str(run / "model.pt")]) == 0
    assert capsys.readouterr().out.splitlines()[1] == ("  saved by a training run at train step 40 "
                                                       "(training_state.pt beside it resumes the run)")
    # a GAN run's critic holds its discriminator's branch beside the DiT (training/gan.py): still a DiT of its size
    from training.gan import add_classification_branch

    critic = WanModel(preset("tiny"), causal=False).to(torch.bfloat16)
    add_classification_branch(critic)
    gan = tmp_path / "gan.pt"
    save_self_forcing(gan, generator=sd, critic=critic.state_dict())
    assert cli_main(["info", "--checkpoint", str(gan)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].split()[0] == "critic" and lines[4].strip().startswith(
        "Wan DiT, 2 layers, width 64, FFN 128: fits tiny; with a GAN discriminator's branch (")
    assert lines[4].endswith("tensors: _register_tokens, _gan_ca_blocks, _cls_pred_branch)")
    torch.save(critic.state_dict(), gan)  # a critic alone, as a bare state dict: no command that would fail
    assert cli_main(["info", "--checkpoint", str(gan)]) == 0
    out = capsys.readouterr().out
    assert "a GAN critic's weights (a Wan DiT with a discriminator's branch): no generator to load" in out
    assert "load it" not in out
    bare = tmp_path / "bare.pt"
    torch.save(to_diffusers({k: v.float() for k, v in sd.items()}), bare)
    assert cli_main(["info", "--checkpoint", str(bare)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(": a bare state dict") and "(float32)" in lines[1] and lines[2].endswith("fits tiny")
    assert lines[3:] == [f"load it: workbench extract --checkpoint {bare} --wan-dir WAN_DIR",
                         "         (WAN_DIR: the Wan2.1 folder of tiny)",
                         "         (a bare state dict is read as the generator; it can also be a Wan folder's",
                         "         diffusion_pytorch_model.safetensors, beside its config.json)"]
    assert cli_main(["info", "--checkpoint", str(EMBEDDED_DIR / "diffusion_pytorch_model.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()  # (read from its header: shapes and dtypes)
    assert "(bfloat16)" in lines[1] and lines[2].endswith("FFN 384: fits the embedded default")
    assert cli_main(["info", "--checkpoint", str(EMBEDDED_DIR / "Wan2.1_VAE.pth")]) == 0
    assert capsys.readouterr().out.splitlines()[2].strip() == ("not a Wan DiT state dict (no blocks.N.self_attn / "
                                                               "ffn tensors)")
    pickled = tmp_path / "pickled.pt"
    torch.save({"generator": {f"model.{k}": v for k, v in sd.items()}, "args": argparse.Namespace(lr=1)}, pickled)
    assert cli_main(["info", "--checkpoint", str(pickled)]) == 2
    assert "--trust-pickle" in _error(capsys, "info")
    assert cli_main(["info", "--checkpoint", str(pickled), "--trust-pickle"]) == 0
    assert f"load it: workbench extract --checkpoint {pickled} --trust-pickle --wan-dir WAN_DIR\n" in \
        capsys.readouterr().out  # (the flag it needed, in the command)
    assert cli_main(["info", "--checkpoint", str(ck.parent)]) == 2
    assert "is a directory; it holds checkpoint model 000100.pt" in _error(capsys, "info")
    assert cli_main(["info", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in _error(capsys, "info")


def test_info_names_what_a_checkpoint_lacks_and_the_way_to_load_the_others(tmp_path, capsys):
    """`info --checkpoint` on files researchers have (found by QA): an EMA-only file's command carries --use-ema
    (without it extract refuses the file); a state dict of a built-in size missing a tensor says which one, not
    "fits none of the built-in sizes"; a shard index and a model folder given as --checkpoint name --wan-dir."""
    from models.wan.checkpoint import read_wan_folder

    _, sd = read_wan_folder(EMBEDDED_DIR)
    ema = tmp_path / "ema only.pt"
    save_self_forcing(ema, generator_ema=sd)
    assert cli_main(["info", "--checkpoint", str(ema)]) == 0
    command = capsys.readouterr().out.splitlines()[-1]
    assert command == f"load it: workbench extract --checkpoint '{ema}' --use-ema"
    dropped = tmp_path / "dropped.pt"
    save_self_forcing(dropped, generator={k: v for k, v in sd.items() if k != "blocks.0.cross_attn.k.bias"})
    assert cli_main(["info", "--checkpoint", str(dropped)]) == 0
    assert capsys.readouterr().out.splitlines()[2].strip() == (
        "Wan DiT, 6 layers, width 128, FFN 384: the size of the embedded default, but not its tensors "
        "(missing: blocks.0.cross_attn.k.bias)")
    assert cli_main(["info", "--checkpoint", str(dropped), "--wan-dir", str(EMBEDDED_DIR)]) == 0
    assert capsys.readouterr().out.splitlines()[2].strip().endswith(
        f"does not fit {EMBEDDED_DIR} (missing: blocks.0.cross_attn.k.bias)")
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text('{"metadata": {}, "weight_map": {}}')
    for command in ("info", "extract"):
        assert cli_main([command, "--checkpoint", str(index)]) == 2
        assert f"is the index of a model's weight shards, not a checkpoint file: give its folder as --wan-dir " \
               f"{tmp_path}" in _error(capsys, command)
    assert cli_main(["info", "--checkpoint", str(EMBEDDED_DIR)]) == 2
    assert f"a model folder (config.json): give it as --wan-dir {EMBEDDED_DIR}" in _error(capsys, "info")


# a diffusers pipeline folder


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """The embedded model as a diffusers pipeline folder, written by the libraries themselves (`WanPipeline`'s
    save_pretrained: model_index.json, transformer/, text_encoder/, tokenizer/, vae/, scheduler/), its text encoder
    re-saved in shards as the published Wan2.1-T2V-1.3B-Diffusers keeps it."""
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    from models.wan.checkpoint import read_wan_folder, to_diffusers
    from models.wan.text_encoder import TextEncoder
    from models.wan.vae import WanVAE

    config, sd = read_wan_folder(EMBEDDED_DIR)
    transformer = WanTransformer3DModel(
        patch_size=tuple(config.patch_size), num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
        in_channels=config.in_dim, out_channels=config.out_dim, text_dim=config.text_dim, freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim, num_layers=config.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=config.eps)
    transformer.load_state_dict(to_diffusers(sd), strict=True)
    encoder = TextEncoder.from_wan_dir(EMBEDDED_DIR)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    out = tmp_path_factory.mktemp("pipeline") / "Wan2.1-T2V-tiny-Diffusers"
    WanPipeline(tokenizer=encoder.tokenizer, text_encoder=encoder.model, transformer=transformer,
                vae=WanVAE.from_file(EMBEDDED_DIR / "Wan2.1_VAE.pth").model, scheduler=scheduler).save_pretrained(out)
    shutil.rmtree(out / "text_encoder")
    encoder.model.save_pretrained(out / "text_encoder", max_shard_size="100KB")
    assert len(list((out / "text_encoder").glob("model-*-of-*.safetensors"))) > 1
    return out


def test_a_diffusers_pipeline_folder_runs_as_the_official_one(pipeline, tmp_path, capsys):
    """extract and generate with --wan-dir PIPELINE give the official folder's attention and latents bit for bit
    (the same weights under diffusers' and transformers' names); its VAE decodes the same frames; its text encoder
    (other files) is another encoder to a store, whose refusal names both."""
    import numpy as np
    import xarray as xr
    from safetensors.torch import load_file

    from models.wan.folder import wan_parts
    from models.wan.vae import WanVAE

    parts = wan_parts(pipeline)
    assert (parts.layout, parts.dit.name, parts.text_encoder.name, parts.vae.parent.name) == \
        ("diffusers pipeline", "transformer", "model.safetensors.index.json", "vae")
    size = ["--height", "96", "--width", "128"]  # (diffusers' config.json records no video size: Wan2.1's is used)
    stores = {}
    for name, wan_dir in (("pipeline", pipeline), ("official", EMBEDDED_DIR)):
        stores[name] = str(tmp_path / f"{name}.zarr")
        assert cli_main(["extract", *FAST, *size, "--wan-dir", str(wan_dir), "--out", stores[name]]) == 0
        assert cli_main(["generate", "--frames", "3", *size, "--no-video", "--no-progress", "--wan-dir", str(wan_dir),
                         "--prompt", "a red square moving right", "--out", str(tmp_path / name)]) == 0
    a, b = (xr.open_zarr(stores[k], consolidated=False) for k in ("pipeline", "official"))
    assert a.attn_mass.notnull().any() and np.array_equal(a.attn_mass.values, b.attn_mass.values, equal_nan=True)
    assert torch.equal(load_file(tmp_path / "pipeline" / "p0000-s0.safetensors")["latents"],
                       load_file(tmp_path / "official" / "p0000-s0.safetensors")["latents"])
    z = torch.randn(1, 2, 16, 12, 16, generator=torch.Generator().manual_seed(0))
    official = WanVAE.from_file(EMBEDDED_DIR / "Wan2.1_VAE.pth")
    assert torch.equal(WanVAE.from_file(parts.vae).decode(z), official.decode(z))
    capsys.readouterr()
    assert cli_main(["extract", *FAST, *size, "--wan-dir", str(pipeline), "--out", stores["official"],
                     "--seed", "1"]) != 0
    assert "text_encoder" in _error(capsys, "extract")
    # the report names the folder and the text encoder that ran; info names the layout and its parts
    from studies.report import model_facts

    facts = model_facts(a)
    assert facts["model folder (--wan-dir)"] == str(pipeline)
    assert facts["text encoder sha256 (weights, tokenizer, text_len)"] != model_facts(b)[
        "text encoder sha256 (weights, tokenizer, text_len)"]
    assert cli_main(["info", "--wan-dir", str(pipeline)]) == 0
    assert f"layout: diffusers pipeline (DiT {pipeline / 'transformer'}, text encoder {parts.text_encoder}" in \
        capsys.readouterr().out


def test_a_pipeline_without_a_part_is_one_line(pipeline, tmp_path, capsys, monkeypatch):
    """A pipeline folder missing its DiT config, a text-encoder shard or its VAE, a text encoder config of settings
    not built, or a two-expert (Wan2.2) one: one line naming what is wrong, before any weights are read."""
    import json

    broken = shutil.copytree(pipeline, tmp_path / "p")
    shard = sorted((broken / "text_encoder").glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / shard.name)
    assert cli_main(["extract", *FAST, "--wan-dir", str(broken), "--out", str(tmp_path / "x.zarr")]) == 2
    assert f"weight shard '{shard}' does not exist (named by model.safetensors.index.json)" in _error(capsys, "extract")
    (tmp_path / shard.name).rename(shard)
    encoder_config = json.loads((broken / "text_encoder" / "config.json").read_text())
    (broken / "text_encoder" / "config.json").write_text(json.dumps(encoder_config | {"layer_norm_epsilon": 1e-5}))
    monkeypatch.setattr("workbench.extract.load_wan", None)  # (refused before any weights load)
    assert cli_main(["extract", *FAST, "--wan-dir", str(broken), "--out", str(tmp_path / "x.zarr")]) == 2
    assert "config.json: layer_norm_epsilon 1e-05 (umT5-XXL: 1e-06): the text encoder is built with umT5-XXL's " \
        "settings only" in _error(capsys, "extract")
    monkeypatch.undo()
    (broken / "text_encoder" / "config.json").write_text(json.dumps(encoder_config))
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert cli_main(["generate", "--wan-dir", str(broken), "--out", str(tmp_path / "g")]) == 2
    assert "(the pipeline's vae/diffusion_pytorch_model.safetensors or vae/diffusion_pytorch_model.safetensors." \
        "index.json): the VAE decodes the videos" in _error(capsys, "generate")
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps(index | {"transformer_2": ["diffusers",
                                                                                     "WanTransformer3DModel"]}))
    assert cli_main(["extract", *FAST, "--wan-dir", str(broken), "--out", str(tmp_path / "x.zarr")]) == 2
    assert "is a two-expert pipeline (model_index.json names a transformer_2" in _error(capsys, "extract")
    (broken / "model_index.json").write_text(json.dumps(index))
    config = json.loads((broken / "transformer" / "config.json").read_text())
    (broken / "transformer" / "config.json").write_text(json.dumps(config | {"num_layers": 8}))
    assert cli_main(["extract", *FAST, "--wan-dir", str(broken), "--out", str(tmp_path / "x.zarr")]) == 2
    assert f"{broken / 'transformer' / 'diffusion_pytorch_model.safetensors'} does not fit the model" in \
        _error(capsys, "extract")  # (the file that was read, in transformer/)
    (broken / "transformer" / "config.json").unlink()
    assert cli_main(["extract", *FAST, "--wan-dir", str(broken), "--out", str(tmp_path / "x.zarr")]) == 2
    assert "without transformer/config.json: its DiT is missing" in _error(capsys, "extract")
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "g").exists()


def test_a_hugging_face_cache_snapshot_reads_as_its_pipeline(pipeline, tmp_path, capsys):
    """The Hugging Face cache keeps a download as models--ORG--NAME/snapshots/HASH/ of links into blobs/: the
    snapshot runs (titles name the repository, not the hash); the repository folder itself is refused naming its
    snapshot; a link whose blob is gone is named as such; a text encoder without its tokenizer says where this
    layout keeps it, also to the library's loader (training's path)."""
    from models.errors import CheckpointError
    from models.wan.folder import folder_name
    from models.wan.text_encoder import TextEncoder

    repo = tmp_path / "hub" / "models--Wan-AI--Wan2.1-T2V-tiny-Diffusers"
    snapshot = repo / "snapshots" / "0123abcd"
    blobs = repo / "blobs"
    for path in sorted(p for p in pipeline.rglob("*") if p.is_file()):
        blob = blobs / f"{abs(hash(str(path))):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(pipeline)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    assert folder_name(snapshot) == "Wan-AI/Wan2.1-T2V-tiny-Diffusers" and folder_name(str(pipeline) + "/") == \
        pipeline.name
    assert cli_main(["extract", *FAST, "--height", "96", "--width", "128", "--wan-dir", str(snapshot),
                     "--out", str(tmp_path / "s.zarr")]) == 0
    capsys.readouterr()
    assert cli_main(["extract", *FAST, "--wan-dir", str(repo), "--out", str(tmp_path / "x.zarr")]) == 2
    assert f"a Hugging Face cache's repository folder: give a snapshot, '{snapshot}'" in \
        _error(capsys, "extract")
    vae = snapshot / "vae" / "diffusion_pytorch_model.safetensors"
    vae.resolve().unlink()
    assert cli_main(["generate", "--wan-dir", str(snapshot), "--out", str(tmp_path / "g")]) == 2
    assert f"the VAE '{vae}' is a broken link (to '{vae.readlink()}', which does not exist" in \
        _error(capsys, "generate")
    shutil.rmtree(snapshot / "tokenizer")
    with pytest.raises(CheckpointError, match=r"tokenizer folder not found: '.*' \(the pipeline's tokenizer/\)"):
        TextEncoder.from_wan_dir(snapshot)
