"""OverfitGuard's hooks, evaluation and state (restoring and reporting are in its ``base`` layer)."""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_guard._checks import check_int, check_number, resolve_mode
from lightning_guard._compat import epoch_batches_done
from lightning_guard._sharded import sharded_training
from lightning_guard._state import StateSchema
from lightning_guard.callbacks._snapshot import Snapshot
from lightning_guard.callbacks.overfit_guard.base import OverfitGuardBase
from lightning_guard.distributed import gather_json
from lightning_guard.errors import GuardConfigError
from lightning_guard.functional.overfit import (
    divergence,
    generalization_loss,
    overfitting,
    progress_quotient,
    shift_suspected,
    stop_reason,
    training_progress,
    underfitting,
)

__all__ = ["OverfitGuard"]


class OverfitGuard(OverfitGuardBase):
    r"""Detect overfitting, underfitting and divergence; stop early; restore the best weights at the end.

    At every validation (wherever Lightning validates: ``val_check_interval``, ``check_val_every_n_epoch``) it reads the
    validation metric ``monitor`` and the training metric (``train_monitor``, or by default the mean training loss
    since the previous validation, taken from ``training_step``'s output without a host sync per step), agrees on them
    across ranks (mean over ranks; a non-finite value on any rank is a divergence), and:

    * tracks the best value with ``patience`` and ``min_delta`` (absolute or relative), keeping the best weights;
    * computes Prechelt's criteria on a strip of ``strip_length`` evaluations: the generalization loss
      :math:`GL = 100\,(E_{va}/E_{opt} - 1)`, the training progress :math:`P_k`, the progress quotient
      :math:`PQ = GL / P_k` and :math:`UP_s` (validation rose at the end of ``up_strips`` successive strips);
    * diagnoses ``overfitting`` (training improves while validation worsens and the gap grows), ``underfitting``
      (training progress :math:`P_k` under 1 per mille, validation moved under 1% over the strip, and no gap -
      raise capacity, the LR, or train longer), ``divergence`` (validation non-finite or ``divergence_factor`` times
      the best) and ``distribution_shift_suspected`` (from the first evaluations validation never improves while
      training falls, and ends up far worse than training);
    * stops training (every rank alike) by its ``criterion``, or at once on divergence;
    * at train end, whatever ended the run (its own stop, ``max_epochs``, another callback), puts back the best
      weights - before any ``on_fit_end`` export - so the final model's validation metric is the best recorded.

    The default criterion is ``"patience"``: with best-weight restore the exact stopping point costs only compute, and
    patience is robust to the metric's scale, whereas GL and PQ thresholds depend on it (Prechelt found the slower
    criteria give slightly better models at the price of longer training); choose ``"gl"``, ``"pq"`` or ``"up"`` for
    his rules. GL, PQ and UP need a positive, lower-is-better metric (``mode="min"``).

    Best weights are kept as a host copy of each rank's local tensors (its shards under FSDP; pinned and asynchronous
    on CUDA): host memory of one copy of the weights, and the same again in checkpoints, so that a resumed run
    restores the best weights seen before the interruption. With ``snapshot="checkpoint"`` no copy is kept: the best
    file of a ``ModelCheckpoint`` monitoring the same metric is loaded instead.

    Args:
        monitor: validation metric. Default ``"val_loss"``.
        train_monitor: training metric for the gap and the criteria; default: the mean training loss since the
            previous validation.
        mode: ``"min"`` or ``"max"``; default: from the words of ``monitor``'s name, as CompressExport reads them
            (``val_loss`` min, ``val_acc`` max); a name that does not say (``val_score``) is refused with a
            ``GuardConfigError``: restoring the best weights in the wrong direction would restore the worst.
        patience: validations without improvement before stopping (``criterion="patience"``) and before the
            underfitting diagnosis. Default ``5``.
        min_delta: smallest change that counts as an improvement. Default ``0.0``.
        min_delta_mode: ``"abs"`` or ``"rel"`` (a fraction of the best value). Default ``"abs"``.
        criterion: ``"patience"``, ``"gl"``, ``"pq"`` or ``"up"``. Default ``"patience"``.
        gl_alpha: GL threshold in percent. Default ``5.0``.
        pq_alpha: PQ threshold. Default ``0.5``.
        up_strips: strips for UP. Default ``3``.
        strip_length: evaluations per strip (Prechelt's k). Default ``5``.
        divergence_factor: ``mode="min"``: a value above this multiple of the best is a divergence; ``None`` only
            treats non-finite values so. Default ``10.0``.
        shift_ratio: a suspected distribution shift is flagged when, over the first ``shift_evaluations``
            evaluations, validation never improves while training falls and validation ends up more than this
            multiple of training; ``None`` disables it. Default ``3.0``.
        shift_evaluations: evaluations checked for a distribution shift. Default ``3``.
        min_evaluations: evaluations before any stop. Default ``1``.
        stop: stop training on the criterion (``False``: diagnose and restore only). Default ``True``.
        restore_best: restore the best weights at train end. Default ``True``.
        snapshot: ``"memory"`` (default) or ``"checkpoint"``.

    Raises:
        GuardConfigError: a bad argument; at the first validation, a ``monitor``/``train_monitor`` that was never
            logged (the message lists the available keys); ``snapshot="checkpoint"`` without a matching
            ``ModelCheckpoint``.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning_guard import OverfitGuard
        >>> guard = OverfitGuard(monitor="val_loss", patience=3, min_delta=0.01, min_delta_mode="rel")
        >>> trainer = pl.Trainer(callbacks=[guard], max_epochs=50, logger=False)
    """

    guard_name = "overfit_guard"
    MODES: tuple[str, ...] = ("min", "max")
    DELTA_MODES: tuple[str, ...] = ("abs", "rel")
    CRITERIA: tuple[str, ...] = ("patience", "gl", "pq", "up")
    SNAPSHOTS: tuple[str, ...] = ("memory", "checkpoint")

    def __init__(
        self,
        monitor: str = "val_loss",
        train_monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
        patience: int = 5,
        min_delta: float = 0.0,
        min_delta_mode: Literal["abs", "rel"] = "abs",
        criterion: Literal["patience", "gl", "pq", "up"] = "patience",
        gl_alpha: float = 5.0,
        pq_alpha: float = 0.5,
        up_strips: int = 3,
        strip_length: int = 5,
        divergence_factor: float | None = 10.0,
        shift_ratio: float | None = 3.0,
        shift_evaluations: int = 3,
        min_evaluations: int = 1,
        stop: bool = True,
        restore_best: bool = True,
        snapshot: Literal["memory", "checkpoint"] = "memory",
    ) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise GuardConfigError(f"`monitor` must be a non-empty metric name, got {monitor!r}")
        if train_monitor is not None and (not isinstance(train_monitor, str) or not train_monitor):
            raise GuardConfigError(f"`train_monitor` must be a metric name or None, got {train_monitor!r}")
        mode = resolve_mode("OverfitGuard", monitor, mode)
        if min_delta_mode not in self.DELTA_MODES:
            raise GuardConfigError(f"`min_delta_mode` must be one of {self.DELTA_MODES}, got {min_delta_mode!r}")
        if criterion not in self.CRITERIA:
            raise GuardConfigError(f"`criterion` must be one of {self.CRITERIA}, got {criterion!r}")
        if criterion in ("gl", "pq", "up") and mode != "min":
            raise GuardConfigError(
                f"`criterion={criterion!r}` needs a positive, lower-is-better metric (mode='min'), got mode={mode!r}"
            )
        if snapshot not in self.SNAPSHOTS:
            raise GuardConfigError(f"`snapshot` must be one of {self.SNAPSHOTS}, got {snapshot!r}")
        check_int("patience", patience, low=1)
        check_number("min_delta", min_delta, strict=False)
        check_number("gl_alpha", gl_alpha)
        check_number("pq_alpha", pq_alpha)
        check_int("up_strips", up_strips, low=1)
        check_int("strip_length", strip_length, low=2)
        check_number("divergence_factor", divergence_factor, low=1.0, optional=True)
        check_number("shift_ratio", shift_ratio, low=1.0, optional=True)
        check_int("shift_evaluations", shift_evaluations, low=1)
        check_int("min_evaluations", min_evaluations, low=1)
        for name, value in (("stop", stop), ("restore_best", restore_best)):
            if not isinstance(value, bool):
                raise GuardConfigError(f"`{name}` must be a bool, got {value!r}")
        self.monitor, self.train_monitor, self.mode = monitor, train_monitor, mode
        self.patience, self.min_delta, self.min_delta_mode = patience, float(min_delta), min_delta_mode
        self.criterion, self.gl_alpha, self.pq_alpha = criterion, float(gl_alpha), float(pq_alpha)
        self.up_strips, self.strip_length = up_strips, strip_length
        self.divergence_factor = None if divergence_factor is None else float(divergence_factor)
        self.shift_ratio = None if shift_ratio is None else float(shift_ratio)
        self.shift_evaluations, self.min_evaluations = shift_evaluations, min_evaluations
        self.stop, self.restore_best, self.snapshot = stop, restore_best, snapshot
        self._reset()

    def _reset(self) -> None:
        self.best: float = math.inf if self.mode == "min" else -math.inf
        self.best_step = -1
        self.best_epoch = -1
        self.wait = 0
        self.history: list[dict[str, float]] = []
        self.stopped_reason: str | None = None
        self.stopped_step = -1
        self._flags: dict[str, bool] = {}
        self._best_weights = Snapshot()
        self._best_is_shard = False  # the snapshot holds this rank's shards only (FSDP, FSDP2)
        self._train_losses: list[torch.Tensor] = []
        self._train_scale = 1.0
        self._val_min = math.inf  # Prechelt's E_opt: the lowest validation value so far (not min_delta-gated)
        self._deferred: tuple[float, tuple[int, ...]] | None = None  # validation waiting for an epoch-end metric
        self._restored = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    # ------------------------------------------------------------------ training metric
    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.train_monitor is not None or not isinstance(loss, torch.Tensor):
            return
        # Lightning hands over the loss divided by accumulate_grad_batches; keep it, reduce at validation (no work
        # and no host sync on the step path).
        self._train_losses.append(loss.detach().reshape(()))
        self._train_scale = float(trainer.accumulate_grad_batches)

    # ------------------------------------------------------------------ validation
    def _should_skip(self, trainer: pl.Trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return (
            trainer.state.fn != TrainerFn.FITTING
            or trainer.sanity_checking
            or bool(getattr(trainer, "fast_dev_run", False))
        )

    def _read(self, trainer: pl.Trainer, key: str, what: str) -> float:
        metrics = trainer.callback_metrics
        if key not in metrics:
            available = sorted(metrics)
            raise GuardConfigError(
                f"OverfitGuard's `{what}` {key!r} was not logged; available metrics: {available}. Log it with "
                f"self.log({key!r}, ...) or pass the name of one of these"
            )
        value = metrics[key]
        return float(value.item()) if isinstance(value, torch.Tensor) else float(value)

    def _reduce_train_losses(self) -> tuple[float, float]:
        """Sum and count of the finite training losses since the previous validation (one host sync)."""
        losses, self._train_losses = self._train_losses, []
        if not losses:
            return 0.0, 0.0
        values = torch.stack([x.float() for x in losses]) * self._train_scale
        finite = torch.isfinite(values)
        total, count = torch.stack([torch.where(finite, values, 0.0).sum(), finite.sum().float()]).tolist()
        return float(total), float(count)

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if not math.isfinite(self.best):
            return True
        delta = self.min_delta * abs(self.best) if self.min_delta_mode == "rel" else self.min_delta
        return value < self.best - delta if self.mode == "min" else value > self.best + delta

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer):
            return
        val = self._read(trainer, self.monitor, "monitor")
        if self.train_monitor is not None and epoch_batches_done(trainer):
            # Validation at the end of a training epoch runs before Lightning aggregates the epoch's training
            # metrics (`train_loss_epoch` is missing, or still the previous epoch's): finish this evaluation at
            # on_train_epoch_end, where they are this epoch's.
            self._deferred = (val, ())
            return
        self._agree_and_evaluate(trainer, pl_module, val)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._deferred is not None:
            val, self._deferred = self._deferred[0], None
            self._agree_and_evaluate(trainer, pl_module, val)

    def _agree_and_evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, val: float) -> None:
        if self.train_monitor is not None:
            train_sum, train_count = self._read(trainer, self.train_monitor, "train_monitor"), 1.0
        else:
            train_sum, train_count = self._reduce_train_losses()
        # One collective: every rank's view; every rank then decides from the same numbers.
        views = gather_json(trainer, [val if math.isfinite(val) else str(val), train_sum, train_count])
        vals = [float(v[0]) for v in views]
        bad_ranks = tuple(r for r, v in enumerate(vals) if not math.isfinite(v))
        val = math.nan if bad_ranks else sum(vals) / len(vals)
        total = sum(v[2] for v in views)
        if self.train_monitor is not None:
            train = sum(v[1] for v in views) / len(views)
        else:
            train = sum(v[1] for v in views) / total if total > 0 else math.nan
        self._evaluate(trainer, pl_module, val, train, bad_ranks)

    def _train_better(self, a: float, b: float) -> bool:
        """Whether training value ``a`` is better than ``b``.

        The training loss is lower-is-better whatever ``mode``; a ``train_monitor`` goes the way of ``mode`` (an
        accuracy beside a validation accuracy).
        """
        return a > b if self.train_monitor is not None and self.mode == "max" else a < b

    def _learned(self, train: float, gap: float) -> bool:
        """The model fits its training data better than its validation data: a real gap, as underfitting reads it.

        With a gap (``val - train`` of two losses, or of ``train_monitor`` and ``monitor``): at least a tenth of the
        training value (underfitting's "no real gap" is below that). Without one (an accuracy judged against the
        training loss): the training loss fell by at least a tenth since the first validation.
        """
        if math.isfinite(gap):
            return gap > 0.1 * abs(train)
        first = self.history[0]["train"] if self.history else math.nan
        return math.isfinite(first) and train < 0.9 * first

    def _gap(self, val: float, train: float) -> float:
        """How much worse validation is than training, when the two are the same kind of metric (else NaN)."""
        if self.mode == "min":
            return val - train
        return train - val if self.train_monitor is not None else math.nan

    def _evaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, val: float, train: float, bad_ranks: tuple[int, ...]
    ) -> None:
        """Record the evaluation, judge it (``functional.overfit``), then act: report, stop, keep the best weights."""
        improved = self._record(trainer, pl_module, val, train)
        row = self.history[-1]
        data = {
            "val": val,
            "train": train,
            "best": self.best,
            "best_step": self.best_step,
            "gap": row["gap"],
            "gl": row["gl"],
            "pq": row["pq"],
            "p_k": row["p_k"],
            "wait": self.wait,
            "patience": self.patience,
        }
        why = divergence(val, self.best, mode=self.mode, factor=self.divergence_factor, nonfinite=bool(bad_ranks))
        if why is not None:  # stop at once
            msg = f"validation {self.monitor} diverged ({why})"
            self._event(trainer, "divergence", "error", msg, data, ranks=bad_ranks)
            self._stop(trainer, "divergence", data)
            return
        if not improved:
            self._event(
                trainer,
                "no_improvement",
                "info",
                f"{self.monitor}={val:.5g}, best {self.best:.5g} at step {self.best_step} "
                f"({self.wait}/{self.patience})",
                data,
            )
        self._diagnose(trainer, improved, val, train, data)
        if len(self.history) < self.min_evaluations or not self.stop:
            return
        reason = stop_reason(
            self.criterion,
            evaluations=len(self.history),
            wait=self.wait,
            patience=self.patience,
            gl=row["gl"],
            gl_alpha=self.gl_alpha,
            pq=row["pq"],
            pq_alpha=self.pq_alpha,
            strip_length=self.strip_length,
            strip_ends=[h["val"] for h in self.history[self.strip_length - 1 :: self.strip_length]],
            up_strips=self.up_strips,
        )
        if reason is not None:
            self._stop(trainer, reason, data)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, val: float, train: float) -> bool:
        """Update the best value (and its weights), the wait, the history and its criteria; whether ``val`` improved."""
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        improved = self._improved(val)
        if improved:
            self.best, self.best_step, self.best_epoch, self.wait = val, step, epoch, 0
            if self.restore_best and self.snapshot == "memory":
                self._best_weights.capture(pl_module, [], None, [], step)
                self._best_is_shard = sharded_training(trainer)
        elif math.isfinite(val):
            self.wait += 1
        if math.isfinite(val):
            self._val_min = min(self._val_min, val)
        gl = generalization_loss(val, self._val_min) if self.mode == "min" else math.nan
        trains = [h["train"] for h in self.history[-(self.strip_length - 1) :]] + [train]
        progress = training_progress(trains) if len(trains) >= self.strip_length else math.nan
        pq = progress_quotient(gl, progress) if not math.isnan(progress) else math.nan
        gap = self._gap(val, train)
        self.history.append(
            {"step": step, "epoch": epoch, "val": val, "train": train, "gap": gap, "gl": gl, "pq": pq, "p_k": progress}
        )
        self._log(trainer, gap, gl, pq)
        return improved

    def _diagnose(self, trainer: pl.Trainer, improved: bool, val: float, train: float, data: dict[str, Any]) -> None:
        """Report a suspected distribution shift, overfitting and underfitting (each once while it lasts)."""
        first, row = self.history[0], self.history[-1]
        gap, progress = row["gap"], row["p_k"]
        shift = shift_suspected(
            evaluations=len(self.history),
            max_evaluations=self.shift_evaluations,
            ratio=self.shift_ratio,
            mode=self.mode,
            best_is_first=self.best_step == first["step"],
            first_train=first["train"],
            val=val,
            train=train,
        )
        if shift and not self._flags.get("shift"):
            self._flags["shift"] = True
            self._event(
                trainer,
                "distribution_shift_suspected",
                "warning",
                f"validation never improved ({first['val']:.4g} -> {val:.4g}) while training fell to {train:.4g} "
                f"({val / train:.1f}x): check that the validation data come from the training distribution "
                "(preprocessing, leakage, labels)",
                data,
            )
        best_row = next((h for h in self.history if h["step"] == self.best_step), None)
        over = best_row is not None and overfitting(
            improved=improved,
            learned=self._learned(train, gap),
            train_improved=self._train_better(train, best_row["train"]),
            train=train,
            gap=gap,
            best_gap=best_row["gap"],
            worse_than_best=val > self.best if self.mode == "min" else val < self.best,
        )
        if over and not self._flags.get("overfitting"):
            assert best_row is not None
            grew = f"; the gap grew from {best_row['gap']:.4g} to {gap:.4g}" if math.isfinite(gap) else ""
            self._event(
                trainer,
                "overfitting",
                "warning",
                f"training {train:.4g} keeps improving while validation {val:.4g} is worse than its best "
                f"{self.best:.4g}{grew}",
                data,
            )
        self._flags["overfitting"] = bool(over)
        strip = self.history[-self.strip_length :]
        first_val = strip[0]["val"] if len(strip) == self.strip_length else None
        under, moved = underfitting(progress=progress, strip_first_val=first_val, val=val, train=train, gap=gap)
        if under and not self._flags.get("underfitting"):
            self._flags["underfitting"] = True
            self._event(
                trainer,
                "underfitting",
                "warning",
                f"training stalled at {train:.4g} (progress {progress:.3g} per mille over {self.strip_length} "
                f"evaluations) and validation {val:.4g} moved {100 * moved:.2g}% with no gap: raise capacity or "
                "the learning rate, or train longer",
                data,
            )

    def _stop(self, trainer: pl.Trainer, reason: str, data: dict[str, Any]) -> None:
        if not self.stop:
            return
        trainer.should_stop = True
        if self.stopped_reason is None:
            self.stopped_reason, self.stopped_step = reason, int(trainer.global_step)
            self._event(
                trainer,
                "stop",
                "warning" if reason == "divergence" else "info",
                f"stopping ({reason}); best {self.monitor}={self.best:.5g} at step {self.best_step}",
                data,
                reason=reason,
            )

    # ------------------------------------------------------------------ state
    #: the version of the checkpoint state this class writes
    STATE_VERSION = 1
    _STATE_KEYS = frozenset(
        {"best", "best_step", "best_epoch", "wait", "history", "stopped_reason", "stopped_step", "flags", "val_min"}
        | {"deferred_val"}
    )

    def _state_schema(self) -> StateSchema:
        def from_v0(state: dict[str, Any]) -> dict[str, Any]:
            best = float(state.get("best", self.best))
            legacy = {
                "best": best,
                "best_step": -1,
                "best_epoch": -1,
                "wait": 0,
                "history": [],
                "stopped_reason": None,
                "stopped_step": -1,
                "flags": {},
                "val_min": best if self.mode == "min" else math.inf,
                "deferred_val": None,
            }
            return {**legacy, **state}

        return StateSchema(
            "OverfitGuard",
            self.STATE_VERSION,
            self._STATE_KEYS,
            optional=frozenset({"best_weights"}),
            migrations={0: from_v0},
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "best": self.best,
            "best_step": self.best_step,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "history": [dict(h) for h in self.history],
            "stopped_reason": self.stopped_reason,
            "stopped_step": self.stopped_step,
            "flags": dict(self._flags),
            "val_min": self._val_min,
            "deferred_val": None if self._deferred is None else self._deferred[0],
        }
        self._best_weights.wait()  # never store a half-copied snapshot (asynchronous on CUDA)
        # Lightning writes callback states from rank 0 only: under sharded training that would hand rank 0's shards to
        # every rank on resume. The best weights stay in memory; after a resume they are taken anew.
        if self._best_weights.taken and not self._best_is_shard:
            state["best_weights"] = {
                "params": [t.clone() for t in self._best_weights.params],
                "buffers": [t.clone() for t in self._best_weights.buffers],
            }
        return self._state_schema().dump(state)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = self._state_schema().load(state_dict, extra=type(self) is not OverfitGuard)
        self.best = float(state["best"])
        self.best_step = int(state["best_step"])
        self.best_epoch = int(state["best_epoch"])
        self.wait = int(state["wait"])
        self.history = [dict(h) for h in state["history"]]
        self.stopped_reason = state["stopped_reason"]
        self.stopped_step = int(state["stopped_step"])
        self._flags = dict(state["flags"])
        self._val_min = float(state["val_min"])
        deferred = state["deferred_val"]
        self._deferred = None if deferred is None else (float(deferred), ())
        weights = state.get("best_weights")
        if weights:
            self._best_weights.load_tensors(list(weights["params"]), list(weights["buffers"]), self.best_step)
