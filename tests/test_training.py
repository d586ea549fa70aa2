"""The trainer on one CPU process (gloo, FSDP2) with tiny models: DMD and SiD steps, the generator / critic
update ratio, EMA, bitwise resume, probes that leave training unchanged, checkpoints the inference code loads,
ODE regression and diffusion training that lower their losses, and clear config errors (docs/training.md)."""

import shutil

import pytest
import torch

from conftest import tiny_model
from models.common.rollout import causal_few_step
from models.common.scheduler import FlowMatchScheduler
from models.wan.checkpoint import build_model, load_tensors, load_wan, read_self_forcing, save_wan_folder
from models.wan.config import preset
from training import distributed as fsdp
from training import rng
from training.build import build_probes
from training.checks import SID_QUIRK, check_config, check_files, load_train_config
from training.data import LatentDataset, PromptSource, synthetic_latents
from training.errors import TrainingError
from training.logger import read_losses
from training.losses import diffusion_loss, ode_regression_loss
from training.rollout import make_ode_pairs
from training.text import HashTextEncoder
from training.trainer import Models, Trainer

PROMPTS = ["a cat on a sofa", "a red car", "waves at night", "a bird in the rain"]
BASE = ["image_or_video_shape=[1,6,16,4,6]", "num_training_frames=6", "total_batch_size=1", "batch_size=1",
        "device=cpu", "mixed_precision=false", "gradient_checkpointing=false", "generator_ckpt=unused.pt",
        "lr=1e-3", "lr_critic=1e-3", "seed=7", "log_iters=1000", "negative_prompt=blurry"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_models(kind="score_distillation", causal=True):
    if kind == "score_distillation":
        return Models(tiny_model(causal=True, seed=1), tiny_model(causal=False, seed=2), tiny_model(causal=False, seed=3))
    return Models(tiny_model(causal=causal, seed=1))


def make(tmp_path, *overrides, config="configs/self_forcing_dmd.yaml", models=None, data=None, probe=False,
         resume=None):
    cfg, sets_sid_alpha = load_train_config(config, BASE + list(overrides))
    d = fsdp.setup("cpu")
    plan = check_config(cfg, d.world, sets_sid_alpha=sets_sid_alpha)
    models = models or tiny_models(plan.trainer, bool(cfg.causal))
    probes = build_probes(cfg, plan, models.generator.config, tmp_path, weights_label="tiny",
                          weights_sha="0") if probe else None
    return Trainer(cfg, models, HashTextEncoder(16, 32), tmp_path, d=d, plan=plan,
                   data=data or PromptSource(PROMPTS, 7), probes=probes, resume=resume, progress=False,
                   log=lambda *_: None)


def params(model) -> dict:
    return {k: v.clone() for k, v in fsdp.full_state_dict(model).items()}


def changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def losses(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.mark.parametrize("loss", ["dmd", "sid"])
def test_a_dmd_and_a_sid_step_change_the_generator(tmp_path, loss):
    tr = make(tmp_path, f"distribution_loss={loss}")
    g0, c0, t0 = params(tr.generator), params(tr.critic), params(tr.teacher)
    logs = tr.iteration()
    assert tr.plan.loss == loss and "generator_loss" in logs and "critic_loss" in logs
    assert changed(g0, params(tr.generator)) and changed(c0, params(tr.critic))
    assert not changed(t0, params(tr.teacher))  # the teacher is frozen
    assert logs["generator_grad_norm"] > 0 and logs["exit_index"] in range(4)


def test_a_step_is_counted_before_its_checkpoint_is_saved(tmp_path, monkeypatch):
    """The progress bar (`done`) counts a step before the step's checkpoint message ("saved ..." came on the
    previous count's line)."""
    tr = make(tmp_path, "log_iters=1")
    order = []
    monkeypatch.setattr(tr, "save", lambda: order.append(("save", tr.step)))
    tr.step_done = lambda: order.append(("done", tr.step))
    tr.iteration()
    assert order == [("done", 1), ("save", 1)]


def test_generator_trains_every_ratio_steps_and_the_critic_every_step(tmp_path):
    tr = make(tmp_path, "dfake_gen_update_ratio=3")
    snaps, rows = [params(tr.generator)], []
    crit = [params(tr.critic)]
    for _ in range(6):
        rows.append(tr.iteration())
        snaps.append(params(tr.generator))
        crit.append(params(tr.critic))
    gen_steps = [i for i, r in enumerate(rows) if "generator_loss" in r]  # iterations 0 and 3 (step % 3 == 0)
    assert gen_steps == [0, 3]
    assert [changed(snaps[i], snaps[i + 1]) for i in range(6)] == [True, False, False, True, False, False]
    assert all(changed(crit[i], crit[i + 1]) for i in range(6)) and all("critic_loss" in r for r in rows)
    assert [r["step"] for r in tr.history] == [1, 2, 3, 4, 5, 6]  # the step counter after each iteration


def test_ema_follows_its_formula(tmp_path):
    tr = make(tmp_path, "dfake_gen_update_ratio=1", "ema_start_step=2", "ema_weight=0.9")
    tr.iteration()
    assert tr.ema is None  # step 1 < ema_start_step
    tr.iteration()
    p2 = params(tr.generator)
    assert tr.ema is not None and all(torch.equal(tr.ema.full_state_dict()[k], p2[k]) for k in p2)  # made at step 2
    tr.iteration()
    p3 = params(tr.generator)
    tr.iteration()
    p4 = params(tr.generator)
    ema = tr.ema.full_state_dict()
    for k in p2:
        expected = 0.9 * (0.9 * p2[k] + 0.1 * p3[k]) + 0.1 * p4[k]
        torch.testing.assert_close(ema[k], expected, rtol=1e-6, atol=1e-7)
    assert changed(p2, p4)


@pytest.mark.parametrize("unused", ["zero", "none"])
def test_resumed_run_continues_identically(tmp_path, unused):
    """Resume from step 2 of 4: the same losses, grad norms and exit steps, and bitwise the same weights, EMA
    and critic at step 4. (With seed 7 the generator's exit step is 0 for the first time at iteration 3, so
    the cross-attention keys get their first gradient after the resume: by default they have optimiser state
    from the zero gradients AdamW was given; with unused_param_grads none, parameters without optimiser state
    at the checkpoint must stay without it.)"""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    over = ["dfake_gen_update_ratio=1", "ema_start_step=1", "ema_weight=0.9", "log_iters=2", "total_batch_size=2",
            f"unused_param_grads={unused}"]
    a = make(a_dir, *over)
    a.train(4)
    exits = [r["exit_index"] for r in a.history]
    assert 0 not in exits[:2] and 0 in exits[2:]  # the case described above
    shutil.copytree(a_dir / "checkpoint_model_000002", b_dir / "checkpoint_model_000002")
    b = make(b_dir, *over, resume=b_dir / "checkpoint_model_000002")
    assert b.step == 2 and b.ema is not None
    b.train(4)
    assert losses(b.history) == losses(a.history)[2:]  # bitwise: the same losses, grad norms, exit steps
    fa, fb = load_tensors(a_dir / "checkpoint_model_000004" / "model.pt"), load_tensors(b_dir / "checkpoint_model_000004" / "model.pt")
    assert sorted(fa) == sorted(fb) == ["critic", "generator", "generator_ema"]
    for key in fa:
        assert all(torch.equal(fa[key][k], fb[key][k]) for k in fa[key]), key
    csv = read_losses(a_dir)
    assert [r["step"] for r in csv] == [1, 2, 3, 4] and csv[0]["generator_loss"] == a.history[0]["generator_loss"]


def test_probes_grow_the_store_and_leave_training_unchanged(tmp_path):
    from workbench.store import open_store

    probe = ["probe.every=2", "probe.prompts=[a cat on a sofa]", "probe.seeds=[0,1,1]", "probe.layers=[1,1]",
             "dfake_gen_update_ratio=2"]  # (a layer or seed given twice is captured once, as extract does)
    with_probe = make(tmp_path / "p", *probe, probe=True)
    with_probe.train(4, save_at_end=False)
    plain = make(tmp_path / "q", "dfake_gen_update_ratio=2")
    plain.train(4, save_at_end=False)
    assert losses(with_probe.history) == losses(plain.history)  # bitwise: probes do not change the loss curve
    ds = open_store(tmp_path / "p" / "probes.zarr")
    assert ds["train_step"].values.tolist() == [0, 2, 4]
    assert ds.attn_mass.dims == ("train_step", "sample", "step", "layer", "head", "query_frame", "key_frame")
    assert ds.sizes["sample"] == 2 and ds["layer"].values.tolist() == [1]
    assert {c for c in ds.coords if not ds[c].attrs.get("long_name")} == set()  # train_step's too
    from studies.report import model_facts
    from workbench.legacy import legacy_record

    facts = model_facts(ds)
    assert facts["weights entry"] == "the generator being trained, at each train step"
    record = legacy_record(ds.sel(train_step=2), "p0000-s1", 1)  # export-legacy's file: which weights ran
    assert (record["train_step"], record["use_ema"]) == (2, False)
    from workbench.legacy import _one_train_step

    assert int(_one_train_step(ds.isel(train_step=[2]), "s", None)["train_step"]) == 4  # one train step: no choice
    rows = ds.attn_mass.sum("key_frame", skipna=True).values
    assert abs(rows - 1).max() < 1e-4  # attention mass rows sum to 1
    first, last = ds.attn_mass.sel(train_step=0).values, ds.attn_mass.sel(train_step=4).values
    assert abs(first - last)[~torch.isnan(torch.tensor(first)).numpy()].max() > 1e-6  # the generator changed
    from studies.training import attention_over_training, figure, table

    a = attention_over_training(tmp_path / "p" / "probes.zarr")
    assert a.frame0.dims == ("train_step", "layer", "head") and a.sizes["train_step"] == 3
    assert set(a.coords) <= {"train_step", "layer", "head"}  # no leftover key_frame=0 / key_chunk=0 labels
    total = (a.frame0 + a.own_chunk + a.earlier).values
    assert abs(total - 1).max() < 1e-4  # the three regions partition each query's attention
    assert "train_step" in table(tmp_path / "p" / "probes.zarr") and len(figure(tmp_path / "p" / "probes.zarr").data) > 0


def test_a_probe_store_knows_a_plugin_statistic_by_its_definition_and_code(tmp_path):
    """A plugin's statistic among the probes: the probe store's fingerprint holds its definition and code
    (fingerprint_fields layout.own_stats), so a changed one is another probe set; built-in statistics alone add
    nothing (probe stores made before keep their fingerprint)."""
    import dataclasses

    from workbench import statistics as S

    mass = S.get("attn_mass")
    over = ["probe.every=2", "probe.prompts=[a cat]", "probe.layers=[1]"]
    plain = make(tmp_path / "a", *over, probe=True).probes
    assert "own_stats" not in plain.fields["layout"]
    own = ["probe.stats=[attn_mass,test_probe_own]"]
    try:
        S.register(dataclasses.replace(mass, name="test_probe_own", reduce=lambda t: 2 * mass.reduce(t),
                                       from_kernel=(), default=False))
        first = make(tmp_path / "b", *over, *own, probe=True).probes
        S.STATISTICS["test_probe_own"] = dataclasses.replace(mass, name="test_probe_own", from_kernel=(),
                                                             default=False, reduce=lambda t: 3 * mass.reduce(t))
        second = make(tmp_path / "c", *over, *own, probe=True).probes
    finally:
        S.STATISTICS.pop("test_probe_own", None)
    stored = first.fields["layout"]["own_stats"]["test_probe_own"]
    assert stored["long_name"] == mass.long_name and "(code " in stored["code"]
    assert first.fingerprint != second.fingerprint != plain.fingerprint


def test_probes_resume_with_the_run(tmp_path):
    from workbench.store import open_store

    over = ["probe.every=1", "probe.prompts=[a red car]", "probe.layers=[0]", "log_iters=2", "dfake_gen_update_ratio=1"]
    a = make(tmp_path / "a", *over, probe=True)
    a.train(4)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # a run that died after step 4 ...
    b = make(tmp_path / "b", *over, probe=True, resume=tmp_path / "b" / "checkpoint_model_000002")  # ... resumed at 2
    assert b.probes.writer.completed == [0, 1, 2]
    b.train(4)
    sa, sb = open_store(tmp_path / "a" / "probes.zarr"), open_store(tmp_path / "b" / "probes.zarr")
    assert sb["train_step"].values.tolist() == [0, 1, 2, 3, 4]
    assert (sa.attn_mass.fillna(-1) == sb.attn_mass.fillna(-1)).all()
    assert [r["step"] for r in read_losses(tmp_path / "b")] == [1, 2, 3, 4]


def test_probes_resume_with_their_statistics_in_another_order(tmp_path):
    """probe.stats in another order than the probe store's goes on in the store's order (it was refused as other
    probe settings, as extract's --stats was); other statistics are still refused by name."""
    over = ["probe.every=1", "probe.prompts=[a red car]", "probe.layers=[0]", "log_iters=2", "dfake_gen_update_ratio=1"]
    make(tmp_path, *over, "probe.stats=[attn_mass,attn_logit]", probe=True).train(2)
    resume = tmp_path / "checkpoint_model_000002"
    again = make(tmp_path, *over, "probe.stats=[attn_logit,attn_mass]", probe=True, resume=resume)
    assert again.probes.spec.stats == ("attn_mass", "attn_logit") and again.probes.writer.completed == [0, 1, 2]
    again.probes.close()
    with pytest.raises(TrainingError, match="stats"):
        make(tmp_path, *over, "probe.stats=[attn_mass]", probe=True, resume=resume)


def test_checkpoints_load_in_the_inference_pipeline(tmp_path):
    tr = make(tmp_path, "ema_start_step=1", "dfake_gen_update_ratio=1")
    tr.train(2)
    path = tmp_path / "checkpoint_model_000002" / "model.pt"
    blob = load_tensors(path)
    assert sorted(blob) == ["critic", "generator", "generator_ema"]
    assert all(k.startswith("model.") for k in blob["generator"])
    cfg = preset("tiny")
    save_wan_folder(tmp_path / "wan", cfg, tiny_model(seed=9).state_dict())
    s = FlowMatchScheduler(5.0)
    noise = torch.randn(1, 6, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    for use_ema in (False, True):
        model = load_wan(tmp_path / "wan", checkpoint=path, use_ema=use_ema, causal=True)
        ref = read_self_forcing(path, "generator_ema" if use_ema else "generator")
        assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)
        out = causal_few_step(model, noise, torch.randn(1, 16, 32), timesteps=s.warp([1000, 750, 500, 250]),
                              scheduler=s)
        assert torch.isfinite(out).all()
    critic = build_model(cfg, read_self_forcing(path, "critic"), causal=False)
    assert not critic.causal


def test_ode_regression_on_teacher_pairs_reduces_its_loss(tmp_path):
    teacher = tiny_model(causal=False, seed=4)
    enc = HashTextEncoder(16, 32)
    prompts = PROMPTS
    pairs = make_ode_pairs(teacher, enc.encode(prompts).context, enc.encode(["blurry"]).context, shape=(6, 16, 4, 6),
                           steps=12, shift=8.0, guidance_scale=6.0, keep=(0, 3, 6, 9), seed=0)
    assert pairs.shape == (4, 5, 6, 16, 4, 6)
    for keep in ((3, 0), (0, 0), (12,), (-1, 3)):  # (out of order: a trajectory under other labels; out of range)
        with pytest.raises(ValueError, match=r"in \[0, 12\), increasing, each once"):
            make_ode_pairs(teacher, enc.encode(prompts).context, enc.encode(["blurry"]).context, shape=(6, 16, 4, 6),
                           steps=12, keep=keep)
    data = LatentDataset(prompts, pairs, "ode_pairs", seed=7)
    tr = make(tmp_path, "trainer=ode", "total_batch_size=2", "lr=2e-3", data=data)
    ctx = enc.encode(prompts).context

    def eval_loss():
        gens = [rng.generator(123, 0, "eval", i) for i in range(4)]
        with torch.no_grad():
            return float(ode_regression_loss(tr.generator, pairs, ctx, timesteps=tr.timesteps, scheduler=tr.scheduler,
                                             gens=gens))

    before = eval_loss()
    tr.train(30, save_at_end=False)
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


def test_diffusion_trains_a_small_teacher(tmp_path):
    prompts, latents = synthetic_latents(16, 6, 16, 4, 6, seed=0)
    data = LatentDataset(prompts, latents, "latents", seed=7)
    tr = make(tmp_path, "trainer=diffusion", "causal=false", "total_batch_size=4", "lr=3e-3", data=data)
    assert not tr.generator.causal
    ctx = HashTextEncoder(16, 32).encode(prompts).context
    sched = FlowMatchScheduler(5.0)

    def eval_loss():
        gens = [rng.generator(321, 0, "eval", i) for i in range(16)]
        with torch.no_grad():
            return float(diffusion_loss(tr.generator, latents, ctx, scheduler=sched, gens=gens))

    before = eval_loss()
    tr.train(40, save_at_end=False)
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


# ------------------------------------------------------------------------------------------------------
# Config errors and the researchers' config quirks


def test_unknown_config_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distribution_loss: dmd\nlearning_rate: 1e-5\n")
    with pytest.raises(TrainingError, match="learning_rate"):
        load_train_config(bad)


def test_missing_generator_ckpt_is_an_error_before_work(tmp_path):
    cfg, _ = load_train_config("configs/self_forcing_dmd.yaml", ["model_root=data", "model_kwargs.model_name=embedded",
                                                                 "real_name=embedded", "fake_name=embedded"])
    plan = check_config(cfg, 1)
    with pytest.raises(TrainingError, match="checkpoints/ode_init.pt"):  # the shipped config's path, not present
        check_files(cfg, plan)
    cfg.generator_ckpt = None
    with pytest.raises(TrainingError, match="generator_ckpt is not set"):
        check_config(cfg, 1)


def test_batch_that_does_not_divide_across_ranks():
    cfg, _ = load_train_config("configs/self_forcing_dmd.yaml", ["total_batch_size=3", "batch_size=1"])
    assert check_config(cfg, 1).accum == 3
    with pytest.raises(TrainingError, match=r"total_batch_size 3 does not divide into batch_size 1 x 2 rank"):
        check_config(cfg, 2)
    cfg, _ = load_train_config("configs/self_forcing_dmd.yaml")  # the shipped config: 64 = 8 ranks x 8 micro-batches
    assert check_config(cfg, 8).accum == 8 and check_config(cfg, 1).accum == 64
    with pytest.raises(TrainingError) as err:  # (3 GPUs: the way to the nearest multiples, and to their trainer's step)
        check_config(cfg, 3)
    assert ("use a multiple of 3 (63 or 66), or --set total_batch_size=3 for a step of batch_size x ranks"
            in str(err.value))
    cfg, _ = load_train_config("configs/self_forcing_dmd.yaml", ["total_batch_size=2", "batch_size=1"])
    with pytest.raises(TrainingError, match=r"use a multiple of 3 \(3\), or"):  # (none below: not "0 or 3")
        check_config(cfg, 3)


def test_shipped_configs_and_the_sid_quirks():
    cfg, sets = load_train_config("configs/self_forcing_sid.yaml")
    plan = check_config(cfg, 1, sets_sid_alpha=sets)
    assert plan.loss == "dmd" and SID_QUIRK in plan.warnings  # trains DMD, as the researchers' code does
    assert cfg.min_score_timestep == 0  # their SiD class never sets it: the default 0 here
    cfg, sets = load_train_config("configs/self_forcing_sid.yaml", ["distribution_loss=sid"])
    plan = check_config(cfg, 1, sets_sid_alpha=sets)
    assert plan.loss == "sid" and not plan.warnings
    cfg, sets = load_train_config("configs/self_forcing_dmd.yaml")
    plan = check_config(cfg, 1, sets_sid_alpha=sets)
    assert plan.loss == "dmd" and not plan.warnings
    assert plan.timesteps.tolist() == pytest.approx([1000.0, 937.5, 833.3333, 625.0])
    assert (cfg.dfake_gen_update_ratio, cfg.ema_weight, cfg.ema_start_step, cfg.beta1, cfg.beta2) == (5, 0.99, 200, 0.0, 0.999)
    assert (cfg.max_grad_norm_generator, cfg.max_grad_norm_critic, cfg.guidance_scale) == (10.0, 10.0, 3.0)


def test_sid_warning_reaches_the_user(tmp_path):
    with pytest.warns(UserWarning, match="trains DMD"):
        tr = make(tmp_path, config="configs/self_forcing_sid.yaml")
    assert tr.plan.loss == "dmd"


def test_unimplemented_options_are_refused():
    # (trainer=gan runs now, training/gan.py; on a prompt file it is refused for want of real latents)
    for over, match in ((["trainer=gan"], "GAN training needs real latents"),
                        (["distribution_loss=causvid"], "causvid"),
                        (["kv_cache_gradient=sometimes"], "kv_cache_gradient"),
                        (["text_kv_gradient=never"], "text_kv_gradient"), (["unused_param_grads=skip"], "unused_param"),
                        (["score_timestep_shift=0"], "score_timestep_shift"),
                        (["num_training_frames=24"], "num_training_frames"),
                        (["sharding_strategy=zero9"], "sharding_strategy"), (["loggers=[csv,mlflow]"], "mlflow"),
                        (["adamw_impl=adam8bit"], "adamw_impl")):
        cfg, _ = load_train_config("configs/self_forcing_dmd.yaml", over)
        with pytest.raises(TrainingError, match=match):
            check_config(cfg, 1)


def test_ema_update_is_the_per_tensor_mul_add_bitwise():
    """EMA.update (two foreach calls) equals shadow.mul_(d).add_(param, alpha=1 - d) per tensor, bitwise."""
    from training.ema import EMA

    g = torch.Generator().manual_seed(0)
    params = [(f"p{i}", torch.nn.Parameter(torch.randn(s, generator=g))) for i, s in enumerate([(3, 5), (7,), (2, 2, 2)])]
    ema = EMA(params, 0.97)
    ref = {n: p.detach().clone() for n, p in params}
    for _ in range(3):
        with torch.no_grad():
            for _, p in params:
                p.add_(torch.randn(p.shape, generator=g))
        ema.update()
        for n, p in params:
            ref[n].mul_(0.97).add_(p.detach(), alpha=1 - 0.97)
    for n, _ in params:
        assert torch.equal(ema.shadow[n], ref[n]), n
    assert not torch.equal(ema.shadow["p0"], params[0][1].detach())  # the shadow lags the parameters


@pytest.mark.parametrize("on_device", [False, True])
def test_data_on_device_keeps_the_latent_set_on_the_training_device(on_device):
    """data_on_device: build_data moves a latent set to the rank's device once, and batches are gathered there,
    the same items as on the host (the meta device stands in for a GPU)."""
    from training.build import build_data

    cfg, _ = load_train_config("configs/self_forcing_dmd.yaml", BASE + [
        "trainer=diffusion", "causal=false", "data_path=synthetic", f"data_on_device={str(on_device).lower()}"])
    plan = check_config(cfg, 1)
    meta = fsdp.Dist(0, 1, 0, torch.device("meta"))
    data = build_data(cfg, plan, 7, meta)
    assert data.latents.device.type == ("meta" if on_device else "cpu")
    prompts, latents = data.batch([3, 70, 5])
    assert latents.shape == (3, *plan.shape) and latents.device == data.latents.device
    host = build_data(cfg, plan, 7, fsdp.Dist(0, 1, 0, torch.device("cpu")))
    assert host.latents.device.type == "cpu" and prompts == host.batch([3, 70, 5])[0]


def test_ctrl_c_finishes_the_step_then_saves_it(tmp_path):
    """A Ctrl-C (SIGINT) that arrives while a step's updates run lets the step finish, then saves it: the checkpoint
    of the interrupted run equals step 3 of an uninterrupted run (the old handler saved a half-updated generator
    and critic under the previous step's number). A second Ctrl-C stops at once and saves nothing."""
    import os
    import signal

    over = ["dfake_gen_update_ratio=1", "ema_start_step=1", "log_iters=10", "total_batch_size=2"]
    a = make(tmp_path / "a", *over)
    a.train(3)
    a.save()
    assert not a.interrupted
    b = make(tmp_path / "b", *over)
    step = b.train_step

    def interrupted_midway():  # the signal lands during step 3's updates
        if b.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return step()

    b.train_step = interrupted_midway
    assert not b.interrupted
    b.train(10)
    assert b.interrupted and b.step == 3 and sorted(p.name for p in (tmp_path / "b").glob("checkpoint_model_*")) == [
        "checkpoint_model_000003"]
    fa = load_tensors(tmp_path / "a" / "checkpoint_model_000003" / "model.pt")
    fb = load_tensors(tmp_path / "b" / "checkpoint_model_000003" / "model.pt")
    for key in fa:
        assert all(torch.equal(fa[key][k], fb[key][k]) for k in fa[key]), key

    c = make(tmp_path / "c", *over)
    step_c = c.train_step

    def twice():
        if c.step == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the second raises KeyboardInterrupt inside the step
        return step_c()

    c.train_step = twice
    c.train(10)
    assert c.interrupted and not list((tmp_path / "c").glob("checkpoint_model_*"))  # a half-done step is never saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler put back


def test_a_resume_that_changes_the_runs_settings_is_refused(tmp_path):
    """--resume with --set lr=... or seed=... would keep the checkpoint's learning rate (in its optimiser state) and
    seed while config.yaml claimed the new ones: refused, naming each key with both values; max_steps and the
    logging settings may change. A truncated training_state.pt is named, not a zip-reader traceback, and so is a
    model.pt whose bytes changed after it was written (torch.load reads it without complaint)."""
    over = ["dfake_gen_update_ratio=1", "log_iters=2", "total_batch_size=2"]
    a = make(tmp_path, *over)
    a.train(2)
    ck = tmp_path / "checkpoint_model_000002"
    with pytest.raises(TrainingError,
                       match=r"lr: 0.001 in the checkpoint, 0.005 now; seed: 7 in the checkpoint, 9 now"):
        make(tmp_path, *over, "lr=5e-3", "seed=9", resume=ck)
    assert make(tmp_path, *over, "max_steps=9", "log_iters=3", resume=ck).step == 2
    state = ck / "training_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(TrainingError, match="cannot read .*training_state.pt .* a truncated or corrupt checkpoint; "
                                            r"move that checkpoint folder out of the logdir \(--resume latest then"):
        make(tmp_path, *over, resume=ck)  # (it said: resume an earlier one, which the logdir's later ones refuse)
    a.save()  # (step 2 again, whole)
    model = ck / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit of a weight
    model.write_bytes(bytes(data))
    torch.load(model, map_location="cpu", weights_only=True)  # (loads as if nothing happened)
    with pytest.raises(TrainingError, match=r"model.pt' is corrupt: its record '.*' does not match the checksum"):
        make(tmp_path, *over, resume=ck)


def test_the_prompt_cache_encodes_each_prompt_once_and_survives_filling_up():
    """training/text.py `PromptCache`: a prompt is encoded once; a batch that fills the cache empties it and
    encodes the batch again (a prompt cached before and dropped by the emptying was a KeyError)."""
    from training.text import HashTextEncoder, PromptCache

    encoder = HashTextEncoder(8, 4)
    calls = []
    encode = encoder.encode
    encoder.encode = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    cache = PromptCache(encoder, "cpu", torch.float32, max_items=2)
    both = cache(["a", "b"])
    assert cache(["b", "a"]).equal(both.flip(0)) and calls == [["a", "b"]]
    mixed = cache(["a", "c"])  # 2 cached + 1 new > 2: emptied, both encoded again
    assert calls[-1] == ["a", "c"] and mixed[0].equal(both[0]) and mixed.shape == (2, 8, 4)
    assert not mixed[1].equal(both[1])


def test_losses_csv_row_cut_by_full_disk_is_undone(tmp_path, monkeypatch):
    """A full disk while a row is appended to losses.csv (the disk fills as the step's checkpoint is saved): the
    part of the row that got written is taken back, so --resume from that step's checkpoint (which keeps the rows
    up to it) does not keep a cut row with its values truncated (0.5 read as 0.) and its other columns blank."""
    import builtins
    import errno

    import training.logger as logger
    from training.logger import Logger, read_losses

    log = Logger(tmp_path, ["csv"])
    log.log(1, {"generator_loss": 0.25, "critic_loss": 0.5})

    class FullDisk:  # the file as a full disk leaves it: the row's first bytes written, then ENOSPC
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:6])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logger, "open", lambda *a, **kw: FullDisk(builtins.open(*a, **kw)), raising=False)
    with pytest.raises(OSError, match="No space left"):
        log.log(2, {"generator_loss": 0.125, "critic_loss": 0.75})
    monkeypatch.undo()
    assert read_losses(tmp_path) == [{"step": 1.0, "generator_loss": 0.25, "critic_loss": 0.5}]
    resumed = Logger(tmp_path, ["csv"], resume_step=2)  # the step-2 checkpoint was saved before its row
    resumed.log(3, {"generator_loss": 1.0, "critic_loss": 2.0})
    assert [r["step"] for r in read_losses(tmp_path)] == [1.0, 3.0]


