"""GradientGuard's actions: one per decision of :func:`~lightning_guard.functional.gradient_policy.decide_step`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_guard._compat import scaler_check_inf, scaler_optimizer_state
from lightning_guard.callbacks.gradient_guard.base import _current_scale, _drop_grads
from lightning_guard.callbacks.gradient_guard.rollback import GradientGuardRollback
from lightning_guard.functional.grad import clip_grads_, zclip_threshold
from lightning_guard.functional.gradient_policy import StepDecision, StepFacts

__all__: list[str] = []


@dataclass(frozen=True)
class _Step:
    """The step being acted on."""

    trainer: pl.Trainer
    pl_module: pl.LightningModule
    optimizer: torch.optim.Optimizer
    idx: int
    grads: Any
    facts: StepFacts
    z: float  # the norm's z against the running statistics (NaN where not judged)


class GradientGuardActions(GradientGuardRollback):
    """The actions of :class:`~lightning_guard.GradientGuard` (not a guard on its own)."""

    def _act(self, step: _Step, decision: StepDecision) -> None:
        """Carry out the decision."""
        _ACTIONS[decision.action](self, step, decision)

    def _act_scheduled_skip(self, s: _Step, d: StepDecision) -> None:
        self._skip_remaining -= 1
        self._skip(s.trainer, s.optimizer, s.grads, self._scaler(s.trainer), overflow=False)
        self._log(s.trainer, s.pl_module, s.idx, s.facts.norm, math.nan, math.nan)

    def _act_amp_overflow(self, s: _Step, d: StepDecision) -> None:
        scaler = self._scaler(s.trainer)
        self._skip(s.trainer, s.optimizer, s.grads, scaler, overflow=True)
        self._event(
            s.trainer,
            "amp_overflow",
            "info",
            "GradScaler overflow: step skipped, loss scale lowered",
            s.facts.norm,
            ranks=s.facts.bad_ranks,
            diagnose=False,
            scale=float(_current_scale(scaler).item()),
        )
        self._log(s.trainer, s.pl_module, s.idx, s.facts.norm, math.nan, math.nan)

    def _act_nonfinite_skip(self, s: _Step, d: StepDecision) -> None:
        self._skip(s.trainer, s.optimizer, s.grads, self._scaler(s.trainer), overflow=True)
        self._bad[s.idx] += 1
        what = s.facts.what_is_bad
        self._event(
            s.trainer,
            "nonfinite_skip",
            "warning",
            f"non-finite {what}: step skipped",
            s.facts.norm,
            ranks=s.facts.bad_ranks,
            loss=s.facts.loss_mean,
            buffers_restored=self._step_buffers.count,
            pl_module=s.pl_module,
        )
        self._skip_and_maybe_roll_back(s, reason=f"non-finite {what}", z=math.inf, log_z=math.inf)

    def _act_damage_skip(self, s: _Step, d: StepDecision) -> None:
        """A huge spike, a spike right after one, or a loss that stays high: skip; roll back now if damage persists."""
        self._loss_streak[s.idx] = d.loss_streak
        self._skip(s.trainer, s.optimizer, s.grads, self._scaler(s.trainer), overflow=False)
        self._bad[s.idx] += 1
        self._spike_skip_event(s, f"spike z={d.z:.1f} {d.why}: step skipped", d.z)
        rollbacks = self._rollbacks
        if d.roll_back_now:
            self._rollback_or_give_up(
                s.trainer, s.pl_module, s.optimizer, s.idx, reason=f"spikes persist (z={d.z:.1f})"
            )
            self._suspect[s.idx] = False
            self._loss_streak[s.idx] = 0
        else:
            self._suspect[s.idx] = True
            self._maybe_rollback(s.trainer, s.pl_module, s.optimizer, s.idx, reason=f"spike z={d.z:.1f}", z=d.z)
        if self._rollbacks == rollbacks:
            self._note_instability(s.trainer, s.idx)
        self._log(s.trainer, s.pl_module, s.idx, s.facts.norm, math.nan, d.z)

    def _act_skip(self, s: _Step, d: StepDecision) -> None:
        self._loss_streak[s.idx] = d.loss_streak
        self._skip(s.trainer, s.optimizer, s.grads, self._scaler(s.trainer), overflow=False)
        self._bad[s.idx] += 1
        self._spike_skip_event(s, f"spike z={d.z:.1f}: step skipped", d.z)
        self._skip_and_maybe_roll_back(s, reason=f"spike z={d.z:.1f}", z=d.z, log_z=d.z)

    def _skip_and_maybe_roll_back(self, s: _Step, *, reason: str, z: float, log_z: float) -> None:
        """After a skip: roll back if the skips pile up, else count the instability; log the step."""
        rollbacks = self._rollbacks
        self._maybe_rollback(s.trainer, s.pl_module, s.optimizer, s.idx, reason=reason, z=z)
        if self._rollbacks == rollbacks:  # a rollback counts itself once, and clears the skips it undid
            self._note_instability(s.trainer, s.idx)
        self._log(s.trainer, s.pl_module, s.idx, s.facts.norm, math.nan, log_z)

    def _spike_skip_event(self, s: _Step, message: str, z: float) -> None:
        self._event(
            s.trainer,
            "spike_skip",
            "warning",
            message,
            s.facts.norm,
            z=z,
            loss=s.facts.loss_mean,
            pl_module=s.pl_module,
        )

    def _act_hard_batch(self, s: _Step, d: StepDecision) -> None:
        """A loss spike that is not huge: nothing is done now.

        A hard batch (a healthy run has them), or the first sign of weights damaged by the previous update: if the loss
        spikes again next step, it is rolled back.
        """
        self._loss_streak[s.idx] = d.loss_streak
        self._stats[s.idx].update(s.facts.norm)
        self._bad[s.idx] = 0
        self._apply(s, s.facts.norm)

    def _act_clip(self, s: _Step, d: StepDecision) -> None:
        self._loss_streak[s.idx] = d.loss_streak
        stats = self._stats[s.idx]
        threshold = zclip_threshold(stats.mean, stats.std, s.z, self.z_threshold)
        clip_grads_(s.grads, threshold / s.facts.norm)
        stats.update(threshold)
        self._bad[s.idx] = 0
        self._event(
            s.trainer,
            "spike_clip",
            "info",
            f"norm {s.facts.norm:.4g} clipped to {threshold:.4g}",
            s.facts.norm,
            z=s.z,
            threshold=threshold,
            pl_module=s.pl_module,
        )
        self._apply(s, threshold)

    def _act_warn(self, s: _Step, d: StepDecision) -> None:
        self._loss_streak[s.idx] = d.loss_streak
        self._stats[s.idx].update(s.facts.norm)
        self._bad[s.idx] = 0
        self._event(
            s.trainer,
            "spike_warn",
            "warning",
            f"spike z={d.z:.1f} (no action)",
            s.facts.norm,
            z=d.z,
            loss=s.facts.loss_mean,
            pl_module=s.pl_module,
        )
        self._apply(s, s.facts.norm)

    def _act_healthy(self, s: _Step, d: StepDecision) -> None:
        self._stats[s.idx].update(s.facts.norm)
        self._bad[s.idx] = 0
        self._suspect[s.idx] = False
        self._loss_streak[s.idx] = 0
        self._apply(s, s.facts.norm)

    def _apply(self, s: _Step, post: float) -> None:
        """The step is applied: clip to ``max_norm`` if set, log the norms."""
        if self.max_norm is not None and post > self.max_norm:
            clip_grads_(s.grads, self.max_norm / post)
            post = self.max_norm
        self.last_post_clip_norm = post
        self._log(s.trainer, s.pl_module, s.idx, s.facts.norm, post, s.z)

    def _skip(
        self,
        trainer: pl.Trainer,
        optimizer: torch.optim.Optimizer,
        grads: list[torch.Tensor],
        scaler: Any,
        *,
        overflow: bool,
    ) -> None:
        """Decide to skip this step; the gradients are dropped at the end of the hook (after events are reported).

        ``overflow``: some rank has non-finite gradients or loss (the agreed verdict), so every rank's GradScaler
        is told of an overflow; a deliberate skip of finite gradients leaves the scaler to its own check.
        """
        self._deferred_skip = (trainer, optimizer, scaler, overflow)

    def _apply_skip(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, scaler: Any, overflow: bool) -> None:
        """Skip this optimizer step on this rank, leaving the GradScaler's bookkeeping as the gradients make it.

        The scaler's overflow check must see the real gradients before they go: a non-fused optimizer's was done
        by Lightning's ``unscale_`` before this hook; a fused optimizer's runs inside ``scaler.step()``, so it is
        done here and the optimizer marked unscaled (its gradients are gone: nothing to unscale). ``scaler.step``
        then steps an optimizer without gradients (nothing changes) and ``scaler.update`` grows the scale exactly as
        for an applied step. Only a genuine overflow lowers it: then on every rank alike (a NaN that one rank alone
        sees must not leave the ranks with different loss scales).
        """
        if scaler is not None:
            from torch.amp.grad_scaler import OptState

            state = scaler_optimizer_state(scaler, optimizer)
            if not state.get("found_inf_per_device") and state.get("stage") is OptState.READY:
                scaler_check_inf(scaler, optimizer)
                if not state.get("found_inf_per_device"):  # no gradient at all: give update() a clean check
                    device = _current_scale(scaler).device
                    state["found_inf_per_device"] = {device: torch.zeros(1, device=device)}
                state["stage"] = OptState.UNSCALED
            if overflow:
                for found in state["found_inf_per_device"].values():
                    found.fill_(1.0)
        _drop_grads(optimizer)
        self._step_buffers.restore()  # the skipped step's forwards wrote them (BatchNorm statistics)
        self.runtime(trainer).request_skip(optimizer)


#: the action for each decision of ``functional.gradient_policy.decide_step``
_ACTIONS: dict[str, Callable[[GradientGuardActions, _Step, StepDecision], None]] = {
    "scheduled_skip": GradientGuardActions._act_scheduled_skip,
    "amp_overflow": GradientGuardActions._act_amp_overflow,
    "nonfinite_skip": GradientGuardActions._act_nonfinite_skip,
    "damage_skip": GradientGuardActions._act_damage_skip,
    "hard_batch": GradientGuardActions._act_hard_batch,
    "clip": GradientGuardActions._act_clip,
    "skip": GradientGuardActions._act_skip,
    "warn": GradientGuardActions._act_warn,
    "healthy": GradientGuardActions._act_healthy,
}
