"""L1Penalty's sparsity-accuracy trade-off on digits, for SGD and AdamW (`make bench`).

Digits MLP 64-128-10 (scikit-learn's digits, 1200 training and 597 validation samples), 8 epochs, one CPU thread, seed
0. For each optimizer, each L1 mode and strength: the fraction of penalised weights that are exactly 0 at the end and
the validation accuracy, beside the run without L1. SGD: momentum 0.9, LR 0.05; AdamW: LR 3e-3.
Writes ``docs/benchmarks/l1_sparsity.{json,md}``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from lightning_guard import L1Penalty, configure_events
from tests.benchmarks.report import git_state, machine, one_thread, quiet_trainer, save
from tests.helpers import DigitsNet, digits_loaders

#: (optimizer, mode, strengths)
PLAN: tuple[tuple[str, str, tuple[float, ...]], ...] = (
    ("sgd", "proximal", (1e-4, 1e-3, 1e-2)),
    ("adamw", "proximal", (1e-4, 1e-2, 1.0)),
    ("adamw", "adaptive_proximal", (1e-4, 3e-4, 1e-3, 3e-3)),
)
LR = {"sgd": 0.05, "adamw": 3e-3}


class Net(DigitsNet):
    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def run(optimizer: str, mode: str | None, strength: float) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders(n_train=1200, n_val=597)
    model = Net(lr=LR[optimizer], hidden=128, optimizer=optimizer)
    callbacks = [L1Penalty(strength, mode=mode)] if mode else []  # type: ignore[arg-type]
    trainer = quiet_trainer(callbacks, max_epochs=8)
    trainer.fit(model, train, val)
    weights = [model.net[0].weight, model.net[2].weight]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return {
        "optimizer": optimizer,
        "mode": mode or "none",
        "strength": strength,
        "sparsity": zeros,
        "val_acc": float(trainer.callback_metrics["val_acc"]),
    }


def measure() -> dict[str, Any]:
    rows = []
    configure_events(summary=False)
    try:
        with one_thread():
            for optimizer in ("sgd", "adamw"):
                rows.append(run(optimizer, None, 0.0))
            for optimizer, mode, strengths in PLAN:
                rows += [run(optimizer, mode, s) for s in strengths]
    finally:
        configure_events(summary=True)
    return {"rows": rows, "machine": machine(), "git": git_state(), "torch": torch.__version__}


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# L1Penalty: sparsity and accuracy on digits",
        "",
        f"{result['machine']}; torch {result['torch']}; commit {result['git']}. MLP 64-128-10, 8 epochs, seed 0; "
        "SGD momentum 0.9 LR 0.05, AdamW LR 3e-3. Sparsity: exact zeros among the two weight matrices.",
        "",
        "| optimizer | mode | strength | exact zeros | val acc |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        strength = "-" if r["mode"] == "none" else f"{r['strength']:g}"
        lines.append(
            f"| {r['optimizer']} | {r['mode']} | {strength} | {100 * r['sparsity']:.1f}% | {100 * r['val_acc']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(out: str = "docs/benchmarks") -> dict[str, Any]:
    result = measure()
    return save(out, "l1_sparsity", result, to_markdown(result))


if __name__ == "__main__":
    main()
