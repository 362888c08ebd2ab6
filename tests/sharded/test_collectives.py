"""Issue 26: the guards' communication per optimizer step, counted in scripts launched as users launch them.

Every ``torch.distributed`` collective issued from the start of a training batch to the start of the next is
counted on rank 0 (``tests.sharded.collectives``), with its origin: Lightning's own (its per-batch SIGTERM
broadcast) and the user's are left out. On the common path (no fault) every step-path guard together issues one
collective per optimizer step, an all-reduce whose size does not depend on the number of ranks: the same bytes at 2
and at 4 processes. With OOMGuard each batch of 16 runs as 4 micro-batches: still one (the micro-batches before the
last need no agreement of their own; at 2 processes with micro-batches also in ``tests/test_step_agreement.py``).
On main (measured with this script) the step agreement was an all-gather of a row per rank and OOMGuard added one
agreement per micro-batch: 5 all-gathers per step with OOMGuard, each rank receiving 880 bytes per step at 2
processes and 1,760 at 4; without OOMGuard one all-gather, 40 and 80 bytes.
"""

from __future__ import annotations

import pytest

from tests.sharded.launch import launch

GUARDS = "wc,gg,l1,of,cb,clean"


def _collectives(tmp_path, guards: str, devices: int, *extra: str) -> dict:
    result = launch(
        "ddp", tmp_path, "--guards", guards, "--devices", str(devices), "--epochs", "1", "--count-collectives", *extra
    )
    assert result["world_size"] == devices
    return result["collectives"]


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_one_fixed_size_collective_per_step_at_two_and_four_processes(tmp_path):
    """At 4 processes: 1 collective per step. At 2, with ``accumulate_grad_batches=2`` as well: the window's first
    batch (under no_sync) ends its training step and its backward with an agreement each, its micro-batches before the
    last need none, the second batch holds the step's: 3 per optimizer step (main: 9 all-gathers). Every one the same
    120 bytes (15 float64) at both sizes."""
    two = _collectives(tmp_path / "two", f"{GUARDS},oomm", 2, "--accumulate", "2")
    four = _collectives(tmp_path / "four", f"{GUARDS},oomm", 4)
    assert two["steps"] >= 2
    assert four["steps"] >= 2
    assert four["per_step"] == 1.0, four  # OOMGuard's fence holds the step's agreement, on its gloo group
    assert two["per_step"] == 3.0, two
    for counted in (two, four):
        assert set(counted["origins"]) == {"lightning", "lightning_guard._fence:_post"}, counted
        assert counted["sent_per_step"] == counted["received_per_step"] == 120.0 * counted["per_step"]


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_without_oom_guard_the_agreement_is_one_all_reduce_on_the_default_group(tmp_path):
    counted = _collectives(tmp_path, GUARDS, 2)
    assert counted["per_step"] == 1.0, counted
    assert counted["counts"].get("barrier", 0) == 0  # Lightning's strategy.reduce adds one: not used
    assert set(counted["origins"]) == {"lightning", "lightning_guard.distributed:_all_reduce"}, counted
    assert counted["sent_per_step"] == 20.0  # GradientGuard's 4 numbers and the pending-event count, float32
