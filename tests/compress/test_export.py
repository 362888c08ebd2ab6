"""Export to .pt2 and ONNX, and back through fresh load paths."""

from __future__ import annotations

import pytest
import torch

from lightning_guard import GuardConfigError
from lightning_guard import compress as C
from tests.compress.nets import mlp


def test_pt2_and_onnx_round_trip_through_fresh_load_paths(tmp_path):
    model = mlp().eval()
    x = torch.randn(8, 64)
    pt2 = C.export_pt2(model, (x,), tmp_path / "m.pt2")
    onnx = C.export_onnx(model, (x,), tmp_path / "m.onnx")
    other_batch = torch.randn(3, 64)  # the batch dimension is dynamic
    assert C.max_output_error(C.load_artifact(pt2), model, [(other_batch,)]) == 0.0
    assert C.max_output_error(C.load_artifact(onnx), model, [(other_batch,)]) < 1e-5
    q = C.export_onnx(model, (x,), tmp_path / "q.onnx", quantize_int8=True)
    assert q.stat().st_size < onnx.stat().st_size / 2
    assert not (tmp_path / "q.fp32.onnx").exists()
    with pytest.raises(GuardConfigError, match=r"unknown artifact type '\.bin'"):
        C.load_artifact(tmp_path / "m.bin")
