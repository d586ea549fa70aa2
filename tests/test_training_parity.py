"""The researchers' gradient semantics, pinned on tiny models with values derived by hand or by a direct float64
computation (docs/training.md): which parameters get gradient at each exit step with checkpointing on and off,
the gradient the in-place-written KV cache sends into earlier chunks' exit-step keys/values (and not with a
detached cache), the score networks' sigma on the shift-8 grid, AdamW's step on a parameter that got no
gradient, ts_schedule's timestep range, fake guidance only with real_guidance_scale, the EMA's starting point
with ema_start_step <= 0, and the float32 timestep grid."""

import pytest
import torch

from conftest import tiny_model
from models.common.kv_cache import GradWindow, RolloutCache
from models.common.rollout import _from_model, _to_model
from models.common.scheduler import FlowMatchScheduler
from test_training import make, params
from test_training_losses import Linear
from training import distributed as fsdp
from training import rng
from training.checks import check_config, load_train_config
from training.losses import critic_flow_loss, predict_x0, score_timestep
from training.rollout import denoised_timestep_range, self_forcing_rollout
from training.trainer import Models

B, F, C, H, W = 1, 6, 16, 4, 6
N = 3  # frames per chunk
FSL = (H // 2) * (W // 2)  # tokens per latent frame
SCHED = FlowMatchScheduler(5.0)
STEPS = SCHED.warp([1000, 750, 500, 250])
TEXT = ("text_embedding.", ".cross_attn.k.", ".cross_attn.v.", ".cross_attn.norm_k.")

pytestmark = pytest.mark.usefixtures("one_thread")


def setup(dtype=torch.float32):
    model = tiny_model().to(dtype)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(B, F, C, H, W, generator=g).to(dtype)
    context = torch.randn(B, 16, 32, generator=g).to(dtype)
    weight = torch.randn(B, F, C, H, W, generator=g).to(dtype)
    return model, noise, context, weight


def rollout(model, noise, context, exits, **kw):
    return self_forcing_rollout(model, noise, context, timesteps=STEPS, scheduler=SCHED, exit_indices=exits,
                                gens=rng.sample_generators(1, 0, "test", range(B)), **kw)


# ------------------------------------------------------------------------------------------------------
# Which parameters get gradient


@pytest.mark.parametrize("text_kv_gradient", ["follows_checkpointing", "every_exit", "first_forward"])
def test_which_parameters_get_gradient(text_kv_gradient):
    """Every parameter gets gradient from the exit forwards except the text path (text_embedding and the
    cross-attention k / v / norm_k), whose keys/values the rollout's first forward (chunk 0, step 0) computes
    and caches: they get gradient when that forward is the exit (exit step 0), or when the exit forwards compute
    them afresh: always with "every_exit", under checkpointing with the researchers' "follows_checkpointing"
    (their checkpointed block path is not given the cross-attention cache), never else."""
    for checkpointing in (False, True):
        for exit_k in range(4):
            model, noise, context, weight = setup()
            model.gradient_checkpointing = checkpointing
            (weight * rollout(model, noise, context, [exit_k] * 2, text_kv_gradient=text_kv_gradient)).sum().backward()
            got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            text_gets = (exit_k == 0 or text_kv_gradient == "every_exit"
                         or (text_kv_gradient == "follows_checkpointing" and checkpointing))
            expected = {n for n, _ in model.named_parameters() if text_gets or not any(t in n for t in TEXT)}
            assert got == expected, (checkpointing, exit_k, sorted(got ^ expected))


# ------------------------------------------------------------------------------------------------------
# Gradient through the KV cache


class Windows:
    """Records every GradWindow's new keys/values and the window it hands to attention, per (layer, chunk)."""

    def __init__(self, monkeypatch):
        self.layer_of, self.new, self.win = {}, {}, {}
        write, window = GradWindow.write, GradWindow.window

        def key(gw):
            layer = self.layer_of.setdefault(id(gw.cache), len(self.layer_of))
            return layer, gw.a // (N * FSL)

        def rec_write(gw, start, k, v):
            if not gw.written:
                k.retain_grad(), v.retain_grad()
                self.new[key(gw)] = (k, v)
            write(gw, start, k, v)

        def rec_window(gw):
            k, v, frames = window(gw)
            if k.requires_grad and key(gw) not in self.win:
                k.retain_grad(), v.retain_grad()
                self.win[key(gw)] = (k, v)
            return k, v, frames

        monkeypatch.setattr(GradWindow, "write", rec_write)
        monkeypatch.setattr(GradWindow, "window", rec_window)


@pytest.mark.parametrize("kv_gradient", ["inplace", "detached"])
def test_gradient_reaches_earlier_chunks_cache_rows_as_inplace_writes_make_it(monkeypatch, kv_gradient):
    """Three chunks exit at step 2. Chunk c's exit-step keys k_c (per layer) appear in its own attention window
    (rows c) and, through the cache, in every later chunk's window at rows c, although those rows hold the
    context pass's values. The researchers' in-place writes route the later windows' gradient at rows c to k_c:
    dL/dk_c = G_c[rows c] + sum_{c' > c} G_c'[rows c], with G_c' = dL/d(window of chunk c'). A detached cache
    gives dL/dk_c = G_c[rows c]. The same for values."""
    rec = Windows(monkeypatch)
    model, noise, context, weight = setup()
    noise, context, weight = noise.repeat(1, 3, 1, 1, 1)[:, :9], context, weight.repeat(1, 3, 1, 1, 1)[:, :9]
    (weight * rollout(model, noise, context, [2] * 3, kv_gradient=kv_gradient)).sum().backward()
    rows = lambda c: slice(c * N * FSL, (c + 1) * N * FSL)  # noqa: E731
    checked = 0
    for (layer, c), (k_new, v_new) in rec.new.items():
        for i, got in ((0, k_new.grad), (1, v_new.grad)):
            expected = rec.win[(layer, c)][i].grad[:, rows(c)].clone()
            if kv_gradient == "inplace":
                for later in range(c + 1, 3):
                    expected += rec.win[(layer, later)][i].grad[:, rows(c)]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-9)
            checked += 1
    assert checked == 2 * 3 * 2  # layers x chunks x (k, v)
    earlier = rec.win[(0, 2)][0].grad[:, rows(0)]
    assert earlier.abs().max() > 1e-3 * rec.win[(0, 0)][0].grad.abs().max()  # the routed term is not negligible


