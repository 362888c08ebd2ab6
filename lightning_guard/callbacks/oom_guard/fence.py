"""The DDP side of OOMGuard: the fence's agreements, what a rank does when they fail, and a backward under DDP.

Under DDP every collective a training step issues is preceded by an agreement on the fence's gloo group
(:mod:`lightning_guard._fence`), so a rank that ran out of memory meets the others before their next collective. This
mixin holds the guard's side of that protocol: posting a failure in a quiet step, the step's agreement on the fence
group, the errors for ranks out of step or timed out, and completing DDP's gradient all-reduce after a backward that
failed on one rank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import torch

from lightning_guard._fence import (
    AT_COLLECTIVE,
    AT_END,
    AT_STEP,
    AT_STEP_QUIET,
    FAILED,
    FenceAbort,
    FenceTimeout,
    Tally,
)
from lightning_guard.callbacks.oom_guard.common import FENCED, _error_text
from lightning_guard.callbacks.oom_guard.core import _Core
from lightning_guard.distributed import Agreement
from lightning_guard.errors import OOMGuardError
from lightning_guard.functional.oom import is_oom_error


class _FenceChannel:
    """OOMGuard's fence group as the runtime's ``StepChannel``: the step's agreement held there, with its timeout."""

    def __init__(self, guard: _FenceProtocol) -> None:
        self.owner = guard

    def reduce(self, row: list[float]) -> tuple[list[float], bool]:
        return self.owner._reduce_step(row)

    def rows(self, row: list[float]) -> list[list[float]]:
        return self.owner._step_rows(row)


