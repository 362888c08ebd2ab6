"""GradientGuard's step-time overhead on CPU, side by side in one process (run with `make bench`).

Target (issue 3): the whole layered guard within 5% of the floor - a minimal callback that computes one fused norm
and checks it is finite - measured in the same run.
"""

from pathlib import Path

import pytest

from tests.benchmarks.overhead import measure, to_markdown

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
def test_gradient_guard_overhead_cpu():
    import json

    result = measure("cpu", rounds=5, warmup=20, steps=150)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "gradient_guard_overhead_cpu.json").write_text(json.dumps(result, indent=2))
    (DOCS / "gradient_guard_overhead_cpu.md").write_text(to_markdown(result))
    print(to_markdown(result))
    assert result["vs_floor_pct"]["guard"] <= 5.0
