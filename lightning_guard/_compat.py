"""Every private attribute or private import of Lightning, torch, torchmetrics and torch.distributed the package uses.

Nothing else in ``lightning_guard`` reaches into another library's private names (``tests/structure/test_compat.py``
reads the package and fails on one). Each use has a named function here, tested on the installed versions in
``tests/structure/test_compat.py``; when an upgrade removes or renames what a function reads, it raises
:class:`UpstreamChangedError` naming the attribute, the library and its version, instead of an ``AttributeError`` deep
inside a guard. The versions these were checked on are those ``pyproject.toml`` declares (the oldest) and the newest
the suite installs.

Why each is needed is said where it is used; the short reason is beside each function. Lightning is imported inside
the functions that need it: ``lightning_guard.functional`` imports this module and stays free of Lightning.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils._pytree as _pytree

__all__ = ["UpstreamChangedError"]


class UpstreamChangedError(RuntimeError):
    """A private attribute of Lightning, torch or torchmetrics that lightning_guard relies on is not there."""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _missing(what: str, package: str, err: BaseException | None = None) -> UpstreamChangedError:
    return UpstreamChangedError(
        f"lightning_guard needs `{what}`, which {package} {_version(package)} does not have"
        + (f" ({type(err).__name__}: {err})" if err is not None else "")
        + ": this version is not supported yet; install the versions pyproject.toml declares, or report it"
    )


def _attr(obj: Any, name: str, what: str, package: str) -> Any:
    try:
        return getattr(obj, name)
    except AttributeError as err:
        raise _missing(what, package, err) from None


# ---------------------------------------------------------------------------------------------------------- torch
def _foreach(name: str) -> Callable[..., Any]:
    fn = getattr(torch, f"_foreach_{name}", None)
    if fn is None:

        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise _missing(f"torch._foreach_{name}", "torch")

        return unavailable
    return fn


# the fused multi-tensor kernels (one launch for all tensors; what torch's own clip_grad_norm_ and optimizers use)
foreach_norm = _foreach("norm")
foreach_mul_ = _foreach("mul_")
foreach_add_ = _foreach("add_")
foreach_sub_ = _foreach("sub_")
foreach_sign = _foreach("sign")
foreach_clamp_min = _foreach("clamp_min")
foreach_clamp_max_ = _foreach("clamp_max_")
foreach_copy_ = _foreach("copy_")

# pytrees: flatten a model's nested outputs for export and verification (torch has no public pytree module)
tree_map = _pytree.tree_map
tree_leaves = _pytree.tree_leaves
tree_flatten = _pytree.tree_flatten
tree_unflatten = _pytree.tree_unflatten

#: the base of BatchNorm and InstanceNorm layers (excluded from the L1 penalty)
NORM_BASE: type = _attr(torch.nn.modules.batchnorm, "_NormBase", "torch.nn.modules.batchnorm._NormBase", "torch")


def tensor_version(tensor: torch.Tensor) -> int:
    """The tensor's in-place write counter (a write without a copy is seen without reading the values)."""
    return int(_attr(tensor, "_version", "torch.Tensor._version", "torch"))


def buffer_slots(module: torch.nn.Module) -> Iterator[str]:
    """The names of the module's own persistent buffer slots.

    A slot holding None is included (``named_buffers`` skips those, and a forward may fill one).
    """
    slots = _attr(module, "_buffers", "torch.nn.Module._buffers", "torch")
    skip = non_persistent_buffer_names(module)
    return (name for name in list(slots) if name not in skip)


def non_persistent_buffer_names(module: torch.nn.Module) -> set[str]:
    """The module's own buffers registered with ``persistent=False`` (not in its state dict)."""
    return set(_attr(module, "_non_persistent_buffers_set", "torch.nn.Module._non_persistent_buffers_set", "torch"))


