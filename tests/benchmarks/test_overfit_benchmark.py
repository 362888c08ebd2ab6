"""OverfitGuard vs EarlyStopping vs no stopping on the same seeds (run with `make bench`)."""

from pathlib import Path

import pytest

from tests.benchmarks.overfit_benchmark import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
def test_overfit_benchmark():
    result = main(str(DOCS))
    mean = result["mean"]
    assert mean["overfit_guard"]["val_loss"] < mean["lightning_early_stopping"]["val_loss"]
    assert mean["overfit_guard"]["val_loss"] < mean["no_stopping"]["val_loss"]
