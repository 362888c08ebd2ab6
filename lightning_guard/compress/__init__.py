"""Pruning, quantisation, export and artifact verification, usable without a Trainer.

Everything here works on a plain ``torch.nn.Module`` (a ``LightningModule`` is one) and returns a new module or
writes a file; nothing mutates the model passed in unless the name ends with ``_``. The optional libraries come from
the ``export`` extra (``pip install lightning-guard[export]``): torchao (quantisation; ``torch.ao.quantization`` is
deprecated), torch-pruning (structured pruning that really removes neurons/channels), onnx + onnxscript +
onnxruntime (ONNX export, ONNX int8 quantisation, and loading ONNX artifacts back for verification).

The modules, one seam each: :mod:`~lightning_guard.compress.prune`, :mod:`~lightning_guard.compress.quantise`,
:mod:`~lightning_guard.compress.export`, :mod:`~lightning_guard.compress.verify` (load an artifact back, compare,
measure its own metric), :mod:`~lightning_guard.compress.measure` (size, sparsity, latency),
:mod:`~lightning_guard.compress.budget` (the search's judgements, pure) and :mod:`~lightning_guard.compress.search`
(:func:`compress_and_export`). ``CompressExport`` runs the search at fit end.
"""

from lightning_guard.compress.export import ONNX_INT8_SCHEME, Format, export_onnx, export_program, export_pt2
from lightning_guard.compress.measure import cpu_latency_ms, onnx_ops, param_count, sparsity, state_bytes
from lightning_guard.compress.prune import PruneMode, prunable_layers, prune_structured, prune_unstructured
from lightning_guard.compress.quantise import QUANTIZE_MODES, QuantizeMode, quantize, quantized_layers
from lightning_guard.compress.result import CompressionResult, Stage
from lightning_guard.compress.search import check_compress_args, compress_and_export
from lightning_guard.compress.verify import artifact_metric, load_artifact, max_output_error, output_spec

__all__ = [
    "ONNX_INT8_SCHEME",
    "QUANTIZE_MODES",
    "CompressionResult",
    "Format",
    "PruneMode",
    "QuantizeMode",
    "Stage",
    "artifact_metric",
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
