"""OOMGuard's micro-batch size policy on plain numbers: halving, giving up, growing back, and its checkpoint state."""

from __future__ import annotations

import dataclasses

import pytest

from lightning_guard import OOMGuard
from lightning_guard.functional.oom_policy import (
    STATE_KEYS,
    Grow,
    Shrink,
    SizePolicy,
    chunked,
    current_size,
    eval_retry_size,
    oom_size,
)


def _clean(policy: SizePolicy, batches: int) -> tuple[SizePolicy, list[Grow]]:
    grows = []
    for _ in range(batches):
        policy, grow = policy.after_clean_batch()
        if grow is not None:
            grows.append(grow)
    return policy, grows


@pytest.mark.parametrize(
    ("micro", "n", "expected"), [(None, 50, 50), (16, 50, 16), (64, 50, 50), (16, -1, -1), (None, -1, -1)]
)
def test_the_size_in_force_is_capped_by_the_batch(micro, n, expected):
    assert current_size(micro, n) == expected


@pytest.mark.parametrize(
    ("micro", "n", "expected"), [(None, 50, False), (50, 50, False), (16, 50, True), (16, 17, True)]
)
def test_a_batch_is_chunked_only_when_larger_than_the_micro_batch(micro, n, expected):
    assert chunked(micro, n) is expected


def test_the_short_last_part_records_the_size_in_force_not_its_own():
    assert oom_size(2, 12, 50) == 12  # 50 in parts of 12 ends with 2: the next size must not become 1
    assert oom_size(50, None, 50) == 50
    assert oom_size(7, None, -1) == 7  # batch not measured: the part's own size


def test_an_oom_halves_the_failed_size_and_restarts_the_clean_count():
    policy = SizePolicy(micro_batch_size=None, grow_after=4, clean_steps=3, grow_wait=4, largest_batch=64)
    after, shrink = policy.after_oom([64.0])
    assert shrink == Shrink(failed=64, new=32, grow_back_failed=False)
    assert not shrink.give_up
    assert after == dataclasses.replace(policy, micro_batch_size=32, clean_steps=0)


def test_the_smallest_size_among_the_failing_ranks_is_halved():
    after, shrink = SizePolicy(micro_batch_size=32).after_oom([32.0, 16.0])
    assert (shrink.failed, shrink.new, after.micro_batch_size) == (16, 8, 8)


@pytest.mark.parametrize(("failed", "new"), [(25, 12), (3, 1), (2, 1)])
def test_odd_sizes_round_down_and_never_below_one(failed, new):
    assert SizePolicy(micro_batch_size=failed).after_oom([float(failed)])[1].new == new


def test_repeated_ooms_halve_down_to_one_then_give_up():
    policy, sizes, gave_up = SizePolicy(largest_batch=256), [], False
    for _ in range(20):  # bounded: a policy that never gives up fails here instead of hanging
        failed = policy.micro_batch_size or 256
        policy, shrink = policy.after_oom([float(failed)])
        if shrink.give_up:
            gave_up = True
            break
        sizes.append(shrink.new)
    assert gave_up
    assert sizes == [128, 64, 32, 16, 8, 4, 2, 1]
    assert policy.micro_batch_size == 1


def test_giving_up_at_size_one_leaves_the_state_as_it_was():
    policy = SizePolicy(micro_batch_size=1, grow_after=5, clean_steps=2, grow_wait=5, largest_batch=8)
    after, shrink = policy.after_oom([1.0])
    assert shrink.give_up
    assert shrink.new == 0
    assert after == policy


def test_a_failed_grow_back_returns_to_the_size_that_worked_and_waits_twice_as_long():
    policy = SizePolicy(micro_batch_size=32, grow_after=4, grow_wait=4, growing_from=16, largest_batch=64)
    after, shrink = policy.after_oom([32.0])
    assert shrink == Shrink(failed=32, new=16, grow_back_failed=True)
    assert (after.micro_batch_size, after.grow_wait, after.growing_from, after.clean_steps) == (16, 8, None, 0)
    # the next grow-back comes after 8 clean batches, not 4; once it goes through, the wait is grow_after again
    after, grows = _clean(after, 7)
    assert grows == []
    after, grows = _clean(after, 1)
    assert grows == [Grow(old=16, new=32, after=8)]
    after, _ = _clean(after, 1)
    assert (after.grow_wait, after.growing_from, after.clean_steps) == (4, None, 1)


