"""The six failures, side by side: bare Lightning, Lightning's nearest built-in, and lightning_guard (CPU).

All on scikit-learn's digits (real, bundled). Scenarios 1-4 train three runs each from the same seed and draw the
validation curves of all three with the guard run's events marked (``docs/benchmarks/six_failures_<n>.png``):

1. non-convergence: SGD momentum 0.9 at peak LR 1.0 - constant LR / cosine without warmup / ``WarmupCosine``;
2. explosion: a NaN batch and one LR x1000 step - nothing / ``gradient_clip_val=1.0`` / ``GradientGuard``;
3. overfitting: 100 training digits, MLP 64-1024-10 - no stopping / ``EarlyStopping`` / ``OverfitGuard``
   (the final validation loss of the weights each run ends with);
4. class imbalance: the train split long-tailed (ratio 100) - plain cross-entropy (Lightning has no built-in) /
   ``ClassBalance`` (balanced accuracy);
5. out-of-memory and 6. deployment size: the rows of ``oom_benchmark`` (vs ``BatchSizeFinder``) and
   ``compress_benchmark`` (vs ``ModelPruning``), run here again so that one command measures all six.

``python -m tests.benchmarks.six_failures`` or ``make bench``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_guard import ClassBalance, GradientGuard, GuardMixin, OverfitGuard, WarmupCosine, event_stream
from lightning_guard.demo import long_tailed_digits
from lightning_guard.plot import MetricHistory, plot_run
from lightning_guard.testing import InjectNaN, LRSpike
from tests.benchmarks import compress_benchmark, oom_benchmark
from tests.benchmarks.report import quiet_trainer, save
from tests.helpers import digits


class Net(GuardMixin, pl.LightningModule):
    def __init__(self, hidden: int = 256, lr: float = 3e-3, sgd: bool = False, cosine_epochs: int = 0) -> None:
        super().__init__()
        self.lr, self.sgd, self.cosine_epochs = lr, sgd, cosine_epochs
        self.net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
        self.bal = MulticlassAccuracy(num_classes=10, average="macro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.balanced_loss(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.balanced_loss(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())
        self.bal(logits, y)
        self.log("val_balanced_acc", self.bal)

    def configure_optimizers(self) -> Any:
        if self.sgd:
            opt: torch.optim.Optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        if not self.cosine_epochs:
            return opt
        steps = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _split(n_train: int) -> tuple[TensorDataset, TensorDataset]:
    x, y = digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return TensorDataset(x[perm[:n_train]], y[perm[:n_train]]), TensorDataset(x[perm[n_train:]], y[perm[n_train:]])


def _fit(
    model: Net, train: Any, val: Any, callbacks: list[Any], epochs: int, batch: int = 32, **kwargs: Any
) -> dict[str, Any]:
    history = MetricHistory()
    trainer = quiet_trainer([history, *callbacks], max_epochs=epochs, **kwargs)
    trainer.fit(model, DataLoader(train, batch_size=batch, shuffle=True), DataLoader(val, batch_size=512))
    (final,) = trainer.validate(model, DataLoader(val, batch_size=512), verbose=False)  # the weights it ends with
    return {
        "final": {k: round(float(v), 4) for k, v in final.items()},
        "epochs": int(trainer.current_epoch),
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "series": history.series,
        "events": [e.to_dict() for e in event_stream(trainer).events] if callbacks else [],
    }


def _scenario(runs: dict[str, dict[str, Any]], metric: str, name: str, title: str, out: Path) -> dict[str, Any]:
    series = {f"{variant}: {metric}": r["series"].get(metric, []) for variant, r in runs.items()}
    guard_events = next(reversed(runs.values()))["events"]
    plot_run(
        series, guard_events, out / f"six_failures_{name}.png", title=title, panels=[list(series)],
        skip_guards=("fault_injector",),
    )  # fmt: skip
    return {variant: {k: v for k, v in r.items() if k not in ("series", "events")} for variant, r in runs.items()}


def measure(out: Path, fast: bool = False) -> dict[str, Any]:
    torch.set_num_threads(2)
    scale = 0.3 if fast else 1.0
    result: dict[str, Any] = {}

    train, val = _split(1400)
    e1 = max(2, int(10 * scale))

    def seeded(**kw: Any) -> Net:
        pl.seed_everything(0, verbose=False)
        return Net(**kw)

    result["1_non_convergence"] = _scenario(
        {
            "constant_lr": _fit(seeded(lr=1.0, sgd=True), train, val, [], e1, batch=64),
            "cosine_no_warmup": _fit(seeded(lr=1.0, sgd=True, cosine_epochs=e1), train, val, [], e1, batch=64),
            "WarmupCosine": _fit(
                seeded(lr=1.0, sgd=True), train, val, [WarmupCosine(warmup=0.1, min_lr_ratio=0.01)], e1, batch=64
            ),
        },
        "val_acc",
        "1",
        "1. non-convergence: SGD at peak LR 1.0",
        out,
    )

    train, val = _split(1200)
    e2 = max(3, int(6 * scale))
    faults = lambda: [InjectNaN("batch", steps=[30]), LRSpike(1000.0, steps=[60])]  # noqa: E731
    result["2_explosion"] = _scenario(
        {
            "nothing": _fit(seeded(), train, val, faults(), e2),
            "gradient_clip_val": _fit(seeded(), train, val, faults(), e2, gradient_clip_val=1.0),
            "GradientGuard": _fit(seeded(), train, val, [*faults(), GradientGuard(snapshot_every=10)], e2),
        },
        "val_acc",
        "2",
        "2. explosion: a NaN batch (step 30) and LR x1000 (step 60)",
        out,
    )

    train, val = _split(100)
    e3 = max(12, int(60 * scale))
    result["3_overfitting"] = _scenario(
        {
            "no_stopping": _fit(seeded(hidden=1024, lr=0.01), train, val, [], e3, batch=20),
            "EarlyStopping": _fit(
                seeded(hidden=1024, lr=0.01), train, val, [EarlyStopping("val_loss", patience=5)], e3, batch=20
            ),
            "OverfitGuard": _fit(
                seeded(hidden=1024, lr=0.01), train, val, [OverfitGuard(monitor="val_loss", patience=5)], e3, batch=20
            ),
        },
        "val_loss",
        "3",
        "3. overfitting: 100 training digits, MLP 64-1024-10",
        out,
    )

    lt_train, lt_val, _, _ = long_tailed_digits(imbalance=100.0)
    e4 = max(5, int(60 * scale))
    result["4_class_imbalance"] = _scenario(
        {
            "plain_cross_entropy": _fit(seeded(hidden=128, lr=1e-3), lt_train, lt_val, [], e4),
            "ClassBalance": _fit(seeded(hidden=128, lr=1e-3), lt_train, lt_val, [ClassBalance()], e4),
        },
        "val_balanced_acc",
        "4",
        "4. class imbalance (ratio 100): balanced accuracy",
        out,
    )
    if not fast:
        result["5_out_of_memory"] = {
            c: oom_benchmark.run(c) for c in ("reference", "oom_guard", "batch_size_finder", "no_guard")
        }
        result["6_deployment"] = compress_benchmark.measure()["rows"]
    return result


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        "CPU (2 threads), scikit-learn digits. Final = the weights each run ends with, on the validation split.",
        "",
    ]
    for scenario, runs in result.items():
        lines += [f"### {scenario.replace('_', ' ')}", ""]
        if scenario.startswith(("1", "2", "3", "4")):
            lines += [
                "| run | val acc | balanced acc | val loss | epochs | weights finite |",
                "|---|---|---|---|---|---|",
            ]
            for name, r in runs.items():
                f = r["final"]
                lines.append(
                    f"| {name} | {100 * f['val_acc']:.1f}% | {100 * f['val_balanced_acc']:.1f}% | "
                    f"{f['val_loss']:.3f} | {r['epochs']} | {r['finite']} |"
                )
            lines += ["", f"![{scenario}](six_failures_{scenario[0]}.png)", ""]
        else:
            keys = sorted({k for r in runs.values() for k in r if not isinstance(r[k], list | dict)})
            lines += ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
            for name, r in runs.items():
                lines.append(f"| {name} | " + " | ".join(str(r.get(k, "-")) for k in keys) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(out: str = "docs/benchmarks", fast: bool = False) -> dict[str, Any]:
    result = measure(Path(out), fast=fast)
    return save(out, "six_failures", result, to_markdown(result))


if __name__ == "__main__":
    main()
