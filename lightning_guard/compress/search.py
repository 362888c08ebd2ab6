"""The budget search: each candidate measured against the baseline, the artifacts exported and verified.

:func:`compress_and_export` is the whole pipeline; :class:`_Search` holds one run's stages and events, and acts on
the pure judgements of :mod:`lightning_guard.compress.budget`.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_guard._checks import check_number
from lightning_guard.compress.budget import (
    kept_metric,
    latency_not_worth_it,
    metric_drop,
    size_not_worth_it,
    within_budget,
)
from lightning_guard.compress.export import ONNX_INT8_SCHEME, Format, export_onnx, export_pt2
from lightning_guard.compress.measure import cpu_latency_ms, param_count, sparsity, state_bytes
from lightning_guard.compress.prune import PruneMode, grad_masks, prune_structured, prune_unstructured
from lightning_guard.compress.quantise import QUANTIZE_MODES, QuantizeMode, quantize, quantized_layers
from lightning_guard.compress.result import CompressionResult, Stage
from lightning_guard.compress.verify import artifact_metric, load_artifact, output_spec, verify_artifact
from lightning_guard.errors import GuardConfigError, GuardRuntimeError

__all__ = ["check_compress_args", "compress_and_export"]


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
        why = size_not_worth_it(mode, fp32.stat().st_size, pt2.stat().st_size, min_size_ratio)
        if why is not None or max_latency_ratio is None:
            return why
        fp32_ms = cpu_latency_ms(load_artifact(fp32), cpu_inputs)
    q_ms = cpu_latency_ms(load_artifact(pt2), cpu_inputs)
    return latency_not_worth_it(mode, fp32_ms, q_ms, max_latency_ratio)


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
    final_metric = kept_metric(search.stages, search.baseline)
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
        self.higher_is_better = higher_is_better
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
        return metric_drop(self.baseline, metric, higher_is_better=self.higher_is_better)

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
            release = grad_masks(candidate) if mode == "unstructured" else (lambda: None)
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
        if within_budget(self.baseline, metric, self.max_metric_drop, higher_is_better=self.higher_is_better):
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
        result.final_metric = kept_metric(self.stages, self.baseline, "prune")
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
        stage = verify_artifact(path, reference, tol, how, inputs, self.cpu_inputs)
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
