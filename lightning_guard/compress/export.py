"""Export: ``torch.export`` programs and ``.pt2`` files, ONNX files (optionally int8-quantised by onnxruntime)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_guard._compat import tree_map
from lightning_guard.compress._extras import require

__all__ = ["ONNX_INT8_SCHEME", "Format", "export_onnx", "export_program", "export_pt2"]

Format = Literal["pt2", "onnx"]


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
    require("onnx")
    require("onnxscript")
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
        require("onnxruntime")
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(target), str(path), weight_type=QuantType.QUInt8)
        target.unlink()
    return path
