"""Pruning, quantisation, export and artifact verification, usable without a Trainer.

Everything here works on a plain ``torch.nn.Module`` (a ``LightningModule`` is one) and returns a new module or
writes a file; nothing mutates the model passed in unless the name ends with ``_``. The optional libraries come from
the ``export`` extra (``pip install lightning-guard[export]``): torchao (quantisation; ``torch.ao.quantization`` is
deprecated), torch-pruning (structured pruning that really removes neurons/channels), onnx + onnxscript +
onnxruntime (ONNX export, ONNX int8 quantisation, and loading ONNX artifacts back for verification).
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_guard._checks import check_number
from lightning_guard._compat import tree_flatten, tree_leaves, tree_map, tree_unflatten
from lightning_guard.errors import GuardConfigError, GuardRuntimeError

__all__ = [
    "QUANTIZE_MODES",
    "CompressionResult",
    "Stage",
    "check_compress_args",
    "compress_and_export",
    "cpu_latency_ms",
    "export_onnx",
    "export_program",
    "export_pt2",
    "load_artifact",
    "max_output_error",
    "onnx_ops",
    "output_spec",
    "param_count",
    "prunable_layers",
    "prune_structured",
    "prune_unstructured",
    "quantize",
    "quantized_layers",
    "sparsity",
    "state_bytes",
]

QuantizeMode = Literal["int8_weight_only", "int8_dynamic", "int4_weight_only"]
#: the torchao configurations behind each ``quantize`` mode
QUANTIZE_MODES = ("int8_weight_only", "int8_dynamic", "int4_weight_only")


def _require(module: str, extra: str = "export") -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise GuardConfigError(
            f"this needs `{module}`: install the `{extra}` extra (pip install lightning-guard[{extra}])"
        )


def _check_amount(amount: Any) -> None:
    if not isinstance(amount, int | float) or isinstance(amount, bool) or not 0.0 <= amount < 1.0:
        raise GuardConfigError(f"`amount` must be a number in [0, 1), got {amount!r}")


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``Linear`` and ``Conv`` layers whose weights pruning acts on, in module order."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


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
    _require("torch_pruning")
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


def quantize(model: nn.Module, mode: QuantizeMode) -> nn.Module:
    """A copy of ``model`` whose ``Linear`` layers are quantised with torchao (``quantize_``).

    ``int8_weight_only`` stores int8 weights with per-channel scales; ``int8_dynamic`` also quantises activations
    on the fly; ``int4_weight_only`` needs a CUDA device with int4 kernels.

    Raises:
        GuardConfigError: an unknown mode, torchao missing, or int4 without CUDA.
    """
    if mode not in QUANTIZE_MODES:
        raise GuardConfigError(f"`quantize` must be one of {QUANTIZE_MODES} or None, got {mode!r}")
    _require("torchao")
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if mode == "int4_weight_only" and device.type != "cuda":
        raise GuardConfigError("`quantize='int4_weight_only'` needs the model on a CUDA device (torchao int4 kernels)")
    config = {
        "int8_weight_only": Int8WeightOnlyConfig,
        "int8_dynamic": Int8DynamicActivationInt8WeightConfig,
        "int4_weight_only": Int4WeightOnlyConfig,
    }[mode]()
    quantized = copy.deepcopy(model)
    quantize_(quantized, config)
    return quantized


class _Forward(nn.Module):
    """Exports ``model.forward`` only (a LightningModule carries much more than its forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any) -> Any:
        return self.model(*args)


def _batch_dims(example_inputs: tuple[Any, ...]) -> dict[str, Any]:
    """Dynamic-shape spec of ``_Forward(*args)``: dim 0 of every input tensor is the (shared) batch dimension.

    Follows the inputs' structure (a dict or tuple of tensors as one argument gets a spec of the same structure).
    """
    batch = torch.export.Dim("batch", min=1)
    spec = tree_map(
        lambda t: {0: batch} if isinstance(t, torch.Tensor) and t.dim() > 0 else None, tuple(example_inputs)
    )
    return {"args": spec}


