"""All step-path guards together (WarmupCosine, GradientGuard, L1Penalty, OOMGuard), CPU, side by side in one run
(``make bench``): in one process against bare Lightning and the one-fused-norm floor callback, and under ``ddp_spawn``
(2 processes, gloo) against plain DDP.

Issue 16's targets: within 5% of the floor in one process, within 10% of plain DDP under ``ddp_spawn``. (The GPU
target, <= 3% over bare for a ~135M-parameter LM, is checked by ``gpu_check.sh OUT all`` when a GPU is lent.)
"""

from pathlib import Path

import pytest

from tests.benchmarks.overhead import ALL_CONFIGS, DDP_CONFIGS, measure, to_markdown
from tests.benchmarks.report import save

DOCS = Path(__file__).resolve().parents[2] / "docs" / "benchmarks"


@pytest.mark.benchmark
def test_all_guards_overhead_cpu():
    result = measure("cpu", rounds=7, warmup=20, steps=150, configs=ALL_CONFIGS + DDP_CONFIGS)
    save(DOCS, "all_overhead_cpu", result, to_markdown(result))
    print({c: [round(v, 2) for v in vs] for c, vs in result["all_ms"].items()})
    assert result["vs_floor_pct"]["all_guards"] <= 5.0
    assert result["vs_bare_pct"]["ddp_all_guards"] <= 10.0
