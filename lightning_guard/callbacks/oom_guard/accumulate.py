"""Lightning's gradient accumulation under OOMGuard: a batch that accumulates recovers where it fails.

Such a batch has no optimizer step of its own to retry in: its training step and backward are run here, and a failure
is recovered before Lightning goes on, by replaying the accumulation window's earlier batches for their gradients
(``_RetryLoop._replay``) and running the batch again in smaller micro-batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from lightning_guard._compat import logged_results
from lightning_guard.callbacks.oom_guard.attempt import _AttemptState, _PartLog
from lightning_guard.callbacks.oom_guard.common import _loss_of, _Retry, _with_loss
from lightning_guard.callbacks.oom_guard.retry import _RetryLoop


class _Accumulation(_RetryLoop):
    """The training step and backward of a batch that accumulates (``accumulate_grad_batches > 1``)."""

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
        # DDP, quiet steps: no agreement after the micro-batches before the last; a failure in one is told at the
        # last one's, before Lightning's backward (the batch then re-runs for real: its logs and metrics are exact)
        earlier = self._run_parts(parts[:-1], shares[:-1], self._batch_idx, step, defer=self._defer("end"))
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
        if self._sharded:  # FSDP2: a failure anywhere is agreed inside (fenced collectives) or at the end
            verdict = self._sharded_backward(inner, loss, args, kwargs) or self._end_verdict()
        elif self._distributed:
            self._ddp_backward(inner, loss, args, kwargs)
            # agreed here even in a quiet step: a healthy rank may be waiting at the fence in front of a collective of
            # its backward that no step issued before (carried further, the failed rank went on into Lightning's next
            # collective, the per-batch SIGTERM broadcast, and both waited for `collective_timeout`)
            verdict = self._end_verdict()
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
