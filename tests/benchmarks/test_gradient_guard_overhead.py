"""GradientGuard's step-time overhead on CPU, side by side in one process (run with `make bench`).

Target (issue 3): the whole layered guard within 5% of the floor - a minimal callback that computes one fused norm
and checks it is finite - measured in the same run.
"""

from pathlib import Path

import pytest

from tests.benchmarks.overhead import measure, to_markdown
from tests.benchmarks.report import save

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
def test_gradient_guard_overhead_cpu():
    result = measure("cpu", rounds=5, warmup=20, steps=150)
    save(DOCS, "gradient_guard_overhead_cpu", result, to_markdown(result))
    assert result["vs_floor_pct"]["guard"] <= 5.0
