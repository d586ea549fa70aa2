"""The researchers' YAML files load unchanged through the structured config (training/config.py, merged
onto configs/default_config.yaml as their `train.py` does)."""

import json

import pytest

from models.errors import ModelInputError
from training.config import load_config


def test_dmd_config_merges_onto_default():
    cfg = load_config("configs/self_forcing_dmd.yaml")
    assert cfg.denoising_step_list == [1000, 750, 500, 250] and cfg.warp_denoising_step is True
    assert cfg.model_kwargs.timestep_shift == 5.0 and cfg.model_kwargs.local_attn_size == -1
    assert cfg.real_name == "Wan2.1-T2V-14B" and cfg.lr_critic == 4e-7 and cfg.weight_decay == 0.01
    assert cfg.num_frames == 81 and cfg.context_noise == 0 and cfg.independent_first_frame is False  # from default
    assert cfg.image_or_video_shape == [1, 21, 16, 60, 104] and cfg.num_frame_per_block == 3
    assert cfg.negative_prompt.startswith("色调艳丽")


def test_sid_config_keeps_its_quirks():
    cfg = load_config("configs/self_forcing_sid.yaml")
    assert cfg.real_name == "Wan2.1-T2V-1.3B" and cfg.lr_critic == 2e-6 and cfg.weight_decay == 0.0
    assert cfg.sid_alpha == 1.0
    assert cfg.distribution_loss == "dmd"  # as shipped: the SiD config's distribution_loss is dmd, so it trains DMD


def test_a_config_without_lr_critic_trains_the_critic_at_lr(tmp_path):
    """Their trainer: `config.lr_critic if hasattr(config, "lr_critic") else config.lr` (a schema default of 4e-7
    trained such a config's critic 5x slower than theirs, silently); an override of lr moves it too, an explicit
    lr_critic stays."""
    text = open("configs/self_forcing_sid.yaml").read()
    assert "lr_critic: 2.0e-06\n" in text
    no_critic = tmp_path / "no_lr_critic.yaml"
    no_critic.write_text(text.replace("lr_critic: 2.0e-06\n", ""))
    assert load_config(no_critic).lr_critic == 2e-6
    assert load_config(no_critic, overrides=["lr=3e-5"]).lr_critic == 3e-5
    assert load_config(no_critic, overrides=["lr=3e-5", "lr_critic=1e-7"]).lr_critic == 1e-7
    assert load_config("configs/self_forcing_dmd.yaml", overrides=["lr=3e-5"]).lr_critic == 4e-7


def test_a_checkpoint_of_a_trainer_without_a_critic_resumes_over_the_old_lr_critic_default():
    """Checkpoints written when lr_critic defaulted to 4e-7 hold that value; an ODE run now reads lr there, and a
    run without a critic resumes (one with a critic is refused, naming the key)."""
    from omegaconf import OmegaConf

    from training.checkpoints import check_resumed_config
    from training.errors import TrainingError

    for trainer, refused in (("ode", False), ("diffusion", False), ("score_distillation", True)):
        cfg = load_config("configs/self_forcing_dmd.yaml", overrides=[f"trainer={trainer}", "lr_critic=2e-6"])
        saved = OmegaConf.to_yaml(cfg).replace("lr_critic: 2.0e-06", "lr_critic: 4.0e-07")
        assert "lr_critic: 4.0e-07" in saved
        if refused:
            with pytest.raises(TrainingError, match="critic trained at lr_critic 4e-07, the default before 2026-12-05 "
                                                    "for a config without lr_critic; .* --set lr_critic=4e-7"):
                check_resumed_config(cfg, saved, "runs/x")
        else:
            check_resumed_config(cfg, saved, "runs/x")


