"""`trainer: gan` (training/gan.py): the discriminator's branch, the losses, learning on the miniature world's
videos (world renders encoded by the embedded VAE), warm-up, bitwise resume and config errors."""

import numpy as np
import pytest
import torch

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = ["image_or_video_shape=[1,3,16,12,16]", "num_training_frames=3", "data_path=runs/world_latents.pt"]


@pytest.fixture(scope="module")
def world_set():
    """16 world videos of 3 latent frames (9 pixel frames at 96 x 128), encoded by the embedded VAE."""
    from models.wan.embedded import EMBEDDED_DIR
    from models.wan.vae import WanVAE
    from training.data import LatentDataset
    from training.i2v import world_latents

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as the tests run (one_thread), for the encoding only
    try:
        prompts, latents = world_latents(WanVAE.from_file(EMBEDDED_DIR / "Wan2.1_VAE.pth"), 16, seed=0,
                                         latent_frames=3)
    finally:
        torch.set_num_threads(threads)
    return LatentDataset(prompts, latents, "latents", seed=7)


def gan_trainer(tmp_path, data, *overrides, resume=None, device="cpu"):
    from test_training import BASE
    from training import distributed as fsdp
    from training.checks import check_config, load_train_config
    from training.gan import GanTrainer, add_classification_branch
    from training.text import HashTextEncoder
    from training.trainer import Models

    cfg, _ = load_train_config("configs/self_forcing_dmd.yaml",
                               BASE + SHAPE + ["trainer=gan", f"device={device}", *overrides])
    plan = check_config(cfg, 1)
    critic = tiny_model(causal=False, seed=2)
    add_classification_branch(critic, cfg.num_class, bool(cfg.concat_time_embeddings))
    return GanTrainer(cfg, Models(tiny_model(causal=True, seed=1), critic), HashTextEncoder(16, 32), tmp_path,
                      d=fsdp.setup(device), plan=plan, data=data, progress=False, log=lambda *a: None, resume=resume)


def test_branch_and_losses():
    from training.gan import classify, discriminator_gan_loss, gan_layers, generator_gan_loss

    assert gan_layers(30) == (13, 21, 29) and gan_layers(2) == (0, 1, 1)
    from training.gan import add_classification_branch

    critic = tiny_model(causal=False)
    add_classification_branch(critic, num_class=1)
    names = [n for n, _ in critic.named_parameters()]
    assert any(n.startswith("_register_tokens.") for n in names) and any(n.startswith("_cls_pred_branch.") for n in names)
    assert sum(n.startswith("_gan_ca_blocks.") for n in names) > 0
    x, t, ctx = torch.randn(2, 3, 16, 4, 6), torch.full((2, 3), 500.0), torch.randn(2, 16, 32)
    logits = classify(critic, x, t, ctx)
    assert logits.shape == (2, 1)
    logits.sum().backward()  # gradient reaches the branch and the backbone's blocks
    assert critic._cls_pred_branch[1].weight.grad is not None and critic.blocks[0].self_attn.q.weight.grad is not None
    fake, real = torch.tensor([[0.5], [-1.0]]), torch.tensor([[2.0], [0.0]])
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(generator_gan_loss(fake, real, 0.01, False), sp(-fake).mean() * 0.01)
    torch.testing.assert_close(discriminator_gan_loss(fake, real, 0.01, False), (sp(-real).mean() + sp(fake).mean()) * 0.01)
    torch.testing.assert_close(discriminator_gan_loss(fake, real, 1.0, True), sp(-(real - fake)).mean())


def test_discriminator_learns_world_videos_from_generated_ones(tmp_path, world_set):
    """Warm-up (only the branch trains, no generator step) on real world latents against the tiny generator's
    rollouts: the discriminator loss falls from 2 ln 2 (chance) and the real/fake logits separate; the generator
    and the backbone do not move."""
    tr = gan_trainer(tmp_path, world_set, "discriminator_warmup_steps=30", "gan_d_weight=1.0", "critic_lr=1e-3",
                     "critic_timestep_shift=1.0", "beta1_critic=0.9")
    g0 = {k: v.clone() for k, v in tr.generator.state_dict().items()}
    b0 = tr.critic.blocks[0].ffn[0].weight.clone()
    rows = tr.train(30, save_at_end=False)
    losses = [r["critic_loss"] for r in rows]
    assert all("generator_loss" not in r for r in rows)
    assert abs(np.mean(losses[:2]) - 2 * np.log(2)) < 0.3, losses[:2]
    assert np.median(losses[-10:]) < 0.25 * np.mean(losses[:3]), losses  # (median: a noisy high-t draw can spike)
    gaps = [r["gan_real_logit"] - r["gan_fake_logit"] for r in rows]
    assert np.median(gaps[-10:]) > 3.0 and abs(np.mean(gaps[:2])) < 1.0, gaps
    assert all(torch.equal(g0[k], v) for k, v in tr.generator.state_dict().items())
    assert torch.equal(tr.critic.blocks[0].ffn[0].weight, b0)  # the backbone is frozen in warm-up


