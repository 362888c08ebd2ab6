"""GradientGuard's foundation: its settings, its per-run state, and how it reports (events and metrics).

The guard is built in layers, each a class in its own module, each using only the ones below it:
``base`` (state, statistics, reporting) -> ``rollback`` (snapshots, rollback, LR backoff) -> ``actions`` (one action
per decision of :func:`~lightning_guard.functional.gradient_policy.decide_step`) -> ``guard`` (the Lightning hooks,
the step's vote, checkpoint state).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_guard._agreement import StepVotes
from lightning_guard._compat import scaler_scale
from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.callbacks._snapshot import Snapshot, StepBuffers
from lightning_guard.events import Severity
from lightning_guard.functional.grad import EmaStats, top_k_grad_norms
from lightning_guard.functional.gradient_policy import LrBackoff

__all__: list[str] = []


def _current_scale(scaler: Any) -> torch.Tensor:
    """The GradScaler's loss scale (device tensor); the scaler is in use, so it has one."""
    scale = scaler_scale(scaler)
    assert scale is not None, "GradScaler without a scale in a step it scaled"
    return scale


def _drop_grads(optimizer: torch.optim.Optimizer) -> None:
    """Set every gradient of the optimizer's parameters to None: a true skip.

    Torch optimizers leave a parameter without a gradient, and its state, untouched; zeroing the gradient is no skip
    (momentum and weight decay still move the weights).
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


class GradientGuardBase(GuardCallback):
    """Settings, state and reporting of :class:`~lightning_guard.GradientGuard` (not a guard on its own)."""

    guard_name = "gradient_guard"
    spike_action: str
    z_threshold: float
    warmup_steps: int
    ema_alpha: float
    max_norm: float | None
    monitor_loss: bool
    backoff_after: int | None
    backoff_window: int
    backoff_factor: float
    backoff_recovery: int
    rollback_after: int | None
    rollback_z: float | None
    snapshot_every: int
    skip_after_rollback: int
    max_rollbacks: int
    log_every_n_steps: int | None
    diagnose_top_k: int
    min_ratio: float
    loss_min_rise: float
    _deferred_skip: tuple[Any, ...] | None  # a skip decided in this hook, carried out at its end

    def _reset_state(self) -> None:
        self._stats: list[EmaStats] = []  # per optimizer: gradient-norm statistics
        self._loss_stats: list[EmaStats] = []  # per optimizer: loss statistics
        self._bad: list[int] = []  # per optimizer: consecutive bad (skipped) steps
        self._suspect: list[bool] = []  # per optimizer: the last step was a huge spike (damage suspected)
        self._loss_streak: list[int] = []  # per optimizer: consecutive loss spikes
        self._rollbacks = 0
        self._backoffs: list[LrBackoff] = []  # per optimizer: the LR backoff (its evidence, scale and recovery)
        self._skip_remaining = 0
        self._history: deque[float] = deque(maxlen=32)
        self._counts: dict[str, int] = {}
        self._loaded_snapshot_step = -1
        self._last_capture_applied = -1  # optimizer 0's applied steps at the last snapshot capture
        self._applied_since_batch = False
        self._snapshot = Snapshot()  # the validated rollback target
        self._candidate = Snapshot()  # taken after a step, validated by the next step's verdict
        self._step_buffers = StepBuffers()  # the buffers before this step's first forward, put back by a skip
        self._stepped_in_batch = False  # an optimizer step ran in the current batch
        self._rollback_schedulers: list[dict[str, Any]] | None = None  # after a rollback, applied at batch end
        self._rollback_lrs: list[list[Any]] | None = None
        self._losses: list[torch.Tensor] = []
        self._batch_losses_from = 0
        self._vote: tuple[Any, list[torch.Tensor]] | None = None  # this step's optimizer and gradients, as voted
        # every rank's [has_loss, norm, loss, buffers_nonfinite] for this step
        self._verdict: StepVotes | None = None
        self._reduce = False  # sharded gradients (FSDP): the vote is the squared norm of this rank's shard
        self._share_of: dict[int, float] | None = None  # a parameter's weight in that sum over ranks (HSDP), if any
        self.last_norm: float = math.nan
        self.last_post_clip_norm: float = math.nan

    def _new_stats(self) -> EmaStats:
        return EmaStats(alpha=self.ema_alpha, warmup=self.warmup_steps)

    def _stats_from(self, state: dict[str, float]) -> EmaStats:
        stats = self._new_stats()
        stats.load_state_dict(state)
        return stats

    def _new_backoff(self) -> LrBackoff:
        return LrBackoff(self.backoff_after, self.backoff_window, self.backoff_factor, self.backoff_recovery)

    @property
    def _rollback_enabled(self) -> bool:
        return self.rollback_after is not None or self.rollback_z is not None

    def _scaler(self, trainer: pl.Trainer) -> Any:
        return getattr(trainer.precision_plugin, "scaler", None)

    def _judge(self, idx: int, norm: float, loss: float) -> tuple[bool, float, bool, float]:
        """``(norm_spike, z, loss_spike, loss_z)`` of a finite step of optimizer ``idx`` against its statistics."""
        stats, loss_stats = self._stats[idx], self._loss_stats[idx]
        z = stats.z(norm)
        spike = stats.ready and z > self.z_threshold and norm >= self.min_ratio * stats.mean
        loss_z = loss_stats.z(loss) if self.monitor_loss else 0.0
        loss_spike = (
            self.monitor_loss
            and loss_stats.ready
            and loss_z > self.z_threshold
            and loss - loss_stats.mean >= self.loss_min_rise * abs(loss_stats.mean)
        )
        return spike, z, loss_spike, loss_z

    # ------------------------------------------------------------------ reporting
    def _event(
        self,
        trainer: pl.Trainer,
        kind: str,
        severity: Severity,
        message: str,
        norm: float,
        *,
        ranks: tuple[int, ...] = (),
        z: float = math.nan,
        threshold: float = math.nan,
        diagnose: bool = True,
        pl_module: pl.LightningModule | None = None,
        **extra: Any,
    ) -> None:
        self._counts[kind] = self._counts.get(kind, 0) + 1
        if trainer.global_rank != 0:
            return  # decisions are agreed: rank 0 reports them once, with the ranks that raised them
        data: dict[str, Any] = {"norm": norm, "z": z, "threshold": threshold, **extra}
        if diagnose and self.diagnose_top_k and pl_module is not None:
            data["top_layers"] = [
                f"{n}={v:.4g}" for n, v in top_k_grad_norms(pl_module.named_parameters(), self.diagnose_top_k)
            ]
        self.emit(trainer, kind, message, severity=severity, data=data, ranks=ranks or (0,))

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int, pre: float, post: float, z: float
    ) -> None:
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 1) or 1
        if not trainer.loggers:
            return
        suffix = f"/opt{idx}" if len(trainer.optimizers) > 1 else ""
        metrics = {f"guard/grad_norm{suffix}": pre}
        if math.isfinite(post):
            metrics[f"guard/grad_norm_post_clip{suffix}"] = post
        if math.isfinite(z):
            metrics[f"guard/grad_norm_z{suffix}"] = z
        # direct: the exact step, none of self.log's bookkeeping
        GuardCallback.log_metrics(self, trainer, metrics, every=every)
