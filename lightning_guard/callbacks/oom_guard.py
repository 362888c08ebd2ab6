"""OOMGuard: survive out-of-memory mid-training by re-running the same batch as halved micro-batches."""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, NoReturn

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from lightning_guard._checks import check_int
from lightning_guard._compat import (
    buffer_slots,
    call_training_step,
    forward_cache,
    get_buffer,
    logged_results,
    metric_bookkeeping,
    metric_reduction,
    metric_state_names,
    scaler_forget_step,
    set_buffer,
    set_forward_cache,
    set_metric_bookkeeping,
    should_accumulate,
    tensor_version,
    update_count,
)
from lightning_guard._fence import (
    AT_END,
    AT_STEP,
    AT_STEP_QUIET,
    FAILED,
    FenceAbort,
    FenceTimeout,
    StepFence,
)
from lightning_guard._state import StateSchema
from lightning_guard._wrapping import takes_batch_idx, wraps_method
from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.distributed import Agreement
from lightning_guard.errors import GuardConfigError, OOMGuardError
from lightning_guard.functional.oom import (
    batch_size,
    combine_outputs,
    free_memory,
    is_oom_error,
    memory_stats,
    split_batch,
)

__all__ = ["OOMGuard"]

_WHERE = {1.0: "forward", 2.0: "backward"}
_CODE = {"forward": 1.0, "backward": 2.0}
_MEM_KEYS = ("allocated_mib", "reserved_mib", "peak_mib")
_MARK = "_lightning_guard_original"
_EVAL_HOOKS = {"validation_step": "validate", "test_step": "test", "predict_step": "predict"}


class _Retry(Exception):
    """Unwinds a failed attempt out of Lightning's closure (releasing its graph) up to ``optimizer_step``."""

    def __init__(self, agreement: Agreement) -> None:
        super().__init__("lightning_guard: batch re-run after out-of-memory")
        self.agreement = agreement


def _memory_lists(ranks: tuple[int, ...], memory: dict[int, dict[str, float]]) -> dict[str, list[float]]:
    present = [k for k in _MEM_KEYS if any(k in m for m in memory.values())]
    return {k: [memory.get(r, {}).get(k, 0.0) for r in ranks] for k in present}


def _error_text(exc: BaseException) -> str:
    return " ".join(str(a) for a in exc.args)


