"""OverfitGuard's restore of the best weights and its reporting (events, logged metrics)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_guard._sharded import sharded_training
from lightning_guard.callbacks._base import GuardCallback, after_exception_callbacks
from lightning_guard.callbacks._snapshot import Snapshot
from lightning_guard.events import Severity

__all__: list[str] = []


class OverfitGuardBase(GuardCallback):
    """Restore and reporting of :class:`~lightning_guard.OverfitGuard` (not a guard on its own).

    The attributes below are set by :class:`~lightning_guard.OverfitGuard`; this layer only reads them, apart from
    ``_restored``.
    """

    monitor: str
    mode: str
    restore_best: bool
    snapshot: str
    best: float
    best_step: int
    best_epoch: int
    history: list[dict[str, float]]
    _best_weights: Snapshot
    _restored: bool

    # ------------------------------------------------------------------ restore
    def _matching_checkpoint(self, trainer: pl.Trainer) -> Any:
        from lightning.pytorch.callbacks import ModelCheckpoint

        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.monitor == self.monitor and cb.mode == self.mode:
                return cb
        return None

    @override
    def setup_problems(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        problems = super().setup_problems(trainer, pl_module)
        if self.snapshot == "checkpoint" and self.restore_best and sharded_training(trainer):
            problems.append(
                f"OverfitGuard(snapshot='checkpoint') cannot reload a sharded checkpoint under "
                f"{type(trainer.strategy).__name__}; use snapshot='memory' (each rank keeps its own shards)"
            )
            return problems
        if self.snapshot == "checkpoint" and self.restore_best and self._matching_checkpoint(trainer) is None:
            problems.append(
                f"OverfitGuard(snapshot='checkpoint') needs a ModelCheckpoint with monitor={self.monitor!r} and "
                f"mode={self.mode!r} to restore from; add one or use snapshot='memory'"
            )
        return problems

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._best_weights.wait()  # an asynchronous (CUDA) copy of the best weights completes before they change

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore(trainer, pl_module, "train end")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # An interrupted or failed run (KeyboardInterrupt, an exception from any callback) still hands back the best
        # weights - after the crash checkpoint was written (OnExceptionCheckpoint: it holds the run as it was at the
        # crash, so a resume from it is one point of the run), and before the owner closes the event log.
        after_exception_callbacks(trainer, lambda: self._restore(trainer, pl_module, f"{type(exception).__name__}"))
        super().on_exception(trainer, pl_module, exception)

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        if not self.restore_best or self.best_step < 0 or self._restored:
            return
        data: dict[str, Any] = {"best": self.best, "best_step": self.best_step, "best_epoch": self.best_epoch}
        final, final_note = self._final_validation(trainer)
        if final is not None:
            data.update(final=final, final_step=int(trainer.global_step))
            if not self._worse(final, self.best):  # compared before restoring: the final weights are as good
                self._restored = True
                self._event(
                    trainer,
                    "kept_final",
                    "info",
                    f"kept the final weights at {when}: {self.monitor}={final:.6g} at step {trainer.global_step} is "
                    f"not worse than the best recorded {self.best:.6g} (step {self.best_step}); nothing restored",
                    data,
                )
                return
        if self.snapshot == "memory":
            if not self._best_weights.taken:  # resumed under sharded training: the checkpoint held no best weights
                self._restored = True
                self._event(
                    trainer,
                    "restore_unavailable",
                    "warning",
                    f"could not restore the best weights at {when} ({self.monitor}={self.best:.6g} at step "
                    f"{self.best_step}): they were taken before the resume and, under sharded training, are not "
                    f"kept in checkpoints; {final_note}. Reload the best checkpoint of a ModelCheckpoint(monitor="
                    f"{self.monitor!r}) to get them",
                    data,
                )
                return
            self._best_weights.restore(pl_module, [], None)
            data["source"] = "memory"
            message = (
                f"restored the best weights at {when}: {self.monitor}={self.best:.6g} from step {self.best_step} "
                f"(epoch {self.best_epoch}); {final_note}"
            )
        else:
            ckpt = self._matching_checkpoint(trainer)
            path = getattr(ckpt, "best_model_path", "")
            if not path:
                return
            checkpoint = trainer.strategy.load_checkpoint(path)
            pl_module.load_state_dict(checkpoint["state_dict"])
            # ModelCheckpoint's best can be another step than this guard's (its own improvement rule, its
            # save cadence): report the step and score actually restored.
            score = getattr(ckpt, "best_model_score", None)
            restored_score = float(score) if score is not None else math.nan
            restored_step = int(checkpoint.get("global_step", -1))
            restored_epoch = int(checkpoint.get("epoch", -1))
            data.update(
                source=path, restored_step=restored_step, restored_epoch=restored_epoch, restored=restored_score
            )
            message = (
                f"restored {path} at {when}: {self.monitor}={restored_score:.6g} from step {restored_step} "
                f"(epoch {restored_epoch})"
            )
            if restored_step != self.best_step:
                message += (
                    f"; OverfitGuard's best was step {self.best_step} ({self.monitor}={self.best:.6g}), which "
                    "ModelCheckpoint did not keep"
                )
        self._restored = True
        self._event(trainer, "restore_best", "info", message, data)

    def _worse(self, value: float, than: float) -> bool:
        """``value`` is worse than ``than`` in this guard's direction (no ``min_delta``: any worsening counts)."""
        if not math.isfinite(value):
            return True
        return value > than if self.mode == "min" else value < than

    def _final_validation(self, trainer: pl.Trainer) -> tuple[float | None, str]:
        """The monitored value of the weights training ends with, when they were validated as they are; and a note."""
        if not self.history:
            return None, "the final weights were never validated"
        last = self.history[-1]
        behind = int(trainer.global_step) - int(last["step"])
        if behind:
            return None, f"the final weights ({behind} steps after the last validation) were not validated"
        return float(last["val"]), f"the final weights had {self.monitor}={last['val']:.6g}"

    # ------------------------------------------------------------------ reporting
    def _event(
        self,
        trainer: pl.Trainer,
        kind: str,
        severity: Severity,
        message: str,
        data: dict[str, Any],
        *,
        ranks: tuple[int, ...] = (),
        **extra: Any,
    ) -> None:
        if trainer.global_rank != 0:
            return  # decided from agreed numbers: reported once, by rank 0
        self.emit(trainer, kind, message, severity=severity, data={**data, **extra}, ranks=ranks or (0,))

    def _log(self, trainer: pl.Trainer, gap: float, gl: float, pq: float) -> None:
        metrics = {
            k: v
            for k, v in (("guard/overfit/gap", gap), ("guard/overfit/gl", gl), ("guard/overfit/pq", pq))
            if math.isfinite(v)  # undefined until there is a gap, a strip, a best
        }
        GuardCallback.log_metrics(self, trainer, metrics)
