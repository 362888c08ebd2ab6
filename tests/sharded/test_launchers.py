"""The launchers users run multi-process training with, on 2 CPU processes (gloo), every step-path guard and
OOMGuard, faults on rank 1 only (NaN loss, NaN gradients, out of memory in forward and in backward): ``torchrun``
and two ``torchrun --nnodes 2`` launches on 127.0.0.1 end exactly where the run started with ``python -m`` under
``strategy="ddp"`` ends (Lightning's own re-launch, the reference). None hangs (each launch is bounded by a
timeout); the events reach rank 0's record."""

from __future__ import annotations

import pytest

from tests.sharded.conftest import LAUNCHER_GUARDS
from tests.sharded.launch import close, torchrun


def _same_run(got: dict, ref: dict) -> None:
    assert got["world_size"] == 2
    assert [(e["guard"], e["kind"], e["step"]) for e in got["events"]] == [
        (e["guard"], e["kind"], e["step"]) for e in ref["events"]
    ]
    kinds = {(e["guard"], e["kind"]) for e in got["events"]}
    assert ("gradient_guard", "rollback") in kinds  # rank 1's NaN gradients
    retries = [e["step"] for e in got["events"] if e["kind"] == "oom_retry"]
    assert retries == [5, 12], retries  # rank 1's out-of-memory in forward, then in backward, both recovered
    assert got["global_step"] == ref["global_step"]
    assert not close(got["params"], ref["params"], 1e-6)


@pytest.mark.ddp
def test_torchrun_equals_the_script_launch(tmp_path, ddp_oom_reference):
    _same_run(torchrun(tmp_path / "torchrun", *LAUNCHER_GUARDS), ddp_oom_reference)


@pytest.mark.ddp
def test_two_torchrun_nodes_equal_the_script_launch(tmp_path, ddp_oom_reference):
    _same_run(torchrun(tmp_path / "nodes", *LAUNCHER_GUARDS, nodes=2), ddp_oom_reference)
