"""WarmupCosineLR: the same schedule as the WarmupCosine callback, as a torch ``LRScheduler``."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from lightning_guard.errors import GuardConfigError
from lightning_guard.functional.schedule import validate_schedule_args, validate_warmup, warmup_cosine

__all__ = ["APPLIED_STEPS_ATTR", "WarmupCosineLR"]

#: attribute the guard runtime keeps on each optimizer: its applied-step count
APPLIED_STEPS_ATTR = "_lightning_guard_applied_steps"


class WarmupCosineLR(LRScheduler):
    """Linear warmup then cosine decay, for users who prefer ``configure_optimizers``.

    Unlike a plain ``LambdaLR`` it advances only when the optimizer really stepped: it counts calls of the
    optimizer's ``step()`` through a post-step hook (the 16-mixed GradScaler does not call ``step()`` when it skips;
    a fused optimizer's step that the scaler hands an overflow is not counted either),
    and when lightning_guard's callbacks are attached it follows their applied-step counter, which also excludes
    steps a guard skipped. Return it with ``"interval": "step"``.

    Args:
        optimizer: the wrapped optimizer.
        total_steps: schedule length in optimizer steps (e.g. ``self.trainer.estimated_stepping_batches``).
        warmup: ``int`` steps or ``float`` fraction of ``total_steps`` in ``[0, 1)``. Default ``0.05``.
        min_lr_ratio: floor as a fraction of each base LR. Default ``0.0``.
        start_factor: multiplier of the first step, in ``(0, 1]``. Default ``0.01``.
        cycles: cosine cycles after warmup. Default ``1``.
        cycle_mult: length ratio of consecutive cycles. Default ``1.0``.
        peak_decay: peak ratio of consecutive cycles. Default ``1.0``.
        last_epoch: as in torch schedulers. Default ``-1``.

    Raises:
        GuardConfigError: a bad argument.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=1.0)
        >>> sched = WarmupCosineLR(opt, total_steps=10, warmup=2)
        >>> lrs = []
        >>> for _ in range(10):
        ...     model(torch.ones(1, 2)).sum().backward()
        ...     opt.step(); sched.step(); lrs.append(round(opt.param_groups[0]["lr"], 3))
        >>> lrs
        [0.505, 1.0, 0.962, 0.854, 0.691, 0.5, 0.309, 0.146, 0.038, 0.0]
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup: int | float = 0.05,
        min_lr_ratio: float = 0.0,
        start_factor: float = 0.01,
        cycles: int = 1,
        cycle_mult: float = 1.0,
        peak_decay: float = 1.0,
        last_epoch: int = -1,
    ) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise GuardConfigError(f"`total_steps` must be a positive int, got {total_steps!r}")
        validate_warmup(warmup, GuardConfigError)
        warmup_steps = round(warmup * total_steps) if isinstance(warmup, float) else warmup
        if not 0 <= warmup_steps < total_steps:
            raise GuardConfigError(
                f"`warmup` must give between 0 and total_steps - 1 ({total_steps - 1}) steps, got {warmup!r}"
            )
        validate_schedule_args(
            start_factor=start_factor,
            min_lr_ratio=min_lr_ratio,
            cycles=cycles,
            cycle_mult=cycle_mult,
            peak_decay=peak_decay,
            error=GuardConfigError,
        )
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = float(min_lr_ratio)
        self.start_factor = float(start_factor)
        self.cycles = cycles
        self.cycle_mult = float(cycle_mult)
        self.peak_decay = float(peak_decay)
        self.real_steps = 0
        self._hook = optimizer.register_step_post_hook(self._count_step)
        super().__init__(optimizer, last_epoch)

    def _count_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # A fused optimizer is stepped by the GradScaler even on an overflow: it is handed `found_inf` and skips
        # the update itself. Such a step is not counted (one host sync, on the scaler's steps of fused optimizers).
        found_inf = getattr(optimizer, "found_inf", None)
        if isinstance(found_inf, torch.Tensor) and bool(found_inf.item()):
            return
        self.real_steps += 1

    @property
    def position(self) -> int:
        """Applied optimizer steps so far (the guard runtime's count when attached, else real ``step()`` calls)."""
        applied = getattr(self.optimizer, APPLIED_STEPS_ATTR, None)
        return int(applied) if applied is not None else self.real_steps

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The LR of each param group at the current position."""
        f = warmup_cosine(
            self.position,
            self.total_steps,
            self.warmup_steps,
            start_factor=self.start_factor,
            min_lr_ratio=self.min_lr_ratio,
            cycles=self.cycles,
            cycle_mult=self.cycle_mult,
            peak_decay=self.peak_decay,
        )
        return [float(base) * f for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """Everything except the optimizer and the hook handle."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_hook")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule position and settings."""
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in ("optimizer", "_hook")})
