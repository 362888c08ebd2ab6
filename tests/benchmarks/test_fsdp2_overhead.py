"""The guards' steady-state cost under FSDP2 on 2 CPU processes (run with `make bench`)."""

from pathlib import Path

import pytest

from tests.benchmarks.fsdp2_overhead import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
def test_fsdp2_overhead():
    result = main(str(DOCS))
    assert set(result["ms_per_batch_median"]) == {"none", "oom_guard", "step_guards", "step_guards_oom"}
    assert all(v > 0 for v in result["ms_per_batch_median"].values())
