"""The shared base of every lightning_guard callback.

The first guard in ``trainer.callbacks`` owns the per-trainer runtime for the fit: it creates it at setup, fixes the
event log's directory identically on every rank, hooks the optimizers at train start, resolves each step's outcome,
exchanges events across ranks at epoch end and fit end, prints the summary, stores the runtime in checkpoints and
restores it. The other guards only use it. Subclasses call ``super()`` in every hook they override.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_guard._runtime import CHECKPOINT_KEY, GuardRuntime, get_runtime, reset_runtime
from lightning_guard.events import GuardEvent, Severity, _resolve_log_dir, emit

__all__ = ["GuardCallback"]


class GuardCallback(Callback):
    """Base class of the guards: runtime ownership and the event-stream plumbing."""

    #: short name used in events and metric names (``guard/<name>/<kind>``)
    guard_name: str = "guard"

    def __init__(self) -> None:
        super().__init__()
        self._trainer: pl.Trainer | None = None  # the trainer being fitted, for runtime listeners (None outside fit)

    def _is_owner(self, trainer: pl.Trainer) -> bool:
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, GuardCallback):
                return cb is self
        return False

    def runtime(self, trainer: pl.Trainer) -> GuardRuntime:
        """The trainer's guard runtime."""
        return get_runtime(trainer)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._is_owner(trainer):
            return
        runtime = reset_runtime(trainer) if stage == "fit" else get_runtime(trainer)
        log_dir = str(_resolve_log_dir(trainer)) if trainer.global_rank == 0 else None
        if trainer.world_size > 1:
            log_dir = trainer.strategy.broadcast(log_dir, src=0)
        if log_dir is not None:
            runtime.events.set_log_dir(log_dir)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        if self._is_owner(trainer):
            self.runtime(trainer).attach(list(trainer.optimizers))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._is_owner(trainer):
            self.runtime(trainer).before_optimizer_step(optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._is_owner(trainer):
            self.runtime(trainer).after_batch()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._is_owner(trainer):
            self._sync_events(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._is_owner(trainer):
            self._sync_events(trainer, force_table=True)
            self.runtime(trainer).events.print_summary()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._is_owner(trainer):
            stream = self.runtime(trainer).events
            stream.dump_outbox()
            stream.close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None
        if self._is_owner(trainer):
            runtime = self.runtime(trainer)
            runtime.detach()
            runtime.events.close()

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._is_owner(trainer):
            checkpoint[CHECKPOINT_KEY] = self.runtime(trainer).state_dict()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._is_owner(trainer) and CHECKPOINT_KEY in checkpoint:
            self.runtime(trainer).load_state_dict(checkpoint[CHECKPOINT_KEY])

    def _emit(
        self,
        trainer: pl.Trainer,
        kind: str,
        message: str,
        *,
        severity: Severity = "info",
        data: dict[str, Any] | None = None,
        ranks: tuple[int, ...] = (),
        rank_zero_only: bool = False,
    ) -> None:
        """Report an event of this guard (only from rank 0 with ``rank_zero_only``, for decisions all ranks share)."""
        if rank_zero_only and trainer.global_rank != 0:
            return
        event = GuardEvent.at(
            trainer, self.guard_name, kind, severity=severity, message=message, data=data or {}, ranks=ranks
        )
        emit(trainer, event)

    def _reported(self, trainer: pl.Trainer, kind: str) -> bool:
        """Whether this run's event log already holds a ``kind`` event of this guard.

        A resumed run restores the log from the checkpoint, so once-per-run announcements are not repeated.
        """
        return any(e.guard == self.guard_name and e.kind == kind for e in self.runtime(trainer).events.events)

    def _on_batch_retry(self, trainer: pl.Trainer) -> None:
        """The current batch is about to be run again (OOMGuard): forget what this attempt recorded."""

    def _sync_events(self, trainer: pl.Trainer, *, force_table: bool = False) -> None:
        stream = self.runtime(trainer).events
        if trainer.world_size > 1:
            stream.exchange()
        stream.refresh_table(force=force_table)
