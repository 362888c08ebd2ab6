"""Fault injectors: chaos-test your own training the way lightning_guard tests itself.

Each injector is an ordinary Lightning callback that imitates one real fault at the place it really happens: an
out-of-memory error from inside the module's forward (or half-way through its backward), a non-finite value in the
batch, the loss or one parameter's gradient (during backward, before AMP unscaling), a loss spike, a learning-rate
spike, a loss-scale overflow under ``16-mixed``. Each class docstring says what real failure it imitates and where it
differs from it.

Every injector acts only in training steps (``SimulatedOOM`` can also act in validation, test or predict steps),
never during the sanity check, while ``trainer.global_step`` is in ``steps`` (every micro-batch of that optimizer step
under gradient accumulation) and only on the given ``ranks`` (all when None). It reports every injection as a
``warning`` event of guard ``fault_injector`` whose message starts with ``INJECTED``, so an injected fault is never
mistaken for a real one in the logs.

Hooks on modules and parameters are registered in the process that trains (``on_train_start`` and the like, which
run in the ``ddp_spawn`` workers), never in ``__init__``, and removed when that stage ends, at ``teardown`` and when
fit fails. A copy of the module made while they are registered (``copy.deepcopy``, ``pickle``) gets inert hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_guard._runtime import get_runtime
from lightning_guard._sharded import local
from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.errors import GuardConfigError
from lightning_guard.testing.base import (
    GUARD as GUARD,  # the event guard name of every injector (public before the split)
)
from lightning_guard.testing.base import (
    FaultInjector,
    _check_factor,
    _check_name,
    _first_float_tensor,
    _Hook,
    _resolve_module,
    batch_size_of,
)
from lightning_guard.testing.simulated_oom import SimulatedOOM

__all__ = [
    "FaultInjector",
    "InjectNaN",
    "LRSpike",
    "LossSpike",
    "ScaleOverflow",
    "SimulatedOOM",
    "batch_size_of",
]


def _poison(loss: torch.Tensor, value: float) -> torch.Tensor:
    """``value`` in the forward, ``value x d(loss)`` in the backward: non-finite gradients, as a real one gives."""
    return (loss - loss.detach() + 1.0) * value


def _map_loss(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, dict) and "loss" in out:
        return {**out, "loss": fn(out["loss"])}
    return out


class InjectNaN(FaultInjector):
    """Put a non-finite value into the batch, the loss or one parameter's gradient at chosen steps and ranks.

    **batch** — Imitates: a corrupt sample (a NaN/Inf feature from a broken file, a division by zero in
    preprocessing) that propagates through forward into the loss, the logged metrics and every gradient. Differs from
    the real fault: the value is written in place into the first element of the first floating-point tensor of the
    collated batch in ``on_train_batch_start``, so callbacks listed before the injector see the batch clean. In place
    means the source too when the loader hands out stored tensors rather than fresh collated copies (a dataset of
    pre-made batches with ``batch_size=None``): the corrupt value then stays there for the following epochs, as a
    corrupt file would.

    **loss** — Imitates: a non-finite loss (``log(0)``, an fp16 overflow in the loss) whose backward gives non-finite
    gradients to every parameter the loss depends on. Differs from the real fault: the value is put into the loss
    ``training_step`` returns (that is where Lightning and the guards observe the loss), not into the forward, so what
    ``training_step`` logged itself (``self.log("train_loss", loss)``) stays finite; for a NaN that arises inside
    forward and reaches everything, use ``"batch"``.

    **grad** — Imitates: a non-finite gradient produced during backward (an overflowing activation gradient, a
    ``sqrt``/``norm`` at 0) in one parameter. It is written by a ``post_accumulate_grad`` hook of the parameter
    ``param`` (the first element of its gradient) while backward runs: before DDP's all-reduce (which spreads it to
    every rank, as it spreads a real one), before AMP unscaling (the GradScaler finds it and skips the step) and
    before ``on_before_optimizer_step``. Differs from the real fault: exactly one element of one parameter's
    gradient is hit, and the gradients of the other parameters stay as computed (a real overflow usually spreads
    through every earlier layer).

    Args:
        target: ``"batch"``, ``"loss"`` (default) or ``"grad"``, see above.
        steps: optimizer steps at which to inject. Default ``(0,)``.
        ranks: ranks on which to inject (None: all).
        value: the value injected: ``nan`` (default), ``inf`` or ``-inf``.
        param: ``target="grad"`` only: the name of the parameter (as ``named_parameters()`` gives it) whose gradient
            is hit; None (default) for the first parameter that requires a gradient.

    Raises:
        GuardConfigError: an unknown target, a finite value, a ``param`` that is not a string or is given for a
            target other than ``"grad"``, bad steps/ranks; at train start, a ``param`` the module does not have or
            that requires no gradient, and ``"batch"`` on a batch without a floating-point tensor.

    Example:
        >>> inj = InjectNaN("grad", steps=[3], ranks=[1], param="net.2.bias", value=float("inf"))
        >>> inj.kind, inj.param, sorted(inj.steps), inj.ranks
        ('nan_grad', 'net.2.bias', [3], frozenset({1}))
    """

    TARGETS = ("batch", "loss", "grad")

    def __init__(
        self,
        target: Literal["batch", "loss", "grad"] = "loss",
        steps: Sequence[int] = (0,),
        ranks: Sequence[int] | None = None,
        value: float = float("nan"),
        param: str | None = None,
    ) -> None:
        super().__init__(steps, ranks)
        if target not in self.TARGETS:
            raise GuardConfigError(f"`target` must be one of {self.TARGETS}, got {target!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isfinite(value):
            raise GuardConfigError(f"`value` must be nan, inf or -inf, got {value!r}")
        _check_name("param", param)
        if param is not None and target != "grad":
            raise GuardConfigError(f"`param` applies to target='grad' only, got param={param!r} with target={target!r}")
        self.target = target
        self.value = float(value)
        self.param = param
        self.kind = f"nan_{target}"

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.target == "loss":
            value = self.value

            def transform(out: Any, batch: Any) -> Any:
                if not self._active(trainer):
                    return out
                self._report(trainer, f"{value} into the loss", value=value)
                return _map_loss(out, lambda loss: _poison(loss, value))

            self._wrap_training_step(pl_module, transform)
        elif self.target == "grad" and "train" not in self._handles:
            name, param = self._resolve_param(pl_module)

            def inject(p: torch.Tensor) -> None:
                if p.grad is None or not self._active(trainer):
                    return
                grad = local(p.grad)  # a sharded (FSDP2) gradient: this rank's shard, no collective
                if grad.numel() == 0:
                    return
                with torch.no_grad():
                    grad.view(-1)[0] = self.value
                self._report(trainer, f"{self.value} into the gradient of {name!r}", value=self.value, param=name)

            self._keep("train", param.register_post_accumulate_grad_hook(_Hook(inject)))

    def _resolve_param(self, pl_module: pl.LightningModule) -> tuple[str, torch.nn.Parameter]:
        params = dict(pl_module.named_parameters())
        if self.param is None:
            for name, p in params.items():
                if p.requires_grad:
                    return name, p
            raise GuardConfigError(
                f"InjectNaN(target='grad') found no parameter that requires a gradient in {type(pl_module).__name__}"
            )
        if self.param not in params:
            raise GuardConfigError(
                f"`param` {self.param!r} is not a parameter of {type(pl_module).__name__}; parameters: "
                f"{list(params)[:8]}"
            )
        p = params[self.param]
        if not p.requires_grad:
            raise GuardConfigError(f"`param` {self.param!r} does not require a gradient: it never gets one")
        return self.param, p

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


class LossSpike(FaultInjector):
    """Multiply the training loss by ``factor`` at chosen steps and ranks (its gradients scale with it).

    Imitates: a loss spike, one batch whose loss is far above its neighbours' (a hard or mislabelled batch, a
    numerically unstable layer), so that its gradients are ``factor`` times too large. Differs from the real fault:
    the loss ``training_step`` returns is scaled as a whole, so every gradient is scaled by the same factor and keeps
    its direction (a real spike comes from a few samples or layers and also turns the gradient); what
    ``training_step`` logged itself is not scaled.

    Args:
        factor: multiplier of the loss (> 0). Default ``1000``.
        steps: optimizer steps at which to inject. Default ``(0,)``.
        ranks: ranks on which to inject (None: all).

    Raises:
        GuardConfigError: a factor that is not a finite number > 0, bad steps/ranks.

    Example:
        >>> LossSpike(factor=50.0, steps=[10]).factor
        50.0
    """

    kind = "loss_spike"

    def __init__(self, factor: float = 1000.0, steps: Sequence[int] = (0,), ranks: Sequence[int] | None = None) -> None:
        super().__init__(steps, ranks)
        self.factor = _check_factor(factor)

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

    Imitates: a bad learning-rate schedule for one step, such as a warmup misconfigured to start at the peak LR, a
    scheduler stepped per epoch where it should step per batch, or a unit slip in a learning rate: the update of that
    step is ``factor`` times too large. Differs from the real fault: the spike lasts exactly the steps in ``steps``
    and is undone right after each (a real bad schedule usually lasts for many steps), and it hits every parameter
    group of every optimizer alike.

    The spike goes through the guard runtime's step-scoped LR scale, so it composes with any LR schedule and the
    scheduled LR is restored right after the step. Ranks must not differ here (the weights would diverge), so there
    is no ``ranks``.

    Args:
        factor: LR multiplier (> 0). Default ``1000``.
        steps: optimizer steps at which the LR is spiked. Default ``(0,)``.

    Raises:
        GuardConfigError: a factor that is not a finite number > 0, bad steps.

    Example:
        >>> LRSpike(factor=1000.0, steps=[5]).steps
        frozenset({5})
    """

    kind = "lr_spike"

    def __init__(self, factor: float = 1000.0, steps: Sequence[int] = (0,)) -> None:
        super().__init__(steps, None)
        self.factor = _check_factor(factor)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        runtime = get_runtime(trainer)
        if not runtime._optimizers:  # no guard callback attached the runtime: do it here
            runtime.attach(list(trainer.optimizers))

    @staticmethod
    def _without_guard(trainer: pl.Trainer) -> bool:
        return not any(isinstance(c, GuardCallback) for c in trainer.callbacks)  # type: ignore[attr-defined]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._without_guard(trainer):
            get_runtime(trainer).after_batch()  # no guard resolves the step: restore an LR the step never used

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        runtime = get_runtime(trainer)
        if self._without_guard(trainer):
            runtime.before_optimizer_step(optimizer)  # otherwise the owning guard marks the step
        idx = runtime.optimizer_index(optimizer)
        if self._active(trainer):
            runtime.set_lr_scale(idx, self.factor, source="lr_spike")
            self._report(trainer, f"LR x{self.factor} for one step", factor=self.factor)
        else:
            runtime.set_lr_scale(idx, 1.0, source="lr_spike")


