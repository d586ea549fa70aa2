"""The few-step sampler's schedule as the researchers' inference configs set it, on the command line of extract,
generate and intervene: `--config` reads one of their YAML files unchanged (merged onto
configs/default_config.yaml, as their inference.py merges it), and --denoising-step-list,
--[no-]warp-denoising-step, --timestep-shift, --context-noise and --num-frame-per-block set one key each. A run
with these settings equals the Python API's run with the same ExtractConfig, and what ran is in the labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from models.common.scheduler import FlowMatchScheduler
from workbench.cli import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--layer", "1", "--stats", "attn_mass", "--no-progress"]


def _store(path):
    return xr.open_zarr(path, consolidated=False)


def test_their_config_and_frame_by_frame_chunks_equal_the_api(tmp_path, monkeypatch):
    """--config with their DMD file (warped steps, shift 5) and --num-frame-per-block 1 (a flag wins over the file):
    chunks of one frame, the warped timesteps in the labels, and the numbers of ExtractConfig's run."""
    from workbench.extract import ExtractConfig, run_extract

    monkeypatch.chdir(tmp_path)
    cli = tmp_path / "cli.zarr"
    assert main(["extract", *FAST, "--frames", "4", "--config", str(REPO / "configs/self_forcing_dmd.yaml"),
                 "--num-frame-per-block", "1", "--out", str(cli)]) == 0
    api = tmp_path / "api.zarr"
    run_extract(ExtractConfig(layers=[1], stats=["attn_mass"], num_frames=4, num_frame_per_block=1, out=str(api),
                              progress=False))
    a, b = _store(cli), _store(api)
    assert int(a.attrs["num_frame_per_block"]) == 1 and list(a.query_chunk.values) == [0, 1, 2, 3]
    assert a.timestep.values.tolist() == [1000.0, 937.5, pytest.approx(833.3333), 625.0, 0.0]
    np.testing.assert_array_equal(a.attn_mass.values, b.attn_mass.values)
    # a query frame's own chunk is its frame: later frames are not attended (NaN, docs/store.md), rows sum to 1
    m = a.attn_mass.isel(sample=0, step=0, layer=0).values  # [head, query_frame, key_frame]
    later = np.triu(np.ones((4, 4), bool), k=1)
    assert np.isnan(m[:, later]).all() and np.allclose(np.nansum(m, -1), 1, atol=1e-5)


def test_unwarped_steps_and_a_list_ending_in_0(tmp_path, monkeypatch):
    """--no-warp-denoising-step runs the steps as timesteps (default_config.yaml's warp_denoising_step: false);
    a list ending in 0 with warping (their `cat(timesteps, [0])[1000 - s]`) adds a denoising forward at t = 0."""
    monkeypatch.chdir(tmp_path)
    assert main(["extract", *FAST, "--frames", "3", "--no-warp-denoising-step", "--context-noise", "20",
                 "--out", str(tmp_path / "u.zarr")]) == 0
    u = _store(tmp_path / "u.zarr")
    assert u.timestep.values.tolist() == [1000.0, 750.0, 500.0, 250.0, 20.0]
    assert list(u.phase.values) == ["denoise"] * 4 + ["context"]
    assert main(["extract", *FAST, "--frames", "3", "--denoising-step-list", "1000,750,500,250,0",
                 "--out", str(tmp_path / "z.zarr")]) == 0
    z = _store(tmp_path / "z.zarr")
    warped = FlowMatchScheduler(5.0).warp([1000, 750, 500, 250]).tolist()
    assert z.timestep.values.tolist() == warped + [0.0, 0.0] and list(z.phase.values) == ["denoise"] * 5 + ["context"]


def test_generate_and_intervene_take_the_schedule_and_tell_runs_apart(tmp_path, monkeypatch):
    """generate runs the schedule it is given (two steps: other latents than four) and records it, so a run with
    another schedule (or KV window) is refused before it replaces the files; intervene's store is keyed by it too."""
    from safetensors import safe_open

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "g"
    common = ["generate", "--frames", "3", "--no-video", "--no-progress", "--out", str(out)]
    assert main([*common, "--denoising-step-list", "1000,500"]) == 0
    with safe_open(out / "p0000-s0.safetensors", "pt") as f:
        two = f.get_tensor("latents")
        assert '"denoising_step_list": [1000, 500]' in f.metadata()["schedule"]
    assert main(common) == 2  # four steps would replace the two-step run's files
    assert main([*common, "--overwrite"]) == 0
    with safe_open(out / "p0000-s0.safetensors", "pt") as f:
        assert (f.get_tensor("latents") - two).abs().max() > 1e-3
    assert main([*common, "--local-attn-size", "6", "--sink-size", "3"]) == 2  # another KV window: not resumed
    fx = tmp_path / "fx.zarr"
    argv = ["intervene", "--frames", "3", "--ablate", "1:0", "--world", "off", "--no-progress", "--out", str(fx)]
    assert main([*argv, "--timestep-shift", "3"]) == 0
    assert main(argv) == 2  # another schedule: another store


