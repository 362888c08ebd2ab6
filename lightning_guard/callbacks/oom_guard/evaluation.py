"""Evaluation splitting: a validation, test or predict step that ran out of memory runs again in micro-batches.

No gradients and no optimizer: the step is re-run at once in halves (``functional.oom_policy.eval_retry_size``), its
outputs recombined (:func:`~lightning_guard.functional.combine_outputs`) and the size that worked kept per stage.
Under FSDP2 with several processes an evaluation forward is a chain of all-gathers: each micro-batch runs fenced and
ends with an agreement, and every rank re-runs the step in halves together.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from lightning_guard._compat import logged_results
from lightning_guard._fence import AT_END, FAILED
from lightning_guard._sharded import reset_after_failure
from lightning_guard.callbacks.oom_guard.attempt import _AttemptState, _PartLog
from lightning_guard.callbacks.oom_guard.common import _MEM_KEYS, _error_text
from lightning_guard.callbacks.oom_guard.retry import _RetryLoop
from lightning_guard.functional.oom import combine_outputs, free_memory, is_oom_error, memory_stats
from lightning_guard.functional.oom_policy import eval_retry_size


class _EvalSplitting(_RetryLoop):
    """The wrapped ``validation_step``, ``test_step`` and ``predict_step``."""

    def _eval_step(self, stage: str, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._busy or not args:
            return inner(*args, **kwargs)
        if self._sharded and self._fence.active:
            return self._sharded_eval_step(stage, inner, args[0], args[1:], kwargs)
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
            size = eval_retry_size(n)
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
            if failed:
                log.release()
            else:
                log.finish()
            if not failed:
                self.eval_micro_batch_size[stage] = size
                return combine_outputs(outputs, [self._samples(p) for p in parts])
            del outputs, parts
            attempt.restore()
            self._eval_oom(stage, size)
            size = eval_retry_size(size)  # size >= 1 here: the same as size // 2

    def _sharded_eval_step(self, stage: str, inner: Callable[..., Any], batch: Any, rest: Any, kwargs: Any) -> Any:
        """FSDP2, several processes: each micro-batch's forward fenced and agreed; every rank halves together."""
        n = self._samples(batch)
        size = min(self.eval_micro_batch_size.get(stage, n), n)
        results = logged_results(self._trainer) if self._trainer is not None else None
        attempt = _AttemptState(self._module(), results, set(), self._layout_of(self._module()))
        while True:
            parts = self._split(batch, size) if size < n else [batch]
            log = _PartLog(results, batch, attempt)
            outputs: list[Any] = []
            rows = self._fenced_parts(inner, parts, rest, kwargs, outputs, log)
            if rows is None:
                log.finish()
            else:  # a failed attempt: combine nothing (a metric synced on step would sync on some ranks alone)
                log.release()
            if rows is None:
                if size < n:
                    self.eval_micro_batch_size[stage] = size
                return outputs[0] if len(parts) == 1 else combine_outputs(outputs, [self._samples(p) for p in parts])
            del outputs, parts
            attempt.restore()
            ranks = tuple(i for i, r in enumerate(rows) if r[0] == FAILED)  # rows: [place, where, size, memory...]
            failed = min(int(rows[i][2]) for i in ranks)
            size = eval_retry_size(failed)
            if size < 1:
                memory = {i: {k: rows[i][3 + j] for j, k in enumerate(_MEM_KEYS) if rows[i][3 + j]} for i in ranks}
                self._fatal(ranks, memory)
            self._eval_oom(stage, failed, ranks)

    def _fenced_parts(
        self, inner: Callable[..., Any], parts: list[Any], rest: Any, kwargs: Any, outputs: list[Any], log: _PartLog
    ) -> list[list[float]] | None:
        """Run the micro-batches, each fenced and agreed at its end; every rank's row when a rank failed."""
        for part in parts:
            log.enter(part)
            out, tally, oom = self._fenced(functools.partial(inner, part, *rest, **kwargs))
            device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            self._oom = ("forward", self._samples(part), memory_stats(device)) if oom else None  # its payload
            try:
                if tally is None:
                    tally = self._agree_fence(FAILED if oom else AT_END)
                if tally.failed:  # every rank learned it at this agreement: who failed, at what size (one gather)
                    return self._fence.details([FAILED if oom else AT_END, *self._payload()])
            finally:
                self._oom = None
            outputs.append(out)
            log.leave(self._weight(part))
        return None

    def _eval_oom(self, stage: str, size: int, ranks: tuple[int, ...] | None = None) -> None:
        """Clean up after an evaluation step that ran out of memory at ``size``, and say so.

        ``ranks``: the ranks that failed, agreed (FSDP2: rank 0 reports for them); None: this rank alone.
        """
        trainer = self._trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        mem = memory_stats(device) if ranks is None else {}
        reset_after_failure(self._module(), training=False)  # FSDP2 after a forward abandoned mid-flight
        free_memory(device)
        if trainer is None or size <= 1:  # at one sample the step fails for good (OOMGuardError follows)
            return
        new = size // 2
        on = "" if ranks is None else f" on rank {', '.join(map(str, ranks))}"
        data: dict[str, Any] = {"stage": stage, "old_micro_batch_size": size, "new_micro_batch_size": new, **mem}
        if ranks is not None:
            data["oom_ranks"] = list(ranks)
        self.emit(
            trainer,
            "oom_retry",
            f"out of memory in {stage}{on} at batch {size}; splitting into micro-batches of {new}",
            severity="warning",
            data=data,
            ranks=ranks or (),
            rank_zero_only=ranks is not None,
        )
