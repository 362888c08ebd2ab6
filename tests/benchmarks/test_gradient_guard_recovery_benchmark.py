"""GradientGuard on real runs (`make bench`): the issue-13 targets on the character LM and on digits."""

import json
from pathlib import Path

import pytest

from tests.benchmarks.gradient_guard_recovery import CONFIGS, LM_PRECISIONS, main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
@pytest.mark.timeout(3600)
def test_gradient_guard_recovery_benchmark():
    result = main(str(DOCS))
    assert json.loads((DOCS / "gradient_guard_recovery.json").read_text())["runs"] == result["runs"]
    assert (DOCS / "gradient_guard_recovery.png").exists()
    runs = {(r["workload"], r["precision"], r["config"]): r for r in result["runs"]}
    for precision in LM_PRECISIONS:
        lm = {c: runs["char_lm", precision, c] for c in CONFIGS}
        assert lm["clean_guard"]["warnings"] == 0
        assert abs(lm["clean_guard"]["rel_diff"]) <= 0.005
        assert lm["fault_guard"]["rel_diff"] <= 0.02
        assert lm["fault_guard"]["steps_lost"] <= 60  # tens of steps, not hundreds
    digits = {c: runs["digits", "32-true", c] for c in CONFIGS}
    assert digits["clean_guard"]["warnings"] == 0
    assert digits["fault_guard"]["val_acc"] >= 0.95
