"""Prechelt's criteria ("Early Stopping - But When?", 1998) against values computed by hand from the paper's
definitions: GL(t) = 100 (E_va(t)/E_opt(t) - 1), P_k(t) = 1000 (sum_strip E_tr / (k min_strip E_tr) - 1),
PQ = GL / P_k, UP_s: E_va rose at the end of s successive strips."""

import math

import pytest

from lightning_guard.functional import generalization_loss, progress_quotient, training_progress, up_stops
from lightning_guard.functional.overfit import divergence, overfitting, shift_suspected, stop_reason, underfitting


def test_generalization_loss_by_hand():
    assert generalization_loss(0.6, 0.5) == pytest.approx(20.0)  # 100 * (0.6/0.5 - 1)
    assert generalization_loss(0.5, 0.5) == 0.0
    assert generalization_loss(0.45, 0.5) == pytest.approx(-10.0)
    assert generalization_loss(float("nan"), 0.5) == math.inf


def test_training_progress_by_hand():
    # strip 0.5, 0.45, 0.42, 0.41, 0.40: sum 2.18, k*min = 2.0 -> 1000 * (2.18/2.0 - 1) = 90
    assert training_progress([0.5, 0.45, 0.42, 0.41, 0.40]) == pytest.approx(90.0)
    assert training_progress([0.4] * 5) == 0.0  # stalled training: no progress at all
    assert math.isnan(training_progress([0.0, 0.1]))  # undefined for a non-positive minimum


def test_progress_quotient_by_hand():
    assert progress_quotient(20.0, 90.0) == pytest.approx(20.0 / 90.0)
    assert progress_quotient(5.0, 0.0) == math.inf  # generalization loss with no training progress: stop
    assert progress_quotient(0.0, 0.0) == 0.0


def test_up_by_hand():
    assert up_stops([0.5, 0.4, 0.41, 0.42], 2)  # rose at the end of the last 2 strips
    assert not up_stops([0.5, 0.4, 0.41, 0.40], 2)
    assert not up_stops([0.5, 0.6], 2)  # not enough strips yet


# ------------------------------------------------------------------ OverfitGuard's diagnosis, on plain numbers


def test_divergence_by_a_rank_or_by_the_factor():
    assert divergence(1.0, 1.0, mode="min", factor=3.0, nonfinite=True) == "non-finite"
    assert divergence(3.5, 1.0, mode="min", factor=3.0, nonfinite=False) == "3.5 > 3.0x best"
    assert divergence(float("inf"), 1.0, mode="min", factor=3.0, nonfinite=False) == "non-finite"
    assert divergence(3.5, 1.0, mode="max", factor=3.0, nonfinite=False) is None  # an accuracy never diverges so
    assert divergence(3.5, 1.0, mode="min", factor=None, nonfinite=False) is None
    assert divergence(float("nan"), 1.0, mode="min", factor=3.0, nonfinite=False) is None  # NaN unflagged: no rank said


def test_shift_needs_validation_never_improving_while_training_does():
    kw = {"evaluations": 3, "max_evaluations": 5, "ratio": 2.0, "mode": "min", "first_train": 1.0}
    assert shift_suspected(**kw, best_is_first=True, val=1.5, train=0.5)
    assert not shift_suspected(**kw, best_is_first=False, val=1.5, train=0.5)  # validation improved once
    assert not shift_suspected(**kw, best_is_first=True, val=0.9, train=0.5)  # within the ratio
    assert not shift_suspected(**{**kw, "evaluations": 6}, best_is_first=True, val=1.5, train=0.5)  # too late


def test_overfitting_needs_a_model_that_learned():
    kw = {"improved": False, "train_improved": True, "train": 0.2, "gap": 0.5, "best_gap": 0.3, "worse_than_best": True}
    assert overfitting(**kw, learned=True)
    assert not overfitting(**kw, learned=False)  # chance level
    assert not overfitting(**{**kw, "gap": 0.2}, learned=True)  # the gap did not grow


def test_underfitting_is_a_stall_with_no_gap():
    assert underfitting(progress=0.5, strip_first_val=1.0, val=0.999, train=1.0, gap=0.0) == (
        True,
        pytest.approx(0.001),
    )
    assert not underfitting(progress=0.5, strip_first_val=None, val=1.0, train=1.0, gap=0.0)[0]  # no whole strip
    assert not underfitting(progress=5.0, strip_first_val=1.0, val=1.0, train=1.0, gap=0.0)[0]  # training moves
    assert not underfitting(progress=0.5, strip_first_val=1.0, val=1.0, train=1.0, gap=0.5)[0]  # a real gap


def test_stop_reason_per_criterion():
    kw = {"wait": 0, "patience": 3, "gl": 0.0, "gl_alpha": 5.0, "pq": 0.0, "pq_alpha": 0.5, "strip_length": 2}
    assert stop_reason("patience", evaluations=4, strip_ends=[], up_strips=2, **{**kw, "wait": 3}) == "patience"
    assert stop_reason("gl", evaluations=4, strip_ends=[], up_strips=2, **{**kw, "gl": 6.0}) == "gl"
    assert stop_reason("pq", evaluations=3, strip_ends=[], up_strips=2, **{**kw, "pq": 1.0}) is None  # mid-strip
    assert stop_reason("pq", evaluations=4, strip_ends=[], up_strips=2, **{**kw, "pq": 1.0}) == "pq"
    assert stop_reason("up", evaluations=6, strip_ends=[0.5, 0.6, 0.7], up_strips=2, **kw) == "up"
    assert stop_reason("up", evaluations=6, strip_ends=[0.5, 0.6, 0.55], up_strips=2, **kw) is None
