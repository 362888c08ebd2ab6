"""The search's judgements as pure functions: no model, no file (the search acts on what they return)."""

from __future__ import annotations

import pytest

from lightning_guard.compress import budget as B
from lightning_guard.compress.result import Stage


@pytest.mark.parametrize(
    ("baseline", "metric", "higher_is_better", "drop"),
    [(0.75, 0.5, True, 0.25), (0.5, 0.75, True, -0.25), (0.5, 0.75, False, 0.25), (0.75, 0.5, False, -0.25)],
)
def test_the_drop_is_positive_when_the_metric_got_worse(baseline, metric, higher_is_better, drop):
    assert B.metric_drop(baseline, metric, higher_is_better=higher_is_better) == drop


def test_a_candidate_exactly_at_the_budget_is_kept_and_one_beyond_it_is_not():
    assert B.within_budget(0.75, 0.5, 0.25, higher_is_better=True)
    assert not B.within_budget(0.75, 0.5, 0.2, higher_is_better=True)
    assert B.within_budget(0.5, 0.75, 0.0, higher_is_better=True)  # better than the baseline: always kept
    assert not B.within_budget(0.5, 0.75, 0.0, higher_is_better=False)  # a loss that rose
    assert B.within_budget(1.0, 1.0, 0.0, higher_is_better=False)


def test_a_quantised_file_must_be_min_size_ratio_times_smaller():
    assert B.size_not_worth_it("int8_weight_only", 1500, 1000, 1.5) is None  # exactly 1.5x: kept
    assert B.size_not_worth_it("int8_weight_only", 1000, 1000, 1.5) == (
        "the int8_weight_only .pt2 (1000 bytes) is only 1.00x smaller than the fp32 one (1000), "
        "below min_size_ratio 1.5"
    )
    assert B.size_not_worth_it("int8_dynamic", 10, 0, 1.5) is None  # an empty file does not divide by zero


def test_a_quantised_file_must_not_be_slower_beyond_max_latency_ratio():
    assert B.latency_not_worth_it("int8_weight_only", 1.0, 1.1, 1.1) is None  # at the ratio: kept
    assert B.latency_not_worth_it("int8_weight_only", 0.24, 0.81, 1.1) == (
        "the int8_weight_only .pt2 runs in 0.81 ms on CPU against 0.24 ms for the fp32 one "
        "(more than max_latency_ratio 1.1 times)"
    )


def test_the_kept_metric_is_the_last_accepted_candidates_else_the_baseline():
    stages = [
        Stage("baseline", "fp32", "measured", metric=0.97),
        Stage("prune", "structured 0.75", "rejected", metric=0.90),
        Stage("prune", "structured 0.5", "accepted", metric=0.965),
        Stage("quantize", "int8_weight_only", "accepted", metric=0.962),
        Stage("quantize", "int8_weight_only", "rejected"),  # not worth it: no metric
    ]
    assert B.kept_metric(stages, 0.97) == 0.962
    assert B.kept_metric(stages, 0.97, "prune") == 0.965  # the quantised model was not kept: the pruned one's
    assert B.kept_metric(stages[:2], 0.97) == 0.97
    assert isinstance(B.kept_metric([], 1), float)
