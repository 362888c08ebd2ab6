"""Public fault injectors for chaos-testing training (see :mod:`lightning_guard.testing.injectors`)."""

from lightning_guard.testing.injectors import (
    FaultInjector,
    InjectNaN,
    LossSpike,
    LRSpike,
    ScaleOverflow,
    SimulatedOOM,
    batch_size_of,
)

__all__ = ["FaultInjector", "InjectNaN", "LRSpike", "LossSpike", "ScaleOverflow", "SimulatedOOM", "batch_size_of"]