def test_gradient_checkpointing_changes_on_resume_only_where_it_changes_no_gradient():
    """Under text_kv_gradient follows_checkpointing (the default, the researchers') activation checkpointing decides
    whether the text keys/values carry gradient: a resume that turned it on or off trained another gradient without
    a word; it is refused there, and changes freely under every_exit."""
    from omegaconf import OmegaConf

    from training.checkpoints import check_resumed_config
    from training.errors import TrainingError

    for mode, refused in (("follows_checkpointing", True), ("every_exit", False)):
        then = load_config("configs/self_forcing_dmd.yaml", overrides=["gradient_checkpointing=true",
                                                                        f"text_kv_gradient={mode}"])
        now = load_config("configs/self_forcing_dmd.yaml", overrides=["gradient_checkpointing=false",
                                                                       f"text_kv_gradient={mode}"])
        if refused:
            with pytest.raises(TrainingError, match="gradient_checkpointing: True in the checkpoint, False now") as err:
                check_resumed_config(now, OmegaConf.to_yaml(then), "runs/x")
            allowed = str(err.value).split("Only ")[1]  # (not among what may change here: said where it may)
            assert "gradient_checkpointing" not in allowed.split(" may change")[0]
            assert allowed.endswith("(gradient_checkpointing too where text_kv_gradient is every_exit or "
                                    "first_forward)")
        else:
            check_resumed_config(now, OmegaConf.to_yaml(then), "runs/x")


def test_a_logdir_of_another_run_takes_no_steps_of_a_resumed_checkpoint(tmp_path):
    """A checkpoint resumed into a logdir whose config.yaml is another run's is refused wherever the checkpoint lies
    (copied out of its logdir, or reached through a link in this one); the same run continued (its config.yaml
    written by an earlier try, or an older one without keys added since) goes on; an unreadable one is named."""
    from omegaconf import OmegaConf

    from training.checkpoints import check_same_run
    from training.config import recorded
    from training.errors import TrainingError

    cfg = load_config("configs/self_forcing_dmd.yaml")
    logdir, ck = tmp_path / "b", tmp_path / "copied" / "checkpoint_model_000004"
    logdir.mkdir()
    ck.mkdir(parents=True)
    check_same_run(cfg, logdir, ck)  # (no run there yet)
    mine = OmegaConf.to_yaml(recorded(cfg))
    (logdir / "config.yaml").write_text(mine)
    check_same_run(cfg, logdir, ck / "model.pt")  # (this run, stopped before its first checkpoint here)
    (logdir / "config.yaml").write_text(mine.replace("text_kv_gradient: follows_checkpointing\n", ""))
    check_same_run(cfg, logdir, ck)  # (an older config.yaml: the key at its default)
    other = load_config("configs/self_forcing_dmd.yaml", overrides=["seed=5"])
    (logdir / "config.yaml").write_text(OmegaConf.to_yaml(recorded(other)))
    (logdir / "from_a").symlink_to(ck)
    for resume in (ck, ck / "model.pt", logdir / "from_a"):
        with pytest.raises(TrainingError, match=r"holds another run \(seed: 5 here, 0 in the resumed run\)"):
            check_same_run(cfg, logdir, resume)
    (logdir / "config.yaml").write_text("- not\n- a config\n")
    with pytest.raises(TrainingError, match="config.yaml cannot be read as a config"):
        check_same_run(cfg, logdir, ck)


def test_unknown_key_and_bad_type(tmp_path):
    """A typo names the closest known keys, and the file or the --set override it came from (an override's typo
    was blamed on the file); a bad value is one line naming its key."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("denoising_step_lst: [1000]\n")
    with pytest.raises(ModelInputError, match=r"bad.yaml: unknown config key 'denoising_step_lst'; did you mean "
                                              r"denoising_step_list or"):
        load_config(bad)
    bad.write_text("lr: fast\n")
    with pytest.raises(ModelInputError, match=r"^[^\n]*bad.yaml: lr: Value 'fast' of type 'str' could not be "
                                              r"converted to Float$"):
        load_config(bad)
    with pytest.raises(ModelInputError, match=r"^--set probe.evry=3: unknown config key 'probe.evry'; did you mean "
                                              r"probe.every"):
        load_config("configs/tiny_dmd.yaml", overrides=["lr=1e-4", "probe.evry=3"])
    with pytest.raises(ModelInputError, match=r"^--set lr=abc: lr: Value 'abc'"):
        load_config("configs/tiny_dmd.yaml", overrides=["lr=abc"])
    with pytest.raises(ModelInputError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides():
    cfg = load_config("configs/self_forcing_dmd.yaml", overrides=["model_kwargs.local_attn_size=12", "lr=1e-5"])
    assert cfg.model_kwargs.local_attn_size == 12 and cfg.lr == 1e-5


@pytest.mark.parametrize("name", ["tiny_teacher", "tiny_ode", "tiny_dmd", "tiny_sid", "embedded_teacher"])
def test_shipped_training_configs_pass_the_checks(name):
    """Every training YAML in configs/ loads and passes the trainer's checks before any work; the teachers, which
    need no earlier run's output, also find their files (the embedded model, synthetic data)."""
    from training.checks import check_config, check_files, load_train_config

    cfg, sets_sid_alpha = load_train_config(f"configs/{name}.yaml")
    plan = check_config(cfg, world=1, sets_sid_alpha=sets_sid_alpha)
    if plan.trainer == "diffusion":
        check_files(cfg, plan)
    if name == "embedded_teacher":  # how data/embedded's DiT was trained: the causal model on 21 frames
        assert plan.trainer == "diffusion" and cfg.causal and cfg.image_or_video_shape[1] == 21