class _FenceProtocol(_Core):
    """OOMGuard's side of the fence protocol (DDP)."""

    def _issued_since(self, before: int | None) -> int:
        """Collectives issued on any group since ``before`` (1 where they cannot be counted: never quiet)."""
        after = self._fence.issued()
        return 1 if before is None or after is None else after - before

    def _post_failure(self) -> tuple[Any, torch.Tensor, int]:
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

    # ------------------------------------------------------------------ the step's agreement on the fence group
    def _reduce_step(self, row: list[float]) -> tuple[list[float], bool]:
        """The step's agreement (``StepChannel.reduce``): the row summed over ranks, the place where all stand."""
        try:
            if self._deferred is not None:  # this rank's failure, posted in a quiet step: where did the others meet it?
                posted, self._deferred = self._deferred, None
                tally = self._fence.finish(
                    posted
                )  # complete by now: the others are at this agreement or met it earlier
                if not tally.at(AT_COLLECTIVE) and not tally.at(AT_END):
                    return self._step_sums(tally)  # here: the post was this rank's row of the step's agreement
                # in front of a collective of the step: they went on to this agreement, which is still to be held
            return self._step_sums(self._fence.gather(row))
        except FenceTimeout as exc:
            self._fence_timed_out(FAILED if self._oom is not None else AT_STEP, exc)

    def _step_sums(self, tally: Tally) -> tuple[list[float], bool]:
        """The sums for the runtime (OOMGuard's own column: the place all stand at, NaN where they differ)."""
        self._step_tally = tally
        place = tally.place
        return [math.nan if place is None else place, *tally.total], place in (AT_STEP, AT_STEP_QUIET)

    def _step_rows(self, row: list[float]) -> list[list[float]]:
        """Every rank's row of the step's agreement (``StepChannel.rows``: a guard asked for them)."""
        try:
            return self._fence.details(row)
        except FenceTimeout as exc:
            self._fence_timed_out(AT_STEP, exc)

    def _agree_fence(self, place: float) -> Tally:
        try:
            tally = self._fence.agree(place, list(self._payload()))
        except FenceTimeout as exc:
            self._fence_timed_out(place, exc)
        if not tally.failed and tally.place is None:
            self._out_of_step(tally)
        return tally

    def _failure_details(self) -> Agreement:
        """Who failed, where, at what size (the second collective, after every rank learned of a failure)."""
        try:
            rows = self._fence.details([FAILED if self._oom is not None else AT_END, *self._payload()])
        except FenceTimeout as exc:
            self._fence_timed_out(FAILED if self._oom is not None else AT_END, exc)
        return Agreement(tuple(r[0] == FAILED for r in rows), tuple(tuple(r[1:]) for r in rows))

    def _out_of_step(self, tally: Tally) -> NoReturn:
        world = sum(tally.counts)
        raise OOMGuardError(
            f"OOMGuard: the ranks are out of step inside training_step ({tally.describe()}): the step "
            "issues a different number of collectives on different ranks (a collective under a data-dependent "
            "condition, or micro-batch counts that differ because the ranks' batches differ in size)",
            self._current_size(),
            tuple(range(world)),
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

    def _backward_unrecoverable(self) -> NoReturn:
        """A one-rank out-of-memory in a backward that issues collectives of its own: stop every rank, loudly.

        Those collectives (the backward of ``self.all_gather(..., sync_grads=True)``, ``torch.distributed.nn``)
        share the process group with DDP's gradient all-reduce, so the failed rank cannot complete the reduction
        alone without matching the others' collectives wrongly.
        """
        trainer = self._trainer
        assert trainer is not None
        failed = list(self._failure_details().ranks)  # every rank is here: it learned at the same agreement
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

    @staticmethod
    def _fence_verdict() -> Agreement:
        """A failure agreed on the fence: who failed is gathered at the recovery, where every rank is."""
        return FENCED

    def _ddp_backward(self, inner: Callable[..., Any], loss: torch.Tensor, args: Any, kwargs: Any) -> None:
        """DDP: run backward; an out-of-memory is noted and DDP's reduction completed for what it had not reached."""
        before = None if self._counted else self._fence.issued()  # once seen to move, the counts need no reading
        with self._track_reduced() as reduced:
            # a collective inside backward (all_gather with sync_grads) is fenced
            _, tally, oom = self._fenced(lambda: inner(loss, *args, **kwargs))
            if tally is not None:  # another rank failed in backward, and this backward issues collectives
                self._backward_unrecoverable()
            if oom:
                self._note_oom("backward", self._current_size())
                if self._backward_collectives > self._fence.collectives:
                    # the others have a collective of their backward ahead, where they stop at its agreement; past
                    # the last one (this backward passed them all), completing DDP's reduction below is safe
                    self._agree_fence(FAILED)
                    self._backward_unrecoverable()
            else:
                self._backward_collectives = self._fence.collectives
                self._step_collectives += self._fence.collectives
                self._counted = self._counted or self._issued_since(before) > 0  # DDP's all-reduce was counted
            if self._oom is not None and self._oom[0] == "backward":
                self._complete_reduction(reduced())

    def _sharded_backward(self, inner: Callable[..., Any], loss: torch.Tensor, args: Any, kwargs: Any) -> Any:
        """FSDP2: run backward, its all-gathers and reduce-scatters fenced; the agreed failure, or None.

        A rank that runs out of memory goes to its agreement; the others meet it before their next collective of the
        backward (or at the step's agreement, when it failed after its last one), and every rank abandons the attempt.
        """
        _, tally, oom = self._fenced(lambda: inner(loss, *args, **kwargs))
        if oom:  # the failed graph is released by now
            self._note_oom("backward", self._current_size())
        if tally is None and self._oom is not None:
            tally = self._agree_fence(FAILED)
        return None if tally is None else self._fence_verdict()

    def _sharded_closure_backward(self, inner: Callable[..., Any], loss: torch.Tensor, args: Any, kwargs: Any) -> None:
        """FSDP2, the backward inside Lightning's closure: a failure is told at the step's one agreement.

        The hooks that follow backward (a ``sync_dist`` log in ``on_after_backward``) then run on every rank alike,
        whatever happened: a rank that ran out of memory posts its failure without waiting (the others may be past
        their last fenced collective, on their way into such a hook), and a rank stopped by another's failure goes on
        as well. Every rank unwinds at the step's agreement (``step_verdict``), where FSDP2 is reset.
        """
        _, tally, oom = self._fenced(lambda: inner(loss, *args, **kwargs))
        if oom:
            self._note_oom("backward", self._current_size())
            self._deferred = self._post_failure()
        elif tally is not None:
            self._abandoned = self._fence_verdict()

    def _fenced(self, call: Callable[[], Any]) -> tuple[Any, Tally | None, bool]:
        """Run ``call`` with its collectives fenced: ``(result, tally, oom)``.

        ``tally``: the agreement at which another rank's failure stopped it; ``oom``: it ran out of memory here (the
        error's text kept in ``_oom_text``). A timed-out agreement raises ``OOMGuardError``; other errors propagate.
        """
        try:
            with self._fence.watching():
                return call(), None, False
        except FenceAbort as abort:
            return None, abort.tally, False
        except FenceTimeout as exc:
            self._fence_timed_out(AT_END, exc)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            self._oom_text = _error_text(exc)
        return None, None, True

    @contextlib.contextmanager
    def _track_reduced(self) -> Iterator[Callable[[], list[torch.nn.Parameter]]]:
        """Yield a function listing the trainable parameters whose gradient this backward has not produced yet."""
        params = [p for p in self._module().parameters() if p.requires_grad]  # per step: a callback may unfreeze
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
