"""OverfitGuard: detect overfitting and underfitting, stop early, hand back the best weights."""

from lightning_guard.callbacks.overfit_guard.guard import OverfitGuard

__all__ = ["OverfitGuard"]
