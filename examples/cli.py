"""LightningCLI with every guard configured in YAML (``examples/cli_config.yaml``).

Run: ``python examples/cli.py`` (``--fast``: 2 epochs), or directly
``python examples/cli.py fit --config examples/cli_config.yaml --trainer.max_epochs=5``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from _digits import Net, loaders
from lightning.pytorch.cli import LightningCLI

CONFIG = Path(__file__).with_name("cli_config.yaml")


class DigitsData(pl.LightningDataModule):
    """scikit-learn's digits, 1200 train / 597 validation."""

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.train, self.val = loaders(batch_size=self.batch_size)

    def train_dataloader(self):
        return self.train

    def val_dataloader(self):
        return self.val


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = list(sys.argv[1:] if argv is None else argv)
    fast = "--fast" in argv
    argv = [a for a in argv if a != "--fast"]
    if not argv:
        argv = ["fit", "--config", str(CONFIG)] + (["--trainer.max_epochs=2"] if fast else [])
    pl.seed_everything(0, verbose=False)
    cli = LightningCLI(Net, DigitsData, args=argv, save_config_kwargs={"overwrite": True})
    result = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val_")}
    print(result)
    return result


if __name__ == "__main__":
    main()
