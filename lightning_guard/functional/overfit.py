"""Prechelt's early-stopping criteria (Prechelt, "Early Stopping - But When?", 1998) as pure functions.

All take a *lower-is-better*, positive metric (a loss or an error rate): ``E_va`` the validation value, ``E_opt`` the
best validation value so far, ``E_tr`` training values over a *strip* of the last ``k`` evaluations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

__all__ = [
    "divergence",
    "generalization_loss",
    "overfitting",
    "progress_quotient",
    "shift_suspected",
    "stop_reason",
    "training_progress",
    "underfitting",
    "up_stops",
]


def generalization_loss(val: float, best_val: float) -> float:
    """GL(t) = 100 * (E_va(t) / E_opt(t) - 1): how much worse than the best, in percent.

    Example:
        >>> generalization_loss(0.55, 0.5)
        10.000000000000009
    """
    if not math.isfinite(val) or best_val <= 0 or not math.isfinite(best_val):
        return math.inf
    return 100.0 * (val / best_val - 1.0)


def training_progress(strip: Sequence[float]) -> float:
    """P_k(t) = 1000 * (mean(strip) / min(strip) - 1): how much training still moves, in per mille.

    Large while the training metric still falls fast within the strip; near 0 once it has stalled.

    Example:
        >>> round(training_progress([1.2, 1.1, 1.0]), 6)
        100.0
    """
    values = [v for v in strip if math.isfinite(v)]
    if not values or min(values) <= 0:
        return math.nan
    return 1000.0 * (sum(values) / (len(values) * min(values)) - 1.0)


def progress_quotient(gl: float, progress: float) -> float:
    """PQ(t) = GL(t) / P_k(t): generalization loss per unit of training progress.

    Example:
        >>> progress_quotient(10.0, 20.0)
        0.5
    """
    if not math.isfinite(gl) or math.isnan(progress):
        return math.inf
    if progress <= 0:
        return math.inf if gl > 0 else 0.0
    return gl / progress


def up_stops(strip_end_values: Sequence[float], s: int) -> bool:
    """UP_s: True when the validation value at the end of each of the last ``s`` strips rose over the strip before.

    Example:
        >>> up_stops([0.5, 0.4, 0.45, 0.5], 2)
        True
        >>> up_stops([0.5, 0.4, 0.45, 0.44], 2)
        False
    """
    if len(strip_end_values) < s + 1:
        return False
    last = strip_end_values[-(s + 1) :]
    return all(b > a for a, b in itertools.pairwise(last))


# ------------------------------------------------------------------------------------------ OverfitGuard's diagnosis
# Pure functions of the numbers OverfitGuard records per validation; the guard acts on what they say.


def divergence(val: float, best: float, *, mode: str, factor: float | None, nonfinite: bool) -> str | None:
    """Why the run diverged (stop at once), or None.

    Non-finite on some rank, or (for a lower-is-better metric) the value above ``factor`` times a positive best. A
    non-finite value that no rank flagged diverges only by the factor (an ``inf``).

    Example:
        >>> divergence(5.0, 1.0, mode="min", factor=3.0, nonfinite=False)
        '5 > 3.0x best'
        >>> divergence(2.0, 1.0, mode="min", factor=3.0, nonfinite=False) is None
        True
    """
    if nonfinite:
        return "non-finite"
    if mode == "min" and factor is not None and math.isfinite(best) and best > 0 and val > factor * best:
        return f"{val:.4g} > {factor}x best" if math.isfinite(val) else "non-finite"
    return None


def shift_suspected(
    *,
    evaluations: int,
    max_evaluations: int,
    ratio: float | None,
    mode: str,
    best_is_first: bool,
    first_train: float,
    val: float,
    train: float,
) -> bool:
    """A distribution shift between training and validation data, suspected early in the run.

    From the first evaluations validation never improved while training did, and validation ends up ``ratio`` times
    worse than training (ordinary overfitting improves validation first, then loses it).
    """
    return (
        ratio is not None
        and 2 <= evaluations <= max_evaluations
        and mode == "min"
        and best_is_first
        and math.isfinite(train)
        and 0 < train < first_train
        and val > ratio * train
    )


def overfitting(
    *,
    improved: bool,
    learned: bool,
    train_improved: bool,
    train: float,
    gap: float,
    best_gap: float,
    worse_than_best: bool,
) -> bool:
    """Training improves while validation is worse than its best and the gap grows (a model that learned something).

    ``learned``: a real gap, or real training progress (a model at chance level is not overfitting);
    ``train_improved``: the training value is better than at the best validation; ``best_gap``: the gap then.
    """
    return (
        not improved
        and learned
        and math.isfinite(train)
        and train_improved
        and (math.isnan(gap) or gap > best_gap)
        and worse_than_best
    )


def underfitting(
    *, progress: float, strip_first_val: float | None, val: float, train: float, gap: float
) -> tuple[bool, float]:
    """``(underfitting, val_moved)``: training stalled and validation barely moved, with no real gap.

    Stalled: progress under 1 per mille; barely moved: under 1% over the strip (``strip_first_val``: its first value,
    None before a whole strip); no real gap: under a tenth of the training value.
    """
    moved = (
        abs(strip_first_val - val) / abs(strip_first_val)
        if strip_first_val is not None and math.isfinite(strip_first_val) and strip_first_val != 0
        else math.inf
    )
    stalled = (
        math.isfinite(progress)
        and progress < 1.0
        and moved < 0.01
        and math.isfinite(train)
        and train > 0
        and abs(gap) < 0.1 * abs(train)
    )
    return stalled, moved


def stop_reason(
    criterion: str,
    *,
    evaluations: int,
    wait: int,
    patience: int,
    gl: float,
    gl_alpha: float,
    pq: float,
    pq_alpha: float,
    strip_length: int,
    strip_ends: Sequence[float],
    up_strips: int,
) -> str | None:
    """The stopping criterion's verdict: its name when it says stop, else None.

    ``patience`` (no improvement for ``patience`` evaluations), ``gl`` (GL above ``gl_alpha``), ``pq`` (PQ above
    ``pq_alpha``, at strip ends only, as Prechelt), ``up`` (validation rose over ``up_strips`` strips in a row).

    Example:
        >>> stop_reason("patience", evaluations=5, wait=3, patience=3, gl=0.0, gl_alpha=5.0, pq=0.0, pq_alpha=0.5,
        ...             strip_length=5, strip_ends=[], up_strips=3)
        'patience'
    """
    at_strip_end = evaluations % strip_length == 0
    if criterion == "patience":
        return "patience" if wait >= patience else None
    if criterion == "gl":
        return "gl" if gl > gl_alpha else None
    if criterion == "pq":  # P_k = 0 with GL > 0 makes PQ infinite: no progress, stop
        return "pq" if at_strip_end and not math.isnan(pq) and pq > pq_alpha else None
    if criterion == "up":
        return "up" if at_strip_end and up_stops(strip_ends, up_strips) else None
    return None
