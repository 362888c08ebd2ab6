"""Measurements of a model or a file: parameters, sparsity, state size, CPU latency, an ONNX file's weighted ops."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_guard.compress._extras import require
from lightning_guard.compress.prune import prunable_layers

__all__ = ["cpu_latency_ms", "onnx_ops", "param_count", "sparsity", "state_bytes"]


def param_count(model: nn.Module) -> int:
    """Number of parameter elements (a quantised weight counts its elements once).

    Example:
        >>> param_count(nn.Linear(4, 3))
        15
    """
    return sum(p.numel() for p in model.parameters())


def sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros among the weights of the prunable layers (0.0 without any).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight.zero_()
        >>> sparsity(layer)
        1.0
    """
    total = zeros = 0
    for _, layer in prunable_layers(model):
        w = getattr(layer, "weight", None)
        if not isinstance(w, torch.Tensor) or type(w.detach()) is not torch.Tensor:
            continue  # a quantised weight (a torchao tensor subclass) is not counted
        total += w.numel()
        zeros += int((w.detach() == 0).sum())
    return zeros / total if total else 0.0


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as ``torch.save`` writes it (quantised tensors at their stored size)."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def cpu_latency_ms(fn: Callable[..., Any], inputs: tuple[Any, ...], repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of ``fn(*inputs)`` in milliseconds over ``repeats`` runs after ``warmup`` runs."""
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            fn(*inputs)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def onnx_ops(path: str | Path) -> dict[str, Any]:
    """Counts of an ONNX file's weighted ops, quantised (``ConvInteger``, ``MatMulInteger``) and not."""
    require("onnx")
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "Conv", "Gemm", "MatMul"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    int8 = {k: v for k, v in counts.items() if "Integer" in k or k.startswith("QLinear")}
    return {"int8": int8, "fp32": {k: v for k, v in counts.items() if k not in int8}}
