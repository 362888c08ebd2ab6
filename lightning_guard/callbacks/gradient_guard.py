"""GradientGuard: keep training alive through exploding gradients, on every strategy and precision."""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_guard._checks import check_int, check_number
from lightning_guard._compat import scaler_check_inf, scaler_optimizer_state, scaler_scale, steps_unscale_inside
from lightning_guard._runtime import StepOutcome, _lr_copy, emit, set_group_lrs
from lightning_guard._state import StateSchema
from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.callbacks._snapshot import Snapshot, StepBuffers
from lightning_guard.errors import GradientExplosionError, GuardConfigError
from lightning_guard.events import GuardEvent, Severity
from lightning_guard.functional.grad import (
    EmaStats,
    clip_grads_,
    collect_grads,
    global_grad_norm,
    top_k_grad_norms,
    zclip_threshold,
)
from lightning_guard.functional.gradient_policy import StepDecision, StepFacts, decide_step, step_facts

__all__ = ["GradientGuard"]

SpikeAction = Literal["clip", "skip", "warn"]


@dataclass(frozen=True)
class _Step:
    """The step being acted on."""

    trainer: pl.Trainer
    pl_module: pl.LightningModule
    optimizer: torch.optim.Optimizer
    idx: int
    grads: Any
    facts: StepFacts
    z: float  # the norm's z against the running statistics (NaN where not judged)


_UNJUDGED = (False, math.nan, False, math.nan)


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


