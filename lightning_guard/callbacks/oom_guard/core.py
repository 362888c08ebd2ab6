"""The state every part of OOMGuard works on, and the small reads they share (sizes, the batch protocol, payload).

``_Core`` is the bottom of OOMGuard's mixin stack (``core`` -> ``fence`` -> ``retry`` -> ``accumulate`` /
``evaluation`` -> ``guard``): it holds the configuration, the per-fit and per-attempt state, and the size policy's
fields, which :class:`~lightning_guard.functional.oom_policy.SizePolicy` decides on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch

from lightning_guard._fence import StepFence, Tally
from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.callbacks.oom_guard.attempt import _AttemptState, _layout, _PartLog
from lightning_guard.callbacks.oom_guard.common import _CODE, _MEM_KEYS
from lightning_guard.distributed import Agreement
from lightning_guard.errors import GuardConfigError
from lightning_guard.functional.oom import batch_size, memory_stats, split_batch
from lightning_guard.functional.oom_policy import SizePolicy, chunked, current_size, oom_size


class _Core(GuardCallback):
    """OOMGuard's configuration and state, and what every part of it reads."""

    def __init__(
        self,
        micro_batch_size: int | None,
        grow_after: int | None,
        loss_reduction: Literal["mean", "sum"],
        split_eval: bool,
        collective_timeout: float,
    ) -> None:
        """Set up a new guard's state (the arguments are ``OOMGuard``'s, checked there)."""
        super().__init__()
        self.micro_batch_size = micro_batch_size
        self.grow_after = grow_after
        self.loss_reduction = loss_reduction
        self.split_eval = split_eval
        self.collective_timeout = collective_timeout
        self._fence = StepFence(self.collective_timeout, payload_size=len(_MEM_KEYS) + 2)
        self._checked_batch = False
        self._dynamic_buffers: set[tuple[int, str]] | None = None  # buffers a training step writes (None: unknown)
        self._backward_collectives = 0  # collectives the last clean step's backward issued (DDP)
        # DDP: every step so far issued no collective of its own (agreed): a step needs no agreement at its end, a
        # failure is told at the step's one agreement. Once a step issues one, never again for the fit (_loud).
        self._quiet = False
        self._loud = False
        self._counted = False  # the process groups' collective counts are seen to move (DDP's backward moves them)
        # FSDP2 (ModelParallelStrategy, data parallel): every forward and backward issues collectives (the shards'
        # all-gathers and reduce-scatters), each fenced; a failed attempt unwinds every rank at once, FSDP2 is reset
        self._sharded = False
        self._step_tally: Tally | None = None  # the fence's count of places at the step's agreement (DDP, FSDP2)
        self._layout: tuple[int, tuple[list[tuple[torch.nn.Module, str]], list[Any]]] | None = None
        self.eval_micro_batch_size: dict[str, int] = {}
        self.retries = 0
        self._oom_text = ""  # the message of this rank's last out-of-memory error
        self._clean_steps = 0
        self._grow_wait = grow_after or 0
        self._growing_from: int | None = None
        self._largest_batch = 0
        self._inner: dict[str, Callable[..., Any]] = {}
        # Lightning's gradient accumulation: the window's batches whose gradients are in `.grad` (replayed for their
        # gradients when a later batch of the window fails in backward), and this batch's place in it
        self._window: list[tuple[Any, int]] = []
        self._accumulate = 1
        self._accumulating = False  # this batch accumulates (no optimizer step after it)
        self._batch_idx = -1
        self._batch_attempt: _AttemptState | None = None
        self._reset_step()

    def _reset_step(self) -> None:
        self._batch: Any = None
        self._batch_n = -1  # its size (dim 0), read once per batch
        self._busy = False  # inside one of our own calls: nested wrappers pass through
        self._mode: Literal["idle", "last"] = "idle"
        self._last_part: Any = None
        self._last_share = 1.0
        self._earlier: torch.Tensor | None = None
        self._hold_grads = False
        self._oom: tuple[str, int, dict[str, float]] | None = None  # this rank's failure in this attempt
        self._abandoned: Agreement | None = None  # the ranks agreed to drop this attempt before its backward
        # this rank failed in a quiet step: its row, posted for the others' next agreement on the fence group
        self._deferred: tuple[Any, torch.Tensor, int] | None = None
        self._step_collectives = 0  # collectives this attempt's training_step and backward issued (DDP)
        self._part_log: _PartLog | None = None

    # ------------------------------------------------------------------ the size policy (functional.oom_policy)
    def _policy(self) -> SizePolicy:
        """The size policy as this guard's fields hold it (the fields stay: constructor arguments, checkpoint keys)."""
        return SizePolicy(
            self.micro_batch_size,
            self.grow_after,
            self._clean_steps,
            self._grow_wait,
            self._growing_from,
            self._largest_batch,
        )

    def _adopt(self, policy: SizePolicy) -> None:
        """Take the policy's decision into this guard's fields."""
        self.micro_batch_size = policy.micro_batch_size
        self._clean_steps = policy.clean_steps
        self._grow_wait = policy.grow_wait
        self._growing_from = policy.growing_from
        self._largest_batch = policy.largest_batch

    # ------------------------------------------------------------------ the batch protocol
    def _samples(self, batch: Any) -> int:
        hook = getattr(self._module() if self._trainer is not None else None, "batch_samples", None)
        return int(hook(batch)) if callable(hook) else batch_size(batch)

    def _weight(self, batch: Any) -> float:
        hook = getattr(self._module(), "loss_weight", None)
        return float(hook(batch)) if callable(hook) else float(self._samples(batch))

    def _split(self, batch: Any, size: int) -> list[Any]:
        hook = getattr(self._module(), "split_batch", None)
        parts = hook(batch, size) if callable(hook) else split_batch(batch, size)
        if not parts:
            raise GuardConfigError(f"`split_batch` returned no micro-batch for a batch of {batch_size(batch)}")
        return list(parts)

    def _parts(self, batch: Any) -> tuple[list[Any], list[float]]:
        """A batch's micro-batches at the current size and the share of the batch's loss each one carries."""
        if self.micro_batch_size is None or self._samples(batch) <= self.micro_batch_size:
            return [batch], [1.0]
        parts = self._split(batch, self.micro_batch_size)
        weights = [self._weight(p) for p in parts]
        total = float(sum(weights))
        return parts, [w / total if self.loss_reduction == "mean" else 1.0 for w in weights]

    @property
    def _distributed(self) -> bool:
        return self._trainer is not None and self._trainer.world_size > 1

    def _current_size(self) -> int:
        return current_size(self.micro_batch_size, self._batch_n)

    def _chunked(self) -> bool:
        return chunked(self.micro_batch_size, self._batch_n)

    def _note_oom(self, where: str, size: int) -> None:
        """Record this rank's out-of-memory (the first one of the attempt).

        The size recorded is the micro-batch size in force, not the failing part's: the short last part of a batch
        (50 in parts of 12 ends with 2) must not make the next size 1.
        """
        device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        size = oom_size(size, self.micro_batch_size, self._batch_n)
        if self._oom is None:
            self._oom = (where, size, memory_stats(device))

    def _local_agreement(self) -> Agreement:
        return Agreement((True,), (self._payload(),))

    def _payload(self) -> tuple[float, ...]:
        if self._oom is None:
            return (0.0, float(self._current_size()), 0.0, 0.0, 0.0)
        where, size, mem = self._oom
        return (_CODE[where], float(size), *(float(mem.get(k, 0.0)) for k in _MEM_KEYS))

    def _dummy_loss(self, pl_module: pl.LightningModule) -> torch.Tensor:
        """A zero loss touching every trainable parameter: this rank's part of DDP's all-reduce after a failure."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        return torch.stack([p.sum().float() for p in params]).sum() * 0.0

    def _layout_of(self, module: torch.nn.Module) -> tuple[list[tuple[torch.nn.Module, str]], list[Any]]:
        """The module's buffer slots and metrics, walked once per fit (and again for another module)."""
        if self._layout is None or self._layout[0] != id(module):
            self._layout = (id(module), _layout(module))
        return self._layout[1]

    # ------------------------------------------------------------------ plumbing
    def _module(self) -> pl.LightningModule:
        assert self._trainer is not None
        return self._trainer.lightning_module
