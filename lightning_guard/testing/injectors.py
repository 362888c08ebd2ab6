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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_guard._runtime import emit, event_stream, get_runtime
from lightning_guard._wrapping import wraps_method
from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.errors import GuardConfigError
from lightning_guard.events import GuardEvent
from lightning_guard.functional.oom import batch_size

__all__ = [
    "FaultInjector",
    "InjectNaN",
    "LRSpike",
    "LossSpike",
    "ScaleOverflow",
    "SimulatedOOM",
    "batch_size_of",
]

GUARD = "fault_injector"
_WRAPPED_BY = "_lightning_guard_wrapped_by"
_ORIGINAL = "_lightning_guard_original"


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


def _check_name(arg: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise GuardConfigError(f"`{arg}` must be a dotted name (str) or None, got {value!r}")


def _check_factor(factor: Any) -> float:
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not factor > 0 or math.isinf(factor):
        raise GuardConfigError(f"`factor` must be a finite number > 0, got {factor!r}")
    return float(factor)


#: size of dim 0 of the first tensor in a batch (the same rule OOMGuard splits by); -1 if none
batch_size_of = batch_size


def _first_float_tensor(batch: Any, *, requires_grad: bool = False) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        ok = batch.is_floating_point() and batch.numel() > 0 and (batch.requires_grad or not requires_grad)
        return batch if ok else None
    if isinstance(batch, dict):
        items: Iterable[Any] = batch.values()
    elif isinstance(batch, list | tuple):
        items = batch
    else:
        items = ()
    for item in items:
        t = _first_float_tensor(item, requires_grad=requires_grad)
        if t is not None:
            return t
    return None


def _input_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    size = batch_size_of(args)
    return size if size >= 0 else batch_size_of(kwargs)


def _inert_hook(*args: Any) -> None:
    """What a copied module's hook becomes: does nothing."""


def _make_inert() -> Callable[..., None]:
    return _inert_hook


class _Hook:
    """A module/tensor hook bound to the injector that registered it; a deep copy or a pickle of it is inert.

    So a module copied while the hooks are registered (an EMA copy, a compression clone, ``torch.save(module)``)
    neither injects faults nor drags the injector and the trainer along.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __reduce__(self) -> tuple[Callable[[], Callable[..., None]], tuple[()]]:
        return (_make_inert, ())


def _leaf_modules_with_params(pl_module: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Leaf modules holding a trainable parameter, in registration (``named_modules``) order."""
    return [
        (name, m)
        for name, m in pl_module.named_modules()
        if not any(True for _ in m.children()) and any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def _resolve_module(
    pl_module: pl.LightningModule, name: str | None, pick: Callable[[int], int], owner: str
) -> tuple[str, torch.nn.Module]:
    leaves = _leaf_modules_with_params(pl_module)
    if name is None:
        if not leaves:
            raise GuardConfigError(
                f"{owner} found no module with trainable parameters in {type(pl_module).__name__} to hook; "
                "pass `module` (the dotted name of a submodule, '' for the LightningModule itself)"
            )
        return leaves[pick(len(leaves))]
    try:
        return name, pl_module.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in leaves][:8]
        raise GuardConfigError(
            f"`module` {name!r} is not a submodule of {type(pl_module).__name__}; modules with trainable "
            f"parameters: {names}"
        ) from None


class FaultInjector(Callback):
    """Base class: step and rank selection, the ``INJECTED`` event, and the hooks' lifetime.

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
        self._handles: dict[str, list[RemovableHandle]] = {}

    @property
    @override
    def state_key(self) -> str:
        # several injectors of one type may share a Trainer (e.g. NaN at one step, inf at another)
        return self._generate_state_key(kind=self.kind, steps=sorted(self.steps), ranks=sorted(self.ranks or []))

    def _active(self, trainer: pl.Trainer) -> bool:
        if not trainer.training or trainer.sanity_checking or trainer.global_step not in self.steps:
            return False
        return self.ranks is None or trainer.global_rank in self.ranks

    def _report(self, trainer: pl.Trainer, message: str, **data: Any) -> None:
        self.injected.append(int(trainer.global_step))
        emit(
            trainer,
            GuardEvent.at(trainer, GUARD, self.kind, severity="warning", message=f"INJECTED {message}", data=data),
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a reused injector starts each fit as a fresh one (a resumed fit reloads its state)
            self._reset_for_fit()

    def _reset_for_fit(self) -> None:
        self.injected = []

    # ------------------------------------------------------------------ hooks
    def _keep(self, stage: str, handle: RemovableHandle) -> None:
        self._handles.setdefault(stage, []).append(handle)

    def _remove_hooks(self, stage: str | None = None) -> None:
        for key in [stage] if stage is not None else list(self._handles):
            for handle in self._handles.pop(key, []):
                handle.remove()

    def _wrap_training_step(self, pl_module: pl.LightningModule, transform: Callable[[Any, Any], Any]) -> None:
        """Wrap ``training_step`` to transform what it returns, keeping the user's signature.

        Lightning reads ``training_step.__wrapped__`` (one level) to decide whether to pass ``batch_idx``, so
        ``__wrapped__`` points at the user's own method even when several injectors wrap it.
        """
        original = pl_module.training_step
        if getattr(original, _WRAPPED_BY, None) is self:
            return

        @wraps_method(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            batch = args[0] if args else kwargs.get("batch")
            return transform(out, batch)

        setattr(wrapped, _WRAPPED_BY, self)
        setattr(wrapped, _ORIGINAL, original)
        pl_module.training_step = wrapped  # type: ignore[method-assign]

    @staticmethod
    def _unwrap_training_step(pl_module: pl.LightningModule) -> None:
        step = pl_module.__dict__.get("training_step")
        if step is not None and hasattr(step, _ORIGINAL):
            del pl_module.__dict__["training_step"]

    # ------------------------------------------------------------------ events of other ranks
    def _owns_events(self, trainer: pl.Trainer) -> bool:
        """Without a guard, the first injector carries the other ranks' events to rank 0 (a guard does it otherwise)."""
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, GuardCallback):
                return False
            if isinstance(cb, FaultInjector):
                return cb is self
        return False

    def _sync_events(self, trainer: pl.Trainer) -> None:
        if trainer.world_size > 1 and self._owns_events(trainer):
            event_stream(trainer).exchange()  # a collective: every rank has the same callbacks and reaches it

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_events(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync_events(trainer)

    # ------------------------------------------------------------------ end of a stage, of fit
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks("train")  # before on_fit_end, where other callbacks may copy or export the module

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._unwrap_training_step(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()  # Lightning calls no teardown when fit fails
        self._unwrap_training_step(pl_module)
        if self._owns_events(trainer):
            event_stream(trainer).dump_outbox()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"injected": list(self.injected)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.injected = list(state_dict.get("injected", []))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # hooks belong to the process that registered them
        return state


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
                with torch.no_grad():
                    p.grad[(0,) * p.grad.dim()] = self.value
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


_StageName = Literal["train", "validate", "test", "predict"]


class SimulatedOOM(FaultInjector):
    """Raise ``torch.cuda.OutOfMemoryError`` inside the model when a micro-batch is larger than ``max_batch_size``.

    Imitates: the CUDA caching allocator running out of memory for the activations of a micro-batch that is too
    large, at the place it happens:

    * ``where="forward"``: from a forward pre-hook of ``module`` (default: the first leaf module with trainable
      parameters), so the error leaves the model's forward before that module computes and nothing after the forward
      call in ``training_step`` runs (no ``self.log``, no metric update, no loss);
    * ``where="backward"``: half-way through backward, when the gradient reaches the output of ``module`` (default:
      the middle one of the leaf modules with trainable parameters, the first layer of a two-layer MLP). At that
      moment the parameters of the modules that run after ``module`` in forward already have their gradients (and
      under DDP some of their buckets may have been all-reduced), while ``module``'s own parameters and those of
      every module before it have none, as after a real OOM in backward.

    The size that decides is dim 0 of the first tensor reaching ``module`` (its input), which is what a real OOM
    depends on, not the size of the DataLoader batch. The error carries a CUDA-like message (``CUDA out of memory.
    Tried to allocate ...``) ending in ``(simulated by lightning_guard)``, so OOM handlers recognise it while logs show
    it was simulated.

    Differs from the real fault: no memory is allocated, so memory figures do not move and an OOM handler's clean-up
    has nothing to free; memory is a sharp threshold on the micro-batch size (a real limit also depends on sequence
    length, dtype, fragmentation and what else is alive); it is raised on CPU too; a ``module`` called several times
    per step is checked at each call.

    Args:
        max_batch_size: the largest micro-batch that "fits".
        where: ``"forward"`` (default) or ``"backward"``, see above.
        ranks: ranks on which memory runs out (None: all).
        steps: optimizer steps at which it can happen (None, default: every step).
        module: dotted name of the submodule at which memory runs out (``""``: the LightningModule itself, whose
            hook fires only when ``training_step`` calls ``self(...)``); None for the default of ``where``.
        stages: the loops in which memory runs out: any of ``"train"`` (default), ``"validate"``, ``"test"``,
            ``"predict"``; the sanity check never.

    Attributes:
        seen_sizes: on this rank, the sizes of the micro-batches that reached ``module`` in ``stages``, in order
            (including those that ran out of memory).

    Raises:
        GuardConfigError: a ``max_batch_size`` that is not an int >= 0, an unknown ``where`` or stage, a ``module``
            that is not a string, bad steps/ranks; at the start of a stage, a ``module`` the model does not have,
            and in backward mode, a ``module`` whose output needs no gradient.

    Example:
        >>> oom = SimulatedOOM(max_batch_size=16, where="backward", ranks=[1], module="net.0")
        >>> oom.where, oom.module, oom.stages, oom.seen_sizes
        ('backward', 'net.0', ('train',), [])
        >>> from lightning_guard.functional import is_oom_error
        >>> err = oom._error(32, "net.0")
        >>> is_oom_error(err), str(err).endswith("(simulated by lightning_guard)")
        (True, True)
    """

    WHERE = ("forward", "backward")
    STAGES = ("train", "validate", "test", "predict")
    kind = "simulated_oom"

    def __init__(
        self,
        max_batch_size: int,
        where: Literal["forward", "backward"] = "forward",
        ranks: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
        module: str | None = None,
        stages: Sequence[_StageName] = ("train",),
    ) -> None:
        super().__init__((), ranks)
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 0:
            raise GuardConfigError(f"`max_batch_size` must be an int >= 0, got {max_batch_size!r}")
        if where not in self.WHERE:
            raise GuardConfigError(f"`where` must be one of {self.WHERE}, got {where!r}")
        _check_name("module", module)
        if isinstance(stages, str) or not isinstance(stages, Sequence) or not stages:
            raise GuardConfigError(f"`stages` must be a non-empty list of {self.STAGES}, got {stages!r}")
        for stage in stages:
            if stage not in self.STAGES:
                raise GuardConfigError(f"`stages` must hold values of {self.STAGES}, got {stage!r}")
        self.max_batch_size = max_batch_size
        self.where = where
        self.only_steps = _int_set("steps", steps, allow_none=True)
        self.module = module
        self.stages: tuple[str, ...] = tuple(dict.fromkeys(stages))
        self.seen_sizes: list[int] = []

    @override
    def _reset_for_fit(self) -> None:
        super()._reset_for_fit()
        self.seen_sizes = []

    def _active(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if self.only_steps is not None and trainer.global_step not in self.only_steps:
            return False
        return self.ranks is None or trainer.global_rank in self.ranks

    def _error(self, size: int, module: str) -> torch.cuda.OutOfMemoryError:
        return torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB: micro-batch of "
            f"{size} > {self.max_batch_size} in the {self.where} of module {module!r} (simulated by lightning_guard)"
        )

    def _install(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage not in self.stages or stage in self._handles:
            return
        pick: Callable[[int], int] = (lambda n: 0) if self.where == "forward" else (lambda n: (n - 1) // 2)
        name, target = _resolve_module(pl_module, self.module, pick, "SimulatedOOM")
        self._target = name

        def in_stage(module: torch.nn.Module) -> bool:
            current = trainer.state.stage
            return module is target and current is not None and current.value == stage

        def check(size: int) -> bool:
            self.seen_sizes.append(size)
            return size > self.max_batch_size and self._active(trainer)

        def report(size: int) -> None:
            self._report(
                trainer,
                f"out of memory in the {self.where} of {name!r} at micro-batch {size}",
                size=size,
                where=self.where,
                module=name,
                stage=stage,
            )

        if self.where == "forward":

            def before_forward(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                if not in_stage(module):
                    return
                size = _input_size(args, kwargs)
                if check(size):
                    report(size)
                    raise self._error(size, name)

            handle = target.register_forward_pre_hook(_Hook(before_forward), with_kwargs=True)
        else:

            def after_forward(
                module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
            ) -> None:
                if not in_stage(module):
                    return
                size = _input_size(args, kwargs)
                if not check(size):
                    return
                out = _first_float_tensor(output, requires_grad=True)
                if out is None:
                    raise GuardConfigError(
                        f"SimulatedOOM(where='backward'): the output of module {name!r} needs no gradient, so backward "
                        "never reaches it; pass a `module` inside the graph of the loss"
                    )
                error = self._error(size, name)

                def in_backward(grad: torch.Tensor) -> None:
                    report(size)
                    raise error

                out.register_hook(_Hook(in_backward))

            handle = target.register_forward_hook(_Hook(after_forward), with_kwargs=True)
        self._keep(stage, handle)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer, pl_module, "train")
        self._checked = False

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if "train" not in self.stages or getattr(self, "_checked", True):
            return
        self._checked = True
        if not self.seen_sizes:  # a chaos test that injects nothing must not pass
            target = getattr(self, "_target", "")
            raise GuardConfigError(
                f"SimulatedOOM hooks module {target or type(pl_module).__name__!r}, which did not run in the first "
                "training step (training_step computes without calling it, e.g. with parameters directly instead of "
                "self(...)): pass `module=` naming a submodule the step runs"
            )

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer, pl_module, "validate")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks("validate")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer, pl_module, "test")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks("test")

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install(trainer, pl_module, "predict")

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks("predict")


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