def test_the_discriminator_optimiser_is_theirs(tmp_path, world_set):
    """Their trainer/gan.py: the faster group and the warm-up's trainables are `_gan_ca_blocks` and
    `_cls_pred_branch` (the register tokens stay with the backbone, at critic_lr, frozen in warm-up); with a warm-up
    AdamW's betas are (0.9, beta2_critic) throughout and its moments restart when the warm-up ends."""
    tr = gan_trainer(tmp_path / "w", world_set, "discriminator_warmup_steps=2", "critic_lr=1e-3",
                     "discriminator_lr_multiplier=5.0", "beta1_critic=0.0", "dfake_gen_update_ratio=100")
    names = {id(p): n for n, p in tr.critic.named_parameters()}
    slow, fast = ([names[id(p)] for p in g["params"]] for g in tr.critic_opt.param_groups)
    assert [g["lr"] for g in tr.critic_opt.param_groups] == [1e-3, 5e-3]
    assert any(n.startswith("_register_tokens.") for n in slow) and not any("_register_tokens" in n for n in fast)
    assert fast and all(n.startswith(("_gan_ca_blocks.", "_cls_pred_branch.")) for n in fast)
    assert all(g["betas"] == (0.9, 0.999) for g in tr.critic_opt.param_groups)
    tokens = tr.critic._register_tokens.register_tokens.detach().clone()
    head = tr.critic._cls_pred_branch[1].weight.detach().clone()
    tr.train(2, save_at_end=False)  # the warm-up
    assert torch.equal(tr.critic._register_tokens.register_tokens, tokens)
    assert not torch.equal(tr.critic._cls_pred_branch[1].weight, head)
    p = tr.critic._cls_pred_branch[1].weight
    assert int(tr.critic_opt.state[p]["step"]) == 2
    tr.train(3, save_at_end=False)  # step 2: the moments restart, every parameter trains
    assert int(tr.critic_opt.state[p]["step"]) == 1
    assert not torch.equal(tr.critic._register_tokens.register_tokens, tokens)
    none = gan_trainer(tmp_path / "n", world_set, "beta1_critic=0.0")
    assert all(g["betas"] == (0.0, 0.999) for g in none.critic_opt.param_groups)


def test_a_checkpoint_of_other_betas_does_not_resume(tmp_path, world_set):
    """A GAN checkpoint from before the discriminator's betas followed theirs (beta1_critic 0.0 through a warm-up,
    now 0.9): resuming put the old betas back silently, a run of neither rule; it is refused, naming both."""
    from training.errors import TrainingError

    over = ["discriminator_warmup_steps=4", "beta1_critic=0.0", "dfake_gen_update_ratio=100"]
    gan_trainer(tmp_path, world_set, *over).train(2)
    state_pt = tmp_path / "checkpoint_model_000002" / "training_state.pt"
    state = torch.load(state_pt, weights_only=True)
    assert state["critic_optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert gan_trainer(tmp_path, world_set, *over, resume=state_pt.parent).step == 2
    for group in state["critic_optimizer"]["param_groups"]:
        group["betas"] = (0.0, 0.999)  # what the old rule saved
    torch.save(state, state_pt)
    with pytest.raises(TrainingError, match=r"critic optimiser ran AdamW betas \(0.0, 0.999\), this run's are "
                                            r"\(0.9, 0.999\)"):
        gan_trainer(tmp_path, world_set, *over, resume=state_pt.parent)


def test_generator_steps_and_bitwise_resume(tmp_path, world_set):
    over = ["dfake_gen_update_ratio=2", "log_iters=2", "gan_g_weight=1.0", "gan_d_weight=1.0", "r1_weight=0.1",
            "r2_weight=0.1"]
    a = gan_trainer(tmp_path / "a", world_set, *over)
    a.train(4)
    rows = a.history
    assert [("generator_loss" in r) for r in rows] == [True, False, True, False]
    # the generator's logit under its own name (the critic's, logged after it, took gan_fake_logit's place)
    assert [("generator_fake_logit" in r) for r in rows] == [True, False, True, False]
    assert all("gan_fake_logit" in r and "gan_real_logit" in r for r in rows)
    assert all("r1_loss" in r and "r2_loss" in r for r in rows)
    b = gan_trainer(tmp_path / "b", world_set, *over)
    b.train(2)
    c = gan_trainer(tmp_path / "b", world_set, *over, resume=tmp_path / "b" / "checkpoint_model_000002")
    c.train(4)
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in c.history] == [strip(r) for r in rows[2:]]
    for k, v in a.critic.state_dict().items():
        assert torch.equal(v, c.critic.state_dict()[k]), k
    for k, v in a.generator.state_dict().items():
        assert torch.equal(v, c.generator.state_dict()[k]), k


