"""The budget search without a Trainer: arguments, pruning and quantisation within the budget, export, verification."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_guard import GuardConfigError, GuardRuntimeError
from lightning_guard import compress as C
from lightning_guard.compress import search as S
from lightning_guard.compress import verify as V
from tests.compress.nets import mlp
from tests.helpers import digits


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prune": "random"}, "`prune` must be one of (None, 'unstructured', 'structured'), got 'random'"),
        ({"prune_amounts": []}, "`prune_amounts` must be a non-empty list of numbers in (0, 1), got []"),
        (
            {"prune_amounts": (0.5, 1.2)},
            "`prune_amounts` must be a non-empty list of numbers in (0, 1), got (0.5, 1.2)",
        ),
        ({"formats": ("onnx",)}, "`formats` must include 'pt2' (always exported), got ('onnx',)"),
        (
            {"formats": ("pt2", "tflite")},
            "`formats` must be a non-empty list of 'pt2' and/or 'onnx', got ('pt2', 'tflite')",
        ),
        ({"max_metric_drop": -1}, "`max_metric_drop` must be a number >= 0, got -1"),
    ],
)
def test_search_arguments_are_named(tmp_path, kwargs, message):
    args = {"prune": None, "prune_amounts": (0.5,), "quantize_mode": None, "formats": ("pt2",), "max_metric_drop": 0.01}
    args.update(kwargs)
    with pytest.raises(GuardConfigError) as err:
        C.check_compress_args(**args)
    assert str(err.value) == message


def test_budget_search_takes_the_strongest_pruning_within_the_budget(tmp_path, trained):
    model, accuracy, x = trained
    events = []
    result = C.compress_and_export(
        model,
        accuracy,
        (x[:16],),
        tmp_path,
        higher_is_better=True,
        max_metric_drop=0.01,
        prune="unstructured",
        prune_amounts=(0.99, 0.9, 0.3),
        quantize_mode="int8_weight_only",
        verify_inputs=[(x[:64],), (x[64:128],)],
        on_event=lambda kind, message, data: events.append((kind, data.get("setting"))),
    )
    assert result.baseline_metric - result.final_metric <= 0.01
    decisions = [(s.stage, s.setting, s.decision) for s in result.stages]
    assert decisions[0] == ("baseline", "fp32", "measured")
    assert ("prune", "unstructured 0.99", "rejected") in decisions  # 99% of the weights gone is too much
    accepted = [s for s in result.stages if s.stage == "prune" and s.decision == "accepted"]
    assert len(accepted) == 1
    assert result.prune_amount == float(accepted[0].setting.split()[-1])
    assert ("budget_backoff", "unstructured 0.99") in events
    assert ("exported", None) in events
    assert (tmp_path / "model.pt2").exists()
    assert result.artifacts == {"pt2": str(tmp_path / "model.pt2")}
    reloaded = C.load_artifact(tmp_path / "model.pt2")
    assert C.max_output_error(reloaded, result.model, [(x,)]) <= 1e-4


def test_quantisation_backs_off_when_it_breaks_the_budget(tmp_path, trained):
    model, _, x = trained
    events = []
    # a metric so strict that any change of the outputs breaks it: the quantised model must be refused
    result = C.compress_and_export(
        model,
        lambda m: -C.max_output_error(m, model, [(x,)]),
        (x[:16],),
        tmp_path,
        higher_is_better=True,
        max_metric_drop=0.0,
        quantize_mode="int8_weight_only",
        on_event=lambda kind, message, data: events.append(kind),
    )
    assert result.quantized is None
    assert [s.decision for s in result.stages if s.stage == "quantize"] == ["rejected"]
    assert events == ["budget_backoff", "exported"]


def test_an_artifact_that_does_not_reproduce_the_model_fails_loudly(tmp_path, trained, monkeypatch):
    model, accuracy, x = trained
    real = C.load_artifact
    monkeypatch.setattr(V, "load_artifact", lambda path, spec=None: lambda *a: real(path, spec)(*a) + 1.0)
    events = []
    with pytest.raises(GuardRuntimeError) as err:
        C.compress_and_export(
            model,
            accuracy,
            (x[:16],),
            tmp_path,
            higher_is_better=True,
            quantize_mode=None,
            on_event=lambda kind, message, data: events.append(kind),
        )
    assert str(err.value).startswith("CompressExport: the exported model.pt2 does not reproduce the compressed model's")
    assert events == ["verify_failed"]
    assert not (tmp_path / "model.pt2").exists()  # a rejected file cannot pass for a verified one
    assert (tmp_path / "model.pt2.rejected").exists()  # left for inspection under another name
    assert [s.decision for s in err.value.result.stages if s.stage == "export"] == ["verify_failed"]


def test_int8_is_not_exported_when_its_pt2_is_not_smaller(tmp_path):
    """On a tiny model torchao's graph overhead makes the int8 .pt2 larger than the fp32 one: export fp32 instead."""
    model = nn.Sequential(nn.Linear(64, 10)).eval()
    x = torch.randn(8, 64)
    events = []
    result = C.compress_and_export(
        model,
        lambda m: 1.0,
        (x,),
        tmp_path,
        higher_is_better=True,
        quantize_mode="int8_weight_only",
        on_event=lambda kind, message, data: events.append((kind, data.get("stage"))),
    )
    assert result.quantized is None
    assert result.model is model or C.state_bytes(result.model) == C.state_bytes(model)
    assert events == [("compressed", "quantize"), ("budget_backoff", "quantize"), ("exported", None)]
    assert (tmp_path / "model.pt2").stat().st_size < result.stages[0].file_bytes * 1.01


