"""CompressExport vs Lightning's ModelPruning on the digits MLP (run with `make bench`).

Target (issue 7): the exported artifact >= 4x smaller than fp32 with <= 1 point accuracy drop, and faster CPU
inference; Lightning's ModelPruning side by side.
"""

from pathlib import Path

import pytest

from tests.benchmarks.compress_benchmark import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
def test_compress_benchmark():
    rows = main(str(DOCS))["rows"]
    fp32, best = rows["fp32"], rows["structured_search+int8"]
    assert best["smaller_than_fp32"] >= 4.0
    assert fp32["test_acc_artifact"] - best["test_acc_artifact"] <= 0.01
    assert best["latency_ms_b256"] < fp32["latency_ms_b256"]
    assert rows["lightning_ModelPruning_0.5"]["file_bytes"] >= 0.99 * fp32["file_bytes"]  # pruning alone: no smaller
