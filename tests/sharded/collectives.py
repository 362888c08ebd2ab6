"""Count the Python-level ``torch.distributed`` collectives of the training batches, and their bytes, per rank.

Every name the fence intercepts is wrapped on the ``torch.distributed`` module for the fit, before the guards' fence
wraps it in turn, so a fence agreement, the step's agreement, an event exchange and a user's ``sync_dist`` all count
(DDP's own gradient all-reduce, in C++, does not: it is the same with and without the guards). Counting runs from the
start of a training batch to the start of the next (the batch's hooks included), after ``skip`` batches; validation
and the epoch's end (the event exchange at epoch end) are left out.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from lightning_guard._fence import COLLECTIVES


def _origin() -> str:
    """Who issued the collective: the innermost ``lightning_guard`` function on the stack (the fence's pass-through
    of a user's collective is ``user``), else ``lightning`` (Lightning's own, e.g. its per-batch SIGTERM broadcast)."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("lightning_guard.") and not module.startswith("lightning_guard.testing"):
            return "user" if frame.f_code.co_name == "fenced" else f"{module}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "lightning"


def _numel_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_numel_bytes(v) for v in value)
    return 0


class CollectiveCounter(pl.Callback):
    """The pack's collectives and bytes (sent, received) per optimizer step on this rank; all of them by name and by
    origin (:func:`_origin`).

    ``sent``: the bytes of the tensor this rank contributes; ``received``: what comes back (an all-gather's rows from
    every rank, an all-reduce's one vector); the wire cost of each algorithm is in ``docs/scaling.md``.
    """

    def __init__(self, skip: int = 2) -> None:
        self.skip = skip
        self.counts: Counter[str] = Counter()
        self.origins: Counter[str] = Counter()
        self.sent = 0  # the pack's collectives only (below)
        self.received = 0
        self.steps = 0
        self._on = False
        self._originals: dict[str, Any] = {}
        self._step_at_start = 0

    def _wrap(self, name: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            origin = _origin() if self._on else ""
            if self._on:
                self.counts[name] += 1
                self.origins[origin] += 1
            if self._on and origin not in ("lightning", "user"):
                group = kwargs.get("group")
                world = dist.get_world_size(group) if dist.is_initialized() else 1
                if name in ("all_gather", "all_gather_object") and args:
                    out, inp = args[0], args[1] if len(args) > 1 else kwargs.get("tensor")
                    self.sent += _numel_bytes(inp)
                    self.received += _numel_bytes(out) or world * _numel_bytes(inp)
                elif name == "all_gather_into_tensor" and len(args) > 1:
                    self.sent += _numel_bytes(args[1])
                    self.received += _numel_bytes(args[0])
                elif args:
                    self.sent += _numel_bytes(args[0])
                    self.received += _numel_bytes(args[0])
            return original(*args, **kwargs)

        counted.__wrapped__ = original  # type: ignore[attr-defined]
        return counted

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                self._originals[name] = original
                setattr(dist, name, self._wrap(name, original))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals.clear()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._stop(trainer)
        if idx >= self.skip:
            self._on, self._step_at_start = True, trainer.global_step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop(trainer)

    def _stop(self, trainer: pl.Trainer) -> None:
        if self._on:
            self.steps += trainer.global_step - self._step_at_start
        self._on = False

    def result(self) -> dict[str, Any]:
        steps = max(self.steps, 1)
        pack = sum(n for origin, n in self.origins.items() if origin not in ("lightning", "user"))
        return {
            "steps": self.steps,
            "counts": dict(self.counts),
            "origins": dict(self.origins),
            "per_step": pack / steps,
            "sent_per_step": self.sent / steps,
            "received_per_step": self.received / steps,
        }