def test_a_checkpoint_that_fills_the_disk_keeps_its_steps_row(tmp_path, monkeypatch):
    """The disk fills while step 2's checkpoint is saved: its loss row was written first, so losses.csv has every
    finished step (a resume from the step-2 checkpoint of a run where the row came after the checkpoint lost it)."""
    import errno

    from training.trainer import Trainer

    tr = make(tmp_path, "dfake_gen_update_ratio=1", "log_iters=2")

    def full_disk(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "save", full_disk)
    tr.iteration()
    with pytest.raises(OSError, match="No space left"):
        tr.iteration()
    assert [r["step"] for r in read_losses(tmp_path)] == [1, 2]


def test_a_checkpoint_that_fails_midway_leaves_no_folder(tmp_path, monkeypatch):
    """The disk fills on model.pt after training_state.pt (the optimiser states: twice the weights) was written: the
    half checkpoint's folder held the space the error asks the user to free; it is removed, and the next save
    works."""
    import errno

    import models.wan.checkpoint as ckpt

    tr = make(tmp_path, "dfake_gen_update_ratio=1")
    tr.iteration()
    real = ckpt.save_self_forcing

    def full_disk(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_self_forcing", full_disk)
    with pytest.raises(OSError, match="No space left"):
        tr.save()
    assert not (tmp_path / f"checkpoint_model_{tr.step:06d}").exists()
    monkeypatch.setattr(ckpt, "save_self_forcing", real)
    assert (tr.save() / "model.pt").is_file()
