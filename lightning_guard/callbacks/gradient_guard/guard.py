"""GradientGuard: keep training alive through exploding gradients, on every strategy and precision."""

from __future__ import annotations

import math
from collections import deque
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_guard._agreement import StepVotes
from lightning_guard._checks import check_int, check_number
from lightning_guard._compat import scaler_scale, steps_unscale_inside
from lightning_guard._sharded import sharded_training, shares
from lightning_guard._state import StateSchema
from lightning_guard.callbacks._sharding import warn_unsynchronised
from lightning_guard.callbacks.gradient_guard.actions import GradientGuardActions, _Step
from lightning_guard.callbacks.gradient_guard.base import _current_scale
from lightning_guard.errors import GuardConfigError
from lightning_guard.functional.grad import collect_grads, global_grad_norm
from lightning_guard.functional.gradient_policy import (
    LrBackoff,
    decide_step,
    needs_rows,
    step_facts,
    step_facts_from_sums,
)

__all__ = ["GradientGuard"]

SpikeAction = Literal["clip", "skip", "warn"]

_UNJUDGED = (False, math.nan, False, math.nan)


class GradientGuard(GradientGuardActions):
    r"""Keep training alive through exploding gradients: skip, clip adaptively, back off the LR, roll back.

    Runs once per optimizer step in ``on_before_optimizer_step`` (after AMP unscaling, before the update), with one
    host synchronisation per step (one small collective under DDP/FSDP that also carries every rank's verdict):

    1. **Global gradient norm** of the optimizer's parameters in one fused pass, accumulated in fp32; under FSDP the
       squared shard norms are summed over ranks, so every rank sees the same value.
    2. **Non-finite gradients or loss → a true skip**: the gradients are set to ``None`` so neither weights nor
       optimizer state change, and the step does not count as applied (the LR schedule holds). Under a 16-mixed
       GradScaler a finite loss with overflowing gradients is an ``amp_overflow`` (info), not an explosion; the
       skip is forced on every rank so the loss scale stays identical across ranks.
    3. **Spikes**: per optimizer, the norm's z-score against NaN-safe EMA statistics (after ``warmup_steps``). A
       norm is a spike when its z-score is above ``z_threshold`` *and* it is at least ``min_ratio`` times its
       running mean: early training's natural drift (norms doubling while the EMA catches up) is no explosion. The
       ``spike_action`` then applies: ``"clip"`` to a ZClip-style adaptive threshold
       ``mean + (z_threshold**2 / z) * std``, ``"skip"``, or ``"warn"``. The loss is watched the same way, per
       optimizer (``monitor_loss``): a loss spike is above ``z_threshold`` and at least ``loss_min_rise`` (relative)
       above its running mean. A loss spike alone is watched, not acted on (healthy runs have hard batches): if the
       loss spikes on three steps in a row, the weights were damaged and are rolled back. An optional fixed
       ``max_norm`` clip applies after the adaptive one.
    4. **LR backoff**, only on evidence of instability: ``backoff_after`` skipped steps (non-finite gradients or
       loss, skipped spikes; a rollback counts as one) within ``backoff_window`` steps scale that optimizer's LR by
       ``backoff_factor``, recovering linearly over ``backoff_recovery`` applied steps. Clipped spikes never back
       off. It composes with WarmupCosine and with torch schedulers (the scale is applied around the step only).
    5. **Rollback**: after ``rollback_after`` consecutive bad steps of one optimizer (non-finite or skipped spikes),
       when a gradient-norm spike with z above ``rollback_z`` is followed by another spike, or when the loss spikes
       on three steps in a row (the weights were damaged, e.g. by one huge update, which no clipping can undo; a
       lone bad batch is only skipped), the state
       of the last *validated* snapshot is restored: weights and buffers, optimizer state, GradScaler, the user's
       LR schedulers, the applied-step counter (so WarmupCosine resumes its schedule from there) and the guard's
       own norm and loss statistics (the restored model is judged against statistics of its own time). The next
       ``skip_after_rollback`` batches are skipped (the data that did the damage is never replayed: training goes
       on with the next batches), and training goes on. Snapshots are host copies of each rank's local tensors
       taken every ``snapshot_every`` applied steps (asynchronously into pinned memory on CUDA); a snapshot becomes
       the rollback target only once the following step's gradients and loss were found healthy, so a snapshot
       taken right after a damaging step is never restored and a rollback loses at most about
       ``2 * snapshot_every`` steps. Two buffers are kept: host memory of twice the model's parameters, buffers and
       optimizer state (for AdamW in fp32: 2 x 3 x 4 bytes per parameter). Once ``max_rollbacks`` rollbacks are
       spent, the next one raises :class:`~lightning_guard.errors.GradientExplosionError` naming the step, the recent
       norm history and the layers with the largest gradient norms.

    A skipped step never touches the 16-mixed GradScaler's bookkeeping: the gradients are dropped after the scaler
    recorded its own overflow check, so the loss scale and its growth tracker move exactly as on an applied step
    (only a genuine overflow lowers the scale), for fused and non-fused optimizers alike. Statistics, backoff and
    counters do not depend on the order of the callbacks in the list.

    Every decision is agreed across ranks; no rank acts alone.

    Args:
        spike_action: what to do with a gradient-norm spike: ``"clip"`` (default), ``"skip"`` or ``"warn"``.
        z_threshold: z-score above which a norm is a spike. Default ``2.5``.
        warmup_steps: finite norms observed before spikes are detected. Default ``25``.
        ema_alpha: EMA decay of the norm statistics, in ``(0, 1)``. Default ``0.97``.
        max_norm: optional fixed clip of the global norm (applied after adaptive clipping). Default ``None``.
        monitor_loss: also detect spikes of the training loss (same threshold): three in a row are damage and are
            rolled back. Default ``True``.
        backoff_after: skipped steps (non-finite, skipped spikes, rollbacks) within ``backoff_window`` steps that
            trigger an LR backoff; ``None`` disables it. Default ``3``.
        backoff_window: window, in optimizer steps, for counting spikes. Default ``50``.
        backoff_factor: LR multiplier during a backoff, in ``(0, 1)``. Default ``0.5``.
        backoff_recovery: applied steps over which the LR recovers linearly to its schedule. Default ``100``.
        rollback_after: consecutive bad steps that trigger a rollback; ``None`` disables it. Default ``3``.
        rollback_z: a gradient-norm spike above this z-score is skipped and, if the next step spikes too (the
            weights were damaged), triggers a rollback; ``None`` disables it. Default ``12.0``.
        snapshot_every: applied steps between rollback snapshots. Default ``25``.
        skip_after_rollback: batches skipped after a rollback (PaLM skipped 200-500). Default ``0``.
        max_rollbacks: rollbacks allowed before giving up with ``GradientExplosionError``. Default ``3``.
        log_every_n_steps: interval of the ``guard/grad_norm`` metrics; default: the Trainer's ``log_every_n_steps``.
        diagnose_top_k: layers listed (by gradient norm) in an event's diagnosis. Default ``5``.
        min_ratio: a gradient norm is a spike only if it is also at least this many times its running mean (>= 1).
            Default ``3.0``.
        loss_min_rise: a loss is a spike only if it is also at least this fraction of its running mean's magnitude
            above that mean (>= 0; 0.5: 1.5 times the mean of a positive loss). Default ``0.5``.

    Events:
        ``nonfinite_skip`` (warning), ``amp_overflow`` (info), ``spike_clip`` (info), ``spike_skip`` (warning),
        ``spike_warn`` (warning), ``lr_backoff`` (warning), ``lr_recovered`` (info), ``rollback`` (warning),
        ``gave_up`` (error); each carries the step, norm, threshold and z, and the top layers by gradient norm.

    Raises:
        GuardConfigError: a bad argument (at construction); Trainer clipping (``gradient_clip_val``) together with
            this guard's own clipping (at fit start).
        GradientExplosionError: training kept exploding after ``max_rollbacks`` rollbacks.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_guard import GradientGuard
        >>> guard = GradientGuard(spike_action="clip", z_threshold=3.0, rollback_after=4, snapshot_every=50)
        >>> trainer = pl.Trainer(callbacks=[guard], precision="bf16-mixed", logger=False)
    """

    SPIKE_ACTIONS: tuple[str, ...] = ("clip", "skip", "warn")

    def __init__(
        self,
        spike_action: SpikeAction = "clip",
        z_threshold: float = 2.5,
        warmup_steps: int = 25,
        ema_alpha: float = 0.97,
        max_norm: float | None = None,
        monitor_loss: bool = True,
        backoff_after: int | None = 3,
        backoff_window: int = 50,
        backoff_factor: float = 0.5,
        backoff_recovery: int = 100,
        rollback_after: int | None = 3,
        rollback_z: float | None = 12.0,
        snapshot_every: int = 25,
        skip_after_rollback: int = 0,
        max_rollbacks: int = 3,
        log_every_n_steps: int | None = None,
        diagnose_top_k: int = 5,
        min_ratio: float = 3.0,
        loss_min_rise: float = 0.5,
    ) -> None:
        super().__init__()
        if spike_action not in self.SPIKE_ACTIONS:
            raise GuardConfigError(f"`spike_action` must be one of {self.SPIKE_ACTIONS}, got {spike_action!r}")
        check_number("z_threshold", z_threshold, low=0.0)
        check_int("warmup_steps", warmup_steps, low=1)
        check_number("ema_alpha", ema_alpha, low=0.0, high=1.0)
        if ema_alpha == 1.0:
            raise GuardConfigError(f"`ema_alpha` must be a number > 0.0 and < 1.0, got {ema_alpha!r}")
        if max_norm is not None:
            check_number("max_norm", max_norm, low=0.0)
        if not isinstance(monitor_loss, bool):
            raise GuardConfigError(f"`monitor_loss` must be a bool, got {monitor_loss!r}")
        check_int("backoff_after", backoff_after, low=1, optional=True, none_first=True)
        check_int("backoff_window", backoff_window, low=1)
        check_number("backoff_factor", backoff_factor, low=0.0, high=1.0)
        if backoff_factor == 1.0:
            raise GuardConfigError(f"`backoff_factor` must be a number > 0.0 and < 1.0, got {backoff_factor!r}")
        check_int("backoff_recovery", backoff_recovery, low=1)
        check_int("rollback_after", rollback_after, low=1, optional=True, none_first=True)
        if rollback_z is not None:
            check_number("rollback_z", rollback_z, low=0.0)
            if rollback_z <= z_threshold:
                raise GuardConfigError(
                    f"`rollback_z` must be greater than `z_threshold` ({z_threshold}), got {rollback_z!r}"
                )
        check_int("snapshot_every", snapshot_every, low=1)
        check_int("skip_after_rollback", skip_after_rollback, low=0)
        check_int("max_rollbacks", max_rollbacks, low=0)
        check_int("log_every_n_steps", log_every_n_steps, low=1, optional=True, none_first=True)
        check_int("diagnose_top_k", diagnose_top_k, low=0)
        check_number("min_ratio", min_ratio, low=1.0, strict=False)
        check_number("loss_min_rise", loss_min_rise, low=0.0, strict=False)
        self.spike_action = spike_action
        self.z_threshold = float(z_threshold)
        self.warmup_steps = warmup_steps
        self.ema_alpha = float(ema_alpha)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.monitor_loss = monitor_loss
        self.backoff_after = backoff_after
        self.backoff_window = backoff_window
        self.backoff_factor = float(backoff_factor)
        self.backoff_recovery = backoff_recovery
        self.rollback_after = rollback_after
        self.rollback_z = None if rollback_z is None else float(rollback_z)
        self.snapshot_every = snapshot_every
        self.skip_after_rollback = skip_after_rollback
        self.max_rollbacks = max_rollbacks
        self.log_every_n_steps = log_every_n_steps
        self.diagnose_top_k = diagnose_top_k
        self.min_ratio = float(min_ratio)
        self.loss_min_rise = float(loss_min_rise)
        self._reset_state()

    vote_in_place = True  # the norm of the gradients as the callbacks listed before this guard left them

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(spike_action=self.spike_action, z_threshold=self.z_threshold)

    @override
    def setup_problems(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        problems = super().setup_problems(trainer, pl_module)
        clip_val = getattr(trainer, "gradient_clip_val", None)
        if clip_val and (self.spike_action == "clip" or self.max_norm is not None):
            what = "max_norm" if self.max_norm is not None else "spike_action='clip'"
            problems.append(
                f"GradientGuard clips gradients itself ({what}) but the Trainer also has gradient_clip_val={clip_val}: "
                "remove `gradient_clip_val` (use GradientGuard(max_norm=...) for a fixed clip), or set "
                "spike_action='skip' or 'warn' and max_norm=None"
            )
        return problems

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        runtime = self.runtime(trainer)
        runtime.add_listener(self._on_step)
        self._step_buffers.forget_layout()  # walked again for this fit's module, once
        self._reduce = self._sharded(trainer)
        self._share_of = None
        if self._reduce:
            warn_unsynchronised(self, trainer, pl_module, "the gradient norm")
            params = [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
            share = shares(params, trainer)
            self._share_of = None if share is None else dict(zip(map(id, params), share, strict=True))
        self._losses = []
        n = len(trainer.optimizers)
        for per_opt in (self._stats, self._loss_stats):
            while len(per_opt) < n:
                per_opt.append(self._new_stats())
        while len(self._backoffs) < n:
            self._backoffs.append(self._new_backoff())
        self._bad += [0] * (n - len(self._bad))
        self._suspect += [False] * (n - len(self._suspect))
        self._loss_streak += [0] * (n - len(self._loss_streak))
        for idx in range(n):
            runtime.set_lr_scale(idx, self._backoffs[idx].scale, source=self.guard_name)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._batch_losses_from = len(self._losses)  # the window's earlier batches (accumulation) stay recorded
        if not self._step_buffers.taken:  # the step's first micro-batch: its forward is about to write the buffers
            self._step_buffers.capture(pl_module)
        if self._rollback_enabled and not self._snapshot.taken:
            self._take_snapshot(trainer, pl_module, self._snapshot)
            if self._last_capture_applied < 0:  # a resumed run keeps the checkpoint's cadence
                self._last_capture_applied = self.runtime(trainer).applied_steps[0] if trainer.optimizers else 0

    @override
    def on_batch_retry(self, trainer: pl.Trainer) -> None:
        # the failed attempt's loss (this batch's only: under accumulation the window's earlier batches stand); the
        # re-run records the batch's loss again
        del self._losses[self._batch_losses_from :]

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        loss = loss.detach()
        scaler = self._scaler(trainer)
        scale = scaler_scale(scaler)
        if scale is not None:
            # Lightning hands this hook the loss already multiplied by the GradScaler's scale: judged as it is, every
            # growth of the scale would look like a loss spike. A tensor division: no host sync.
            loss = loss.float() / scale.to(loss.device)
        self._losses.append(loss)  # judged with the norm, in the step's one sync

    def _sharded(self, trainer: pl.Trainer) -> bool:
        """Each rank holds a part of the gradients (FSDP, FSDP2): the norm's squares are summed over ranks."""
        return sharded_training(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._deferred_skip = None
        try:
            self._guard_step(trainer, pl_module, optimizer)
        finally:
            if self._deferred_skip is not None:
                self._apply_skip(*self._deferred_skip)
                self._deferred_skip = None
            self._stepped_in_batch = True  # the capture is dropped at batch end (more optimizers may follow)

    @override
    def step_vote(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> torch.Tensor | list[float] | None:
        """``[has_loss, norm, loss, buffers_nonfinite]``.

        The gradient norm (its square under FSDP: summed over the shards), the loss, and 1.0 when the step's
        forwards left a NaN or infinity in a buffer (BatchNorm statistics of a NaN batch).
        """
        self._vote, self._verdict = None, None
        runtime = self.runtime(trainer)
        if not runtime.has_loss(optimizer):  # training_step returned None: nothing to judge, no statistics to feed
            self._losses = []
            return [0.0, 0.0, 0.0, 0.0]
        self._candidate.wait()  # the weights are about to change: the async snapshot copy must be complete
        self._snapshot.wait()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = collect_grads(params)
        share_of = self._share_of
        weights = None if share_of is None else [share_of[id(p)] for p in params if p.grad is not None]
        norm = global_grad_norm(grads, weights=weights)  # weighted: a part replicated over ranks (HSDP) counts once
        if self._reduce:  # sharded: each rank holds a part; the squares add up across ranks
            norm = norm * norm
        scaler = self._scaler(trainer)
        if scaler is not None and steps_unscale_inside(optimizer):
            # fused optimizers unscale inside step(): the gradients are still scaled
            scale = _current_scale(scaler).to(norm.device)
            norm = norm / (scale * scale if self._reduce else scale)
        losses, self._losses = self._losses, []
        if not losses:
            loss = torch.zeros((), device=norm.device)
        elif len(losses) == 1:
            loss = losses[0].float().to(norm.device)
        else:  # gradient accumulation: Lightning already divided each micro-batch loss by the number of them
            loss = torch.stack([x.float() for x in losses]).sum().to(norm.device)
        self._vote = (optimizer, grads)
        buffers_bad = self._step_buffers.newly_nonfinite(norm.device)
        return torch.stack([torch.ones((), device=norm.device), norm.float(), loss, buffers_bad])

    @override
    def step_detail(self, total: tuple[float, ...]) -> bool:
        """Every rank's vote only where a sum is not finite or a buffer went bad: which ranks, to report them."""
        return needs_rows(total)

    @override
    def step_verdict(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, votes: StepVotes) -> None:
        self._verdict = votes

    def _guard_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        """Judge the agreed step (``functional.gradient_policy``), then act on the decision."""
        runtime = self.runtime(trainer)
        vote, votes = self._vote, self._verdict
        self._vote, self._verdict = None, None
        if not runtime.has_loss(optimizer):
            return
        if vote is None or votes is None or vote[0] is not optimizer:
            raise RuntimeError(
                "GradientGuard: no step agreement for this optimizer step (its on_before_optimizer_step was called "
                "outside Lightning's optimizer step, or a guard's hook did not call super())"
            )
        idx = max(runtime.optimizer_index(optimizer), 0)
        if votes.rows is not None:
            facts = step_facts(votes.rows, sharded=self._reduce)
        else:  # the common path: only the sums travelled (every sum finite, no bad buffer)
            facts = step_facts_from_sums(votes.total, votes.world, sharded=self._reduce)
        if facts.healthy:
            runtime.note_finite(optimizer)  # the GradScaler's inf check of these gradients needs no host read
        self.last_norm = facts.norm
        self._history.append(facts.norm)
        self._promote_candidate(idx, facts)
        scheduled = self._skip_remaining > 0
        judged = facts.healthy and not scheduled
        spike, z, loss_spike, loss_z = self._judge(idx, facts.norm, facts.loss_mean) if judged else _UNJUDGED
        decision = decide_step(
            facts,
            scheduled_skip=scheduled,
            scaler=self._scaler(trainer) is not None,
            spike=spike,
            z=z,
            loss_spike=loss_spike,
            loss_z=loss_z,
            spike_action=self.spike_action,
            rollback_z=self.rollback_z,
            rollback_enabled=self._rollback_enabled,
            suspect=self._suspect[idx],
            loss_streak=self._loss_streak[idx],
        )
        if judged and self.monitor_loss and not loss_spike:
            self._loss_stats[idx].update(facts.loss_mean)
        self._act(_Step(trainer, pl_module, optimizer, idx, vote[1], facts, z), decision)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._stepped_in_batch:  # an optimizer step ended this batch: the next one captures anew
            self._stepped_in_batch = False
            self._step_buffers.drop()
        if self._rollback_schedulers is not None or self._rollback_lrs is not None:
            self._finish_rollback(trainer)
        if not self._rollback_enabled:
            return
        stepped, self._applied_since_batch = self._applied_since_batch, False
        applied = self.runtime(trainer).applied_steps
        if (
            stepped  # an accumulating micro-batch changes nothing to capture
            and applied
            and not any(self._bad)
            and applied[0] - self._last_capture_applied >= self.snapshot_every
        ):
            self._take_snapshot(trainer, pl_module, self._candidate)
            self._last_capture_applied = applied[0]

    # ------------------------------------------------------------------ read-outs
    @property
    def counts(self) -> dict[str, int]:
        """How many times each event kind happened (on every rank)."""
        return dict(self._counts)

    @property
    def snapshot_step(self) -> int:
        """Global step of the current rollback snapshot (-1 before the first)."""
        return self._snapshot.step

    # ------------------------------------------------------------------ state
    #: the version of the checkpoint state this class writes
    STATE_VERSION = 1
    _STATE_LEGACY: ClassVar[dict[str, Any]] = {  # what a version-0 state lacking a key meant
        "stats": [],
        "loss_stats": [],
        "consecutive_bad": [],
        "suspect_damage": [],
        "loss_streak": [],
        "rollbacks": 0,
        "unstable_steps": [],
        "backoff_scale": [],
        "backoff_progress": [],
        "skip_remaining": 0,
        "history": [],
        "counts": {},
        "last_capture_applied": -1,
        "snapshot_step": -1,
    }
    _STATE: ClassVar[StateSchema] = StateSchema(
        "GradientGuard",
        STATE_VERSION,
        frozenset(_STATE_LEGACY),
        legacy=_STATE_LEGACY,
        removed=frozenset({"spike_steps"}),  # written until 2026-12-02 (d57927d)
    )

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._STATE.dump(
            {
                "stats": [s.state_dict() for s in self._stats],
                "loss_stats": [s.state_dict() for s in self._loss_stats],
                "consecutive_bad": list(self._bad),
                "suspect_damage": list(self._suspect),
                "loss_streak": list(self._loss_streak),
                "rollbacks": self._rollbacks,
                "unstable_steps": [list(b.skips) for b in self._backoffs],
                "backoff_scale": [b.scale for b in self._backoffs],
                "backoff_progress": [b.progress for b in self._backoffs],
                "skip_remaining": self._skip_remaining,
                "history": list(self._history),
                "counts": dict(self._counts),
                "last_capture_applied": self._last_capture_applied,
                "snapshot_step": self._snapshot.step if self._snapshot.taken else self._loaded_snapshot_step,
            }
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        def per_optimizer(value: Any) -> list[Any]:  # checkpoints of 0.x kept one value for all optimizers
            return list(value) if isinstance(value, list) else [value]

        state_dict = self._STATE.load(state_dict, extra=type(self) is not GradientGuard)  # a subclass's keys
        self._stats = [self._stats_from(s) for s in state_dict["stats"]]
        self._loss_stats = [self._stats_from(s) for s in per_optimizer(state_dict["loss_stats"])]
        self._bad = [int(v) for v in per_optimizer(state_dict["consecutive_bad"])]
        self._suspect = [bool(v) for v in per_optimizer(state_dict["suspect_damage"])]
        self._loss_streak = [int(v) for v in per_optimizer(state_dict["loss_streak"])]
        self._rollbacks = int(state_dict["rollbacks"])
        self._backoffs = self._backoffs_from(
            [[int(s) for s in w] for w in state_dict["unstable_steps"]],
            [float(v) for v in per_optimizer(state_dict["backoff_scale"])],
            [int(v) for v in per_optimizer(state_dict["backoff_progress"])],
        )
        self._skip_remaining = int(state_dict["skip_remaining"])
        self._history = deque((float(h) for h in state_dict["history"]), maxlen=32)
        self._counts = dict(state_dict["counts"])
        self._last_capture_applied = int(state_dict["last_capture_applied"])
        self._loaded_snapshot_step = int(state_dict["snapshot_step"])

    def _backoffs_from(self, skips: list[list[int]], scales: list[float], progress: list[int]) -> list[LrBackoff]:
        """One backoff per optimizer from the state's three lists (a 0.x state may have them of unequal lengths)."""
        backoffs = []
        for i in range(max(len(skips), len(scales), len(progress))):
            backoff = self._new_backoff()
            backoff.skips = deque(skips[i] if i < len(skips) else ())
            backoff.scale = scales[i] if i < len(scales) else 1.0
            backoff.progress = progress[i] if i < len(progress) else 0
            backoffs.append(backoff)
        return backoffs
