"""L1Penalty's step-time overhead vs the loss-term idiom, side by side in one process (run with `make bench`)."""

import json
from pathlib import Path

import pytest

from tests.benchmarks.overhead import L1_CONFIGS, measure, to_markdown

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
def test_l1_overhead_cpu():
    result = measure("cpu", rounds=5, warmup=20, steps=150, configs=L1_CONFIGS)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "l1_overhead_cpu.json").write_text(json.dumps(result, indent=2))
    (DOCS / "l1_overhead_cpu.md").write_text(to_markdown(result))
    print(to_markdown(result))
    pct = result["vs_bare_pct"]
    assert pct["l1_subgradient"] < pct["l1_loss_term"]
