"""The one exception family of lightning_guard.

Every error the package raises derives from :class:`GuardError`, and each also derives from the builtin that fits
(``ValueError`` for bad arguments, ``RuntimeError`` for failures during training), so code that already catches
those keeps working.
"""

from __future__ import annotations

__all__ = ["GradientExplosionError", "GuardConfigError", "GuardError", "GuardRuntimeError"]


class GuardError(Exception):
    """Base class of every lightning_guard error."""


class GuardConfigError(GuardError, ValueError):
    """A guard was given an argument it cannot accept, or a Trainer set-up it cannot work with."""


class GuardRuntimeError(GuardError, RuntimeError):
    """A guard could not do its job during training."""


class GradientExplosionError(GuardRuntimeError):
    """GradientGuard gave up: training kept exploding after the allowed number of rollbacks."""
