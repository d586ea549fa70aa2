"""The embedded zoo: world latents (training/world_data.py), the VAE trainer's statistics fold
(training/world_vae.py), prompt dropout, batched ODE pairs, the quick tracker, the zoo table and `--model`, and
the whole driver (training/zoo.py) shortened on the CPU: every zoo config trains and every product loads."""

import json
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import embedded_maker
from models import world
from models.errors import ModelInputError
from models.wan.embedded import EMBEDDED_DIR, ZOO, default_model, zoo_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_vae_file(tmp_path_factory):
    make = embedded_maker()
    path = tmp_path_factory.mktemp("vae") / "Wan2.1_VAE.pth"
    torch.save(dict(make.wan_vae_state_dict(make.wan_vae_shapes(base_dim=2))), path)
    return path


# ------------------------------------------------------------------------------------------------------
# world latents


def test_render_scenes_equals_world_render():
    from training.world_data import render_scenes

    scenes = [world.scene_for(p, s) for p, s in [world.dataset_item(i, 3) for i in range(5)]]
    scenes.append(world.scene_for("a yellow circle moving up", 12))
    ours = render_scenes(scenes, 9)
    ref = np.stack([world.render(s, 9) for s in scenes])
    assert ours.dtype == torch.float32 and ours.shape == (6, 3, 9, 96, 128)
    assert float((ours - torch.from_numpy(ref)).abs().max()) < 1e-6
    firsts = [0, 5, 40, 77, 200, 3]  # later frames too (the object wraps around)
    ours = render_scenes(scenes, 5, first_frames=firsts)
    ref = np.stack([world.render(s, 5, first_frame=f) for s, f in zip(scenes, firsts)])
    assert float((ours - torch.from_numpy(ref)).abs().max()) < 1e-6


def test_world_dataset_is_the_encoded_world_and_is_cached(random_vae_file, tmp_path, monkeypatch):
    from models.wan.vae import WanVAE
    from training.data import LatentDataset
    from training.world_data import make_world_dataset, world_dataset_path

    path = world_dataset_path(random_vae_file, 3, 5, 2, tmp_path)
    assert path != world_dataset_path(random_vae_file, 4, 5, 2, tmp_path)  # the key follows the settings
    assert path != world_dataset_path(random_vae_file, 3, 6, 2, tmp_path)
    monkeypatch.setattr(world, "VERSION", world.VERSION + 1)  # a set drawn by another rendering is not reused
    assert path != world_dataset_path(random_vae_file, 3, 5, 2, tmp_path)
    monkeypatch.undo()
    make_world_dataset(path, random_vae_file, 3, 5, 2, batch=2, progress=False, log=lambda *_: None)
    data = LatentDataset.from_file(path, seed=0, kind="latents")
    assert data.latents.shape == (3, 2, 16, 12, 16)
    assert data.prompts == [world.dataset_item(i, 5)[0] for i in range(3)]
    vae = WanVAE.from_file(random_vae_file)
    prompt, seed = world.dataset_item(1, 5)
    pixels, _ = world.world_video(prompt, seed, num_frames=5)
    torch.testing.assert_close(data.latents[1], vae.encode(torch.from_numpy(pixels)[None])[0], rtol=1e-4, atol=1e-4)
    stamp = path.stat().st_mtime_ns
    make_world_dataset(path, random_vae_file, 3, 5, 2, progress=False)  # cached: not made again
    assert path.stat().st_mtime_ns == stamp


def test_world_data_path_needs_diffusion_and_a_vae(tmp_path):
    from training.checks import check_config, check_files, load_train_config
    from training.errors import TrainingError

    cfg, _ = load_train_config(ROOT / "configs/zoo_teacher.yaml", [f"model_root={tmp_path}"])
    plan = check_config(cfg, 1)
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "config.json").write_text("{}")
    with pytest.raises(TrainingError, match="Wan2.1_VAE.pth"):
        check_files(cfg, plan)
    cfg, _ = load_train_config(ROOT / "configs/zoo_ode.yaml", ["data_path=world"])
    with pytest.raises(TrainingError, match="for diffusion and GAN training"):
        check_config(cfg, 1)
    # the GAN student reads the world's videos too, encoded by its generator folder's VAE
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "config.json").write_text("{}")
    (tmp_path / "ode_init.pt").write_bytes(b"")
    cfg, _ = load_train_config(ROOT / "configs/zoo_gan.yaml", [f"model_root={tmp_path}",
                                                               f"generator_ckpt={tmp_path / 'ode_init.pt'}"])
    with pytest.raises(TrainingError, match="teacher/Wan2.1_VAE.pth"):
        check_files(cfg, check_config(cfg, 1))
    cfg, _ = load_train_config(ROOT / "configs/zoo_dmd.yaml", ["prompt_dropout=0.1"])
    with pytest.raises(TrainingError, match="prompt_dropout is for diffusion"):
        check_config(cfg, 1)
    cfg, _ = load_train_config(ROOT / "configs/zoo_teacher.yaml", ["timestep_weighting=flat"])
    with pytest.raises(TrainingError, match=r"timestep_weighting 'flat'; use one of \['bump', 'uniform'\]"):
        check_config(cfg, 1)
    cfg, _ = load_train_config(ROOT / "configs/zoo_dmd.yaml", ["timestep_weighting=uniform"])
    with pytest.raises(TrainingError, match="timestep_weighting is for diffusion"):
        check_config(cfg, 1)