def _loss_of(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        loss = out.get("loss")
        return loss if isinstance(loss, torch.Tensor) else None
    return None


def _with_loss(out: Any, loss: torch.Tensor) -> Any:
    return {**out, "loss": loss} if isinstance(out, dict) else loss


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


def _metric_state(metric: Any) -> dict[str, Any]:
    """A torchmetrics metric's states: tensors cloned, list states as ``(list, length)`` (updates only append)."""
    return {
        name: (value, len(value)) if isinstance(value, list) else value.detach().clone()
        for name, value in ((n, getattr(metric, n)) for n in metric_state_names(metric))
    }


def _default_split(module: Any) -> bool:
    """True when the module's ``split_batch`` is GuardMixin's default (the functional split), not its own."""
    from lightning_guard.mixin import GuardMixin

    method = getattr(type(module), "split_batch", None)
    return method is GuardMixin.split_batch


def _layout(module: torch.nn.Module) -> tuple[list[tuple[torch.nn.Module, str]], list[Any]]:
    """The persistent buffer slots ``(submodule, name)`` and the torchmetrics metrics of a module."""
    slots = [(mod, name) for mod in module.modules() for name in buffer_slots(mod)]
    return slots, [mod for mod in module.modules() if isinstance(mod, torchmetrics.Metric)]


class _AttemptState:
    """What one attempt at a batch changes besides the gradients, taken before it so a failed attempt leaves no trace.

    * persistent buffers of the module (BatchNorm's running statistics and ``num_batches_tracked``), cloned;
    * the states of every torchmetrics ``Metric`` in the module (tensors cloned; list states by length, since an
      update only appends), with their update counts and caches;
    * the values Lightning accumulated for ``self.log`` (references: Lightning rebinds them, never writes in place);
    * whatever the module's ``oom_attempt_state()`` returns, handed back to its ``restore_oom_attempt_state(state)``.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        results: Any,
        buffers: set[tuple[int, str]] | None = None,
        layout: tuple[list[tuple[torch.nn.Module, str]], list[Any]] | None = None,
    ) -> None:
        """Take the state.

        ``buffers``: the ``(id(submodule), name)`` of the buffers to keep (None: every persistent buffer);
        ``layout``: :func:`_layout` of the module, computed once per fit (walking a large module costs).
        """
        slots, metrics = layout if layout is not None else _layout(module)
        self.buffers: list[tuple[torch.nn.Module, str, torch.Tensor, torch.Tensor]] = []
        self.versions: dict[tuple[int, str], tuple[torch.nn.Module, torch.Tensor, int]] = {}
        for mod, name in slots:
            buf = get_buffer(mod, name)
            if buf is None:
                continue
            key = (id(mod), name)
            if buffers is None or key in buffers:
                self.buffers.append((mod, name, buf, buf.detach().clone()))
            else:  # watched for a first write, not copied
                self.versions[key] = (mod, buf, tensor_version(buf))
        self.metrics: list[tuple[Any, dict[str, Any], tuple[Any, ...]]] = []
        for mod in metrics:
            self.metrics.append((mod, _metric_state(mod), metric_bookkeeping(mod)))
        self.results = results
        self.logged: dict[str, tuple[Any, ...]] = {}
        if results is not None:
            for key, rm in results.items():
                self.logged[key] = (
                    rm.value,
                    getattr(rm, "cumulated_batch_size", None),
                    metric_bookkeeping(rm),
                    rm.has_reset,
                )
        capture = getattr(module, "oom_attempt_state", None)
        self.module = module
        self.user = capture() if callable(capture) else None

    def changed_buffers(self, by_value: bool) -> set[tuple[int, str]]:
        """The buffers the step wrote since this state was taken.

        With ``by_value`` (once, after the first step: it reads device values) the saved copies are compared by
        value, since BatchNorm's kernels update the running statistics without bumping the version counter; the
        buffers only watched, by version counter and identity (reassigned).
        """
        changed = set()
        with torch.no_grad():
            for mod, name, _, saved in self.buffers if by_value else ():
                current = get_buffer(mod, name)
                if current is None or current.shape != saved.shape or not torch.equal(current, saved):
                    changed.add((id(mod), name))
        for mod, name, *_ in self.buffers if not by_value else ():
            changed.add((id(mod), name))  # kept already: stays kept
        return changed | self._first_writes()

    def _first_writes(self) -> set[tuple[int, str]]:
        changed = set()
        for (mod_id, name), (mod, old, version) in self.versions.items():
            buf = get_buffer(mod, name)
            if buf is not old or (buf is not None and tensor_version(buf) != version):
                changed.add((mod_id, name))
        return changed

    def restore(self) -> None:
        with torch.no_grad():
            for mod, name, original, saved in self.buffers:
                current = get_buffer(mod, name)
                if current is original:
                    current.copy_(saved)  # in place: DDP and others keep their references to the buffer
                else:  # the step reassigned it (``self.ema = 0.9 * self.ema + ...``): put the tensor back
                    original.copy_(saved)
                    set_buffer(mod, name, original)
        for mod, states, bookkeeping in self.metrics:
            for name, saved in states.items():
                if isinstance(saved, tuple):
                    values, n = saved
                    del values[n:]
                    setattr(mod, name, values)
                else:
                    setattr(mod, name, saved.clone())
            set_metric_bookkeeping(mod, *bookkeeping)
        if self.results is not None:
            for key in [k for k in self.results if k not in self.logged]:
                del self.results[key]
            for key, (value, cumulated, bookkeeping, has_reset) in self.logged.items():
                rm = self.results[key]
                rm.value = value
                if cumulated is not None:
                    rm.cumulated_batch_size = cumulated
                set_metric_bookkeeping(rm, *bookkeeping)
                rm.has_reset = has_reset
        restore = getattr(self.module, "restore_oom_attempt_state", None)
        if callable(restore):
            restore(self.user)


class _PartLog:
    """Makes ``self.log`` in the micro-batches of one split batch add up to what the whole batch would have logged.

    Before each part, Lightning's batch is set to the part (so an inferred ``batch_size`` weighs the epoch mean by
    the part's samples); after the last one, each value logged ``on_step`` is combined over the parts (a mean weighted
    by samples, a sum, a max or a min, by its ``reduce_fx``) instead of keeping the last part's.
    """

    def __init__(self, results: Any, batch: Any, attempt: _AttemptState | None = None) -> None:
        self.results = results
        self.batch = batch
        self.parts: dict[str, list[tuple[torch.Tensor, float]]] = {}
        self._before: dict[str, Any] = {}
        # the module's metrics' states before the batch (taken by the attempt state, before any part ran)
        self._metric_states: dict[int, tuple[Any, dict[str, Any]]] = (
            {id(m): (m, states) for m, states, _ in attempt.metrics} if attempt is not None else {}
        )

    def enter(self, part: Any) -> None:
        if self.results is None:
            return
        self.results.batch, self.results.batch_size = part, None
        self._before = {k: forward_cache(rm) for k, rm in self.results.items()}
        for rm in self.results.values():  # a Metric object logged on step: keep its state before this batch
            metric = rm.value
            if not rm.is_tensor and rm.meta.on_step and id(metric) not in self._metric_states:
                self._metric_states[id(metric)] = (metric, _metric_state(metric))

    def _step_value(self, metric: Any) -> torch.Tensor | None:
        """The metric computed over this batch's micro-batches only (sum and concatenation states), else None."""
        from torchmetrics.utilities.data import dim_zero_cat, dim_zero_sum

        saved = self._metric_states.get(id(metric))
        if saved is None:
            return None
        states: dict[str, Any] = {}
        for name, before in saved[1].items():
            after, reduce = getattr(metric, name), metric_reduction(metric, name)
            if isinstance(before, tuple) and reduce is dim_zero_cat:
                states[name] = list(after[before[1] :])
            elif isinstance(before, torch.Tensor) and reduce is dim_zero_sum:
                states[name] = after - before
            else:
                return None  # a mean, max or custom state: the step's share cannot be told apart
        step = copy.deepcopy(metric)
        for name, value in states.items():
            setattr(step, name, value)
        set_metric_bookkeeping(step, 1, None, forward_cache(step))
        return step.compute()

    def leave(self, weight: float) -> None:
        if self.results is None:
            return
        for key, rm in self.results.items():
            cache = forward_cache(rm)
            if rm.is_tensor and rm.meta.on_step and cache is not None and cache is not self._before.get(key):
                self.parts.setdefault(key, []).append((cache, weight))

    def finish(self) -> None:
        if self.results is None:
            return
        self.results.batch, self.results.batch_size = self.batch, None
        for rm in self.results.values():
            if not rm.is_tensor and rm.meta.on_step and update_count(rm.value) > 1:
                value = self._step_value(rm.value)
                if value is not None:
                    set_forward_cache(rm, value)

        for key, values in self.parts.items():
            rm = self.results.get(key)
            if rm is None or len(values) < 2:
                continue
            stacked = torch.stack([v for v, _ in values])
            if rm.meta.is_mean_reduction:
                weights = torch.tensor([w for _, w in values], dtype=stacked.dtype, device=stacked.device)
                combined = (stacked * weights).sum() / weights.sum()
            elif rm.meta.is_sum_reduction:
                combined = stacked.sum()
            elif rm.meta.is_max_reduction:
                combined = stacked.max()
            elif rm.meta.is_min_reduction:
                combined = stacked.min()
            else:
                continue
            set_forward_cache(rm, combined)
            if not rm.meta.on_epoch:
                rm.value = combined
        self.parts = {}


