"""No stopping vs Lightning's EarlyStopping vs OverfitGuard on an MLP that overfits digits, same seeds.

An oversized MLP (64-1024-10, AdamW 1e-2) trained on 100 digits, validated on 400, tested on 800 others; each run
gets up to 60 epochs. Reported per method: final validation loss (of the weights the run ends with), test accuracy
and epochs used, mean over seeds. Both stoppers run on validation loss and on validation accuracy.
``python -m tests.benchmarks.overfit_benchmark`` or ``make bench``.
"""

from __future__ import annotations

import statistics
import tempfile
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import OverfitGuard
from tests.benchmarks.report import save
from tests.helpers import DigitsNet, digits

METHODS = (
    "no_stopping",
    "lightning_early_stopping",
    "overfit_guard",
    "lightning_early_stopping_on_acc",
    "overfit_guard_on_acc",
)


def run(method: str, seed: int) -> dict[str, float]:
    x, y = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, va, te = perm[:100], perm[100:500], perm[500:1300]
    loaders = [DataLoader(TensorDataset(x[i], y[i]), batch_size=32) for i in (tr, va, te)]
    callbacks: list[Any] = {
        "no_stopping": [],
        "lightning_early_stopping": [EarlyStopping("val_loss", patience=5)],
        "overfit_guard": [OverfitGuard(patience=5)],
        "lightning_early_stopping_on_acc": [EarlyStopping("val_acc", mode="max", patience=5)],
        "overfit_guard_on_acc": [OverfitGuard(monitor="val_acc", mode="max", patience=5)],
    }[method]
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=60,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tempfile.mkdtemp(),
        num_sanity_val_steps=0,
    )
    model = DigitsNet(lr=0.01, hidden=1024)
    trainer.fit(model, loaders[0], loaders[1])
    (val,) = trainer.validate(model, loaders[1], verbose=False)
    (test,) = trainer.validate(model, loaders[2], verbose=False)
    return {"val_loss": val["val_loss"], "test_acc": test["val_acc"], "epochs": float(trainer.current_epoch)}


def measure(seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, Any]:
    runs = {m: [run(m, s) for s in seeds] for m in METHODS}
    summary = {
        m: {k: statistics.mean(r[k] for r in rs) for k in ("val_loss", "test_acc", "epochs")} for m, rs in runs.items()
    }
    return {
        "seeds": list(seeds),
        "runs": runs,
        "mean": summary,
        "torch": torch.__version__,
        "lightning": pl.__version__,
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"CPU, seeds {result['seeds']}, mean over seeds (torch {result['torch']}, Lightning {result['lightning']})",
        "",
        "| method | final val loss | test accuracy | epochs used |",
        "|---|---|---|---|",
    ]
    for m, s in result["mean"].items():
        lines.append(f"| {m} | {s['val_loss']:.4f} | {100 * s['test_acc']:.2f}% | {s['epochs']:.1f} |")
    return "\n".join(lines) + "\n"


def main(out: str = "docs/benchmarks") -> dict[str, Any]:
    result = measure()
    return save(out, "overfit", result, to_markdown(result))


if __name__ == "__main__":
    main()
