"""training/steps.py on the one-process CPU trainer of tests/test_training.py: the EMA moves only with the
generator, each step reads fresh batches, and gradient accumulation equals one larger batch."""

import pytest

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
