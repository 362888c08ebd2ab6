"""OOMGuard's micro-batch size policy, as a value object and pure functions of plain numbers.

:class:`SizePolicy` holds what the policy remembers (the micro-batch size in force, clean batches since the last
change, how long to wait before growing back, the size a grow-back started from, the largest batch seen); its
methods return the next policy and a decision (:class:`Shrink` after an out-of-memory, :class:`Grow` after a clean
batch) instead of acting. ``OOMGuard`` builds it from its own fields, adopts what it returns and acts (re-run, report,
give up); nothing here touches a trainer, a tensor or a device, so every rule is tested on plain numbers
(``tests/functional/test_oom_policy.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Grow", "Shrink", "SizePolicy", "chunked", "current_size", "eval_retry_size", "oom_size"]

#: the checkpoint keys of the policy's state, in the order ``OOMGuard.state_dict`` writes them
STATE_KEYS = ("micro_batch_size", "clean_steps", "grow_wait", "growing_from", "largest_batch")


def current_size(micro_batch_size: int | None, batch_n: int) -> int:
    """The micro-batch size in force for a batch of ``batch_n`` samples (``-1``: not measured yet, the size as is)."""
    n = batch_n
    return n if micro_batch_size is None or n < 0 else min(micro_batch_size, n)


def chunked(micro_batch_size: int | None, batch_n: int) -> bool:
    """True when a batch of ``batch_n`` samples runs as more than one micro-batch."""
    return micro_batch_size is not None and batch_n > micro_batch_size


def oom_size(part_samples: int, micro_batch_size: int | None, batch_n: int) -> int:
    """The size to record for an out-of-memory in a part of ``part_samples``: at least the size in force.

    The short last part of a batch (50 in parts of 12 ends with 2) must not make the next size 1.
    """
    return max(part_samples, current_size(micro_batch_size, batch_n))


def eval_retry_size(size: int) -> int:
    """The evaluation micro-batch size after an out-of-memory at ``size`` (below 1: give up)."""
    return max(1, size // 2) if size > 1 else 0


@dataclass(frozen=True)
class Shrink:
    """The decision after an out-of-memory.

    Attributes:
        failed: the micro-batch size the failing ranks were at (the smallest of them).
        new: the micro-batch size to re-run the batch at (0: one sample does not fit, give up).
        grow_back_failed: the failure was a grow-back's: ``new`` is the size that worked before it.
    """

    failed: int
    new: int
    grow_back_failed: bool = False

    @property
    def give_up(self) -> bool:
        """Smaller micro-batches cannot help: the failure was at size 1."""
        return self.new < 1


@dataclass(frozen=True)
class Grow:
    """The decision to try a larger micro-batch size after clean batches.

    Attributes:
        old: the micro-batch size that worked.
        new: the size to try (the largest batch seen when doubling reaches it: the whole batch again).
        after: the clean batches waited for it.
    """

    old: int
    new: int
    after: int


@dataclass(frozen=True)
class SizePolicy:
    """The micro-batch size policy's state; each method returns the next state (and a decision), never acts.

    Attributes:
        micro_batch_size: the size in force (None: the whole batch).
        grow_after: double the size again after this many clean batches (None: never grow back).
        clean_steps: clean batches since the size last changed.
        grow_wait: clean batches to wait before the next grow-back (doubled after a failed one).
        growing_from: the size a grow-back in progress started from (None: none in progress).
        largest_batch: the largest batch seen, in samples (doubling up to it returns to the whole batch).
    """

    micro_batch_size: int | None = None
    grow_after: int | None = None
    clean_steps: int = 0
    grow_wait: int = 0
    growing_from: int | None = None
    largest_batch: int = 0

    @classmethod
    def start(cls, micro_batch_size: int | None, grow_after: int | None) -> SizePolicy:
        """The policy of a new guard."""
        return cls(micro_batch_size, grow_after, grow_wait=grow_after or 0)

    def saw_batch(self, batch_n: int) -> SizePolicy:
        """A batch of ``batch_n`` samples starts."""
        return dataclasses.replace(self, largest_batch=max(self.largest_batch, batch_n))

    def after_oom(self, failed_sizes: Iterable[float]) -> tuple[SizePolicy, Shrink]:
        """Out of memory on the ranks that were at ``failed_sizes``: halve, or return to the size a grow-back left.

        A failed grow-back waits twice as long before the next one. At size 1 the decision is to give up, and the
        state is returned unchanged.
        """
        failed = int(min(failed_sizes))
        if self.growing_from is not None and self.growing_from < failed:
            new, wait, back = self.growing_from, self.grow_wait * 2, True
        else:
            if failed <= 1:
                return self, Shrink(failed, 0)
            new, wait, back = max(1, failed // 2), self.grow_wait, False
        grown = dataclasses.replace(self, micro_batch_size=new, clean_steps=0, grow_wait=wait, growing_from=None)
        return grown, Shrink(failed, new, back)

    def after_clean_batch(self) -> tuple[SizePolicy, Grow | None]:
        """A batch went through: a grow-back in progress succeeded; after ``grow_wait`` clean ones, double the size."""
        policy = self
        if policy.growing_from is not None:  # the step at the grown size went through
            policy = dataclasses.replace(policy, growing_from=None, grow_wait=policy.grow_after or 0)
        if policy.micro_batch_size is None or policy.grow_after is None:
            return policy, None
        clean = policy.clean_steps + 1
        if clean < policy.grow_wait:
            return dataclasses.replace(policy, clean_steps=clean), None
        old = policy.micro_batch_size
        grown = old * 2
        size = None if grown >= policy.largest_batch else grown
        policy = dataclasses.replace(policy, micro_batch_size=size, growing_from=old, clean_steps=0)
        return policy, Grow(old, size or policy.largest_batch, policy.grow_wait)

    def state(self) -> dict[str, Any]:
        """The checkpoint state (:data:`STATE_KEYS`; ``grow_after`` is configuration, not state)."""
        return {key: getattr(self, key) for key in STATE_KEYS}

    @classmethod
    def from_state(cls, state: Mapping[str, Any], grow_after: int | None) -> SizePolicy:
        """The policy :meth:`state` wrote, under the guard's ``grow_after``."""
        return cls(
            micro_batch_size=state["micro_batch_size"],
            grow_after=grow_after,
            clean_steps=int(state["clean_steps"]),
            grow_wait=int(state["grow_wait"]),
            growing_from=state["growing_from"],
            largest_batch=int(state["largest_batch"]),
        )
