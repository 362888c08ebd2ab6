"""What a compression found: one :class:`Stage` per row of the report, and the :class:`CompressionResult`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

__all__ = ["CompressionResult", "Stage"]


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