def exit_forward_alone(model, calls, context, chunk, monkeypatch):
    """Chunk `chunk`'s exit forward on a fresh cache filled (without gradient) by the recorded context passes of
    the earlier chunks, text keys/values without gradient: (x0, {layer: (k window, v window)})."""
    cache = RolloutCache.allocate(model.config, B, F, FSL, dtype=context.dtype, device="cpu", kv_gradient="detached",
                                  text_kv_gradient="first_forward")
    with torch.no_grad():
        model(calls[0]["x"], calls[0]["t"], context, cache=cache, start_frame=0)  # the first forward: text k/v
        for c in [c for c in calls if c["phase"] == "context"][:chunk]:
            model(c["x"], c["t"], context, cache=cache, start_frame=c["start"])
    ex = [c for c in calls if c["phase"] == "train"][chunk]
    windows, window = {}, GradWindow.window

    def rec_window(gw):
        k, v, frames = window(gw)
        windows.setdefault(len(windows), (k, v))
        return k, v, frames

    monkeypatch.setattr(GradWindow, "window", rec_window)
    flow = _from_model(model(ex["x"], ex["t"], context, cache=cache, start_frame=ex["start"]))
    monkeypatch.setattr(GradWindow, "window", window)
    return SCHED.x0_from_flow(flow, _from_model(ex["x"]), ex["t"]), windows


