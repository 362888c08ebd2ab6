"""Pure functions behind the guards (no Lightning imports): schedules, gradient statistics, ..."""

from typing import Any

from lightning_guard.functional.class_balance import balanced_loss, class_weights, log_prior
from lightning_guard.functional.grad import (
    EmaStats,
    clip_grads_,
    collect_grads,
    global_grad_norm,
    top_k_grad_norms,
    zclip_threshold,
)
from lightning_guard.functional.l1 import l1_adaptive_proximal_, l1_norm, l1_proximal_, l1_subgradient_, zero_count
from lightning_guard.functional.oom import (
    batch_size,
    combine_outputs,
    free_memory,
    is_oom_error,
    memory_stats,
    split_batch,
)
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
    "batch_size",
    "class_weights",
    "clip_grads_",
    "collect_grads",
    "combine_outputs",
    "cosine_cycle_bounds",
    "free_memory",
    "generalization_loss",
    "global_grad_norm",
    "is_oom_error",
    "l1_adaptive_proximal_",
    "l1_norm",
    "l1_proximal_",
    "l1_subgradient_",
    "log_prior",
    "memory_stats",
    "progress_quotient",
    "split_batch",
    "top_k_grad_norms",
    "training_progress",
    "up_stops",
    "warmup_cosine",
    "warmup_cosine_phase",
    "zclip_threshold",
    "zero_count",
]

#: names this package exported before compression became its own package (it writes files: not a pure function)
_MOVED = frozenset(
    {
        "CompressionResult",
        "compress_and_export",
        "export_onnx",
        "export_pt2",
        "load_artifact",
        "prune_structured",
        "prune_unstructured",
        "quantize",
    }
)


def __getattr__(name: str) -> Any:
    if name in _MOVED:  # `from lightning_guard.functional import compress_and_export` of 0.1 scripts: say where
        raise ImportError(
            f"lightning_guard.functional.{name} moved: import it as `from lightning_guard.compress import {name}`"
        )
    if name == "compress":
        raise ImportError(
            "lightning_guard.functional.compress moved: it is the package `lightning_guard.compress` now "
            "(`from lightning_guard import compress`)"
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
