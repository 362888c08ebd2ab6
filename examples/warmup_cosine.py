"""WarmupCosine on digits: at a high peak LR, warmup + cosine decay rescues training.

SGD with momentum 0.9 at a peak LR of 1.0, 10 epochs on CPU; measured here: constant LR 73.6% validation accuracy,
WarmupCosine(warmup=0.1) 96.0%. (At LR 1.5 both fail; at 0.5 both reach ~97%.)

Run: ``python examples/warmup_cosine.py`` (add ``--fast`` for a few-second smoke run).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import GuardMixin, WarmupCosine

PEAK_LR = 1.0


class Net(GuardMixin, pl.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.balanced_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def run(warmup: bool, epochs: int) -> float:
    pl.seed_everything(0, verbose=False)
    x, y = load_digits(return_X_y=True)
    ds = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    train, val = torch.utils.data.random_split(ds, [1400, 397], generator=torch.Generator().manual_seed(0))
    callbacks = [WarmupCosine(warmup=0.1, min_lr_ratio=0.01)] if warmup else []
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(Net(lr=PEAK_LR), DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=512))
    return float(trainer.callback_metrics["val_acc"])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args(argv)
    epochs = 2 if args.fast else 10
    result = {"constant_lr": run(False, epochs), "warmup_cosine": run(True, epochs)}
    print(f"val accuracy at peak LR {PEAK_LR}, SGD momentum 0.9, {epochs} epochs: {result}")
    return result


if __name__ == "__main__":
    main()