def _traceable_example(example_inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """The example with a batch of at least 2: torch.export specialises a batch of 1 to the constant 1.

    A batch of one sample is repeated; the tensors are cloned, so the saved program never holds a view of the
    user's data (``torch.export.save`` would write the whole underlying storage).
    """

    def widen(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach()
        return torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == 1 else t.clone()

    return tuple(tree_map(widen, tuple(example_inputs)))


def export_program(model: nn.Module, example_inputs: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` the model's forward in eval mode with a dynamic batch dimension.

    Every submodule's train/eval flag is put back as it was afterwards (a frozen BatchNorm stays in eval).
    """
    modes = [(m, m.training) for m in model.modules()]
    example = _traceable_example(example_inputs)
    try:
        program = torch.export.export(_Forward(model).eval(), example, dynamic_shapes=_batch_dims(example))
        program.example_inputs = None  # a saved program would carry the example: validation data in the file
        return program
    finally:
        for m, training in modes:
            m.training = training


def export_pt2(model: nn.Module, example_inputs: tuple[Any, ...], path: str | Path) -> Path:
    """``torch.export`` the model's forward (dynamic batch dimension) and save it as a ``.pt2`` file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(export_program(model, example_inputs), str(path))
    return path


#: how :func:`export_onnx` quantises an ONNX file (said in the report): portable across x86 CPUs with and without VNNI
ONNX_INT8_SCHEME = "int8_dynamic u8u8 (onnxruntime; uint8 weights: no u8s8 saturation on CPUs without VNNI)"


def export_onnx(
    model: nn.Module, example_inputs: tuple[Any, ...], path: str | Path, *, quantize_int8: bool = False
) -> Path:
    """Export the model's forward to ONNX: one self-contained file, dynamic batch dimension.

    With ``quantize_int8`` the file is then quantised by onnxruntime (dynamic int8, :data:`ONNX_INT8_SCHEME`), since
    torchao-quantised models do not export to ONNX. Export the fp32 (pruned) model here, not a torchao-quantised one.

    The int8 weights are unsigned (u8u8: activations and weights both uint8). The usual u8s8 form is computed on x86
    CPUs without VNNI (AVX2 only) with ``vpmaddubsw``, whose 16-bit intermediate sums saturate: the same file then
    gives other outputs there than on a VNNI CPU (a relative error of 0.09 where a VNNI CPU sees 0.02, measured on a
    BatchNorm conv net). u8u8 does not saturate on any x86 CPU, so the file computes the same wherever it is served -
    an exported file is served on other machines than the one that exported it, so the exporting CPU must not choose.
    """
    _require("onnx")
    _require("onnxscript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    target = path.with_name(path.stem + ".fp32.onnx") if quantize_int8 else path
    try:
        torch.onnx.export(
            _Forward(model).eval(),
            example_inputs,
            str(target),
            dynamo=True,
            dynamic_shapes=_batch_dims(example_inputs),
            external_data=False,
            verbose=False,
        )
    finally:
        model.train(was_training)
    if quantize_int8:
        _require("onnxruntime")
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(target), str(path), weight_type=QuantType.QUInt8)
        target.unlink()
    return path


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
        _require("onnxruntime")
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


#: layer types whose weights quantisation could shrink (reported when left in fp32)
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Embedding)


def quantized_layers(model: nn.Module) -> dict[str, Any]:
    """Which layers of a torchao-quantised model hold quantised weights and which weighted layers stayed fp32.

    torchao's int8 configurations quantise ``nn.Linear`` only (``aten.convolution`` has no int8 tensor-subclass
    kernel): convolutions and embeddings stay fp32 and are listed under ``"fp32"``.
    """
    quantized, fp32 = [], []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        data = weight.data if isinstance(weight, nn.Parameter) else weight
        if type(data) is not torch.Tensor:
            quantized.append(name)
        elif isinstance(module, _WEIGHTED):
            fp32.append(name)
    return {"int8": quantized, "fp32": fp32}


def onnx_ops(path: str | Path) -> dict[str, Any]:
    """Counts of an ONNX file's weighted ops, quantised (``ConvInteger``, ``MatMulInteger``) and not."""
    _require("onnx")
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "Conv", "Gemm", "MatMul"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    int8 = {k: v for k, v in counts.items() if "Integer" in k or k.startswith("QLinear")}
    return {"int8": int8, "fp32": {k: v for k, v in counts.items() if k not in int8}}


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


# ---------------------------------------------------------------------------------------------- the search

PruneMode = Literal["unstructured", "structured"]
Format = Literal["pt2", "onnx"]


@dataclass
class Stage:
    """One row of the compression report."""

    stage: str  # baseline | prune | quantize | export
    setting: str  # e.g. "structured 0.5", "int8_weight_only", "model.pt2"
    decision: str  # measured | accepted | rejected | exported | verify_failed
    metric: float | None = None
    size_bytes: int | None = None  # the state dict as torch.save writes it
    file_bytes: int | None = None  # the artifact file (export rows; the baseline: an fp32 .pt2 for comparison)
    params: int | None = None
    sparsity: float | None = None
    latency_ms: float | None = None
    path: str | None = None
    max_error: float | None = None
    quantized: str | None = None  # export rows: how the artifact's weights are quantised (None: fp32)
    held_out_metric: float | None = None  # the metric on held-out data (baseline, and each artifact itself)
    layers: dict[str, Any] | None = None  # quantize and ONNX export rows: which layers/ops were quantised, which not


@dataclass
class CompressionResult:
    """What :func:`compress_and_export` found: the chosen model, the artifacts and every stage measured."""

    model: nn.Module
    baseline_metric: float
    final_metric: float
    artifacts: dict[str, str] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)
    prune_amount: float = 0.0
    quantized: str | None = None
    baseline_held_out: float | None = None
    #: formats whose file was exported but not verified: the reason; the file is renamed ``<name>.rejected``
    rejected: dict[str, str] = field(default_factory=dict)

    @property
    def loading(self) -> dict[str, str]:
        """How each artifact loads, stated truthfully: what it needs and whether its loading runs pickle.

        A ``.pt2`` of fp32 weights loads with ``torch.export.load`` through ``torch.load(weights_only=True)`` (no
        arbitrary pickle). A ``.pt2`` quantised by torchao holds tensor subclasses that ``torch.export.load`` reads
        with ``torch.load(weights_only=False)`` (pickle: load only files you trust) and that need torchao installed
        where it is served. An ONNX file loads in onnxruntime, without pickle, and needs neither torch nor torchao.
        """
        out: dict[str, str] = {}
        if "pt2" in self.artifacts:
            out["pt2"] = (
                f"torch.export.load; {self.quantized} weights are torchao tensor subclasses: loading runs pickle "
                "(torch.load weights_only=False) and needs torchao"
                if self.quantized
                else "torch.export.load; fp32 weights through torch.load(weights_only=True): no pickle"
            )
        if "onnx" in self.artifacts:
            out["onnx"] = "onnxruntime.InferenceSession: no pickle, no torch needed"
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (without the model)."""
        return {
            "baseline_metric": self.baseline_metric,
            "final_metric": self.final_metric,
            "prune_amount": self.prune_amount,
            "quantized": self.quantized,
            "baseline_held_out": self.baseline_held_out,
            "artifacts": dict(self.artifacts),
            "rejected": dict(self.rejected),
            "loading": self.loading,
            "stages": [asdict(s) for s in self.stages],
        }


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise GuardConfigError(f"`{name}` must be one of {tuple(choices)}, got {value!r}")


def check_compress_args(
    prune: str | None,
    prune_amounts: Sequence[float],
    quantize_mode: str | None,
    formats: Sequence[str],
    max_metric_drop: float,
) -> None:
    """Validate the arguments shared by :func:`compress_and_export` and ``CompressExport`` (errors name them)."""
    _check_choice("prune", prune, (None, "unstructured", "structured"))
    if quantize_mode is not None:
        _check_choice("quantize", quantize_mode, QUANTIZE_MODES)
    amounts = list(prune_amounts) if isinstance(prune_amounts, list | tuple) else None
    if not amounts or not all(
        isinstance(a, int | float) and not isinstance(a, bool) and 0.0 < a < 1.0 for a in amounts
    ):
        raise GuardConfigError(f"`prune_amounts` must be a non-empty list of numbers in (0, 1), got {prune_amounts!r}")
    if not isinstance(formats, list | tuple) or not formats or any(f not in ("pt2", "onnx") for f in formats):
        raise GuardConfigError(f"`formats` must be a non-empty list of 'pt2' and/or 'onnx', got {formats!r}")
    if "pt2" not in formats:
        raise GuardConfigError(f"`formats` must include 'pt2' (always exported), got {formats!r}")
    check_number("max_metric_drop", max_metric_drop, low=0, strict=False)


def _grad_masks(model: nn.Module) -> Callable[[], None]:
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


def _verify_artifact(
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


def _quantisation_not_worth_it(
    pt2: Path,
    fp32_model: nn.Module,
    example_inputs: tuple[Any, ...],
    cpu_inputs: tuple[Any, ...],
    mode: str,
    min_size_ratio: float,
    max_latency_ratio: float | None,
) -> str | None:
    """Why the quantised ``pt2`` is not worth deploying against the fp32 file of the same model, or None.

    Both files are loaded and timed the same way (median CPU latency of the loaded program); torchao's graph carries
    fixed overhead, so on a small model the int8 file can be barely smaller, or larger, and slower than the fp32 one.
    """
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_pt2(fp32_model, example_inputs, Path(tmp) / "fp32.pt2")
        fp32_bytes, q_bytes = fp32.stat().st_size, pt2.stat().st_size
        ratio = fp32_bytes / max(q_bytes, 1)
        if ratio < min_size_ratio:
            return (
                f"the {mode} .pt2 ({q_bytes} bytes) is only {ratio:.2f}x smaller than the fp32 one ({fp32_bytes}), "
                f"below min_size_ratio {min_size_ratio:g}"
            )
        if max_latency_ratio is None:
            return None
        fp32_ms = cpu_latency_ms(load_artifact(fp32), cpu_inputs)
    q_ms = cpu_latency_ms(load_artifact(pt2), cpu_inputs)
    if q_ms > max_latency_ratio * fp32_ms:
        return (
            f"the {mode} .pt2 runs in {q_ms:.3g} ms on CPU against {fp32_ms:.3g} ms for the fp32 one "
            f"(more than max_latency_ratio {max_latency_ratio:g} times)"
        )
    return None


def compress_and_export(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    example_inputs: tuple[Any, ...],
    dirpath: str | Path,
    *,
    higher_is_better: bool,
    max_metric_drop: float = 0.01,
    prune: PruneMode | None = None,
    prune_amounts: Sequence[float] = (0.75, 0.5, 0.25),
    quantize_mode: QuantizeMode | None = "int8_weight_only",
    formats: Sequence[Format] = ("pt2",),
    finetune: Callable[[nn.Module], None] | None = None,
    verify_inputs: Sequence[tuple[Any, ...]] = (),
    tolerance: float = 1e-4,
    onnx_int8_tolerance: float = 0.05,
    min_size_ratio: float = 1.5,
    max_latency_ratio: float | None = 1.1,
    filename: str = "model",
    on_event: Callable[[str, str, dict[str, Any]], None] | None = None,
    evaluate_held_out: Callable[[nn.Module], float] | None = None,
) -> CompressionResult:
    """Prune and/or quantise ``model`` as strongly as ``max_metric_drop`` allows, export it, and prove the artifacts.

    1. ``evaluate(model)`` gives the baseline metric.
    2. Pruning (``prune``): each amount of ``prune_amounts`` is tried from the strongest down; ``finetune(candidate)``
       runs after pruning if given (exact zeros of unstructured pruning are kept); the first candidate whose metric
       is within ``max_metric_drop`` of the baseline is kept, each rejected one is a ``budget_backoff``.
    3. Quantisation (``quantize_mode``, torchao) on top, kept only within the budget.
    4. Export: ``<filename>.pt2`` always (``torch.export``), ``<filename>.onnx`` when asked (exported from the fp32
       pruned model, then int8-quantised by onnxruntime if quantisation was kept). A quantised ``.pt2`` is kept only
       when it is worth deploying: at least ``min_size_ratio`` times smaller than the fp32 ``.pt2`` of the same
       (pruned) model, and (``max_latency_ratio``) no slower on CPU than it beyond that ratio (both files loaded and
       timed the same way); otherwise the fp32 ``.pt2`` is exported, with a ``budget_backoff`` saying why.
    5. Verification, format by format: each file is loaded back through a fresh load path and its outputs compared
       with the in-memory model on ``verify_inputs`` (default: ``example_inputs``): relative error at most
       ``tolerance`` (``onnx_int8_tolerance`` for onnxruntime's int8, whose kernels differ from torchao's). A file
       that fails is renamed ``<name>.rejected`` (it cannot be mistaken for a verified one), its reason goes to
       :attr:`CompressionResult.rejected` and a ``verify_failed`` event; the other formats are judged on their own.
       When no format verified, ``GuardRuntimeError`` is raised, with the result (every stage measured) attached as
       its ``result`` attribute.
    6. The metric of each artifact itself: the loaded file stands in for the model's ``forward`` while ``evaluate``
       (and ``evaluate_held_out``, data that chose nothing) runs, so an ONNX int8 file's accuracy is its own. A
       model whose evaluation never calls ``forward`` gets no artifact metric (``None``).

    ``on_event(kind, message, data)`` hears ``compressed``, ``budget_backoff``, ``exported`` and ``verify_failed``.

    Raises:
        GuardConfigError: a bad argument (named).
        GuardRuntimeError: no exported file reproduces the model's outputs.
    """
    check_compress_args(prune, prune_amounts, quantize_mode, formats, max_metric_drop)
    _check_ratios(min_size_ratio, max_latency_ratio, onnx_int8_tolerance)
    dirpath = Path(dirpath)
    search = _Search(model, evaluate, example_inputs, higher_is_better, max_metric_drop, on_event, evaluate_held_out)
    current, amount_kept = search.prune(prune, prune_amounts, finetune) if prune is not None else (model, 0.0)
    pruned_fp32, quantized = current, None
    if quantize_mode is not None and (candidate := search.quantize(current, quantize_mode)) is not None:
        current, quantized = candidate, quantize_mode
    kept = [st.metric for st in search.stages if st.decision == "accepted" and st.metric is not None]
    final_metric = float(kept[-1] if kept else search.baseline)
    result = CompressionResult(current, search.baseline, final_metric, stages=search.stages, prune_amount=amount_kept)
    result.quantized, result.baseline_held_out = quantized, search.stages[0].held_out_metric
    pt2 = export_pt2(current, example_inputs, dirpath / f"{filename}.pt2")
    if quantized and current is not pruned_fp32:
        pt2 = search.keep_quantised_if_worth_it(result, pt2, pruned_fp32, min_size_ratio, max_latency_ratio)
    exports: list[tuple[Path, nn.Module, float, str | None]] = [(pt2, result.model, tolerance, result.quantized)]
    if "onnx" in formats:
        onnx = dirpath / f"{filename}.onnx"
        exports.append(_onnx_export(pruned_fp32, example_inputs, onnx, quantized, tolerance, onnx_int8_tolerance))
    inputs = list(verify_inputs) or [example_inputs]
    for path, reference, tol, how in exports:
        search.verify(result, path, reference, tol, how, inputs, pruned_fp32, evaluate_held_out)
    if not result.artifacts:
        err = GuardRuntimeError("CompressExport: " + "; ".join(result.rejected.values()))
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result


def _check_ratios(min_size_ratio: float, max_latency_ratio: float | None, onnx_int8_tolerance: float) -> None:
    check_number("min_size_ratio", min_size_ratio, low=1.0, strict=False)
    check_number("max_latency_ratio", max_latency_ratio, low=0.0, optional=True)
    check_number("onnx_int8_tolerance", onnx_int8_tolerance)


def _onnx_export(
    model: nn.Module, example_inputs: tuple[Any, ...], path: Path, quantized: str | None, tol: float, int8_tol: float
) -> tuple[Path, nn.Module, float, str | None]:
    """Export the fp32 (pruned) model to ONNX: ``(path, reference, tolerance, scheme)`` for its verification.

    onnxruntime quantises the fp32 ONNX graph itself when int8 passed the budget (even if the torchao ``.pt2`` was not
    kept for its size): the ONNX file's own metric says what that costs.
    """
    onnx_path = export_onnx(model, example_inputs, path, quantize_int8=bool(quantized))
    return onnx_path, model, int8_tol if quantized else tol, ONNX_INT8_SCHEME if quantized else None


class _Search:
    """The stages of one compression: the baseline, each candidate measured against the budget, the events."""

    def __init__(
        self,
        model: nn.Module,
        evaluate: Callable[[nn.Module], float],
        example_inputs: tuple[Any, ...],
        higher_is_better: bool,
        max_metric_drop: float,
        on_event: Callable[[str, str, dict[str, Any]], None] | None,
        evaluate_held_out: Callable[[nn.Module], float] | None = None,
    ) -> None:
        self.model, self.evaluate, self.example_inputs = model, evaluate, example_inputs
        self.max_metric_drop = max_metric_drop
        self.sign = 1.0 if higher_is_better else -1.0
        self.notify = on_event or (lambda kind, message, data: None)
        self.cpu_inputs = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in example_inputs)
        self.baseline = float(evaluate(model))
        self.stages = [self.row("baseline", "fp32", "measured", model, self.baseline)]
        if evaluate_held_out is not None:  # before the baseline's export, as the metric above
            self.stages[0].held_out_metric = float(evaluate_held_out(model))
        with tempfile.TemporaryDirectory() as tmp:  # the uncompressed artifact's size, for comparison
            self.stages[0].file_bytes = export_pt2(model, example_inputs, Path(tmp) / "fp32.pt2").stat().st_size

    def drop(self, metric: float) -> float:
        """How much worse than the baseline ``metric`` is (positive: worse)."""
        return self.sign * (self.baseline - metric)

    def row(self, stage: str, setting: str, decision: str, m: nn.Module, metric: float | None) -> Stage:
        on_cpu = all(p.device.type == "cpu" for p in m.parameters())
        return Stage(
            stage,
            setting,
            decision,
            metric=metric,
            size_bytes=state_bytes(m),
            params=param_count(m),
            sparsity=round(sparsity(m), 4),
            latency_ms=round(cpu_latency_ms(m, self.cpu_inputs), 4) if on_cpu else None,
        )

    def prune(
        self, mode: PruneMode, amounts: Sequence[float], finetune: Callable[[nn.Module], None] | None
    ) -> tuple[nn.Module, float]:
        """The strongest pruning amount within the budget (tried strongest first): the model and the amount."""
        for amount in sorted(amounts, reverse=True):
            setting = f"{mode} {amount:g}"
            try:
                candidate = self._pruned(mode, amount, finetune)
                metric = float(self.evaluate(candidate))
            except Exception as exc:  # this amount breaks the model (a slice of a pruned width): try the next one
                reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                self.stages.append(Stage("prune", setting, "failed"))
                self.notify(
                    "budget_backoff",
                    f"pruning {setting} failed ({reason}); backing off",
                    {"stage": "prune", "setting": setting, "error": reason},
                )
                continue
            if self._judge("prune", setting, candidate, metric, f"pruning {setting}", "backing off"):
                return candidate, float(amount)
        return self.model, 0.0

    def _pruned(self, mode: PruneMode, amount: float, finetune: Callable[[nn.Module], None] | None) -> nn.Module:
        if mode == "structured":
            candidate = prune_structured(self.model, amount, self.example_inputs)
        else:
            candidate = prune_unstructured(self.model, amount)
        if finetune is not None:
            release = _grad_masks(candidate) if mode == "unstructured" else (lambda: None)
            try:
                finetune(candidate)
            finally:
                release()
        return candidate

    def quantize(self, model: nn.Module, mode: QuantizeMode) -> nn.Module | None:
        """The quantised model if it is within the budget, else None."""
        candidate = quantize(model, mode)
        metric = float(self.evaluate(candidate))
        layers = quantized_layers(candidate)
        ok = self._judge("quantize", mode, candidate, metric, mode, "not quantising", label=f"quantised ({mode})")
        self.stages[-1].layers = layers
        return candidate if ok else None

    def _judge(
        self, stage: str, setting: str, candidate: nn.Module, metric: float, what: str, backoff: str, label: str = ""
    ) -> bool:
        """Record a measured candidate as accepted (within the budget) or rejected, with its event."""
        data = {"stage": stage, "setting": setting, "metric": metric, "baseline": self.baseline}
        if self.drop(metric) <= self.max_metric_drop:
            self.stages.append(self.row(stage, setting, "accepted", candidate, metric))
            self.notify(
                "compressed", f"{label or f'pruned ({setting})'}: metric {metric:.4g} vs {self.baseline:.4g}", data
            )
            return True
        self.stages.append(self.row(stage, setting, "rejected", candidate, metric))
        cost = f"{what} costs {self.drop(metric):.4g} > max_metric_drop {self.max_metric_drop:g}; {backoff}"
        self.notify("budget_backoff", cost, data)
        return False

    def keep_quantised_if_worth_it(
        self,
        result: CompressionResult,
        pt2: Path,
        pruned_fp32: nn.Module,
        min_size_ratio: float,
        max_latency_ratio: float | None,
    ) -> Path:
        """Export the fp32 (pruned) model instead when the quantised ``.pt2`` is not smaller or faster enough."""
        quantized = result.quantized
        assert quantized is not None
        why = _quantisation_not_worth_it(
            pt2, pruned_fp32, self.example_inputs, self.cpu_inputs, quantized, min_size_ratio, max_latency_ratio
        )
        if why is None:
            return pt2
        self.notify(
            "budget_backoff", f"{why}; exporting without quantisation", {"stage": "quantize", "setting": quantized}
        )
        self.stages.append(Stage("quantize", quantized, "rejected", file_bytes=pt2.stat().st_size))
        result.model, result.quantized = pruned_fp32, None
        kept = [
            st.metric
            for st in self.stages
            if st.stage == "prune" and st.decision == "accepted" and st.metric is not None
        ]
        result.final_metric = float(kept[-1]) if kept else self.baseline
        return export_pt2(pruned_fp32, self.example_inputs, pt2)

    def verify(
        self,
        result: CompressionResult,
        path: Path,
        reference: nn.Module,
        tol: float,
        how: str | None,
        inputs: list[tuple[Any, ...]],
        host: nn.Module,
        evaluate_held_out: Callable[[nn.Module], float] | None,
    ) -> None:
        """Load one exported file back, compare it with ``reference``, and measure the file's own metric.

        A file that fails is renamed ``<name>.rejected``; one that passes is an artifact of ``result``.
        """
        stage = _verify_artifact(path, reference, tol, how, inputs, self.cpu_inputs)
        self.stages.append(stage)
        error = stage.max_error if stage.max_error is not None else math.inf
        data = {"path": str(path), "size_bytes": stage.file_bytes, "max_error": error, "tolerance": tol}
        fmt = path.suffix.lstrip(".")
        if stage.decision != "exported":
            rejected = path.with_name(path.name + ".rejected")
            path.replace(rejected)  # never left under the name of a verified artifact
            stage.path = str(rejected)
            result.rejected[fmt] = (
                f"the exported {path.name} does not reproduce the compressed model's outputs "
                f"(max relative error {error:.3g} > tolerance {tol:g}); renamed {rejected.name}"
            )
            self.notify("verify_failed", result.rejected[fmt], {**data, "path": str(rejected)})
            return
        artifact = load_artifact(path, output_spec(reference, inputs[0]))
        # hosted by the fp32 model: only its forward is used, replaced by the file (moving a torchao model between
        # devices in the evaluation can fail on its tensor subclasses)
        stage.metric = artifact_metric(self.evaluate, host, artifact)
        if evaluate_held_out is not None:
            stage.held_out_metric = artifact_metric(evaluate_held_out, host, artifact)
        result.artifacts[fmt] = str(path)
        note = ""
        if stage.metric is None:
            note = (
                "; no metric of the file itself: the evaluation does not go through forward alone (a validation_step "
                "that calls submodules directly measures the in-memory model)"
            )
        self.notify(
            "exported", f"{path.name}: {stage.file_bytes} bytes, verified (max relative error {error:.2g}){note}", data
        )
