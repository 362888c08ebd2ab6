"""The attempt snapshot: what one attempt at a batch changes besides the gradients, and ``self.log`` over parts.

:class:`_AttemptState` is taken before an attempt and restores it after a failure; :class:`_PartLog` makes the values
a split batch's micro-batches log add up to what the whole batch would have logged.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torchmetrics

from lightning_guard._compat import (
    buffer_slots,
    forward_cache,
    get_buffer,
    metric_bookkeeping,
    metric_reduction,
    metric_state_names,
    set_buffer,
    set_forward_cache,
    set_metric_bookkeeping,
    tensor_version,
    update_count,
)


def _metric_state(metric: Any) -> dict[str, Any]:
    """A torchmetrics metric's states: tensors cloned, list states as ``(list, length)`` (updates only append)."""
    return {
        name: (value, len(value)) if isinstance(value, list) else value.detach().clone()
        for name, value in ((n, getattr(metric, n)) for n in metric_state_names(metric))
    }


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
        if not getattr(metric, "dist_sync_on_step", False):
            # what the whole batch would have logged on step: this rank's value (torchmetrics syncs on step only with
            # dist_sync_on_step); synced, it was a collective per metric per step, and one rank's alone after a failure
            step.distributed_available_fn = lambda: False
        return step.compute()

    def leave(self, weight: float) -> None:
        if self.results is None:
            return
        for key, rm in self.results.items():
            cache = forward_cache(rm)
            if rm.is_tensor and rm.meta.on_step and cache is not None and cache is not self._before.get(key):
                self.parts.setdefault(key, []).append((cache, weight))

    def release(self) -> None:
        """The attempt failed: give Lightning back the batch, combine nothing (the attempt's state is restored next).

        Combining computes the metrics logged on step (a collective for one synced on step), which a failed rank
        would hold alone.
        """
        if self.results is not None:
            self.results.batch, self.results.batch_size = self.batch, None
        self.parts = {}

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
