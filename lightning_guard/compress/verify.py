"""Verification: load an artifact through a fresh load path, compare its outputs, measure its own metric."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_guard._compat import tree_flatten, tree_leaves, tree_map, tree_unflatten
from lightning_guard.compress._extras import require
from lightning_guard.compress.measure import cpu_latency_ms, onnx_ops
from lightning_guard.compress.result import Stage
from lightning_guard.errors import GuardConfigError

__all__ = ["artifact_metric", "load_artifact", "max_output_error", "output_spec", "verify_artifact"]


def load_artifact(path: str | Path, output_spec: Any = None) -> Callable[..., Any]:
    """Load an exported artifact through a fresh load path (not the in-memory model).

    ``torch.export.load`` for ``.pt2``, an onnxruntime session for ``.onnx``. Returns a function from input tensors to
    the outputs, in the model's own output structure (a tensor, a tuple, a dict): a ``.pt2`` keeps it; an ONNX
    file's flat outputs are put back into ``output_spec`` (a ``torch.utils._pytree`` spec of the model's output;
    without it: one tensor, or a tuple of several). A torchao-quantised ``.pt2`` loads through pickle and needs
    torchao (:attr:`CompressionResult.loading` says which artifact does); load only files you trust.
    """
    path = Path(path)
    if path.suffix == ".pt2":
        module = torch.export.load(str(path)).module()

        def run_pt2(*inputs: Any) -> Any:
            with torch.no_grad():
                return module(*inputs)

        return run_pt2
    if path.suffix == ".onnx":
        require("onnxruntime")
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]

        def run_onnx(*inputs: Any) -> Any:
            flat = tree_leaves(inputs)
            feed = {n: t.detach().cpu().numpy() for n, t in zip(names, flat, strict=True)}
            outs = [torch.from_numpy(o) for o in session.run(None, feed)]
            if output_spec is not None:
                return tree_unflatten(outs, output_spec)
            return outs[0] if len(outs) == 1 else tuple(outs)

        return run_onnx
    raise GuardConfigError(f"unknown artifact type {path.suffix!r} (expected .pt2 or .onnx): {path}")


def output_spec(model: Callable[..., Any], inputs: tuple[Any, ...]) -> Any:
    """The ``torch.utils._pytree`` spec of ``model(*inputs)``'s output structure."""
    with torch.no_grad():
        return tree_flatten(model(*inputs))[1]


def artifact_metric(
    evaluate: Callable[[nn.Module], float], host: nn.Module, artifact: Callable[..., Any]
) -> float | None:
    """``evaluate(host)`` with the loaded ``artifact`` standing in for ``host.forward``: the artifact's own metric.

    The evaluation (for a LightningModule, its own ``validation_step``) runs unchanged, but every ``self(...)`` goes
    through the exported file (keyword arguments are bound to ``forward``'s parameters). None when the evaluation
    never called ``forward``, or also called the host's layers (children holding parameters) directly: the metric
    would be partly the in-memory model's, not the file's. Metrics and parameter-free losses may run beside it.
    """
    import inspect

    signature = inspect.signature(type(host).forward)
    calls, direct = 0, 0

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if kwargs:
            bound = signature.bind(host, *args, **kwargs)
            args = tuple(bound.args[1:])
        calls += 1
        out = artifact(*args)
        device = next((a.device for a in tree_leaves(args) if isinstance(a, torch.Tensor)), None)
        return tree_map(lambda t: t.to(device) if device is not None and isinstance(t, torch.Tensor) else t, out)

    def count_direct(*_: Any) -> None:
        nonlocal direct
        direct += 1

    # the model's own layers (children holding parameters): metrics and parameter-free losses may run beside forward
    layers = [child for child in host.children() if any(True for _ in child.parameters())]
    hooks = [child.register_forward_pre_hook(count_direct) for child in layers]
    host.forward = forward  # an instance attribute shadows the class's forward
    try:
        metric = float(evaluate(host))
    finally:
        del host.forward
        for hook in hooks:
            hook.remove()
    return metric if calls and not direct else None


def max_output_error(fn: Callable[..., Any], reference: Callable[..., Any], inputs: Sequence[tuple[Any, ...]]) -> float:
    """Largest output difference between ``fn`` and ``reference`` over the input batches, every output compared.

    Relative to each reference output's largest magnitude; ``inf`` when the output structures or shapes differ.
    """
    worst = 0.0
    with torch.no_grad():
        for args in inputs:
            refs, ref_spec = tree_flatten(reference(*args))
            gots, got_spec = tree_flatten(fn(*args))
            if len(refs) != len(gots) or (ref_spec != got_spec and len(refs) > 1):
                return float("inf")
            for ref, got in zip(refs, gots, strict=True):
                if not isinstance(ref, torch.Tensor):
                    continue
                ref, got = ref.detach().float().cpu(), torch.as_tensor(got).detach().float().cpu()
                if got.shape != ref.shape:
                    return float("inf")
                worst = max(worst, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)))
    return worst


def verify_artifact(
    path: Path,
    reference: nn.Module,
    tol: float,
    how: str | None,
    inputs: Sequence[tuple[Any, ...]],
    cpu_inputs: tuple[Any, ...],
) -> Stage:
    """Load ``path`` back and compare its outputs with ``reference``: an ``exported`` or ``verify_failed`` row."""
    artifact = load_artifact(path, output_spec(reference, inputs[0]))
    error = max_output_error(artifact, reference, inputs)
    return Stage(
        "export",
        path.name,
        "exported" if error <= tol else "verify_failed",
        file_bytes=path.stat().st_size,
        latency_ms=round(cpu_latency_ms(artifact, cpu_inputs), 4),
        path=str(path),
        max_error=error,
        quantized=how,
        layers=onnx_ops(path) if path.suffix == ".onnx" else None,
    )
