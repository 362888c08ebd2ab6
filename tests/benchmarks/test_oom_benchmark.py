"""OOMGuard vs BatchSizeFinder under a simulated out-of-memory, and its steady-state cost (run with `make bench`)."""

from pathlib import Path

import pytest

from tests.benchmarks.oom_benchmark import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
def test_oom_benchmark():
    result = main(str(DOCS))
    runs = result["runs"]
    assert runs["no_guard"]["error"] == "OutOfMemoryError"
    guard, ref = runs["oom_guard"], runs["reference"]
    assert guard["effective_batch"] == ref["effective_batch"] == 256
    assert guard["optimizer_steps"] == ref["optimizer_steps"]
    assert abs(guard["val_acc"] - ref["val_acc"]) <= 0.01  # same training, split differently
    assert guard["first_good_step_s"] < runs["batch_size_finder"]["first_good_step_s"]
    assert result["steady_state"]["vs_plain_pct"]["oom_guard"] <= 3.0  # CPU noise allowance; see the docs
