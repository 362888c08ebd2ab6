import json
import math
from pathlib import Path

import pytest

from tests.benchmarks.bn_nan_batch import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
@pytest.mark.timeout(1200)
def test_a_skipped_nan_batch_ends_where_the_clean_run_ends():
    result = main(str(DOCS))
    saved = json.loads((DOCS / "bn_nan_batch.json").read_text())["rows"]
    assert [(r["config"], r["seed"], r["val_acc"]) for r in saved] == [
        (r["config"], r["seed"], r["val_acc"]) for r in result["rows"]
    ]
    rows = {(r["config"], r["seed"]): r for r in result["rows"]}
    for seed in result["seeds"]:
        clean, skip = rows["clean", seed], rows["skip", seed]
        assert skip["buffers_finite"]
        assert abs(skip["val_acc"] - clean["val_acc"]) <= 0.05
        assert math.isnan(rows["skip_without_buffers", seed]["val_loss"])  # what main did
