"""Pure functions behind the guards (no Lightning imports): schedules, gradient statistics, ..."""

from lightning_guard.functional.class_balance import balanced_loss, class_weights, log_prior
from lightning_guard.functional.compress import (
    CompressionResult,
    compress_and_export,
    export_onnx,
    export_pt2,
    load_artifact,
    prune_structured,
    prune_unstructured,
    quantize,
)
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
    "CompressionResult",
    "EmaStats",
    "balanced_loss",
    "batch_size",
    "class_weights",
    "clip_grads_",
    "collect_grads",
    "combine_outputs",
    "compress_and_export",
    "cosine_cycle_bounds",
    "export_onnx",
    "export_pt2",
    "free_memory",
    "generalization_loss",
    "global_grad_norm",
    "is_oom_error",
    "l1_adaptive_proximal_",
    "l1_norm",
    "l1_proximal_",
    "l1_subgradient_",
    "load_artifact",
    "log_prior",
    "memory_stats",
    "progress_quotient",
    "prune_structured",
    "prune_unstructured",
    "quantize",
    "split_batch",
    "top_k_grad_norms",
    "training_progress",
    "up_stops",
    "warmup_cosine",
    "warmup_cosine_phase",
    "zclip_threshold",
    "zero_count",
]
