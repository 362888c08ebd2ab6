"""OOMGuard vs Lightning's BatchSizeFinder when the batch does not fit (simulated out-of-memory, CPU).

scikit-learn's digits, MLP 64-512-512-10, AdamW 1e-3, DataLoader batch 256, 4 epochs. The module raises a CUDA-style
out-of-memory error whenever a training micro-batch holds more than ``LIMIT`` samples (in the module itself, so
BatchSizeFinder's trial runs, which drop all callbacks, see it too). Side by side in one process:

* ``reference``: nothing runs out of memory (the run we would like to have);
* ``oom_guard``: OOMGuard halves 256 -> 128 -> 64 -> 32 at the first step and keeps the effective batch of 256;
* ``batch_size_finder``: Lightning's ``BatchSizeFinder`` (power mode, its defaults) searches before training and then
  trains with the batch it found (the effective batch changes; Lightning does not adapt the LR);
* ``no_guard``: what happens without either (the first step dies).

Reported: time to the first good optimizer step (from ``fit()``), total fit time, effective batch, validation
accuracy. Steady state: OOMGuard's per-step cost with no out-of-memory at all, vs plain, interleaved rounds.
``python -m tests.benchmarks.oom_benchmark`` or ``make bench``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BatchSizeFinder
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import OOMGuard
from tests.benchmarks.report import quiet_trainer, save
from tests.helpers import ReleaseProcessGroup, digits

LIMIT = 40
BATCH = 256
EPOCHS = 4


class Net(pl.LightningModule):
    def __init__(self, batch_size: int = BATCH, limit: int | None = LIMIT) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.limit = limit
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 10),
        )
        x, y = digits()
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(x), generator=g)
        self.train_set = TensorDataset(x[perm[:1400]], y[perm[:1400]])
        self.val_set = TensorDataset(x[perm[1400:]], y[perm[1400:]])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.limit is not None and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate 2.00 GiB: batch {x.shape[0]} > {self.limit} (simulated)"
            )
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(-1) == y).float().mean())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class FirstStep(pl.Callback):
    def __init__(self) -> None:
        self.first: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if self.first is None:
            self.first = time.perf_counter()


def _trainer(callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("max_epochs", EPOCHS)
    return quiet_trainer(callbacks, **kwargs)


def run(config: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Net(limit=None if config == "reference" else LIMIT)
    first = FirstStep()
    callbacks: list[Any] = [first]
    if config == "oom_guard":
        callbacks.append(OOMGuard())
    elif config == "batch_size_finder":
        callbacks.append(BatchSizeFinder())
    trainer = _trainer(callbacks)
    start = time.perf_counter()
    try:
        trainer.fit(model)
        error = None
    except torch.OutOfMemoryError as exc:
        error = type(exc).__name__
    total = time.perf_counter() - start
    guard = next((c for c in callbacks if isinstance(c, OOMGuard)), None)
    micro = guard.micro_batch_size if guard is not None else None
    return {
        "first_good_step_s": None if first.first is None else round(first.first - start, 3),
        "total_s": round(total, 3),
        "effective_batch": model.batch_size if error is None else None,
        "micro_batch": micro if micro is not None else (model.batch_size if error is None else None),
        "optimizer_steps": int(trainer.global_step),
        "val_acc": None if error else round(float(trainer.callback_metrics["val_acc"]), 4),
        "error": error,
    }


def steady_state(rounds: int = 5, steps: int = 60) -> dict[str, Any]:
    """Seconds per step with no out-of-memory: plain vs OOMGuard (whole batch) vs OOMGuard at micro-batch 64."""
    configs = {"plain": None, "oom_guard": OOMGuard, "oom_guard_micro64": lambda: OOMGuard(micro_batch_size=64)}
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, make in configs.items():
            torch.manual_seed(0)
            model = Net(limit=None)
            trainer = _trainer(
                [make()] if make is not None else [], max_epochs=-1, max_steps=steps, limit_val_batches=0
            )
            start = time.perf_counter()
            trainer.fit(model)
            times[name].append((time.perf_counter() - start) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "rounds": rounds,
        "steps": steps,
        "s_per_step_median": {k: round(v, 6) for k, v in med.items()},
        "vs_plain_pct": {k: round(100 * (v / med["plain"] - 1), 2) for k, v in med.items()},
    }


class TrainTime(pl.Callback):
    """Rank 0 writes the seconds per step between the 10th step and the end of training to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.start = 0.0
        self.from_step = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step == 10:
            self.start, self.from_step = time.perf_counter(), trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if trainer.global_rank == 0:
            steps = trainer.global_step - self.from_step
            with open(self.path, "w") as f:
                f.write(str((time.perf_counter() - self.start) / steps))