def get_buffer(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The tensor in the module's own buffer slot ``name`` (None if the slot is empty or absent)."""
    slots = _attr(module, "_buffers", "torch.nn.Module._buffers", "torch")
    return slots.get(name)


def set_buffer(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` back in the module's own buffer slot ``name`` (the slot exists)."""
    _attr(module, "_buffers", "torch.nn.Module._buffers", "torch")[name] = tensor


def scaler_scale(scaler: Any) -> torch.Tensor | None:
    """The GradScaler's current loss scale as the device tensor (no host sync); None before its first use."""
    return getattr(scaler, "_scale", None) if scaler is not None else None


def steps_unscale_inside(optimizer: Any) -> bool:
    """Whether the optimizer unscales inside its own ``step()`` (fused Adam/AdamW/SGD under a GradScaler).

    Its gradients are still multiplied by the loss scale when Lightning's ``on_before_optimizer_step`` runs.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def scaler_optimizer_state(scaler: Any, optimizer: Any) -> dict[str, Any]:
    """The GradScaler's per-optimizer record of this step (``stage``, ``found_inf_per_device``)."""
    states = _attr(scaler, "_per_optimizer_states", "torch.amp.GradScaler._per_optimizer_states", "torch")
    return states[id(optimizer)]


def scaler_check_inf(scaler: Any, optimizer: Any) -> None:
    """Fill the optimizer's ``found_inf_per_device`` as ``unscale_`` would (for a fused optimizer, not unscaled)."""
    _attr(scaler, "_check_inf_per_device", "torch.amp.GradScaler._check_inf_per_device", "torch")(optimizer)


def scaler_forget_step(scaler: Any) -> None:
    """Forget the GradScaler's per-optimizer records of an abandoned step, as ``update()`` does after a step.

    A scaler that is not torch's GradScaler is left alone.
    """
    if not isinstance(scaler, torch.amp.GradScaler):
        return
    states = _attr(scaler, "_per_optimizer_states", "torch.amp.GradScaler._per_optimizer_states", "torch")
    try:
        from torch.amp.grad_scaler import _refresh_per_optimizer_state
    except ImportError as err:
        raise _missing("torch.amp.grad_scaler._refresh_per_optimizer_state", "torch", err) from None
    states.clear()
    states.default_factory = _refresh_per_optimizer_state


def ddp_sync_buffers_next_forward(model: Any, sync: bool) -> None:
    """Set whether DDP's next forward broadcasts rank 0's buffers (BatchNorm statistics) before it runs.

    DDP decides it from its previous forward (``require_forward_param_sync``: set at the end of a forward with
    gradients synced, cleared at the end of one under ``no_sync`` or without gradients). A forward that failed on one
    rank never reached that end, so the ranks disagree about the next broadcast and one waits in it for ever; after an
    agreed failure every rank sets the same value. Nothing for a model that is not DDP.
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return
    _attr(model, "require_forward_param_sync", "DistributedDataParallel.require_forward_param_sync", "torch")
    model.require_forward_param_sync = sync


def ddp_buckets_rebuilt(model: Any) -> bool:
    """Whether DDP has rebuilt its gradient buckets (True for a model that is not DDP).

    DDP rebuilds them once, in the first forward after the first backward, and tells the other ranks the new order
    with collectives of its own (two broadcasts): a one-off of DDP's, not a collective of the user's step.
    """
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return True
    return bool(_attr(model, "_has_rebuilt_buckets", "DistributedDataParallel._has_rebuilt_buckets", "torch"))


def collectives_issued(exclude: Any = None) -> int | None:
    """Collectives issued so far on every process group but ``exclude``; None where they cannot be read.

    Read from the groups' sequence numbers (gloo and NCCL count every collective, a compiled graph's and a C++
    extension's too).
    """
    import torch.distributed as dist

    total = 0
    try:
        for pg in dist.distributed_c10d._world.pg_map:
            if pg is not exclude:
                total += int(pg._get_sequence_number_for_group())  # type: ignore[attr-defined]
    except Exception:
        return None
    return total


# ------------------------------------------------------------------------------------------------------ Lightning
def spawn_launched(trainer: Any) -> bool:
    """Whether the trainer's strategy launches its workers with ``ddp_spawn`` (they hold copies of the callbacks)."""
    try:
        from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
    except ImportError as err:
        what = "lightning.pytorch.strategies.launchers.multiprocessing._MultiProcessingLauncher"
        raise _missing(what, "lightning", err) from None
    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _MultiProcessingLauncher):
        return False
    return _attr(launcher, "_start_method", "_MultiProcessingLauncher._start_method", "lightning") == "spawn"


def logged_results(trainer: Any) -> Any:
    """The values ``self.log`` accumulated in the running loop (Lightning's ``_ResultCollection``), or None."""
    return _attr(trainer, "_results", "Trainer._results", "lightning")


def call_training_step(trainer: Any, *args: Any) -> Any:
    """Run ``training_step`` through the strategy exactly as Lightning's loop does (its wrappers and profiling)."""
    try:
        from lightning.pytorch.trainer import call
    except ImportError as err:
        raise _missing("lightning.pytorch.trainer.call", "lightning", err) from None
    return _attr(call, "_call_strategy_hook", "lightning.pytorch.trainer.call._call_strategy_hook", "lightning")(
        trainer, "training_step", *args
    )


def should_accumulate(trainer: Any) -> bool:
    """Whether the batch being run accumulates (no optimizer step at its end: ``accumulate_grad_batches``)."""
    return bool(_attr(trainer.fit_loop, "_should_accumulate", "_FitLoop._should_accumulate", "lightning")())


def epoch_batches_done(trainer: Any) -> bool:
    """Whether the training epoch has run all its batches (the epoch is complete, not cut short)."""
    loop = trainer.fit_loop.epoch_loop
    return bool(
        _attr(loop, "_num_ready_batches_reached", "_TrainingEpochLoop._num_ready_batches_reached", "lightning")()
    )


def val_data_source(trainer: Any) -> Any:
    """The fit's validation data source (``dataloader()`` gives the loaders; ``is_defined()`` whether there is one)."""
    loop = trainer.fit_loop.epoch_loop.val_loop
    return _attr(loop, "_data_source", "_EvaluationLoop._data_source", "lightning")


def forget_metric_attributes(module: Any) -> None:
    """Drop a LightningModule's cache of its torchmetrics attributes (a deep copy's cache names the original's)."""
    module._metric_attributes = None


def attached_trainer(module: Any) -> Any:
    """The trainer a LightningModule is attached to, or None (``module.trainer`` raises when there is none)."""
    return getattr(module, "_trainer", None)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside Lightning's ``LightningOptimizer`` wrapper (the optimizer itself otherwise)."""
    # LightningOptimizer keeps the torch optimizer as `_optimizer` and exposes it as `.optimizer`; duck-typed so that
    # functional/, which imports this module, stays free of Lightning (and no import runs per step)
    inner = getattr(type(optimizer), "optimizer", None)
    return optimizer.optimizer if isinstance(inner, property) else optimizer


def wandb_init_kwargs(logger: Any) -> dict[str, Any]:
    """The keyword arguments a ``WandbLogger`` will hand to ``wandb.init`` (empty if it keeps none)."""
    kwargs = getattr(logger, "_wandb_init", None)
    return kwargs if isinstance(kwargs, dict) else {}


# ---------------------------------------------------------------------------------------------------- torchmetrics
def metric_state_names(metric: Any) -> list[str]:
    """The names of a torchmetrics ``Metric``'s states (those ``add_state`` registered)."""
    return list(_attr(metric, "_defaults", "torchmetrics.Metric._defaults", "torchmetrics"))


def metric_reduction(metric: Any, name: str) -> Any:
    """The ``dist_reduce_fx`` of a metric state (``dim_zero_sum``, ``dim_zero_cat``, ..., or None)."""
    return _attr(metric, "_reductions", "torchmetrics.Metric._reductions", "torchmetrics").get(name)


def metric_bookkeeping(metric: Any) -> tuple[int, Any, Any]:
    """A metric's ``(update count, computed value cache, forward cache)``.

    What ``update``/``forward`` change besides the states (Lightning's ``_ResultMetric`` is a torchmetrics ``Metric``
    and keeps the same three).
    """
    try:
        return metric._update_count, metric._computed, metric._forward_cache
    except AttributeError as err:
        raise _missing("torchmetrics.Metric._update_count/_computed/_forward_cache", "torchmetrics", err) from None


def set_metric_bookkeeping(metric: Any, update_count: int, computed: Any, forward_cache: Any) -> None:
    """Put back what :func:`metric_bookkeeping` read."""
    metric._update_count, metric._computed, metric._forward_cache = update_count, computed, forward_cache


def forward_cache(metric: Any) -> Any:
    """The value of the metric's last ``forward`` (what ``self.log(..., on_step=True)`` shows for the step)."""
    return _attr(metric, "_forward_cache", "torchmetrics.Metric._forward_cache", "torchmetrics")


def set_forward_cache(metric: Any, value: Any) -> None:
    """Replace the value a step logs (the micro-batches' combination)."""
    metric._forward_cache = value


def update_count(metric: Any) -> int:
    """How many times the metric was updated since its last reset."""
    return int(_attr(metric, "_update_count", "torchmetrics.Metric._update_count", "torchmetrics"))
