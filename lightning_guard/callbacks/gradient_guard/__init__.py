"""GradientGuard: keep training alive through exploding gradients (see :class:`GradientGuard`)."""

from lightning_guard.callbacks.gradient_guard.guard import GradientGuard, SpikeAction

__all__ = ["GradientGuard", "SpikeAction"]
