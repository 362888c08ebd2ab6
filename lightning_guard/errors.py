"""The one exception family of lightning_guard.

Every error the package raises derives from :class:`GuardError`, and each also derives from the builtin that fits
(``ValueError`` for bad arguments, ``RuntimeError`` for failures during training), so code that already catches
those keeps working.
"""

from __future__ import annotations

__all__ = [
    "GradientExplosionError",
    "GuardConfigError",
    "GuardError",
    "GuardRuntimeError",
    "GuardStateError",
    "OOMGuardError",
]


class GuardError(Exception):
    """Base class of every lightning_guard error."""


class GuardConfigError(GuardError, ValueError):
    """A guard was given an argument it cannot accept, or a Trainer set-up it cannot work with."""


class GuardStateError(GuardError, ValueError):
    """A guard's checkpoint state cannot be loaded: a key unknown or missing, or written by a newer version."""


class GuardRuntimeError(GuardError, RuntimeError):
    """A guard could not do its job during training."""


class GradientExplosionError(GuardRuntimeError):
    """GradientGuard gave up: training kept exploding after the allowed number of rollbacks."""


class OOMGuardError(GuardRuntimeError):
    """OOMGuard gave up: out of memory at a micro-batch of one sample, or inside ``optimizer.step``.

    Inside ``optimizer.step`` (the optimizer allocating its state) smaller micro-batches cannot help.

    Attributes:
        micro_batch_size: the micro-batch size that failed (1, or the size in use for an optimizer-step OOM).
        ranks: the ranks that ran out of memory.
        memory: per failing rank, its allocated / reserved / peak memory in MiB (empty off CUDA).
    """

    def __init__(
        self, message: str, micro_batch_size: int, ranks: tuple[int, ...], memory: dict[int, dict[str, float]]
    ) -> None:
        super().__init__(message)
        self.micro_batch_size = micro_batch_size
        self.ranks = ranks
        self.memory = memory

    def __reduce__(self) -> tuple[type, tuple[str, int, tuple[int, ...], dict[int, dict[str, float]]]]:
        return (type(self), (str(self), self.micro_batch_size, self.ranks, self.memory))