class GradientGuard(GuardCallback):
    r"""Keep training alive through exploding gradients: skip, clip adaptively, back off the LR, roll back.

    Runs once per optimizer step in ``on_before_optimizer_step`` (after AMP unscaling, before the update), with one
    host synchronisation per step (one small collective under DDP/FSDP that also carries every rank's verdict):

    1. **Global gradient norm** of the optimizer's parameters in one fused pass, accumulated in fp32; under FSDP the
       squared shard norms are summed over ranks, so every rank sees the same value.
    2. **Non-finite gradients or loss → a true skip**: the gradients are set to ``None`` so neither weights nor
       optimizer state change, and the step does not count as applied (the LR schedule holds). Under a 16-mixed
       GradScaler a finite loss with overflowing gradients is an ``amp_overflow`` (info), not an explosion; the
       skip is forced on every rank so the loss scale stays identical across ranks.
    3. **Spikes**: per optimizer, the norm's z-score against NaN-safe EMA statistics (after ``warmup_steps``). A
       norm is a spike when its z-score is above ``z_threshold`` *and* it is at least ``min_ratio`` times its
       running mean: early training's natural drift (norms doubling while the EMA catches up) is no explosion. The
       ``spike_action`` then applies: ``"clip"`` to a ZClip-style adaptive threshold
       ``mean + (z_threshold**2 / z) * std``, ``"skip"``, or ``"warn"``. The loss is watched the same way, per
       optimizer (``monitor_loss``): a loss spike is above ``z_threshold`` and at least ``loss_min_rise`` (relative)
       above its running mean. A loss spike alone is watched, not acted on (healthy runs have hard batches): if the
       loss spikes on three steps in a row, the weights were damaged and are rolled back. An optional fixed
       ``max_norm`` clip applies after the adaptive one.
    4. **LR backoff**, only on evidence of instability: ``backoff_after`` skipped steps (non-finite gradients or
       loss, skipped spikes; a rollback counts as one) within ``backoff_window`` steps scale that optimizer's LR by
       ``backoff_factor``, recovering linearly over ``backoff_recovery`` applied steps. Clipped spikes never back
       off. It composes with WarmupCosine and with torch schedulers (the scale is applied around the step only).
    5. **Rollback**: after ``rollback_after`` consecutive bad steps of one optimizer (non-finite or skipped spikes),
       when a gradient-norm spike with z above ``rollback_z`` is followed by another spike, or when the loss spikes
       on three steps in a row (the weights were damaged, e.g. by one huge update, which no clipping can undo; a
       lone bad batch is only skipped), the state
       of the last *validated* snapshot is restored: weights and buffers, optimizer state, GradScaler, the user's
       LR schedulers, the applied-step counter (so WarmupCosine resumes its schedule from there) and the guard's
       own norm and loss statistics (the restored model is judged against statistics of its own time). The next
       ``skip_after_rollback`` batches are skipped (the data that did the damage is never replayed: training goes
       on with the next batches), and training goes on. Snapshots are host copies of each rank's local tensors
       taken every ``snapshot_every`` applied steps (asynchronously into pinned memory on CUDA); a snapshot becomes
       the rollback target only once the following step's gradients and loss were found healthy, so a snapshot
       taken right after a damaging step is never restored and a rollback loses at most about
       ``2 * snapshot_every`` steps. Two buffers are kept: host memory of twice the model's parameters, buffers and
       optimizer state (for AdamW in fp32: 2 x 3 x 4 bytes per parameter). Once ``max_rollbacks`` rollbacks are
       spent, the next one raises :class:`~lightning_guard.errors.GradientExplosionError` naming the step, the recent
       norm history and the layers with the largest gradient norms.

    A skipped step never touches the 16-mixed GradScaler's bookkeeping: the gradients are dropped after the scaler
    recorded its own overflow check, so the loss scale and its growth tracker move exactly as on an applied step
    (only a genuine overflow lowers the scale), for fused and non-fused optimizers alike. Statistics, backoff and
    counters do not depend on the order of the callbacks in the list.

    Every decision is agreed across ranks; no rank acts alone.

    Args:
        spike_action: what to do with a gradient-norm spike: ``"clip"`` (default), ``"skip"`` or ``"warn"``.
        z_threshold: z-score above which a norm is a spike. Default ``2.5``.
        warmup_steps: finite norms observed before spikes are detected. Default ``25``.
        ema_alpha: EMA decay of the norm statistics, in ``(0, 1)``. Default ``0.97``.
        max_norm: optional fixed clip of the global norm (applied after adaptive clipping). Default ``None``.
        monitor_loss: also detect spikes of the training loss (same threshold): three in a row are damage and are
            rolled back. Default ``True``.
        backoff_after: skipped steps (non-finite, skipped spikes, rollbacks) within ``backoff_window`` steps that
            trigger an LR backoff; ``None`` disables it. Default ``3``.
        backoff_window: window, in optimizer steps, for counting spikes. Default ``50``.
        backoff_factor: LR multiplier during a backoff, in ``(0, 1)``. Default ``0.5``.
        backoff_recovery: applied steps over which the LR recovers linearly to its schedule. Default ``100``.
        rollback_after: consecutive bad steps that trigger a rollback; ``None`` disables it. Default ``3``.
        rollback_z: a gradient-norm spike above this z-score is skipped and, if the next step spikes too (the
            weights were damaged), triggers a rollback; ``None`` disables it. Default ``12.0``.
        snapshot_every: applied steps between rollback snapshots. Default ``25``.
        skip_after_rollback: batches skipped after a rollback (PaLM skipped 200-500). Default ``0``.
        max_rollbacks: rollbacks allowed before giving up with ``GradientExplosionError``. Default ``3``.
        log_every_n_steps: interval of the ``guard/grad_norm`` metrics; default: the Trainer's ``log_every_n_steps``.
        diagnose_top_k: layers listed (by gradient norm) in an event's diagnosis. Default ``5``.
        min_ratio: a gradient norm is a spike only if it is also at least this many times its running mean (>= 1).
            Default ``3.0``.
        loss_min_rise: a loss is a spike only if it is also at least this fraction of its running mean's magnitude
            above that mean (>= 0; 0.5: 1.5 times the mean of a positive loss). Default ``0.5``.

    Events:
        ``nonfinite_skip`` (warning), ``amp_overflow`` (info), ``spike_clip`` (info), ``spike_skip`` (warning),
        ``spike_warn`` (warning), ``lr_backoff`` (warning), ``lr_recovered`` (info), ``rollback`` (warning),
        ``gave_up`` (error); each carries the step, norm, threshold and z, and the top layers by gradient norm.

    Raises:
        GuardConfigError: a bad argument (at construction); Trainer clipping (``gradient_clip_val``) together with
            this guard's own clipping (at fit start).
        GradientExplosionError: training kept exploding after ``max_rollbacks`` rollbacks.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_guard import GradientGuard
        >>> guard = GradientGuard(spike_action="clip", z_threshold=3.0, rollback_after=4, snapshot_every=50)
        >>> trainer = pl.Trainer(callbacks=[guard], precision="bf16-mixed", logger=False)
    """

    guard_name = "gradient_guard"
    SPIKE_ACTIONS: tuple[str, ...] = ("clip", "skip", "warn")

    def __init__(
        self,
        spike_action: SpikeAction = "clip",
        z_threshold: float = 2.5,
        warmup_steps: int = 25,
        ema_alpha: float = 0.97,
        max_norm: float | None = None,
        monitor_loss: bool = True,
        backoff_after: int | None = 3,
        backoff_window: int = 50,
        backoff_factor: float = 0.5,
        backoff_recovery: int = 100,
        rollback_after: int | None = 3,
        rollback_z: float | None = 12.0,
        snapshot_every: int = 25,
        skip_after_rollback: int = 0,
        max_rollbacks: int = 3,
        log_every_n_steps: int | None = None,
        diagnose_top_k: int = 5,
        min_ratio: float = 3.0,
        loss_min_rise: float = 0.5,
    ) -> None:
        super().__init__()
        if spike_action not in self.SPIKE_ACTIONS:
            raise GuardConfigError(f"`spike_action` must be one of {self.SPIKE_ACTIONS}, got {spike_action!r}")
        check_number("z_threshold", z_threshold, low=0.0)
        check_int("warmup_steps", warmup_steps, low=1)
        check_number("ema_alpha", ema_alpha, low=0.0, high=1.0)
        if ema_alpha == 1.0:
            raise GuardConfigError(f"`ema_alpha` must be a number > 0.0 and < 1.0, got {ema_alpha!r}")
        if max_norm is not None:
            check_number("max_norm", max_norm, low=0.0)
        if not isinstance(monitor_loss, bool):
            raise GuardConfigError(f"`monitor_loss` must be a bool, got {monitor_loss!r}")
        check_int("backoff_after", backoff_after, low=1, optional=True, none_first=True)
        check_int("backoff_window", backoff_window, low=1)
        check_number("backoff_factor", backoff_factor, low=0.0, high=1.0)
        if backoff_factor == 1.0:
            raise GuardConfigError(f"`backoff_factor` must be a number > 0.0 and < 1.0, got {backoff_factor!r}")
        check_int("backoff_recovery", backoff_recovery, low=1)
        check_int("rollback_after", rollback_after, low=1, optional=True, none_first=True)
        if rollback_z is not None:
            check_number("rollback_z", rollback_z, low=0.0)
            if rollback_z <= z_threshold:
                raise GuardConfigError(
                    f"`rollback_z` must be greater than `z_threshold` ({z_threshold}), got {rollback_z!r}"
                )
        check_int("snapshot_every", snapshot_every, low=1)
        check_int("skip_after_rollback", skip_after_rollback, low=0)
        check_int("max_rollbacks", max_rollbacks, low=0)
        check_int("log_every_n_steps", log_every_n_steps, low=1, optional=True, none_first=True)
        check_int("diagnose_top_k", diagnose_top_k, low=0)
        check_number("min_ratio", min_ratio, low=1.0, strict=False)
        check_number("loss_min_rise", loss_min_rise, low=0.0, strict=False)
        self.spike_action = spike_action
        self.z_threshold = float(z_threshold)
        self.warmup_steps = warmup_steps
        self.ema_alpha = float(ema_alpha)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.monitor_loss = monitor_loss
        self.backoff_after = backoff_after
        self.backoff_window = backoff_window
        self.backoff_factor = float(backoff_factor)
        self.backoff_recovery = backoff_recovery
        self.rollback_after = rollback_after
        self.rollback_z = None if rollback_z is None else float(rollback_z)
        self.snapshot_every = snapshot_every
        self.skip_after_rollback = skip_after_rollback
        self.max_rollbacks = max_rollbacks
        self.log_every_n_steps = log_every_n_steps
        self.diagnose_top_k = diagnose_top_k
        self.min_ratio = float(min_ratio)
        self.loss_min_rise = float(loss_min_rise)
        self._reset_state()

    vote_in_place = True  # the norm of the gradients as the callbacks listed before this guard left them

    def _reset_state(self) -> None:
        self._stats: list[EmaStats] = []  # per optimizer: gradient-norm statistics
        self._loss_stats: list[EmaStats] = []  # per optimizer: loss statistics
        self._bad: list[int] = []  # per optimizer: consecutive bad (skipped) steps
        self._suspect: list[bool] = []  # per optimizer: the last step was a huge spike (damage suspected)
        self._loss_streak: list[int] = []  # per optimizer: consecutive loss spikes
        self._rollbacks = 0
        self._unstable_steps: list[deque[int]] = []  # per optimizer: steps of skips (the backoff's evidence)
        self._backoff_scale: list[float] = []
        self._backoff_progress: list[int] = []
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
        self._verdict: list[tuple[float, ...]] | None = None
        self._reduce = False  # sharded gradients (FSDP): the vote is the squared norm of this rank's shard
        self.last_norm: float = math.nan
        self.last_post_clip_norm: float = math.nan

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(spike_action=self.spike_action, z_threshold=self.z_threshold)

    # ------------------------------------------------------------------ set-up
    @override
    def setup_problems(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        problems = super().setup_problems(trainer, pl_module)
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if clip_val and (self.spike_action == "clip" or self.max_norm is not None):
            what = "max_norm" if self.max_norm is not None else "spike_action='clip'"
            problems.append(
                f"GradientGuard clips gradients itself ({what}) but the Trainer also has gradient_clip_val={clip_val}: "
                "remove `gradient_clip_val` (use GradientGuard(max_norm=...) for a fixed clip), or set "
                "spike_action='skip' or 'warn' and max_norm=None"
            )
        return problems

    def _new_stats(self) -> EmaStats:
        return EmaStats(alpha=self.ema_alpha, warmup=self.warmup_steps)

    @property
    def _rollback_enabled(self) -> bool:
        return self.rollback_after is not None or self.rollback_z is not None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        runtime = self.runtime(trainer)
        runtime.add_listener(self._on_step)
        self._reduce = self._sharded(trainer)
        self._losses = []
        n = len(trainer.optimizers)
        for per_opt in (self._stats, self._loss_stats):
            while len(per_opt) < n:
                per_opt.append(self._new_stats())
        while len(self._unstable_steps) < n:
            self._unstable_steps.append(deque())
        self._bad += [0] * (n - len(self._bad))
        self._suspect += [False] * (n - len(self._suspect))
        self._loss_streak += [0] * (n - len(self._loss_streak))
        while len(self._backoff_scale) < n:
            self._backoff_scale.append(1.0)
            self._backoff_progress.append(0)
        for idx in range(n):
            runtime.set_lr_scale(idx, self._backoff_scale[idx], source=self.guard_name)
        # The state training starts from is trusted; it is captured at the first batch, once every callback's
        # on_train_start has run (a WarmupCosine listed after this guard has set its first LR by then).

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._batch_losses_from = len(self._losses)  # the window's earlier batches (accumulation) stay recorded
        if not self._step_buffers.taken:  # the step's first micro-batch: its forward is about to write the buffers
            self._step_buffers.capture(pl_module)
        if self._rollback_enabled and not self._snapshot.taken:
            self._take_snapshot(trainer, pl_module, self._snapshot)
            if self._last_capture_applied < 0:  # a resumed run keeps the checkpoint's cadence
                self._last_capture_applied = self.runtime(trainer).applied_steps[0] if trainer.optimizers else 0

    # ------------------------------------------------------------------ per step
    @override
    def on_batch_retry(self, trainer: pl.Trainer) -> None:
        # the failed attempt's loss (this batch's only: under accumulation the window's earlier batches stand); the
        # re-run records the batch's loss again
        del self._losses[self._batch_losses_from :]

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        loss = loss.detach()
        scaler = self._scaler(trainer)
        scale = scaler_scale(scaler)
        if scale is not None:
            # Lightning hands this hook the loss already multiplied by the GradScaler's scale: judged as it is, every
            # growth of the scale would look like a loss spike. A tensor division: no host sync.
            loss = loss.float() / scale.to(loss.device)
        self._losses.append(loss)  # judged with the norm, in the step's one sync

    def _scaler(self, trainer: pl.Trainer) -> Any:
        return getattr(trainer.precision_plugin, "scaler", None)

    def _sharded(self, trainer: pl.Trainer) -> bool:
        """Each rank holds a part of the gradients (FSDP): the norm's squares are summed over ranks."""
        from lightning.pytorch.strategies import FSDPStrategy

        sharded = (
            isinstance(trainer.strategy, FSDPStrategy) or type(trainer.strategy).__name__ == "ModelParallelStrategy"
        )
        return sharded and trainer.world_size > 1

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._deferred_skip: tuple[Any, ...] | None = None
        try:
            self._guard_step(trainer, pl_module, optimizer)
        finally:
            if self._deferred_skip is not None:
                self._apply_skip(*self._deferred_skip)
                self._deferred_skip = None
            self._stepped_in_batch = True  # the capture is dropped at batch end (more optimizers may follow)

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

    @override
    def step_vote(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor | list[float] | None:
        """``[has_loss, norm, loss, buffers_nonfinite]``.

        The gradient norm (its square under FSDP: summed over the shards), the loss, and 1.0 when the step's
        forwards left a NaN or infinity in a buffer (BatchNorm statistics of a NaN batch).
        """
        self._vote, self._verdict = None, None
        runtime = self.runtime(trainer)
        if not runtime.has_loss(optimizer):  # training_step returned None: nothing to judge, no statistics to feed
            self._losses = []
            return [0.0, 0.0, 0.0, 0.0]
        self._candidate.wait()  # the weights are about to change: the async snapshot copy must be complete
        self._snapshot.wait()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = collect_grads(params)
        norm = global_grad_norm(grads)
        if self._reduce:  # sharded: each rank holds a part; the squares add up across ranks
            norm = norm * norm
        scaler = self._scaler(trainer)
        if scaler is not None and steps_unscale_inside(optimizer):
            # fused optimizers unscale inside step(): the gradients are still scaled
            scale = _current_scale(scaler).to(norm.device)
            norm = norm / (scale * scale if self._reduce else scale)
        losses, self._losses = self._losses, []
        if not losses:
            loss = torch.zeros((), device=norm.device)
        elif len(losses) == 1:
            loss = losses[0].float().to(norm.device)
        else:  # gradient accumulation: Lightning already divided each micro-batch loss by the number of them
            loss = torch.stack([x.float() for x in losses]).sum().to(norm.device)
        self._vote = (optimizer, grads)
        buffers_bad = self._step_buffers.newly_nonfinite(norm.device)
        return torch.stack([torch.ones((), device=norm.device), norm.float(), loss, buffers_bad])

    @override
    def step_verdict(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, rows: list[tuple[float, ...]]
    ) -> None:
        self._verdict = rows

    def _guard_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """Judge the agreed step (``functional.gradient_policy``), then act on the decision."""
        runtime = self.runtime(trainer)
        vote, rows = self._vote, self._verdict
        self._vote, self._verdict = None, None
        if not runtime.has_loss(optimizer):
            return
        if vote is None or rows is None or vote[0] is not optimizer:
            raise RuntimeError(
                "GradientGuard: no step agreement for this optimizer step (its on_before_optimizer_step was called "
                "outside Lightning's optimizer step, or a guard's hook did not call super())"
            )
        idx = max(runtime.optimizer_index(optimizer), 0)
        facts = step_facts(rows, sharded=self._reduce)
        if facts.healthy:
            runtime.note_finite(optimizer)  # the GradScaler's inf check of these gradients needs no host read
        self.last_norm = facts.norm
        self._history.append(facts.norm)
        self._promote_candidate(idx, facts)
        scheduled = self._skip_remaining > 0
        judged = facts.healthy and not scheduled
        spike, z, loss_spike, loss_z = self._judge(idx, facts.norm, facts.loss_mean) if judged else _UNJUDGED
        decision = decide_step(
            facts,
            scheduled_skip=scheduled,
            scaler=self._scaler(trainer) is not None,
            spike=spike,
            z=z,
            loss_spike=loss_spike,
            loss_z=loss_z,
            spike_action=self.spike_action,
            rollback_z=self.rollback_z,
            rollback_enabled=self._rollback_enabled,
            suspect=self._suspect[idx],
            loss_streak=self._loss_streak[idx],
        )
        if judged and self.monitor_loss and not loss_spike:
            self._loss_stats[idx].update(facts.loss_mean)
        step = _Step(trainer, pl_module, optimizer, idx, vote[1], facts, z)
        _ACTIONS[decision.action](self, step, decision)

    def _promote_candidate(self, idx: int, facts: StepFacts) -> None:
        """A rollback candidate taken before this step becomes the snapshot if the step was healthy (judged once)."""
        if not (self._candidate.taken and idx == 0):
            return
        if facts.healthy:
            spike, _, loss_spike, _ = self._judge(0, facts.norm, facts.loss_mean)
            if not spike and not loss_spike:
                self._snapshot, self._candidate = self._candidate, self._snapshot  # promote; reuse the old buffers
        self._candidate.step = -1

    def _act_scheduled_skip(self, s: _Step, d: StepDecision) -> None:
        self._skip_remaining -= 1
        self._skip(s.trainer, s.optimizer, s.grads, self._scaler(s.trainer), overflow=False)
        self._log(s.trainer, s.pl_module, s.idx, s.facts.norm, math.nan, math.nan)

    def _act_amp_overflow(self, s: _Step, d: StepDecision) -> None:
        scaler = self._scaler(s.trainer)
        self._skip(s.trainer, s.optimizer, s.grads, scaler, overflow=True)
        self._event(
            s.trainer,
            "amp_overflow",
            "info",
            "GradScaler overflow: step skipped, loss scale lowered",
            s.facts.norm,
            ranks=s.facts.bad_ranks,
            diagnose=False,
            scale=float(_current_scale(scaler).item()),
        )
        self._log(s.trainer, s.pl_module, s.idx, s.facts.norm, math.nan, math.nan)

    def _act_nonfinite_skip(self, s: _Step, d: StepDecision) -> None:
        self._skip(s.trainer, s.optimizer, s.grads, self._scaler(s.trainer), overflow=True)
        self._bad[s.idx] += 1
        what = s.facts.what_is_bad
        self._event(
            s.trainer,
            "nonfinite_skip",
            "warning",
            f"non-finite {what}: step skipped",
            s.facts.norm,
            ranks=s.facts.bad_ranks,
            loss=s.facts.loss_mean,
            buffers_restored=self._step_buffers.count,
            pl_module=s.pl_module,
        )
        self._skip_and_maybe_roll_back(s, reason=f"non-finite {what}", z=math.inf, log_z=math.inf)

    def _act_damage_skip(self, s: _Step, d: StepDecision) -> None:
        """A huge spike, a spike right after one, or a loss that stays high: skip; roll back now if damage persists."""
        self._loss_streak[s.idx] = d.loss_streak
        self._skip(s.trainer, s.optimizer, s.grads, self._scaler(s.trainer), overflow=False)
        self._bad[s.idx] += 1
        self._spike_skip_event(s, f"spike z={d.z:.1f} {d.why}: step skipped", d.z)
        rollbacks = self._rollbacks
        if d.roll_back_now:
            self._rollback_or_give_up(
                s.trainer, s.pl_module, s.optimizer, s.idx, reason=f"spikes persist (z={d.z:.1f})"
            )
            self._suspect[s.idx] = False
            self._loss_streak[s.idx] = 0
        else:
            self._suspect[s.idx] = True
            self._maybe_rollback(s.trainer, s.pl_module, s.optimizer, s.idx, reason=f"spike z={d.z:.1f}", z=d.z)
        if self._rollbacks == rollbacks:
            self._note_instability(s.trainer, s.idx)
        self._log(s.trainer, s.pl_module, s.idx, s.facts.norm, math.nan, d.z)

    def _act_skip(self, s: _Step, d: StepDecision) -> None:
        self._loss_streak[s.idx] = d.loss_streak
        self._skip(s.trainer, s.optimizer, s.grads, self._scaler(s.trainer), overflow=False)
        self._bad[s.idx] += 1
        self._spike_skip_event(s, f"spike z={d.z:.1f}: step skipped", d.z)
        self._skip_and_maybe_roll_back(s, reason=f"spike z={d.z:.1f}", z=d.z, log_z=d.z)

    def _skip_and_maybe_roll_back(self, s: _Step, *, reason: str, z: float, log_z: float) -> None:
        """After a skip: roll back if the skips pile up, else count the instability; log the step."""
        rollbacks = self._rollbacks
        self._maybe_rollback(s.trainer, s.pl_module, s.optimizer, s.idx, reason=reason, z=z)
        if self._rollbacks == rollbacks:  # a rollback counts itself once, and clears the skips it undid
            self._note_instability(s.trainer, s.idx)
        self._log(s.trainer, s.pl_module, s.idx, s.facts.norm, math.nan, log_z)

    def _spike_skip_event(self, s: _Step, message: str, z: float) -> None:
        self._event(
            s.trainer,
            "spike_skip",
            "warning",
            message,
            s.facts.norm,
            z=z,
            loss=s.facts.loss_mean,
            pl_module=s.pl_module,
        )

    def _act_hard_batch(self, s: _Step, d: StepDecision) -> None:
        """A loss spike that is not huge: nothing is done now.

        A hard batch (a healthy run has them), or the first sign of weights damaged by the previous update: if the loss
        spikes again next step, it is rolled back.
        """
        self._loss_streak[s.idx] = d.loss_streak
        self._stats[s.idx].update(s.facts.norm)
        self._bad[s.idx] = 0
        self._apply(s, s.facts.norm)

    def _act_clip(self, s: _Step, d: StepDecision) -> None:
        self._loss_streak[s.idx] = d.loss_streak
        stats = self._stats[s.idx]
        threshold = zclip_threshold(stats.mean, stats.std, s.z, self.z_threshold)
        clip_grads_(s.grads, threshold / s.facts.norm)
        stats.update(threshold)
        self._bad[s.idx] = 0
        self._event(
            s.trainer,
            "spike_clip",
            "info",
            f"norm {s.facts.norm:.4g} clipped to {threshold:.4g}",
            s.facts.norm,
            z=s.z,
            threshold=threshold,
            pl_module=s.pl_module,
        )
        self._apply(s, threshold)

    def _act_warn(self, s: _Step, d: StepDecision) -> None:
        self._loss_streak[s.idx] = d.loss_streak
        self._stats[s.idx].update(s.facts.norm)
        self._bad[s.idx] = 0
        self._event(
            s.trainer,
            "spike_warn",
            "warning",
            f"spike z={d.z:.1f} (no action)",
            s.facts.norm,
            z=d.z,
            loss=s.facts.loss_mean,
            pl_module=s.pl_module,
        )
        self._apply(s, s.facts.norm)

    def _act_healthy(self, s: _Step, d: StepDecision) -> None:
        self._stats[s.idx].update(s.facts.norm)
        self._bad[s.idx] = 0
        self._suspect[s.idx] = False
        self._loss_streak[s.idx] = 0
        self._apply(s, s.facts.norm)

    def _apply(self, s: _Step, post: float) -> None:
        """The step is applied: clip to ``max_norm`` if set, log the norms."""
        if self.max_norm is not None and post > self.max_norm:
            clip_grads_(s.grads, self.max_norm / post)
            post = self.max_norm
        self.last_post_clip_norm = post
        self._log(s.trainer, s.pl_module, s.idx, s.facts.norm, post, s.z)

    # ------------------------------------------------------------------ actions
    def _skip(
        self,
        trainer: pl.Trainer,
        optimizer: torch.optim.Optimizer,
        grads: list[torch.Tensor],
        scaler: Any,
        *,
        overflow: bool,
    ) -> None:
        """Decide to skip this step; the gradients are dropped at the end of the hook (after events are reported).

        ``overflow``: some rank has non-finite gradients or loss (the agreed verdict), so every rank's GradScaler
        is told of an overflow; a deliberate skip of finite gradients leaves the scaler to its own check.
        """
        self._deferred_skip = (trainer, optimizer, scaler, overflow)

    def _apply_skip(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, scaler: Any, overflow: bool) -> None:
        """Skip this optimizer step on this rank, leaving the GradScaler's bookkeeping as the gradients make it.

        The scaler's overflow check must see the real gradients before they go: a non-fused optimizer's was done
        by Lightning's ``unscale_`` before this hook; a fused optimizer's runs inside ``scaler.step()``, so it is
        done here and the optimizer marked unscaled (its gradients are gone: nothing to unscale). ``scaler.step``
        then steps an optimizer without gradients (nothing changes) and ``scaler.update`` grows the scale exactly as
        for an applied step. Only a genuine overflow lowers it: then on every rank alike (a NaN that one rank alone
        sees must not leave the ranks with different loss scales).
        """
        if scaler is not None:
            from torch.amp.grad_scaler import OptState

            state = scaler_optimizer_state(scaler, optimizer)
            if not state.get("found_inf_per_device") and state.get("stage") is OptState.READY:
                scaler_check_inf(scaler, optimizer)
                if not state.get("found_inf_per_device"):  # no gradient at all: give update() a clean check
                    device = _current_scale(scaler).device
                    state["found_inf_per_device"] = {device: torch.zeros(1, device=device)}
                state["stage"] = OptState.UNSCALED
            if overflow:
                for found in state["found_inf_per_device"].values():
                    found.fill_(1.0)
        _drop_grads(optimizer)
        self._step_buffers.restore()  # the skipped step's forwards wrote them (BatchNorm statistics)
        self.runtime(trainer).request_skip(optimizer)

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
        for i in range(len(trainer.optimizers)):  # the skips behind the rollback are undone with it: one remains
            self._unstable_steps[i].clear()
        self._note_instability(trainer, idx)

    def _stats_from(self, state: dict[str, float]) -> EmaStats:
        stats = self._new_stats()
        stats.load_state_dict(state)
        return stats

    def _note_instability(self, trainer: pl.Trainer, idx: int) -> None:
        """A skipped step of optimizer ``idx``: evidence for an LR backoff."""
        if self.backoff_after is None:
            return
        step = int(trainer.global_step)
        window = self._unstable_steps[idx]
        window.append(step)
        while window and window[0] <= step - self.backoff_window:
            window.popleft()
        if len(window) >= self.backoff_after and self._backoff_scale[idx] == 1.0:
            self._backoff_scale[idx] = self.backoff_factor
            self._backoff_progress[idx] = 0
            window.clear()
            self.runtime(trainer).set_lr_scale(idx, self.backoff_factor, source=self.guard_name)
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
        if idx < len(self._backoff_scale) and self._backoff_scale[idx] < 1.0:
            self._backoff_progress[idx] += 1
            frac = min(self._backoff_progress[idx] / self.backoff_recovery, 1.0)
            self._backoff_scale[idx] = self.backoff_factor + (1.0 - self.backoff_factor) * frac
            if frac >= 1.0:
                self._backoff_scale[idx] = 1.0
                self._event(
                    trainer,
                    "lr_recovered",
                    "info",
                    f"LR of optimizer {idx} back on its schedule",
                    self.last_norm,
                    diagnose=False,
                    optimizer=idx,
                )
            self.runtime(trainer).set_lr_scale(idx, self._backoff_scale[idx], source=self.guard_name)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._stepped_in_batch:  # an optimizer step ended this batch: the next one captures anew
            self._stepped_in_batch = False
            self._step_buffers.drop()
        if self._rollback_schedulers is not None or self._rollback_lrs is not None:
            self._finish_rollback(trainer)
        if not self._rollback_enabled:
            return
        stepped, self._applied_since_batch = self._applied_since_batch, False
        applied = self.runtime(trainer).applied_steps
        if (
            stepped  # an accumulating micro-batch changes nothing to capture
            and applied
            and not any(self._bad)
            and applied[0] - self._last_capture_applied >= self.snapshot_every
        ):
            self._take_snapshot(trainer, pl_module, self._candidate)
            self._last_capture_applied = applied[0]

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
        emit(
            trainer,
            GuardEvent.at(
                trainer, self.guard_name, kind, severity=severity, message=message, data=data, ranks=ranks or (0,)
            ),
        )

    def _log(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, idx: int, pre: float, post: float, z: float
    ) -> None:
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 1) or 1
        if not trainer.loggers or trainer.global_step % every:
            return
        suffix = f"/opt{idx}" if len(trainer.optimizers) > 1 else ""
        metrics = {f"guard/grad_norm{suffix}": pre}
        if math.isfinite(post):
            metrics[f"guard/grad_norm_post_clip{suffix}"] = post
        if math.isfinite(z):
            metrics[f"guard/grad_norm_z{suffix}"] = z
        if trainer.global_rank == 0:  # straight to the loggers: exact steps, none of self.log's bookkeeping
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=int(trainer.global_step))

    # ------------------------------------------------------------------ state
    @property
    def counts(self) -> dict[str, int]:
        """How many times each event kind happened (on every rank)."""
        return dict(self._counts)

    @property
    def snapshot_step(self) -> int:
        """Global step of the current rollback snapshot (-1 before the first)."""
        return self._snapshot.step

    #: the version of the checkpoint state this class writes
    STATE_VERSION = 1
    _STATE_LEGACY: ClassVar[dict[str, Any]] = {  # what a version-0 state lacking a key meant
        "stats": [],
        "loss_stats": [],
        "consecutive_bad": [],
        "suspect_damage": [],
        "loss_streak": [],
        "rollbacks": 0,
        "unstable_steps": [],
        "backoff_scale": [],
        "backoff_progress": [],
        "skip_remaining": 0,
        "history": [],
        "counts": {},
        "last_capture_applied": -1,
        "snapshot_step": -1,
    }
    _STATE: ClassVar[StateSchema] = StateSchema(
        "GradientGuard",
        STATE_VERSION,
        frozenset(_STATE_LEGACY),
        legacy=_STATE_LEGACY,
        removed=frozenset({"spike_steps"}),  # written until 2026-12-02 (d57927d)
    )

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._STATE.dump(
            {
                "stats": [s.state_dict() for s in self._stats],
                "loss_stats": [s.state_dict() for s in self._loss_stats],
                "consecutive_bad": list(self._bad),
                "suspect_damage": list(self._suspect),
                "loss_streak": list(self._loss_streak),
                "rollbacks": self._rollbacks,
                "unstable_steps": [list(w) for w in self._unstable_steps],
                "backoff_scale": list(self._backoff_scale),
                "backoff_progress": list(self._backoff_progress),
                "skip_remaining": self._skip_remaining,
                "history": list(self._history),
                "counts": dict(self._counts),
                "last_capture_applied": self._last_capture_applied,
                "snapshot_step": self._snapshot.step if self._snapshot.taken else self._loaded_snapshot_step,
            }
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        def per_optimizer(value: Any) -> list[Any]:  # checkpoints of 0.x kept one value for all optimizers
            return list(value) if isinstance(value, list) else [value]

        state_dict = self._STATE.load(state_dict, extra=type(self) is not GradientGuard)  # a subclass's keys
        self._stats = [self._stats_from(s) for s in state_dict["stats"]]
        self._loss_stats = [self._stats_from(s) for s in per_optimizer(state_dict["loss_stats"])]
        self._bad = [int(v) for v in per_optimizer(state_dict["consecutive_bad"])]
        self._suspect = [bool(v) for v in per_optimizer(state_dict["suspect_damage"])]
        self._loss_streak = [int(v) for v in per_optimizer(state_dict["loss_streak"])]
        self._rollbacks = int(state_dict["rollbacks"])
        self._unstable_steps = [deque(int(s) for s in w) for w in state_dict["unstable_steps"]]
        self._backoff_scale = [float(v) for v in per_optimizer(state_dict["backoff_scale"])]
        self._backoff_progress = [int(v) for v in per_optimizer(state_dict["backoff_progress"])]
        self._skip_remaining = int(state_dict["skip_remaining"])
        self._history = deque((float(h) for h in state_dict["history"]), maxlen=32)
        self._counts = dict(state_dict["counts"])
        self._last_capture_applied = int(state_dict["last_capture_applied"])
        self._loaded_snapshot_step = int(state_dict["snapshot_step"])


#: the action for each decision of ``functional.gradient_policy.decide_step``
_ACTIONS: dict[str, Callable[[GradientGuard, _Step, StepDecision], None]] = {
    "scheduled_skip": GradientGuard._act_scheduled_skip,
    "amp_overflow": GradientGuard._act_amp_overflow,
    "nonfinite_skip": GradientGuard._act_nonfinite_skip,
    "damage_skip": GradientGuard._act_damage_skip,
    "hard_batch": GradientGuard._act_hard_batch,
    "clip": GradientGuard._act_clip,
    "skip": GradientGuard._act_skip,
    "warn": GradientGuard._act_warn,
    "healthy": GradientGuard._act_healthy,
}
