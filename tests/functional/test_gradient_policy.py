"""GradientGuard's decision on plain numbers: no Trainer, no tensors."""

import math

import pytest

from lightning_guard.functional.gradient_policy import LrBackoff, decide_step, step_facts

NAN, INF = math.nan, math.inf


def facts(*rows, sharded=False):
    return step_facts([tuple(map(float, r)) for r in rows], sharded=sharded)


def decide(f, **kw):
    args = {
        "scheduled_skip": False,
        "scaler": False,
        "spike": False,
        "z": 0.5,
        "loss_spike": False,
        "loss_z": 0.0,
        "spike_action": "clip",
        "rollback_z": 12.0,
        "rollback_enabled": True,
        "suspect": False,
        "loss_streak": 0,
    }
    args.update(kw)
    return decide_step(f, **args)


def test_facts_of_healthy_ranks():
    f = facts((1, 2.0, 0.5, 0), (1, 3.0, 0.7, 0))
    assert f.healthy
    assert f.norm == 3.0
    assert f.loss_mean == pytest.approx(0.6)
    assert f.norms == (2.0, 3.0)


def test_facts_name_the_bad_rank_and_what_is_bad():
    assert facts((1, 2.0, 0.5, 0), (1, NAN, 0.7, 0)).bad_ranks == (1,)
    assert facts((1, 2.0, 0.5, 0), (1, NAN, 0.7, 0)).what_is_bad == "gradients"
    assert facts((1, 2.0, INF, 0), (1, 2.0, 0.7, 0)).what_is_bad == "loss"
    only_buffers = facts((1, 2.0, 0.5, 1), (1, 2.0, 0.7, 0))
    assert only_buffers.bad_ranks == (0,)
    assert only_buffers.what_is_bad == "buffers"
    assert math.isnan(only_buffers.norm)


def test_a_rank_without_loss_neither_votes_nor_counts_as_bad():
    f = facts((0, NAN, NAN, 1), (1, 2.0, 0.4, 0))
    assert f.healthy
    assert f.loss_mean == 0.4
    assert f.norm == 2.0


def test_sharded_norm_is_the_root_of_the_summed_squares_on_every_rank():
    f = facts((1, 9.0, 0.1, 0), (1, 16.0, 0.1, 0), sharded=True)
    assert f.norms == (5.0, 5.0)
    assert facts((1, 9.0, 0.1, 0), (1, NAN, 0.1, 0), sharded=True).bad_ranks == (0, 1)


def test_a_scheduled_skip_comes_first_even_on_a_bad_step():
    assert decide(facts((1, NAN, 0.1, 0)), scheduled_skip=True).action == "scheduled_skip"


def test_non_finite_gradients_with_a_finite_loss_under_a_scaler_are_its_overflow():
    bad_grads = facts((1, NAN, 0.1, 0))
    assert decide(bad_grads, scaler=True).action == "amp_overflow"
    assert decide(bad_grads, scaler=False).action == "nonfinite_skip"
    assert decide(facts((1, NAN, NAN, 0)), scaler=True).action == "nonfinite_skip"  # the loss itself is NaN


def test_healthy_resets_the_loss_streak():
    d = decide(facts((1, 1.0, 0.1, 0)), loss_streak=2)
    assert (d.action, d.loss_streak) == ("healthy", 0)


@pytest.mark.parametrize(("action", "expected"), [("clip", "clip"), ("skip", "skip"), ("warn", "warn")])
def test_an_ordinary_spike_follows_spike_action(action, expected):
    d = decide(facts((1, 9.0, 0.1, 0)), spike=True, z=5.0, spike_action=action)
    assert d.action == expected
    assert d.z == 5.0


def test_a_huge_spike_is_skipped_as_damage_and_rolled_back_only_if_it_persists():
    first = decide(facts((1, 99.0, 0.1, 0)), spike=True, z=20.0)
    assert (first.action, first.why, first.roll_back_now) == ("damage_skip", "above rollback_z", False)
    second = decide(facts((1, 9.0, 0.1, 0)), spike=True, z=5.0, suspect=True)
    assert (second.action, second.why, second.roll_back_now) == ("damage_skip", "right after a huge spike", True)
    assert not decide(facts((1, 9.0, 0.1, 0)), spike=True, z=5.0, suspect=True, rollback_enabled=False).roll_back_now


def test_a_loss_spike_alone_is_a_hard_batch_until_it_stays_high():
    d = decide(facts((1, 1.0, 5.0, 0)), loss_spike=True, loss_z=8.0)
    assert (d.action, d.loss_streak, d.z) == ("hard_batch", 1, 8.0)
    third = decide(facts((1, 1.0, 5.0, 0)), loss_spike=True, loss_z=8.0, loss_streak=2)
    assert (third.action, third.why, third.roll_back_now, third.loss_streak) == (
        "damage_skip",
        "the loss stays high",
        True,
        3,
    )


def test_the_reported_z_is_the_larger_of_the_spikes():
    assert decide(facts((1, 9.0, 5.0, 0)), spike=True, z=5.0, loss_spike=True, loss_z=7.0, spike_action="warn").z == 7.0
    assert decide(facts((1, 9.0, 5.0, 0)), spike=True, z=5.0, loss_spike=True, loss_z=7.0).z == 5.0  # clip: the norm's
    assert decide(facts((1, 9.0, 5.0, 0)), spike=True, z=20.0, rollback_z=None).action == "clip"  # never huge


# ---------------------------------------------------------------------------------------------------- LrBackoff
def test_backoff_starts_after_enough_skips_inside_the_window():
    b = LrBackoff(after=3, window=5, factor=0.5, recovery=4)
    assert [b.note_skip(s) for s in (1, 2)] == [False, False]
    assert b.note_skip(10) is False  # steps 1 and 2 fell out of the window (10 - 5)
    assert list(b.skips) == [10]
    assert [b.note_skip(s) for s in (11, 12)] == [False, True]
    assert b.scale == 0.5
    assert b.progress == 0
    assert not b.skips


def test_backoff_does_not_stack_and_recovers_linearly():
    b = LrBackoff(after=1, window=50, factor=0.5, recovery=4)
    assert b.note_skip(0) is True
    assert b.note_skip(1) is False
    assert b.scale == 0.5
    seen = [(b.note_applied(), b.scale) for _ in range(5)]
    assert seen == [
        ("recovering", 0.625),
        ("recovering", 0.75),
        ("recovering", 0.875),
        ("recovered", 1.0),
        ("idle", 1.0),
    ]
    assert b.note_skip(2) is True  # a full LR can back off again


def test_backoff_disabled_and_forget():
    off = LrBackoff(after=None, window=5, factor=0.5, recovery=4)
    assert not any(off.note_skip(s) for s in range(10))
    assert off.scale == 1.0
    assert not off.skips
    b = LrBackoff(after=2, window=50, factor=0.5, recovery=4)
    b.note_skip(1)
    b.forget()  # a rollback undid the skip
    assert b.note_skip(2) is False
    assert list(b.skips) == [2]
