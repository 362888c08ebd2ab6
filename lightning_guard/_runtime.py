"""Per-trainer shared state of the guards: the event stream and the applied-step counter.

The **applied-step counter** counts, per optimizer, the optimizer steps that really updated the weights. Lightning's
``global_step`` counts every attempted step, including those the 16-mixed GradScaler skipped on inf/NaN gradients
and those a guard skipped. The counter is driven by ``torch.optim.Optimizer.register_step_post_hook``: the hook runs
only when ``optimizer.step()`` actually runs (the GradScaler does not call it when it skips), and a guard that skips
a step marks it with :meth:`GuardRuntime.request_skip` before the step. A fused optimizer stepped through the
GradScaler is handed ``found_inf`` and checked in the hook. No host sync is added on the ordinary path.

Listeners (WarmupCosine, GradientGuard) are told after every step whether it was applied.

**The step's one agreement.** Guards that must agree with the other ranks on every optimizer step (GradientGuard's
gradient norm and loss, OOMGuard's status under DDP) do not each issue a collective: at ``on_before_optimizer_step``
(in the hook of the last guard whose vote depends on its place in the callback list, GradientGuard; otherwise in the
first guard's) the runtime asks every guard for its vote (:meth:`GuardCallback.step_vote`: a few numbers, the same
count on every rank), joins them with the number of guard events waiting on this rank, reads the device values once
(the step's one host sync), sums the row over the ranks in one all-reduce of a fixed-size vector (its cost does not
grow with the number of ranks) and hands each guard its columns (:meth:`GuardCallback.step_verdict`) before any of
them judges the step. Every rank's row is gathered in a second collective only on a step where a guard asks for it
from the sums (a non-finite norm: which rank?). A guard that established that the step's
gradients are finite says so (:meth:`GuardRuntime.note_finite`), and the fused-optimizer ``found_inf`` read is then
skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lightning_guard._agreement import StepChannel, StepVotes, sum_on_device, to_host, wants_rows
from lightning_guard._compat import unwrap_optimizer
from lightning_guard._state import StateSchema
from lightning_guard.distributed import Agreement, agree, world_size
from lightning_guard.errors import GuardConfigError
from lightning_guard.events import EventStream, GuardEvent
from lightning_guard.lr_scheduler import APPLIED_STEPS_ATTR

if TYPE_CHECKING:
    import lightning.pytorch as pl

_ATTR = "_lightning_guard_runtime"
#: the runtime's checkpoint state (version 0: before states carried versions)
_STATE = StateSchema(
    "lightning_guard runtime (checkpoint key 'lightning_guard')",
    1,
    frozenset({"applied_steps", "events"}),
    legacy={"applied_steps": [], "events": {"events": []}},
)
CHECKPOINT_KEY = "lightning_guard"


@dataclass(frozen=True)
class StepOutcome:
    """What happened to one optimizer step.

    Attributes:
        optimizer_idx: index of the optimizer in ``trainer.optimizers``.
        applied: True if the step updated the weights.
        reason: ``"applied"``, ``"guard_skip"``, ``"amp_overflow"`` (the GradScaler found inf/NaN) or ``"no_loss"``
            (``training_step`` returned ``None``: no gradient, nothing to apply).
        applied_steps: the optimizer's applied-step count after this step.
        step: the trainer's global step of the attempt.
    """

    optimizer_idx: int
    applied: bool
    reason: str
    applied_steps: int
    step: int = 0


Listener = Callable[[StepOutcome], None]


class GuardRuntime:
    """Shared state of all guards on one trainer. Obtain it with :func:`get_runtime`."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.events = EventStream(trainer)
        self.applied_steps: list[int] = []
        self._listeners: list[Listener] = []
        self._handles: list[Any] = []
        self._optimizers: list[torch.optim.Optimizer] = []
        self._pending: dict[int, bool] = {}  # optimizer idx -> on_before_optimizer_step seen, step not yet resolved
        self._skip_requested: set[int] = set()
        self._no_loss: set[int] = set()  # optimizers whose attempted step has no loss behind it
        self._backwards = 0  # backward passes so far
        self._backwards_seen: dict[int, int] = {}  # per optimizer: backward passes when its last step resolved
        self._last_batch_backward = False  # whether the current micro-batch's training_step ran backward
        self._tracking = False  # a guard reports batches and backward passes (an injector alone does not)
        self._attempt_step: dict[int, int] = {}
        # per optimizer: each group's LR as its last attempted step used it (a float, or a copy of a tensor LR: no sync)
        self.applied_lrs: list[list[float | torch.Tensor]] = []
        self.applied_lr_scales: list[float] = []  # the guards' LR scale in force at that step (1.0: as scheduled)
        self._restored_steps: list[int] | None = None
        self.lr_scales: list[dict[str, float]] = []
        self._saved_lrs: dict[int, list[Any]] = {}
        self._finite: set[int] = set()  # optimizers whose step's gradients a guard found finite (agreed)
        # holds the step agreement on a guard's own group (OOMGuard's gloo fence, with its timeout); None: the strategy
        self._step_channel: StepChannel | None = None
        self.step_row_size = 0  # the length of the step agreement's row (votes and the pending count), once known

    # ------------------------------------------------------------------ wiring
    def add_listener(self, listener: Listener) -> None:
        """Be told the outcome of every optimizer step."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    def attach(self, optimizers: list[torch.optim.Optimizer]) -> None:
        """Hook the trainer's optimizers (called at train start, after checkpoint restore)."""
        self.detach()
        self._optimizers = list(optimizers)
        restored = self._restored_steps or []
        self.applied_steps = [restored[i] if i < len(restored) else 0 for i in range(len(optimizers))]
        self.lr_scales = [{} for _ in optimizers]
        self.applied_lrs = [[_lr_copy(g["lr"]) for g in opt.param_groups] for opt in optimizers]
        self.applied_lr_scales = [1.0 for _ in optimizers]
        for idx, opt in enumerate(self._optimizers):
            setattr(opt, APPLIED_STEPS_ATTR, self.applied_steps[idx])
            self._handles.append(opt.register_step_post_hook(self._make_post_hook(idx)))
        self._wrap_strategy_step()

    def _wrap_strategy_step(self) -> None:
        """Resolve a step the moment ``strategy.optimizer_step`` returns, before Lightning steps the LR schedulers.

        A step the GradScaler skipped never runs the optimizer's post-step hook. Resolving it only at
        ``on_train_batch_end`` would come after Lightning's ``update_lr_schedulers``: restoring the unscaled LR then
        would undo the scheduler's step (ExponentialLR would lose a decay). Every optimizer step, automatic or
        manual, goes through ``strategy.optimizer_step``; the wrapper lives on the strategy instance for the fit.
        """
        strategy = self.trainer.strategy
        current = strategy.__dict__.get("optimizer_step")
        ours = current is not None and "_lightning_guard_original" in getattr(current, "__dict__", {})
        # An earlier fit's wrapper is replaced, not stacked; a user's own instance override is wrapped and put back
        # at detach.
        previous = current.__dict__["_lightning_guard_previous"] if ours else current
        original = current.__dict__["_lightning_guard_original"] if ours else strategy.optimizer_step

        def optimizer_step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(optimizer, *args, **kwargs)
            idx = self.optimizer_index(optimizer)
            if idx in self._pending:  # attempted (on_before_optimizer_step ran) but the step itself never ran
                self._resolve_unrun(idx)
            return out

        optimizer_step.__dict__["_lightning_guard_runtime"] = self
        optimizer_step.__dict__["_lightning_guard_original"] = original
        optimizer_step.__dict__["_lightning_guard_previous"] = previous
        strategy.__dict__["optimizer_step"] = optimizer_step
        self._strategy = strategy

    def detach(self) -> None:
        """Remove the optimizer hooks and the strategy wrapper."""
        for opt in self._optimizers:
            opt.__dict__.pop(APPLIED_STEPS_ATTR, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()
        strategy = self.__dict__.pop("_strategy", None)
        wrapper = strategy.__dict__.get("optimizer_step") if strategy is not None else None
        if wrapper is not None and getattr(wrapper, "__dict__", {}).get("_lightning_guard_runtime") is self:
            previous = wrapper.__dict__["_lightning_guard_previous"]
            if previous is None:
                del strategy.__dict__["optimizer_step"]
            else:
                strategy.__dict__["optimizer_step"] = previous  # the user's own override, as it was

    def optimizer_index(self, optimizer: Any) -> int:
        """Index of an optimizer (raw or LightningOptimizer) in ``trainer.optimizers``; -1 if unknown."""
        raw = unwrap_optimizer(optimizer)
        for i, opt in enumerate(self._optimizers):
            if opt is raw:
                return i
        return -1

    # ------------------------------------------------------------------ the step's one agreement
    def set_step_channel(self, channel: StepChannel | None) -> None:
        """Hold the step agreement on a guard's group (OOMGuard's gloo fence, with its timeout), not the strategy's."""
        self._step_channel = channel

    def agree_step(self, pl_module: pl.LightningModule, optimizer: Any, voters: list[Any]) -> None:
        """The one agreement of all guards for this optimizer step (see the module's docstring).

        ``voters``: the guards in the order of their votes (the same on every rank). The votes and this rank's count
        of pending events are summed over ranks in one all-reduce of a fixed-size vector; every rank's row is gathered
        in a second collective only where a guard asks for it from the sums (:meth:`GuardCallback.step_detail`: a
        non-finite norm somewhere, say).
        """
        trainer = self.trainer
        self._mark_loss(self.optimizer_index(optimizer))  # has_loss() is valid for the votes
        votes: list[tuple[Any, torch.Tensor | list[float]]] = []
        for cb in voters:
            vote = cb.step_vote(trainer, pl_module, optimizer)
            if vote is not None:
                votes.append((cb, vote))
        if not votes:
            return
        channel = self._step_channel
        if channel is not None:  # the channel's owner votes first: its place leads the row it agrees on
            votes.sort(key=lambda vote: vote[0] is not channel.owner)
        spans: list[tuple[Any, int, int]] = []
        size = 0
        for cb, vote in votes:
            n = int(vote.numel()) if isinstance(vote, torch.Tensor) else len(vote)
            spans.append((cb, size, size + n))
            size += n
        self.step_row_size = size + 1
        world = int(getattr(trainer, "world_size", 1) or 1)
        if world > 1 and self._step_channel is None:  # on the device: one collective, then the one host read
            total, rows = sum_on_device(trainer, votes, spans, float(self.events.pending()))
        else:  # the one host read first; then, under DDP, the agreement on the guard's own (CPU) group
            on_device = iter(to_host([v.reshape(-1).float() for _, v in votes if isinstance(v, torch.Tensor)]))
            row: list[float] = []
            for _, vote in votes:
                row.extend([next(on_device) for _ in range(vote.numel())] if isinstance(vote, torch.Tensor) else vote)
            row.append(float(self.events.pending()))
            if world > 1:
                assert self._step_channel is not None
                total, every_rank_here = self._step_channel.reduce(row)
                wanted = every_rank_here and wants_rows(spans, total)
                rows = self._step_channel.rows(row) if wanted else None
            else:
                total, rows = row, [row]
        if world > 1 and total[size] > 0:  # events wait on some rank: the exchange follows at once
            self.events.exchange()
        for cb, start, end in spans:
            mine = None if rows is None else tuple(tuple(r[start:end]) for r in rows)
            cb.step_verdict(trainer, optimizer, StepVotes(tuple(total[start:end]), mine, world))

    def agree(self, flag: bool | torch.Tensor, payload: torch.Tensor | None = None) -> Agreement:
        """Agree on a flag across ranks (``lightning_guard.distributed.agree``), carrying the pending events.

        Every rank's count of guard events not yet handed to rank 0 rides in the same collective; when any rank has
        some, the event exchange follows at once, so events raised on other ranks reach rank 0 at the next decision.
        """
        if world_size(self.trainer) <= 1:
            return agree(self.trainer, flag, payload)
        dev = self.trainer.strategy.root_device
        pending = torch.tensor([float(self.events.pending())], dtype=torch.float32, device=dev)
        full = pending if payload is None else torch.cat([payload.reshape(-1).float().to(dev), pending])
        outcome = agree(self.trainer, flag, full)
        self._exchange_if_pending([row[-1] for row in outcome.values])
        return Agreement(outcome.flags, tuple(row[:-1] for row in outcome.values))

    def _exchange_if_pending(self, pending_per_rank: list[float]) -> None:
        """The event exchange (a collective), when an agreement showed events waiting on some rank."""
        if any(n > 0 for n in pending_per_rank):
            self.events.exchange()

    def abandon_step(self, optimizer: Any) -> None:
        """The step being attempted is dropped before it runs (OOMGuard re-runs the batch): undo its preparation."""
        idx = self.optimizer_index(optimizer)
        if idx < 0:
            return
        self._pending.pop(idx, None)
        self._restore_lrs(idx, self._optimizers[idx])
        self._attempt_step.pop(idx, None)
        for marks in (self._skip_requested, self._no_loss, self._finite):
            marks.discard(idx)

    def note_finite(self, optimizer: Any) -> None:
        """The gradients of this optimizer's step are finite on every rank (agreed): no ``found_inf`` read needed."""
        idx = self.optimizer_index(optimizer)
        if idx >= 0:
            self._finite.add(idx)

    # ------------------------------------------------------------------ step protocol
    def request_skip(self, optimizer: Any) -> None:
        """Mark the coming step of this optimizer as skipped by a guard (it will not count as applied)."""
        idx = self.optimizer_index(optimizer)
        if idx >= 0:
            self._skip_requested.add(idx)

    def before_optimizer_step(self, optimizer: Any) -> None:
        """Called from ``on_before_optimizer_step``: a step of this optimizer is about to be attempted."""
        idx = self.optimizer_index(optimizer)
        if idx >= 0:
            self._pending[idx] = True
            self._attempt_step[idx] = int(self.trainer.global_step)
            self._mark_loss(idx)
            self._apply_lr_scale(idx)
            self._record_lrs(idx)

    def _mark_loss(self, idx: int) -> None:
        if idx < 0:
            return
        if self._step_has_loss(idx):
            self._no_loss.discard(idx)
        else:
            self._no_loss.add(idx)

    def _record_lrs(self, idx: int) -> None:
        self.applied_lrs[idx] = [_lr_copy(g["lr"]) for g in self._optimizers[idx].param_groups]
        self.applied_lr_scales[idx] = self.lr_scale(idx)

    def note_batch_start(self) -> None:
        """A training batch (micro-batch under accumulation) starts (owner's ``on_train_batch_start``)."""
        self._tracking = True
        self._last_batch_backward = False

    def note_backward(self) -> None:
        """A backward pass is about to run (owner's ``on_before_backward``; Lightning skips it for a ``None`` loss)."""
        self._backwards += 1
        self._last_batch_backward = True

    def _step_has_loss(self, idx: int) -> bool:
        """Whether the step being attempted has a loss behind it.

        With a GradScaler, Lightning skips unscaling and the step whenever the last micro-batch's ``training_step``
        returned ``None`` (whatever earlier micro-batches accumulated); otherwise the optimizer steps on whatever
        gradients accumulated, so the step has a loss if any backward ran since this optimizer's last step (under
        manual optimization one backward may serve several optimizers). Gradients zeroed
        with ``set_to_none=False`` do not fool this: it counts backward passes, not gradient tensors.
        """
        if not self._tracking:
            return True
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return self._last_batch_backward
        return self._backwards > self._backwards_seen.get(idx, 0)

    def has_loss(self, optimizer: Any) -> bool:
        """Whether the step being attempted has gradients (False when ``training_step`` returned ``None``).

        Valid from the owner's ``on_before_optimizer_step`` (the first guard in the callback list) until the step is
        resolved; guards leave a step without gradients alone: it is not applied and feeds no statistics.
        """
        return self.optimizer_index(optimizer) not in self._no_loss

    def set_lr_scale(self, optimizer_idx: int, scale: float, source: str) -> None:
        """Multiply the LR of every param group of an optimizer by ``scale`` during its steps only.

        The scale is applied when a step is attempted (``on_before_optimizer_step``, or at once if that step is
        already under way) and undone right after the step, before any listener (an LR schedule) sets the next LR, so
        it composes with WarmupCosine and with ordinary torch schedulers. Note that under 32-true and bf16-mixed
        Lightning runs ``on_before_optimizer_step`` inside ``optimizer.step()`` (in the closure), after its
        pre-step hooks: that is why no pre-step hook is used here. Scales from different ``source`` names multiply
        and persist until set back to 1.
        """
        if not 0 <= optimizer_idx < len(self.lr_scales):
            return
        if scale == 1.0:
            self.lr_scales[optimizer_idx].pop(source, None)
        else:
            self.lr_scales[optimizer_idx][source] = float(scale)
        if optimizer_idx in self._pending:
            self._apply_lr_scale(optimizer_idx)
            self._record_lrs(optimizer_idx)

    def lr_scale(self, optimizer_idx: int) -> float:
        """The product of the active LR scales of an optimizer."""
        scale = 1.0
        if 0 <= optimizer_idx < len(self.lr_scales):
            for value in self.lr_scales[optimizer_idx].values():
                scale *= value
        return scale

    def _apply_lr_scale(self, idx: int) -> None:
        """Set every group's LR to its unscaled value times the current scale.

        The unscaled values are kept until the step ends, then restored.
        """
        optimizer = self._optimizers[idx]
        scale = self.lr_scale(idx)
        saved = self._saved_lrs.get(idx)
        if saved is None:
            if scale == 1.0:
                return
            saved = [_lr_copy(g["lr"]) for g in optimizer.param_groups]
            self._saved_lrs[idx] = saved
        set_group_lrs(optimizer, [lr * scale for lr in saved])

    def forget_step_lrs(self, optimizer_idx: int) -> None:
        """Drop the LRs saved for this step (after a rollback loaded the optimizer's own param groups)."""
        self._saved_lrs.pop(optimizer_idx, None)

    def set_applied_steps(self, counts: list[int]) -> None:
        """Overwrite the applied-step counts (a rollback restores them with the weights)."""
        for idx, n in enumerate(counts[: len(self.applied_steps)]):
            self.applied_steps[idx] = int(n)
            if idx < len(self._optimizers):
                setattr(self._optimizers[idx], APPLIED_STEPS_ATTR, int(n))

    def _restore_lrs(self, idx: int, optimizer: torch.optim.Optimizer) -> None:
        saved = self._saved_lrs.pop(idx, None)
        if saved is not None:
            set_group_lrs(optimizer, saved)

    def _make_post_hook(self, idx: int) -> Callable[..., None]:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self._restore_lrs(idx, optimizer)
            self._pending.pop(idx, None)
            if idx in self._no_loss:
                self._no_loss.discard(idx)
                self._skip_requested.discard(idx)
                self._resolve(idx, applied=False, reason="no_loss")
                return
            if idx in self._skip_requested:
                self._skip_requested.discard(idx)
                self._resolve(idx, applied=False, reason="guard_skip")
                return
            found_inf = getattr(optimizer, "found_inf", None)  # fused optimizer driven by a GradScaler
            finite = idx in self._finite  # a guard's agreed norm was finite: the scaler found no inf either
            if not finite and isinstance(found_inf, torch.Tensor) and bool(found_inf.item()):
                self._resolve(idx, applied=False, reason="amp_overflow")
                return
            self._resolve(idx, applied=True, reason="applied")

        return hook

    def after_batch(self) -> None:
        """Called from ``on_train_batch_end``: a step that was attempted but never ran was skipped by the scaler."""
        for idx in list(self._pending):
            self._resolve_unrun(idx)

    def _resolve_unrun(self, idx: int) -> None:
        self._pending.pop(idx, None)
        self._restore_lrs(idx, self._optimizers[idx])
        reason = "no_loss" if idx in self._no_loss else "guard_skip" if idx in self._skip_requested else "amp_overflow"
        self._skip_requested.discard(idx)
        self._no_loss.discard(idx)
        self._resolve(idx, applied=False, reason=reason)

    def _resolve(self, idx: int, *, applied: bool, reason: str) -> None:
        self._finite.discard(idx)
        self._backwards_seen[idx] = self._backwards
        if applied:
            self.applied_steps[idx] += 1
        if idx < len(self._optimizers):  # WarmupCosineLR follows this count
            setattr(self._optimizers[idx], APPLIED_STEPS_ATTR, self.applied_steps[idx])
        step = self._attempt_step.pop(idx, int(self.trainer.global_step))
        outcome = StepOutcome(idx, applied, reason, self.applied_steps[idx], step)
        for listener in list(self._listeners):
            listener(outcome)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters and the event log, stored under ``checkpoint["lightning_guard"]``."""
        return _STATE.dump({"applied_steps": list(self.applied_steps), "events": self.events.state_dict()})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counters (applied when the optimizers are attached) and the event log."""
        state = _STATE.load(state)
        self._restored_steps = [int(s) for s in state["applied_steps"]]
        if self._optimizers:
            self.applied_steps = list(self._restored_steps) + [0] * (len(self._optimizers) - len(self._restored_steps))
        self.events.load_state_dict(state["events"])


def set_group_lrs(optimizer: torch.optim.Optimizer, lrs: list[Any]) -> None:
    """Set each param group's LR, in place for a tensor LR (a fused optimizer keeps a reference to it)."""
    for group, lr in zip(optimizer.param_groups, lrs, strict=False):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].copy_(lr)
        else:
            group["lr"] = lr


