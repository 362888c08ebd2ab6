"""All step-path guards together (WarmupCosine, GradientGuard, L1Penalty, OOMGuard) vs bare Lightning and the
one-fused-norm floor, CPU, side by side in one process (run with `make bench`).

The issue's target (<= 3% over bare for all step-path guards) is for a ~100M-parameter transformer on a GPU
(`gpu_check.sh OUT all`); on this CPU's 4.5 ms MLP step the fixed per-step Python cost dominates, so this test only
guards against regressions: at most 20% over the floor (measured +9.6%).
"""

from pathlib import Path

import pytest

from tests.benchmarks.overhead import ALL_CONFIGS, measure, to_markdown
from tests.benchmarks.report import save

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
def test_all_guards_overhead_cpu():
    result = measure("cpu", rounds=5, warmup=20, steps=150, configs=ALL_CONFIGS)
    save(DOCS, "all_overhead_cpu", result, to_markdown(result))
    assert result["vs_floor_pct"]["all_guards"] <= 20.0
