"""Pure functions behind the guards (no Lightning imports): schedules, gradient statistics, ..."""

from lightning_guard.functional.class_balance import balanced_loss, class_weights, log_prior
from lightning_guard.functional.grad import (
    EmaStats,
    clip_grads_,
    collect_grads,
    global_grad_norm,
    top_k_grad_norms,
    zclip_threshold,
)
from lightning_guard.functional.l1 import l1_norm, l1_proximal_, l1_subgradient_, zero_count
from lightning_guard.functional.overfit import (
    generalization_loss,
    progress_quotient,
    training_progress,
    up_stops,
)
from lightning_guard.functional.schedule import (
    cosine_cycle_bounds,
    warmup_cosine,
    warmup_cosine_phase,
)

__all__ = [
    "EmaStats",
    "balanced_loss",
    "class_weights",
    "clip_grads_",
    "collect_grads",
    "cosine_cycle_bounds",
    "generalization_loss",
    "global_grad_norm",
    "l1_norm",
    "l1_proximal_",
    "l1_subgradient_",
    "log_prior",
    "progress_quotient",
    "top_k_grad_norms",
    "training_progress",
    "up_stops",
    "warmup_cosine",
    "warmup_cosine_phase",
    "zclip_threshold",
    "zero_count",
]
