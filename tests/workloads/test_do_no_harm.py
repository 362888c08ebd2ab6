"""Do no harm, CI size: each guard at its defaults on a clean run ends where the unguarded run ends.

One seed, ``32-true``, the ``ci`` size of every workload (the benchmark ``tests/benchmarks/do_no_harm.py`` runs two
seeds, bigger workloads and ``bf16-mixed`` for the LM). Criteria: final validation loss within 0.5% relative of
the reference run (the unguarded run; for ``all``, the run with ``WarmupCosine`` alone) and no event of severity
``warning`` or ``error``. ``WarmupCosine`` changes the schedule by design: it must act (the LR ends at its floor)
and stay below ``warning``, its loss difference is only reported by the benchmark.
"""

from typing import Any

import pytest

from tests.benchmarks.do_no_harm import SCHEDULE, compare, guards_for, one_thread, reference_of, run

SEED = 0
WORKLOAD_NAMES = ("char_lm", "conv_bn", "mlp")

_CLASS_BALANCE = (
    "no open issue names it yet (see issue 12's closing note): ClassBalance() defaults (method='logit_adjustment', "
    "tau=1) retrain near-balanced digits (512 samples, imbalance "
    "ratio 1.3): final val loss {} vs unguarded (CI noise floor <= 0.2%), no warning event"
)
_ALL = "all guards vs WarmupCosine alone: {}, from ClassBalance (all but ClassBalance: {})"

#: cases where a guard at its defaults measurably changes a clean run (strict: they must really fail)
KNOWN_HARM: dict[tuple[str, str], str] = {
    ("conv_bn", "class_balance"): _CLASS_BALANCE.format("-3.63% (0.2073 vs 0.2151)"),
    ("mlp", "class_balance"): _CLASS_BALANCE.format("-3.64% (0.3813 vs 0.3958)"),
    ("conv_bn", "all"): _ALL.format("-1.26% (0.2861 vs 0.2897)", "+0.03%"),
    ("mlp", "all"): _ALL.format("-1.15% (0.7139 vs 0.7222)", "-0.02%"),
}


def _cases() -> list[Any]:
    cases = []
    for workload in WORKLOAD_NAMES:
        for guard in guards_for(workload):
            reason = KNOWN_HARM.get((workload, guard))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(workload, guard, marks=marks, id=f"{workload}-{guard}"))
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train each (workload, configuration) once per module, on one thread, under pytest's temp folders."""
    done: dict[tuple[str, str], dict[str, Any]] = {}

    def get(workload: str, guard: str) -> dict[str, Any]:
        if (workload, guard) not in done:
            root = tmp_path_factory.mktemp(f"{workload}-{guard}")
            with one_thread():
                done[workload, guard] = run(workload, guard, SEED, "32-true", "ci", root)
        return done[workload, guard]

    return get


@pytest.mark.parametrize(("workload", "guard"), _cases())
def test_guard_at_defaults_does_no_harm(runs, workload, guard):
    guarded = runs(workload, guard)
    reference = runs(workload, reference_of(guard))
    verdict = compare(guarded, reference)
    assert guarded["steps"] == reference["steps"]  # no guard stopped a clean run early
    assert verdict["quiet"], f"warning/error events on a clean run: {guarded['warnings']}"
    if guard == SCHEDULE:
        assert guarded["lr_end"] == 0.0 < reference["lr_end"]  # the schedule acted: cosine down to its floor
        return
    assert verdict["within"], (
        f"final val loss {verdict['val_loss']:.5f} vs {verdict['reference_val_loss']:.5f} "
        f"({verdict['reference']}): {100 * verdict['rel_diff']:+.3f}%, events {guarded['event_counts']}"
    )
