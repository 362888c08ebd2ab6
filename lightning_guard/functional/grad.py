"""Gradient statistics and clipping as pure functions: fused, fp32, NaN-safe.

No Lightning imports. Distributed reduction is injected by the caller (``reduce_sq``), so the same code serves one
process, DDP (no reduction needed: gradients are already all-reduced) and sharded gradients (FSDP: sum the squared
shard norms over ranks).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from lightning_guard._compat import foreach_mul_, foreach_norm
from lightning_guard._sharded import local as _local

__all__ = [
    "EmaStats",
    "clip_grads_",
    "collect_grads",
    "global_grad_norm",
    "top_k_grad_norms",
    "zclip_threshold",
]


@functools.lru_cache(maxsize=16)
def constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``values`` as an fp32 tensor on ``device``, made once: a copy from the host every step would sync it."""
    return torch.tensor(values, dtype=torch.float32, device=device)


def collect_grads(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The (local) gradients of the parameters that have one."""
    return [_local(p.grad) for p in params if p.grad is not None]


def global_grad_norm(
    grads: Sequence[torch.Tensor],
    *,
    reduce_sq: Callable[[torch.Tensor], torch.Tensor] | None = None,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """L2 norm of all gradients together, in one fused pass per device, accumulated in fp32, with no host sync.

    Args:
        grads: gradient tensors (any float dtype, any devices).
        reduce_sq: optional reduction of the squared norm across ranks (sum over shards under FSDP).
        weights: optional weight of each gradient's square (``1 / copies`` of a part replicated over ranks, HSDP),
            so that a sum over ranks counts every element once.

    Returns:
        A 0-dim fp32 tensor on the first gradient's device (``nan`` or ``inf`` if any gradient is non-finite).

    Example:
        >>> global_grad_norm([torch.tensor([3.0]), torch.tensor([4.0], dtype=torch.bfloat16)])
        tensor(5.)
    """
    if not grads:
        return torch.zeros(())
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    weight_of: dict[torch.device, list[float]] = defaultdict(list)
    for i, g in enumerate(grads):
        by_device[g.device].append(g)
        if weights is not None:
            weight_of[g.device].append(weights[i])
    target = grads[0].device

    def device_norm(device: torch.device, gs: list[torch.Tensor]) -> torch.Tensor:
        norms = torch.stack(foreach_norm(gs, 2.0, dtype=torch.float32))
        if weights is None:
            return torch.linalg.vector_norm(norms)
        return (norms.square() * constant(tuple(weight_of[device]), norms.device)).sum().sqrt()

    per_device = [device_norm(device, gs) for device, gs in by_device.items()]
    norm = (
        per_device[0]
        if len(per_device) == 1
        else torch.linalg.vector_norm(torch.stack([n.to(target) for n in per_device]))
    )
    if reduce_sq is not None:
        norm = reduce_sq(norm.square()).sqrt()
    return norm


def clip_grads_(grads: Sequence[torch.Tensor], coef: float | torch.Tensor) -> None:
    """Multiply every gradient by ``coef`` in place (fused per dtype/device).

    Example:
        >>> g = [torch.tensor([2.0, 4.0])]
        >>> clip_grads_(g, 0.5); g[0]
        tensor([1., 2.])
    """
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        groups[(g.device, g.dtype)].append(g)
    for (device, _), gs in groups.items():
        c = coef.to(device) if isinstance(coef, torch.Tensor) else coef
        foreach_mul_(gs, c)


def zclip_threshold(mean: float, std: float, z: float, z_threshold: float) -> float:
    """ZClip's adaptive clip threshold for a spike of z-score ``z > z_threshold``.

    The threshold is ``mean + (z_threshold**2 / z) * std``: at ``z = z_threshold`` it is the detection bound
    ``mean + z_threshold * std``, and larger outliers are clipped harder (Kumar et al., 2025).

    Example:
        >>> zclip_threshold(1.0, 0.1, z=5.0, z_threshold=2.5)
        1.125
    """
    return mean + (z_threshold * z_threshold / z) * std


@dataclass
class EmaStats:
    """Exponential moving mean and variance of a scalar, NaN-safe.

    The first ``warmup`` finite values are averaged plainly (and give the initial variance); afterwards each finite
    value updates ``mean`` and ``var`` with weight ``1 - alpha``. A non-finite value never enters the statistics
    (ZClip lets one NaN disable it for good; this does not).

    Example:
        >>> s = EmaStats(alpha=0.9, warmup=3)
        >>> for v in (1.0, 2.0, 3.0, float("nan")):
        ...     s.update(v)
        >>> s.ready, s.mean, round(s.std, 4), s.count
        (True, 2.0, 0.8165, 3)
        >>> round(s.z(4.0), 3)
        2.449
    """

    alpha: float = 0.97
    warmup: int = 25
    mean: float = 0.0
    var: float = 0.0
    count: int = 0

    @property
    def ready(self) -> bool:
        """True once ``warmup`` finite values were seen."""
        return self.count >= self.warmup

    @property
    def std(self) -> float:
        """Standard deviation."""
        return math.sqrt(max(self.var, 0.0))

    def z(self, value: float) -> float:
        """z-score of ``value`` (0 before warm-up; ``inf`` for a non-finite value)."""
        if not math.isfinite(value):
            return math.inf
        if not self.ready:
            return 0.0
        return (value - self.mean) / max(self.std, 1e-12 * max(abs(self.mean), 1.0))

    def update(self, value: float) -> None:
        """Fold a value in (ignored when non-finite)."""
        if not math.isfinite(value):
            return
        if self.count < self.warmup:
            # Welford's running mean/variance over the warm-up window.
            self.count += 1
            delta = value - self.mean
            self.mean += delta / self.count
            self.var += (delta * (value - self.mean) - self.var) / self.count
            return
        self.count += 1
        delta = value - self.mean
        self.mean += (1.0 - self.alpha) * delta
        self.var = self.alpha * (self.var + (1.0 - self.alpha) * delta * delta)

    def state_dict(self) -> dict[str, float]:
        """The statistics, for checkpoints."""
        return {"alpha": self.alpha, "warmup": self.warmup, "mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the statistics."""
        self.alpha = float(state.get("alpha", self.alpha))
        self.warmup = int(state.get("warmup", self.warmup))
        self.mean = float(state.get("mean", 0.0))
        self.var = float(state.get("var", 0.0))
        self.count = int(state.get("count", 0))


def top_k_grad_norms(named_params: Iterable[tuple[str, torch.Tensor]], k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` parameters with the largest gradient norms (non-finite first), as ``(name, norm)``.

    Costs one fused norm pass and one host sync: call it only when reporting an event.

    Example:
        >>> a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        >>> a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([float("nan"), 0.0])
        >>> top_k_grad_norms([("a", a), ("b", b)], k=2)
        [('b', nan), ('a', 5.0)]
    """
    named = [(n, _local(p.grad)) for n, p in named_params if p.grad is not None]
    if not named:
        return []
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, (_, g) in enumerate(named):
        by_device[g.device].append(i)
    norms = [0.0] * len(named)
    for idx in by_device.values():
        values = torch.stack(foreach_norm([named[i][1] for i in idx], 2.0, dtype=torch.float32)).tolist()
        for i, v in zip(idx, values, strict=True):
            norms[i] = v
    order = sorted(
        range(len(named)), key=lambda i: (math.isfinite(norms[i]), -norms[i] if math.isfinite(norms[i]) else 0)
    )
    return [(named[i][0], norms[i]) for i in order[:k]]