def test_gan_config_errors():
    from test_training import BASE
    from training.checks import check_config, load_train_config
    from training.errors import TrainingError

    for over, message in ((["num_class=0"], "num_class"), (["r1_sigma=0"], "r1_sigma 0.0 must be positive"),
                          (["data_path=prompts.txt"], "real latents"),  # (0: a ZeroDivisionError after warm-up)
                          (["dfake_gen_update_ratio=0"], "dfake_gen_update_ratio 0 must be >= 1"),
                          (["critic_timestep_shift=0"], "critic_timestep_shift 0.0 must be positive")):
        cfg, _ = load_train_config("configs/self_forcing_dmd.yaml", BASE + ["trainer=gan", *over])
        with pytest.raises(TrainingError, match=message):
            check_config(cfg, 1)


def test_shipped_gan_and_i2v_configs_pass_the_checks():
    from training.checks import check_config, load_train_config

    for name, trainer in (("world_gan", "gan"), ("world_i2v_dmd", "score_distillation")):
        cfg, _ = load_train_config(f"configs/{name}.yaml")
        assert check_config(cfg, 1).trainer == trainer


def test_real_latents_of_another_length_are_refused_before_work(tmp_path):
    """World videos encoded with another frame count than the generator makes: a clear error naming both shapes
    and the command that fixes it (not a broadcasting error in the first discriminator step)."""
    from test_training import BASE
    from training.build import build_data
    from training.checks import check_config, load_train_config
    from training.data import save_latent_dataset
    from training.errors import TrainingError

    path = tmp_path / "world.pt"
    save_latent_dataset(path, ["a", "b"], torch.zeros(2, 4, 16, 12, 16), "latents")
    cfg, _ = load_train_config("configs/self_forcing_dmd.yaml", BASE + SHAPE + ["trainer=gan", f"data_path={path}"])
    with pytest.raises(TrainingError, match=r"\(4, 16, 12, 16\).*makes \(3, 16, 12, 16\).*--frames 3"):
        build_data(cfg, check_config(cfg, 1), 0)
    save_latent_dataset(path, ["a", "b"], torch.zeros(2, 3, 16, 12, 16), "latents")
    assert build_data(cfg, check_config(cfg, 1), 0).latents.shape == (2, 3, 16, 12, 16)