class OOMGuard(GuardCallback):
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
    * At micro-batch 1, still out of memory: :class:`~lightning_guard.errors.OOMGuardError` with the memory figures.

    Caveats: layers that use batch statistics (``BatchNorm``) see micro-batches, not the batch. The loss must be a
    mean over the batch (``loss_reduction="mean"``, weighted by ``loss_weight``) or a sum (``"sum"``). Extra keys of
    a dict returned by ``training_step`` come from the last micro-batch. Manual optimization is not supported, nor
    multi-process strategies other than DDP (FSDP, DeepSpeed: a one-rank OOM there cannot be recovered without a
    hang today).

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
        collective_timeout: DDP: seconds an agreement waits for the other ranks before ``OOMGuardError``.

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
        super().__init__()
        check_int("micro_batch_size", micro_batch_size, low=1, optional=True)
        check_int("grow_after", grow_after, low=1, optional=True)
        if loss_reduction not in ("mean", "sum"):
            raise GuardConfigError(f"`loss_reduction` must be 'mean' or 'sum', got {loss_reduction!r}")
        if not isinstance(split_eval, bool):
            raise GuardConfigError(f"`split_eval` must be a bool, got {split_eval!r}")
        self.micro_batch_size = micro_batch_size
        self.grow_after = grow_after
        self.loss_reduction = loss_reduction
        if (
            isinstance(collective_timeout, bool)
            or not isinstance(collective_timeout, int | float)
            or not (collective_timeout > 0)
        ):
            raise GuardConfigError(f"`collective_timeout` must be a number of seconds > 0, got {collective_timeout!r}")
        self.split_eval = split_eval
        self.collective_timeout = float(collective_timeout)
        self._fence = StepFence(self.collective_timeout, payload_size=len(_MEM_KEYS) + 2)
        self._checked_batch = False
        self._dynamic_buffers: set[tuple[int, str]] | None = None  # buffers a training step writes (None: unknown)
        self._backward_collectives = 0  # collectives the last clean step's backward issued (DDP)
        # DDP: every step so far issued no collective of its own (agreed): a step needs no agreement at its end, a
        # failure is told at the step's one agreement. Once a step issues one, never again for the fit (_loud).
        self._quiet = False
        self._loud = False
        self._counted = False  # the process groups' collective counts are seen to move (DDP's backward moves them)
        self._layout: tuple[int, tuple[list[tuple[torch.nn.Module, str]], list[Any]]] | None = None
        self.eval_micro_batch_size: dict[str, int] = {}
        self.retries = 0
        self._oom_text = ""  # the message of this rank's last out-of-memory error
        self._clean_steps = 0
        self._grow_wait = grow_after or 0
        self._growing_from: int | None = None
        self._largest_batch = 0
        self._inner: dict[str, Callable[..., Any]] = {}
        # Lightning's gradient accumulation: the window's batches whose gradients are in `.grad` (replayed for their
        # gradients when a later batch of the window fails in backward), and this batch's place in it
        self._window: list[tuple[Any, int]] = []
        self._accumulate = 1
        self._accumulating = False  # this batch accumulates (no optimizer step after it)
        self._batch_idx = -1
        self._batch_attempt: _AttemptState | None = None
        self._reset_step()

    def _reset_step(self) -> None:
        self._batch: Any = None
        self._batch_n = -1  # its size (dim 0), read once per batch
        self._busy = False  # inside one of our own calls: nested wrappers pass through
        self._mode: Literal["idle", "last"] = "idle"
        self._last_part: Any = None
        self._last_share = 1.0
        self._earlier: torch.Tensor | None = None
        self._hold_grads = False
        self._oom: tuple[str, int, dict[str, float]] | None = None  # this rank's failure in this attempt
        self._abandoned: Agreement | None = None  # the ranks agreed to drop this attempt before its backward
        # this rank failed in a quiet step: its row, posted for the others' next agreement on the fence group
        self._deferred: tuple[Any, list[torch.Tensor], int] | None = None
        self._step_collectives = 0  # collectives this attempt's training_step and backward issued (DDP)
        self._part_log: _PartLog | None = None

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            for name in ("optimizer_step", "optimizer_zero_grad", "backward"):
                self._install(pl_module, name)
            self._checked_batch = False
            self._dynamic_buffers, self._backward_collectives, self._layout = None, 0, None
            self._quiet, self._loud, self._counted = False, False, False
            if trainer.world_size > 1:
                self._fence.setup()  # every rank, at the same point: creating a group is a collective
            if self._fence.active:  # the guards' one step agreement runs on the fence's group, with its timeout
                self.runtime(trainer).set_step_gather(self._gather_step)
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
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            problems.append(
                f"OOMGuard supports DDP only among multi-process strategies, got {type(trainer.strategy).__name__} "
                f"with {trainer.world_size} processes: an out-of-memory on one rank there cannot be recovered "
                "without hanging the others"
            )
        return problems

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
        self._largest_batch = max(self._largest_batch, self._batch_n)
        self._accumulate = int(trainer.accumulate_grad_batches)
        if batch_idx % self._accumulate == 0:  # where Lightning zeroes the gradients: a new window
            self._window = []
        self._batch_idx = batch_idx
        self._accumulating = self._accumulate > 1 and should_accumulate(trainer)
        self._batch_attempt = None  # a batch that accumulates: taken at its training_step (after every batch hook)

    # ------------------------------------------------------------------ the batch protocol
    def _samples(self, batch: Any) -> int:
        hook = getattr(self._module() if self._trainer is not None else None, "batch_samples", None)
        return int(hook(batch)) if callable(hook) else batch_size(batch)

    def _weight(self, batch: Any) -> float:
        hook = getattr(self._module(), "loss_weight", None)
        return float(hook(batch)) if callable(hook) else float(self._samples(batch))

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

    @property
    def _distributed(self) -> bool:
        return self._trainer is not None and self._trainer.world_size > 1

    def _current_size(self) -> int:
        n = self._batch_n
        return n if self.micro_batch_size is None or n < 0 else min(self.micro_batch_size, n)

    def _chunked(self) -> bool:
        return self.micro_batch_size is not None and self._batch_n > self.micro_batch_size

    def _note_oom(self, where: str, size: int) -> None:
        """Record this rank's out-of-memory (the first one of the attempt).

        The size recorded is the micro-batch size in force, not the failing part's: the short last part of a batch
        (50 in parts of 12 ends with 2) must not make the next size 1.
        """
        device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        size = max(size, self._current_size())
        if self._oom is None:
            self._oom = (where, size, memory_stats(device))

    def _local_agreement(self) -> Agreement:
        return Agreement((True,), (self._payload(),))

    def _payload(self) -> tuple[float, ...]:
        if self._oom is None:
            return (0.0, float(self._current_size()), 0.0, 0.0, 0.0)
        where, size, mem = self._oom
        return (_CODE[where], float(size), *(float(mem.get(k, 0.0)) for k in _MEM_KEYS))

    def _dummy_loss(self, pl_module: pl.LightningModule) -> torch.Tensor:
        """A zero loss touching every trainable parameter: this rank's part of DDP's all-reduce after a failure."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        return torch.stack([p.sum().float() for p in params]).sum() * 0.0

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

    def _guarded_step(self, step: Callable[[], Any], part: Any, synced: bool) -> Any:
        """Run one ``training_step`` call; on out-of-memory here (or, under DDP, on any rank) abandon the attempt.

        Under DDP the call runs inside the fence: every collective it issues is preceded by an agreement, and one
        ends it, so a rank that failed meets the others at their next agreement and no rank is left inside a
        collective. An abandoned call raises ``_Retry`` (``synced=False``: a micro-batch under ``no_sync``, where DDP
        expects no backward) or returns a zero loss whose backward completes DDP's armed all-reduce and then raises.
        """
        pl_module = self._module()
        log = self._part_log
        if log is not None:
            log.enter(part)
        # A quiet step (no collective in any step so far, agreed by all ranks) has no agreement at its end: a rank
        # that fails completes DDP's all-reduce with a zero loss and tells the others at the step's one agreement.
        quiet = synced and self._quiet
        self._busy = True
        rows: list[list[float]] | None = None
        try:
            if self._oom is not None:  # this rank failed earlier in the attempt (a micro-batch's backward)
                if quiet:
                    self._deferred = self._post_failure()
                    return self._dummy_loss(pl_module)
                rows = self._agree_fence(FAILED)
            else:
                # counted only while quiet steps are still possible (once a step issued a collective, never again)
                before = self._fence.issued() if self._fence.active and not self._loud else None
                try:
                    with self._fence.watching():
                        out = step()
                except FenceAbort as abort:
                    rows = abort.rows
                except FenceTimeout as exc:
                    self._fence_timed_out(AT_END, exc)
                except Exception as exc:
                    if not is_oom_error(exc):
                        raise
                    self._oom_text = _error_text(exc)
                    self._note_oom("forward", self._samples(part))
                    if not self._fence.active:
                        raise _Retry(self._local_agreement()) from None
                    if quiet:
                        self._deferred = self._post_failure()
                        return self._dummy_loss(pl_module)
                    rows = self._agree_fence(FAILED)
                else:
                    self._step_collectives += self._issued_since(before)
                    if not self._fence.active or quiet:
                        if log is not None:
                            log.leave(self._weight(part))
                        return out
                    rows = self._agree_fence(AT_END)
                    if not StepFence.failed(rows):
                        if log is not None:
                            log.leave(self._weight(part))
                        return out
                    del out
        finally:
            self._busy = False
        verdict = self._fence_verdict(rows)
        if not synced:
            raise _Retry(verdict)
        self._abandoned = verdict
        return self._dummy_loss(pl_module)  # every rank: DDP armed its all-reduce in this forward

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
    def step_verdict(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, rows: list[tuple[float, ...]]
    ) -> None:
        table = [list(r) for r in rows]
        if StepFence.failed(table):  # every rank, here: before any guard judges the gradients
            self.runtime(trainer).abandon_step(optimizer)
            raise _Retry(self._fence_verdict(table))
        if any(r[0] not in (AT_STEP, AT_STEP_QUIET) for r in table):
            self._out_of_step(table)
        if any(r[0] == AT_STEP for r in table):
            self._loud = True
        self._quiet = not self._loud

    def _issued_since(self, before: int | None) -> int:
        """Collectives issued on any group since ``before`` (1 where they cannot be counted: never quiet)."""
        after = self._fence.issued()
        return 1 if before is None or after is None else after - before

    def _post_failure(self) -> tuple[Any, list[torch.Tensor], int]:
        """This rank failed in a quiet step: post its row, in the step agreement's layout, without waiting.

        The others meet it either at an agreement in front of a collective of the step that no earlier step issued
        (they abandon the step there) or at the step's agreement, which this row then completes. Either way every rank
        then goes on to the step's agreement, where this rank's vote unwinds them all; nobody waits for this rank
        inside a collective, and this rank waits for its post only there, where the others are or will be.
        """
        trainer = self._trainer
        assert trainer is not None
        runtime = self.runtime(trainer)
        size = max(runtime.step_row_size, 1 + len(self._payload()) + 1)
        row = [FAILED, *self._payload()]
        row += [0.0] * (size - 1 - len(row)) + [float(runtime.events.pending())]
        return self._fence.gather_async(row)

    def _gather_step(self, row: list[float]) -> list[list[float]]:
        try:
            if self._deferred is not None:  # this rank's failure, posted in a quiet step: where did the others meet it?
                posted, self._deferred = self._deferred, None
                rows = self._fence.finish(posted)  # complete by now: the others are at this agreement or met it earlier
                if all(r[0] in (AT_STEP, AT_STEP_QUIET, FAILED) for r in rows):
                    return [r[: len(row)] for r in rows]  # here: the post was this rank's row of the step's agreement
                # in front of a collective of the step: they went on to this agreement, which is still to be held
            return self._fence.gather(row)
        except FenceTimeout as exc:
            self._fence_timed_out(FAILED if self._oom is not None else AT_STEP, exc)

    def _agree_fence(self, place: float) -> list[list[float]]:
        try:
            rows = self._fence.agree(place, list(self._payload()))
        except FenceTimeout as exc:
            self._fence_timed_out(place, exc)
        if not StepFence.failed(rows) and len({r[0] for r in rows}) > 1:
            self._out_of_step(rows)
        return rows

    def _out_of_step(self, rows: list[list[float]]) -> NoReturn:
        raise OOMGuardError(
            f"OOMGuard: the ranks are out of step inside training_step ({StepFence.describe(rows)}): the step "
            "issues a different number of collectives on different ranks (a collective under a data-dependent "
            "condition, or micro-batch counts that differ because the ranks' batches differ in size)",
            self._current_size(),
            tuple(range(len(rows))),
            {},
        )

    def _fence_timed_out(self, place: float, exc: BaseException) -> NoReturn:
        trainer = self._trainer
        assert trainer is not None
        rank = trainer.global_rank
        if place == FAILED:
            cause = (
                f"rank {rank} ran out of memory and waited {self.collective_timeout:.0f} s for the other ranks to "
                "reach OOMGuard's agreement. They are most likely blocked inside a collective of your training_step "
                "that OOMGuard cannot see (a collective function imported before the fit, `torch.distributed."
                "_functional_collectives`, a compiled graph's or a C++ extension's collective): call collectives as "
                "`torch.distributed.<name>` or through Lightning (`self.log(sync_dist=True)`, `self.all_gather`)"
            )
        else:
            cause = (
                f"rank {rank} waited {self.collective_timeout:.0f} s at OOMGuard's agreement for the other ranks: "
                "one crashed or is stalled (e.g. one that ran out of memory in a backward that issues collectives, "
                "at the first step, before OOMGuard had seen them), or a step is slower than `collective_timeout`"
            )
        message = f"OOMGuard: {cause}. The error was: {_error_text(exc)[:300]}"
        self.emit(trainer, "oom_fatal", message, severity="error", data={"where": "agreement"}, ranks=(rank,))
        self.runtime(trainer).events.dump_outbox()
        raise OOMGuardError(message, self._current_size(), (rank,), {}) from exc

    def _backward_unrecoverable(self, rows: list[list[float]]) -> NoReturn:
        """A one-rank out-of-memory in a backward that issues collectives of its own: stop every rank, loudly.

        Those collectives (the backward of ``self.all_gather(..., sync_grads=True)``, ``torch.distributed.nn``)
        share the process group with DDP's gradient all-reduce, so the failed rank cannot complete the reduction
        alone without matching the others' collectives wrongly.
        """
        trainer = self._trainer
        assert trainer is not None
        failed = [i for i, r in enumerate(rows) if r[0] == FAILED]
        message = (
            f"OOMGuard: rank {failed} ran out of memory in backward, and this step's backward issues collectives of "
            "its own (the backward of `self.all_gather(..., sync_grads=True)` or of `torch.distributed.nn` "
            "functions): they share the process group with DDP's gradient all-reduce, so a backward that failed on "
            "one rank cannot be completed. Every rank stops. Start with a smaller `micro_batch_size`, or gather "
            "without gradients"
        )
        data = {"where": "backward", "oom_ranks": failed}
        self.emit(trainer, "oom_fatal", message, severity="error", data=data, ranks=tuple(failed), rank_zero_only=True)
        self.runtime(trainer).events.dump_outbox()
        raise OOMGuardError(message, self._current_size(), tuple(failed), {})

    def _layout_of(self, module: torch.nn.Module) -> tuple[list[tuple[torch.nn.Module, str]], list[Any]]:
        """The module's buffer slots and metrics, walked once per fit (and again for another module)."""
        if self._layout is None or self._layout[0] != id(module):
            self._layout = (id(module), _layout(module))
        return self._layout[1]

    def _fence_verdict(self, rows: list[list[float]] | None) -> Agreement:
        assert rows is not None
        return Agreement(tuple(r[0] == FAILED for r in rows), tuple(tuple(r[1:]) for r in rows))

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
        self._ddp_backward(inner, loss, args, kwargs)
        # a failure here is told at the step's one agreement (on_before_optimizer_step, before any guard acts)
        return None

    def _local_backward(self, inner: Callable[..., Any], loss: torch.Tensor, args: Any, kwargs: Any) -> bool:
        """One process: run backward; True when it ran out of memory (noted)."""
        try:
            inner(loss, *args, **kwargs)
            return False
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            self._oom_text = _error_text(exc)
        self._note_oom("backward", self._current_size())  # outside the handler: the failed graph is released
        return True

    def _ddp_backward(self, inner: Callable[..., Any], loss: torch.Tensor, args: Any, kwargs: Any) -> None:
        """DDP: run backward; an out-of-memory is noted and DDP's reduction completed for what it had not reached."""
        before = None if self._counted else self._fence.issued()  # once seen to move, the counts need no reading
        with self._track_reduced() as reduced:
            try:
                with self._fence.watching():  # a collective inside backward (all_gather with sync_grads) is fenced
                    inner(loss, *args, **kwargs)
            except FenceAbort as abort:  # another rank failed in backward, and this backward issues collectives
                self._backward_unrecoverable(abort.rows)
            except FenceTimeout as exc:
                self._fence_timed_out(AT_END, exc)
            except Exception as exc:
                if not is_oom_error(exc):
                    raise
                self._oom_text = _error_text(exc)
                self._note_oom("backward", self._current_size())
                if self._backward_collectives > self._fence.collectives:
                    # the others have a collective of their backward ahead, where they stop at its agreement; past
                    # the last one (this backward passed them all), completing DDP's reduction below is safe
                    self._backward_unrecoverable(self._agree_fence(FAILED))
            else:
                self._backward_collectives = self._fence.collectives
                self._step_collectives += self._fence.collectives
                self._counted = self._counted or self._issued_since(before) > 0  # DDP's all-reduce was counted
            if self._oom is not None and self._oom[0] == "backward":
                self._complete_reduction(reduced())

    @contextlib.contextmanager
    def _track_reduced(self) -> Iterator[Callable[[], list[torch.nn.Parameter]]]:
        """Yield a function listing the trainable parameters whose gradient this backward has not produced yet."""
        params = [p for p in self._module().parameters() if p.requires_grad]
        fresh = all(p.grad is None for p in params)
        seen: set[int] = set()
        handles = []
        if not fresh:  # gradients already there (micro-batches before the last): watch this backward's accumulation
            handles = [p.register_post_accumulate_grad_hook(lambda q: seen.add(id(q))) for p in params]

        def pending() -> list[torch.nn.Parameter]:
            if fresh:
                return [p for p in params if p.grad is None]
            return [p for p in params if id(p) not in seen]

        try:
            yield pending
        finally:
            for h in handles:
                h.remove()

    def _complete_reduction(self, params: list[torch.nn.Parameter]) -> None:
        """After a backward OOM, mark the unreached parameters ready (zero gradients) so DDP's all-reduce completes."""
        if not params:
            return
        self._busy = True
        try:
            torch.stack([p.sum().float() for p in params]).sum().mul(0.0).backward()
        finally:
            self._busy = False

    def _wrapped_optimizer_step(
        self,
        inner: Callable[..., Any],
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        if optimizer_closure is None or self._batch is None:
            return inner(epoch, batch_idx, optimizer, optimizer_closure, **kwargs)
        trainer = self._trainer
        assert trainer is not None
        module = self._module()
        attempt = _AttemptState(module, logged_results(trainer), self._dynamic_buffers, self._layout_of(module))
        rerun = False  # a re-run after a failure: the window's earlier batches (accumulation) are replayed first
        while True:
            self._oom, self._abandoned, self._deferred, self._step_collectives = None, None, None, 0
            closure = optimizer_closure
            self._part_log = None
            if self._chunked() or (rerun and self._window):
                closure = functools.partial(self._run_chunks, optimizer_closure, optimizer, epoch, batch_idx, rerun)
                self._part_log = _PartLog(logged_results(trainer), self._batch, attempt)
            try:
                result = inner(epoch, batch_idx, optimizer, closure, **kwargs)
                if self._part_log is not None:
                    self._part_log.finish()
                # the buffers a clean step writes (BatchNorm statistics, a user's EMA) are the only ones kept from
                # now on: a large constant buffer (a mask, a cache) is copied once, at the first step, not every step
                self._dynamic_buffers = attempt.changed_buffers(by_value=self._dynamic_buffers is None)
                return result
            except _Retry as retry:
                verdict = retry.agreement
            except Exception as exc:
                if not is_oom_error(exc):
                    raise
                self._optimizer_oom(exc)  # forward and backward are caught inside: this is the optimizer's own step
            finally:
                self._mode, self._hold_grads, self._last_part, self._earlier = "idle", False, None, None
            # outside the handler: the failed attempt's frames, graph and activations are unreachable now
            if self._part_log is not None:
                self._part_log.finish()
            attempt.restore()  # buffers, metrics and logged values as before the failed attempt
            self._recover(optimizer, verdict)
            rerun = True

    def _split(self, batch: Any, size: int) -> list[Any]:
        hook = getattr(self._module(), "split_batch", None)
        parts = hook(batch, size) if callable(hook) else split_batch(batch, size)
        if not parts:
            raise GuardConfigError(f"`split_batch` returned no micro-batch for a batch of {batch_size(batch)}")
        return list(parts)

    def _parts(self, batch: Any) -> tuple[list[Any], list[float]]:
        """A batch's micro-batches at the current size and the share of the batch's loss each one carries."""
        if self.micro_batch_size is None or self._samples(batch) <= self.micro_batch_size:
            return [batch], [1.0]
        parts = self._split(batch, self.micro_batch_size)
        weights = [self._weight(p) for p in parts]
        total = float(sum(weights))
        return parts, [w / total if self.loss_reduction == "mean" else 1.0 for w in weights]

    def _strategy_step(self, part: Any, batch_idx: int) -> Any:
        """``training_step`` on a micro-batch through the strategy (DDP's forward), outside Lightning's closure."""
        trainer = self._trainer
        assert trainer is not None
        step_args = (batch_idx,) if takes_batch_idx(self._module().training_step) else ()
        return call_training_step(trainer, part, *step_args)

    def _run_parts(
        self, parts: list[Any], shares: list[float], batch_idx: int, step: Callable[[Any, int], Any] | None = None
    ) -> torch.Tensor | None:
        """Forward and backward of micro-batches (under ``no_sync``), each loss weighted by its share of the batch.

        Each backward also divides by ``accumulate_grad_batches``, as Lightning divides a batch's loss. Returns the
        sum of the weighted losses (detached, undivided); one process raises ``_Retry`` at the first out-of-memory,
        DDP meets the others at the next agreement.
        """
        trainer = self._trainer
        assert trainer is not None
        step = step or self._strategy_step
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        no_sync = getattr(trainer.strategy.model, "no_sync", None) if self._distributed else None
        earlier: torch.Tensor | None = None
        for part, share in zip(parts, shares, strict=True):
            with no_sync() if no_sync is not None else contextlib.nullcontext():
                out = self._guarded_step(functools.partial(step, part, batch_idx), part, synced=False)
                loss = _loss_of(out)
                del out
                if loss is None:
                    continue
                part_loss = loss.detach().float() * share
                earlier = part_loss if earlier is None else earlier + part_loss
                scaled = loss * (share / self._accumulate)
                del loss
                self._busy = True
                try:
                    self._inner["backward"](scaler.scale(scaled) if scaler is not None else scaled)
                except Exception as exc:
                    if not is_oom_error(exc):
                        raise
                    self._oom_text = _error_text(exc)
                    self._note_oom("backward", self._samples(part))
                finally:
                    self._busy = False
                    del scaled
            if self._oom is not None and not self._distributed:
                raise _Retry(self._local_agreement())
        return earlier

    def _replay(self, batches: list[tuple[Any, int]], step: Callable[[Any, int], Any] | None = None) -> None:
        """Put the gradients of already accumulated batches back into the zeroed ``.grad``, and nothing else.

        Their ``self.log`` values, metric updates and buffer writes were kept when they first ran: what the replay
        writes is undone. An out-of-memory anywhere in it is agreed at its end (DDP) and raises ``_Retry``.
        """
        if not batches:
            return
        trainer = self._trainer
        assert trainer is not None
        module = self._module()
        saved = _AttemptState(module, logged_results(trainer), self._dynamic_buffers, self._layout_of(module))
        part_log, self._part_log = self._part_log, None
        try:
            for batch, batch_idx in batches:
                self._run_parts(*self._parts(batch), batch_idx, step)
            verdict = self._end_verdict()
            if verdict is not None:
                raise _Retry(verdict)
        finally:
            saved.restore()
            self._part_log = part_log

    def _end_verdict(self) -> Agreement | None:
        """After backward(s) run outside Lightning's step: did any rank run out of memory (DDP: agreed)? None: no."""
        if not self._fence.active:
            return self._local_agreement() if self._oom is not None else None
        rows = self._agree_fence(FAILED if self._oom is not None else AT_END)
        return self._fence_verdict(rows) if StepFence.failed(rows) else None

    def _run_chunks(
        self, closure: Callable[[], Any], optimizer: Any, epoch: int, batch_idx: int, rerun: bool = False
    ) -> Any:
        """The closure of a batch run in micro-batches: all but the last here, the last through Lightning's closure.

        The gradients are zeroed unless the window's earlier batches accumulated into them; a re-run replays those
        first (``rerun``).
        """
        if rerun or not self._window:
            self._inner["optimizer_zero_grad"](epoch, batch_idx, optimizer)
        self._hold_grads = True
        if rerun:
            self._replay(self._window)
        parts, shares = self._parts(self._batch)
        earlier = self._run_parts(parts[:-1], shares[:-1], batch_idx)
        # the last part runs through Lightning's closure (its backward is DDP's own, overlapped all-reduce); a rank
        # that failed in an earlier part's backward meets the others at that part's first agreement
        self._mode, self._last_part, self._last_share, self._earlier = "last", parts[-1], shares[-1], earlier
        del parts
        return closure()

    # ------------------------------------------------------------------ Lightning's gradient accumulation
    def _accumulating_step(self, inner: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``training_step`` of a batch that accumulates: a failure is recovered here, before Lightning's backward.

        Every rank learns of an out-of-memory at the agreement that ends the step; all restore what the attempt
        wrote, zero the gradients, replay the window's earlier batches for their gradients and run this batch again
        in smaller micro-batches; the last one's forward goes back to Lightning, which runs its backward.
        """

        def step(part: Any, batch_idx: int) -> Any:  # inside Lightning's (and DDP's) forward already
            if not args:
                return inner(**{**kwargs, "batch": part})
            return inner(part, *((batch_idx,) if len(args) > 1 else ()), *args[2:], **kwargs)

        trainer = self._trainer
        assert trainer is not None
        if self._batch_attempt is None:
            # here, not at on_train_batch_start: the module's own on_train_batch_start (and callbacks after this one)
            # run after that and their writes belong to the batch, not to the attempt
            module = self._module()
            self._batch_attempt = _AttemptState(
                module, logged_results(trainer), self._dynamic_buffers, self._layout_of(module)
            )
        try:
            return self._accumulating_attempt(step)
        except _Retry as retry:
            verdict = retry.agreement
        while True:
            self._batch_attempt.restore()
            self._part_log = None
            self._recover(trainer.optimizers[0], verdict)
            self._oom, self._abandoned, self._deferred = None, None, None
            try:
                self._replay(self._window, step)
                return self._accumulating_attempt(step)
            except _Retry as retry:
                verdict = retry.agreement

    def _accumulating_attempt(self, step: Callable[[Any, int], Any]) -> Any:
        trainer = self._trainer
        assert trainer is not None
        parts, shares = self._parts(self._batch)
        if len(parts) > 1:
            self._part_log = _PartLog(logged_results(trainer), self._batch, self._batch_attempt)
        if not self._window and not self._hold_grads:
            # the window's first batch: Lightning zeroes the gradients after training_step, before its backward,
            # which would drop the micro-batches run here; they are zeroed now instead
            self._inner["optimizer_zero_grad"](trainer.current_epoch, self._batch_idx, trainer.optimizers[0])
        self._hold_grads = True
        earlier = self._run_parts(parts[:-1], shares[:-1], self._batch_idx, step)
        last = parts[-1]
        out = self._guarded_step(functools.partial(step, last, self._batch_idx), last, synced=False)
        loss = _loss_of(out)
        if loss is not None and len(parts) > 1:
            total = loss * shares[-1]
            out = _with_loss(out, total if earlier is None else total + earlier.to(total.dtype))
        return out

    def _accumulating_backward(
        self, inner: Callable[..., Any], loss: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Backward of a batch that accumulates, then an agreement; a failure is recovered before Lightning goes on.

        The batch's forward completed (its logs and buffer writes stand); the gradients of the window so far are
        rebuilt: zeroed, and every batch of the window, this one included, replayed for its gradients only.
        """
        trainer = self._trainer
        assert trainer is not None
        if self._distributed:
            self._ddp_backward(inner, loss, args, kwargs)
        else:
            self._local_backward(inner, loss, args, kwargs)
        verdict = self._end_verdict()
        if verdict is None:
            if self._part_log is not None:
                self._part_log.finish()
        else:
            self._part_log = None
            while True:
                # the batch's loss was recorded by the other guards already (its forward completed): kept
                self._recover(trainer.optimizers[0], verdict, forget_attempt=False)
                self._oom = None
                try:
                    self._replay([*self._window, (self._batch, self._batch_idx)])
                    break
                except _Retry as retry:
                    verdict = retry.agreement
        self._part_log, self._hold_grads = None, False
        self._window.append((self._batch, self._batch_idx))

    def _recover(self, optimizer: Any, verdict: Agreement, forget_attempt: bool = True) -> None:
        """Clean up after a failed attempt (gradients, GradScaler state, memory), halve, and say so."""
        trainer = self._trainer
        assert trainer is not None
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scaler_forget_step(scaler)
        for cb in trainer.callbacks if forget_attempt else ():  # type: ignore[attr-defined]
            if isinstance(cb, GuardCallback):
                cb.on_batch_retry(trainer)
        free_memory(trainer.strategy.root_device)
        cleanup_ms = round((time.perf_counter() - start) * 1000.0, 1)
        failed = {r: verdict.values[r] for r in verdict.ranks}
        size = int(min(v[1] for v in failed.values()))
        memory = {r: {k: v[2 + i] for i, k in enumerate(_MEM_KEYS) if v[2 + i]} for r, v in failed.items()}
        where = {r: _WHERE.get(v[0], "forward") for r, v in failed.items()}
        old = self.micro_batch_size
        data: dict[str, Any] = {
            "oom_ranks": list(failed),
            "where": [where[r] for r in failed],
            "batch_size": self._batch_n,
            "old_micro_batch_size": size,
            "replayed_batches": len(self._window),  # gradient accumulation: the window's batches re-run first
            "cleanup_ms": cleanup_ms,
        }
        for i, key in enumerate(_MEM_KEYS):  # per failing rank, in the order of oom_ranks (CUDA only)
            if any(v[2 + i] for v in failed.values()):
                data[key] = [v[2 + i] for v in failed.values()]
        if self._growing_from is not None and self._growing_from < size:
            new = self._growing_from
            self._grow_wait *= 2
            data["reason"] = "grow_back_failed"
        else:
            if size <= 1:
                self._fatal(verdict.ranks, memory)
            new = max(1, size // 2)
        self._growing_from = None
        self.micro_batch_size = new
        self._clean_steps = 0
        self.retries += 1
        data["new_micro_batch_size"] = new
        ranks = ", ".join(f"{r} ({w})" for r, w in where.items())
        self.emit(
            trainer,
            "oom_retry",
            f"out of memory on rank {ranks} at micro-batch {size}; re-running the batch as micro-batches of {new} "
            f"(was {old if old is not None else 'the whole batch'})",
            severity="warning",
            data=data,
            ranks=verdict.ranks,
            rank_zero_only=True,
        )

    def _optimizer_oom(self, exc: BaseException) -> None:
        """Out of memory inside ``optimizer.step`` (after backward): smaller micro-batches cannot help."""
        trainer = self._trainer
        assert trainer is not None
        rank = trainer.global_rank
        memory = {rank: memory_stats(trainer.strategy.root_device)}
        message = (
            f"OOMGuard: out of memory inside optimizer.step on rank {rank}, after backward (the optimizer allocating "
            "its state or a workspace: AdamW keeps two fp32 copies of every parameter): smaller micro-batches cannot "
            "help. Use a leaner optimizer (8-bit AdamW, Adafactor), shard the optimizer state (FSDP, DeepSpeed ZeRO) "
            f"or a smaller model. The error was: {_error_text(exc)[:500]}"
        )
        data = {"where": "optimizer_step", "oom_ranks": [rank], **_memory_lists((rank,), memory)}
        # This rank alone knows, and it is about to fail: its event goes to disk now (a ddp_spawn worker that raises
        # runs no on_exception hook to dump it later).
        self.emit(trainer, "oom_fatal", message, severity="error", data=data, ranks=(rank,))
        self.runtime(trainer).events.dump_outbox()
        raise OOMGuardError(message, self._current_size(), (rank,), memory) from exc

    def _fatal(self, ranks: tuple[int, ...], memory: dict[int, dict[str, float]]) -> None:
        trainer = self._trainer
        assert trainer is not None
        figures = "; ".join(
            f"rank {r}: "
            + (", ".join(f"{k.replace('_mib', '')} {v:.0f} MiB" for k, v in m.items()) or "no CUDA memory figures")
            for r, m in memory.items()
        )
        message = (
            f"OOMGuard: out of memory at micro-batch size 1 on rank {list(ranks)} ({figures}): one sample does not "
            "fit; reduce the model, the sequence length or the precision, or shard the model"
        )
        if "cudnn_status_not_supported" in self._oom_text.lower():
            message = (
                f"OOMGuard: cuDNN kept answering CUDNN_STATUS_NOT_SUPPORTED down to micro-batch size 1 on rank "
                f"{list(ranks)}. cuDNN says this when its workspace does not fit, which is why the batch was halved, "
                "but also for an input it has no kernel for (dtype, layout, shape): at one sample this is most "
                "likely not an out-of-memory. Check the layer's input, or run with "
                f"torch.backends.cudnn.enabled=False to see the real error. The error was: {self._oom_text[:500]}"
            )
        data = {"micro_batch_size": 1, "oom_ranks": list(ranks), **_memory_lists(ranks, memory)}
        self.emit(trainer, "oom_fatal", message, severity="error", data=data, ranks=ranks, rank_zero_only=True)
        raise OOMGuardError(message, 1, ranks, memory)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        current = self._current_size()
        if self._growing_from is not None:  # the step at the grown size went through
            self._growing_from = None
            self._grow_wait = self.grow_after or 0
        if self.micro_batch_size is not None and self.grow_after is not None:
            self._clean_steps += 1
            if self._clean_steps >= self._grow_wait:
                old = self.micro_batch_size
                grown = old * 2
                self.micro_batch_size = None if grown >= self._largest_batch else grown
                self._growing_from, self._clean_steps = old, 0
                new = self.micro_batch_size or self._largest_batch
                self.emit(
                    trainer,
                    "grow_back",
                    f"{self._grow_wait} clean steps at micro-batch {old}: trying {new}",
                    data={"old_micro_batch_size": old, "new_micro_batch_size": new},
                    rank_zero_only=True,
                )
        if trainer.loggers:
            pl_module.log("guard/oom/micro_batch_size", float(current), on_step=True, on_epoch=False, logger=True)
        self._batch, self._batch_attempt = None, None
        if not self._accumulating:  # the optimizer stepped: the window's batches are not needed any more
            self._window = []

    # ------------------------------------------------------------------ evaluation
    def _eval_step(self, stage: str, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._busy or not args:
            return inner(*args, **kwargs)
        batch, rest = args[0], args[1:]
        n = self._samples(batch)
        size = self.eval_micro_batch_size.get(stage)
        results = logged_results(self._trainer) if self._trainer is not None else None
        attempt: _AttemptState | None = None
        if size is None or n <= size:
            attempt = _AttemptState(self._module(), results, set(), self._layout_of(self._module()))
            try:
                return inner(*args, **kwargs)
            except Exception as exc:
                if not is_oom_error(exc):
                    raise
                self._oom_text = _error_text(exc)
            attempt.restore()
            size = n
            self._eval_oom(stage, size)
            size = max(1, n // 2) if n > 1 else 0
        while True:
            if size < 1:
                self._fatal((self._trainer.global_rank if self._trainer is not None else 0,), {})
            if attempt is None:
                attempt = _AttemptState(self._module(), results, set(), self._layout_of(self._module()))
            parts = self._split(batch, size)
            log = _PartLog(results, batch, attempt)
            outputs: list[Any] = []
            failed = False
            for part in parts:
                log.enter(part)
                try:
                    outputs.append(inner(part, *rest, **kwargs))
                except Exception as exc:
                    if not is_oom_error(exc):
                        raise
                    self._oom_text = _error_text(exc)
                    failed = True
                if failed:
                    break
                log.leave(self._weight(part))
            log.finish()
            if not failed:
                self.eval_micro_batch_size[stage] = size
                return combine_outputs(outputs, [self._samples(p) for p in parts])
            del outputs, parts
            attempt.restore()
            self._eval_oom(stage, size)
            size = size // 2

    def _eval_oom(self, stage: str, size: int) -> None:
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        mem = memory_stats(device)
        free_memory(device)
        if trainer is not None:
            new = size // 2
            self.emit(
                trainer,
                "oom_retry",
                f"out of memory in {stage} at batch {size}; splitting into micro-batches of {new}",
                severity="warning",
                data={"stage": stage, "old_micro_batch_size": size, "new_micro_batch_size": new, **mem},
            )

    # ------------------------------------------------------------------ plumbing
    def _module(self) -> pl.LightningModule:
        assert self._trainer is not None
        return self._trainer.lightning_module

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
        if stage == "fit":
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
        return self._state_schema().dump(
            {
                "micro_batch_size": self.micro_batch_size,
                "eval_micro_batch_size": dict(self.eval_micro_batch_size),
                "retries": self.retries,
                "clean_steps": self._clean_steps,
                "grow_wait": self._grow_wait,
                "growing_from": self._growing_from,
                "largest_batch": self._largest_batch,
            }
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = self._state_schema().load(state_dict, extra=type(self) is not OOMGuard)
        self.micro_batch_size = state["micro_batch_size"]
        self.eval_micro_batch_size = dict(state["eval_micro_batch_size"])
        self.retries = int(state["retries"])
        self._clean_steps = int(state["clean_steps"])
        self._grow_wait = int(state["grow_wait"])
        self._growing_from = state["growing_from"]
        self._largest_batch = int(state["largest_batch"])
