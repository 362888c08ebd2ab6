"""A small convolutional net with BatchNorm on scikit-learn's digits, seen as 1x8x8 images."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import GuardMixin
from tests.helpers import digits


def digits_image_loaders(
    n_train: int = 512, n_val: int = 256, batch_size: int = 32, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders of digits as ``(N, 1, 8, 8)`` images in ``[0, 1]`` and integer labels.

    The same split as :func:`tests.helpers.digits_loaders` for the same arguments (a permutation drawn with
    ``seed``); the loaders hold no ``torch.Generator`` and do not shuffle (``ddp_spawn`` pickles them).

    Args:
        n_train: training images (of 1797).
        n_val: validation images, disjoint from the training ones.
        batch_size: images per batch.
        seed: seed of the split.

    Returns:
        ``(train_loader, val_loader)``.
    """
    x, y = digits()
    if n_train + n_val > len(x):
        raise ValueError(f"n_train + n_val must be at most {len(x)}, got {n_train} + {n_val}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    images = x.reshape(-1, 1, 8, 8)
    train = DataLoader(TensorDataset(images[tr], y[tr]), batch_size=batch_size, shuffle=False)
    val = DataLoader(TensorDataset(images[va], y[va]), batch_size=batch_size)
    return train, val


class DigitsConvNet(GuardMixin, pl.LightningModule):
    """Two conv+BatchNorm+ReLU layers, a 2x2 max-pool and a linear classifier, for 1x8x8 digit images.

    ``conv(1->c1, 3x3) + BN + ReLU``, ``conv(c1->c2, 3x3) + BN + ReLU``, ``maxpool 2``, ``linear(c2*4*4 -> 10)``.
    The loss is ``self.balanced_loss`` (so ``ClassBalance`` can steer it); logs ``train_loss``, ``val_loss`` and
    ``val_acc``. AdamW.

    Args:
        lr: AdamW learning rate. Default ``3e-3``.
        channels: ``(c1, c2)``. Default ``(16, 32)``.

    Example:
        >>> net = DigitsConvNet()
        >>> net(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(self, lr: float = 3e-3, channels: tuple[int, int] = (16, 32)) -> None:
        super().__init__()
        self.save_hyperparameters()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(c2 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))

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

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
