"""L1Penalty's sparsity-accuracy trade-off on digits, SGD and AdamW (`make bench`)."""

import json
from pathlib import Path

import pytest

from tests.benchmarks.l1_sparsity import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
def test_l1_sparsity_benchmark():
    result = main(str(DOCS))
    assert json.loads((DOCS / "l1_sparsity.json").read_text())["rows"] == result["rows"]
    rows = {(r["optimizer"], r["mode"], r["strength"]): r for r in result["rows"]}
    base = rows["adamw", "none", 0.0]["val_acc"]
    adaptive = rows["adamw", "adaptive_proximal", 1e-3]
    assert adaptive["sparsity"] >= 0.3
    assert adaptive["val_acc"] >= base - 0.02
    assert rows["adamw", "proximal", 1e-2]["sparsity"] < 0.05  # why the adaptive mode exists