def ddp_steady_state(rounds: int = 2, steps: int = 70) -> dict[str, Any]:
    """Seconds per step under ddp_spawn (2 CPU processes, gloo), no out-of-memory: plain DDP vs DDP + OOMGuard,
    whose per-step cost there is one small all-gather and one host sync (the agreement)."""
    configs = {"ddp_plain": False, "ddp_oom_guard": True}
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, guarded in configs.items():
            path = tempfile.mktemp(suffix=".txt")
            model = Net(limit=None)
            cbs: list[Any] = [TrainTime(path), ReleaseProcessGroup()] + ([OOMGuard()] if guarded else [])
            trainer = _trainer(
                cbs, max_epochs=-1, max_steps=steps, limit_val_batches=0, devices=2, strategy="ddp_spawn"
            )
            trainer.fit(model)
            with open(path) as f:
                times[name].append(float(f.read()))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "rounds": rounds,
        "steps": steps,
        "s_per_step_median": {k: round(v, 6) for k, v in med.items()},
        "vs_plain_pct": {k: round(100 * (v / med["ddp_plain"] - 1), 2) for k, v in med.items()},
    }


def measure() -> dict[str, Any]:
    torch.set_num_threads(2)
    runs = {c: run(c) for c in ("reference", "oom_guard", "batch_size_finder", "no_guard")}
    return {
        "limit": LIMIT,
        "batch": BATCH,
        "epochs": EPOCHS,
        "runs": runs,
        "steady_state": steady_state(),
        "ddp_steady_state": ddp_steady_state(),
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"CPU (2 threads), digits MLP 64-512-512-10, DataLoader batch {result['batch']}, {result['epochs']} epochs, "
        f"simulated out-of-memory above {result['limit']} samples per micro-batch",
        "",
        "| run | first good step (s) | total (s) | effective batch | micro-batch | optimizer steps | val acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        if r["error"]:
            lines.append(f"| {name} | never | {r['total_s']:.2f} (died: {r['error']}) | - | - | 0 | - |")
            continue
        lines.append(
            f"| {name} | {r['first_good_step_s']:.2f} | {r['total_s']:.2f} | {r['effective_batch']} | "
            f"{r['micro_batch']} | {r['optimizer_steps']} | {100 * r['val_acc']:.1f}% |"
        )
    ss = result["steady_state"]
    lines += [
        "",
        f"Steady state, no out-of-memory ({ss['rounds']} interleaved rounds x {ss['steps']} steps, median):",
        "",
        "| config | ms / step | vs plain |",
        "|---|---|---|",
    ]
    for k, v in ss["s_per_step_median"].items():
        lines.append(f"| {k} | {1000 * v:.2f} | {ss['vs_plain_pct'][k]:+.2f}% |")
    dd = result["ddp_steady_state"]
    for k, v in dd["s_per_step_median"].items():
        lines.append(f"| {k} (ddp_spawn, 2 processes) | {1000 * v:.2f} | {dd['vs_plain_pct'][k]:+.2f}% vs ddp_plain |")
    return "\n".join(lines) + "\n"


def main(out: str = "docs/benchmarks") -> dict[str, Any]:
    result = measure()
    return save(out, "oom_guard_cpu", result, to_markdown(result))


if __name__ == "__main__":
    main()