def test_inplace_cache_gradient_equals_the_chain_rule_written_out(monkeypatch):
    """The parameter gradient of a rollout (float64 weights and inputs, exit step 1, 2 chunks) with the in-place
    cache equals the chain rule written out with every exit forward run alone: sum_c dL_c/dtheta (each chunk's
    loss through its own exit forward) plus d/dtheta of sum_layers <G_1[rows 0], k_0> + <H_1[rows 0], v_0>
    (G_1, H_1: the gradient of chunk 1's loss at its key/value window; k_0, v_0: chunk 0's exit-step keys/values).
    The model keeps its norms and modulation in float32, so the two agree to rounding (relative to the largest
    gradient) rather than to float64 precision; the written-out term is far larger, and a detached cache's
    gradient is the sum without it."""
    model, noise, context, weight = setup(torch.float64)
    calls = []

    def pre(module, args, kwargs):
        phase = kwargs["labels"].phase
        calls.append(dict(x=args[0].detach().clone(), t=args[1].clone(), start=kwargs["start_frame"], phase=phase))

    names, ps = zip(*model.named_parameters())
    got = {}
    for mode in ("inplace", "detached"):
        h = model.register_forward_pre_hook(pre, with_kwargs=True)
        out = rollout(model, noise, context, [1, 1], kv_gradient=mode, text_kv_gradient="first_forward")
        h.remove()
        (weight * out).sum().backward()
        got[mode] = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in zip(names, ps)}
        model.zero_grad()
    calls = calls[: len(calls) // 2]  # both rollouts made the same forwards
    own = {n: torch.zeros_like(p) for n, p in zip(names, ps)}
    G = {}
    for chunk in (0, 1):
        x0, windows = exit_forward_alone(model, calls, context, chunk, monkeypatch)
        loss = (weight[:, chunk * N : (chunk + 1) * N] * x0).sum()
        flat = [t for layer in sorted(windows) for t in windows[layer]]
        out = torch.autograd.grad(loss, list(ps) + flat, allow_unused=True)
        for n, g in zip(names, out[: len(ps)]):
            own[n] += 0 if g is None else g
        G[chunk] = out[len(ps):]
    _, windows = exit_forward_alone(model, calls, context, 0, monkeypatch)  # chunk 0's own keys/values again
    rows0 = slice(0, N * FSL)
    flat = [t for layer in sorted(windows) for t in windows[layer]]
    cross = sum((g[:, rows0] * t[:, rows0]).sum() for g, t in zip(G[1], flat))
    routed = {n: torch.zeros_like(p) if g is None else g
              for n, p, g in zip(names, ps, torch.autograd.grad(cross, ps, allow_unused=True))}
    scale = max(float(v.abs().max()) for v in own.values())
    err = lambda a, b: max(float((a[n] - b[n]).abs().max()) for n in names) / scale  # noqa: E731
    assert err(got["inplace"], {n: own[n] + routed[n] for n in names}) < 1e-6  # measured 4e-8
    assert err(got["detached"], own) < 1e-6  # measured 0
    assert err(got["inplace"], own) > 1e-2  # the routed term: 14% of the largest gradient


# ------------------------------------------------------------------------------------------------------
# Score networks, timestep grid and ranges


def test_score_networks_convert_on_the_shift8_grid(tmp_path):
    """The researchers build the real and fake score networks without model_kwargs, so their flow -> x0 takes
    sigma at the nearest timestep of the wrapper's default shift-8 grid, t_i = 1000 * 8 s / (1 + 7 s) with
    s = 1 - i / 1000. By hand: t = 833.333 (a warped step, exactly i = 500 of the shift-5 grid) is nearest to
    i = 615 on the shift-8 grid (833.56, against 832.97 at i = 616), sigma = 8 * 0.385 / (1 + 7 * 0.385);
    t = 20 (the clamp's floor) is nearest to i = 997 (23.51, against 15.78 at 998): sigma 0.0235 where the
    shift-5 grid has 0.0197 (i = 996)."""
    s8 = FlowMatchScheduler(8.0)
    assert float(s8.sigma(torch.tensor(833.3333))) == pytest.approx(8 * 0.385 / (1 + 7 * 0.385), abs=1e-7)
    assert float(SCHED.sigma(torch.tensor(833.3333))) == pytest.approx(5 * 0.5 / (1 + 4 * 0.5), abs=1e-7)
    assert float(s8.sigma(torch.tensor(20.0))) == pytest.approx(8 * 0.003 / (1 + 7 * 0.003), abs=1e-7)
    assert float(SCHED.sigma(torch.tensor(20.0))) == pytest.approx(5 * 0.004 / (1 + 4 * 0.004), abs=1e-7)
    # the losses: x0 of a score network with flow a * x_t is x_t - sigma8 * a * x_t; the critic's flow target is
    # then taken back on the generator's grid: (x_t - x0) / sigma5 = (sigma8 / sigma5) * a * x_t
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(2, 6, 4, 2, 2, generator=g), torch.randn(2, 6, 4, 2, 2, generator=g)
    t = torch.tensor([[833.3333] * 6, [20.0] * 6])
    s5, s8v = SCHED.sigma(t)[:, 0].view(2, 1, 1, 1, 1), s8.sigma(t)[:, 0].view(2, 1, 1, 1, 1)
    x_t = ((1 - s5) * x.double() + s5 * noise.double()).float()
    critic = Linear(0.7)
    torch.testing.assert_close(predict_x0(critic, x_t, t, torch.ones(2, 3, 5), s8),
                               (x_t.double() - s8v * 0.7 * x_t.double()).float())
    loss = critic_flow_loss(x, critic=critic, cond=torch.ones(2, 3, 5), scheduler=SCHED, score_scheduler=s8, t=t,
                            noise=noise)
    expected = ((s8v / s5 * 0.7 * x_t.double() - (noise.double() - x.double())) ** 2).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    # the trainer: shift 8 with the shipped YAMLs, one grid with score_timestep_shift null
    assert make(tmp_path / "a").score_scheduler.shift == 8.0
    assert make(tmp_path / "b", "score_timestep_shift=null").score_scheduler.shift == 5.0


def test_timestep_grid_is_the_researchers_float32_grid():
    """sigma_i = shift s / (1 + (shift - 1) s) with s = linspace(1, 0, 1001)[:-1], all in float32 as their
    scheduler computes it; 464 of the 1000 shift-5 timesteps differ from the exactly rounded float64 formula."""
    s = torch.linspace(1.0, 0.0, 1001, dtype=torch.float32)[:-1]
    sig32 = 5.0 * s / (1 + 4.0 * s)
    assert torch.equal(SCHED.sigmas, sig32.double()) and torch.equal(SCHED.timesteps, (sig32 * 1000).double())
    s64 = torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1]
    exact = (5.0 * s64 / (1 + 4.0 * s64) * 1000).float()
    assert int((exact != (sig32 * 1000)).sum()) == 464


