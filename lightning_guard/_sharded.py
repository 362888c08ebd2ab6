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

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - a torch built without distributed support
    FSDPModule = None  # type: ignore[assignment,misc]

__all__ = [
    "Layout",
    "can_reset_after_failure",
    "fsdp_modules",
    "is_sharded",
    "layout",
    "local",
    "local_grad",
    "rebuild",
    "reset_after_failure",
    "reshard",
    "sharded_training",
    "shares",
    "unsynchronised_parameters",
]


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


def fsdp_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules ``fully_shard`` was applied to (FSDP2), ``module`` included; empty for any other model."""
    if FSDPModule is None:
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def reshard(modules: list[torch.nn.Module]) -> None:
    """Put FSDP2 modules back in their sharded state (no communication: it frees the gathered full parameters).

    FSDP2 keeps the root module's parameters gathered after a forward without backward (a validation) until the next
    training step; meanwhile ``module.parameters()`` yields those temporary full tensors, and a write into them is
    undone when FSDP2 reshards. Whoever reads or writes the weights between steps reshards first, so that it sees the
    ``DTensor`` parameters and their local shards.
    """
    for m in modules:
        m.reshard()  # type: ignore[operator]


def can_reset_after_failure() -> bool:
    """Whether this torch's FSDP2 can be brought back after a forward or backward that failed mid-flight."""
    return FSDPModule is not None and hasattr(FSDPModule, "reset_iter_state")


def reset_after_failure(module: torch.nn.Module, *, training: bool) -> None:
    """Bring FSDP2 back to a clean iteration after a forward or backward abandoned mid-flight (out of memory).

    ``FSDPModule.reset_iter_state`` on each root (an FSDP2 module inside no other one): it waits for the collectives
    in flight, reshards every parameter group and clears the iteration's trackers. No communication; nothing without
    FSDP2 modules. After a training attempt (``training``) the gradients left on gathered parameters are dropped too
    (a block whose backward ran but whose reduce-scatter did not holds its gradient there); an evaluation keeps every
    gradient (an accumulation window may be open).
    """
    roots = fsdp_modules(module)
    if not roots:
        return
    if training:
        for p in module.parameters():  # the gathered parameters are registered in the module until the reset below
            p.grad = None
    inner = {id(sub) for m in roots for sub in m.modules() if sub is not m}
    for m in roots:
        if id(m) not in inner:
            m.reset_iter_state()  # type: ignore[operator]


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


def _plain_share(trainer: Any) -> float:
    """The weight of a plain (not ``DTensor``) tensor in a sum over ranks under sharded training.

    Under FSDP it is the rank's shard (1); under ModelParallelStrategy every rank holds the same full tensor (1 /
    world size).
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    return 1.0 / trainer.world_size if isinstance(trainer.strategy, ModelParallelStrategy) else 1.0


def shares(tensors: list[Any], trainer: Any) -> list[float] | None:
    """Per tensor, the weight of this rank's local part in a sum over all ranks (None when every weight is 1).

    A sum of squares or of magnitudes over the ranks counts each element once only if every rank's part is distinct.
    A ``DTensor`` replicated along a mesh dimension (HSDP's 2-D mesh: replicate x shard; tensor parallelism's
    replicated layers) lies identically on that dimension's ranks: its part weighs 1 / (their number).
    """
    plain = _plain_share(trainer)
    out = []
    for t in tensors:
        if is_sharded(t):
            copies = 1
            for dim, placement in enumerate(t.placements):
                if placement.is_replicate():
                    copies *= t.device_mesh.size(dim)
            out.append(1.0 / copies)
        else:
            out.append(plain)
    return None if all(w == 1.0 for w in out) else out


def unsynchronised_parameters(module: torch.nn.Module, trainer: Any) -> list[str]:
    """Trainable parameters that are plain tensors (not ``DTensor``) under ModelParallelStrategy with several ranks.

    ``fully_shard`` makes every parameter of the modules it is applied to a ``DTensor``; a parameter outside them
    stays a plain tensor on each rank, and Lightning does not synchronise its gradient: unless the user's code does
    (torch's ``replicate``), its copies drift apart. The guards weigh each copy 1 / world size in their sums, which is
    the model's value only while the copies agree. Call after :func:`reshard` (gathered parameters are plain too).
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    if trainer.world_size <= 1 or not isinstance(trainer.strategy, ModelParallelStrategy):
        return []
    return [name for name, p in module.named_parameters() if p.requires_grad and not is_sharded(p)]
