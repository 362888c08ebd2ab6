"""Out-of-memory recognition, batch splitting and output recombination (no Lightning imports).

These are the pure parts of ``OOMGuard``: telling an out-of-memory error from any other error, splitting a batch
into micro-batches along dim 0, putting evaluation outputs back together, and reading the device's memory figures.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_guard.errors import GuardConfigError

__all__ = ["batch_size", "combine_outputs", "free_memory", "is_oom_error", "memory_stats", "split_batch"]

#: substrings of the messages of out-of-memory errors raised as plain ``RuntimeError`` by the backends
_OOM_MESSAGES = (
    "cuda out of memory",
    "cuda error: out of memory",
    "hip out of memory",
    "hip error: out of memory",
    "mps backend out of memory",
    "xpu out of memory",
    "xpu error: out of memory",
    "ur_result_error_out_of_device_memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cudnn error: cudnn_status_not_supported",  # cuDNN's answer when its workspace does not fit
    "defaultcpuallocator: can't allocate memory",
    "out of memory on device",
)


def is_oom_error(exc: BaseException) -> bool:
    """True for an out-of-memory error of any backend (CUDA, ROCm, MPS, XPU, cuDNN/cuBLAS workspaces, CPU).

    ``torch.OutOfMemoryError`` (which ``torch.cuda.OutOfMemoryError`` aliases) always matches; other
    ``RuntimeError`` s match on their message, every argument of it (unlike Lightning's ``is_oom_error``, which
    misses MPS and XPU messages and multi-argument errors).

    Example:
        >>> is_oom_error(torch.OutOfMemoryError("anything"))
        True
        >>> is_oom_error(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
        True
        >>> is_oom_error(RuntimeError("size mismatch"))
        False
    """
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = " ".join(str(a) for a in exc.args).lower()
    return any(m in text for m in _OOM_MESSAGES)


def _is_leaf_sequence(value: Any, size: int) -> bool:
    """A list/tuple of ``size`` plain (non-tensor, non-container) values: per-sample data such as strings."""
    if not isinstance(value, list | tuple) or hasattr(value, "_fields") or len(value) != size or size == 0:
        return False
    return all(
        not isinstance(v, torch.Tensor | list | tuple | Mapping) and not dataclasses.is_dataclass(v) for v in value
    )


def batch_size(batch: Any) -> int:
    """Size of dim 0 of the first tensor in ``batch`` (tensors, tuples, lists, dicts, dataclasses); -1 if none.

    Example:
        >>> batch_size({"x": torch.zeros(8, 3), "y": torch.zeros(8)})
        8
    """
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else -1
    if isinstance(batch, Mapping):
        items: Any = batch.values()
    elif isinstance(batch, list | tuple):
        items = batch
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        items = (getattr(batch, f.name) for f in dataclasses.fields(batch))
    else:
        return -1
    for item in items:
        n = batch_size(item)
        if n >= 0:
            return n
    return -1


def _take(value: Any, start: int, stop: int, size: int, path: str) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return value
        if value.shape[0] != size:
            raise GuardConfigError(
                f"cannot split the batch: the tensor at {path} has shape {tuple(value.shape)} but the batch size is "
                f"{size}; override `GuardMixin.split_batch` for this batch type"
            )
        return value[start:stop]
    if isinstance(value, Mapping):
        return type(value)({k: _take(v, start, stop, size, f"{path}[{k!r}]") for k, v in value.items()})  # type: ignore[call-arg]
    if _is_leaf_sequence(value, size):
        return type(value)(value[start:stop])
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        fields = zip(value._fields, value, strict=True)
        return type(value)(*(_take(v, start, stop, size, f"{path}.{f}") for f, v in fields))
    if isinstance(value, list | tuple):
        return type(value)(_take(v, start, stop, size, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _take(getattr(value, f.name), start, stop, size, f"{path}.{f.name}")
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **changes)
    return value  # any other leaf (a string, a number, None) goes to every micro-batch as it is


def split_batch(batch: Any, micro_batch_size: int) -> list[Any]:
    """Split a batch along dim 0 into micro-batches of at most ``micro_batch_size`` samples, in order.

    Tensors (and lists/tuples of plain per-sample values such as strings) whose length is the batch size are cut;
    0-dim tensors and other leaves are given to every micro-batch; tuples, lists, dicts, namedtuples and dataclasses
    are rebuilt with their own type.

    Raises:
        GuardConfigError: ``micro_batch_size`` is not an int >= 1, the batch holds no tensor with a batch dimension,
            or a tensor's dim 0 differs from the batch size (override ``GuardMixin.split_batch`` for such batches).

    Example:
        >>> parts = split_batch((torch.arange(5), ["a", "b", "c", "d", "e"]), 2)
        >>> [p[0].tolist() for p in parts], [p[1] for p in parts]
        ([[0, 1], [2, 3], [4]], [['a', 'b'], ['c', 'd'], ['e']])
    """
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise GuardConfigError(f"`micro_batch_size` must be an int >= 1, got {micro_batch_size!r}")
    size = batch_size(batch)
    if size < 0:
        raise GuardConfigError(
            f"cannot split a batch of type {type(batch).__name__} that holds no tensor with a batch dimension; "
            "override `GuardMixin.split_batch`"
        )
    return [
        _take(batch, start, min(start + micro_batch_size, size), size, "batch")
        for start in range(0, max(size, 1), micro_batch_size)
    ]


def combine_outputs(outputs: Sequence[Any], sizes: Sequence[int]) -> Any:
    """Recombine the outputs of the micro-batches of one evaluation batch into the whole batch's output.

    Tensors with a batch dimension are concatenated; floating-point scalars (tensors or floats) are averaged weighted
    by micro-batch size (a mean over the samples); integer scalars (counts) are summed; lists with one entry per
    sample in every part (a list as long as its micro-batch, or a tuple of plain values such as names) are
    concatenated; dicts, other lists and tuples, namedtuples and dataclasses are combined field by field; ``None``
    stays ``None``; any other value is taken from the last part. A list of *fields* exactly as long as every
    micro-batch reads as per-sample: return a tuple for fields.

    Example:
        >>> combine_outputs([{"loss": torch.tensor(1.0), "n": 2}, {"loss": torch.tensor(4.0), "n": 1}], [2, 1])
        {'loss': tensor(2.), 'n': 3}
        >>> combine_outputs([["a", "b"], ["c"]], [2, 1])
        ['a', 'b', 'c']
    """
    first = outputs[0]
    total = float(sum(sizes))
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        if first.dim() == 0:
            if first.is_floating_point() or first.is_complex():
                return sum(o * (n / total) for o, n in zip(outputs, sizes, strict=True))
            return sum(outputs[1:], first)
        if all(o.shape[0] == n for o, n in zip(outputs, sizes, strict=True)):
            return torch.cat(list(outputs))
        return torch.stack(list(outputs))
    if isinstance(first, bool):
        return outputs[-1]
    if isinstance(first, float):
        return sum(o * (n / total) for o, n in zip(outputs, sizes, strict=True))
    if isinstance(first, int):
        return sum(outputs)
    if isinstance(first, Mapping):
        return type(first)({k: combine_outputs([o[k] for o in outputs], sizes) for k in first})  # type: ignore[call-arg]
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(combine_outputs([o[i] for o in outputs], sizes) for i in range(len(first))))
    per_sample = all(isinstance(o, list) and len(o) == n for o, n in zip(outputs, sizes, strict=True)) or all(
        _is_leaf_sequence(o, n) for o, n in zip(outputs, sizes, strict=True)
    )
    if per_sample and len(outputs) > 1:  # one entry per sample (names, per-image dicts): the parts are concatenated
        return type(first)(x for o in outputs for x in o)
    if isinstance(first, list | tuple):
        return type(first)(combine_outputs([o[i] for o in outputs], sizes) for i in range(len(first)))
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(
            first,
            **{
                f.name: combine_outputs([getattr(o, f.name) for o in outputs], sizes)
                for f in dataclasses.fields(first)
                if f.init
            },
        )
    return outputs[-1]


def memory_stats(device: torch.device) -> dict[str, float]:
    """Allocated, reserved and peak memory of ``device`` in MiB (CUDA; empty elsewhere)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    mib = 1024.0 * 1024.0
    return {
        "allocated_mib": round(torch.cuda.memory_allocated(device) / mib, 1),
        "reserved_mib": round(torch.cuda.memory_reserved(device) / mib, 1),
        "peak_mib": round(torch.cuda.max_memory_allocated(device) / mib, 1),
    }


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand the allocator's cached blocks back to the device (CUDA, MPS, XPU)."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()
    elif device.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.empty_cache()
