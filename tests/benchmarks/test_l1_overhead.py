"""L1Penalty's step-time overhead vs the loss-term idiom, side by side in one process (run with `make bench`)."""

from pathlib import Path

import pytest

from tests.benchmarks.overhead import L1_CONFIGS, measure, to_markdown
from tests.benchmarks.report import save

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
def test_l1_overhead_cpu():
    result = measure("cpu", rounds=5, warmup=20, steps=150, configs=L1_CONFIGS)
    save(DOCS, "l1_overhead_cpu", result, to_markdown(result))
    pct = result["vs_bare_pct"]
    assert pct["l1_subgradient"] < pct["l1_loss_term"]
