"""What the guards say about a sharded model before training (FSDP2 under ModelParallelStrategy)."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_guard._sharded import unsynchronised_parameters
from lightning_guard.callbacks._base import GuardCallback


def warn_unsynchronised(guard: GuardCallback, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str) -> None:
    """A warning event when trainable parameters lie outside ``fully_shard`` under ModelParallelStrategy.

    Lightning does not synchronise them: each rank trains its own copy. ``what`` says which statistic of ``guard``
    treats the copies as one (their mean). Called from ``on_train_start``, after ``GuardCallback`` resharded.
    """
    names = unsynchronised_parameters(pl_module, trainer)
    if not names:
        return
    guard.emit(
        trainer,
        "unsynchronised_parameters",
        f"{len(names)} trainable parameters are outside fully_shard under ModelParallelStrategy ({', '.join(names[:5])}"
        f"{', ...' if len(names) > 5 else ''}): Lightning does not synchronise their gradients, so each rank trains "
        f"its own copy unless your code synchronises them (torch's replicate); {what} counts the mean of the copies. "
        "Apply fully_shard to the modules that own them (or to the LightningModule itself)",
        severity="warning",
        data={"parameters": names},
        rank_zero_only=True,
    )