def test_prompt_dropout_rate_and_determinism():
    from training.trainer import Trainer

    fake = SimpleNamespace(seed=7, step=3, cfg=SimpleNamespace(prompt_dropout=0.25, negative_prompt=""))
    prompts = ["a red square moving left"] * 4000
    out = Trainer.drop_prompts(fake, prompts, list(range(4000)))
    dropped = sum(p == "" for p in out)
    assert abs(dropped / 4000 - 0.25) < 0.03
    assert Trainer.drop_prompts(fake, prompts, list(range(4000))) == out  # keyed draws: the same again
    # a sample's draw depends on its global index, not on the batch it is in
    assert Trainer.drop_prompts(fake, prompts[:10], list(range(100, 110))) == out[100:110]
    fake.step = 4
    assert Trainer.drop_prompts(fake, prompts, list(range(4000))) != out


def test_ode_pairs_do_not_depend_on_the_batch_size():
    from tests.conftest import tiny_model
    from training.rollout import make_ode_pairs

    teacher = tiny_model(causal=False)
    ctx = torch.randn(3, teacher.config.text_len, teacher.config.text_dim)
    neg = torch.zeros(1, teacher.config.text_len, teacher.config.text_dim)
    kw = dict(shape=(3, 16, 4, 6), steps=4, shift=8.0, guidance_scale=3.0, keep=(0, 2), seed=5)
    one = make_ode_pairs(teacher, ctx, neg, batch_size=1, **kw)
    two = make_ode_pairs(teacher, ctx, neg, batch_size=2, **kw)
    assert one.shape == (3, 3, 3, 16, 4, 6)
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# the VAE: its start, its own latent statistics


def test_pooling_init_is_a_block_average_codec():
    import torch.nn.functional as F

    from training.world_vae import held_out_videos, psnr
    from training.world_vae_model import decode_unclamped, encode_moments, new_vae

    model = new_vae().eval()  # the world layout, pooling init
    _, videos = held_out_videos(2, num_frames=9)
    with torch.no_grad():
        mu, _ = encode_moments(model, videos)
        recon = decode_unclamped(model, mu)
    pooled = torch.cat([F.avg_pool3d(videos[:, :, :1], (1, 8, 8)), F.avg_pool3d(videos[:, :, 1:], (4, 8, 8))], 2)
    assert float((mu[:, :3] - pooled).abs().max()) < 0.05 and float(mu[:, 3:].abs().max()) < 0.05  # spare: small
    blocks = F.interpolate(pooled, scale_factor=(1, 8, 8), mode="nearest")  # each block's mean, per latent frame
    expected = torch.cat([blocks[:, :, :1], blocks[:, :, 1:].repeat_interleave(4, dim=2)], 2)
    assert float((recon - expected).abs().max()) < 0.1
    assert psnr(recon.clamp(-1, 1), videos) > 25


