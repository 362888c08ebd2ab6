"""Realistic models shared by tests and benchmarks, small enough for CPU CI.

Three workloads, each a ``GuardMixin`` LightningModule with real data that ships with the dev dependencies:

* ``char_lm`` - :class:`CharLM`, a pre-LN decoder-only byte-level transformer trained on the Python standard
  library's own sources (:func:`char_lm_loaders`); plain fp32 cross-entropy, AdamW.
* ``conv_bn`` - :class:`DigitsConvNet`, two conv+BatchNorm layers on scikit-learn's digits as 1x8x8 images
  (:func:`digits_image_loaders`); ``balanced_loss``.
* ``mlp`` - :class:`DigitsNet`, the digits MLP of :mod:`tests.helpers` (re-exported, with
  :func:`digits_loaders`); ``balanced_loss``.

:data:`WORKLOADS` maps each name to a :class:`Workload`; calling it with a seed and a size gives a fresh
``(model, train_loader, val_loader, trainer_kwargs)``, so a test or a benchmark is one line::

    model, train, val, kwargs = WORKLOADS["char_lm"](seed=0, size="ci")
    trainer = pl.Trainer(**kwargs, callbacks=[...], ...)

``size="ci"`` fits in a few seconds on one CPU core; ``size="bench"`` is larger (the LM is the 4-layer,
``d_model=128`` configuration). ``trainer_kwargs`` holds only what belongs to the workload (its length and
validation cadence); add the accelerator, precision, logger and root directory yourself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from tests.helpers import DigitsNet, digits_loaders
from tests.workloads.char_lm import CharLM, char_lm_loaders, stdlib_text
from tests.workloads.digits_conv import DigitsConvNet, digits_image_loaders

Size = Literal["ci", "bench"]
SIZES: tuple[str, ...] = ("ci", "bench")


class Built(NamedTuple):
    """A fresh instance of a workload: unpack it as ``model, train, val, trainer_kwargs``."""

    model: pl.LightningModule
    train: DataLoader
    val: DataLoader
    trainer_kwargs: dict[str, Any]


@dataclass(frozen=True)
class Workload:
    """A named workload: ``workload(seed, size)`` builds a fresh :class:`Built`.

    Args:
        name: registry key.
        description: one line for reports.
        build: ``(seed, size) -> Built``.
        uses_balanced_loss: whether the model's loss is ``GuardMixin.balanced_loss`` (``ClassBalance`` applies).
        metrics: what it logs.
    """

    name: str
    description: str
    build: Callable[[int, str], Built] = field(repr=False)
    uses_balanced_loss: bool
    metrics: tuple[str, ...]

    def __call__(self, seed: int = 0, size: Size = "ci") -> Built:
        if size not in SIZES:
            raise ValueError(f"`size` must be one of {SIZES}, got {size!r}")
        pl.seed_everything(seed, verbose=False)  # the model's initial weights follow the seed
        return self.build(seed, size)


#: per size: model config, loader config, epochs (one validation per epoch)
_CHAR_LM: dict[str, dict[str, Any]] = {
    "ci": {
        "model": {"n_layer": 2, "d_model": 64, "n_head": 4, "seq_len": 64, "lr": 3e-3},
        "data": {"batch_size": 16, "n_train_batches": 25, "n_val_batches": 8},
        "epochs": 3,
    },
    "bench": {
        "model": {"n_layer": 4, "d_model": 128, "n_head": 4, "seq_len": 64, "lr": 2e-3},
        "data": {"batch_size": 16, "n_train_batches": 24, "n_val_batches": 12},
        "epochs": 4,
    },
}
_CONV_BN: dict[str, dict[str, Any]] = {
    "ci": {"model": {"lr": 3e-3}, "data": {"n_train": 512, "n_val": 256, "batch_size": 32}, "epochs": 3},
    "bench": {"model": {"lr": 3e-3}, "data": {"n_train": 1024, "n_val": 512, "batch_size": 32}, "epochs": 6},
}
_MLP: dict[str, dict[str, Any]] = {
    "ci": {"model": {"lr": 0.01, "hidden": 64}, "data": {"n_train": 512, "n_val": 256, "batch_size": 32}, "epochs": 3},
    "bench": {
        "model": {"lr": 0.01, "hidden": 128},
        "data": {"n_train": 1024, "n_val": 512, "batch_size": 32},
        "epochs": 6,
    },
}


def _trainer_kwargs(epochs: int) -> dict[str, Any]:
    return {"max_epochs": epochs, "log_every_n_steps": 10}


def _build_char_lm(seed: int, size: str) -> Built:
    cfg = _CHAR_LM[size]
    model = CharLM(**cfg["model"])
    train, val = char_lm_loaders(seq_len=cfg["model"]["seq_len"], seed=seed, **cfg["data"])
    return Built(model, train, val, _trainer_kwargs(cfg["epochs"]))


def _build_conv_bn(seed: int, size: str) -> Built:
    cfg = _CONV_BN[size]
    model = DigitsConvNet(**cfg["model"])
    train, val = digits_image_loaders(seed=seed, **cfg["data"])
    return Built(model, train, val, _trainer_kwargs(cfg["epochs"]))


def _build_mlp(seed: int, size: str) -> Built:
    cfg = _MLP[size]
    model = DigitsNet(**cfg["model"])
    train, val = digits_loaders(seed=seed, **cfg["data"])
    return Built(model, train, val, _trainer_kwargs(cfg["epochs"]))


WORKLOADS: dict[str, Workload] = {
    "char_lm": Workload(
        "char_lm",
        "pre-LN byte-level transformer LM on the standard library's sources",
        _build_char_lm,
        uses_balanced_loss=False,
        metrics=("train_loss", "val_loss"),
    ),
    "conv_bn": Workload(
        "conv_bn",
        "conv + BatchNorm net on digits as 1x8x8 images",
        _build_conv_bn,
        uses_balanced_loss=True,
        metrics=("train_loss", "val_loss", "val_acc"),
    ),
    "mlp": Workload(
        "mlp",
        "the digits MLP of tests.helpers",
        _build_mlp,
        uses_balanced_loss=True,
        metrics=("train_loss", "val_loss", "val_acc"),
    ),
}

__all__ = [
    "SIZES",
    "WORKLOADS",
    "Built",
    "CharLM",
    "DigitsConvNet",
    "DigitsNet",
    "Workload",
    "char_lm_loaders",
    "digits_image_loaders",
    "digits_loaders",
    "stdlib_text",
]
