"""Do no harm on the shared workloads: each guard at its defaults vs the same seed without it (`make bench`)."""

import json
from pathlib import Path

import pytest

from tests.benchmarks.do_no_harm import ALL, NOISE, PLAN, guards_for, main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
@pytest.mark.timeout(5400)  # bf16 is emulated on CPUs without avx512_bf16: ~100 s a char_lm run
def test_do_no_harm_benchmark():
    result = main(str(DOCS))
    assert json.loads((DOCS / "do_no_harm.json").read_text())["rows"] == result["rows"]
    assert "| char_lm | bf16-mixed | gradient_guard |" in (DOCS / "do_no_harm.md").read_text()
    rows = {(r["workload"], r["precision"], r["guard"], r["seed"]): r for r in result["rows"]}
    for workload, precisions in PLAN:
        for precision in precisions:
            for seed in result["seeds"]:
                for guard in guards_for(workload):
                    assert (workload, precision, guard, seed) in rows
                assert rows[workload, precision, ALL, seed]["reference"] == "warmup_cosine"
    assert all(r["precision"] == "32-true" for r in result["rows"] if r["guard"] == NOISE)
    # with no out-of-memory error OOMGuard only wraps the step: the runs are bit-identical to the unguarded ones
    assert all(r["rel_diff"] == 0.0 for r in result["rows"] if r["guard"] == "oom_guard")
    # a NaN batch skipped by GradientGuard on the BatchNorm net ends where the clean run ends; main's skip did not
    faults = {(r["config"], r["seed"]): r for r in result["fault_rows"]}
    for seed in result["seeds"]:
        assert faults["skip", seed]["verdict"] == "ok"
        assert faults["skip_without_buffers", seed]["verdict"] == "reference: harm"
    assert "| conv_bn | NaN batch at step" in (DOCS / "do_no_harm.md").read_text()
    # the schedule never warns on a healthy run
    assert all(r["quiet"] for r in result["rows"] if r["guard"] == "warmup_cosine")
