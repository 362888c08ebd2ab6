"""Fault injectors: chaos-test your own training the way lightning_guard tests itself.

Each injector is an ordinary Lightning callback. It acts while ``trainer.global_step`` is in ``steps`` (every
micro-batch of that optimizer step under gradient accumulation) and only on the given ``ranks`` (all when None),
and reports every injection as a ``warning`` event of guard ``fault_injector`` whose message starts with
``INJECTED``, so an injected fault is never mistaken for a real one in the logs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_guard.errors import GuardConfigError
from lightning_guard.events import GuardEvent, emit
from lightning_guard.functional.oom import batch_size

__all__ = ["FaultInjector", "InjectNaN", "LRSpike", "LossSpike", "SimulatedOOM", "batch_size_of"]

GUARD = "fault_injector"


def _int_set(name: str, values: Iterable[int] | None, *, allow_none: bool) -> frozenset[int] | None:
    if values is None:
        if allow_none:
            return None
        raise GuardConfigError(f"`{name}` must be a list of ints, got None")
    if isinstance(values, int | bool):
        raise GuardConfigError(f"`{name}` must be a list of ints, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise GuardConfigError(f"`{name}` must hold ints >= 0, got {v!r}")
        out.append(v)
    return frozenset(out)


#: size of dim 0 of the first tensor in a batch (the same rule OOMGuard splits by); -1 if none
batch_size_of = batch_size


def _first_float_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch if batch.is_floating_point() and batch.numel() > 0 else None
    if isinstance(batch, dict):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, list | tuple):
        items = batch
    else:
        items = ()
    for item in items:
        t = _first_float_tensor(item)
        if t is not None:
            return t
    return None


class FaultInjector(Callback):
    """Base class: step and rank selection, and the ``INJECTED`` event.

    Args:
        steps: optimizer steps (``trainer.global_step``) at which to inject.
        ranks: global ranks on which to inject; None for every rank.
    """

    kind = "fault"

    def __init__(self, steps: Sequence[int], ranks: Sequence[int] | None = None) -> None:
        super().__init__()
        self.steps = _int_set("steps", steps, allow_none=False) or frozenset()
        self.ranks = _int_set("ranks", ranks, allow_none=True)
        self.injected: list[int] = []  # global steps at which this rank injected

    @property
    @override
    def state_key(self) -> str:
        # several injectors of one type may share a Trainer (e.g. NaN at one step, inf at another)
        return self._generate_state_key(kind=self.kind, steps=sorted(self.steps), ranks=sorted(self.ranks or []))

    def _active(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking or trainer.global_step not in self.steps:
            return False
        return self.ranks is None or trainer.global_rank in self.ranks

    def _report(self, trainer: pl.Trainer, message: str, **data: Any) -> None:
        self.injected.append(int(trainer.global_step))
        emit(
            trainer,
            GuardEvent.at(trainer, GUARD, self.kind, severity="warning", message=f"INJECTED {message}", data=data),
        )

    def _wrap_training_step(self, pl_module: pl.LightningModule, transform: Callable[[Any, Any], Any]) -> None:
        original = pl_module.training_step
        if getattr(original, "_lightning_guard_wrapped_by", None) is self:
            return

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            batch = args[0] if args else kwargs.get("batch")
            return transform(out, batch)

        wrapped._lightning_guard_wrapped_by = self  # type: ignore[attr-defined]
        wrapped._lightning_guard_original = original  # type: ignore[attr-defined]
        pl_module.training_step = wrapped  # type: ignore[method-assign]

    @staticmethod
    def _unwrap_training_step(pl_module: pl.LightningModule) -> None:
        step = pl_module.__dict__.get("training_step")
        if step is not None and hasattr(step, "_lightning_guard_original"):
            del pl_module.__dict__["training_step"]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap_training_step(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"injected": list(self.injected)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.injected = list(state_dict.get("injected", []))


def _map_loss(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, dict) and "loss" in out:
        return {**out, "loss": fn(out["loss"])}
    return out


class InjectNaN(FaultInjector):
    """Put a non-finite value into the batch, the loss or the gradients at chosen steps and ranks.

    Args:
        target: ``"batch"`` (first element of the first float tensor of the batch, in place), ``"loss"`` (the
            loss returned by ``training_step``) or ``"grad"`` (first element of the first gradient, in
            ``on_after_backward``, i.e. before AMP unscaling).
        steps: optimizer steps at which to inject.
        ranks: ranks on which to inject (None: all).
        value: the value injected: ``nan`` (default), ``inf`` or ``-inf``.

    Raises:
        GuardConfigError: an unknown target, a finite value, or bad steps/ranks.

    Example:
        >>> InjectNaN("loss", steps=[3], ranks=[1]).ranks
        frozenset({1})
    """

    TARGETS = ("batch", "loss", "grad")

    def __init__(
        self,
        target: Literal["batch", "loss", "grad"] = "loss",
        steps: Sequence[int] = (0,),
        ranks: Sequence[int] | None = None,
        value: float = float("nan"),
    ) -> None:
        super().__init__(steps, ranks)
        if target not in self.TARGETS:
            raise GuardConfigError(f"`target` must be one of {self.TARGETS}, got {target!r}")
        if not isinstance(value, int | float) or math.isfinite(value):
            raise GuardConfigError(f"`value` must be nan, inf or -inf, got {value!r}")
        self.target = target
        self.value = float(value)
        self.kind = f"nan_{target}"

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.target == "loss":

            def transform(out: Any, batch: Any) -> Any:
                if not self._active(trainer):
                    return out
                self._report(trainer, f"{self.value} into the loss", value=self.value)
                return _map_loss(out, lambda loss: loss * float("nan") if math.isnan(self.value) else loss + self.value)

            self._wrap_training_step(pl_module, transform)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.target != "batch" or not self._active(trainer):
            return
        t = _first_float_tensor(batch)
        if t is None:
            raise GuardConfigError("InjectNaN(target='batch') found no floating-point tensor in the batch")
        with torch.no_grad():
            t.view(-1)[0] = self.value
        self._report(trainer, f"{self.value} into the batch", value=self.value, batch_idx=batch_idx)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.target != "grad" or not self._active(trainer):
            return
        for p in pl_module.parameters():
            if p.grad is not None:
                with torch.no_grad():
                    p.grad.view(-1)[0] = self.value
                self._report(trainer, f"{self.value} into a gradient", value=self.value)
                return


class LossSpike(FaultInjector):
    """Multiply the training loss by ``factor`` at chosen steps and ranks (its gradients scale with it).

    Args:
        factor: multiplier of the loss (> 0). Default ``1000``.
        steps: optimizer steps at which to inject.
        ranks: ranks on which to inject (None: all).

    Example:
        >>> LossSpike(factor=50.0, steps=[10]).factor
        50.0
    """

    kind = "loss_spike"

    def __init__(self, factor: float = 1000.0, steps: Sequence[int] = (0,), ranks: Sequence[int] | None = None) -> None:
        super().__init__(steps, ranks)
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0 or math.isinf(factor):
            raise GuardConfigError(f"`factor` must be a finite number > 0, got {factor!r}")
        self.factor = float(factor)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def transform(out: Any, batch: Any) -> Any:
            if not self._active(trainer):
                return out
            self._report(trainer, f"loss x{self.factor}", factor=self.factor)
            return _map_loss(out, lambda loss: loss * self.factor)

        self._wrap_training_step(pl_module, transform)


class LRSpike(FaultInjector):
    """Multiply every learning rate by ``factor`` for the optimizer steps in ``steps`` (all ranks).

    The spike goes through the guard runtime's step-scoped LR scale, so it composes with any LR schedule and is
    undone right after the step. Ranks must not differ here (the weights would diverge), so there is no ``ranks``.

    Args:
        factor: LR multiplier (> 0). Default ``1000``.
        steps: optimizer steps at which the LR is spiked.

    Example:
        >>> LRSpike(factor=1000.0, steps=[5]).steps
        frozenset({5})
    """

    kind = "lr_spike"

    def __init__(self, factor: float = 1000.0, steps: Sequence[int] = (0,)) -> None:
        super().__init__(steps, None)
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0 or math.isinf(factor):
            raise GuardConfigError(f"`factor` must be a finite number > 0, got {factor!r}")
        self.factor = float(factor)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_guard._runtime import get_runtime

        runtime = get_runtime(trainer)
        if not runtime._optimizers:  # no guard callback attached the runtime: do it here
            runtime.attach(list(trainer.optimizers))

    @staticmethod
    def _without_guard(trainer: pl.Trainer) -> bool:
        from lightning_guard.callbacks._base import GuardCallback

        return not any(isinstance(c, GuardCallback) for c in trainer.callbacks)  # type: ignore[attr-defined]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        from lightning_guard._runtime import get_runtime

        if self._without_guard(trainer):
            get_runtime(trainer).after_batch()  # no guard resolves the step: restore an LR the step never used

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        from lightning_guard._runtime import get_runtime

        runtime = get_runtime(trainer)
        if self._without_guard(trainer):
            runtime.before_optimizer_step(optimizer)  # otherwise the owning guard marks the step
        idx = runtime.optimizer_index(optimizer)
        if self._active(trainer):
            runtime.set_lr_scale(idx, self.factor, source="lr_spike")
            self._report(trainer, f"LR x{self.factor} for one step", factor=self.factor)
        else:
            runtime.set_lr_scale(idx, 1.0, source="lr_spike")


class SimulatedOOM(FaultInjector):
    """Raise ``torch.cuda.OutOfMemoryError`` when a training micro-batch is larger than ``max_batch_size``.

    The error carries a CUDA-like message (``CUDA out of memory. Tried to allocate ...``) ending in
    ``(simulated by lightning_guard)``, so OOM handlers recognise it while logs show it was simulated.

    Args:
        max_batch_size: the largest micro-batch that "fits".
        where: ``"forward"`` (raised in ``training_step``) or ``"backward"`` (raised during backward, outside
            ``training_step``, as a real backward OOM is).
        ranks: ranks on which memory runs out (None: all).
        steps: optimizer steps at which it can happen (None: every step).

    Example:
        >>> SimulatedOOM(max_batch_size=16, where="backward", ranks=[1]).where
        'backward'
    """

    WHERE = ("forward", "backward")
    kind = "simulated_oom"

    def __init__(
        self,
        max_batch_size: int,
        where: Literal["forward", "backward"] = "forward",
        ranks: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
    ) -> None:
        super().__init__((), ranks)
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0:
            raise GuardConfigError(f"`max_batch_size` must be an int >= 0, got {max_batch_size!r}")
        if where not in self.WHERE:
            raise GuardConfigError(f"`where` must be one of {self.WHERE}, got {where!r}")
        self.max_batch_size = max_batch_size
        self.where = where
        self.only_steps = _int_set("steps", steps, allow_none=True)
        self.seen_sizes: list[int] = []  # micro-batch sizes seen by training_step on this rank

    def _active(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if self.only_steps is not None and trainer.global_step not in self.only_steps:
            return False
        return self.ranks is None or trainer.global_rank in self.ranks

    def _error(self, size: int) -> torch.cuda.OutOfMemoryError:
        return torch.cuda.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB: micro-batch of {size} > {self.max_batch_size} "
            "(simulated by lightning_guard)"
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def transform(out: Any, batch: Any) -> Any:
            size = batch_size_of(batch)
            self.seen_sizes.append(size)
            if size <= self.max_batch_size or not self._active(trainer):
                return out
            self._report(trainer, f"out of memory in {self.where} at micro-batch {size}", size=size, where=self.where)
            if self.where == "forward":
                raise self._error(size)
            return _map_loss(out, lambda loss: _RaiseInBackward.apply(loss, self._error(size)))

        self._wrap_training_step(pl_module, transform)


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, error: BaseException) -> torch.Tensor:
        ctx.error = error
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        raise ctx.error