def test_a_sink_without_a_window_is_named(tmp_path, capsys):
    """--sink-size with global attention (no --local-attn-size) changes nothing: the KV cache evicts nothing, so a
    run with it equals one without; said in a warning (a researchers' config may carry a sink with a global cache)."""
    from safetensors.torch import load_file

    runs = {}
    for extra in ([], ["--sink-size", "3"]):
        out = tmp_path / f"g{len(extra)}"
        assert main(["generate", "--prompt", "a blue circle moving up", "--frames", "6", "--no-video", "--no-progress",
                     "--out", str(out), *extra]) == 0
        runs[len(extra)] = load_file(str(out / "p0000-s0.safetensors"))["latents"]
        err = capsys.readouterr().err
        assert ("warning: --sink-size 3 does nothing with global attention" in err) == bool(extra)
    assert np.array_equal(runs[0].numpy(), runs[2].numpy())


def test_multi_step_flags_on_the_few_step_sampler_are_named(tmp_path, capsys):
    """--guidance-scale and --num-inference-steps change nothing in the causal few-step sampler (no CFG; its steps
    are --denoising-step-list): a run with them equals one without, and a warning says so (the flags were taken
    silently, and a store then refused the next run for a 'guidance' that had done nothing)."""
    from safetensors.torch import load_file

    runs = {}
    for extra in ([], ["--guidance-scale", "3", "--num-inference-steps", "8"]):
        out = tmp_path / f"g{len(extra)}"
        assert main(["generate", "--prompt", "a blue circle moving up", "--frames", "3", "--no-video", "--no-progress",
                     "--out", str(out), *extra]) == 0
        runs[len(extra)] = load_file(str(out / "p0000-s0.safetensors"))["latents"]
        err = capsys.readouterr().err
        assert ("warning: --num-inference-steps 8 and --guidance-scale 3 do nothing with the causal few-step "
                "sampler" in err) == bool(extra)
    assert np.array_equal(runs[0].numpy(), runs[4].numpy())
    store = ["extract", "--layer", "0", "--steps", "0", "--frames", "3", "--out", str(tmp_path / "s.zarr"),
             "--no-progress"]
    assert main(store) == 0
    assert main([*store, "--seed", "42,43", "--guidance-scale", "3"]) == 0  # (it was refused: 'model.guidance: 5.0
    assert "does nothing" in capsys.readouterr().err  # in the store, 3.0 in this run')
    assert "guidance_scale: 5.0" in xr.open_zarr(tmp_path / "s.zarr", consolidated=False).attrs["config_yaml"]


def test_their_config_gives_a_cfg_sampler_its_guidance_and_negative_prompt(tmp_path):
    """Their multi-step pipeline (causal_diffusion_inference.py) reads guidance_scale and negative_prompt from the
    config; with --config and a CFG sampler ours takes them from the file where the command line leaves them unset
    (they were the zoo's 5.0 and ""); a flag wins; the few-step sampler (no CFG) keeps its own."""
    import argparse

    from workbench.commands import resolve_model

    def resolved(**given):
        args = argparse.Namespace(model=None, wan_dir=None, checkpoint=None, use_ema=False, sampler=None,
                                  num_inference_steps=None, guidance_scale=None, negative_prompt=None,
                                  config=str(REPO / "configs" / "self_forcing_dmd.yaml"))
        vars(args).update(given)
        resolve_model(args)
        return args.guidance_scale, args.negative_prompt

    scale, negative = resolved(sampler="causal_multi_step_cfg")
    assert scale == 3.0 and negative.startswith("色调艳丽")
    assert resolved(sampler="bidirectional", guidance_scale=4.5, negative_prompt="blur") == (4.5, "blur")
    assert resolved(sampler="causal_few_step") == (5.0, "")
    assert resolved(sampler="causal_multi_step_cfg", config=None) == (5.0, "")


