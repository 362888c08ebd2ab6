"""Sharded tensors: FSDP2's ``DTensor`` parameters, gradients and optimizer states seen as what each rank holds.

Under ``fully_shard`` (Lightning's ``ModelParallelStrategy``) every parameter is a ``DTensor``; its gradient and the
optimizer's moments are ``DTensor`` too. Fused ``torch._foreach_*`` ops and ``torch.distributed`` collectives refuse
a mix of ``DTensor`` and plain tensors, and ``numel()`` of a ``DTensor`` counts the whole tensor, not the shard. The
guards work on the local shards (:func:`local`): no communication, the hot path as under DDP; where a ``DTensor``
must be rebuilt (an optimizer state restored through ``load_state_dict``), :func:`layout` and :func:`rebuild` carry
its mesh, placements and global shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support: nothing is sharded
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["Layout", "is_sharded", "layout", "local", "local_grad", "rebuild", "sharded_training"]


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2, tensor parallelism)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds, detached (the tensor itself, detached, when it is not sharded).

    It shares storage with ``tensor``: an in-place write to it writes the parameter's shard.
    """
    tensor = tensor.detach()
    return tensor.to_local() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def local_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The local part of ``param.grad`` (None without a gradient)."""
    grad = param.grad
    return None if grad is None else local(grad)


@dataclass(frozen=True)
class Layout:
    """How a ``DTensor`` lies over the ranks: enough to rebuild it from its local part."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]


def layout(tensor: Any) -> Layout | None:
    """The layout of a ``DTensor``; None for a plain tensor."""
    if not is_sharded(tensor):
        return None
    return Layout(tensor.device_mesh, tuple(tensor.placements), tensor.shape, tuple(tensor.stride()))


def rebuild(local_part: torch.Tensor, where: Layout | None) -> torch.Tensor:
    """A ``DTensor`` laid out as ``where`` from this rank's part (no communication); ``local_part`` when None."""
    if where is None:
        return local_part
    return DTensor.from_local(
        local_part, where.mesh, list(where.placements), run_check=False, shape=where.shape, stride=where.stride
    )


def sharded_training(trainer: Any) -> bool:
    """Whether each rank of ``trainer`` holds only a part of the model (FSDP, or FSDP2 through ModelParallelStrategy).

    Then gradient norms and penalties are sums over ranks, and a rank's copy of the weights is its shard only.
    """
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return trainer.world_size > 1 and isinstance(trainer.strategy, FSDPStrategy | ModelParallelStrategy)
