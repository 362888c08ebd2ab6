"""WarmupCosine: linear warmup then cosine decay, per applied optimizer step."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_guard._runtime import StepOutcome, emit
from lightning_guard._state import StateSchema
from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.errors import GuardConfigError
from lightning_guard.events import GuardEvent
from lightning_guard.functional.schedule import (
    validate_schedule_args,
    validate_warmup,
    warmup_cosine,
    warmup_cosine_phase,
)

__all__ = ["WarmupCosine"]

_PHASE_CODE = {"warmup": 0, "decay": 1, "floor": 2}


class WarmupCosine(GuardCallback):
    r"""Linear warmup then cosine decay of every param group's learning rate, per optimizer step.

    The schedule follows the **applied-step counter**: a step that did not update the weights (skipped by the
    16-mixed GradScaler on inf/NaN gradients, or by a guard) does not advance it, so the LR is held instead of
    decaying over steps that never happened (Lightning #5558 is still open for its own schedulers). Each param group
    of each optimizer follows its own base LR (the LR it had when training started); under gradient accumulation the
    schedule moves once per optimizer step. The LR at applied step :math:`s` is ``base_lr * f(s)`` with ``f`` from
    :func:`lightning_guard.functional.warmup_cosine`.

    Args:
        warmup: warmup length: an ``int`` number of optimizer steps, or a ``float`` in ``[0, 1)`` as a fraction of
            ``total_steps``. Default ``0.05``.
        total_steps: schedule length in optimizer steps: an ``int`` for every optimizer, or one ``int`` per optimizer
            (a list) when they step at different rates (a discriminator stepping every batch, a generator every
            fifth). Default: ``trainer.estimated_stepping_batches`` for every optimizer; an error is raised when that
            is infinite or unknown (``max_epochs=-1`` or an iterable dataset without ``max_steps``). With several
            optimizers, a ``schedule_mismatch`` warning tells at the end of training when one of them took far
            fewer steps than its schedule's length while another completed its schedule.
        min_lr_ratio: the floor, as a fraction of each base LR, reached exactly after ``total_steps``. Default ``0.0``.
        start_factor: LR multiplier of the first warmup step, in ``(0, 1]``; never 0, so the first step is not
            wasted. Default ``0.01``.
        cycles: number of cosine cycles (warm restarts, without re-warmup) after warmup. Default ``1``.
        cycle_mult: length ratio of consecutive cycles. Default ``1.0``.
        peak_decay: peak ratio of consecutive cycles, in ``(0, 1]``. Default ``1.0``.
        log_lr: on each training step, log ``guard/lr`` (one key per param group when there are several), the LR
            the step really used (after a GradientGuard backoff or an injected spike), ``guard/lr_scheduled``, the
            schedule's value beside it, and ``guard/lr_phase`` (0 warmup, 1 decay, 2 floor). Default ``True``.

    Events (reported by rank 0; the schedule is identical on every rank):
        ``phase`` (info) when the schedule enters decay or floor; ``hold`` (info) when a step was not applied and the
        LR was held, with the reason (``amp_overflow`` or ``guard_skip``); ``schedule_mismatch`` (warning) at the
        end of training, see ``total_steps``.

    Raises:
        GuardConfigError: a bad argument (at construction); an optimizer that also has an LR scheduler from
            ``configure_optimizers``, an infinite step estimate, ``warmup >= total_steps``, or a ``total_steps`` list
            whose length is not the number of optimizers (at fit start).

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_guard import WarmupCosine
        >>> cb = WarmupCosine(warmup=100, min_lr_ratio=0.1)
        >>> trainer = pl.Trainer(callbacks=[cb], max_steps=1000, logger=False, enable_checkpointing=False)
    """

    guard_name = "warmup_cosine"

    def __init__(
        self,
        warmup: int | float = 0.05,
        total_steps: int | list[int] | None = None,
        min_lr_ratio: float = 0.0,
        start_factor: float = 0.01,
        cycles: int = 1,
        cycle_mult: float = 1.0,
        peak_decay: float = 1.0,
        log_lr: bool = True,
    ) -> None:
        super().__init__()
        validate_warmup(warmup, GuardConfigError)
        if total_steps is not None and not _positive_int(total_steps):
            if not isinstance(total_steps, list | tuple) or not total_steps or not all(map(_positive_int, total_steps)):
                raise GuardConfigError(
                    f"`total_steps` must be a positive int, a list of positive ints (one per optimizer) or None, "
                    f"got {total_steps!r}"
                )
            total_steps = list(total_steps)
        validate_schedule_args(
            start_factor=start_factor,
            min_lr_ratio=min_lr_ratio,
            cycles=cycles,
            cycle_mult=cycle_mult,
            peak_decay=peak_decay,
            error=GuardConfigError,
        )
        if not isinstance(log_lr, bool):
            raise GuardConfigError(f"`log_lr` must be a bool, got {log_lr!r}")
        self.warmup = warmup
        self.total_steps = total_steps
        self.min_lr_ratio = float(min_lr_ratio)
        self.start_factor = float(start_factor)
        self.cycles = cycles
        self.cycle_mult = float(cycle_mult)
        self.peak_decay = float(peak_decay)
        self.log_lr = log_lr
        # state
        self._base_lrs: list[list[float]] | None = None
        self._resolved_total: list[int] | None = None  # per optimizer
        self._resolved_warmup: list[int] | None = None
        self._phases: list[str] = []
        self._restored = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            warmup=self.warmup, total_steps=self.total_steps, min_lr_ratio=self.min_lr_ratio, cycles=self.cycles
        )

    # ------------------------------------------------------------------ schedule
    def factor(self, applied_steps: int, optimizer_idx: int = 0) -> float:
        """LR multiplier of optimizer ``optimizer_idx`` for the step after ``applied_steps`` applied steps.

        Needs a resolved total (set at fit start).
        """
        if self._resolved_total is None or self._resolved_warmup is None:
            raise GuardConfigError("WarmupCosine has no resolved `total_steps` yet: it is set at fit start")
        return warmup_cosine(
            applied_steps,
            self._resolved_total[optimizer_idx],
            self._resolved_warmup[optimizer_idx],
            start_factor=self.start_factor,
            min_lr_ratio=self.min_lr_ratio,
            cycles=self.cycles,
            cycle_mult=self.cycle_mult,
            peak_decay=self.peak_decay,
        )

    def _resolve_totals(self, trainer: pl.Trainer) -> list[int]:
        n = len(trainer.optimizers)
        if isinstance(self.total_steps, list):
            if len(self.total_steps) != n:
                raise GuardConfigError(
                    f"`total_steps` has {len(self.total_steps)} values ({self.total_steps}) but the module has {n} "
                    "optimizer(s): give one length per optimizer, in the order of `configure_optimizers`"
                )
            return list(self.total_steps)
        return [self._resolve_total(trainer)] * n

    def _resolve_total(self, trainer: pl.Trainer) -> int:
        if self.total_steps is not None:
            return int(self.total_steps)  # type: ignore[arg-type]
        estimated = trainer.estimated_stepping_batches
        if estimated is None or not math.isfinite(float(estimated)) or int(estimated) < 1:
            raise GuardConfigError(
                "WarmupCosine needs a finite number of optimizer steps, but `trainer.estimated_stepping_batches` is "
                f"{estimated!r}: pass `total_steps=` or give the Trainer `max_steps` or a finite `max_epochs`"
            )
        return int(estimated)

    @override
    def setup_problems(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        problems = super().setup_problems(trainer, pl_module)
        optimizers = list(trainer.optimizers)
        for cfg in trainer.lr_scheduler_configs:
            opt = getattr(cfg.scheduler, "optimizer", None)
            for idx, o in enumerate(optimizers):
                if opt is o:
                    problems.append(
                        f"WarmupCosine sets the learning rate of optimizer {idx} ({type(o).__name__}), but "
                        f"`configure_optimizers` also returned the LR scheduler {type(cfg.scheduler).__name__} for it; "
                        "remove one of the two (WarmupCosine replaces the scheduler)"
                    )
        return problems

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        totals = self._resolve_totals(trainer)
        if self._restored and self._resolved_total is not None and self._resolved_total != totals:
            from lightning.pytorch.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(
                f"WarmupCosine keeps the checkpoint's schedule of {self._resolved_total} steps "
                f"(the trainer now estimates {totals}) so that the resumed LR trajectory is unchanged"
            )
            return
        warmups = []
        for total in totals:
            warmup = round(self.warmup * total) if isinstance(self.warmup, float) else self.warmup
            if warmup >= total:
                raise GuardConfigError(f"`warmup` ({warmup} steps) must be shorter than `total_steps` ({total})")
            warmups.append(warmup)
        self._resolved_total, self._resolved_warmup = totals, warmups

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        runtime = self.runtime(trainer)
        runtime.add_listener(self._on_step)
        if self._base_lrs is None or not self._restored:
            self._base_lrs = [[float(_lr_value(g["lr"])) for g in opt.param_groups] for opt in trainer.optimizers]
        if len(self._base_lrs) != len(trainer.optimizers) or any(
            len(b) != len(o.param_groups) for b, o in zip(self._base_lrs, trainer.optimizers, strict=False)
        ):
            raise GuardConfigError(
                "WarmupCosine's checkpoint state has base LRs for param groups "
                f"{[len(b) for b in self._base_lrs]}, but the optimizers have "
                f"{[len(o.param_groups) for o in trainer.optimizers]}"
            )
        for idx in range(len(trainer.optimizers)):
            self._apply(trainer, idx, runtime.applied_steps[idx])
        self._phases = [self._phase(runtime.applied_steps[i], i) for i in range(len(trainer.optimizers))]

    def _phase(self, applied: int, optimizer_idx: int = 0) -> str:
        assert self._resolved_total is not None
        assert self._resolved_warmup is not None
        return warmup_cosine_phase(applied, self._resolved_total[optimizer_idx], self._resolved_warmup[optimizer_idx])

    def _apply(self, trainer: pl.Trainer, idx: int, applied: int) -> None:
        assert self._base_lrs is not None
        f = self.factor(applied, idx)
        for group, base in zip(trainer.optimizers[idx].param_groups, self._base_lrs[idx], strict=False):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(base * f)
            else:
                group["lr"] = base * f

    def _on_step(self, outcome: StepOutcome) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        # The schedule is the same on every rank: rank 0 alone reports it, so events are not duplicated per rank.
        report = trainer.global_rank == 0
        if not outcome.applied:
            if not report or outcome.reason == "no_loss":  # nothing was trained: holding is no intervention
                return
            emit(
                trainer,
                GuardEvent(
                    self.guard_name,
                    "hold",
                    step=outcome.step,
                    epoch=int(trainer.current_epoch),
                    message=f"step not applied ({outcome.reason}): LR held at applied step {outcome.applied_steps}",
                    data={
                        "reason": outcome.reason,
                        "applied_steps": outcome.applied_steps,
                        "optimizer": outcome.optimizer_idx,
                    },
                ),
            )
            return
        self._apply(trainer, outcome.optimizer_idx, outcome.applied_steps)
        phase = self._phase(outcome.applied_steps, outcome.optimizer_idx)
        if outcome.optimizer_idx < len(self._phases) and phase != self._phases[outcome.optimizer_idx]:
            old = self._phases[outcome.optimizer_idx]
            self._phases[outcome.optimizer_idx] = phase
            if not report:
                return
            emit(
                trainer,
                GuardEvent.at(
                    trainer,
                    self.guard_name,
                    "phase",
                    message=f"{old} -> {phase} after {outcome.applied_steps} applied steps",
                    data={
                        "from": old,
                        "to": phase,
                        "applied_steps": outcome.applied_steps,
                        "optimizer": outcome.optimizer_idx,
                    },
                ),
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.log_lr or trainer.sanity_checking or not trainer.loggers:
            return
        metrics: dict[str, float] = {}
        runtime = self.runtime(trainer)
        several = len(trainer.optimizers) > 1 or len(trainer.optimizers[0].param_groups) > 1
        for i, lrs in enumerate(runtime.applied_lrs):  # the LRs the last attempted step really used
            scale = runtime.applied_lr_scales[i]
            for j, lr in enumerate(lrs):
                key = f"guard/lr/opt{i}_pg{j}" if several else "guard/lr"
                metrics[key] = _lr_value(lr)
                # the schedule's value beside it: they differ while a guard or an injector scales the LR
                metrics[key.replace("guard/lr", "guard/lr_scheduled", 1)] = _lr_value(lr) / scale
        applied = runtime.applied_steps
        metrics["guard/lr_phase"] = float(_PHASE_CODE[self._phase(applied[0] if applied else 0)])
        GuardCallback.log_metrics(
            self, trainer, metrics, monitorable=True, on_step=True, on_epoch=False, logger=True, prog_bar=False
        )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        totals = self._resolved_total
        if totals is None or len(totals) < 2 or trainer.global_rank != 0:
            return
        applied = self.runtime(trainer).applied_steps
        done = [a / t for a, t in zip(applied, totals, strict=False)]
        if max(done) < 0.9 or min(done) >= 0.5:
            return
        short = [i for i, d in enumerate(done) if d < 0.5]
        self.emit(
            trainer,
            "schedule_mismatch",
            f"optimizer(s) {short} took {[applied[i] for i in short]} steps of schedules "
            f"{[totals[i] for i in short]} steps long (their LR never decayed), while others completed theirs: "
            f"pass total_steps={list(applied)} (one length per optimizer)",
            severity="warning",
            data={"applied_steps": list(applied), "total_steps": list(totals)},
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._restored = False

    # ------------------------------------------------------------------ state
    #: the version of the checkpoint state this class writes
    STATE_VERSION = 1
    _STATE_LEGACY: ClassVar[dict[str, Any]] = {"base_lrs": None, "total_steps": None, "warmup_steps": None}
    _STATE: ClassVar[StateSchema] = StateSchema(
        "WarmupCosine", STATE_VERSION, frozenset(_STATE_LEGACY), legacy=_STATE_LEGACY
    )

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._STATE.dump(
            {
                "base_lrs": self._base_lrs,
                "total_steps": self._resolved_total,
                "warmup_steps": self._resolved_warmup,
            }
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = self._STATE.load(state_dict, extra=type(self) is not WarmupCosine)  # a subclass's keys
        self._base_lrs = state["base_lrs"]
        total, warmup = state["total_steps"], state["warmup_steps"]
        n = len(self._base_lrs or [None])  # checkpoints of 0.x kept one length for every optimizer
        self._resolved_total = None if total is None else (list(total) if isinstance(total, list) else [total] * n)
        self._resolved_warmup = None if warmup is None else (list(warmup) if isinstance(warmup, list) else [warmup] * n)
        self._restored = True


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _lr_value(lr: Any) -> float:
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
