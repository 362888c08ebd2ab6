"""The guarded end-to-end demo: ``python -m lightning_guard.demo``.

Trains an MLP on scikit-learn's bundled digits data set (real 8x8 handwritten digits), made long-tailed (class 0 keeps
every sample, class 9 about 1 in 20), on CPU, with every guard that exists so far. Faults are injected on purpose
and labelled ``INJECTED`` in the events. Logs to Weights & Biases in offline mode unless wandb is configured
(``WANDB_MODE``, ``WANDB_API_KEY`` or a netrc login), prints the summary of guard interventions and says where the
JSONL event log and the wandb run directory are.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import (
    ClassBalance,
    CompressExport,
    GradientGuard,
    GuardMixin,
    L1Penalty,
    OOMGuard,
    OverfitGuard,
    WarmupCosine,
    event_stream,
)
from lightning_guard._compat import wandb_init_kwargs
from lightning_guard.plot import MetricHistory, plot_run
from lightning_guard.testing import InjectNaN, LRSpike, SimulatedOOM

__all__ = ["DemoNet", "long_tailed_digits", "main"]


def long_tailed_digits(
    imbalance: float = 20.0, seed: int = 0
) -> tuple[TensorDataset, TensorDataset, TensorDataset, list[int]]:
    """Digits split 60/20/20 into train/val/test; the train split is made long-tailed.

    Class ``c`` keeps a fraction ``imbalance ** (-c / 9)`` of its training samples (validation and test stay
    balanced, so they measure what the model does on rare classes).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=seed)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed)
    g = torch.Generator().manual_seed(seed)
    keep: list[int] = []
    counts = []
    for c in range(10):
        idx = [i for i in range(len(y_tr)) if y_tr[i] == c]
        n = max(1, round(len(idx) * imbalance ** (-c / 9)))
        chosen = torch.randperm(len(idx), generator=g)[:n].tolist()
        keep += [idx[i] for i in chosen]
        counts.append(n)

    def ds(xs: Any, ys: Any) -> TensorDataset:
        return TensorDataset(torch.tensor(xs / 16.0, dtype=torch.float32), torch.tensor(ys, dtype=torch.long))

    return ds(x_tr[keep], y_tr[keep]), ds(x_va, y_va), ds(x_te, y_te), counts


class DemoNet(GuardMixin, pl.LightningModule):
    """MLP 64-256-256-10 on digits, trained with ``balanced_loss``."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 256),
            torch.nn.ReLU(),
            torch.nn.Linear(256, 10),
        )
        from torchmetrics.classification import MulticlassAccuracy

        self.val_bal_acc = MulticlassAccuracy(num_classes=10, average="macro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_bal_acc = MulticlassAccuracy(num_classes=10, average="macro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Balanced loss on one batch."""
        x, y = batch
        loss = self.balanced_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation loss and balanced accuracy."""
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.balanced_loss(logits, y), prog_bar=True)
        self.val_bal_acc(logits, y)
        self.log("val_balanced_acc", self.val_bal_acc, prog_bar=True)
        self.track_classes(logits, y)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Test accuracy and balanced accuracy."""
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.test_bal_acc(logits, y)
        self.log("test_acc", self.test_acc)
        self.log("test_balanced_acc", self.test_bal_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW; the LR schedule comes from the WarmupCosine callback."""
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-4)


@contextlib.contextmanager
def _quiet_third_party() -> Iterator[None]:
    """Silence, for the demo only, third-party output known to be harmless, so the guards' story is what is read.

    Lightning's per-Trainer banners ("GPU available", the litlogger tip, "`Trainer.fit` stopped"), torchao's notes
    on optional CUDA kernels it cannot load on CPU, torch's pytree and ONNX-exporter notes (torchvision is not
    installed: its ops are not registered), onnxruntime's advice to pre-process before quantisation, and one pytree
    deprecation warning raised inside Lightning. Everything is restored on exit: a user's own runs keep their output.
    """
    names = (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
        "lightning.fabric.utilities.rank_zero",
        "torchao",
        "torch.utils._pytree",
        "torch.onnx",
        "torch.onnx._internal.exporter._registration",
    )
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    drop = _Drop()
    root = logging.getLogger()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    root.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            yield
    finally:
        root.removeFilter(drop)
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _wandb_configured() -> bool:
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the demo; returns the test metrics and where the outputs are."""
    with _quiet_third_party():
        return _main(argv)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lightning_guard.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    parser.add_argument(
        "--out", default="lightning_guard_demo", help="output directory (default ./lightning_guard_demo)"
    )
    parser.add_argument("--fast", action="store_true", help="3 epochs, for smoke tests")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to Weights & Biases")
    return parser.parse_args(argv)