def test_ts_schedule_bounds_the_score_timestep(tmp_path):
    """ts_schedule (the researchers' default when a config does not set it): the score timestep is drawn from
    [denoised_timestep_to, 1000) of the rollout, (to) = 750, 500, 250, 0 for exit 0..3 (n minus the grid index of
    the next warped step: 250, 500, 750); ts_schedule_max also caps it at from = 1000, 750, 500, 250. Shifted by
    5: a draw >= 750 becomes >= 1000 * 3.75 / 4 = 937.5."""
    assert [denoised_timestep_range(e, STEPS, SCHED) for e in range(4)] == [(1000, 750), (750, 500), (500, 250),
                                                                             (250, 0)]
    # unwarped steps: 750 on the shift-5 grid is 1000 * 5 s / (1 + 4 s) at s = 0.375, i = 625 -> n - i = 375
    raw = torch.tensor([1000.0, 750.0, 500.0, 250.0])
    assert denoised_timestep_range(0, raw, SCHED) == (1000, 375)
    tr = make(tmp_path / "a", "ts_schedule=true")
    assert [tr.score_range([e] * 2) for e in range(4)] == [(750, None), (500, None), (250, None), (0, None)]
    tr = make(tmp_path / "b", "ts_schedule=true", "ts_schedule_max=true")
    assert [tr.score_range([e] * 2) for e in range(4)] == [(750, 1000), (500, 750), (250, 500), (0, 250)]
    tr = make(tmp_path / "c", "ts_schedule=true", "same_step_across_blocks=false", "min_score_timestep=7")
    assert tr.score_range([0, 3]) == (7, None)  # per-chunk exits: the pipeline returns no range
    t = torch.cat([score_timestep([rng.generator(0, s, "t", 0)], 1, min_timestep=750) for s in range(200)])
    assert t.min() >= 937.5 and t.max() <= 980
    cfg, _ = load_train_config("configs/self_forcing_dmd.yaml", ["ts_schedule=true"])
    check_config(cfg, 1)  # supported, not refused


