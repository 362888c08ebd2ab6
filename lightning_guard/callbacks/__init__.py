"""The guards, one Lightning callback per module."""

from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.callbacks.class_balance import ClassBalance
from lightning_guard.callbacks.compress_export import CompressExport
from lightning_guard.callbacks.gradient_guard import GradientGuard
from lightning_guard.callbacks.l1_penalty import L1Penalty
from lightning_guard.callbacks.oom_guard import OOMGuard
from lightning_guard.callbacks.overfit_guard import OverfitGuard
from lightning_guard.callbacks.warmup_cosine import WarmupCosine

__all__ = [
    "ClassBalance",
    "CompressExport",
    "GradientGuard",
    "GuardCallback",
    "L1Penalty",
    "OOMGuard",
    "OverfitGuard",
    "WarmupCosine",
]
