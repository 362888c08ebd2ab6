"""GradientGuard's judgement of one optimizer step, as pure functions of the numbers every rank agreed on.

:func:`step_facts_from_sums` reads the step agreement's sums over the ranks of ``has_loss, norm, loss,
buffers_nonfinite`` (the common path: one fixed-size all-reduce); where a sum says something is wrong
(:func:`needs_rows`), every rank's row is gathered and :func:`step_facts` reads them (which ranks?);
:func:`decide_step` turns the facts, the spike test of the running statistics and the guard's memory of the
previous steps into one :class:`StepDecision`. :class:`LrBackoff` decides when an optimizer's LR backs off and how it
recovers. ``GradientGuard`` acts on them (skip, clip, roll back, scale the LR, report); nothing here touches a trainer,
a tensor or a file, so every branch is tested on plain numbers (``tests/functional/test_gradient_policy.py``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["LrBackoff", "StepDecision", "StepFacts", "decide_step", "needs_rows", "step_facts", "step_facts_from_sums"]

Action = Literal[
    "scheduled_skip", "amp_overflow", "nonfinite_skip", "damage_skip", "hard_batch", "clip", "skip", "warn", "healthy"
]


@dataclass(frozen=True)
class StepFacts:
    """What the agreed rows say about the step.

    Attributes:
        norms: the gradient norm per rank (the whole model's, on every rank, when gradients are sharded); from the
            sums alone, the agreed norm once.
        loss_mean: the mean loss over the ranks whose step has a loss.
        bad_ranks: ranks with a non-finite norm, loss or new non-finite buffer.
        loss_bad: some rank's loss is non-finite.
        grads_bad: some rank's gradient norm is non-finite.
        norm: the norm of the step (NaN when a rank is bad): from every rank's row, the largest over the ranks with
            a loss; from the sums, their mean (equal under DDP, where the gradients are all-reduced); sharded, the
            root of the summed squares either way.
    """

    norms: tuple[float, ...]
    loss_mean: float
    bad_ranks: tuple[int, ...]
    loss_bad: bool
    grads_bad: bool
    norm: float

    @property
    def healthy(self) -> bool:
        """No rank saw a non-finite norm, loss or buffer."""
        return not self.bad_ranks

    @property
    def what_is_bad(self) -> str:
        """``"loss"``, ``"gradients"`` or ``"buffers"``: what made the step non-finite, in that order."""
        return "loss" if self.loss_bad else "gradients" if self.grads_bad else "buffers"


def step_facts(rows: Sequence[Sequence[float]], *, sharded: bool) -> StepFacts:
    """The facts of a step from every rank's ``(has_loss, norm, loss, buffers_nonfinite)``.

    ``sharded``: each rank voted its shard's squared norm; the model's norm is the root of their sum.
    """
    voted = [r for r in rows if r[0]]
    if sharded:
        total = math.fsum(r[1] for r in voted)
        whole = math.sqrt(total) if math.isfinite(total) else math.nan
        norms = tuple(whole if math.isfinite(r[1]) else math.nan for r in rows)
    else:
        norms = tuple(r[1] for r in rows)
    loss_bad_ranks = {i for i, r in enumerate(rows) if r[0] and not math.isfinite(r[2])}
    buffer_bad_ranks = {i for i, r in enumerate(rows) if r[0] and r[3] > 0}
    bad_ranks = tuple(
        i
        for i, (n, r) in enumerate(zip(norms, rows, strict=True))
        if r[0] and (not math.isfinite(n) or i in loss_bad_ranks or i in buffer_bad_ranks)
    )
    losses = [r[2] for r in voted]
    norm = max(n for n, r in zip(norms, rows, strict=True) if r[0]) if not bad_ranks else math.nan
    return StepFacts(
        norms=norms,
        loss_mean=sum(losses) / max(len(losses), 1),
        bad_ranks=bad_ranks,
        loss_bad=bool(loss_bad_ranks),
        grads_bad=any(r[0] and not math.isfinite(n) for n, r in zip(norms, rows, strict=True)),
        norm=norm,
    )


def needs_rows(total: Sequence[float]) -> bool:
    """Whether the sums of ``(has_loss, norm, loss, buffers_nonfinite)`` over ranks call for every rank's row.

    A non-finite norm or loss on any rank makes its sum non-finite; a bad buffer anywhere makes the last sum positive.
    """
    return not (math.isfinite(total[1]) and math.isfinite(total[2])) or total[3] > 0


def step_facts_from_sums(total: Sequence[float], world: int, *, sharded: bool) -> StepFacts:
    """The facts of a step whose sums over the ranks are all finite, with no bad buffer (:func:`needs_rows` False).

    ``total``: the sums of ``(has_loss, norm, loss, buffers_nonfinite)``; ``sharded``: the norm column holds squares.
    """
    voted = max(total[0], 1.0)
    norm = math.sqrt(max(total[1], 0.0)) if sharded else total[1] / voted
    return StepFacts(
        norms=(norm,), loss_mean=total[2] / voted, bad_ranks=(), loss_bad=False, grads_bad=False, norm=norm
    )


@dataclass(frozen=True)
class StepDecision:
    """What to do with the step.

    Attributes:
        action: ``scheduled_skip`` (a skip the guard owed from an earlier rollback), ``amp_overflow`` (the GradScaler
            found inf/NaN gradients: skip, lower the scale, an info event), ``nonfinite_skip``, ``damage_skip`` (a
            huge spike, a spike right after one, or a loss that stays high: skip, and roll back now or if it
            persists), ``hard_batch`` (a loss spike alone: no action), ``clip``, ``skip``, ``warn`` (a spike under
            ``spike_action`` "clip", "skip" or "warn") or ``healthy``.
        z: the z-score the events report (the larger of the norm's and the loss's that spiked; the norm's for
            ``clip``).
        why: for ``damage_skip``, why the spike counts as damage.
        roll_back_now: for ``damage_skip``, damage persists: roll back (or give up) now, else only mark it suspect.
        loss_streak: the count of consecutive loss spikes after this step.
    """

    action: Action
    z: float = math.nan
    why: str = ""
    roll_back_now: bool = False
    loss_streak: int = 0


def decide_step(
    facts: StepFacts,
    *,
    scheduled_skip: bool,
    scaler: bool,
    spike: bool,
    z: float,
    loss_spike: bool,
    loss_z: float,
    spike_action: str,
    rollback_z: float | None,
    rollback_enabled: bool,
    suspect: bool,
    loss_streak: int,
) -> StepDecision:
    """GradientGuard's decision for one step.

    Args:
        facts: :func:`step_facts` of the step.
        scheduled_skip: a skip is owed (after a rollback, the guard skips a few steps).
        scaler: a GradScaler scales the loss (a non-finite gradient with a finite loss is its overflow).
        spike: the norm spiked against its running statistics.
        z: the norm's z-score.
        loss_spike: the loss spiked against its running statistics.
        loss_z: the loss's z-score.
        spike_action: the guard's ``spike_action``.
        rollback_z: the norm's z above which a spike is huge (None: never).
        rollback_enabled: rollback snapshots are on.
        suspect: the previous step was a huge spike.
        loss_streak: consecutive loss spikes before this step.
    """
    if scheduled_skip:
        return StepDecision("scheduled_skip", loss_streak=loss_streak)
    if not facts.healthy:
        overflow = scaler and not facts.loss_bad and facts.grads_bad
        return StepDecision("amp_overflow" if overflow else "nonfinite_skip", math.inf, loss_streak=loss_streak)
    if not (spike or loss_spike):
        return StepDecision("healthy", z, loss_streak=0)
    zz = max(z if spike else 0.0, loss_z if loss_spike else 0.0)
    # Huge: the gradient norm's z is above rollback_z. The loss's z alone does not make a step huge: a hard batch of a
    # healthy small-batch run had a loss z of 12.6 with a norm z of 3.5 (its update was ordinary, and clipping bounds
    # it); a loss that stays high is damage.
    hard = rollback_z is not None and spike and z > rollback_z
    streak = loss_streak + 1 if loss_spike else 0
    persistent = streak >= 3  # the loss stays high: the weights were damaged
    if hard or suspect or persistent:
        why = (
            "above rollback_z"
            if hard and not suspect
            else "right after a huge spike"
            if suspect
            else "the loss stays high"
        )
        return StepDecision("damage_skip", zz, why, (suspect or persistent) and rollback_enabled, streak)
    if loss_spike and not spike:
        return StepDecision("hard_batch", zz, loss_streak=streak)
    if spike_action == "clip":
        return StepDecision("clip", z, loss_streak=streak)
    if spike_action == "skip":
        return StepDecision("skip", zz, loss_streak=streak)
    return StepDecision("warn", zz, loss_streak=streak)


@dataclass
class LrBackoff:
    """One optimizer's LR backoff: skipped steps in, the LR scale out.

    ``after`` skipped steps within ``window`` optimizer steps scale the LR by ``factor``; it then recovers linearly
    to 1 over ``recovery`` applied steps. A new backoff starts only from a full LR.

    Attributes:
        after: skipped steps within ``window`` that start a backoff (None: never).
        window: the window, in optimizer steps (global steps), over which skips are counted.
        factor: the LR scale at the start of a backoff, in ``(0, 1)``.
        recovery: applied steps over which the scale returns to 1.
        skips: the global steps of the skips still inside the window (the evidence).
        scale: the current LR scale (1.0: no backoff).
        progress: applied steps since the backoff started.

    Example:
        >>> b = LrBackoff(after=2, window=10, factor=0.5, recovery=2)
        >>> b.note_skip(3), b.note_skip(5), b.scale
        (False, True, 0.5)
        >>> b.note_applied(), b.scale, b.note_applied(), b.scale
        ('recovering', 0.75, 'recovered', 1.0)
    """

    after: int | None
    window: int
    factor: float
    recovery: int
    skips: deque[int] = field(default_factory=deque)
    scale: float = 1.0
    progress: int = 0

    def note_skip(self, step: int) -> bool:
        """A skipped step at global step ``step``; True when it starts a backoff (``scale`` is ``factor`` now)."""
        if self.after is None:
            return False
        self.skips.append(step)
        while self.skips and self.skips[0] <= step - self.window:
            self.skips.popleft()
        if len(self.skips) >= self.after and self.scale == 1.0:
            self.scale, self.progress = self.factor, 0
            self.skips.clear()
            return True
        return False

    def note_applied(self) -> Literal["idle", "recovering", "recovered"]:
        """An applied step: ``"idle"`` outside a backoff, else the scale moves towards 1 (``"recovered"`` there)."""
        if self.scale >= 1.0:
            return "idle"
        self.progress += 1
        frac = min(self.progress / self.recovery, 1.0)
        self.scale = self.factor + (1.0 - self.factor) * frac
        if frac >= 1.0:
            self.scale = 1.0
            return "recovered"
        return "recovering"

    def forget(self) -> None:
        """Drop the evidence (a rollback undid the skips behind it)."""
        self.skips.clear()