def test_keys_their_code_reads_with_a_default(tmp_path):
    """Keys their code reads with getattr defaults load in any config: num_frame_per_block (1, frame by frame, when a
    file does not set it) and timestep_shift (1.0), loss_scale, max_pair, and the CausVid keys; workbench train
    runs the defaults of the CausVid keys and names any other value before any work."""
    from training.checks import check_config
    from training.errors import TrainingError

    bare = tmp_path / "bare.yaml"
    bare.write_text("trainer: ode\n")
    cfg = load_config(bare)
    assert cfg.num_frame_per_block == 1 and cfg.timestep_shift == 1.0  # their `getattr(args, ..., 1)` defaults
    dmd = tmp_path / "dmd.yaml"
    text = open("configs/tiny_dmd.yaml").read()
    dmd.write_text(text + "\nteacher_forcing: false\nnoise_augmentation_max_timestep: 0\nloss_scale: 1.0\n"
                          "max_pair: 100\nbackward_simulation: true\n")
    cfg = load_config(dmd)
    check_config(cfg, world=1)
    for key, value, match in (("teacher_forcing", "true", "teacher_forcing: True: CausVid's teacher forcing is not"),
                              ("noise_augmentation_max_timestep", "100", "noise augmentation"),
                              ("backward_simulation", "false", "backward_simulation: False"),
                              ("loss_scale", "2.0", "loss_scale is read by the GAN trainer only"),
                              ("max_pair", "0", "max_pair 0 must be >= 1"),
                              ("lr", "-1e-4", "lr -0.0001 must be >= 0"),  # (AdamW raised it in the first step)
                              ("lr_critic", "-1", "lr_critic -1.0 must be >= 0"),
                              ("beta2", "1.0", r"beta2 1.0 must lie in \[0, 1\)"),
                              ("batch_size", "0", "batch_size 0 must be >= 1"),
                              ("max_grad_norm", "1.0", "max_grad_norm 1.0 is not read.*max_grad_norm_generator"),
                              ("load_raw_video", "true", "load_raw_video: true .* not implemented")):
        with pytest.raises(TrainingError, match=match):
            check_config(load_config(dmd, overrides=[f"{key}={value}"]), world=1)


