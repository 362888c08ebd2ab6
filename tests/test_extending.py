"""The public guard protocol (docs/extending.md): a guard of a user's own votes in the step's one agreement beside
the built-in guards and reports events, under ddp_spawn with the fault (a slow rank) on one rank."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightning_guard import GradientGuard, event_stream
from tests.helpers import DigitsNet, digits_loaders, read_jsonl, trainer
from tests.test_step_agreement import CountPerStep

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def custom_guard(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))  # ddp_spawn workers inherit sys.path: they import it by name
    import custom_guard

    yield custom_guard
    sys.modules.pop("custom_guard", None)


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_a_guard_of_your_own_votes_in_the_one_agreement_and_reports_the_slow_rank(tmp_path, custom_guard):
    tr, _ = digits_loaders(n_train=640, batch_size=32)
    counter = CountPerStep(str(tmp_path), first=2)
    straggler = custom_guard.StragglerGuard(factor=3.0, min_seconds=0.1)
    slow = custom_guard.SlowRank(rank=1, seconds=0.3, every=5)
    t = trainer(
        tmp_path,
        [counter, GradientGuard(), straggler, slow],
        devices=2,
        strategy="ddp_spawn",
        max_steps=10,
        max_epochs=-1,
    )
    t.fit(DigitsNet(), tr)
    slowed = [s for s in range(10) if s % 5 == 4]  # steps 4 and 9
    events = [e for e in event_stream(t).events if e.guard == "straggler"]
    assert [e.step for e in events] == slowed  # once per slowed step, from rank 0, naming rank 1
    assert all(e.ranks == (1,) and e.severity == "warning" for e in events)
    assert straggler.stragglers == len(slowed)  # the guard's state handed back from the workers
    lines = [d for d in read_jsonl(event_stream(t).jsonl_path) if d["guard"] == "straggler"]
    assert len(lines) == len(slowed)
    import json

    for rank in (0, 1):  # its vote rode in the step's one collective; every rank's time only on the slowed steps
        rows = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [row["collectives"] for row in rows] == [
            ["all_reduce", "all_gather"] if step in slowed else ["all_reduce"] for step in range(2, 10)
        ], rows


def test_the_example_runs_on_one_process_without_events(tmp_path, monkeypatch, custom_guard):
    monkeypatch.chdir(tmp_path)
    result = custom_guard.main(["--fast"])
    assert result["steps"] > 0
    assert result["stragglers"] == 0  # one rank: nobody to be slower than
    assert result["events"] == []