def _lr_copy(value: Any) -> float | torch.Tensor:
    return value.detach().clone() if isinstance(value, torch.Tensor) else float(value)


def get_runtime(trainer: pl.Trainer) -> GuardRuntime:
    """The guard runtime of a trainer, created on first use."""
    runtime = trainer.__dict__.get(_ATTR)
    if runtime is None:
        runtime = GuardRuntime(trainer)
        trainer.__dict__[_ATTR] = runtime
    return runtime


#: readers of a ddp_spawn fit's hand-back, run in the launching process when its event stream is read (the guard base
#: registers the one that loads the guards' final states: this module knows no guards)
_HAND_BACK_READERS: list[Callable[[pl.Trainer], None]] = []


def register_hand_back_reader(reader: Callable[[pl.Trainer], None]) -> None:
    """Run ``reader(trainer)`` before :func:`event_stream` returns (it loads what a ddp_spawn rank 0 handed back)."""
    if reader not in _HAND_BACK_READERS:
        _HAND_BACK_READERS.append(reader)


def event_stream(trainer: pl.Trainer) -> EventStream:
    """The trainer's event stream (created on first use).

    After a ``ddp_spawn`` fit, in the launching process, it holds the run's events as rank 0 published them, and the
    guards in ``trainer.callbacks`` hold their final states (rank 0 hands both back when the fit ends).
    """
    for reader in _HAND_BACK_READERS:
        reader(trainer)
    return get_runtime(trainer).events


