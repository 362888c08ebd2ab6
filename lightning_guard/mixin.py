"""GuardMixin: the LightningModule side of lightning_guard."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lightning_guard.events import GuardEvent, event_stream

__all__ = ["GuardMixin"]


class GuardMixin:
    """Mix into a ``LightningModule`` (before it in the bases) to use the guards' module-side features.

    * :meth:`balanced_loss` - the classification loss the guards can steer: plain cross-entropy (or BCE-with-logits
      for float targets shaped like the logits) computed in fp32 whatever the autocast dtype.
    * :attr:`guard_events` - the events the guards reported so far in this run.

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

    def balanced_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Classification loss in fp32; plain cross-entropy when no ClassBalance guard is configured.

        Args:
            logits: ``(N, C)`` class scores, or logits shaped like ``target`` for binary/multilabel.
            target: ``(N,)`` integer class indices, or float targets shaped like ``logits``.

        Returns:
            The mean loss as an fp32 scalar tensor.
        """
        logits32 = logits.float()
        with torch.autocast(device_type=logits.device.type, enabled=False):
            if target.is_floating_point() and target.shape == logits.shape:
                return F.binary_cross_entropy_with_logits(logits32, target.float())
            return F.cross_entropy(logits32, target)

    @property
    def guard_events(self) -> list[GuardEvent]:
        """Events reported by the guards in the current run (all ranks' events on rank 0; own events elsewhere)."""
        trainer: Any = getattr(self, "_trainer", None)
        if trainer is None:
            return []
        return list(event_stream(trainer).events)
