"""The base of every fault injector: step and rank selection, the ``INJECTED`` event, the hooks' lifetime.

See :mod:`lightning_guard.testing.injectors` for the injectors themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_guard._runtime import EventCarrier, emit, event_stream, events_carrier, sync_events
from lightning_guard._wrapping import wraps_method
from lightning_guard.errors import GuardConfigError
from lightning_guard.events import GuardEvent
from lightning_guard.functional.oom import batch_size

__all__ = ["FaultInjector", "batch_size_of"]

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
    #: without a guard in the callback list, the first injector carries the other ranks' events to rank 0
    carries_events = EventCarrier.INJECTOR

    def _sync_events(self, trainer: pl.Trainer) -> None:
        if events_carrier(trainer) is self:
            sync_events(trainer)  # a collective: every rank has the same callbacks and reaches it

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
        if events_carrier(trainer) is self:
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
