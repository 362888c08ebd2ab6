"""Pruning: unstructured (global magnitude, masks made permanent) and structured (torch-pruning: layers shrink)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_guard.compress._extras import require
from lightning_guard.errors import GuardConfigError

__all__ = ["PruneMode", "grad_masks", "prunable_layers", "prune_structured", "prune_unstructured"]

PruneMode = Literal["unstructured", "structured"]


def _check_amount(amount: Any) -> None:
    if not isinstance(amount, int | float) or isinstance(amount, bool) or not 0.0 <= amount < 1.0:
        raise GuardConfigError(f"`amount` must be a number in [0, 1), got {amount!r}")


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``Linear`` and ``Conv`` layers whose weights pruning acts on, in module order."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def prune_unstructured(model: nn.Module, amount: float) -> nn.Module:
    """A copy of ``model`` with the smallest-magnitude weights set to exactly zero (global unstructured pruning).

    The ``amount`` fraction of weights, ranked over every prunable layer together, is zeroed. Masks are made permanent,
    so state-dict keys stay clean (no ``weight_orig`` /
    ``weight_mask``). Weights that are already exactly zero (e.g. from L1Penalty's proximal mode) are the smallest,
    so they are counted in ``amount`` first.

    Raises:
        GuardConfigError: ``amount`` outside [0, 1).
    """
    _check_amount(amount)
    from torch.nn.utils import prune

    pruned = copy.deepcopy(model)
    layers = [(m, "weight") for _, m in prunable_layers(pruned)]
    if not layers or amount == 0:
        return pruned
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=float(amount))
    for m, name in layers:
        prune.remove(m, name)
    return pruned


def _shapes(out: Any) -> Any:
    """The shapes of a model output's tensors, in its structure (the output signature)."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    if isinstance(out, list | tuple):
        return [_shapes(v) for v in out]
    return type(out).__name__


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in _tensors(v)]
    return []


def _output_layers(model: nn.Module, example_inputs: tuple[Any, ...]) -> list[nn.Module]:
    """The prunable layers that produce the model's outputs (classifier, segmentation or LM heads), one per output.

    The model runs once with forward hooks: a layer whose output *is* a model output (the same storage: views and
    permutes included) is that output's head. Otherwise the head is the last layer run whose output channels equal
    the output's width (dim 1 of a channels-first ``(N, C, ...)`` map, or the last dim: ``(N, F)`` logits, ``(N, T,
    V)`` sequence logits), so a hidden layer that happens to have the output's width, or the spatial size of a
    segmentation map, is not taken for the head.
    """
    ran: list[tuple[nn.Module, int]] = []
    layers = prunable_layers(model)

    def record(module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            ran.append((module, out.untyped_storage().data_ptr()))

    hooks = [m.register_forward_hook(record) for _, m in layers]
    try:
        with torch.no_grad():
            outputs = _tensors(model(*example_inputs))
    finally:
        for h in hooks:
            h.remove()
    heads: list[nn.Module] = []
    for out_t in outputs:
        storage = out_t.untyped_storage().data_ptr()
        same = [m for m, ptr in ran if ptr == storage]
        if same:
            head = same[-1]
        else:
            widths = {out_t.shape[-1], out_t.shape[1]} if out_t.dim() > 2 else {out_t.shape[-1] if out_t.dim() else 1}
            matching = [m for m, _ in ran if getattr(m, "out_features", getattr(m, "out_channels", None)) in widths]
            head = matching[-1] if matching else (ran[-1][0] if ran else None)  # type: ignore[assignment]
        if head is not None and all(head is not h for h in heads):
            heads.append(head)
    if not heads and layers:
        heads.append(layers[-1][1])
    return heads


def prune_structured(
    model: nn.Module,
    amount: float,
    example_inputs: tuple[Any, ...],
    ignored: Sequence[nn.Module] = (),
    *,
    protect_head: bool = True,
) -> nn.Module:
    """A copy of ``model`` whose hidden layers physically lose neurons / channels (structured pruning).

    The ``amount`` fraction of neurons / channels of every hidden layer is removed by L2 magnitude (torch-pruning's
    dependency graph keeps the shapes consistent), so the layers really shrink: fewer
    parameters, smaller files, faster inference. The output layer (and ``ignored``) keeps its width
    (``protect_head=False`` leaves the head to the caller's ``ignored``), and the pruned model's output signature
    (the shapes of its outputs on ``example_inputs``) must equal the original's.

    Raises:
        GuardConfigError: ``amount`` outside [0, 1), torch-pruning missing, or an output signature that changed.
    """
    _check_amount(amount)
    require("torch_pruning")
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    if amount == 0:
        return pruned
    training = pruned.training
    pruned.eval()
    heads = _output_layers(pruned, example_inputs) if protect_head else []
    keep = [*heads, *(_same_module(pruned, model, m) for m in ignored)]
    pruner = tp.pruner.MagnitudePruner(
        pruned,
        example_inputs,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=float(amount),
        ignored_layers=keep,
    )
    pruner.step()
    with torch.no_grad():
        before, after = _shapes(model.eval()(*example_inputs)), _shapes(pruned(*example_inputs))
    model.train(training)
    if before != after:
        raise GuardConfigError(
            f"structured pruning changed the model's output signature from {before} to {after}: pass the layers "
            "that produce the output as `ignored`, or prune with mode='unstructured'"
        )
    pruned.train(training)
    return pruned


def _same_module(copy_root: nn.Module, root: nn.Module, module: nn.Module) -> nn.Module:
    for (_, a), (_, b) in zip(copy_root.named_modules(), root.named_modules(), strict=True):
        if b is module:
            return a
    raise GuardConfigError("an `ignored` module is not part of the model")


def grad_masks(model: nn.Module) -> Callable[[], None]:
    """Keep the exact zeros of the prunable weights during a fine-tune: their gradients are masked."""
    handles = []
    for _, layer in prunable_layers(model):
        w = layer.weight
        assert isinstance(w, torch.Tensor)
        mask = (w.detach() != 0).to(w.dtype)
        handles.append(w.register_hook(lambda g, m=mask: g * m))

    def remove() -> None:
        for h in handles:
            h.remove()

    return remove
