"""Shared by the examples: scikit-learn's digits (real 8x8 handwritten digits, bundled) and a small guarded MLP."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import GuardMixin


def digits(n_train: int = 1200, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train / validation split of digits (validation = the rest of the 1797 samples)."""
    x, y = load_digits(return_X_y=True)
    ds = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    train, val = torch.utils.data.random_split(
        ds, [n_train, len(ds) - n_train], generator=torch.Generator().manual_seed(seed)
    )
    return train, val  # type: ignore[return-value]


def loaders(n_train: int = 1200, batch_size: int = 32, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    train, val = digits(n_train, seed)
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=512)


class Net(GuardMixin, pl.LightningModule):
    """MLP 64-hidden-10 with the guards' loss (plain cross-entropy unless ClassBalance is there)."""

    def __init__(self, hidden: int = 128, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.balanced_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.balanced_loss(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())
        self.track_classes(logits, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


def trainer(callbacks: list[Any], epochs: int, name: str, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer writing under ./runs/<name> (ignored by git)."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": f"runs/{name}",
    }
    options.update(kwargs)
    return pl.Trainer(max_epochs=epochs, callbacks=callbacks, **options)
