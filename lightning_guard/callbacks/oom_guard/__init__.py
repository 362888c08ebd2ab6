"""OOMGuard: survive out-of-memory mid-training by re-running the same batch as halved micro-batches.

The guard is split along its seams, each a layer of one mixin stack under :class:`OOMGuard` (``guard``: Lightning's
hooks, set-up, checkpoint state): ``core`` (configuration, state, the batch protocol), ``fence`` (the DDP agreements),
``retry`` (the attempts of a batch in micro-batches, recovery), ``accumulate`` (Lightning's gradient accumulation),
``evaluation`` (splitting evaluation steps); ``attempt`` holds the snapshot of an attempt and the ``self.log``
recombination, and the size policy is pure (:mod:`lightning_guard.functional.oom_policy`).
"""

from lightning_guard.callbacks.oom_guard.guard import OOMGuard

__all__ = ["OOMGuard"]
