"""The contract matrix in CI: each cell works and equals its reference, or is refused at set-up."""

from __future__ import annotations

import pytest

from lightning_guard import GuardConfigError, event_stream
from tests.contract.matrix import (
    COLUMNS,
    KNOWN,
    LAUNCHED,
    MULTI_RANK,
    REFUSED,
    ROWS,
    cells,
    check_equal,
    no_optimizer_step,
    run_guarded,
    run_reference,
    warning_events,
)

pytest.importorskip("torchao")


def _params() -> list:
    out = []
    for row, col in cells():
        marks = [pytest.mark.xfail(strict=True, reason=KNOWN[(row, col)])] if (row, col) in KNOWN else []
        if COLUMNS[col].procedure in MULTI_RANK:
            marks.append(pytest.mark.ddp)
        out.append(pytest.param(row, col, marks=marks, id=f"{row}-{col}"))
    return out


@pytest.mark.parametrize(("row", "col"), _params())
def test_cell(tmp_path, row, col):
    r, c = ROWS[row], COLUMNS[col]
    if (row, col) in REFUSED:
        with no_optimizer_step() as steps, pytest.raises(GuardConfigError, match=REFUSED[(row, col)]):
            run_guarded(r, c, tmp_path / "guarded")
        assert steps == [], "refused only after training had started"
        return
    guarded = run_guarded(r, c, tmp_path / "guarded")
    reference = run_reference(r, c, tmp_path / "reference")
    check_equal(guarded, reference, c)
    if c.procedure == "ddp":  # the launching process holds the run's events, handed back by rank 0
        assert [e.kind for e in event_stream(guarded.trainer).events if e.guard == "class_balance"] == [
            "class_counts",
            "class_weights",
        ]
    if c.procedure in LAUNCHED:  # rank 0's events of a run launched as users launch it; a clean run warns of nothing
        events = guarded.extra["events"]
        assert [k for g, k, _, _ in events if g == "class_balance"] == ["class_counts", "class_weights"]
        assert [e for e in events if e[3] != "info"] == [], "a clean run made warning-level guard events"
    if c.procedure in ("fit", "after_fit"):  # resume and reuse compare two guarded runs: harm is judged elsewhere
        assert warning_events(guarded.trainer) == [], "a clean run made warning-level guard events"