def _scaler_of(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled():
        return scaler
    return None


class ScaleOverflow(FaultInjector):
    """Make a mixed-precision step overflow under loss scaling, so that the GradScaler itself skips it.

    Imitates: a loss-scale overflow under ``16-mixed``: the scaled gradient exceeds the fp16 range during backward and
    becomes ``inf``; ``GradScaler.unscale_`` finds it (``found_inf``), ``GradScaler.step`` skips the optimizer step
    and ``GradScaler.update`` halves the scale (``backoff_factor``) and restarts its growth count. The ``inf`` is
    written by a tensor hook into the gradient arriving at the output of ``module`` (default: the last leaf module
    with trainable parameters, the output layer), in the output's dtype (fp16 under autocast) and before unscaling;
    backward then carries it into that module's and every earlier module's parameter gradients. Nothing else is
    touched: the scaler's state is changed by the scaler.

    Differs from the real fault: the overflow is forced at the chosen steps whatever the current scale (a real one
    happens where the scale has grown too large for the gradients), and only one element of the gradient at one
    place is ``inf`` (a real overflow hits every element beyond the fp16 range). Under DDP it reaches every rank through
    the all-reduce, as a real one does.

    Args:
        steps: optimizer steps that overflow. Default ``(0,)``.
        ranks: ranks on which the gradient overflows (None: all); the all-reduce spreads it to the others.
        module: dotted name of the submodule at whose output the gradient overflows (``""``: the LightningModule's
            own output); None (default) for the last leaf module with trainable parameters.

    Raises:
        GuardConfigError: bad steps/ranks or a ``module`` that is not a string; at setup, a precision without a
            GradScaler (``32-true``, ``bf16-mixed``, ...); at train start, a ``module`` the model does not have.

    Example:
        >>> inj = ScaleOverflow(steps=[3], module="net.2")
        >>> inj.kind, sorted(inj.steps), inj.module
        ('scale_overflow', [3], 'net.2')
    """

    kind = "scale_overflow"

    def __init__(
        self, steps: Sequence[int] = (0,), ranks: Sequence[int] | None = None, module: str | None = None
    ) -> None:
        super().__init__(steps, ranks)
        _check_name("module", module)
        self.module = module

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or _scaler_of(trainer) is not None:
            return
        plugin = trainer.precision_plugin
        raise GuardConfigError(
            f"ScaleOverflow needs loss scaling with a GradScaler, and precision {plugin.precision!r} "
            f"({type(plugin).__name__}) has none: use precision='16-mixed' on CUDA, or on CPU "
            "plugins=[MixedPrecision('16-mixed', 'cpu', scaler=torch.amp.GradScaler('cpu'))]"
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "train" in self._handles:
            return
        name, target = _resolve_module(pl_module, self.module, lambda n: n - 1, "ScaleOverflow")

        def after_forward(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if module is not target or not self._active(trainer):
                return
            out = _first_float_tensor(output, requires_grad=True)
            if out is None:
                return

            def overflow(grad: torch.Tensor) -> torch.Tensor:
                scaler = _scaler_of(trainer)
                scale = scaler.get_scale() if scaler is not None else 1.0
                grad = grad.clone(memory_format=torch.contiguous_format)
                grad.view(-1)[0] = float("inf")
                self._report(
                    trainer,
                    f"inf into the {grad.dtype} gradient at the output of {name!r} (loss-scale overflow)",
                    module=name,
                    scale=scale,
                    dtype=str(grad.dtype),
                )
                return grad

            out.register_hook(_Hook(overflow))

        self._keep("train", target.register_forward_hook(_Hook(after_forward)))