def test_fold_keeps_the_round_trip_and_normalises_the_latents():
    from models.wan.vae import LATENTS_STD, VAELayout, WanVAE
    from training.world_vae import held_out_videos, raw_latent_stats
    from training.world_vae_model import fold_latent_stats, new_vae, set_posterior_width, wan_state_dict

    layout = VAELayout(2, 16, (1, 2, 2, 2), 1, (False, True, True))
    model = new_vae(layout, seed=3, pooling=False).eval()
    _, videos = held_out_videos(2, num_frames=5)
    before = WanVAE.from_state_dict(wan_state_dict(model, layout))
    with torch.no_grad():
        mu_raw = before.unnormalise(before.encode(videos[:1])).float()  # undo Wan's constants: the raw mu
        recon_before = before.decode(before.encode(videos[:1]))
    mean, std = raw_latent_stats(model, videos, "cpu")
    set_posterior_width(model, 0.1 * std)
    fold_latent_stats(model, mean, std)
    after = WanVAE.from_state_dict(wan_state_dict(model, layout))  # the loader's path, Wan's constants
    z = torch.cat([after.encode(v[None]) for v in videos])  # [2, F, 16, h, w], normalised
    per_channel = z.transpose(0, 2).reshape(16, -1).double()
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(16, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(per_channel.std(1), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-4)
    # the normalised latents are (mu - mean) / std of the unfolded model, and decoding is unchanged
    expected = (mu_raw.permute(0, 2, 1, 3, 4) - mean.view(1, 1, 16, 1, 1)) / std.view(1, 1, 16, 1, 1)
    torch.testing.assert_close(z[:1], expected.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after.decode(z[:1]), recon_before, rtol=1e-4, atol=1e-4)
    # the posterior's width is the training noise, in the folded units
    h = model._encode(videos[:1])
    sigma = torch.exp(0.5 * h[:, 16:]).mean(dim=(0, 2, 3, 4))
    torch.testing.assert_close(sigma, 0.1 * torch.tensor(LATENTS_STD), rtol=1e-4, atol=1e-6)
    # folds compose (--init-from folds again on top of a file's fold): move the folded encoder's output as
    # training would, measure and fold again: normalised again
    with torch.no_grad():
        model.quant_conv.weight[:16] *= 3.0
        model.quant_conv.bias[:16] += 0.5
    fold_latent_stats(model, *raw_latent_stats(model, videos, "cpu"))
    again = WanVAE.from_state_dict(wan_state_dict(model, layout))
    per_channel = torch.cat([again.encode(v[None]) for v in videos]).transpose(0, 2).reshape(16, -1).double()
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(16, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(per_channel.std(1), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-4)


def test_vae_trainer_runs_and_writes_the_official_layout(tmp_path):
    from models.wan.vae import WanVAE
    from training.world_vae import VAETrainConfig, train

    cfg = VAETrainConfig(base_dim=8, dim_mult="1,1,1,1", steps=2, batch=1, frames=5, crop=16, eval_videos=1,
                         eval_frames=9, log_every=1)
    metrics = train(cfg, tmp_path, log=lambda *_: None)
    vae = WanVAE.from_file(tmp_path / "Wan2.1_VAE.pth")  # the normal loader
    assert vae.layout.base_dim == 8 and vae.layout.dim_mult == (1, 1, 1, 1)
    saved = json.loads((tmp_path / "vae_metrics.json").read_text())
    assert saved["psnr_db"] == metrics["psnr_db"] and np.isfinite(saved["psnr_db"]) and len(saved["history"]) == 2
    assert len(saved["raw_mu_std"]) == 16 and saved["layout"]["dim_mult"] == [1, 1, 1, 1]
    fit = saved["fit_psnr_db"]  # never worse than the block-average start on the fitting videos
    assert fit["kept"] == ("start" if fit["trained"] < fit["start"] else "trained")


def test_vae_decoder_only_training_keeps_the_latent_space(tmp_path):
    """--decoder-from: only the decoder and post_quant_conv train; the encoder side is bitwise the file's, so a
    video encodes to the same latents (the world latents and the DiTs trained on them stay valid)."""
    from models.wan.vae import WanVAE
    from training.world_vae import VAETrainConfig, train

    src = ROOT / "data" / "zoo" / "Wan2.1_VAE.pth"
    cfg = VAETrainConfig(steps=2, batch=1, frames=5, crop=16, eval_videos=1, eval_frames=9, log_every=1, lr=1e-3,
                         decoder_from=str(src))
    train(cfg, tmp_path, log=lambda *_: None)
    start = WanVAE.from_file(src).model.state_dict()
    trained = torch.load(tmp_path / "train_state.pt", weights_only=True)["model"]  # before finish() picks one
    changed = {k for k in start if not torch.equal(start[k], trained[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)[:5]
    shipped = torch.load(tmp_path / "Wan2.1_VAE.pth", weights_only=True)  # the trained or the start decoder
    before = torch.load(src, weights_only=True)
    assert all(torch.equal(before[k], shipped[k]) for k in before if k.startswith(("encoder.", "conv1.")))
    video = torch.from_numpy(world.world_video("a red square moving left", seed=3)[0][:, :9])[None]
    assert torch.equal(WanVAE.from_file(src).encode(video), WanVAE.from_file(tmp_path / "Wan2.1_VAE.pth").encode(video))
    with pytest.raises(SystemExit, match="no such file"):
        train(VAETrainConfig(decoder_from=str(tmp_path / "missing.pth")), tmp_path / "x", log=lambda *_: None)
    with pytest.raises(SystemExit, match="--eval-frames 8"):
        train(VAETrainConfig(eval_frames=8), tmp_path / "x", log=lambda *_: None)


def test_vae_further_training_starts_from_the_file_and_trains_every_weight(tmp_path):
    """--init-from: the model starts as the file's VAE (which the loader hands out frozen) and every weight trains,
    the encoder's too; finish() then folds the statistics again on top of the file's (folds compose: see
    test_fold_keeps_the_round_trip_and_normalises_the_latents). Bad flags are refused before any work."""
    from models.wan.vae import WanVAE
    from training.world_vae import VAETrainConfig, train
    from training.world_vae_model import start_model, trained_parameters, WORLD_VAE

    src = ROOT / "data" / "zoo" / "Wan2.1_VAE.pth"
    cfg = VAETrainConfig(init_from=str(src))
    model = start_model(cfg, WORLD_VAE)
    want = WanVAE.from_file(src).model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    params = trained_parameters(model, cfg)
    assert len(params) == len(list(model.parameters())) and all(p.requires_grad for p in params)
    with pytest.raises(SystemExit, match="give one"):
        train(VAETrainConfig(init_from=str(src), decoder_from=str(src)), tmp_path / "x", log=lambda *_: None)
    with pytest.raises(SystemExit, match="--init-from .*no such file"):
        train(VAETrainConfig(init_from=str(tmp_path / "missing.pth")), tmp_path / "y", log=lambda *_: None)


# ------------------------------------------------------------------------------------------------------
# the quick tracker of the driver's check


def test_quick_track_reads_rendered_ground_truth():
    from training.zoo_check import quick_track

    for i, prompt in enumerate(world.prompt_grid()):
        video, scene = world.world_video(prompt, 100 + i, num_frames=21)
        got = quick_track(video)
        assert (got["colour"], got["shape"], got["direction"]) == world.parse_prompt(prompt), (prompt, got)


# ------------------------------------------------------------------------------------------------------
# the zoo table and --model


def test_zoo_table_and_defaults():
    assert list(ZOO) == ["teacher", "df", "ode", "dmd", "sid"]
    assert zoo_model("dmd").use_ema and zoo_model("dmd").sampler == "causal_few_step"
    assert zoo_model("teacher").checkpoint is None and zoo_model("teacher").sampler == "bidirectional"
    with pytest.raises(ModelInputError, match="unknown model 'wan'.*teacher, df, ode, dmd, sid"):
        zoo_model("wan")
    assert default_model(Path("/nonexistent")) is None  # nothing shipped there: the folder's own DiT


def test_default_model_of_a_partly_shipped_zoo(tmp_path):
    """The DMD student is the default once shipped; before, the folder's own DiT (causal), even beside a teacher."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ZOO.md").write_text("")  # the teacher alone
    (tmp_path / "checkpoints" / "self_forcing_sid.pt").write_bytes(b"")
    assert default_model(tmp_path) is None
    (tmp_path / "checkpoints" / "self_forcing_dmd.pt").write_bytes(b"")
    assert default_model(tmp_path).name == "dmd"


def test_model_option_resolves_and_refuses(tmp_path, monkeypatch):
    import argparse

    import models.wan.embedded as embedded
    from models.errors import ModelInputError
    from workbench.commands import add_model_arguments, resolve_model
    from workbench.errors import WorkbenchError

    p = argparse.ArgumentParser()
    add_model_arguments(p)
    p.add_argument("--sampler")
    p.add_argument("--num-inference-steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    monkeypatch.setattr(embedded, "EMBEDDED_DIR", tmp_path)
    with pytest.raises(WorkbenchError, match="without --wan-dir"):
        resolve_model(p.parse_args(["--model", "dmd", "--checkpoint", "x.pt"]))
    with pytest.raises(ModelInputError, match="not in data/embedded yet"):  # (models/wan/embedded.py's error)
        resolve_model(p.parse_args(["--model", "sid"]))
    args = p.parse_args([])  # nothing shipped: the folder's own DiT with the old defaults
    resolve_model(args)
    assert args.checkpoint is None and args.sampler == "causal_few_step" and args.num_inference_steps == 50
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "self_forcing_dmd.pt").write_bytes(b"")
    args = p.parse_args([])  # the zoo's default once shipped
    resolve_model(args)
    assert args.checkpoint == str(tmp_path / "checkpoints" / "self_forcing_dmd.pt") and args.use_ema
    (tmp_path / "checkpoints" / "ZOO.md").write_text("")
    args = p.parse_args(["--model", "teacher", "--guidance-scale", "2"])
    resolve_model(args)
    assert args.checkpoint is None and args.sampler == "bidirectional" and args.guidance_scale == 2.0
    assert args.num_inference_steps == ZOO["teacher"].num_inference_steps


def test_a_zoo_of_the_teacher_alone_says_what_the_default_runs(tmp_path, monkeypatch):
    """While only the teacher is shipped, the default (its weights under the causal few-step sampler) says so and
    names --model teacher; nothing is said with no zoo, with a model named, or once the DMD student ships."""
    import argparse

    import models.wan.embedded as embedded
    from workbench.commands import add_model_arguments, resolve_model

    p = argparse.ArgumentParser()
    add_model_arguments(p)
    for name in ("--sampler", "--num-inference-steps", "--guidance-scale"):
        p.add_argument(name)
    monkeypatch.setattr(embedded, "EMBEDDED_DIR", tmp_path)
    (tmp_path / "checkpoints").mkdir()

    def note(argv):
        args = p.parse_args(argv)
        resolve_model(args)
        return args.model_note is not None and "--model teacher" in args.model_note

    assert not note([])  # no zoo here: the folder's own DiT, nothing to say
    (tmp_path / "checkpoints" / "ZOO.md").write_text("")
    assert note([]) and not note(["--model", "teacher"]) and not note(["--wan-dir", str(tmp_path)])
    (tmp_path / "checkpoints" / "self_forcing_dmd.pt").write_bytes(b"")
    assert not note([])  # the DMD student is the default now


def test_evaluate_names_the_zoo(tmp_path, monkeypatch):
    import models.wan.embedded as embedded
    from workbench.cli import build_parser
    from workbench.commands.evaluate import ModelChoice, plan_runs, select_models
    from workbench.errors import WorkbenchError

    monkeypatch.setattr(embedded, "EMBEDDED_DIR", tmp_path)
    with pytest.raises(WorkbenchError, match="not in data/embedded yet"):
        select_models(build_parser().parse_args(["evaluate", "--model", "dmd"]))
    assert select_models(build_parser().parse_args(["evaluate"]))[0].label == "embedded"  # nothing shipped yet
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ZOO.md").write_text("")
    sid = tmp_path / "checkpoints" / "self_forcing_sid.pt"
    sid.write_bytes(b"")
    args = build_parser().parse_args(["evaluate", "--model", "teacher", "--model", "s=sid", "--guidance-scale", "2"])
    assert select_models(args) == [ModelChoice("teacher", None, None, False, "bidirectional", 40, 4.0, "teacher"),
                                   ModelChoice("s", None, str(sid), True, "causal_few_step", 50, 5.0, "sid")]
    monkeypatch.setattr(embedded, "EMBEDDED_DIR", EMBEDDED_DIR)  # plan against the real folder's config
    plans, _ = plan_runs(args, [ModelChoice("teacher", None, None, False, "bidirectional", 40, 4.0, "teacher")],
                         ["a red square moving left"], [0], [21], "cpu", "float32")
    cfg = plans["teacher", 21].cfg
    assert (cfg.num_inference_steps, cfg.guidance_scale) == (40, 2.0)  # the model's steps, the given guidance
    assert (cfg.model, cfg.checkpoint) == ("teacher", None)  # the folder's DiT, not the zoo's default student


def test_zoo_configs_load_and_check():
    from training.checks import check_config, load_train_config

    for name in ("teacher", "df", "ode", "dmd", "sid"):
        cfg, sets_sid_alpha = load_train_config(ROOT / f"configs/zoo_{name}.yaml")
        plan = check_config(cfg, 1, sets_sid_alpha=sets_sid_alpha)
        assert plan.shape == (21, 16, 12, 16) and not plan.warnings
        assert cfg.negative_prompt == "" and cfg.mixed_precision
    assert load_train_config(ROOT / "configs/zoo_sid.yaml")[0].distribution_loss == "sid"
    # the students' recipe is the released self_forcing_dmd/sid.yaml's: 4 warped steps, and score timesteps drawn
    # over the whole range (ts_schedule false), not only above the exit step's (their code's default)
    for name in ("dmd", "sid"):
        cfg = load_train_config(ROOT / f"configs/zoo_{name}.yaml")[0]
        released = load_train_config(ROOT / f"configs/self_forcing_{name}.yaml")[0]
        for key in ("ts_schedule", "ts_schedule_max", "warp_denoising_step", "denoising_step_list", "timestep_shift",
                    "guidance_scale", "same_step_across_blocks", "dfake_gen_update_ratio", "min_score_timestep"):
            assert cfg[key] == released[key], key
    lines = (ROOT / "data/prompts/world.txt").read_text().splitlines()
    assert lines == [p for t in range(len(world.TEMPLATES)) for p in world.prompt_grid(t)]


# ------------------------------------------------------------------------------------------------------
# the shipped zoo


def test_shipped_zoo_loads_and_meets_its_reported_numbers():
    """data/embedded as shipped: the teacher and every student checkpoint load through the normal loaders, the
    report and ZOO.md agree, the VAE is the one the zoo trained on (data/zoo) and its round trip of held-out
    world videos meets the PSNR data/zoo/README.md reports (of the first)."""
    import re

    from models.wan.checkpoint import load_wan
    from models.wan.embedded import EMBEDDED_CONFIG, ZOO_MARKER
    from models.wan.text_encoder import TextEncoder
    from models.wan.vae import WanVAE
    from training.world_vae import evaluate, held_out_videos

    assert (EMBEDDED_DIR / ZOO_MARKER).is_file() and ZOO["teacher"].shipped()
    teacher = load_wan(EMBEDDED_DIR, causal=False)
    assert teacher.config == EMBEDDED_CONFIG
    TextEncoder.from_wan_dir(EMBEDDED_DIR).encode(["a red square moving left"])
    for name, entry in ZOO.items():
        assert entry.shipped(), name  # the whole zoo ships
        if entry.checkpoint is not None:
            keys = ["generator"] + (["generator_ema"] if entry.use_ema else [])
            keys += ["critic"] if name in ("dmd", "sid") else []  # Self-Forcing's files: generator, EMA, critic
            for key in keys:
                load_wan(EMBEDDED_DIR, checkpoint=entry.checkpoint_path(), key=key, causal=key != "critic")
    report = json.loads((EMBEDDED_DIR / "checkpoints" / "zoo_report.json").read_text())["stages"]
    row = next(line for line in (EMBEDDED_DIR / ZOO_MARKER).read_text().splitlines() if line.startswith("| teacher |"))
    teacher_steps = report["teacher"].get("steps_total", report["teacher"]["steps"])
    assert row.split("|")[5].strip() == str(teacher_steps)
    assert (EMBEDDED_DIR / "Wan2.1_VAE.pth").read_bytes() == (ROOT / "data/zoo/Wan2.1_VAE.pth").read_bytes()
    # (the first held-out video's round trip: the four of the README's first figure take four times as long)
    reported = float(re.search(r"([\d.]+) dB on the first alone", (ROOT / "data/zoo/README.md").read_text()).group(1))
    measured = evaluate(WanVAE.from_file(EMBEDDED_DIR / "Wan2.1_VAE.pth"), held_out_videos(1)[1])["psnr_db"]
    assert measured >= reported - 0.01, (measured, reported)


# ------------------------------------------------------------------------------------------------------
# the driver, shortened


@pytest.mark.slow
def test_zoo_short_chain_trains_every_config_and_ships_loadable_files(tmp_path):
    """`python -m training.zoo --short`: every stage on the CPU (6 frames, 3 steps per config; with the GAN
    student, which `all` leaves out), then the shipped folder loads through the normal loaders (without the GAN
    student: not shipped), the tar parts reassemble, and a second run skips all."""
    from models.wan.checkpoint import load_wan
    from models.wan.text_encoder import TextEncoder
    from models.wan.vae import WanVAE
    from training.zoo import SHORT_CHECK_FRAMES, STAGES, main

    work, out = tmp_path / "zoo", tmp_path / "out"
    argv = ["--short", "--device", "cpu", "--work", str(work), "--no-progress", "--out", str(out)]
    assert main(argv + ["--stages", ",".join(STAGES)]) == 0
    report = json.loads((work / "zoo_report.json").read_text())
    for stage in ("teacher", "df", "ode", "dmd", "sid", "gan"):
        st = report["stages"][stage]
        assert st["steps"] == 3 and not st["stopped_early"], (stage, st)
        assert all(np.isfinite(v["last"]) for k, v in st.items() if k.endswith("_loss"))
    assert set(report["stages"]["check"]) == set(ZOO) | {"gan", "seconds", "device"}
    for name in [*ZOO, "gan"]:  # the word check of every model, at the three timesteps, on 2 videos in short mode
        words = report["stages"]["check"][name]["words"]
        assert set(words["timesteps"]) == {"900", "700", "500"} and words["videos"] == 2, (name, words)
        assert words["frames"] == SHORT_CHECK_FRAMES, (name, words)  # (the check's shortening: one chunk)
        assert all(np.isfinite(list(r["ratios"].values())).all() for r in words["timesteps"].values())
    assert "words: colour x" in (out / "zoo_log.txt").read_text()
    assert report["stages"]["vae"]["steps"] == 2 and np.isfinite(report["stages"]["vae"]["psnr_db"])
    ship = work / "ship" / "data" / "embedded"
    TextEncoder.from_wan_dir(ship).encode(["a red square moving left"])
    WanVAE.from_file(ship / "Wan2.1_VAE.pth")
    load_wan(ship, causal=False)  # the teacher
    assert json.loads((ship / "config.json").read_text())["video_size"] == [96, 128]
    assert json.loads((ship / "checkpoints" / "zoo_report.json").read_text())["stages"]["teacher"]["steps"] == 3
    for name, entry in ZOO.items():
        if entry.checkpoint is None:
            continue
        blob = torch.load(entry.checkpoint_path(ship), weights_only=True)
        want = {"df": ["generator", "generator_ema"], "ode": ["generator"]}.get(name, ["critic", "generator",
                                                                                       "generator_ema"])
        assert sorted(blob) == want, name
        assert all(k.startswith("model.") and v.dtype == torch.bfloat16 for k, v in blob["generator"].items())
        for key in want:
            load_wan(ship, checkpoint=entry.checkpoint_path(ship), key=key, causal=key != "critic")
    assert (ship / "checkpoints" / "ZOO.md").read_text().count("configs/zoo_") == 5
    # the tar parts reassemble into data/embedded/...
    parts = sorted(out.glob("zoo_embedded.tar.*"))
    assert parts and all(p.stat().st_size <= 15 * 2 ** 20 for p in parts)
    whole = tmp_path / "whole.tar"
    whole.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(whole) as t:
        assert "data/embedded/checkpoints/self_forcing_dmd.pt" in t.getnames()
        assert not any("gan" in name for name in t.getnames())
    # a second run finds every stage done (check and ship run again)
    lines = []
    from training.zoo import Zoo

    zoo = Zoo(work, device="cpu", short=True, budget=None, vae=None, source=EMBEDDED_DIR, progress=False,
              log=lines.append)
    assert [s for s in STAGES if zoo.done(s)] == [s for s in STAGES if s not in ("check", "ship")]
    # --continue trains a finished stage further from its latest checkpoint and rewrites its output
    before = (work / "teacher" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(argv + ["--stages", "teacher", "--continue", "teacher", "--set", "teacher:max_steps=5"]) == 0
    st = json.loads((work / "zoo_report.json").read_text())["stages"]["teacher"]
    assert (st["steps"], st["resumed_from"], st["calls"], st["device"]) == (5, 3, 2, "cpu"), st
    first_call = report["stages"]["teacher"]
    assert st["seconds_total"] == pytest.approx(first_call["seconds"] + st["seconds"], abs=0.11)
    assert st["generator_loss"]["first"] == first_call["generator_loss"]["first"]  # the loss the first call began at
    assert (work / "teacher" / "diffusion_pytorch_model.safetensors").read_bytes() != before
    # a stage cut short by its time share ships its trainer checkpoint in the state tar, to be continued
    from training.zoo_ship import write_tars

    report = json.loads((work / "zoo_report.json").read_text())
    report["stages"]["teacher"]["stopped_early"] = True
    report["stages"]["dmd"]["stopped_early"] = True
    (work / "zoo_report.json").write_text(json.dumps(report))
    state_out = tmp_path / "state"
    state_out.mkdir()
    write_tars(work, state_out, log=lines.append)
    whole.write_bytes(b"".join(p.read_bytes() for p in sorted(state_out.glob("zoo_state.tar.*"))))
    with tarfile.open(whole) as t:
        names = t.getnames()
    assert {"logs/teacher/checkpoint_model_000005/model.pt",
            "logs/teacher/checkpoint_model_000005/training_state.pt"} <= set(names), names
    assert not any(n.startswith("logs/df") for n in names)
    # the students trained so far travel with it (a run without the ship stage loses none of them), and a
    # distillation stage cut short is resumable as well
    assert {"teacher/checkpoints/self_forcing_dmd.pt", "teacher/checkpoints/self_forcing_sid.pt"} <= set(names), names
    assert any(n.startswith("logs/dmd/checkpoint_model_") and n.endswith("training_state.pt") for n in names), names
    with pytest.raises(SystemExit):
        main(argv + ["--stages", "df", "--continue", "teacher"])  # --continue names a stage that does not run
    # the check skips a student whose run stopped before its EMA began, and still checks the others (here the
    # teacher and the ODE student: the other students' files go, each model's check costs seconds)
    from training.zoo_check import check_models

    for name in ("df", "sid"):
        ZOO[name].checkpoint_path(work / "teacher").unlink()
    dmd = ZOO["dmd"].checkpoint_path(work / "teacher")
    blob = torch.load(dmd, weights_only=True)
    torch.save({k: v for k, v in blob.items() if k != "generator_ema"}, dmd)
    result = check_models(work / "teacher", "cpu", frames=3, short=True, log=lines.append)
    assert "generator_ema" in result["dmd"]["skipped"] and 0 <= result["ode"]["all"] <= 1, result.keys()
    assert set(result) == {"teacher", "ode", "dmd"}


def test_zoo_adds_the_inputs_a_stage_reads_when_missing():
    """A teacher continued on a fresh machine (the state tar holds no init folder) runs init and data first."""
    from training.zoo import with_prerequisites

    assert with_prerequisites(["teacher"], lambda s: False) == ["init", "data", "teacher"]
    assert with_prerequisites(["teacher", "ode"], lambda s: s == "data") == ["init", "teacher", "ode"]
    assert with_prerequisites(["dmd", "check"], lambda s: False) == ["dmd", "check"]


def test_zoo_trains_a_shipped_teacher_further_or_uses_it_as_it_is(tmp_path):
    """--init-from FOLDER starts the teacher from that folder's DiT (not the seeded init) and the report adds the
    steps and seconds its checkpoints/zoo_report.json records; --teacher FOLDER takes that teacher as it is,
    without the data it would have trained on. Bad folders and both flags at once are refused before work. The
    driver's SIGTERM handling is its own: the caller's comes back when it returns."""
    import signal

    from safetensors.torch import load_file

    from models.wan.checkpoint import save_wan_folder
    from models.wan.config import WanConfig
    from models.wan.embedded import EMBEDDED_CONFIG, make_embedded_state_dict
    from training.zoo import main

    shipped = tmp_path / "shipped"
    weights = make_embedded_state_dict(seed=7)
    save_wan_folder(shipped, EMBEDDED_CONFIG, {k: v.to(torch.bfloat16) for k, v in weights.items()})
    (shipped / "checkpoints").mkdir()
    (shipped / "checkpoints" / "zoo_report.json").write_text(json.dumps(
        {"stages": {"teacher": {"steps": 100, "seconds": 40.0, "device": "cuda"}}}))
    base = ["--short", "--device", "cpu", "--no-progress", "--stages", "teacher", "--vae", str(ROOT / "data/zoo/Wan2.1_VAE.pth")]
    work = tmp_path / "continued"
    before = signal.getsignal(signal.SIGTERM)
    assert main(base + ["--work", str(work), "--init-from", str(shipped)]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
    init = load_file(work / "init" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(init[k], v.to(torch.bfloat16).float()) for k, v in weights.items())
    st = json.loads((work / "zoo_report.json").read_text())["stages"]
    assert st["init"]["from"] == str(shipped) and st["init"]["earlier"]["steps"] == 100
    assert (st["teacher"]["steps"], st["teacher"]["steps_total"], st["teacher"]["calls"]) == (3, 103, 2)
    assert st["teacher"]["seconds_total"] == pytest.approx(40.0 + st["teacher"]["seconds"], abs=0.11)
    # continued in the same folder: the trainer's steps go on from 3, the shipped 100 still count
    assert main(base + ["--work", str(work), "--continue", "teacher", "--set", "teacher:max_steps=5"]) == 0
    again = json.loads((work / "zoo_report.json").read_text())["stages"]["teacher"]
    assert (again["steps"], again["steps_total"], again["calls"]) == (5, 105, 3), again
    assert again["seconds_total"] == pytest.approx(st["teacher"]["seconds_total"] + again["seconds"], abs=0.11)
    work = tmp_path / "as_is"
    assert main(base + ["--work", str(work), "--teacher", str(shipped)]) == 0
    teacher = load_file(work / "teacher" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(teacher[k], v.to(torch.bfloat16).float()) for k, v in weights.items())
    st = json.loads((work / "zoo_report.json").read_text())["stages"]
    assert sorted(st) == ["teacher"] and st["teacher"]["steps"] == 100  # no init, no data: nothing trained here
    # a work folder that holds a shipped zoo's report (whose init stage names an earlier teacher, as data/embedded's
    # does): the given teacher's totals are reported as they are, not added to that earlier teacher's
    (shipped / "checkpoints" / "zoo_report.json").write_text(json.dumps({"stages": {
        "teacher": {"steps": 100, "steps_total": 150, "seconds": 40.0, "seconds_total": 140.0, "calls": 3, "device": "cuda"},
        "init": {"earlier": {"steps": 50, "seconds": 100.0, "calls": 2}}}}))
    work = tmp_path / "as_is_with_report"
    work.mkdir()
    (work / "zoo_report.json").write_text((shipped / "checkpoints" / "zoo_report.json").read_text())
    assert main(base + ["--work", str(work), "--teacher", str(shipped)]) == 0
    st = json.loads((work / "zoo_report.json").read_text())["stages"]["teacher"]
    assert (st["steps_total"], st["seconds_total"], st["calls"]) == (150, 140.0, 3), st
    for argv, match in ((["--init-from", str(tmp_path / "nowhere")], "not a Wan folder"),
                        (["--init-from", str(shipped), "--teacher", str(shipped)], "give one of them")):
        with pytest.raises(SystemExit):
            main(base + ["--work", str(tmp_path / "refused")] + argv)
        assert not (tmp_path / "refused").exists()
    other = tmp_path / "other"
    save_wan_folder(other, WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=64),
                    {k: v for k, v in make_embedded_state_dict(seed=1).items() if "blocks." not in k or
                     k.split(".")[1] in ("0", "1")})
    with pytest.raises(SystemExit, match="is not the zoo's"):
        main(base + ["--work", str(tmp_path / "w3"), "--teacher", str(other)])


def test_zoo_stopped_by_sigterm_still_writes_its_log_and_report(tmp_path):
    """`timeout` stops the driver with SIGTERM: it exits through its finally block, so --out still gets the log
    (and the tars of what is done) instead of nothing."""
    import signal
    import subprocess
    import sys
    import time

    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-m", "training.zoo", "--short", "--device", "cpu", "--work", str(work),
                             "--out", str(out), "--no-progress"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (work / "vae").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)  # the driver is inside its first stage
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stdout
    log = (out / "zoo_log.txt").read_text()
    assert "[vae] start" in log and "zoo_state.tar" in log, log
    assert (out / "zoo_state.tar.00").is_file()


def test_the_library_runs_the_same_default_as_the_cli():
    """ExtractConfig without weights runs the zoo's default (the DMD student, as `workbench extract` does); a zoo
    name spells out its checkpoint and use_ema; bad names and mixed settings are refused before any work."""
    from workbench.errors import WorkbenchError
    from workbench.extract import ExtractConfig, plan

    dmd = ZOO["dmd"]
    assert dmd.shipped()
    p = plan(ExtractConfig(layers=[3]))
    assert (p.cfg.model, p.cfg.checkpoint, p.cfg.use_ema) == ("dmd", str(dmd.checkpoint_path()), True)
    assert p.checkpoint_label == "embedded:dmd" and p.family == "self_forcing"  # the store's labels
    cfg = plan(ExtractConfig(model="teacher", sampler="causal_few_step")).cfg  # the teacher's weights, causally
    assert (cfg.model, cfg.checkpoint, cfg.use_ema) == ("teacher", None, False)
    assert plan(ExtractConfig(wan_dir=str(EMBEDDED_DIR))).cfg.checkpoint is None  # a folder named: its own DiT
    with pytest.raises(WorkbenchError, match="unknown model 'nope'"):
        plan(ExtractConfig(model="nope"))
    with pytest.raises(WorkbenchError, match="give it without wan_dir, checkpoint and use_ema"):
        plan(ExtractConfig(model="teacher", checkpoint=str(dmd.checkpoint_path())))


def test_intervene_runs_the_zoo_model_it_names(capsys):
    from workbench.cli import main

    assert main(["intervene", "--model", "df", "--frames", "3", "--world", "off", "--no-progress"]) == 2
    assert "--model df: its sampler is causal_multi_step_cfg; intervene runs the causal few-step rollout" in \
        capsys.readouterr().err


def test_teacher_vs_dmd_student_ranks_heads_by_a_real_divergence(tmp_path, capsys):
    """The README's Wan-vs-Self-Forcing comparison on the shipped zoo (shortened to 9 latent frames): the DMD
    student's heads moved away from the teacher's, some far more than others, and `workbench compare` says which."""
    from studies import compare
    from workbench.cli import main
    from workbench.store import open_store

    common = ["--layers", "0-5", "--frames", "9", "--seed", "0", "--prompt", "a red square moving left", "--no-progress"]
    assert main(["extract", *common, "--model", "teacher", "--num-inference-steps", "8", "--out",
                 str(tmp_path / "wan.zarr")]) == 0
    assert main(["extract", *common, "--out", str(tmp_path / "sf.zarr")]) == 0
    capsys.readouterr()
    c = compare.compare_stores(open_store(tmp_path / "wan.zarr"), open_store(tmp_path / "sf.zarr"))
    ranking = compare.rank_heads(c)
    assert len(ranking) == 24 and c.js_bits.sizes["match"] >= 2
    top, median = float(ranking.js_bits.iloc[0]), float(ranking.js_bits.median())
    assert top > 0.1 and top > 2 * median, ranking.head()
    assert main(["compare", str(tmp_path / "wan.zarr"), str(tmp_path / "sf.zarr"), "--out",
                 str(tmp_path / "c.html")]) == 0
    out = capsys.readouterr().out
    first = ranking.iloc[0]
    assert f"{int(first['layer']):>6}{int(first['head']):>6}{first['js_bits']:>9.3f}" in out


def test_text_len_goes_into_every_folder_and_a_continued_run_keeps_it(tmp_path):
    """`--text-len N` pads the umT5 context to N positions in this run's folders (config.json); a later call on
    the same work folder keeps it, and another value is refused before any work."""
    from models.wan.text_encoder import TextEncoder
    from training.zoo import Zoo, main

    work = tmp_path / "zoo"
    argv = ["--short", "--device", "cpu", "--work", str(work), "--no-progress", "--vae",
            str(EMBEDDED_DIR / "Wan2.1_VAE.pth")]
    assert main(argv + ["--stages", "init", "--text-len", "32"]) == 0
    assert json.loads((work / "init" / "config.json").read_text())["text_len"] == 32
    assert TextEncoder.from_wan_dir(work / "init").encode(["a red square moving left"]).context.shape[1] == 32
    zoo = Zoo(work, device="cpu", short=True, budget=None, vae=None, source=EMBEDDED_DIR, progress=False)
    assert zoo.model_config.text_len == 32
    with pytest.raises(SystemExit, match="made with text_len 32"):
        Zoo(work, device="cpu", short=True, budget=None, vae=None, source=EMBEDDED_DIR, progress=False, text_len=16)
    with pytest.raises(SystemExit):
        main(argv + ["--stages", "init", "--text-len", "4"])


def test_gan_stage_without_an_ode_student_is_refused_before_work(tmp_path):
    """The GAN student starts from the ODE student: without its checkpoint (and without the ode stage or a
    generator_ckpt of the user's), `--stages gan` stops before any work, naming the file and the ways out."""
    from training.zoo import Zoo

    zoo = Zoo(tmp_path, device="cpu", short=True, budget=None, vae=None, source=EMBEDDED_DIR, progress=False,
              log=lambda *a: None, teacher=EMBEDDED_DIR)
    with pytest.raises(SystemExit, match=r"starts from the ODE student, and .*ode_init.pt is missing"):
        zoo.run(["gan"])
    assert not any(tmp_path.iterdir())  # nothing written


def test_no_progress_reaches_the_world_latents_bar(tmp_path, monkeypatch):
    """`workbench train --no-progress` with data_path: world: the bar of the world's latent set is off too (it
    was drawn whatever the flag)."""
    import training.build as build
    import training.world_data as world_data
    from training.checks import check_config, load_train_config
    from training.data import save_latent_dataset

    seen = []

    def fake(path, vae_path, num_videos, seed, latent_frames, **kw):
        seen.append(kw["progress"])
        save_latent_dataset(path, ["a red square moving right"], torch.zeros(1, latent_frames, 16, 12, 16), "latents")
        return path

    (tmp_path / "vae.pth").write_bytes(b"vae")
    monkeypatch.setattr(world_data, "make_world_dataset", fake)
    monkeypatch.setattr(build, "world_vae_path", lambda cfg: tmp_path / "vae.pth")
    cfg, _ = load_train_config(ROOT / "configs/zoo_teacher.yaml", [f"world.cache_dir={tmp_path}"])
    plan = check_config(cfg, 1)
    for progress in (False, True):
        for f in tmp_path.glob("world-*.pt"):
            f.unlink()
        build.build_data(cfg, plan, 0, progress=progress)
    assert seen == [False, True]
