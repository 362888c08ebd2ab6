"""Quantisation with torchao, and which layers it quantised."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

from lightning_guard.compress._extras import require
from lightning_guard.errors import GuardConfigError

__all__ = ["QUANTIZE_MODES", "QuantizeMode", "quantize", "quantized_layers"]

QuantizeMode = Literal["int8_weight_only", "int8_dynamic", "int4_weight_only"]
#: the torchao configurations behind each ``quantize`` mode
QUANTIZE_MODES = ("int8_weight_only", "int8_dynamic", "int4_weight_only")


def quantize(model: nn.Module, mode: QuantizeMode) -> nn.Module:
    """A copy of ``model`` whose ``Linear`` layers are quantised with torchao (``quantize_``).

    ``int8_weight_only`` stores int8 weights with per-channel scales; ``int8_dynamic`` also quantises activations
    on the fly; ``int4_weight_only`` needs a CUDA device with int4 kernels.

    Raises:
        GuardConfigError: an unknown mode, torchao missing, or int4 without CUDA.
    """
    if mode not in QUANTIZE_MODES:
        raise GuardConfigError(f"`quantize` must be one of {QUANTIZE_MODES} or None, got {mode!r}")
    require("torchao")
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
