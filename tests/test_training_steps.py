"""training/steps.py on the one-process CPU trainer of tests/test_training.py: the EMA moves only with the
generator, each step reads fresh batches (regression's too), gradient accumulation equals one larger batch, each
chunk draws its own exit step, ts_schedule bounds the score timestep, prompt dropout drops the stated share, and a
frozen backbone does not decay in the GAN warm-up."""

import pytest
import torch

from test_training import changed, make

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ema_moves_only_on_steps_that_update_the_generator(tmp_path):
    """dfake_gen_update_ratio 2: on a critic-only step the generator does not move, so neither may its EMA (an extra
    update would pull the shadow towards the same weights again: shadow <- 0.9 shadow + 0.1 param)."""
    tr = make(tmp_path, "dfake_gen_update_ratio=2", "ema_start_step=1", "ema_weight=0.9")
    before, moved = None, False
    for _ in range(5):
        logs = tr.iteration()
        now = None if tr.ema is None else {k: v.clone() for k, v in tr.ema.full_state_dict().items()}
        if before is not None and now is not None and "generator_loss" not in logs:
            assert not changed(before, now), f"EMA moved on critic-only step {tr.step - 1}"
        elif before is not None and now is not None:
            moved = True
        before = now
    assert moved  # (the check above could see a change)


def test_each_step_reads_two_fresh_batches(tmp_path):
    """Generator and critic read batches 2 step and 2 step + 1 of the data (as the researchers' loop): no sample
    is read twice across the first steps."""
    tr = make(tmp_path, "dfake_gen_update_ratio=1", "total_batch_size=2", "batch_size=1")
    read = []
    real = tr.data.batch
    tr.data.batch = lambda idx: (read.extend(idx), real(idx))[1]
    for _ in range(3):
        tr.iteration()
    assert sorted(read) == list(range(12))


def test_two_micro_batches_log_and_step_as_one_batch_of_two(tmp_path):
    """Gradient accumulation: the same global batch of 2 as one micro-batch of 2 or two of 1 gives the same logged
    losses and grad norms (the mean over micro-batches, each loss / accum back-propagated)."""
    rows = []
    for bs in (2, 1):
        tr = make(tmp_path / str(bs), "dfake_gen_update_ratio=1", "total_batch_size=2", f"batch_size={bs}")
        assert tr.plan.accum == 2 // bs
        rows.append(tr.iteration())
    for k in ("generator_loss", "critic_loss", "generator_grad_norm", "critic_grad_norm"):
        assert rows[1][k] == pytest.approx(rows[0][k], rel=1e-4), k


def test_per_chunk_exit_steps_are_drawn_independently(tmp_path, monkeypatch):
    """same_step_across_blocks false (their pipeline: one randint per block): the chunks of a rollout do not all
    exit at one step; each chunk's exit is uniform over the 4 denoising steps. With it true they always agree.
    (Read from the exit indices the trainer hands to the rollout.)"""
    import training.steps as steps

    seen = []
    real = steps.self_forcing_rollout
    monkeypatch.setattr(steps, "self_forcing_rollout",
                        lambda *a, exit_indices, **kw: (seen.append(list(exit_indices)),
                                                        real(*a, exit_indices=exit_indices, **kw))[1])
    for shared in (False, True):
        tr = make(tmp_path / str(shared), f"same_step_across_blocks={str(shared).lower()}")
        seen.clear()
        for s in range(20):  # the exit draw of a rollout, without the rest of an iteration
            tr.step = s
            with torch.no_grad():
                tr.rollout(["a red car"], [0], "gen", grad=False)
        assert all(len(e) == 2 for e in seen)  # 6 frames, 3 per chunk
        equal = sum(e[0] == e[1] for e in seen)
        if shared:
            assert equal == 20
        else:  # independent uniform draws agree with probability 1/4 (seeded, so deterministic)
            assert equal < 12, seen
            assert {e[1] for e in seen} == {0, 1, 2, 3}


