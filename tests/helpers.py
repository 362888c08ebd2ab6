"""Shared test models and data: scikit-learn's digits (a real, bundled data set) and a small MLP."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import GuardMixin

_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    global _DIGITS
    if _DIGITS is None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        _DIGITS = (torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long))
    return _DIGITS


def digits_loaders(
    n_train: int = 256, n_val: int = 128, batch_size: int = 32, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    x, y = digits()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    tr, va = perm[:n_train], perm[n_train : n_train + n_val]
    # No torch.Generator in the loaders: ddp_spawn cannot unpickle it; shuffle=False keeps runs comparable.
    train = DataLoader(TensorDataset(x[tr], y[tr]), batch_size=batch_size, shuffle=False)
    val = DataLoader(TensorDataset(x[va], y[va]), batch_size=batch_size)
    return train, val


class DigitsNet(GuardMixin, pl.LightningModule):
    def __init__(
        self,
        lr: float = 0.01,
        hidden: int = 64,
        optimizer: str = "adamw",
        two_groups: bool = False,
        scheduler: bool = False,
    ) -> None:
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

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.two_groups:
            params: Any = [
                {"params": self.net[0].parameters(), "lr": hp.lr},
                {"params": self.net[2].parameters(), "lr": hp.lr * 0.1},
            ]
        else:
            params = self.parameters()
        opt = torch.optim.AdamW(params, lr=hp.lr) if hp.optimizer == "adamw" else torch.optim.SGD(params, lr=hp.lr)
        if hp.scheduler:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


class StopAfterEpoch(pl.Callback):
    """Interrupts a run (configured exactly like the full run) at the end of an epoch, as a crash would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


class MicroBatchAt(pl.Callback):
    """Sets OOMGuard's micro-batch size at a given step, as a recovered out-of-memory would, with no failure."""

    def __init__(self, step: int, size: int) -> None:
        self.step, self.size = step, size

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            from lightning_guard import OOMGuard

            next(c for c in trainer.callbacks if isinstance(c, OOMGuard)).micro_batch_size = self.size  # type: ignore[attr-defined]


def precision_kwargs(precision: str) -> dict[str, Any]:
    """Trainer kwargs for a precision; real 16-mixed on CPU needs the GradScaler plugin (see DESIGN.md)."""
    if precision == "16-mixed":
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    return {"precision": precision}


class ReleaseProcessGroup(pl.Callback):
    """ddp_spawn workers: destroy the gloo process group at teardown, on the main thread, instead of at interpreter
    exit (where a worker intermittently aborted: "terminate called without an active exception")."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def trainer(tmp_path: Path, callbacks: list[Any] | None = None, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
    }
    defaults.update(kwargs)
    callbacks = list(callbacks or [])
    if defaults.get("strategy") == "ddp_spawn":
        callbacks.append(ReleaseProcessGroup())
    return pl.Trainer(callbacks=callbacks, **defaults)


def events_file(root: Path | str) -> Path:
    """The one run's ``guard_events.jsonl`` under ``root``: a logger's directory holding it, or, without a logger,
    the run's folder ``<default_root_dir>/guard_logs/<start>-<run_id>/`` (at most one run expected)."""
    from lightning_guard.events import EVENTS_FILENAME, RUNS_DIRNAME

    direct = Path(root) / EVENTS_FILENAME
    if direct.exists():
        return direct
    runs = sorted((Path(root) / RUNS_DIRNAME).glob(f"*/{EVENTS_FILENAME}"))
    assert len(runs) <= 1, f"expected one run's {EVENTS_FILENAME} under {root}, found {[str(p) for p in runs]}"
    return runs[0] if runs else direct  # none: a run that emitted nothing (read_jsonl gives [])


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def find_files(root: Path | str, name: str) -> list[Path]:
    return sorted(Path(root).rglob(name))


def cpu_count_ok() -> bool:
    return (os.cpu_count() or 1) >= 2


def read_wandb_records(wandb_file: Path | str) -> list[Any]:
    """Parse a ``.wandb`` run file: a 7-byte ``:W&B`` header, then a LevelDB-style log (32 KiB blocks of records,
    each ``crc32(4) length(2, LE) type(1)`` + payload; FULL=1, FIRST=2, MIDDLE=3, LAST=4) of protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2

    data = Path(wandb_file).read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - (pos % block)
        if left < 7:
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        if pos + 7 + length > len(data):
            break  # a record still being written
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            parts = payload
        elif kind == 2:
            parts = payload
            continue
        elif kind == 3:
            parts += payload
            continue
        elif kind == 4:
            parts += payload
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(parts)
        records.append(rec)
        parts = b""
    return records


def finished_wandb_records(run_dir: Path | str, timeout: float = 60.0) -> list[Any]:
    """The records of an offline run's ``.wandb`` file once wandb-core has written all of it.

    ``run.finish()`` can return before the service process has flushed its buffered writes (seen on a loaded CI
    machine: a file without its history rows), so wait until the file holds the run's ``exit`` record and its size
    is stable.
    """
    import time

    (wandb_file,) = Path(run_dir).glob("*.wandb")
    deadline = time.monotonic() + timeout
    size = -1
    while True:
        now = wandb_file.stat().st_size
        records = read_wandb_records(wandb_file)
        done = any(r.WhichOneof("record_type") == "exit" for r in records)
        if (done and now == size) or time.monotonic() > deadline:
            return records
        size = now
        time.sleep(0.2)


def wandb_history(run_dir: Path | str) -> list[dict[str, Any]]:
    """The history rows (metrics) of an offline wandb run directory, values JSON-decoded."""
    rows = []
    for rec in finished_wandb_records(run_dir):
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
            )
    return rows


def wandb_summary(run_dir: Path | str) -> dict[str, Any]:
    """The last summary values written to an offline wandb run."""
    out: dict[str, Any] = {}
    for rec in finished_wandb_records(run_dir):
        if rec.WhichOneof("record_type") == "summary":
            for item in rec.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def wandb_run_dirs(root: Path | str) -> list[Path]:
    return sorted(p for p in Path(root).rglob("offline-run-*") if p.is_dir())
