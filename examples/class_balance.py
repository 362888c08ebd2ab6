"""ClassBalance on digits made long-tailed (class 0 keeps every sample, class 9 one in a hundred).

Plain cross-entropy vs ClassBalance's default (logit adjustment) vs inverse-frequency weights; balanced accuracy
(mean per-class recall) on the balanced validation split. Measured on CPU (60 epochs, MLP 64-128-10, AdamW 1e-3):
plain 74.2%, logit adjustment 82.2%, inverse weights 81.8%. Run: ``python examples/class_balance.py`` (``--fast`` for a
smoke run).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from _digits import Net, trainer
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lightning_guard import ClassBalance
from lightning_guard.demo import long_tailed_digits


def run(method: str | None, epochs: int) -> float:
    pl.seed_everything(0, verbose=False)
    train, val, _, _ = long_tailed_digits(imbalance=100.0)
    guard = [] if method is None else [ClassBalance(method=method)]
    t = trainer(guard, epochs, f"class_balance_{method}")
    model = Net(lr=1e-3)
    t.fit(model, DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=512))
    metric = MulticlassAccuracy(num_classes=10, average="macro")  # balanced accuracy = mean per-class recall
    model.eval()
    with torch.no_grad():
        for x, y in DataLoader(val, batch_size=512):
            metric.update(model(x), y)
    return float(metric.compute())


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args(argv)
    epochs = 3 if args.fast else 60
    result = {str(m or "plain"): run(m, epochs) for m in (None, "logit_adjustment", "inverse")}
    for method, acc in result.items():
        print(f"{method:>16}: validation (balanced) accuracy {acc:.3f}")
    return result


if __name__ == "__main__":
    main()
