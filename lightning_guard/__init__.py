"""lightning_guard: guards for PyTorch Lightning training that report every intervention.

The public API is re-exported here; the guide lives in ``docs/``.
"""

from lightning_guard._agreement import StepVotes
from lightning_guard._compat import UpstreamChangedError
from lightning_guard._runtime import emit, event_stream
from lightning_guard.callbacks import (
    ClassBalance,
    CompressExport,
    GradientGuard,
    GuardCallback,
    L1Penalty,
    OOMGuard,
    OverfitGuard,
    WarmupCosine,
)
from lightning_guard.errors import (
    GradientExplosionError,
    GuardConfigError,
    GuardError,
    GuardRuntimeError,
    GuardStateError,
    OOMGuardError,
)
from lightning_guard.events import GuardEvent, configure_events
from lightning_guard.lr_scheduler import WarmupCosineLR
from lightning_guard.mixin import GuardMixin

__version__ = "0.1.0"

__all__ = [
    "ClassBalance",
    "CompressExport",
    "GradientExplosionError",
    "GradientGuard",
    "GuardCallback",
    "GuardConfigError",
    "GuardError",
    "GuardEvent",
    "GuardMixin",
    "GuardRuntimeError",
    "GuardStateError",
    "L1Penalty",
    "OOMGuard",
    "OOMGuardError",
    "OverfitGuard",
    "StepVotes",
    "UpstreamChangedError",
    "WarmupCosine",
    "WarmupCosineLR",
    "__version__",
    "configure_events",
    "emit",
    "event_stream",
]
