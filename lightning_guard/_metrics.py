"""The one writer of numbers to the loggers.

Every number lightning_guard reports reaches the loggers through one of two routes, both behind
:meth:`~lightning_guard.GuardCallback.log_metrics`:

* **direct** (:func:`write_metrics`, the default): rank 0 writes the numbers to every logger of the trainer at the
  global step: the exact step, none of ``self.log``'s bookkeeping, no host sync, not seen by other callbacks. The
  guards' per-step numbers (``guard/grad_norm``, ``guard/l1/*``, ``guard/overfit/*``) and the event counters
  (``guard/events/*``) take it.
* **monitorable**: through ``pl_module.log_dict``, so that the numbers reach ``trainer.callback_metrics`` (a
  ``ModelCheckpoint`` or ``EarlyStopping`` can monitor them, the progress bar can show them), at Lightning's logging
  step and cadence. ``guard/lr`` (WarmupCosine), ``guard/oom/micro_batch_size`` (OOMGuard) and
  ``guard/class_balance/*`` (ClassBalance) take it.

No other module of the package calls a logger's ``log_metrics`` or a module's ``log``/``log_dict``
(``tests/structure/test_metrics_path.py`` reads the code).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["due", "write_metrics"]


def due(step: int, every: int) -> bool:
    """Whether a number logged every ``every`` steps is logged at ``step`` (steps 0, every, 2 * every, ...).

    >>> [s for s in range(7) if due(s, 3)]
    [0, 3, 6]
    """
    return every > 0 and step % every == 0


def write_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], *, step: int | None = None) -> dict[str, float]:
    """Write ``metrics`` to every logger of ``trainer`` from rank 0, at ``step`` (default: the global step).

    Values are written as floats, non-finite ones included (a NaN gradient norm is news); a caller leaves out what
    is undefined. Returns what was written: empty on another rank, with no logger or nothing to write.
    """
    if trainer.global_rank != 0 or not trainer.loggers or not metrics:
        return {}
    values = {k: float(v) for k, v in metrics.items()}
    at = int(trainer.global_step) if step is None else int(step)
    for logger in trainer.loggers:
        logger.log_metrics(values, step=at)
    return values
