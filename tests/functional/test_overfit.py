"""Prechelt's criteria ("Early Stopping - But When?", 1998) against values computed by hand from the paper's
definitions: GL(t) = 100 (E_va(t)/E_opt(t) - 1), P_k(t) = 1000 (sum_strip E_tr / (k min_strip E_tr) - 1),
PQ = GL / P_k, UP_s: E_va rose at the end of s successive strips."""

import math

import pytest

from lightning_guard.functional import generalization_loss, progress_quotient, training_progress, up_stops


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
