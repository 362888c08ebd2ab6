"""Prechelt's early-stopping criteria (Prechelt, "Early Stopping - But When?", 1998) as pure functions.

All take a *lower-is-better*, positive metric (a loss or an error rate): ``E_va`` the validation value, ``E_opt`` the
best validation value so far, ``E_tr`` training values over a *strip* of the last ``k`` evaluations.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

__all__ = ["generalization_loss", "progress_quotient", "training_progress", "up_stops"]


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
