"""The retry loop: a batch's attempts inside Lightning's optimizer step, in micro-batches, until one goes through.

A failed attempt unwinds out of Lightning's closure as ``_Retry`` up to the wrapped ``optimizer_step``, which
restores the attempt's snapshot, cleans up (:meth:`_RetryLoop._recover`: gradients, GradScaler, memory), takes the
size policy's decision and runs the batch again; the micro-batches before the last run here under ``no_sync``, the
last one through Lightning's closure.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from lightning_guard._compat import (
    call_training_step,
    ddp_buckets_rebuilt,
    ddp_sync_buffers_next_forward,
    logged_results,
    scaler_forget_step,
)
from lightning_guard._fence import AT_END, FAILED, Tally
from lightning_guard._sharded import reset_after_failure
from lightning_guard._wrapping import takes_batch_idx
from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.callbacks.oom_guard.attempt import _AttemptState, _PartLog
from lightning_guard.callbacks.oom_guard.common import (
    _MEM_KEYS,
    _WHERE,
    FENCED,
    Defer,
    _error_text,
    _loss_of,
    _memory_lists,
    _Retry,
)
from lightning_guard.callbacks.oom_guard.fence import _FenceProtocol
from lightning_guard.distributed import Agreement
from lightning_guard.errors import OOMGuardError
from lightning_guard.functional.oom import free_memory, is_oom_error, memory_stats


class _RetryLoop(_FenceProtocol):
    """Run a training batch's attempts, in micro-batches, and recover from a failed one."""

    def _guarded_step(self, step: Callable[[], Any], part: Any, synced: bool, defer: Defer = "") -> Any:
        """Run one ``training_step`` call; on out-of-memory here (or, under DDP, on any rank) abandon the attempt.

        Under DDP the call runs inside the fence: every collective it issues is preceded by an agreement, and one
        ends it where needed, so a rank that failed meets the others at their next agreement and no rank is left
        inside a collective. An abandoned call raises ``_Retry`` (``synced=False``: a micro-batch under ``no_sync``,
        where DDP expects no backward) or returns a zero loss whose backward completes DDP's armed all-reduce and then
        raises. ``defer`` (DDP, quiet steps, a micro-batch before the last, under ``no_sync``): no agreement at its
        end. A failure known here (this rank's, or another's met before a collective) skips the micro-batches (None)
        up to where it is told: the batch's last micro-batch, which has no agreement of its own in a quiet step, so
        the failure is posted now (``"last"``), or which ends with one (``"end"``, an accumulating batch).
        """
        if defer and (self._abandoned is not None or self._deferred is not None):
            return self._skipped()  # the attempt is abandoned: straight to where it is told
        if self._abandoned is not None:  # learned in an earlier micro-batch, before a collective: agreed already
            if not synced:
                raise _Retry(self._abandoned)
            return self._dummy_loss(self._module())  # complete DDP's all-reduce
        log = self._part_log
        if log is not None:
            log.enter(part)
        # A quiet step (no collective in any step so far, agreed by all ranks) has no agreement at its end: a rank
        # that fails completes DDP's all-reduce with a zero loss and tells the others at the step's one agreement.
        quiet = synced and self._quiet
        self._busy = True
        try:
            if self._oom is not None:  # this rank failed earlier in the attempt (a micro-batch's backward)
                tally = self._told_failure(quiet, defer)
                if tally is None:
                    return self._skipped() if defer else self._dummy_loss(self._module())
            else:
                # counted only while quiet steps are still possible (once a step issued a collective, never again)
                before = self._fence.issued() if self._fence.active and not self._loud else None
                model = self._trainer.strategy.model if self._trainer is not None else None
                rebuilt = ddp_buckets_rebuilt(model) if before is not None else True
                out, tally, oom = self._fenced(step)
                if not rebuilt and ddp_buckets_rebuilt(model):
                    before = self._fence.issued()  # a micro-batch's forward in which DDP rebuilt its buckets
                    # (its broadcasts, once per fit): not counted as a collective of the step
                if oom:  # the failed forward's frames are released by now
                    self._note_oom("forward", self._samples(part))
                    if not self._fence.active:
                        raise _Retry(self._local_agreement())
                    tally = self._told_failure(quiet, defer)
                    if tally is None:
                        return self._skipped(midway=True) if defer else self._dummy_loss(self._module())
                elif tally is None:
                    self._step_collectives += self._issued_since(before)
                    if not self._fence.active or quiet or defer:
                        if log is not None:
                            log.leave(self._weight(part))
                        return out
                    tally = self._agree_fence(AT_END)
                    if not tally.failed:
                        if log is not None:
                            log.leave(self._weight(part))
                        return out
                    del out
                elif defer:  # another rank's failure, met before a collective: on to where it is told
                    self._abandoned = self._fence_verdict()
                    return self._skipped(midway=True)
        finally:
            self._busy = False
        verdict = self._fence_verdict()
        if not synced or self._sharded:  # FSDP2: no DDP all-reduce is armed; every rank unwinds now
            raise _Retry(verdict)
        self._abandoned = verdict
        return self._dummy_loss(self._module())  # every rank: DDP armed its all-reduce in this forward

    def _skipped(self, midway: bool = False) -> None:
        """A deferred micro-batch skipped (None: no backward for it).

        ``midway``: its forward stopped midway; DDP is left as a completed forward under ``no_sync`` leaves it. That
        forward would have cleared DDP's broadcast-buffers-next-forward flag, as it did on the ranks whose forwards
        completed; left set, the next synced forward would broadcast BatchNorm's buffers on this rank alone.
        """
        if midway and self._trainer is not None:
            ddp_sync_buffers_next_forward(self._trainer.strategy.model, False)

    def _defer(self, to: Defer) -> Defer:
        """``to`` where a call under ``no_sync`` may go without an agreement at its end, else ``""``.

        DDP in a quiet step only: with a collective in the step (forward or backward), a healthy rank could enter an
        unfenced collective of its backward while a failed rank skips ahead.
        """
        return to if self._fence.active and not self._sharded and self._quiet else ""

    def _told_failure(self, quiet: bool, defer: Defer) -> Tally | None:
        """This rank failed (DDP): tell the others; the agreement, or None where it is told later.

        In a quiet step the failure is posted without waiting (its row completes the others' next agreement), and so
        in a micro-batch deferred to the batch's last; deferred to the last micro-batch of an accumulating batch, it
        is agreed there.
        """
        if quiet or defer == "last":
            if self._deferred is None:
                self._deferred = self._post_failure()
            return None
        if defer:
            return None
        return self._agree_fence(FAILED)

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
                self._part_log.release()
            attempt.restore()  # buffers, metrics and logged values as before the failed attempt
            self._recover(optimizer, verdict)
            rerun = True

    def _strategy_step(self, part: Any, batch_idx: int) -> Any:
        """``training_step`` on a micro-batch through the strategy (DDP's forward), outside Lightning's closure."""
        trainer = self._trainer
        assert trainer is not None
        step_args = (batch_idx,) if takes_batch_idx(self._module().training_step) else ()
        return call_training_step(trainer, part, *step_args)

    def _run_parts(
        self,
        parts: list[Any],
        shares: list[float],
        batch_idx: int,
        step: Callable[[Any, int], Any] | None = None,
        defer: Defer = "",
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
                out = self._guarded_step(functools.partial(step, part, batch_idx), part, synced=False, defer=defer)
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
                    self._part_backward(scaler.scale(scaled) if scaler is not None else scaled, part)
                finally:
                    self._busy = False
                    del scaled
            if self._oom is not None and not self._distributed:
                raise _Retry(self._local_agreement())
        return earlier

    def _part_backward(self, loss: torch.Tensor, part: Any) -> None:
        """A micro-batch's backward outside Lightning's closure; an out-of-memory is noted (FSDP2: agreed, raised)."""
        if self._sharded:  # its all-gathers and reduce-scatters are collectives: fenced, a failure unwinds every rank
            verdict = self._sharded_backward(self._inner["backward"], loss, (), {})
            if verdict is not None:
                raise _Retry(verdict)
            return
        try:
            self._inner["backward"](loss)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            self._oom_text = _error_text(exc)
            self._note_oom("backward", self._samples(part))

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
        tally = self._agree_fence(FAILED if self._oom is not None else AT_END)
        return self._fence_verdict() if tally.failed else None

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
        # DDP, quiet steps: no agreement after these micro-batches (under no_sync, nothing to meet); a failure in one is
        # told at the last one, whose backward holds DDP's all-reduce (FSDP2: every micro-batch's collectives fenced)
        earlier = self._run_parts(parts[:-1], shares[:-1], batch_idx, defer=self._defer("last"))
        # the last part runs through Lightning's closure (its backward is DDP's own, overlapped all-reduce); a rank
        # that failed in an earlier part's backward meets the others at that part's first agreement
        self._mode, self._last_part, self._last_share, self._earlier = "last", parts[-1], shares[-1], earlier
        del parts
        return closure()

    def _recover(self, optimizer: Any, verdict: Agreement, forget_attempt: bool = True) -> None:
        """Clean up after a failed attempt (gradients, GradScaler state, memory), halve, and say so."""
        trainer = self._trainer
        assert trainer is not None
        if verdict is FENCED:  # agreed on the fence by counts: who failed, where, at what size (every rank is here)
            verdict = self._failure_details()
        start = time.perf_counter()
        # FSDP2 (one process too) after a forward or backward abandoned mid-flight: resharded, trackers cleared
        reset_after_failure(self._module(), training=True)
        # DDP: the re-run's first forward broadcasts the buffers on every rank, as a batch's first forward does (the
        # failed forward left its rank's flag from before it, the others' from their last forward: a hang)
        ddp_sync_buffers_next_forward(trainer.strategy.model, True)
        optimizer.zero_grad(set_to_none=True)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scaler_forget_step(scaler)
        for cb in trainer.callbacks if forget_attempt else ():  # type: ignore[attr-defined]
            if isinstance(cb, GuardCallback):
                cb.on_batch_retry(trainer)
        free_memory(trainer.strategy.root_device)
        cleanup_ms = round((time.perf_counter() - start) * 1000.0, 1)
        failed = {r: verdict.values[r] for r in verdict.ranks}
        policy, shrink = self._policy().after_oom(v[1] for v in failed.values())
        size = shrink.failed
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
        if shrink.grow_back_failed:
            data["reason"] = "grow_back_failed"
        elif shrink.give_up:
            self._fatal(verdict.ranks, memory)
        new = shrink.new
        self._adopt(policy)
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
        self.runtime(trainer).events.dump_outbox()  # every rank: its events not yet gathered go to disk now
        raise OOMGuardError(message, 1, ranks, memory)