def test_their_wandb_and_text_encoder_keys_take_effect(tmp_path, monkeypatch):
    """wandb_host / wandb_key / wandb_entity / wandb_project reach wandb's login and init when set (the
    placeholders of their files, WANDB_PROJECT..., and empty values leave wandb's own settings), and
    text_encoder_cpu_offload keeps the text encoder on the CPU."""
    import sys
    import types

    import torch

    from training.build import text_encoder_device
    from training.logger import Logger

    calls = []
    fake = types.ModuleType("wandb")
    fake.login = lambda **kw: calls.append(("login", kw))
    fake.init = lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(log=None, finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config("configs/self_forcing_dmd.yaml")
    assert cfg.wandb_project == "WANDB_PROJECT"  # their placeholders, as shipped
    Logger(tmp_path / "a", ["csv", "wandb"], config=cfg)
    assert calls[0][0] == "init" and not {"entity", "project"} & set(calls[0][1]) and len(calls) == 1
    calls.clear()
    cfg = load_config("configs/self_forcing_dmd.yaml", overrides=["wandb_project=attn", "wandb_entity=lab",
                                                                  "wandb_key=k123", "wandb_host=''"])
    Logger(tmp_path / "b", ["csv", "wandb"], config=cfg)
    assert calls[0] == ("login", {"key": "k123"})  # (the placeholder WANDB_HOST is not a host)
    assert calls[1][0] == "init" and calls[1][1]["project"] == "attn" and calls[1][1]["entity"] == "lab"
    # the key logs in; it is never written down or uploaded (config.yaml, checkpoints, probe stores, wandb's config)
    from omegaconf import OmegaConf

    from training.config import recorded

    assert "k123" not in str(calls[1][1]["config"]) and calls[1][1]["config"]["wandb_project"] == "attn"
    assert "k123" not in OmegaConf.to_yaml(recorded(cfg)) and cfg.wandb_key == "k123"
    assert recorded(load_config("configs/self_forcing_dmd.yaml")).wandb_key == "WANDB_KEY"  # (their placeholder)
    from training.config import without_secrets  # (the command line a store or a lock records)

    assert without_secrets(["--set", "wandb_key=k123", "--set=wandb_key=k123", "my_wandb_key=x", "lr=1"]) == [
        "--set", "wandb_key=(given; not recorded)", "--set=wandb_key=(given; not recorded)", "my_wandb_key=x", "lr=1"]
    from workbench.store import StoreLock  # (train's lock names its holder by that command line, not sys.argv)

    with StoreLock(tmp_path / "log", command="workbench train --set 'wandb_key=(given; not recorded)'") as lock:
        assert json.loads(lock.holder_file.read_text())["command"].endswith("'wandb_key=(given; not recorded)'")
    from training.checkpoints import check_resumed_config

    check_resumed_config(cfg, OmegaConf.to_yaml(recorded(cfg)), tmp_path)  # (a resume may log elsewhere)
    calls.clear()
    Logger(tmp_path / "c", ["csv", "wandb"], config=load_config("configs/self_forcing_dmd.yaml",
                                                                overrides=["wandb_host=https://wandb.lab"]))
    assert calls[0] == ("login", {"host": "https://wandb.lab"})  # (a host alone logs in there, as theirs does)
    assert text_encoder_device(cfg, "cuda:1") == torch.device("cuda:1")
    offload = load_config("configs/self_forcing_dmd.yaml", overrides=["text_encoder_cpu_offload=true"])
    assert text_encoder_device(offload, "cuda:1") == torch.device("cpu")


def test_max_pair_reads_the_first_pairs(tmp_path):
    """The ODE trainer reads the first max_pair pairs of its file (their trainer/ode.py: min(len, max_pair))."""
    import torch

    from training.checks import check_config
    from training.build import read_data
    from training.data import save_latent_dataset

    pairs = tmp_path / "pairs.pt"
    latents = torch.randn(5, 4, 3, 16, 4, 6)  # [pair, kept steps, F, C, H, W]
    save_latent_dataset(pairs, [f"p{i}" for i in range(5)], latents, "ode_pairs")
    over = ["trainer=ode", f"data_path={pairs}", "image_or_video_shape=[1,3,16,4,6]", "num_training_frames=3",
            "total_batch_size=1"]
    cfg = load_config("configs/tiny_ode.yaml", overrides=over + ["max_pair=3"])
    data = read_data(cfg, check_config(cfg, world=1), seed=0)
    assert data.prompts == ["p0", "p1", "p2"] and torch.equal(data.latents, latents[:3])
    cfg = load_config("configs/tiny_ode.yaml", overrides=over)
    assert len(read_data(cfg, check_config(cfg, world=1), seed=0)) == 5


def test_a_training_size_other_than_the_model_folders_is_a_warning():
    """The researchers' configs train Wan2.1's 60 x 104 latents; on the embedded zoo (video_size 96 x 128 pixels in
    its config.json) that ran with no word of the size the model was made for."""
    from training.checks import check_config, check_files

    over = ["model_kwargs.model_name=embedded", "real_name=embedded", "fake_name=embedded", "model_root=data",
            "data_path=data/prompts/tiny.txt", "generator_ckpt=data/embedded/checkpoints/ode_init.pt", "device=cpu"]
    plan = check_config(load_config("configs/self_forcing_dmd.yaml", overrides=over), world=1)
    check_files(load_config("configs/self_forcing_dmd.yaml", overrides=over), plan)
    assert any("trains 60 x 104 latents; the model folder data/embedded records video_size 96 x 128 pixels "
               "(12 x 16 latents)" in w for w in plan.warnings), plan.warnings
    tiny = load_config("configs/tiny_dmd.yaml", overrides=["model_root=data", "data_path=data/prompts/tiny.txt",
                                                         "generator_ckpt=data/embedded/checkpoints/ode_init.pt"])
    plan = check_config(tiny, world=1)
    check_files(tiny, plan)
    assert not any("image_or_video_shape" in w for w in plan.warnings)
