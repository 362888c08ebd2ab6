"""GuardMixin: the LightningModule side of lightning_guard."""

from __future__ import annotations

from typing import Any

import torch

from lightning_guard._compat import attached_trainer
from lightning_guard._runtime import event_stream
from lightning_guard.events import GuardEvent
from lightning_guard.functional.class_balance import Task, balanced_loss
from lightning_guard.functional.oom import split_batch

__all__ = ["GuardMixin"]

#: buffers ClassBalance registers on the module; kept in fp32 whatever precision the module is cast to
BALANCE_BUFFERS = ("guard_class_weights", "guard_class_log_prior", "guard_pos_weight")


class GuardMixin:
    """Mix into a ``LightningModule`` (before it in the bases) to use the guards' module-side features.

    * :meth:`balanced_loss` - the classification loss the guards can steer: with a ``ClassBalance`` callback,
      class-weighted or logit-adjusted (or focal, or BCE with ``pos_weight``) as it configures; without one, exactly
      ``F.cross_entropy`` (segmentation maps, ``ignore_index``, ``label_smoothing`` and class-probability targets
      included; BCE-with-logits for ``task="binary"``/``"multilabel"``). Always computed in fp32, whatever
      the autocast dtype, and normalised by the number of samples so that micro-batches and ranks add up to the
      whole batch.
    * :meth:`track_classes` - per-class recall and balanced accuracy on validation (torchmetrics), logged by
      ``ClassBalance``.
    * :meth:`split_batch` - how OOMGuard cuts a batch into micro-batches (override for custom batch types).
    * :attr:`guard_events` - the events the guards reported so far in this run.

    The class weights and the log prior live in registered buffers that follow device moves but stay fp32 under
    ``bf16-true``/``16-true`` (the module's other tensors are cast).

    Example:
        >>> import lightning.pytorch as pl
        >>> class Net(GuardMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(4, 3)
        >>> net = Net()
        >>> loss = net.balanced_loss(torch.zeros(2, 3), torch.tensor([0, 2]))
        >>> round(loss.item(), 4), loss.dtype
        (1.0986, torch.float32)
    """

    def balanced_loss(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        *,
        task: Task | None = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Classification loss in fp32; exactly ``F.cross_entropy`` when no ClassBalance guard is configured.

        Args:
            logits: what ``F.cross_entropy`` takes: ``(N, C)`` or ``(N, C, d1, ...)`` class scores (classes on dim 1);
                for ``task="binary"``/``"multilabel"``, logits shaped like ``target``.
            target: class indices (``(N,)`` or ``(N, d1, ...)``), or class probabilities shaped like ``logits``; for
                binary/multilabel, 0/1 floats shaped like ``logits``.
            task: ``"multiclass"``, ``"binary"`` or ``"multilabel"`` (BCE-with-logits); default: the task of the
                configured ClassBalance, else ``"multiclass"``.
            ignore_index: target value that is ignored (index targets), as in ``F.cross_entropy``.
            label_smoothing: as in ``F.cross_entropy``.

        Returns:
            The loss as an fp32 scalar tensor.
        """
        cfg = self.__dict__.get("_guard_balance")
        task = task or (cfg["task"] if cfg is not None else "multiclass")
        if task not in ("multiclass", "binary", "multilabel"):
            raise ValueError(f"`task` must be 'multiclass', 'binary', 'multilabel' or None, got {task!r}")
        if cfg is None:
            return balanced_loss(logits, target, task=task, ignore_index=ignore_index, label_smoothing=label_smoothing)
        buffers: dict[str, torch.Tensor] = self._buffers  # type: ignore[attr-defined]
        training = bool(getattr(self, "training", True))
        return balanced_loss(
            logits,
            target,
            weights=buffers.get("guard_class_weights") if cfg["weighted"] else None,
            log_prior=buffers.get("guard_class_log_prior") if cfg["adjust"] and training else None,
            tau=cfg["tau"],
            gamma=cfg["gamma"],
            pos_weight=buffers.get("guard_pos_weight"),
            task=task,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )

    def track_classes(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Update the per-class recall and balanced accuracy (call it in ``validation_step``)."""
        metrics = self.__dict__.get("_guard_class_metrics")
        if metrics is None:
            return
        # classes on dim 1, as in cross-entropy ((N, C) logits, or (N, C, H, W) maps against (N, H, W) targets)
        preds = logits.detach().float().argmax(1) if logits.dim() > target.dim() else logits.detach().float()
        for metric in metrics.values():
            metric.update(preds, target)

    def split_batch(self, batch: Any, micro_batch_size: int) -> list[Any]:
        """Split a batch into micro-batches of at most ``micro_batch_size`` samples, in order (used by OOMGuard).

        The default cuts tensors (and lists of per-sample values) along dim 0 inside tuples, lists, dicts,
        namedtuples and dataclasses (:func:`lightning_guard.functional.split_batch`). Override it for other batch
        types, e.g. packed sequences or graphs.
        """
        return split_batch(batch, micro_batch_size)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        masters: dict[str, torch.Tensor] = self.__dict__.get("_guard_fp32_buffers", {})
        buffers: dict[str, torch.Tensor] = self._buffers  # type: ignore[attr-defined]
        for name, master in masters.items():
            if name in buffers and buffers[name] is not None:
                buffers[name] = master.to(buffers[name].device)
        return out

    @property
    def guard_events(self) -> list[GuardEvent]:
        """Events reported by the guards in the current run (all ranks' events on rank 0; own events elsewhere)."""
        trainer: Any = attached_trainer(self)
        if trainer is None:
            return []
        return list(event_stream(trainer).events)