def test_fake_guidance_only_with_real_guidance_scale(tmp_path, monkeypatch):
    """Their DMD reads fake_guidance_scale only when the config has real_guidance_scale (else the real score
    uses guidance_scale and the critic is unguided)."""
    import training.steps as steps

    seen = []
    monkeypatch.setattr(steps, "dmd_loss", lambda x, **kw: (seen.append(kw), (x.sum() * 0, {}))[1])
    with pytest.warns(UserWarning, match="fake_guidance_scale 1.5 is not used"):
        tr = make(tmp_path / "a", "fake_guidance_scale=1.5")
    tr.generator_loss(0)
    tr = make(tmp_path / "b", "fake_guidance_scale=1.5", "real_guidance_scale=2.0")
    assert not tr.plan.warnings
    tr.generator_loss(0)
    assert [(kw["guidance_scale"], kw["fake_guidance_scale"]) for kw in seen] == [(3.0, 0.0), (2.0, 1.5)]


# ------------------------------------------------------------------------------------------------------
# Optimiser and EMA


def force_exits(trainer, exits_per_call):
    """The trainer's exit draws replaced by the given list (one entry per rollout, every chunk the same)."""
    n = trainer.plan.shape[0] // trainer.plan.nfpb
    queue = list(exits_per_call)
    trainer.exit_indices = lambda stream: [queue.pop(0)] * n


def full(t):
    return fsdp.full_tensor(t.detach())


def text_params(trainer):
    return {n: p for n, p in trainer.gen_params if any(t in n for t in TEXT)}


@pytest.mark.parametrize("unused", ["zero", "none"])
def test_adamw_steps_a_parameter_that_got_no_gradient(tmp_path, unused):
    """Generator steps with exit 0 (the text parameters get gradient) and then exit 3 (they get none; no
    checkpointing). With the researchers' zero gradients AdamW still steps them: by hand,
    p2 = p1 (1 - lr wd) - lr (b1 m1 / (1 - b1^2)) / (sqrt(b2 v1 / (1 - b2^2)) + eps) with m1, v1 the moments after
    the first step; skipped ("none"), p2 = p1 and the state is unchanged."""
    lr, wd, b1, b2 = 1e-3, 0.01, 0.9, 0.999
    tr = make(tmp_path, "dfake_gen_update_ratio=1", "beta1=0.9", f"unused_param_grads={unused}")
    force_exits(tr, [0, 0, 3, 3])  # (generator, critic) per iteration
    tr.iteration()
    p1 = {n: p.detach().clone() for n, p in text_params(tr).items()}
    state = {n: {k: v.clone() for k, v in tr.gen_opt.state[p].items()} for n, p in text_params(tr).items()}
    assert all(float(s["step"]) == 1 for s in state.values())
    tr.iteration()
    for n, p in text_params(tr).items():
        m1, v1 = full(state[n]["exp_avg"]).double(), full(state[n]["exp_avg_sq"]).double()
        if unused == "none":
            assert torch.equal(full(p), full(p1[n])) and float(tr.gen_opt.state[p]["step"]) == 1
            continue
        expected = full(p1[n]).double() * (1 - lr * wd) - lr * (b1 * m1 / (1 - b1**2)) / ((b2 * v1 / (1 - b2**2)).sqrt() + 1e-8)
        torch.testing.assert_close(full(p).double(), expected, rtol=2.4e-7, atol=1e-9)  # float32 rounding of p
        assert float(tr.gen_opt.state[p]["step"]) == 2
    moved = max(float((full(p) - full(p1[n])).abs().max()) for n, p in text_params(tr).items())
    assert (moved > 1e-5) == (unused == "zero")