class EventCarrier:
    """Who carries a trainer's events: the ``carries_events`` of a callback class (the highest wins, then the first).

    The carrier exchanges the events of the other ranks at epoch and fit end (:func:`sync_events`) and writes what is
    left when the fit fails. A lightning_guard guard (``GUARD``) carries them; without one in the callback list, the
    first fault injector (``INJECTOR``) does, so an injector's events of rank 1 still reach rank 0's log.
    """

    NONE = 0
    INJECTOR = 1
    GUARD = 2


def events_carrier(trainer: pl.Trainer) -> Any:
    """The callback that carries the trainer's events (see :class:`EventCarrier`), None without one."""
    best, rank = None, EventCarrier.NONE
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        role = getattr(type(cb), "carries_events", EventCarrier.NONE)
        if role > rank:
            best, rank = cb, role
    return best


def sync_events(trainer: pl.Trainer, *, force_table: bool = False) -> None:
    """The carrier's exchange: every rank's waiting events to rank 0 (a collective), then the W&B table refreshed."""
    stream = get_runtime(trainer).events
    if trainer.world_size > 1:
        stream.exchange()
    stream.refresh_table(force=force_table)


def emit(trainer: pl.Trainer, event: GuardEvent) -> None:
    """Report a guard event. Callable on any rank; see ``lightning_guard.events`` for where it goes.

    Example:
        >>> import lightning.pytorch as pl, tempfile
        >>> from lightning_guard import GuardEvent
        >>> trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tempfile.mkdtemp())
        >>> emit(trainer, GuardEvent.at(trainer, "my_guard", "noticed", message="hello"))
        >>> [e.kind for e in event_stream(trainer).events]
        ['noticed']
    """
    if not isinstance(event, GuardEvent):
        raise GuardConfigError(f"`event` must be a GuardEvent, got {type(event).__name__}")
    get_runtime(trainer).events.emit(event)  # not event_stream(): reading a ddp_spawn hand-back is the user's call


def reset_runtime(trainer: pl.Trainer) -> GuardRuntime:
    """Start a fresh runtime (a new ``fit``), closing the old one's files and hooks."""
    old = trainer.__dict__.get(_ATTR)
    if old is not None:
        old.detach()
        old.events.close()
    trainer.__dict__[_ATTR] = GuardRuntime(trainer)
    return trainer.__dict__[_ATTR]
