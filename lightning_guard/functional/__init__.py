"""Pure functions behind the guards (no Lightning imports): schedules, gradient statistics, ..."""

from lightning_guard.functional.schedule import (
    cosine_cycle_bounds,
    warmup_cosine,
    warmup_cosine_phase,
)

__all__ = ["cosine_cycle_bounds", "warmup_cosine", "warmup_cosine_phase"]
