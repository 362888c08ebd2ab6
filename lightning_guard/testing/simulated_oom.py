"""SimulatedOOM: an out-of-memory error raised inside the model, as the CUDA allocator raises it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_guard.errors import GuardConfigError
from lightning_guard.testing.base import (
    FaultInjector,
    _check_name,
    _first_float_tensor,
    _Hook,
    _input_size,
    _int_set,
    _resolve_module,
)

__all__ = ["SimulatedOOM"]

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

    @property
    @override
    def state_key(self) -> str:
        # two of them may share a Trainer (out of memory in forward at one step, in backward at another)
        steps = sorted(self.only_steps) if self.only_steps is not None else None
        return self._generate_state_key(
            kind=self.kind,
            max_batch_size=self.max_batch_size,
            where=self.where,
            steps=steps,
            ranks=sorted(self.ranks or []),
            module=self.module,
            stages=list(self.stages),
        )

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