def test_regression_steps_read_fresh_samples_through_an_epoch(tmp_path):
    """ODE regression, global batch 2 in micro-batches of 1: steps 0, 1, 2 read data indices 0..5, so with 6 pairs
    every pair is trained on exactly once in the first epoch (no sample read twice across steps)."""
    from training.data import LatentDataset, item_indices

    prompts = [f"prompt {i}" for i in range(6)]
    pairs = torch.randn(6, 5, 6, 16, 4, 6, generator=torch.Generator().manual_seed(0))
    data = LatentDataset(prompts, pairs, "ode_pairs", seed=7)
    tr = make(tmp_path, "trainer=ode", "total_batch_size=2", "batch_size=1", data=data)
    read = []
    real = data.batch
    data.batch = lambda idx: (read.extend(idx), real(idx))[1]
    for _ in range(3):
        tr.iteration()
    assert sorted(read) == list(range(6))
    assert sorted(item_indices(7, 6, read)) == list(range(6))


def test_prompt_dropout_replaces_the_stated_share_of_prompts():
    """prompt_dropout p: about a share p of prompts become negative_prompt (p = 0.1 and 0.3 over 2000 samples),
    not 1 - p."""
    from types import SimpleNamespace

    from training.trainer import Trainer

    for p in (0.1, 0.3):
        fake = SimpleNamespace(seed=7, step=0, cfg=SimpleNamespace(prompt_dropout=p, negative_prompt="NEG"))
        out = Trainer.drop_prompts(fake, ["x"] * 2000, list(range(2000)))
        assert abs(sum(o == "NEG" for o in out) / 2000 - p) < 0.04


def test_a_frozen_backbone_does_not_decay_in_the_gan_warm_up(tmp_path):
    """GAN warm-up: only the discriminator's branch trains. The frozen backbone gets no gradient (None, not zero),
    so AdamW's weight decay (0.01) does not shrink it and it gets no optimiser state; the branch does move."""
    from test_gan import gan_trainer
    from training.data import LatentDataset, synthetic_latents

    data = LatentDataset(*synthetic_latents(4, 3, 16, 12, 16, seed=0), "latents", seed=7)
    tr = gan_trainer(tmp_path, data, "discriminator_warmup_steps=5", "weight_decay=0.5", "critic_lr=1e-2")
    named = dict(tr.critic.named_parameters())
    before = {k: v.detach().clone() for k, v in named.items()}
    tr.iteration()
    after = {k: v.detach().clone() for k, v in tr.critic.named_parameters()}
    branch = [k for k in before if k.startswith(("_gan_ca_blocks", "_cls_pred_branch"))]
    backbone = [k for k in before if k.startswith("blocks.")]
    assert branch and backbone
    assert changed({k: before[k] for k in branch}, {k: after[k] for k in branch})
    assert not changed({k: before[k] for k in backbone}, {k: after[k] for k in backbone})
    with_state = {id(p) for p in tr.critic_opt.state}
    assert not any(id(p) in with_state for k, p in tr.critic.named_parameters() if k.startswith("blocks."))


def test_ts_schedule_draws_score_timesteps_from_the_exit_steps_range(tmp_path):
    """ts_schedule (their DMD: min_timestep = denoised_timestep_to): after a rollout that exits at warped step k
    (1000, 937.5, 833.3, 625), the score timestep is drawn from [to_k, 1000) with to_k = 750, 500, 250, 0, i.e.
    at least shift5(to_k) after the shift; and every draw stays within the clamp [20, 980]."""
    tr = make(tmp_path, "ts_schedule=true")
    shift5 = lambda t: 5 * (t / 1000) / (1 + 4 * (t / 1000)) * 1000  # noqa: E731
    for k, to in enumerate((750, 500, 250, 0)):
        ts = []
        for s in range(30):
            tr.step = s
            t, _ = tr.score_draws([0], "gen", [k, k])
            ts.append(float(t[0, 0]))
        assert min(ts) >= max(20, shift5(to)) - 1e-3 and max(ts) <= 980, (k, min(ts), max(ts))
        if to:  # (the bound is tight enough to be seen: some draw lies below shift5 of the next level up)
            assert min(ts) < shift5(to + 250), (k, min(ts))
