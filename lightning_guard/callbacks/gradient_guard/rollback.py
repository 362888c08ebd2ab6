"""GradientGuard's rollback (validated snapshots, restore, give up) and its LR backoff."""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import torch

from lightning_guard._runtime import StepOutcome, _lr_copy, set_group_lrs
from lightning_guard.callbacks._snapshot import Snapshot
from lightning_guard.callbacks.gradient_guard.base import GradientGuardBase, _drop_grads
from lightning_guard.errors import GradientExplosionError
from lightning_guard.functional.grad import top_k_grad_norms
from lightning_guard.functional.gradient_policy import LrBackoff, StepFacts

__all__: list[str] = []


class GradientGuardRollback(GradientGuardBase):
    """Snapshots, rollback and LR backoff of :class:`~lightning_guard.GradientGuard` (not a guard on its own)."""

    def _promote_candidate(self, idx: int, facts: StepFacts) -> None:
        """A rollback candidate taken before this step becomes the snapshot if the step was healthy (judged once)."""
        if not (self._candidate.taken and idx == 0):
            return
        if facts.healthy:
            spike, _, loss_spike, _ = self._judge(0, facts.norm, facts.loss_mean)
            if not spike and not loss_spike:
                self._snapshot, self._candidate = self._candidate, self._snapshot  # promote; reuse the old buffers
        self._candidate.step = -1

    def _maybe_rollback(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        idx: int,
        *,
        reason: str,
        z: float,
    ) -> None:
        if self.rollback_after is not None and self._bad[idx] >= self.rollback_after:
            self._rollback_or_give_up(trainer, pl_module, optimizer, idx, reason=f"{self._bad[idx]} bad steps")

    def _rollback_or_give_up(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: torch.optim.Optimizer,
        idx: int,
        *,
        reason: str,
    ) -> None:
        if self._rollbacks >= self.max_rollbacks or not self._snapshot.taken:
            layers = top_k_grad_norms(pl_module.named_parameters(), max(self.diagnose_top_k, 1))
            history = [round(h, 6) if math.isfinite(h) else h for h in self._history]
            detail = (
                f"GradientGuard gave up at step {trainer.global_step} ({reason}) after {self._rollbacks} rollback(s) "
                f"(max_rollbacks={self.max_rollbacks}). Recent gradient norms: {history}. "
                f"Largest gradient norms by layer: {layers}"
            )
            self._event(
                trainer,
                "gave_up",
                "error",
                detail,
                self.last_norm,
                diagnose=False,
                rollbacks=self._rollbacks,
                history=[float(h) for h in history],
                layers=[f"{n}={v:.4g}" for n, v in layers],
            )
            stream = self.runtime(trainer).events
            stream.close()
            raise GradientExplosionError(detail)
        runtime = self.runtime(trainer)
        from_step = int(trainer.global_step)
        snap = self._snapshot
        snap.restore(pl_module, list(trainer.optimizers), self._scaler(trainer))
        self._step_buffers.drop()  # the snapshot's buffers stand: the skip of this step must not overwrite them
        runtime.set_applied_steps(snap.applied_steps)
        for i in range(len(trainer.optimizers)):
            runtime.forget_step_lrs(i)
        # The guard's statistics of the snapshot's time: the restored model is judged against its own past.
        self._stats = [self._stats_from(s) for s in snap.extra.get("stats", [])] or self._stats
        self._loss_stats = [self._stats_from(s) for s in snap.extra.get("loss_stats", [])] or self._loss_stats
        self._last_capture_applied = snap.applied_steps[0] if snap.applied_steps else -1
        # Lightning steps the user's LR schedulers once more for this batch: their state (and the LRs) are put
        # back after that, at batch end.
        self._rollback_schedulers = snap.extra.get("schedulers")
        self._rollback_lrs = [[_lr_copy(g["lr"]) for g in opt.param_groups] for opt in trainer.optimizers]
        _drop_grads(optimizer)  # the restored step must not apply this step's gradients
        self._rollbacks += 1
        n = len(trainer.optimizers)
        self._bad, self._suspect, self._loss_streak = [0] * n, [False] * n, [0] * n
        self._skip_remaining = self.skip_after_rollback
        self._event(
            trainer,
            "rollback",
            "warning",
            f"{reason}: restored the snapshot of step {snap.step} "
            f"(rollback {self._rollbacks}/{self.max_rollbacks}); skipping {self.skip_after_rollback} batches",
            self.last_norm,
            diagnose=False,
            from_step=from_step,
            to_step=snap.step,
            rollbacks=self._rollbacks,
        )
        for backoff in self._backoffs:  # the skips behind the rollback are undone with it: one remains
            backoff.forget()
        self._note_instability(trainer, idx)

    def _backoff(self, idx: int) -> LrBackoff:
        """Optimizer ``idx``'s backoff, with the guard's settings as they are now (a user may change them mid-fit)."""
        backoff = self._backoffs[idx]
        backoff.after, backoff.window = self.backoff_after, self.backoff_window
        backoff.factor, backoff.recovery = self.backoff_factor, self.backoff_recovery
        return backoff

    def _note_instability(self, trainer: pl.Trainer, idx: int) -> None:
        """A skipped step of optimizer ``idx``: evidence for an LR backoff (``LrBackoff`` decides)."""
        backoff = self._backoff(idx)
        if backoff.note_skip(int(trainer.global_step)):
            self.runtime(trainer).set_lr_scale(idx, backoff.scale, source=self.guard_name)
            self._event(
                trainer,
                "lr_backoff",
                "warning",
                f"{self.backoff_after} skipped steps within {self.backoff_window} steps: LR of optimizer {idx} "
                f"x{self.backoff_factor}, recovering over {self.backoff_recovery} steps",
                self.last_norm,
                diagnose=False,
                factor=self.backoff_factor,
                optimizer=idx,
            )

    def _on_step(self, outcome: StepOutcome) -> None:
        trainer = self._trainer
        if trainer is None or not outcome.applied:
            return
        idx = outcome.optimizer_idx
        if idx == 0:
            self._applied_since_batch = True
        if idx >= len(self._backoffs):
            return
        backoff = self._backoff(idx)
        change = backoff.note_applied()
        if change == "idle":
            return
        if change == "recovered":
            self._event(
                trainer,
                "lr_recovered",
                "info",
                f"LR of optimizer {idx} back on its schedule",
                self.last_norm,
                diagnose=False,
                optimizer=idx,
            )
        self.runtime(trainer).set_lr_scale(idx, backoff.scale, source=self.guard_name)

    def _finish_rollback(self, trainer: pl.Trainer) -> None:
        """After Lightning stepped the LR schedulers for the rollback's batch: put them and the LRs back."""
        schedulers, lrs = self._rollback_schedulers, self._rollback_lrs
        self._rollback_schedulers = self._rollback_lrs = None
        for cfg, state in zip(trainer.lr_scheduler_configs, schedulers or [], strict=False):
            cfg.scheduler.load_state_dict(copy.deepcopy(state))
        for opt, group_lrs in zip(trainer.optimizers, lrs or [], strict=False):
            set_group_lrs(opt, group_lrs)

    def _take_snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, into: Snapshot) -> None:
        into.capture(
            pl_module,
            list(trainer.optimizers),
            self._scaler(trainer),
            list(self.runtime(trainer).applied_steps),
            int(trainer.global_step),
        )
        into.extra = {
            "stats": [s.state_dict() for s in self._stats],
            "loss_stats": [s.state_dict() for s in self._loss_stats],
            "schedulers": [copy.deepcopy(cfg.scheduler.state_dict()) for cfg in trainer.lr_scheduler_configs],
        }
        # The two buffers alternate: size the other one now, so no pinned allocation lands mid-training later.
        other = self._candidate if into is self._snapshot else self._snapshot
        other.reserve(into.nbytes, pinned=pl_module.device.type == "cuda")
