"""Quantisation with torchao without a Trainer."""

from __future__ import annotations

import pytest

from lightning_guard import compress as C


@pytest.mark.parametrize("mode", ["int8_weight_only", "int8_dynamic"])
def test_quantize_int8_keeps_outputs_close_and_shrinks_the_state(trained, mode):
    model, accuracy, x = trained
    q = C.quantize(model, mode)
    assert C.state_bytes(q) < C.state_bytes(model) / 3
    assert abs(accuracy(q) - accuracy(model)) <= 0.01
    assert C.max_output_error(q, model, [(x[:64],)]) < 0.05