@pytest.mark.parametrize("quantize", [None, "int8_weight_only"])
def test_the_report_says_truthfully_how_each_artifact_loads(tmp_path, monkeypatch, quantize):
    """The docs said every artifact loads "without pickle"; a torchao int8 .pt2 loads with torch.load(
    weights_only=False). The report states it, and the statement matches what loading does."""
    model = mlp(256).eval()
    x = torch.randn(8, 64)
    result = C.compress_and_export(
        model,
        evaluate=lambda m: 0.0,
        example_inputs=(x,),
        dirpath=tmp_path,
        higher_is_better=True,
        max_metric_drop=1.0,
        quantize_mode=quantize,
        formats=("pt2", "onnx"),
        max_latency_ratio=None,  # torchao's int8 .pt2 is slower than fp32 on CPU: kept here to exercise its loading
    )
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    C.load_artifact(result.artifacts["pt2"])(x)
    runs_pickle = False in seen
    assert result.quantized == quantize  # the int8 .pt2 was kept: both load paths are exercised
    assert runs_pickle == bool(result.quantized)
    assert ("runs pickle" in result.loading["pt2"]) == runs_pickle
    assert result.to_dict()["loading"]["onnx"] == "onnxruntime.InferenceSession: no pickle, no torch needed"


def test_each_artifact_is_measured_through_the_file_itself(tmp_path, trained):
    """Main: the ONNX int8 file's accuracy was never measured (report metric None), and when the torchao int8 .pt2
    was not kept the result said quantized=None while the ONNX file was int8. Now each export row carries the metric
    of the loaded file standing in for forward, on the choosing data and on held-out data, and says how it is
    quantised."""
    model, accuracy, x_te = trained
    x, y = digits()
    held_x, held_y = x[:300], y[:300]  # held-out data of this test: different from `accuracy`'s

    def held_out(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(held_x).argmax(-1) == held_y).float().mean())

    result = C.compress_and_export(
        copy.deepcopy(model),
        accuracy,
        (x_te[:8],),
        tmp_path,
        higher_is_better=True,
        max_metric_drop=0.02,
        quantize_mode="int8_weight_only",
        formats=("pt2", "onnx"),
        evaluate_held_out=held_out,
    )
    rows = {s.setting: s for s in result.stages if s.stage == "export"}
    onnx_fn = C.load_artifact(tmp_path / "model.onnx")
    by_hand = accuracy(_Through(onnx_fn))
    assert rows["model.onnx"].metric == pytest.approx(by_hand)
    assert rows["model.onnx"].held_out_metric == pytest.approx(held_out(_Through(onnx_fn)))
    assert rows["model.onnx"].quantized == C.ONNX_INT8_SCHEME
    assert rows["model.pt2"].quantized == result.quantized
    assert result.baseline_held_out == pytest.approx(held_out(model))
    assert result.stages[0].held_out_metric == result.baseline_held_out


class _Through(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_a_pruning_amount_that_breaks_the_model_is_a_failed_stage_and_the_search_goes_on(tmp_path, monkeypatch):
    """Review: at prune="auto" the dry run passed, but a stronger amount crashed the search (a slice of the pruned
    width: shapes 32x32 and 31x10) and the run lost its quantised export too. Now that amount is a failed stage, a
    budget_backoff event says why, and the search goes on to the next amount."""
    real = C.prune_structured

    def breaks_at_half(model, amount, example):
        if amount == 0.5:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (32x32 and 31x10)")
        return real(model, amount, example)

    monkeypatch.setattr(S, "prune_structured", breaks_at_half)
    events = []
    result = C.compress_and_export(
        mlp(64).eval(),
        lambda m: 1.0,
        (torch.randn(4, 64),),
        tmp_path,
        higher_is_better=True,
        prune="structured",
        prune_amounts=(0.5, 0.25),
        quantize_mode=None,
        on_event=lambda kind, message, data: events.append((kind, data.get("setting"), data.get("error"))),
    )
    assert [(s.setting, s.decision) for s in result.stages if s.stage == "prune"] == [
        ("structured 0.5", "failed"),
        ("structured 0.25", "accepted"),
    ]
    assert (
        "budget_backoff",
        "structured 0.5",
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied (32x32 and 31x10)",
    ) in events
    assert result.artifacts["pt2"]


def test_a_quantisation_that_is_slower_or_barely_smaller_is_not_kept(tmp_path, trained):
    """Main: int8 was "accepted" on the char LM although its .pt2 shrank only 1.16x and ran slower on CPU."""
    model, accuracy, x = trained
    events: list[tuple[str, str]] = []

    def run(out: Path, **kwargs: Any) -> C.CompressionResult:
        return C.compress_and_export(
            model,
            accuracy,
            (x[:16],),
            out,
            higher_is_better=True,
            max_metric_drop=1.0,
            quantize_mode="int8_weight_only",
            on_event=lambda kind, message, data: events.append((kind, message)),
            **kwargs,
        )

    barely = run(tmp_path / "size", min_size_ratio=50.0, max_latency_ratio=None)
    assert barely.quantized is None
    assert any(k == "budget_backoff" and "below min_size_ratio 50" in m for k, m in events)
    events.clear()
    slower = run(tmp_path / "latency", min_size_ratio=1.0, max_latency_ratio=1e-6)
    assert slower.quantized is None
    assert any(k == "budget_backoff" and "more than max_latency_ratio 1e-06 times" in m for k, m in events)
    kept = run(tmp_path / "kept", min_size_ratio=1.0, max_latency_ratio=None)
    assert kept.quantized == "int8_weight_only"
    with pytest.raises(GuardConfigError, match=r"`min_size_ratio` must be a number >= 1.0, got 0.5"):
        run(tmp_path / "bad", min_size_ratio=0.5)
