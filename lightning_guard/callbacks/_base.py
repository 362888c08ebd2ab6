"""The shared base of every lightning_guard callback.

The first guard in ``trainer.callbacks`` owns the per-trainer runtime for the fit: it creates it at setup, fixes the
event log's directory identically on every rank, hooks the optimizers at train start, resolves each step's outcome,
exchanges events across ranks at epoch end and fit end, prints the summary, stores the runtime in checkpoints and
restores it. The other guards only use it. Subclasses call ``super()`` in every hook they override.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import inspect
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_guard import _wandb
from lightning_guard._agreement import StepVotes
from lightning_guard._checks import check_int
from lightning_guard._compat import spawn_launched
from lightning_guard._metrics import due, write_metrics
from lightning_guard._runtime import (
    CHECKPOINT_KEY,
    EventCarrier,
    GuardRuntime,
    emit,
    get_runtime,
    register_hand_back_reader,
    reset_runtime,
    sync_events,
)
from lightning_guard._sharded import fsdp_modules, reshard
from lightning_guard.errors import GuardConfigError
from lightning_guard.events import GuardEvent, Severity, _resolve_log_dir

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
    return spawn_launched(trainer)


_DISCARD_AT_EXIT: set[str] = set()


def _discard(token: str) -> None:
    with contextlib.suppress(OSError):
        _hand_back_path(token).unlink(missing_ok=True)


def _recover_spawned(trainer: pl.Trainer) -> None:
    """In the process that launched a ddp_spawn fit: load what its rank 0 handed back, once.

    The workers' guards are copies: without this, the launching process's guards and event stream stay empty.
    """
    guards = [cb for cb in trainer.callbacks if isinstance(cb, GuardCallback)]  # type: ignore[attr-defined]
    if not guards or guards[0].__dict__.get("_in_worker") or not _spawned_worker(trainer):
        return
    token = guards[0].__dict__.pop("_spawn_token", None)  # one fit's hand-back, read once
    for cb in guards[1:]:
        cb.__dict__.pop("_spawn_token", None)
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
        try:
            cb.load_state_dict(state)
        except Exception as exc:  # one guard's state must not cost the others theirs, nor the events
            warnings.warn(
                f"lightning_guard: the final state of {type(cb).__name__} handed back by the ddp_spawn workers could "
                f"not be loaded: {exc}",
                stacklevel=2,
            )


register_hand_back_reader(_recover_spawned)

_AFTER_EXCEPTION = "_lightning_guard_after_exception"


def after_exception_callbacks(trainer: pl.Trainer, action: Callable[[], None], *, last: bool = False) -> None:
    """Run ``action`` once every callback's ``on_exception`` has run, before the strategy's and the loggers'.

    Lightning moves checkpoint callbacks to the end of the callback list, and ``OnExceptionCheckpoint`` writes the
    crash checkpoint in its ``on_exception``: a guard that changes the model when a fit fails (OverfitGuard's
    restore of the best weights) must act after that, or the crash checkpoint mixes two points of the run. Lightning
    calls ``trainer.strategy.on_exception`` right after the callbacks' hooks; the actions run there (a wrapper on the
    strategy instance for this one exception). ``last`` actions (closing the event log) run after the others. An
    action that fails is reported as a warning: the exception being handled stays the one raised.
    """
    strategy = trainer.strategy
    pending: dict[bool, list[Callable[[], None]]] | None = strategy.__dict__.get(_AFTER_EXCEPTION)
    if pending is None:
        pending = {False: [], True: []}
        original = strategy.on_exception

        def on_exception(exception: BaseException) -> None:
            strategy.__dict__.pop("on_exception", None)
            actions = strategy.__dict__.pop(_AFTER_EXCEPTION, {False: [], True: []})
            for act in [*actions[False], *actions[True]]:
                try:
                    act()
                except Exception as exc:
                    warnings.warn(f"lightning_guard: after {type(exception).__name__}: {exc!r}", stacklevel=1)
            original(exception)

        strategy.__dict__["on_exception"] = on_exception
        strategy.__dict__[_AFTER_EXCEPTION] = pending
    pending[last].append(action)


#: members of the guard protocol under their names before it was public (lightning_guard 0.1) -> their names now
_RENAMED = {
    "_step_vote": "step_vote",
    "_step_verdict": "step_verdict",
    "_on_batch_retry": "on_batch_retry",
    "_vote_first": "vote_first",
    "_vote_in_place": "vote_in_place",
    "_emit": "emit",
}


class GuardCallback(Callback):
    """Base class of the guards, public for guards of your own (docs/extending.md).

    The protocol a guard implements: :meth:`step_vote`, :meth:`step_detail` and :meth:`step_verdict` (its part in the
    one agreement per optimizer step), :attr:`vote_first` / :attr:`vote_in_place`, :meth:`on_batch_retry`,
    :meth:`setup_problems`; what it uses: :meth:`emit` (events), :meth:`runtime` (the per-trainer runtime). Call
    ``super()`` in every Lightning hook you override: the first guard in ``trainer.callbacks`` owns the runtime and
    works in those hooks.
    """

    #: short name used in events and metric names (``guard/<name>/<kind>``)
    guard_name: str = "guard"
    #: the first guard in the callback list carries the trainer's events (``_runtime.events_carrier``)
    carries_events = EventCarrier.GUARD
    #: this guard's vote goes in front of the others' in the step's agreement (OOMGuard: a failed attempt is abandoned
    #: before any guard judges its gradients)
    vote_first = False
    #: this guard's vote depends on where it sits in the callback list (GradientGuard judges the gradients as the
    #: callbacks listed before it left them): the step's agreement runs in the last such guard's
    #: ``on_before_optimizer_step`` (without one, in the owner's, first)
    vote_in_place = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        old = sorted(set(cls.__dict__) & set(_RENAMED))
        if old:
            raise GuardConfigError(
                f"{cls.__name__} defines `{old[0]}`, which the guard protocol calls `{_RENAMED[old[0]]}` (renamed "
                "after lightning_guard 0.1.0, now public): rename it, or it is never called (docs/extending.md)"
            )

    def __getattr__(self, name: str) -> Any:
        if name in _RENAMED:
            raise AttributeError(
                f"GuardCallback.{name} is now `{_RENAMED[name]}` (renamed after lightning_guard 0.1.0)"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
        if "_spawn_token" not in self.__dict__:
            token = uuid.uuid4().hex
            self.__dict__["_spawn_token"] = token
            if token not in _DISCARD_AT_EXIT:  # a hand-back nobody reads goes with the launching process
                _DISCARD_AT_EXIT.add(token)
                atexit.register(_discard, token)
        return {**self.__dict__, "_wandb_root": _wandb.spawn_root_dir()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # in a ddp_spawn worker, before Lightning attaches the W&B run: its media go to the run's folder, not ./wandb
        state = dict(state)
        _wandb.adopt_spawn_root_dir(state.pop("_wandb_root", None))
        self.__dict__.update(state)

    def __deepcopy__(self, memo: dict[int, Any]) -> GuardCallback:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            if key != "_spawn_token":  # a copy is another callback: it hands back under a token of its own
                clone.__dict__[key] = copy.deepcopy(value, memo)
        return clone

    def _reset_for_fit(self) -> None:
        """Start a fit again with the state of a fresh instance, keeping the configuration as the user last set it.

        Called at ``setup("fit")`` of every fit after the first (a checkpoint being resumed is loaded after it, so
        resume stays exact). Constructor arguments come from the instance's attributes of the same name where the
        user changed them after the previous fit (the value differs from the one that fit left), else from the
        original call; attributes that a fresh instance does not have (a subclass's own) are kept.
        """
        left = self.__dict__.get("_left")
        if left is None:
            return  # never fitted: as constructed, plus whatever the user set
        args, kwargs = self.__dict__.get("_init_args", ((), {}))
        try:
            bound = inspect.signature(type(self)).bind(*args, **kwargs)
        except TypeError:
            bound = None
        if bound is not None:
            for name in list(inspect.signature(type(self)).parameters):
                current = self.__dict__.get(name, left.get(name))
                if name in self.__dict__ and name in left and current is not left[name]:
                    bound.arguments[name] = current  # changed by the user between fits
            args, kwargs = bound.args, bound.kwargs
        fresh = type(self)(*args, **kwargs)
        own = ("_left", "_spawn_token")
        extras = {k: v for k, v in self.__dict__.items() if k not in fresh.__dict__ and k not in own}
        token = self.__dict__.get("_spawn_token")
        self.__dict__.clear()
        self.__dict__.update(fresh.__dict__)
        self.__dict__.update(extras)
        if token is not None:
            self.__dict__["_spawn_token"] = token

    def _end_fit(self) -> None:
        """Remember what this fit left, to tell the user's changes from the guard's own at the next fit."""
        self.__dict__["_left"] = {k: v for k, v in self.__dict__.items() if k != "_left"}

    @staticmethod
    def _roles(trainer: pl.Trainer) -> tuple[GuardCallback | None, GuardCallback | None, list[GuardCallback]]:
        """``(owner, agreeing guard, voters in vote order)`` for the trainer's callback list as it is.

        Asked in every hook of every guard: worked out once and kept with the trainer until the list changes. The
        owner is the first guard; the step's agreement runs in the last guard with ``vote_in_place`` (else in the
        owner's hook); votes are laid out in callback order, ``vote_first`` guards in front.
        """
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        cached = trainer.__dict__.get("_lightning_guard_roles")
        if cached is None or cached[0] is not callbacks or cached[1] != len(callbacks):
            guards = [cb for cb in callbacks if isinstance(cb, GuardCallback)]
            owner = guards[0] if guards else None
            in_place = [cb for cb in guards if cb.vote_in_place]
            voters = sorted(guards, key=lambda cb: not cb.vote_first)
            cached = (callbacks, len(callbacks), (owner, in_place[-1] if in_place else owner, voters))
            trainer.__dict__["_lightning_guard_roles"] = cached
        return cached[2]

    def _is_owner(self, trainer: pl.Trainer) -> bool:
        return self._roles(trainer)[0] is self

    def _generate_state_key(self, **kwargs: Any) -> str:
        # Lightning reads ``state_key`` at every hook call (to name the profiler's section): built once per value
        items = tuple(kwargs.items())
        cached = self.__dict__.get("_state_key_cache")
        if cached is not None and cached[0] == items:
            return cached[1]
        key = super()._generate_state_key(**kwargs)
        self.__dict__["_state_key_cache"] = (items, key)
        return key

    def runtime(self, trainer: pl.Trainer) -> GuardRuntime:
        """The trainer's guard runtime."""
        return get_runtime(trainer)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._reset_for_fit()
            self.__dict__["_in_worker"] = _spawned_worker(trainer)  # a copy living in a ddp_spawn worker
            if not _spawned_worker(trainer):  # a fit in this process: no earlier spawn's hand-back applies to it
                token = self.__dict__.pop("_spawn_token", None)
                if token is not None:
                    _discard(token)
        if not self._is_owner(trainer):
            return
        runtime = reset_runtime(trainer) if stage == "fit" else get_runtime(trainer)
        if runtime.events.has_log_dir:  # validate/test/predict after a fit: the fit's run directory
            return
        run_id: str | None = runtime.events.run_id
        log_dir = str(_resolve_log_dir(trainer, runtime.events.run_id)) if trainer.global_rank == 0 else None
        if trainer.world_size > 1:
            log_dir, run_id = trainer.strategy.broadcast((log_dir, run_id), src=0)
        if log_dir is not None:
            runtime.events.set_log_dir(log_dir, run_id)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        # FSDP2 keeps the root's parameters gathered after a validation (the sanity check) until the first step: the
        # guards start from the sharded parameters the optimizer holds, not those temporary full tensors (freed later)
        reshard(fsdp_modules(pl_module))
        if self._is_owner(trainer):
            self.runtime(trainer).attach(list(trainer.optimizers))

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        runtime = self.runtime(trainer)
        if self._is_owner(trainer):
            runtime.before_optimizer_step(optimizer)
        _, agreeing, voters = self._roles(trainer)
        if agreeing is self:
            runtime.agree_step(pl_module, optimizer, voters)  # every guard's vote, one collective

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._is_owner(trainer):
            self.runtime(trainer).note_batch_start()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._is_owner(trainer):
            self.runtime(trainer).note_backward()

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
        # The summary comes from the last guard's on_fit_end: every guard's fit-end work (CompressExport's
        # compression, export and verification) has run by then and is in the table.
        guards = [cb for cb in trainer.callbacks if isinstance(cb, GuardCallback)]  # type: ignore[attr-defined]
        if guards and guards[-1] is self:
            self._sync_events(trainer, force_table=True)
            self.runtime(trainer).events.print_summary()

    def setup_problems(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """What in this fit's set-up the guard refuses: one sentence each, naming the setting and the way out.

        Called at fit start, once the optimizers and schedulers exist and before any step, for every guard by the
        first one, which raises them all in one ``GuardConfigError`` (a script with three problems learns of all
        three in one run, not in three restarts). Override it (calling ``super()``) in a guard of your own.
        """
        return []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._is_owner(trainer):
            return
        guards = [cb for cb in trainer.callbacks if isinstance(cb, GuardCallback)]  # type: ignore[attr-defined]
        problems = [p for cb in guards for p in cb.setup_problems(trainer, pl_module)]
        if len(problems) == 1:
            raise GuardConfigError(problems[0])
        if problems:
            listed = "\n".join(f"  {i}. {p}" for i, p in enumerate(problems, 1))
            raise GuardConfigError(f"lightning_guard refuses this set-up, {len(problems)} problems:\n{listed}")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end_fit()  # Lightning runs no teardown when fit fails
        if self._is_owner(trainer):
            self.runtime(trainer).detach()
            stream = self.runtime(trainer).events

            def close() -> None:
                stream.dump_outbox()
                stream.close()

            # after the other guards' deferred actions (their events reach the log), and after the crash checkpoint
            after_exception_callbacks(trainer, close, last=True)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = None
        if stage == "fit":
            self._end_fit()
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

    def emit(
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

    def log_metrics(
        self,
        trainer: pl.Trainer,
        metrics: Mapping[str, float | torch.Tensor],
        *,
        every: int | None = None,
        monitorable: bool = False,
        **log_kwargs: Any,
    ) -> None:
        """Report this guard's numbers: the one path from a guard to the loggers.

        Direct by default: rank 0 writes ``metrics`` to every logger at the global step, when the step is a multiple
        of ``every`` (every call without it); no host sync, nothing else sees them. With ``monitorable=True`` they go
        through the LightningModule's ``log_dict`` (``log_kwargs`` passed on: ``on_step``, ``on_epoch``,
        ``sync_dist``...), so that they reach ``trainer.callback_metrics``, where ``ModelCheckpoint`` and
        ``EarlyStopping`` can monitor them, at Lightning's logging step and cadence.

        The built-in guards call ``GuardCallback.log_metrics(self, ...)``, not ``self.log_metrics``: a subclass's own
        method of that (common) name does not take their numbers over.
        """
        if every is not None:
            check_int("every", every, low=1)
        if monitorable:
            if every is not None:
                raise GuardConfigError(
                    f"`every` is for direct metrics; monitorable metrics follow the Trainer's `log_every_n_steps`, "
                    f"got every={every!r}"
                )
            trainer.lightning_module.log_dict(dict(metrics), **log_kwargs)
            return
        if log_kwargs:
            raise GuardConfigError(
                f"{sorted(log_kwargs)} are `self.log` options: pass them with monitorable=True, got {log_kwargs!r}"
            )
        if every is not None and not due(int(trainer.global_step), every):
            return
        write_metrics(trainer, {k: float(v) for k, v in metrics.items()})

    def _reported(self, trainer: pl.Trainer, kind: str) -> bool:
        """Whether this run's event log already holds a ``kind`` event of this guard.

        A resumed run restores the log from the checkpoint, so once-per-run announcements are not repeated.
        """
        return any(e.guard == self.guard_name and e.kind == kind for e in self.runtime(trainer).events.events)

    def step_vote(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor | list[float] | None:
        """This rank's numbers for the step's one agreement (a 1-d tensor on any device, or floats), or None.

        Called on every rank at every optimizer step, before any guard's ``on_before_optimizer_step`` work; the count
        of numbers must be the same on every rank. The answer comes to :meth:`step_verdict`.
        """
        return None

    def step_detail(self, total: tuple[float, ...]) -> bool:
        """Whether this step's verdict needs every rank's vote, judging from the votes summed over the ranks.

        The step agreement is one all-reduce of every guard's numbers: a fixed-size message whatever the number of
        ranks. Every rank's row is gathered, in a second collective, only on a step where a guard answers True here.
        The answer must depend on ``total`` alone (it is the same on every rank). The default, True, hands every
        rank's vote to every verdict (the protocol before the sums): override it to return False where the sums
        suffice (GradientGuard asks for the rows only when a sum is not finite: which rank?).
        """
        return True

    def step_verdict(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, votes: StepVotes) -> None:
        """This step's votes (called only for a guard that voted).

        ``votes.total``: the sums over the ranks; ``votes.rows``: every rank's vote in rank order on a step where any
        guard's :meth:`step_detail` asked for rows (and on one process), else None. ``votes`` is also the sequence of
        those rows.
        """

    def on_batch_retry(self, trainer: pl.Trainer) -> None:
        """The current batch is about to be run again (OOMGuard): forget what this attempt recorded."""

    def _sync_events(self, trainer: pl.Trainer, *, force_table: bool = False) -> None:
        sync_events(trainer, force_table=force_table)