def _logger(out: Path, no_wandb: bool) -> Any:
    """A WandbLogger (offline unless wandb is configured), or False."""
    if no_wandb:
        return False
    from lightning.pytorch.loggers import WandbLogger

    if not _wandb_configured():
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    logger = WandbLogger(project="lightning_guard_demo", save_dir=str(out), name="demo")
    # Lightning passes wandb an `anonymous=None` that wandb 0.2x warns about on every run: leave it out.
    wandb_init_kwargs(logger).pop("anonymous", None)
    return logger


def _callbacks(out: Path, steps_per_epoch: int, history: MetricHistory) -> list[pl.Callback]:
    """Every guard, and the faults injected on purpose."""
    return [
        history,
        WarmupCosine(warmup=0.1, min_lr_ratio=0.02),
        GradientGuard(snapshot_every=10),
        OverfitGuard(monitor="val_loss", patience=4),
        ClassBalance(),  # logit adjustment for the long tail
        L1Penalty(1e-5),
        OOMGuard(grow_after=10),  # halves the micro-batch on out-of-memory, grows back after 10 clean steps
        # Faults injected on purpose (they appear as INJECTED events): a NaN batch, a one-step LR x1000 spike placed
        # after GradientGuard's 25-step statistics warm-up, and a SIMULATED out-of-memory in backward (the device
        # "fits" 16 samples for one step; OOMGuard re-runs that batch as 2 x 16 and grows back later).
        InjectNaN("batch", steps=[steps_per_epoch + 3]),
        LRSpike(factor=1000.0, steps=[2 * steps_per_epoch + 5]),
        SimulatedOOM(max_batch_size=16, where="backward", steps=[steps_per_epoch + 10]),
        # At fit end, on OverfitGuard's restored best weights: the strongest structured pruning + int8 that keeps
        # balanced validation accuracy within 2 points, exported as .pt2 and ONNX and verified by reloading.
        CompressExport(
            dirpath=str(out / "compressed"),
            monitor="val_balanced_acc",
            max_metric_drop=0.02,
            prune="structured",
            prune_amounts=(0.5, 0.25),
            formats=("pt2", "onnx"),
        ),
    ]


def _figure(history: MetricHistory, events: list[Any], out: Path) -> str | None:
    try:  # the figure needs matplotlib (installed by `make demo`)
        return str(
            plot_run(
                history.series,
                events,
                out / "run.png",
                title="lightning_guard demo: digits (long-tailed), every guard, faults injected on purpose",
                panels=[["train_loss"], ["val_loss"], ["val_balanced_acc"], ["lr"]],
            )
        )
    except ImportError:
        return None


def _main(argv: list[str] | None) -> dict[str, Any]:
    args = _parse(argv)
    epochs = 3 if args.fast else args.epochs
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pl.seed_everything(0, verbose=False)
    train, val, test, counts = long_tailed_digits()
    print(f"digits, long-tailed train split: class counts {counts} (imbalance {counts[0] / counts[-1]:.0f}x)")
    train_loader = DataLoader(train, batch_size=32, shuffle=True)
    logger, history = _logger(out, args.no_wandb), MetricHistory()
    callbacks = _callbacks(out, len(train_loader), history)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(out),
        enable_checkpointing=False,
        log_every_n_steps=5,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    model = DemoNet()
    trainer.fit(model, train_loader, DataLoader(val, batch_size=256))
    stream = event_stream(trainer)
    result_png = _figure(history, stream.events, out)
    (metrics,) = trainer.test(model, DataLoader(test, batch_size=256), verbose=False)
    result: dict[str, Any] = {k: float(v) for k, v in metrics.items()}
    result.update(events=len(stream.events), jsonl=str(stream.jsonl_path), figure=result_png)
    compress = next(c for c in callbacks if isinstance(c, CompressExport)).result
    if compress is not None:
        result["artifacts"] = dict(compress.artifacts)
        print(f"compressed model: {compress.artifacts} (verified by reloading)")
    print(f"\ntest accuracy {result['test_acc']:.3f}, balanced accuracy {result['test_balanced_acc']:.3f}")
    print(f"guard events ({result['events']}): {stream.jsonl_path}")
    if result_png:
        print(f"figure of the run with its events: {result_png}")
    if logger:
        run = logger.experiment
        result["wandb_dir"] = str(Path(run.dir).parent)
        run.finish()
        print(f"wandb run: {result['wandb_dir']}  (offline runs upload with `wandb sync <dir>`)")
    print(f"demo finished in {time.time() - t0:.1f} s")
    return result


if __name__ == "__main__":
    main()
