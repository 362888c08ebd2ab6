"""OOMGuard: survive out-of-memory mid-training by re-running the same batch as halved micro-batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from typing_extensions import override

from lightning_guard._agreement import StepVotes
from lightning_guard._checks import check_int
from lightning_guard._compat import should_accumulate
from lightning_guard._fence import AT_STEP, AT_STEP_QUIET, FAILED
from lightning_guard._sharded import can_reset_after_failure
from lightning_guard._state import StateSchema
from lightning_guard._wrapping import wraps_method
from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.callbacks.oom_guard.accumulate import _Accumulation
from lightning_guard.callbacks.oom_guard.common import _EVAL_HOOKS, _MARK, _loss_of, _Retry, _with_loss
from lightning_guard.callbacks.oom_guard.evaluation import _EvalSplitting
from lightning_guard.callbacks.oom_guard.fence import _FenceChannel
from lightning_guard.errors import GuardConfigError
from lightning_guard.functional.oom_policy import SizePolicy

__all__ = ["OOMGuard"]


def _sequences_of_mappings(batch: Any, path: str = "batch") -> str | None:
    """The path of a list/tuple of dicts inside ``batch`` (per-sample items from a custom ``collate_fn``), if any."""
    if isinstance(batch, Mapping):
        items: Any = ((f"{path}[{k!r}]", v) for k, v in batch.items())
    elif isinstance(batch, list | tuple):
        if batch and all(isinstance(v, Mapping) for v in batch):
            return path
        items = ((f"{path}[{i}]", v) for i, v in enumerate(batch))
    else:
        return None
    for sub, value in items:
        found = _sequences_of_mappings(value, sub)
        if found is not None:
            return found
    return None


def _default_split(module: Any) -> bool:
    """True when the module's ``split_batch`` is GuardMixin's default (the functional split), not its own."""
    from lightning_guard.mixin import GuardMixin

    method = getattr(type(module), "split_batch", None)
    return method is GuardMixin.split_batch


class OOMGuard(_Accumulation, _EvalSplitting, GuardCallback):
    r"""Re-run a batch that ran out of memory as halved micro-batches, keeping the effective batch.

    When the forward or the backward of a training step raises out-of-memory (CUDA, ROCm, MPS, XPU, cuDNN/cuBLAS
    workspaces, CPU allocator; see :func:`~lightning_guard.functional.is_oom_error`), the failed attempt is unwound
    out of Lightning's closure so its graph is released, the partial gradients and the GradScaler's per-step state
    are dropped, memory is collected, and the **same** batch is run again as micro-batches of half the size with
    gradient accumulation. Each micro-batch loss is scaled by its share of the batch, so the optimizer receives the
    whole batch's gradient in **exactly one** optimizer step: no batch is dropped or repeated, and the effective
    batch, the data order and the LR schedule are unchanged.

    * The micro-batch size persists (no OOM on every step), is saved in checkpoints (a resumed run starts at it) and,
      with ``grow_after``, is doubled again after that many clean steps; a failed grow-back returns to the size that
      worked and waits twice as long before the next try.
    * Works with an unchanged ``training_step``: tensors, tuples, lists, dicts, namedtuples and dataclasses are split
      along dim 0 (:func:`~lightning_guard.functional.split_batch`). For anything else the module says how to split
      and measure: ``split_batch(batch, micro_batch_size)``, ``batch_samples(batch) -> int`` and, for a loss that is
      not a mean over samples (a token-normalised LM loss), ``loss_weight(batch) -> float`` (the weight of a
      micro-batch's mean loss, e.g. its token count). The first batch is checked: a batch that cannot be measured or
      split safely is refused then, not at the first out-of-memory.
    * A failed attempt leaves no trace: BatchNorm buffers (every persistent buffer), torchmetrics states and the
      values of ``self.log`` are put back as they were before it (anything else: the module's
      ``oom_attempt_state()`` / ``restore_oom_attempt_state(state)``). In micro-batches, ``self.log`` adds up to the
      whole batch: epoch means weigh each micro-batch by its samples and step values are combined by ``reduce_fx``.
    * Validation, test and predict steps that run out of memory are split the same way (no gradients) and their
      outputs recombined (:func:`~lightning_guard.functional.combine_outputs`).
    * DDP: the training step is fenced. Every ``torch.distributed`` collective it issues (``self.log(...,
      sync_dist=True)``, ``self.all_gather``, torchmetrics syncs) is preceded by a small agreement on a dedicated gloo
      group, and one ends the step, so a rank that ran out of memory meets the others before their next collective
      and all abandon the attempt together; one more agreement after backward covers an out-of-memory there (the
      failed rank completes DDP's all-reduce for the parameters it had not reached). A collective the fence cannot
      see (a function bound at import time, a compiled graph's) ends the run with ``OOMGuardError`` after
      ``collective_timeout`` seconds instead of a silent hang. Micro-batches before the last one run under
      ``no_sync``; the last one's backward is DDP's own, overlapped all-reduce.
    * FSDP2 (``ModelParallelStrategy`` with ``fully_shard``, data parallel): FSDP2's all-gathers and reduce-scatters
      are fenced the same way; a failed attempt unwinds every rank, FSDP2 is reset
      (``FSDPModule.reset_iter_state``) and the batch re-run in halves.
    * At micro-batch 1, still out of memory: :class:`~lightning_guard.errors.OOMGuardError` with the memory figures.

    Caveats: layers that use batch statistics (``BatchNorm``) see micro-batches, not the batch. The loss must be a
    mean over the batch (``loss_reduction="mean"``, weighted by ``loss_weight``) or a sum (``"sum"``). Extra keys of
    a dict returned by ``training_step`` come from the last micro-batch. Manual optimization is not supported, nor
    FSDP1, DeepSpeed or tensor parallelism (their collectives cannot be fenced: refused at setup).

    Lightning's ``accumulate_grad_batches=k`` works: each batch of the window is halved on its own (its micro-batch
    losses carry their share of it and Lightning's ``1/k``). An out-of-memory is recovered in the batch where it
    happens: the gradients are zeroed, the window's batches already accumulated are replayed for their gradients only
    (what the replay writes besides gradients is undone) and the failed batch runs again in halves. OOMGuard keeps
    references to the window's batches for that until the optimizer step.

    Events: ``oom_retry`` (ranks, where, old and new micro-batch size, memory figures, clean-up time, batches of the
    accumulation window replayed), ``grow_back``,
    ``oom_fatal``. Metric: ``guard/oom/micro_batch_size`` every step.

    Args:
        micro_batch_size: start with this micro-batch size (None: the whole batch). With a DataLoader batch of
            ``k x`` this size, OOMGuard accumulates the ``k`` micro-batches itself.
        grow_after: double the micro-batch size again after this many clean steps (None: never grow back).
        loss_reduction: how ``training_step``'s loss reduces over samples: ``"mean"`` (each micro-batch loss is
            weighted by its share of the batch) or ``"sum"`` (added as is).
        split_eval: also split validation/test/predict batches that run out of memory.
        collective_timeout: DDP, FSDP2: seconds an agreement waits for the other ranks before ``OOMGuardError``.

    Example:
        >>> guard = OOMGuard(grow_after=100)
        >>> guard.micro_batch_size is None, guard.grow_after
        (True, 100)
    """

    guard_name = "oom"
    vote_first = True  # a failed attempt is abandoned before any guard acts on its gradients

    def __init__(
        self,
        micro_batch_size: int | None = None,
        grow_after: int | None = None,
        loss_reduction: Literal["mean", "sum"] = "mean",
        split_eval: bool = True,
        collective_timeout: float = 300.0,
    ) -> None:
        check_int("micro_batch_size", micro_batch_size, low=1, optional=True)
        check_int("grow_after", grow_after, low=1, optional=True)
        if loss_reduction not in ("mean", "sum"):
            raise GuardConfigError(f"`loss_reduction` must be 'mean' or 'sum', got {loss_reduction!r}")
        if not isinstance(split_eval, bool):
            raise GuardConfigError(f"`split_eval` must be a bool, got {split_eval!r}")
        if (
            isinstance(collective_timeout, bool)
            or not isinstance(collective_timeout, int | float)
            or not (collective_timeout > 0)
        ):
            raise GuardConfigError(f"`collective_timeout` must be a number of seconds > 0, got {collective_timeout!r}")
        super().__init__(micro_batch_size, grow_after, loss_reduction, split_eval, float(collective_timeout))

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._sharded = trainer.world_size > 1 and isinstance(trainer.strategy, ModelParallelStrategy)
        if stage == "fit":
            for name in ("optimizer_step", "optimizer_zero_grad", "backward"):
                self._install(pl_module, name)
            self._checked_batch = False
            self._dynamic_buffers, self._backward_collectives, self._layout = None, 0, None
            self._quiet, self._counted = False, False
            self._loud = self._sharded  # FSDP2: every step issues collectives, none is quiet
            if trainer.world_size > 1:
                self._fence.setup()  # every rank, at the same point: creating a group is a collective
            if self._fence.active:  # the guards' one step agreement runs on the fence's group, with its timeout
                self.runtime(trainer).set_step_channel(_FenceChannel(self))
        elif self._sharded and self.split_eval:  # validate/test/predict alone: FSDP2's evaluation forward is fenced
            self._fence.setup()
        if self.split_eval:
            for name in _EVAL_HOOKS:
                self._install(pl_module, name)

    @override
    def setup_problems(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        problems = super().setup_problems(trainer, pl_module)
        if not pl_module.automatic_optimization:
            problems.append(
                "OOMGuard needs automatic optimization (`automatic_optimization=True`): with manual optimization "
                "your training_step runs backward and step itself, so a batch cannot be re-run"
            )
        if trainer.world_size > 1:
            problems += self._strategy_problems(trainer)
        return problems

    def _strategy_problems(self, trainer: pl.Trainer) -> list[str]:
        """Multi-process strategies: DDP, and FSDP2 over a data-parallel mesh on a torch that can reset it."""
        strategy = trainer.strategy
        name = f"{type(strategy).__name__} with {trainer.world_size} processes"
        if isinstance(strategy, DDPStrategy):
            return []
        if not isinstance(strategy, ModelParallelStrategy):
            return [
                f"OOMGuard supports DDP and FSDP2 (ModelParallelStrategy) among multi-process strategies, got {name}: "
                "under FSDP (FSDPStrategy) and DeepSpeed the sharded blocks' collectives run where OOMGuard cannot "
                "fence them, so a rank that runs out of memory mid-step would leave the others waiting. Use DDP or "
                "FSDP2 (ModelParallelStrategy with fully_shard), or lower the batch size"
            ]
        tensor_parallel = strategy.device_mesh["tensor_parallel"].size()
        if tensor_parallel > 1:
            return [
                f"OOMGuard under ModelParallelStrategy supports data-parallel sharding (FSDP2) only, got "
                f"tensor_parallel_size={tensor_parallel}: tensor parallelism's collectives run inside DTensor "
                "operations, where OOMGuard cannot fence them, so a rank that runs out of memory mid-step would "
                "leave the others waiting. Use tensor_parallel_size=1, or lower the batch size"
            ]
        if not can_reset_after_failure():
            return [
                f"OOMGuard under FSDP2 needs torch's FSDPModule.reset_iter_state (torch 2.13 has it), got torch "
                f"{torch.__version__}: without it FSDP2 cannot run again after a step that failed mid-flight"
            ]
        return []

    def _install(self, pl_module: pl.LightningModule, name: str) -> None:
        current = pl_module.__dict__.get(name)
        if current is not None and getattr(current, "_lightning_guard_oom", None) is self:
            self._inner[name] = getattr(current, _MARK)  # ours from before (a failed fit): keep it removable
            return
        inner = getattr(pl_module, name)
        self._inner[name] = inner
        if name in _EVAL_HOOKS:
            stage = _EVAL_HOOKS[name]

            @wraps_method(inner)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return self._eval_step(stage, inner, *args, **kwargs)
        else:
            method = getattr(self, f"_wrapped_{name}")

            @wraps_method(inner)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                return method(inner, *args, **kwargs)

        setattr(wrapper, _MARK, inner)
        wrapper._lightning_guard_oom = self  # type: ignore[attr-defined]
        setattr(pl_module, name, wrapper)

    def _uninstall(self, pl_module: pl.LightningModule) -> None:
        for name in [*self._inner, "training_step"]:
            fn = pl_module.__dict__.get(name)
            if fn is not None and hasattr(fn, _MARK):
                del pl_module.__dict__[name]
        self._inner = {}

    # ------------------------------------------------------------------ training
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        problems = self.setup_problems(trainer, pl_module)  # a GradientAccumulationScheduler may have changed it
        if problems:
            raise GuardConfigError("\n".join(problems))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        # outermost, so that a fault injector installed after us still raises inside our handling
        self._install(pl_module, "training_step")
        self._reset_step()
        if not self._checked_batch:
            self._check_batch(pl_module, batch)
            self._checked_batch = True
        self._batch, self._batch_n = batch, self._samples(batch)
        self._adopt(self._policy().saw_batch(self._batch_n))
        self._accumulate = int(trainer.accumulate_grad_batches)
        if batch_idx % self._accumulate == 0:  # where Lightning zeroes the gradients: a new window
            self._window = []
        self._batch_idx = batch_idx
        self._accumulating = self._accumulate > 1 and should_accumulate(trainer)
        self._batch_attempt = None  # a batch that accumulates: taken at its training_step (after every batch hook)

    def _check_batch(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """At the first batch, not at the first out-of-memory hours later: can this batch be measured and split?"""
        kind = type(batch).__name__
        own_split = callable(getattr(pl_module, "split_batch", None)) and not _default_split(pl_module)
        n = self._samples(batch)
        if n < 1:
            raise GuardConfigError(
                f"OOMGuard cannot tell how many samples a batch of type {kind} holds (it found no tensor with a batch "
                "dimension): implement `batch_samples(batch) -> int` and `split_batch(batch, micro_batch_size)` on "
                "the LightningModule (see the OOMGuard docs, 'Custom batches')"
            )
        if not own_split:
            loaders = self._trainer.train_dataloader if self._trainer is not None else None
            if isinstance(loaders, list | tuple) and isinstance(batch, list | tuple) and len(batch) == len(loaders):
                # several training loaders (Lightning's CombinedLoader): one whole batch per loader
                found = (_sequences_of_mappings(b, f"batch[{i}]") for i, b in enumerate(batch))
                where = next((w for w in found if w is not None), None)
            else:
                where = _sequences_of_mappings(batch)
            if where is not None:
                raise GuardConfigError(
                    f"OOMGuard cannot split this batch safely: {where} is a list of dicts (per-sample items from a "
                    "custom `collate_fn`, e.g. detection targets), which the default split cannot tell from batched "
                    "fields; implement `split_batch(batch, micro_batch_size)` and `batch_samples(batch) -> int` on "
                    "the LightningModule"
                )
        if n > 1:
            parts = self._split(batch, max(1, n // 2))
            sizes = [self._samples(p) for p in parts]
            if sum(sizes) != n or min(sizes) < 1:
                raise GuardConfigError(
                    f"OOMGuard: splitting a batch of {n} samples into halves gave parts of {sizes} samples; "
                    "`split_batch` and `batch_samples` must agree (every sample in exactly one part)"
                )

    # ------------------------------------------------------------------ the wrapped hooks
    def _wrapped_training_step(self, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._busy:
            return inner(*args, **kwargs)
        if self._accumulating:
            return self._accumulating_step(inner, args, kwargs)
        if self._mode == "last":
            if args:
                args = (self._last_part, *args[1:])
            else:
                kwargs = {**kwargs, "batch": self._last_part}
        part = args[0] if args else kwargs.get("batch")
        out = self._guarded_step(lambda: inner(*args, **kwargs), part, synced=True)
        if self._mode == "last":
            loss = _loss_of(out)
            if loss is not None:
                total = loss * self._last_share
                if self._earlier is not None:
                    total = total + self._earlier.to(total.dtype)
                out = _with_loss(out, total)
        return out

    def _wrapped_optimizer_zero_grad(self, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._hold_grads:
            return None  # the micro-batches before the last already accumulated into the zeroed gradients
        return inner(*args, **kwargs)

    def _wrapped_backward(self, inner: Callable[..., Any], loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self._busy:
            return inner(loss, *args, **kwargs)
        if self._accumulating:
            return self._accumulating_backward(inner, loss, args, kwargs)
        if self._abandoned is not None or self._deferred is not None:
            # The zero loss of an abandoned attempt (or of this rank's failure in a quiet step): complete DDP's
            # all-reduce and go on like the others, through whatever the hooks after backward do (a `sync_dist` log
            # in `on_after_backward`), to the step's agreement, where the failed rank's vote unwinds every rank.
            inner(loss, *args, **kwargs)
            return None
        if not self._distributed:
            if self._local_backward(inner, loss, args, kwargs):
                raise _Retry(self._local_agreement())
            return None
        if self._sharded:
            self._sharded_closure_backward(inner, loss, args, kwargs)
            return None
        self._ddp_backward(inner, loss, args, kwargs)
        # a failure here is told at the step's one agreement (on_before_optimizer_step, before any guard acts)
        return None

    # ------------------------------------------------------------------ the step's one agreement (DDP)
    @override
    def step_vote(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor | list[float] | None:
        """``[place, *failure]``: failed (and where, at what size, the memory figures) or not, and whether quiet."""
        if not self._fence.active:
            return None  # one process: a failure is retried where it happens
        if self._oom is not None:
            return [FAILED, *self._payload()]
        quiet = self._step_collectives == 0 and self._counted
        return [AT_STEP_QUIET if quiet else AT_STEP, *self._payload()]

    @override
    def step_detail(self, total: tuple[float, ...]) -> bool:
        """Never: the places are counted in the sums, and who failed is gathered at the recovery."""
        return False

    @override
    def step_verdict(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, votes: StepVotes) -> None:
        tally, self._step_tally = self._step_tally, None  # the fence's count of places (``_reduce_step``)
        assert tally is not None
        if tally.failed:  # every rank, here: before any guard judges the gradients
            self.runtime(trainer).abandon_step(optimizer)
            raise _Retry(self._fence_verdict())
        if tally.place is None:
            self._out_of_step(tally)
        if tally.at(AT_STEP):
            self._loud = True
        self._quiet = not self._loud

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        current = self._current_size()
        policy, grow = self._policy().after_clean_batch()
        self._adopt(policy)
        if grow is not None:
            self.emit(
                trainer,
                "grow_back",
                f"{grow.after} clean steps at micro-batch {grow.old}: trying {grow.new}",
                data={"old_micro_batch_size": grow.old, "new_micro_batch_size": grow.new},
                rank_zero_only=True,
            )
        if trainer.loggers:
            GuardCallback.log_metrics(
                self,
                trainer,
                {"guard/oom/micro_batch_size": float(current)},
                monitorable=True,
                on_step=True,
                on_epoch=False,
                logger=True,
            )
        self._batch, self._batch_attempt = None, None
        if not self._accumulating:  # the optimizer stepped: the window's batches are not needed any more
            self._window = []

    # ------------------------------------------------------------------ plumbing
    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self._trainer = trainer  # also for validate() and the sanity check, which run before on_train_start

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self._trainer = trainer

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_predict_start(trainer, pl_module)
        self._trainer = trainer

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._uninstall(pl_module)
        self._reset_step()
        if stage == "fit" or self._sharded:
            self._fence.teardown()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._uninstall(pl_module)  # Lightning runs no teardown when fit fails: leave the module as it was
        self._reset_step()
        self._fence.unwatch()

    #: the version of the checkpoint state this class writes
    STATE_VERSION = 1

    def _state_schema(self) -> StateSchema:
        legacy: dict[str, Any] = {
            "micro_batch_size": None,
            "eval_micro_batch_size": {},
            "retries": 0,
            "clean_steps": 0,
            "grow_wait": self.grow_after or 0,
            "growing_from": None,
            "largest_batch": 0,
        }
        return StateSchema("OOMGuard", self.STATE_VERSION, frozenset(legacy), legacy=legacy)

    @override
    def state_dict(self) -> dict[str, Any]:
        size = self._policy().state()  # its keys in the order of the state before the policy was its own object
        return self._state_schema().dump(
            {
                "micro_batch_size": size.pop("micro_batch_size"),
                "eval_micro_batch_size": dict(self.eval_micro_batch_size),
                "retries": self.retries,
                **size,
            }
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = self._state_schema().load(state_dict, extra=type(self) is not OOMGuard)
        self._adopt(SizePolicy.from_state(state, self.grow_after))
        self.eval_micro_batch_size = dict(state["eval_micro_batch_size"])
        self.retries = int(state["retries"])
