"""The guards, one Lightning callback per module."""

from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.callbacks.warmup_cosine import WarmupCosine

__all__ = ["GuardCallback", "WarmupCosine"]
