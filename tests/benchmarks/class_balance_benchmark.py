"""Balanced accuracy on long-tailed digits (imbalance ratio 100) for plain CE and each ClassBalance method.

scikit-learn's digits, split 60/20/20 (stratified) into train/val/test; the train split is made long-tailed (class c
keeps a fraction 100**(-c/9) of its samples, so class 0 keeps all and class 9 one in a hundred); validation and test
stay balanced. MLP 64-128-10, AdamW 1e-3, batch 32, 100 epochs, CPU; balanced accuracy (mean per-class recall) on the
test split, mean over seeds. ``python -m tests.benchmarks.class_balance_benchmark`` or ``make bench``.
"""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_guard import ClassBalance, GuardMixin
from lightning_guard.demo import long_tailed_digits
from tests.benchmarks.report import save

METHODS: dict[str, dict[str, Any] | None] = {
    "plain_ce": None,
    "inverse": {"method": "inverse"},
    "sqrt_inverse": {"method": "sqrt_inverse"},
    "effective_number": {"method": "effective_number", "beta": 0.99},
    "focal_inverse": {"method": "inverse", "loss": "focal", "gamma": 2.0},
    "logit_adjustment": {"method": "logit_adjustment", "tau": 1.0},
}


class MLP(GuardMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.balanced_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.track_classes(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def balanced_accuracy(model: MLP, loader: DataLoader) -> float:
    from torchmetrics.classification import MulticlassAccuracy

    metric = MulticlassAccuracy(num_classes=10, average="macro")
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            metric.update(model.net(x).argmax(-1), y)
    return float(metric.compute())


def run(method: str, seed: int, epochs: int = 100) -> float:
    train, _, test, _ = long_tailed_digits(imbalance=100.0, seed=seed)
    pl.seed_everything(seed, verbose=False)
    cfg = METHODS[method]
    callbacks = [ClassBalance(**cfg)] if cfg is not None else []
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tempfile.mkdtemp(),
    )
    model = MLP()
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True))
    return balanced_accuracy(model, DataLoader(test, batch_size=512))


def measure(seeds: tuple[int, ...] = (0, 1, 2, 3, 4)) -> dict[str, Any]:
    runs = {m: [run(m, s) for s in seeds] for m in METHODS}
    return {
        "seeds": list(seeds),
        "balanced_accuracy": runs,
        "mean": {m: statistics.mean(v) for m, v in runs.items()},
        "stdev": {m: statistics.stdev(v) for m, v in runs.items()},
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"CPU, long-tailed digits (imbalance 100), seeds {result['seeds']}",
        "",
        "| method | balanced accuracy (mean ± sd) |",
        "|---|---|",
    ]
    for m, v in result["mean"].items():
        lines.append(f"| {m} | {100 * v:.1f}% ± {100 * result['stdev'][m]:.1f} |")
    return "\n".join(lines) + "\n"


def main(out: str = "docs/benchmarks") -> dict[str, Any]:
    result = measure()
    return save(out, "class_balance", result, to_markdown(result))


if __name__ == "__main__":
    main()
