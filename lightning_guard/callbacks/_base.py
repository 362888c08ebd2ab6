"""The shared base of every lightning_guard callback.

The first guard in ``trainer.callbacks`` owns the per-trainer runtime for the fit: it creates it at setup, fixes the
event log's directory identically on every rank, hooks the optimizers at train start, resolves each step's outcome,
exchanges events across ranks at epoch end and fit end, prints the summary, stores the runtime in checkpoints and
restores it. The other guards only use it. Subclasses call ``super()`` in every hook they override.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_guard._runtime import CHECKPOINT_KEY, GuardRuntime, get_runtime, reset_runtime
from lightning_guard.events import GuardEvent, Severity, _resolve_log_dir, emit

__all__ = ["GuardCallback"]


def _hand_back_path(token: str) -> Path:
    return Path(tempfile.gettempdir()) / f"lightning_guard-{token}.pt"


def _holds_large_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() > _HAND_BACK_MAX_NUMEL
    if isinstance(value, dict):
        return any(_holds_large_tensor(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_holds_large_tensor(v) for v in value)
    return False


def _without_large_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """The state without its entries holding weight-sized tensors."""
    return {k: v for k, v in state.items() if not _holds_large_tensor(v)}


_HAND_BACK_MAX_NUMEL = 65536


def _spawned_worker(trainer: pl.Trainer) -> bool:
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    return isinstance(launcher, _MultiProcessingLauncher) and launcher._start_method == "spawn"


def _recover_spawned(trainer: pl.Trainer) -> None:
    """In the process that launched a ddp_spawn fit: load what its rank 0 handed back, once.

    The workers' guards are copies: without this, the launching process's guards and event stream stay empty.
    """
    guards = [cb for cb in trainer.callbacks if isinstance(cb, GuardCallback)]  # type: ignore[attr-defined]
    if not guards or guards[0].__dict__.get("_in_worker"):
        return
    token = guards[0].__dict__.get("_spawn_token")
    if token is None or not _hand_back_path(token).exists():
        return
    path = _hand_back_path(token)
    payload = torch.load(path, weights_only=False)  # written by this run's rank 0 under an unguessable name
    path.unlink()
    runtime = get_runtime(trainer)
    runtime.events.set_log_dir(Path(payload["jsonl"]).parent)
    runtime.load_state_dict(payload["runtime"])
    runtime.applied_steps = list(runtime._restored_steps or [])
    for cb, state in zip(guards, payload["guards"], strict=False):
        cb.load_state_dict(state)


class GuardCallback(Callback):
    """Base class of the guards: runtime ownership and the event-stream plumbing."""

    #: short name used in events and metric names (``guard/<name>/<kind>``)
    guard_name: str = "guard"

    def __new__(cls, *args: Any, **kwargs: Any) -> GuardCallback:
        self = super().__new__(cls)
        self.__dict__["_init_args"] = (args, kwargs)  # to start each fit as a fresh instance (pickling keeps it)
        return self

    def __init__(self) -> None:
        super().__init__()
        self._trainer: pl.Trainer | None = None  # the trainer being fitted, for runtime listeners (None outside fit)

    def __getstate__(self) -> dict[str, Any]:
        # Pickled in the launching process by ddp_spawn: a token shared by this instance and its copies in the
        # workers, under which rank 0 hands the run's events and the guards' states back (see `_recover_spawned`).
        self.__dict__.setdefault("_spawn_token", uuid.uuid4().hex)
        return self.__dict__.copy()

    def _reset_for_fit(self) -> None:
        """Return to the state of a freshly constructed instance, so that a reused callback equals a new one.

        Called at ``setup("fit")``; a checkpoint being resumed is loaded after it, so resume stays exact.
        """
        args, kwargs = self.__dict__.get("_init_args", ((), {}))
        token = self.__dict__.get("_spawn_token")
        fresh = type(self)(*args, **kwargs)
        self.__dict__.clear()
        self.__dict__.update(fresh.__dict__)
        if token is not None:
            self.__dict__["_spawn_token"] = token

    def _is_owner(self, trainer: pl.Trainer) -> bool:
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, GuardCallback):
                return cb is self
        return False

    def runtime(self, trainer: pl.Trainer) -> GuardRuntime:
        """The trainer's guard runtime."""
        return get_runtime(trainer)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset_for_fit()
            self.__dict__["_in_worker"] = _spawned_worker(trainer)  # a copy living in a ddp_spawn worker
        if not self._is_owner(trainer):
            return
        runtime = reset_runtime(trainer) if stage == "fit" else get_runtime(trainer)
        log_dir = str(_resolve_log_dir(trainer)) if trainer.global_rank == 0 else None
        if trainer.world_size > 1:
            log_dir = trainer.strategy.broadcast(log_dir, src=0)
        if log_dir is not None:
            runtime.events.set_log_dir(log_dir)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        if self._is_owner(trainer):
            self.runtime(trainer).attach(list(trainer.optimizers))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._is_owner(trainer):
            self.runtime(trainer).before_optimizer_step(optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._is_owner(trainer):
            self.runtime(trainer).after_batch()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._is_owner(trainer):
            self._sync_events(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._is_owner(trainer):
            self._sync_events(trainer, force_table=True)
            self.runtime(trainer).events.print_summary()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._is_owner(trainer):
            stream = self.runtime(trainer).events
            stream.dump_outbox()
            stream.close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None
        if self._is_owner(trainer):
            runtime = self.runtime(trainer)
            runtime.detach()
            runtime.events.close()
            if stage == "fit" and trainer.global_rank == 0 and _spawned_worker(trainer):
                self._hand_back(trainer)

    def _hand_back(self, trainer: pl.Trainer) -> None:
        """ddp_spawn worker, rank 0: leave the run's events and every guard's state for the launching process."""
        token = self.__dict__.get("_spawn_token")
        if token is None:
            return
        guards = [cb for cb in trainer.callbacks if isinstance(cb, GuardCallback)]  # type: ignore[attr-defined]
        payload = {
            "runtime": self.runtime(trainer).state_dict(),
            # weight-sized copies (OverfitGuard's best weights) stay behind: the weights come back through Lightning
            "guards": [_without_large_tensors(cb.state_dict()) for cb in guards],
            "jsonl": str(self.runtime(trainer).events.jsonl_path),
        }
        folder = _hand_back_path(token).parent
        for stale in folder.glob("lightning_guard-*.pt"):  # left by runs whose launcher never asked for them
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > 3600:
                    stale.unlink()
        torch.save(payload, _hand_back_path(token))

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._is_owner(trainer):
            checkpoint[CHECKPOINT_KEY] = self.runtime(trainer).state_dict()

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._is_owner(trainer) and CHECKPOINT_KEY in checkpoint:
            self.runtime(trainer).load_state_dict(checkpoint[CHECKPOINT_KEY])

    def _emit(
        self,
        trainer: pl.Trainer,
        kind: str,
        message: str,
        *,
        severity: Severity = "info",
        data: dict[str, Any] | None = None,
        ranks: tuple[int, ...] = (),
        rank_zero_only: bool = False,
    ) -> None:
        """Report an event of this guard (only from rank 0 with ``rank_zero_only``, for decisions all ranks share)."""
        if rank_zero_only and trainer.global_rank != 0:
            return
        event = GuardEvent.at(
            trainer, self.guard_name, kind, severity=severity, message=message, data=data or {}, ranks=ranks
        )
        emit(trainer, event)

    def _reported(self, trainer: pl.Trainer, kind: str) -> bool:
        """Whether this run's event log already holds a ``kind`` event of this guard.

        A resumed run restores the log from the checkpoint, so once-per-run announcements are not repeated.
        """
        return any(e.guard == self.guard_name and e.kind == kind for e in self.runtime(trainer).events.events)

    def _on_batch_retry(self, trainer: pl.Trainer) -> None:
        """The current batch is about to be run again (OOMGuard): forget what this attempt recorded."""

    def _sync_events(self, trainer: pl.Trainer, *, force_table: bool = False) -> None:
        stream = self.runtime(trainer).events
        if trainer.world_size > 1:
            stream.exchange()
        stream.refresh_table(force=force_table)
