"""Class counts to weights and priors, and losses that do not depend on a batch's composition (no Lightning)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["balanced_loss", "class_weights", "log_prior"]

Method = Literal["inverse", "sqrt_inverse", "effective_number", "logit_adjustment", "none"]


def class_weights(counts: torch.Tensor, method: Method = "inverse", *, beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights from class counts, normalised so the data-weighted mean weight is 1.

    ``inverse``: 1/n_c; ``sqrt_inverse``: 1/sqrt(n_c); ``effective_number`` (Cui et al. 2019):
    (1 - beta) / (1 - beta**n_c); ``logit_adjustment`` and ``none``: all ones (logit adjustment acts on the logits).
    A class with no sample gets the largest weight among the present classes (stated policy: it is treated as the
    rarest). Normalising by sum_c (n_c / N) w_c = 1 keeps the loss on the scale of plain cross-entropy.

    Example:
        >>> class_weights(torch.tensor([90.0, 10.0]), "inverse")
        tensor([0.5556, 5.0000])
    """
    n = counts.double()
    present = n > 0
    if method in ("logit_adjustment", "none"):
        return torch.ones_like(n, dtype=torch.float32)
    if method == "inverse":
        w = torch.where(present, 1.0 / n.clamp_min(1.0), torch.zeros_like(n))
    elif method == "sqrt_inverse":
        w = torch.where(present, 1.0 / n.clamp_min(1.0).sqrt(), torch.zeros_like(n))
    elif method == "effective_number":
        effective = 1.0 - torch.pow(torch.tensor(beta, dtype=n.dtype), n)
        w = torch.where(present, (1.0 - beta) / effective.clamp_min(1e-12), torch.zeros_like(n))
    else:
        raise ValueError(
            f"`method` must be one of inverse, sqrt_inverse, effective_number, logit_adjustment, none, got {method!r}"
        )
    if bool(present.any()):
        w = torch.where(present, w, w[present].max())
    frac = n / n.sum().clamp_min(1.0)
    return (w / (frac * w).sum().clamp_min(1e-12)).float()


def log_prior(counts: torch.Tensor) -> torch.Tensor:
    """Log of each class's share of the data; a class with no sample counts as half a sample (finite, the rarest).

    Example:
        >>> log_prior(torch.tensor([75.0, 25.0])).exp()
        tensor([0.7500, 0.2500])
    """
    n = counts.double()
    n = torch.where(n > 0, n, torch.full_like(n, 0.5))
    return (n / n.sum()).log().float()


Task = Literal["multiclass", "binary", "multilabel"]


def balanced_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    log_prior: torch.Tensor | None = None,
    tau: float = 1.0,
    gamma: float = 0.0,
    pos_weight: torch.Tensor | None = None,
    task: Task = "multiclass",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Classification loss in fp32 whose value does not depend on how a batch is split.

    Multiclass (``task="multiclass"``) takes what ``F.cross_entropy`` takes: ``(N, C)``, ``(C,)`` or
    ``(N, C, d1, ...)`` logits (classes on dim 1, e.g. segmentation maps), ``target`` of class indices (``(N,)`` or
    ``(N, d1, ...)``, entries equal to ``ignore_index`` ignored) or of class probabilities shaped like the logits,
    and ``label_smoothing``. It is the cross-entropy of ``logits + tau * log_prior`` (logit adjustment, Menon et al.
    2021, when ``log_prior`` is given), with focal modulation ``(1 - p_t) ** gamma`` when ``gamma > 0`` (index
    targets), each sample weighted by ``weights[target]`` (``sum_c weights[c] * p_c * log q_c`` for probability
    targets); the sum is divided by the number of (non-ignored) samples - not by the sum of their weights as PyTorch's
    weighted ``CrossEntropyLoss(reduction="mean")`` does - so the mean over equal-size pieces of a batch
    (micro-batches, ranks) equals the loss of the whole batch. Without weights, prior and focal term it equals
    ``F.cross_entropy`` with the same ``ignore_index`` and ``label_smoothing``, with two stated differences: with
    ignored targets the pieces of a batch add up only when weighted by their counts of non-ignored targets (not by
    their sample counts: an OOMGuard split of such a batch is not exact), and a batch whose targets are all ignored
    has loss 0 (``F.cross_entropy`` gives NaN), so that it contributes nothing instead of poisoning the step.

    Binary/multilabel (``task="binary"`` or ``"multilabel"``: float ``target`` shaped like ``logits``):
    BCE-with-logits with ``pos_weight``, mean over elements.

    Example:
        >>> logits, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
        >>> w = torch.tensor([0.5, 1.0, 3.0])
        >>> whole = balanced_loss(logits, y, weights=w)
        >>> halves = (balanced_loss(logits[:4], y[:4], weights=w) + balanced_loss(logits[4:], y[4:], weights=w)) / 2
        >>> bool(torch.isclose(whole, halves))
        True
        >>> seg, mask = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
        >>> bool(torch.isclose(balanced_loss(seg, mask), F.cross_entropy(seg, mask)))
        True
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.float()
        if task != "multiclass":
            pw = pos_weight.float().to(z.device) if pos_weight is not None else None
            return F.binary_cross_entropy_with_logits(z, target.float(), pos_weight=pw)
        cdim = 1 if z.dim() >= 2 else 0
        if log_prior is not None:
            z = z + tau * _along_classes(log_prior, z, cdim)
        logp = F.log_softmax(z, dim=cdim)
        if target.is_floating_point() and target.shape == z.shape:  # class probabilities
            if gamma > 0:
                raise ValueError("the focal term (`gamma` > 0) needs class-index targets, got class probabilities")
            return _soft_target_loss(logp, target, weights, cdim, label_smoothing)
        return _index_target_loss(logp, target, weights, cdim, ignore_index, label_smoothing, gamma)


def _along_classes(v: torch.Tensor, z: torch.Tensor, cdim: int) -> torch.Tensor:
    """A ``(C,)`` vector shaped to broadcast on the class dimension of ``z``."""
    shape = [1] * z.dim()
    shape[cdim] = z.shape[cdim]
    return v.float().to(z.device).view(shape)


def _soft_target_loss(
    logp: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, cdim: int, label_smoothing: float
) -> torch.Tensor:
    """Cross-entropy against class probabilities, weighted per class, summed then divided by the sample count."""
    p = target.float()
    if label_smoothing > 0:
        p = p * (1.0 - label_smoothing) + label_smoothing / logp.shape[cdim]
    terms = p * logp if weights is None else p * logp * _along_classes(weights, logp, cdim)
    per_sample = -terms.sum(cdim)
    return per_sample.sum() / max(per_sample.numel(), 1)


def _index_target_loss(
    logp: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None,
    cdim: int,
    ignore_index: int,
    label_smoothing: float,
    gamma: float,
) -> torch.Tensor:
    """Cross-entropy against class indices (smoothed, focal, weighted), summed then divided by the kept targets."""
    t = target.long()
    keep = t != ignore_index
    t_safe = torch.where(keep, t, torch.zeros_like(t))
    logp_t = logp.gather(cdim, t_safe.unsqueeze(cdim)).squeeze(cdim)
    loss = -logp_t
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * logp.mean(cdim)
    if gamma > 0:
        loss = loss * (1.0 - logp_t.exp()).clamp_min(0.0).pow(gamma)
    if weights is not None:
        loss = loss * weights.float().to(logp.device)[t_safe]
    loss = torch.where(keep, loss, torch.zeros_like(loss))
    return loss.sum() / keep.sum().clamp_min(1)
