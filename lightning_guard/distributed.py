"""Rank agreement and small collectives, all issued through ``trainer.strategy``.

Every control-flow decision a guard takes (skip, stop, halve, roll back, restore) goes through :func:`agree`, so no
rank ever acts alone. On one process every function here is a no-op that needs no process group.

This module knows no events and no guards: the runtime (``lightning_guard._runtime``) adds what it needs to carry (the
number of guard events waiting on each rank) to the payload of the agreements it holds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["Agreement", "agree", "all_reduce_max", "all_reduce_sum", "gather_json", "world_size"]


def world_size(trainer: pl.Trainer) -> int:
    """Number of processes taking part in training (1 without a process group)."""
    return int(getattr(trainer, "world_size", 1) or 1)


@dataclass(frozen=True)
class Agreement:
    """The outcome of one rank-agreement collective.

    Attributes:
        flags: one boolean per rank, in rank order.
        values: per rank, the float payload it sent (empty tuples without a payload).
    """

    flags: tuple[bool, ...]
    values: tuple[tuple[float, ...], ...] = ()

    @property
    def any(self) -> bool:
        """True if at least one rank raised the flag."""
        return any(self.flags)

    @property
    def all(self) -> bool:
        """True if every rank raised the flag."""
        return all(self.flags)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ranks that raised the flag."""
        return tuple(i for i, f in enumerate(self.flags) if f)

    def __bool__(self) -> bool:
        return self.any


def _device(trainer: pl.Trainer) -> torch.device:
    return trainer.strategy.root_device


def agree(trainer: pl.Trainer, flag: bool | torch.Tensor, payload: torch.Tensor | None = None) -> Agreement:
    """Agree on a boolean across all ranks: every rank learns which ranks raised it (and their payloads).

    One small ``all_gather`` per call (the cost of an all-reduce) and one host sync. On one process no collective is
    issued (the one host sync reads the flag and payload). Guards agree through ``GuardRuntime.agree``, which also
    carries the guard events waiting on each rank.

    Args:
        trainer: the running trainer.
        flag: this rank's vote (a Python bool or a 0-dim tensor, which may live on the device).
        payload: optional 1-d float tensor of numbers to share (same length on every rank), e.g. a gradient norm;
            sent in fp32.

    Returns:
        An :class:`Agreement`; ``bool(agreement)`` is True when any rank raised the flag.

    Example:
        >>> import lightning.pytorch as pl
        >>> agree(pl.Trainer(accelerator="cpu", logger=False), True).ranks
        (0,)
    """
    n = 0 if payload is None else int(payload.numel())
    if world_size(trainer) <= 1:
        if payload is None and not isinstance(flag, torch.Tensor):
            return Agreement((bool(flag),), ((),))
        parts = [flag.reshape(1).float() if isinstance(flag, torch.Tensor) else torch.tensor([float(bool(flag))])]
        if payload is not None:
            parts.append(payload.reshape(-1).float().to(parts[0].device))
        row = torch.cat(parts).tolist()  # the one host sync
        return Agreement((bool(row[0]),), (tuple(row[1:]),))
    device = _device(trainer)
    local = torch.zeros(1 + n, dtype=torch.float32, device=device)
    if isinstance(flag, torch.Tensor):
        local[0] = flag.to(device=device, dtype=torch.float32).reshape(())
    else:
        local[0] = float(bool(flag))
    if payload is not None:
        local[1:] = payload.reshape(-1).to(device=device, dtype=torch.float32)
    gathered = trainer.strategy.all_gather(local).reshape(-1, 1 + n).cpu()  # the one host sync
    flags = tuple(bool(v) for v in gathered[:, 0].tolist())
    values = tuple(tuple(row) for row in gathered[:, 1:].tolist())
    return Agreement(flags, values)


def all_reduce_sum(trainer: pl.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks, in place (returns the input on one process): one collective."""
    return _all_reduce(trainer, tensor, "sum")


def all_reduce_max(trainer: pl.Trainer, tensor: torch.Tensor) -> torch.Tensor:
    """Take the elementwise maximum of a tensor over ranks, in place (returns the input on one process)."""
    return _all_reduce(trainer, tensor, "max")


def _all_reduce(trainer: pl.Trainer, tensor: torch.Tensor, op: str) -> torch.Tensor:
    """One ``torch.distributed.all_reduce`` on the default group where it is initialised; else the strategy's reduce.

    Not ``strategy.reduce`` where torch.distributed runs: Lightning's DDP reduce holds a barrier before every
    all-reduce, a second collective for nothing.
    """
    if world_size(trainer) <= 1:
        return tensor
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(tensor, op=reduce_op)
        return tensor
    return trainer.strategy.reduce(tensor, reduce_op=op)


def gather_json(trainer: pl.Trainer, obj: Any) -> list[Any]:
    """Gather one JSON-serialisable object from every rank, on every rank, in rank order.

    Objects travel as UTF-8 bytes in padded ``uint8`` tensors through ``trainer.strategy.all_gather`` (two
    collectives), so it works on gloo and NCCL alike without pickling.
    """
    if world_size(trainer) <= 1:
        return [obj]
    device = _device(trainer)
    payload = torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8).to(device)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes: Sequence[int] = trainer.strategy.all_gather(size).reshape(-1).tolist()
    padded = torch.zeros(max(sizes), dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    gathered = trainer.strategy.all_gather(padded).reshape(len(sizes), -1).cpu()
    return [json.loads(bytes(gathered[i, :n].tolist()).decode("utf-8")) for i, n in enumerate(sizes)]