def test_after_the_warm_up_both_models_train_in_bf16_and_the_ema_holds_every_generator_weight(tmp_path, world_set,
                                                                                               monkeypatch):
    """The GPU's mixed precision (bf16 compute, float32 gradient reductions), forced on the CPU; after the warm-up
    both models train and the EMA shadows every generator parameter. Two defects the H200 showed, each failing
    here on the old code: (1) FSDP fixed each unit's reduction dtype at its first forward from the parameters that
    then required grad, and the GAN's first forwards run frozen (the discriminator step's rollout, the warm-up),
    so the first generator step assigned bf16 gradients to float32 parameters (training/distributed.py
    `init_now` now initialises at shard time); (2) on one rank each model is one FSDP unit that stays gathered
    after a no-grad rollout, so toggling requires_grad on the module reached only the gathered copies and the EMA
    was made of no parameter (training/gan.py `trainable` reshards first)."""
    from training import distributed
    from training.distributed import full_tensor

    monkeypatch.setattr(distributed, "mixed_precision_dtypes",
                        lambda mixed, device: {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32})
    tr = gan_trainer(tmp_path, world_set, "dfake_gen_update_ratio=2", "discriminator_warmup_steps=1",
                     "ema_start_step=1", "ema_weight=0.9", "gan_g_weight=1.0", "gan_d_weight=1.0")
    assert tr.dtype == torch.bfloat16
    g0 = {k: v.clone() for k, v in tr.generator.state_dict().items()}
    b0 = tr.critic.blocks[0].ffn[0].weight.clone()
    tr.train(4, save_at_end=False)  # steps 0 (warm-up), 1, 2 (generator), 3
    assert [("generator_loss" in r) for r in tr.history] == [False, False, True, False]
    names = [n for n, _ in tr.generator.named_parameters()]
    assert tr.ema is not None and sorted(tr.ema.shadow) == sorted(names)
    changed = [k for k, v in tr.generator.state_dict().items() if not torch.equal(v, g0[k])]
    assert len(changed) > len(g0) // 2, changed
    assert not torch.equal(tr.critic.blocks[0].ffn[0].weight, b0)  # the backbone trains after the warm-up
    ema = tr.ema.full_state_dict()  # made at step 1 from the weights then (g0), moved by the step-2 update
    assert any(not torch.equal(ema[k], full_tensor(g0[k]).float().cpu()) for k in names)


@pytest.mark.gpu
@pytest.mark.parametrize("mixed_precision", [False, True])
def test_gan_steps_on_cuda(tmp_path, world_set, mixed_precision):
    """Warm-up, generator and discriminator steps run on CUDA (there FSDP's root pre-forward moves a call's first
    argument to the device: the branch's register tokens, a unit of their own called without arguments, failed
    with an IndexError on the H200 while every CPU test passed) and the generator learns."""
    tr = gan_trainer(tmp_path, world_set, "dfake_gen_update_ratio=2", "discriminator_warmup_steps=1",
                     "ema_start_step=1", "gan_g_weight=1.0", "gan_d_weight=1.0",
                     f"mixed_precision={str(mixed_precision).lower()}", device="cuda")
    g0 = {k: v.detach().clone() for k, v in tr.generator.state_dict().items()}
    tr.train(4, save_at_end=False)
    assert [("generator_loss" in r) for r in tr.history] == [False, False, True, False]
    assert all(np.isfinite(r["critic_loss"]) for r in tr.history)
    assert any(not torch.equal(v, g0[k]) for k, v in tr.generator.state_dict().items())
    assert tr.ema is not None and len(tr.ema.shadow) == len(list(tr.generator.named_parameters()))


def test_loss_scale_multiplies_what_is_back_propagated(tmp_path, world_set):
    """Their trainer/gan.py's loss_scale: both losses' gradients scale with it (the clipped-before norms double),
    the logged losses do not (the critic's after Adam's nearly scale-free generator step: to float rounding)."""
    over = ["dfake_gen_update_ratio=1", "gan_g_weight=1.0", "gan_d_weight=1.0", "log_iters=100"]
    one = gan_trainer(tmp_path / "one", world_set, *over).train(1, save_at_end=False)[0]
    two = gan_trainer(tmp_path / "two", world_set, *over, "loss_scale=2.0").train(1, save_at_end=False)[0]
    assert two["generator_loss"] == one["generator_loss"]
    assert two["generator_grad_norm"] == pytest.approx(2 * one["generator_grad_norm"], rel=1e-5)
    assert two["critic_loss"] == pytest.approx(one["critic_loss"], rel=1e-4)
    assert two["critic_grad_norm"] == pytest.approx(2 * one["critic_grad_norm"], rel=1e-3)


def test_the_run_line_names_the_gan_rates():
    """`workbench train`'s first line gave a GAN run's unused `lr`; it names the generator's and the
    discriminator's rates, as GanTrainer's optimisers read them."""
    from training.build import schedule
    from training.checks import check_config
    from training.config import load_config

    cfg = load_config("configs/world_gan.yaml")
    line = schedule(cfg, check_config(cfg, 1))
    assert f"generator lr {cfg.gen_lr:g}, discriminator lr {cfg.critic_lr:g}" in line and "; lr " not in line
