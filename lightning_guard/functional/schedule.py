"""Warmup + cosine learning-rate schedule as a pure function of the applied-step count."""

from __future__ import annotations

import math
from typing import Literal

__all__ = [
    "cosine_cycle_bounds",
    "validate_schedule_args",
    "validate_warmup",
    "warmup_cosine",
    "warmup_cosine_phase",
]

Phase = Literal["warmup", "decay", "floor"]


def validate_schedule_args(
    *,
    start_factor: float,
    min_lr_ratio: float,
    cycles: int,
    cycle_mult: float,
    peak_decay: float,
    error: type[Exception] = ValueError,
) -> None:
    """Check the shape arguments shared by the function, the callback and the LRScheduler."""
    if isinstance(start_factor, bool) or not isinstance(start_factor, int | float) or not 0 < start_factor <= 1:
        raise error(f"`start_factor` must be in (0, 1], got {start_factor!r}")
    if isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, int | float) or not 0 <= min_lr_ratio <= 1:
        raise error(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio!r}")
    if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
        raise error(f"`cycles` must be an int >= 1, got {cycles!r}")
    if isinstance(cycle_mult, bool) or not isinstance(cycle_mult, int | float) or cycle_mult <= 0:
        raise error(f"`cycle_mult` must be a number > 0, got {cycle_mult!r}")
    if isinstance(peak_decay, bool) or not isinstance(peak_decay, int | float) or not 0 < peak_decay <= 1:
        raise error(f"`peak_decay` must be in (0, 1], got {peak_decay!r}")


def validate_warmup(warmup: object, error: type[Exception] = ValueError) -> None:
    """Check a warmup length: an ``int`` number of steps >= 0, or a ``float`` fraction in ``[0, 1)``."""
    if isinstance(warmup, bool) or not isinstance(warmup, int | float):
        raise error(f"`warmup` must be an int (steps) or a float in [0, 1) (fraction), got {warmup!r}")
    if isinstance(warmup, float) and not 0.0 <= warmup < 1.0:
        raise error(f"`warmup` as a fraction must be in [0, 1), got {warmup!r}")
    if isinstance(warmup, int) and warmup < 0:
        raise error(f"`warmup` as a number of steps must be >= 0, got {warmup!r}")


def cosine_cycle_bounds(decay_steps: int, cycles: int, cycle_mult: float) -> list[tuple[int, int]]:
    """Split ``decay_steps`` into ``cycles`` cosine cycles whose lengths grow by ``cycle_mult``.

    Returns ``(start, length)`` pairs relative to the end of warmup; lengths sum to ``decay_steps`` exactly.

    Example:
        >>> cosine_cycle_bounds(70, 3, 2.0)
        [(0, 10), (10, 20), (30, 40)]
    """
    weights = [cycle_mult**i for i in range(cycles)]
    total = sum(weights)
    ends = [round(decay_steps * sum(weights[: i + 1]) / total) for i in range(cycles)]
    bounds, start = [], 0
    for end in ends:
        bounds.append((start, max(end - start, 0)))
        start = end
    return bounds


def _check_counts(step: int, total_steps: int, warmup_steps: int) -> None:
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}")
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"`warmup_steps` must be in [0, total_steps={total_steps}], got {warmup_steps}")


def warmup_cosine(
    step: int,
    total_steps: int,
    warmup_steps: int,
    *,
    start_factor: float = 0.01,
    min_lr_ratio: float = 0.0,
    cycles: int = 1,
    cycle_mult: float = 1.0,
    peak_decay: float = 1.0,
) -> float:
    """LR multiplier for the optimizer step that follows ``step`` applied steps.

    Linear warmup from ``start_factor`` to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` over the
    remaining steps, split into ``cycles`` warm restarts (lengths growing by ``cycle_mult``, peaks scaled by
    ``peak_decay`` per cycle); from ``total_steps`` on the multiplier stays at ``min_lr_ratio``. The first step runs at
    ``start_factor`` (never 0), the peak is reached exactly at the end of warmup, and the value after the last step
    is exactly ``min_lr_ratio``.

    Args:
        step: applied optimizer steps so far (0 for the first step).
        total_steps: length of the schedule in optimizer steps.
        warmup_steps: length of the linear warmup.
        start_factor: multiplier of the first warmup step, in (0, 1].
        min_lr_ratio: floor of the multiplier, in [0, 1].
        cycles: number of cosine cycles after warmup (1 = plain cosine).
        cycle_mult: length ratio of consecutive cycles.
        peak_decay: peak ratio of consecutive cycles.

    Example:
        >>> [round(warmup_cosine(s, 10, 2), 3) for s in range(11)]
        [0.01, 0.505, 1.0, 0.962, 0.854, 0.691, 0.5, 0.309, 0.146, 0.038, 0.0]
    """
    _check_counts(step, total_steps, warmup_steps)
    validate_schedule_args(
        start_factor=start_factor,
        min_lr_ratio=min_lr_ratio,
        cycles=cycles,
        cycle_mult=cycle_mult,
        peak_decay=peak_decay,
    )
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    if step >= total_steps:
        return float(min_lr_ratio)
    t = step - warmup_steps
    for i, (start, length) in enumerate(cosine_cycle_bounds(total_steps - warmup_steps, cycles, cycle_mult)):
        if length > 0 and start <= t < start + length:
            peak = peak_decay**i
            progress = (t - start) / length
            return min_lr_ratio + (peak - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return float(min_lr_ratio)


def warmup_cosine_phase(step: int, total_steps: int, warmup_steps: int) -> Phase:
    """Which phase the step after ``step`` applied steps is in: ``"warmup"``, ``"decay"`` or ``"floor"``.

    Example:
        >>> [warmup_cosine_phase(s, 4, 1) for s in range(5)]
        ['warmup', 'decay', 'decay', 'decay', 'floor']
    """
    _check_counts(step, total_steps, warmup_steps)
    if step < warmup_steps:
        return "warmup"
    if step >= total_steps:
        return "floor"
    return "decay"
