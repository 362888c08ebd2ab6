"""L1 regularisation as fused, in-place operations on parameter lists (no Lightning imports).

Sharded parameters (FSDP2's ``DTensor``) are worked on shard by shard: each rank updates and measures the part it
holds (sums over ranks are the caller's, e.g. one all-reduce of :func:`l1_norm` and :func:`zero_count`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_guard._compat import (
    foreach_add_,
    foreach_clamp_max_,
    foreach_clamp_min,
    foreach_mul_,
    foreach_norm,
    foreach_sign,
    foreach_sub_,
)
from lightning_guard._sharded import local, local_grad
from lightning_guard.functional.grad import constant

__all__ = ["l1_adaptive_proximal_", "l1_norm", "l1_proximal_", "l1_subgradient_", "zero_count"]


@torch.no_grad()
def l1_subgradient_(
    params: Sequence[torch.Tensor],
    strength: float,
    scale: torch.Tensor | None = None,
    *,
    workspace: Sequence[torch.Tensor] | None = None,
) -> None:
    """Add ``strength * sign(w)`` (times ``scale``) to each parameter's gradient in place (fused).

    That is the gradient of ``strength * sum(|w|)`` (subgradient 0 at w = 0). Parameters without a gradient are left
    alone. ``scale``: a 0-dim tensor multiplying the subgradient, for gradients that are still multiplied by a loss
    scale (a fused optimizer under a GradScaler unscales inside its own step); no host sync. ``workspace``: tensors
    shaped like ``params``, one each, to hold the signs instead of fresh ones (on CPU a fresh parameter-sized
    allocation per step costs more than the arithmetic: 0.37 ms vs 0.17 ms for 300k weights).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([2.0, -3.0, 0.0]))
        >>> w.grad = torch.zeros(3)
        >>> l1_subgradient_([w], 0.1); w.grad
        tensor([ 0.1000, -0.1000,  0.0000])
    """
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad or strength == 0:
        return
    grads = [local_grad(p) for p in with_grad]
    if workspace is not None:
        signs = [torch.sign(local(p), out=w) for p, w in zip(params, workspace, strict=True) if p.grad is not None]
    else:
        signs = list(foreach_sign([local(p) for p in with_grad]))
    if scale is not None:
        foreach_mul_(signs, scale.to(signs[0].device))
    foreach_add_(grads, signs, alpha=strength)


@torch.no_grad()
def l1_proximal_(params: Sequence[torch.Tensor], threshold: float) -> None:
    """Soft-threshold in place (fused): ``w <- sign(w) * max(|w| - threshold, 0)``.

    The proximal operator of ``threshold * |w|``; it produces exact zeros. Computed as the identical
    ``w - clamp(w, -threshold, threshold)``: three fused passes instead of the six of abs/sub/clamp/sign/mul/copy.

    Example:
        >>> w = torch.tensor([0.5, -0.05, 0.02, -2.0])
        >>> l1_proximal_([w], 0.1); w
        tensor([ 0.4000,  0.0000,  0.0000, -1.9000])
    """
    if not params or threshold <= 0:
        return
    ws = [local(p) for p in params]
    clipped = foreach_clamp_min(ws, -threshold)
    foreach_clamp_max_(clipped, threshold)
    foreach_sub_(ws, clipped)


@torch.no_grad()
def l1_adaptive_proximal_(
    params: Sequence[torch.Tensor],
    second_moments: Sequence[torch.Tensor],
    threshold: float,
    *,
    bias_correction: float = 1.0,
    eps: float = 1e-8,
) -> None:
    """Soft-threshold in place with Adam's per-coordinate step size (proximal Adam).

    ``w <- sign(w) * max(|w| - t, 0)`` with ``t = threshold / (sqrt(v / bias_correction) + eps)``, ``v`` Adam's
    second-moment estimate: the proximal operator of ``threshold * |w|`` in the metric Adam's update uses. A
    coordinate whose gradients are small (large adaptive step) is thresholded hard; one with large gradients, lightly.
    With plain L1 after an Adam step the threshold ``lr * lambda`` is tiny next to Adam's normalised updates, which
    move every weight by about ``lr`` each step, so hardly any weight stays at 0.

    Example:
        >>> w = torch.tensor([0.5, 0.5])
        >>> l1_adaptive_proximal_([w], [torch.tensor([1.0, 1e-4])], 0.01); w
        tensor([0.4900, 0.0000])
    """
    if not params or threshold <= 0:
        return
    for w, v in zip(params, second_moments, strict=True):
        t = threshold / ((local(v).float() / bias_correction).sqrt_().add_(eps))
        w_ = local(w)
        w_.sub_(torch.maximum(torch.minimum(w_, t.to(w_.dtype)), -t.to(w_.dtype)))


@torch.no_grad()
def l1_norm(params: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """``sum(|w|)`` over all parameters, fused, accumulated in fp32; a 0-dim tensor, no host sync.

    ``weights``: optional weight of each parameter's term (``1 / copies`` of a part replicated over ranks).

    Example:
        >>> l1_norm([torch.tensor([1.0, -2.0]), torch.tensor([3.0], dtype=torch.bfloat16)])
        tensor(6.)
    """
    if not params:
        return torch.zeros(())
    norms = foreach_norm([local(p) for p in params], 1.0, dtype=torch.float32)
    stacked = torch.stack([n.to(norms[0].device) for n in norms])
    if weights is not None:
        stacked = stacked * constant(tuple(weights), stacked.device)
    return stacked.sum()


@torch.no_grad()
def zero_count(params: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Number of exact zeros over all parameters, as a 0-dim tensor (no host sync); weighted (float) with ``weights``.

    Example:
        >>> zero_count([torch.tensor([0.0, 1.0, 0.0])]).item()
        2
    """
    if not params:
        return torch.zeros((), dtype=torch.long)
    counts = [(local(p) == 0).sum() for p in params]
    stacked = torch.stack([c.to(counts[0].device) for c in counts])
    if weights is not None:
        stacked = stacked.double() * constant(tuple(weights), stacked.device).double()
    return stacked.sum()