def test_first_adamw_step_without_gradient_only_decays(tmp_path):
    """The shipped configs' beta1 = 0, exit 3 from the start: the text parameters' first step is the decay
    p (1 - lr wd) alone (Adam's term is 0 / (0 + eps)), bitwise as AdamW computes it."""
    tr = make(tmp_path, "dfake_gen_update_ratio=1")
    force_exits(tr, [3, 3])
    p0 = {n: p.detach().clone() for n, p in text_params(tr).items()}
    tr.iteration()
    for n, p in text_params(tr).items():
        assert torch.equal(full(p), full(p0[n]) * (1 - 1e-3 * 0.01)), n


def test_ema_starts_from_the_weights_before_the_checkpoint(tmp_path):
    """ema_start_step <= 0: the researchers make the EMA before generator_ckpt loads, i.e. from the generator
    folder's weights w0, so after one generator step it is 0.99 w0 + 0.01 p1 (not 0.99 ckpt + 0.01 p1).
    build_models reads those weights only then."""
    base = {k: v.clone() for k, v in tiny_model(seed=9).state_dict().items()}
    models = Models(tiny_model(causal=True, seed=1), tiny_model(causal=False, seed=2), tiny_model(causal=False, seed=3),
                    ema_init=base)
    tr = make(tmp_path, "ema_start_step=0", "dfake_gen_update_ratio=1", models=models)
    tr.train(1, save_at_end=False)
    p1, ema = params(tr.generator), tr.ema.full_state_dict()
    for k in p1:
        torch.testing.assert_close(ema[k], 0.99 * base[k] + 0.01 * p1[k], rtol=1e-6, atol=1e-7)


def test_a_gan_run_starts_its_discriminator_branch_from_the_configs_seed(tmp_path):
    """The classification branch's initial weights come from the config's seed, not the process's random state:
    the same config twice is the same run (the critics differed by up to 0.18, both runs labelled seed 1)."""
    from training.build import build_models

    base = ["trainer=gan", "model_root=data", "model_kwargs.model_name=embedded", "fake_name=embedded",
            "generator_ckpt=data/embedded/checkpoints/ode_init.pt", "data_path=latents.pt",
            "image_or_video_shape=[1,6,16,12,16]",
            "num_training_frames=6", "model_kwargs.timestep_shift=5.0"]
    branches = []
    for seed, noise in ((1, 3), (1, 4), (2, 3)):
        torch.manual_seed(noise)  # (the process's state before: not the run's to depend on)
        cfg, _ = load_train_config("configs/world_gan.yaml", base + [f"seed={seed}"])
        critic = build_models(cfg, check_config(cfg, 1))[0].critic
        branches.append({k: v for k, v in critic.state_dict().items() if k.startswith("_")})
    assert branches[0].keys() == branches[1].keys() and len(branches[0]) > 10
    assert all(torch.equal(branches[0][k], branches[1][k]) for k in branches[0])
    assert not all(torch.equal(branches[0][k], branches[2][k]) for k in branches[0])


def test_build_models_keeps_the_folder_weights_for_the_ema(tmp_path):
    from models.wan.checkpoint import save_self_forcing, save_wan_folder
    from models.wan.config import preset
    from training.build import build_models

    folder_sd = tiny_model(seed=9).state_dict()
    save_wan_folder(tmp_path / "gen", preset("tiny"), folder_sd)
    for name in ("teacher", "critic"):
        save_wan_folder(tmp_path / name, preset("tiny"), tiny_model(seed=2).state_dict())
    save_self_forcing(tmp_path / "ckpt.pt", generator=tiny_model(seed=1).state_dict())
    base = ["model_root=" + str(tmp_path), "model_kwargs.model_name=gen", "real_name=teacher", "fake_name=critic",
            f"generator_ckpt={tmp_path / 'ckpt.pt'}", "mixed_precision=false"]
    for start, keeps in ((0, True), (-5, True), (1, False)):
        cfg, _ = load_train_config("configs/self_forcing_dmd.yaml", base + [f"ema_start_step={start}"])
        models, _ = build_models(cfg, check_config(cfg, 1))
        assert (models.ema_init is not None) == keeps
        if keeps:
            assert all(torch.equal(models.ema_init[k], folder_sd[k]) for k in folder_sd)
            assert not torch.equal(models.generator.state_dict()["head.head.weight"], folder_sd["head.head.weight"])
