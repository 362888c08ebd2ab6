"""The step agreement's message: every guard's votes summed over the ranks in one fixed-size all-reduce.

:class:`StepVotes` is what a guard's ``step_verdict`` receives; :class:`StepChannel` is where the agreement is held
when a guard provides its own group (OOMGuard's gloo fence); :func:`sum_on_device` holds it through the default
group on the device (one all-reduce, one host read; every rank's row in a second collective only where a guard asks
for it from the sums, :func:`wants_rows`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lightning_guard.distributed import all_reduce_sum

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["StepChannel", "StepVotes", "sum_on_device", "to_host", "wants_rows"]


@dataclass(frozen=True)
class StepVotes:
    """One guard's votes for a step, as the step agreement hands them to :meth:`GuardCallback.step_verdict`.

    Attributes:
        total: each number of the vote summed over the ranks (on one process: this rank's vote).
        rows: every rank's vote, in rank order, on a step where any guard asked for the rows
            (:meth:`GuardCallback.step_detail`: then every guard gets its own), and on one process; None on the
            common path, where the sums are all that travelled.
        world: the number of ranks.
    """

    total: tuple[float, ...]
    rows: tuple[tuple[float, ...], ...] | None
    world: int

    # A guard written for the protocol before the sums (``step_verdict(trainer, optimizer, rows)``) reads the votes as
    # a sequence of rows: it keeps the default ``step_detail`` (always rows), so they are always there.
    def _rows(self) -> tuple[tuple[float, ...], ...]:
        if self.rows is None:
            raise RuntimeError(
                "StepVotes: every rank's rows were not gathered for this step (the guard's `step_detail` declined "
                "them): read `total`"
            )
        return self.rows

    def __len__(self) -> int:
        return len(self._rows())

    def __iter__(self) -> Iterator[tuple[float, ...]]:
        return iter(self._rows())

    def __getitem__(self, index: int) -> tuple[float, ...]:
        return self._rows()[index]


class StepChannel(Protocol):
    """Where the step agreement is held when a guard provides its own group (OOMGuard's fence).

    ``owner``: the guard that provides it; its vote leads the row (its first number is where the rank stands).
    """

    owner: Any

    def reduce(self, row: list[float]) -> tuple[list[float], bool]:
        """Sum ``row`` over ranks (one fixed-size collective); also whether every rank stands at this agreement."""

    def rows(self, row: list[float]) -> list[list[float]]:
        """Every rank's ``row`` in rank order (the second collective, held only where a guard asks for it)."""


def wants_rows(spans: list[tuple[Any, int, int]], total: list[float]) -> bool:
    """Whether a guard needs every rank's vote, judging from the sums (the same decision on every rank)."""
    return any(cb.step_detail(tuple(total[start:end])) for cb, start, end in spans)


def sum_on_device(
    trainer: pl.Trainer,
    votes: list[tuple[Any, torch.Tensor | list[float]]],
    spans: list[tuple[Any, int, int]],
    pending: float,
) -> tuple[list[float], list[list[float]] | None]:
    """The step's sums through the default group (an all-reduce on the device, one host read); rows only if wanted.

    ``votes``: each guard's vote; ``pending``: this rank's count of events waiting (the last column).
    """
    dev = trainer.strategy.root_device
    parts = [
        v.reshape(-1).to(device=dev, dtype=torch.float32)
        if isinstance(v, torch.Tensor)
        else torch.tensor(v, dtype=torch.float32, device=dev)
        for _, v in votes
    ]
    parts.append(torch.tensor([pending], dtype=torch.float32, device=dev))
    vector = torch.cat(parts)
    total = to_host([all_reduce_sum(trainer, vector.clone()).reshape(-1)])
    if not wants_rows(spans, total):
        return total, None
    flat = to_host([trainer.strategy.all_gather(vector).reshape(-1)])
    n = len(total)
    return total, [flat[i * n : (i + 1) * n] for i in range(len(flat) // n)]


def to_host(tensors: list[torch.Tensor]) -> list[float]:
    """The values of 1-d float tensors (on any devices), in order, read in one device-to-host copy per device."""
    if not tensors:
        return []
    if all(t.device == tensors[0].device for t in tensors):
        return torch.cat(tensors).tolist()
    return [v for t in tensors for v in t.tolist()]