def test_their_config_shifts_a_cfg_sampler_by_its_top_level_timestep_shift(tmp_path):
    """Their few-step pipeline shifts with model_kwargs.timestep_shift, their multi-step one with the top-level
    timestep_shift (causal_diffusion_inference.py: args.timestep_shift)."""
    import argparse

    from workbench.commands import apply_schedule

    text = (REPO / "configs" / "self_forcing_dmd.yaml").read_text()
    text = text.replace("\ntimestep_shift: 5.0", "\ntimestep_shift: 3.0")  # (the top-level key only)
    config = tmp_path / "c.yaml"
    config.write_text(text)
    for sampler, shift in (("causal_multi_step_cfg", 3.0), ("bidirectional", 3.0), ("causal_few_step", 5.0)):
        args = argparse.Namespace(config=str(config), sampler=sampler, denoising_step_list=None,
                                  warp_denoising_step=None, timestep_shift=None, context_noise=None,
                                  num_frame_per_block=None, local_attn_size=None, sink_size=None,
                                  independent_first_frame=False)
        apply_schedule(args)
        assert args.timestep_shift == shift, sampler


def test_an_i2v_training_config_says_where_an_inference_image_comes_from(tmp_path):
    """`i2v: true` (their training key) in a --config file was read without a word, and the run made text-to-video."""
    import argparse

    from models.errors import ModelInputWarning
    from workbench.commands import apply_schedule

    config = tmp_path / "c.yaml"
    config.write_text((REPO / "configs" / "self_forcing_dmd.yaml").read_text() + "\ni2v: true\n")
    args = argparse.Namespace(config=str(config), sampler="causal_few_step", denoising_step_list=None,
                              warp_denoising_step=None, timestep_shift=None, context_noise=None,
                              num_frame_per_block=None, local_attn_size=None, sink_size=None,
                              independent_first_frame=False, image=None)
    with pytest.warns(ModelInputWarning, match="i2v is true, which trains from text-image pairs"):
        apply_schedule(args)
    import warnings

    del args.image  # a command without --image (intervene): no word about it
    for key in ("denoising_step_list", "warp_denoising_step", "timestep_shift", "context_noise", "num_frame_per_block",
                "local_attn_size", "sink_size"):
        setattr(args, key, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_schedule(args)


def test_extract_takes_the_negative_prompt_as_generate_does(monkeypatch):
    """docs/modes.md lists --negative-prompt among the flags of generate and extract; extract lacked it, and with
    --config its CFG samplers never read the file's negative_prompt."""
    import workbench.extract
    from workbench.cli import main

    seen = []
    monkeypatch.setattr(workbench.extract, "run_extract", lambda cfg, **kw: seen.append(cfg))
    config = str(REPO / "configs" / "self_forcing_dmd.yaml")
    for argv in (["--negative-prompt", "blur"], ["--config", config], []):
        assert main(["extract", "--layer", "0", "--sampler", "causal_multi_step_cfg", *argv]) == 0
    assert seen[0].negative_prompt == "blur" and seen[1].negative_prompt.startswith("色调艳丽")
    assert seen[2].negative_prompt == ""


def test_a_negative_prompt_without_cfg_is_said_and_not_kept(monkeypatch, capsys):
    """The few-step sampler has no CFG: --negative-prompt is said to do nothing and is not kept (it entered the
    store's fingerprint, so the same command without it was refused on the next run)."""
    import workbench.extract
    from workbench.cli import main

    seen = []
    monkeypatch.setattr(workbench.extract, "run_extract", lambda cfg, **kw: seen.append(cfg))
    assert main(["extract", "--layer", "0", "--negative-prompt", "blurry"]) == 0
    assert seen[0].negative_prompt == "" and "--negative-prompt 'blurry' does nothing with the causal few-step" in \
        capsys.readouterr().err


def test_a_window_with_the_bidirectional_sampler_is_said_and_not_kept(monkeypatch, capsys):
    """The bidirectional sampler attends every frame: --local-attn-size (and its sink) did nothing, without a word,
    and entered the store's settings; now said, and not kept."""
    import workbench.extract
    from workbench.cli import main

    seen = []
    monkeypatch.setattr(workbench.extract, "run_extract", lambda cfg, **kw: seen.append(cfg))
    assert main(["extract", "--layer", "0", "--model", "teacher", "--local-attn-size", "6", "--sink-size", "1"]) == 0
    assert (seen[0].sampler, seen[0].local_attn_size, seen[0].sink_size) == ("bidirectional", -1, 0)
    assert "--local-attn-size 6 does nothing with the bidirectional sampler" in capsys.readouterr().err
    assert main(["extract", "--layer", "0", "--local-attn-size", "6", "--sink-size", "1"]) == 0  # (a causal one)
    assert (seen[1].local_attn_size, seen[1].sink_size) == (6, 1) and "does nothing" not in capsys.readouterr().err
