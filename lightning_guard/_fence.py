"""A rank agreement in front of every collective a user's step issues, so one rank can stop a step safely.

When one rank fails inside ``training_step`` (out of memory), the other ranks go on: into ``self.log(...,
sync_dist=True)``'s all-reduce, a contrastive loss's all-gather, a metric synced on step. The failed rank cannot
join those collectives (it does not know them), so without help the ranks wait on each other for ever. The fence
puts a small agreement on a dedicated gloo group (CPU tensors: no device sync) in front of every
``torch.distributed`` collective the step issues, and one at the end of the step. A rank that failed goes straight to
the next agreement; the others meet it at theirs, before their next collective or at the end of the step, and all
learn together that the step is abandoned.

A collective the fence cannot see (one issued through a function bound before the fence was installed, a compiled
graph's collective, a C++ extension's) cannot be fenced: the failed rank then waits at its agreement until
``timeout_s`` and raises, naming the likely cause, instead of hanging silently.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from lightning_guard._compat import collectives_issued

__all__ = ["COLLECTIVES", "FenceAbort", "FenceTimeout", "StepFence"]

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
_PLACES = {
    AT_COLLECTIVE: "before a collective in the step",
    AT_END: "at the end of the step",
    FAILED: "failed",
    AT_STEP: "before the optimizer step",
    AT_STEP_QUIET: "before the optimizer step",
}


class FenceAbort(BaseException):
    """Unwinds a step on a healthy rank when another rank failed.

    A ``BaseException``, so that user code catching ``Exception`` does not swallow it.
    """

    def __init__(self, rows: list[list[float]]) -> None:
        super().__init__("lightning_guard: another rank failed in this step")
        self.rows = rows


class FenceTimeout(RuntimeError):
    """The other ranks did not reach the agreement in time."""


class StepFence:
    """Agreements on a dedicated gloo group around the collectives of one rank's step.

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
    def agree(self, place: float, payload: list[float] | None = None) -> list[list[float]]:
        """All-gather ``[place, *payload]`` from every rank on the fence group; rows in rank order."""
        return self.gather([place, *(payload or [0.0] * self.payload_size)])

    def gather(self, values: list[float]) -> list[list[float]]:
        """All-gather a row of floats (``values[0]`` a place) on the fence group; rows in rank order, as sent.

        Rows are padded to the longest row gathered so far, so that ranks that are out of step (one at a fence
        agreement, one at the step's agreement, which is longer) see each other's places instead of a size error.
        """
        _, rows, n = self._post(values, async_op=False)  # returns when every rank's row is in
        return [r.tolist()[:n] for r in rows]

    def gather_async(self, values: list[float]) -> tuple[Any, list[torch.Tensor], int]:
        """Post a row for the next gather on the fence group without waiting; :meth:`finish` waits for it.

        Whatever agreement the other ranks reach next on the group (before a collective, at the end of a step, or the
        step's agreement) completes it.
        """
        return self._post(values, async_op=True)

    def _post(self, values: list[float], *, async_op: bool) -> tuple[Any, list[torch.Tensor], int]:
        """Issue the all-gather of one padded row on the fence group (a timeout surfaces as ``FenceTimeout``)."""
        assert self.group is not None
        self.row_size = max(self.row_size, len(values))
        row = torch.zeros(self.row_size, dtype=torch.float64)
        row[: len(values)] = torch.tensor(values, dtype=torch.float64)
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        gather = self._originals.get("all_gather", dist.all_gather)
        try:
            work = gather(rows, row, group=self.group, async_op=async_op)
        except RuntimeError as exc:
            raise FenceTimeout(str(exc)) from exc
        return work, rows, len(values)

    @staticmethod
    def finish(posted: tuple[Any, list[torch.Tensor], int]) -> list[list[float]]:
        """Wait for a row posted by :meth:`gather_async`; rows in rank order, as long as the posted one."""
        work, rows, n = posted
        try:
            work.wait()
        except RuntimeError as exc:
            raise FenceTimeout(str(exc)) from exc
        return [r.tolist()[:n] for r in rows]

    def issued(self) -> int | None:
        """Collectives issued so far on every process group but the fence's own, seen by the fence or not.

        Read from the groups' sequence numbers (gloo and NCCL count every collective, a compiled graph's and a C++
        extension's too); None where a backend does not keep them.
        """
        return collectives_issued(exclude=self.group)

    @staticmethod
    def failed(rows: list[list[float]]) -> bool:
        return any(r[0] == FAILED for r in rows)

    @staticmethod
    def describe(rows: list[list[float]]) -> str:
        return ", ".join(f"rank {i} {_PLACES.get(r[0], '?')}" for i, r in enumerate(rows))

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
            setattr(dist, name, self._fenced(original))

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
                rows = self.agree(AT_COLLECTIVE)
                if self.failed(rows):
                    raise FenceAbort(rows)
                self.collectives += 1
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        fenced.__wrapped__ = original  # type: ignore[attr-defined]
        return fenced
