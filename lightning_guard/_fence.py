"""A rank agreement in front of every collective a user's step issues, so one rank can stop a step safely.

When one rank fails inside ``training_step`` (out of memory), the other ranks go on: into ``self.log(...,
sync_dist=True)``'s all-reduce, a contrastive loss's all-gather, a metric synced on step. The failed rank cannot
join those collectives (it does not know them), so without help the ranks wait on each other for ever. The fence
puts a small agreement (an all-reduce of a fixed-size vector) on a dedicated gloo group (CPU tensors: no device sync)
in front of every ``torch.distributed`` collective the step issues, and one at the end of the step where that is
needed. A rank that failed goes straight to the next agreement; the others meet it at theirs, before their next
collective or at the end of the step, and all learn together that the step is abandoned.

A collective the fence cannot see (one issued through a function bound before the fence was installed, a compiled
graph's collective, a C++ extension's) cannot be fenced: the failed rank then waits at its agreement until
``timeout_s`` and raises, naming the likely cause, instead of hanging silently.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_guard._compat import collectives_issued

__all__ = ["COLLECTIVES", "PLACES", "FenceAbort", "FenceTimeout", "StepFence", "Tally"]

#: the ``torch.distributed`` collectives the fence intercepts (looked up by name at each call by Lightning,
#: torchmetrics and ``torch.distributed.nn``, so replacing the module attributes reaches them)
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_gather_single",  # FSDP2: the parameters' all-gather in forward and backward
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_single",  # FSDP2: the gradients' reduce-scatter in backward
    "reduce_scatter_tensor",
    "scatter",
    "scatter_object_list",
)

#: where a rank stands when it joins an agreement (AT_STEP: the step's one agreement of all guards, before the
#: optimizer step; AT_STEP_QUIET: the same, and this step issued no collective of its own)
AT_COLLECTIVE, AT_END, FAILED, AT_STEP, AT_STEP_QUIET = 1.0, 2.0, 3.0, 5.0, 6.0
#: the places, in the order of a :class:`Tally`'s counts
PLACES = (AT_COLLECTIVE, AT_END, FAILED, AT_STEP, AT_STEP_QUIET)
_SLOT = {place: i for i, place in enumerate(PLACES)}
_PLACES = {
    AT_COLLECTIVE: "before a collective in the step",
    AT_END: "at the end of the step",
    FAILED: "failed",
    AT_STEP: "before the optimizer step",
    AT_STEP_QUIET: "before the optimizer step",
}


@dataclass(frozen=True)
class Tally:
    """What an agreement on the fence group tells every rank: how many ranks stand at each place, and the sums.

    The sums are over the ranks, of the values that follow the place. The same on every rank; its size does not depend
    on the world size.

    Attributes:
        counts: ranks at each place, in the order of :data:`PLACES`.
        total: the sum over ranks of each value after the place (zeros where a rank's row was shorter).
    """

    counts: tuple[int, ...]
    total: tuple[float, ...]

    @property
    def failed(self) -> bool:
        """Some rank failed."""
        return self.counts[_SLOT[FAILED]] > 0

    @property
    def place(self) -> float | None:
        """The place every rank stands at; None when they stand at different places."""
        present = [p for p, n in zip(PLACES, self.counts, strict=True) if n]
        return present[0] if len(present) == 1 else None

    def at(self, place: float) -> int:
        """How many ranks stand at ``place``."""
        return self.counts[_SLOT[place]]

    def describe(self) -> str:
        return ", ".join(
            f"{n} rank{'s' if n > 1 else ''} {_PLACES[p]}" for p, n in zip(PLACES, self.counts, strict=True) if n
        )


class FenceAbort(BaseException):
    """Unwinds a step on a healthy rank when another rank failed.

    A ``BaseException``, so that user code catching ``Exception`` does not swallow it.
    """

    def __init__(self, tally: Tally) -> None:
        super().__init__("lightning_guard: another rank failed in this step")
        self.tally = tally


class FenceTimeout(RuntimeError):
    """The other ranks did not reach the agreement in time."""


class StepFence:
    """Agreements on a dedicated gloo group around the collectives of one rank's step.

    Every agreement is one all-reduce (a sum) of a fixed-size vector: a count per place (:data:`PLACES`) and the
    values after the place, so its cost does not grow with the number of ranks. Per-rank detail (which ranks failed,
    their figures) is gathered separately (:meth:`details`), only when an agreement showed a failure.

    Args:
        timeout_s: how long an agreement waits for the other ranks before :class:`FenceTimeout`.
        payload_size: floats each rank adds to an agreement (its failure details).
    """

    def __init__(self, timeout_s: float, payload_size: int) -> None:
        self.timeout_s = timeout_s
        self.payload_size = payload_size
        self.group: Any = None
        self.world_size = 1
        self.collectives = 0  # user collectives seen in the current watch
        self.row_size = 1 + payload_size  # every agreement's row has this length (the longest one yet, padded)
        self._originals: dict[str, Callable[..., Any]] = {}
        self._wrappers: dict[str, Callable[..., Any]] = {}
        self._depth = 0

    @property
    def active(self) -> bool:
        return self.group is not None

    def setup(self) -> None:
        """Create the group (every rank calls this at the same point: it is a collective itself)."""
        if self.group is not None or not (dist.is_available() and dist.is_initialized()):
            return
        self.world_size = dist.get_world_size()
        if self.world_size <= 1:
            return
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))

    def teardown(self) -> None:
        self.unwatch()
        if self.group is not None and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group(self.group)
        self.group = None

    # ------------------------------------------------------------------ the agreement
    def agree(self, place: float, payload: list[float] | None = None) -> Tally:
        """Agree on ``[place, *payload]`` with every rank on the fence group."""
        return self.gather([place, *(payload or [0.0] * self.payload_size)])

    def gather(self, values: list[float]) -> Tally:
        """Agree on a row of floats (``values[0]`` a place) on the fence group: the places counted, the rest summed.

        Rows are padded to the longest row agreed so far, so that ranks that are out of step (one at a fence
        agreement, one at the step's agreement, which is longer) see each other's places instead of a size error.
        """
        return self.finish(self._post(values))  # returns when every rank's row is in

    def gather_async(self, values: list[float]) -> tuple[Any, torch.Tensor, int]:
        """Post a row for the next agreement on the fence group without waiting; :meth:`finish` waits for it.

        Whatever agreement the other ranks reach next on the group (before a collective, at the end of a step, or the
        step's agreement) completes it.
        """
        return self._post(values)

    def _post(self, values: list[float]) -> tuple[Any, torch.Tensor, int]:
        """Issue the all-reduce of one padded row on the fence group (a timeout surfaces as ``FenceTimeout``)."""
        assert self.group is not None
        self.row_size = max(self.row_size, len(values))
        vector = torch.zeros(len(PLACES) + self.row_size - 1, dtype=torch.float64)
        slot = _SLOT.get(values[0])
        if slot is None:  # a row whose first number is not a place: a voter ahead of the fence's owner
            raise ValueError(f"StepFence: a row must start with a place {sorted(_SLOT)}, got {values[0]!r}")
        vector[slot] = 1.0
        vector[len(PLACES) : len(PLACES) + len(values) - 1] = torch.tensor(values[1:], dtype=torch.float64)
        reduce = self._originals.get("all_reduce", dist.all_reduce)
        try:
            work = reduce(vector, group=self.group, async_op=True)
        except RuntimeError as exc:
            raise FenceTimeout(str(exc)) from exc
        return work, vector, len(values)

    @staticmethod
    def _wait(work: Any) -> None:
        try:
            work.wait()
        except RuntimeError as exc:
            raise FenceTimeout(str(exc)) from exc

    @classmethod
    def finish(cls, posted: tuple[Any, torch.Tensor, int]) -> Tally:
        """Wait for a row posted by :meth:`gather_async`; the sums as long as the posted row (after its place)."""
        work, vector, n = posted
        cls._wait(work)
        values = vector.tolist()
        return Tally(tuple(int(c) for c in values[: len(PLACES)]), tuple(values[len(PLACES) : len(PLACES) + n - 1]))

    def details(self, values: list[float]) -> list[list[float]]:
        """Every rank's row, in rank order: the second collective, held only where an agreement showed a failure.

        Every rank must call it at the same point (all of them learned the failure from the same agreement).
        """
        assert self.group is not None
        row = torch.tensor(values, dtype=torch.float64)
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        gather = self._originals.get("all_gather", dist.all_gather)
        try:
            gather(rows, row, group=self.group)
        except RuntimeError as exc:
            raise FenceTimeout(str(exc)) from exc
        return [r.tolist() for r in rows]

    def issued(self) -> int | None:
        """Collectives issued so far on every process group but the fence's own, seen by the fence or not.

        Read from the groups' sequence numbers (gloo and NCCL count every collective, a compiled graph's and a C++
        extension's too); None where a backend does not keep them.
        """
        return collectives_issued(exclude=self.group)

    # ------------------------------------------------------------------ interception
    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Fence every ``torch.distributed`` collective issued inside the block."""
        if self.group is None:
            yield
            return
        self.collectives = 0
        self.watch()
        try:
            yield
        finally:
            self.unwatch()

    def watch(self) -> None:
        if self._originals:
            return
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[name] = original
            fenced = self._wrappers.get(name)
            if fenced is None or fenced.__wrapped__ is not original:  # type: ignore[attr-defined]
                fenced = self._wrappers[name] = self._fenced(original)  # made once per function, not per step
            setattr(dist, name, fenced)

    def unwatch(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals = {}

    def _fenced(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def fenced(*args: Any, **kwargs: Any) -> Any:
            if self._depth > 0 or kwargs.get("group") is self.group:
                return original(*args, **kwargs)  # a collective inside a collective (all_gather_object) or ours
            self._depth += 1
            try:
                tally = self.agree(AT_COLLECTIVE)
                if tally.failed:
                    raise FenceAbort(tally)
                self.collectives += 1
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        fenced.__wrapped__ = original  # type: ignore[attr-defined]
        return fenced
