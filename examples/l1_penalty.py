"""L1Penalty on digits: no L1, the subgradient mode, and the proximal mode (exact zeros), side by side.

Prints validation accuracy and the fraction of weights that are exactly zero. Measured on CPU (15 epochs, MLP
64-256-10, AdamW 3e-3, strength 2e-3): none 97.0%, 0% zeros; subgradient 94.5%, 0% zeros; proximal 97.0%, 0.5% zeros.
With AdamW the per-parameter step normalisation works against L1: at strength 1e-2 the subgradient run collapsed to
8.9% while proximal kept 96.8% with 2.7% zeros. Run: ``python examples/l1_penalty.py`` (``--fast`` for a smoke
run).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from _digits import Net, loaders, trainer

from lightning_guard import L1Penalty

STRENGTH = 2e-3


def run(mode: str, epochs: int) -> tuple[float, float]:
    pl.seed_everything(0, verbose=False)
    train, val = loaders()
    guard = [] if mode == "none" else [L1Penalty(STRENGTH, mode=mode)]
    t = trainer(guard, epochs, f"l1_{mode}")
    model = Net(hidden=256)
    t.fit(model, train, val)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return float(t.callback_metrics["val_acc"]), zeros


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args(argv)
    epochs = 2 if args.fast else 15
    result = {mode: run(mode, epochs) for mode in ("none", "subgradient", "proximal")}
    for mode, (acc, zeros) in result.items():
        print(f"{mode:>11}: val accuracy {acc:.3f}, weights exactly zero {zeros:.1%}")
    return result


if __name__ == "__main__":
    main()