def test_a_failed_grow_back_from_one_returns_to_one_instead_of_giving_up():
    after, shrink = SizePolicy(micro_batch_size=2, grow_after=1, grow_wait=1, growing_from=1).after_oom([2.0])
    assert not shrink.give_up
    assert (shrink.new, shrink.grow_back_failed, after.micro_batch_size) == (1, True, 1)


def test_an_oom_at_or_below_the_size_a_grow_back_started_from_halves_it():
    policy = SizePolicy(micro_batch_size=32, grow_after=4, grow_wait=4, growing_from=16, largest_batch=64)
    after, shrink = policy.after_oom([16.0])
    assert shrink == Shrink(failed=16, new=8, grow_back_failed=False)
    assert (after.grow_wait, after.growing_from) == (4, None)


def test_the_size_grows_back_after_grow_after_clean_batches():
    policy = SizePolicy.start(16, grow_after=3).saw_batch(64)
    policy, grows = _clean(policy, 2)
    assert grows == []
    assert policy.clean_steps == 2
    policy, grows = _clean(policy, 1)
    assert grows == [Grow(old=16, new=32, after=3)]
    assert (policy.micro_batch_size, policy.growing_from, policy.clean_steps) == (32, 16, 0)


@pytest.mark.parametrize("largest", [64, 50])
def test_growing_to_the_largest_batch_returns_to_the_whole_batch(largest):
    policy = SizePolicy(micro_batch_size=32, grow_after=1, grow_wait=1, largest_batch=largest)
    after, grow = policy.after_clean_batch()
    assert grow == Grow(old=32, new=largest, after=1)
    assert after.micro_batch_size is None


def test_without_grow_after_or_at_the_whole_batch_nothing_grows_or_counts():
    never, grows = _clean(SizePolicy.start(16, None).saw_batch(64), 100)
    assert (grows, never.micro_batch_size, never.clean_steps) == ([], 16, 0)
    whole, grows = _clean(SizePolicy.start(None, 2).saw_batch(64), 100)
    assert (grows, whole.micro_batch_size, whole.clean_steps) == ([], None, 0)


def test_a_new_policy_waits_grow_after_and_remembers_the_largest_batch():
    policy = SizePolicy.start(8, grow_after=5)
    assert policy.grow_wait == 5
    assert SizePolicy.start(8, None).grow_wait == 0
    assert policy.saw_batch(32).saw_batch(16).largest_batch == 32


@pytest.mark.parametrize(("size", "new"), [(12, 6), (3, 1), (2, 1), (1, 0), (0, 0)])
def test_evaluation_halves_until_below_one(size, new):
    assert eval_retry_size(size) == new


def test_the_policy_state_round_trips():
    policy = SizePolicy(micro_batch_size=8, grow_after=4, clean_steps=3, grow_wait=8, growing_from=16, largest_batch=64)
    state = policy.state()
    assert tuple(state) == STATE_KEYS
    assert SizePolicy.from_state(state, grow_after=4) == policy


def test_the_guards_state_dict_carries_the_policy_unchanged():
    policy = SizePolicy(micro_batch_size=8, grow_after=4, clean_steps=3, grow_wait=8, growing_from=16, largest_batch=64)
    state = {"version": 1, **policy.state(), "eval_micro_batch_size": {"validate": 4}, "retries": 2}
    guard = OOMGuard(grow_after=4)
    guard.load_state_dict(state)
    assert guard.micro_batch_size == 8
    assert guard._policy() == policy
    written = guard.state_dict()
    assert written == state
    assert list(written) == [
        "version",
        "micro_batch_size",
        "eval_micro_batch_size",
        "retries",
        "clean_steps",
        "grow_wait",
        "growing_from",
        "largest_batch",
    ]
