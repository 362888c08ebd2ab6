"""CompressExport on the digits MLP (64-512-512-10) vs Lightning's ModelPruning, CPU.

scikit-learn's digits split 60/20/20 (train / validation, which the budget uses / test, reported). One model is trained
with Lightning (AdamW 1e-3, batch 64, 40 epochs); each configuration compresses those same weights with
``compress_and_export`` (what ``CompressExport`` runs at fit end), budget ``max_metric_drop=0.01`` on validation
accuracy. Lightning's ``ModelPruning(l1_unstructured, amount=0.5)`` prunes during a separate training run from the
same seed (its default: every epoch), then the result is exported the same way. Reported per configuration: the
exported ``.pt2`` (or ``.onnx``) size and its ratio to the fp32 ``.pt2``, test accuracy *of the reloaded
artifact*, and median CPU latency of the artifact (batch 1 and batch 256, 2 threads). The int8 rows are run with
``max_latency_ratio=None`` so that torchao's int8 ``.pt2`` is measured: at ``CompressExport``'s defaults an int8
``.pt2`` slower on CPU than the fp32 one is not kept (compare the latency columns): the fp32 (pruned) ``.pt2`` ships.
``python -m tests.benchmarks.compress_benchmark`` or ``make bench``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import compress as C
from tests.benchmarks.report import quiet_trainer, save
from tests.helpers import digits

CONFIGS: dict[str, dict[str, Any]] = {
    "fp32": {"prune": None, "quantize_mode": None},
    "int8_weight_only": {"prune": None, "quantize_mode": "int8_weight_only"},
    "unstructured_0.5+int8": {"prune": "unstructured", "prune_amounts": (0.5,), "quantize_mode": "int8_weight_only"},
    "structured_search": {
        "prune": "structured",
        "prune_amounts": (0.9, 0.75, 0.5, 0.25),
        "quantize_mode": None,
        "finetune": True,
    },
    "structured_search+int8": {
        "prune": "structured",
        "prune_amounts": (0.9, 0.75, 0.5, 0.25),
        "quantize_mode": "int8_weight_only",
        "finetune": True,
        "formats": ("pt2", "onnx"),
    },
}


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    x, y = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n = len(x)
    cut = [0, int(0.6 * n), int(0.8 * n), n]
    bounds = zip(("train", "val", "test"), cut[:-1], cut[1:], strict=True)
    return {k: (x[perm[a:b]], y[perm[a:b]]) for k, a, b in bounds}


def _fit(
    model: pl.LightningModule, train: tuple[torch.Tensor, torch.Tensor], epochs: int, callbacks: list[Any]
) -> None:
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(*train), batch_size=64, shuffle=True)
    quiet_trainer(callbacks, max_epochs=epochs).fit(model, loader)


def _accuracy(fn: Any, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((fn(data[0]).argmax(-1) == data[1]).float().mean())


def measure(epochs: int = 40) -> dict[str, Any]:
    torch.set_num_threads(2)
    splits = _splits()
    torch.manual_seed(0)
    trained = MLP()
    _fit(trained, splits["train"], epochs, [])
    trained.eval()
    val, test = splits["val"], splits["test"]
    example = (val[0][:16],)

    def finetune(model: nn.Module) -> None:
        _fit(model, splits["train"], 3, [])  # type: ignore[arg-type]
        model.eval()

    out = Path(tempfile.mkdtemp())
    rows: dict[str, Any] = {}
    for name, cfg in CONFIGS.items():
        cfg = dict(cfg)
        use_finetune = cfg.pop("finetune", False)
        result = C.compress_and_export(
            trained,
            lambda m: _accuracy(m, val),
            example,
            out / name,
            higher_is_better=True,
            max_metric_drop=0.01,
            finetune=finetune if use_finetune else None,
            verify_inputs=[(test[0],)],
            max_latency_ratio=None,  # measure int8 as such (see the module's docstring)
            **cfg,
        )
        rows[name] = _row(Path(result.artifacts["pt2"]), test, result)
        if "onnx" in result.artifacts:  # the same pruned model through ONNX, int8-quantised by onnxruntime
            rows[f"{name} (ONNX, onnxruntime int8)"] = _row(Path(result.artifacts["onnx"]), test, result)

    torch.manual_seed(0)
    lightning_pruned = MLP()
    _fit(lightning_pruned, splits["train"], epochs, [ModelPruning("l1_unstructured", amount=0.5, verbose=0)])
    lightning_pruned.eval()
    path = C.export_pt2(lightning_pruned, example, out / "lightning_model_pruning" / "model.pt2")
    rows["lightning_ModelPruning_0.5"] = _row(path, test, None, model=lightning_pruned)
    base = rows["fp32"]["file_bytes"]
    for r in rows.values():
        r["smaller_than_fp32"] = round(base / r["file_bytes"], 2)
    return {"epochs": epochs, "budget": 0.01, "rows": rows}


def _row(path: Path, test: tuple[torch.Tensor, torch.Tensor], result: Any, model: nn.Module | None = None) -> dict:
    artifact = C.load_artifact(path)
    chosen = result.model if result is not None else model
    row = {
        "file_bytes": path.stat().st_size,
        "params": C.param_count(chosen),
        "sparsity": round(_sparsity(result, chosen), 4),
        "test_acc_artifact": round(_accuracy(artifact, test), 4),
        "latency_ms_b1": round(C.cpu_latency_ms(artifact, (test[0][:1],), repeats=200, warmup=20), 4),
        "latency_ms_b256": round(C.cpu_latency_ms(artifact, (test[0][:256],), repeats=100, warmup=10), 4),
    }
    if result is not None:
        row["val_baseline"] = round(result.baseline_metric, 4)
        row["val_final"] = round(result.final_metric, 4)
        row["decisions"] = [f"{s.stage}:{s.setting}:{s.decision}" for s in result.stages if s.stage != "export"]
    return row


def _sparsity(result: Any, model: nn.Module) -> float:
    """The pruned model's sparsity (a quantised model's int8 weights are not counted by ``C.sparsity``)."""
    if result is None:
        return C.sparsity(model)
    kept = [s.sparsity for s in result.stages if s.decision in ("accepted", "measured") and s.stage != "quantize"]
    return float(kept[-1] or 0.0)


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"CPU (2 threads), digits MLP 64-512-512-10 trained {result['epochs']} epochs; budget: validation accuracy "
        f"may drop by {result['budget']}; accuracy below is on the held-out test split, computed by the reloaded "
        "artifact",
        "",
        "| configuration | artifact size (kB) | smaller than fp32 | params | sparsity | test acc | CPU ms (b=1) | "
        "CPU ms (b=256) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {r['file_bytes'] / 1000:.1f} | {r['smaller_than_fp32']:.2f}x | {r['params']} | "
            f"{100 * r['sparsity']:.0f}% | {100 * r['test_acc_artifact']:.1f}% | {r['latency_ms_b1']:.3f} | "
            f"{r['latency_ms_b256']:.3f} |"
        )
    lines += ["", "Decisions of the budget search:", ""]
    for name, r in result["rows"].items():
        if "decisions" in r:
            lines.append(f"* {name}: " + ", ".join(r["decisions"]))
    return "\n".join(lines) + "\n"


def main(out: str = "docs/benchmarks") -> dict[str, Any]:
    result = measure()
    return save(out, "compress", result, to_markdown(result))


if __name__ == "__main__":
    main()
