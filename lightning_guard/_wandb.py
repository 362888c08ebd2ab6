"""Everything that touches Weights & Biases directly. No other module imports wandb.

Gated like Lightning's own ``loggers/wandb.py``: without wandb installed, or without a ``WandbLogger`` attached,
every function here is a no-op (the counter metrics still reach every logger through ``trainer.loggers``).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lightning_utilities.core.imports import RequirementCache

if TYPE_CHECKING:
    import lightning.pytorch as pl


class GuardEvent(Protocol):
    """What this sink reads of a ``lightning_guard.events.GuardEvent`` (the sink sits below the record's module)."""

    @property
    def guard(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def step(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def severity(self) -> str: ...
    @property
    def ranks(self) -> tuple[int, ...]: ...
    @property
    def message(self) -> str: ...
    @property
    def metric_name(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


_WANDB_AVAILABLE = RequirementCache("wandb")
TABLE_KEY = "guard/events"
TABLE_COLUMNS = ["step", "epoch", "guard", "kind", "severity", "ranks", "message", "data"]


def wandb_logger(trainer: pl.Trainer) -> Any | None:
    """The first ``WandbLogger`` among the trainer's loggers, or None."""
    if not _WANDB_AVAILABLE:
        return None
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger
    return None


def _run(trainer: pl.Trainer) -> Any | None:
    logger = wandb_logger(trainer)
    if logger is None or int(getattr(trainer, "global_rank", 0)) != 0:
        return None
    run = logger.experiment
    # On ranks > 0 Lightning hands out a dummy experiment; a real run has a `dir`.
    return run if hasattr(run, "summary") and hasattr(run, "dir") else None


def run_dir(trainer: pl.Trainer) -> str | None:
    """The W&B run's files directory (synced with the run), or None without a WandbLogger."""
    run = _run(trainer)
    if run is None:
        return None
    files = Path(run.dir)
    # A run attached in a spawned worker (ddp_spawn) reports a files dir under the worker's cwd; the real run folder
    # lives under the logger's save_dir, named "<run|offline-run>-<time>-<id>".
    save_dir = getattr(wandb_logger(trainer), "save_dir", None)
    if save_dir and not files.resolve().is_relative_to(Path(save_dir).resolve()):
        matches = sorted(Path(save_dir).glob(f"wandb/*-{run.id}/files"))
        if matches:
            files = matches[-1]
    return str(files)


def spawn_root_dir() -> str | None:
    """In a process about to start ddp_spawn workers: the folder holding the active W&B run's ``wandb/``, or None.

    A worker attaches to the launching process's run, but wandb builds the attached run's settings from the
    worker's own environment, so its files directory (where table media are written) falls under the worker's
    working directory. Handed to the workers (:func:`adopt_spawn_root_dir`) as ``WANDB_DIR``, the documented way
    to set it.
    """
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None or not hasattr(run, "dir"):
        return None
    files = Path(run.dir)  # <root>/wandb/<run folder>/files
    return str(files.parents[2]) if files.parent.parent.name == "wandb" else None


def adopt_spawn_root_dir(root: str | None) -> None:
    """In a ddp_spawn worker, before Lightning attaches the run: its files go where the launching process's go."""
    if root is not None and "WANDB_DIR" not in os.environ:
        os.environ["WANDB_DIR"] = root


_WARNED_MEDIA = False


def _media_run(trainer: pl.Trainer) -> Any | None:
    """The run, if tables can be logged to it without writing into the working directory; else None (warned once).

    A ddp_spawn worker attached to a run that the launching process created lazily (during the spawn) has its files
    directory under the worker's working directory: wandb would write the table media there, outside the run.
    """
    global _WARNED_MEDIA
    run = _run(trainer)
    save_dir = getattr(wandb_logger(trainer), "save_dir", None)
    if run is None or not save_dir or Path(run.dir).resolve().is_relative_to(Path(save_dir).resolve()):
        return run
    if not _WARNED_MEDIA:
        _WARNED_MEDIA = True
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        rank_zero_warn(
            f"lightning_guard does not log its W&B tables from this ddp_spawn worker: the attached run writes media "
            f"to {run.dir}, under the working directory, not the run's folder under save_dir={save_dir!r}. Create the "
            "run before `fit` (`logger.experiment`) or set WANDB_DIR to save_dir; guard_events.jsonl and the counters "
            "are complete either way"
        )
    return None


def on_event(trainer: pl.Trainer, event: GuardEvent, *, alerts: bool) -> None:
    """Per-event W&B extras: the run summary counter, and ``run.alert`` for error events when enabled."""
    run = _run(trainer)
    if run is None:
        return
    import wandb

    key = event.metric_name
    run.summary[key] = int(run.summary.get(key, 0) or 0) + 1
    if alerts and event.severity == "error":
        try:
            run.alert(
                title=f"lightning_guard: {event.guard}/{event.kind}",
                text=f"step {event.step}, ranks {list(event.ranks)}: {event.message}",
                level=wandb.AlertLevel.ERROR,  # type: ignore[attr-defined]
            )
        except Exception as err:  # offline runs or a network hiccup must not stop training
            from lightning.pytorch.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(f"lightning_guard could not send a W&B alert: {err}")


def log_events_table(trainer: pl.Trainer, events: Sequence[GuardEvent], counts: Counter[tuple[str, str]]) -> None:
    """Log the whole event list as the ``guard/events`` table (one new table version per call)."""
    run = _media_run(trainer)
    if run is None:
        return
    import json

    import wandb

    table = wandb.Table(columns=list[Any](TABLE_COLUMNS))
    for e in events:
        d = e.to_dict()
        table.add_data(
            e.step, e.epoch, e.guard, e.kind, e.severity, str(list(e.ranks)), e.message, json.dumps(d["data"])
        )
    run.log({TABLE_KEY: table, "trainer/global_step": int(trainer.global_step)})
    for (guard, kind), n in counts.items():
        run.summary[f"guard/{guard}/{kind}"] = n


COMPRESS_KEY = "guard/compress"


def log_compression(
    trainer: pl.Trainer, rows: Sequence[dict[str, Any]], artifacts: dict[str, str], report_path: str
) -> None:
    """CompressExport's report as the ``guard/compress`` table, plus a model artifact.

    The artifact holds the exported files and the report; it uploads when the run syncs.
    """
    run = _media_run(trainer)
    if run is None or not rows:
        return
    import wandb

    columns = list(rows[0])
    table = wandb.Table(columns=list[Any](columns))
    for r in rows:
        table.add_data(*(r[c] for c in columns))
    run.log({COMPRESS_KEY: table, "trainer/global_step": int(trainer.global_step)})
    artifact = wandb.Artifact(name=f"compressed-model-{run.id}", type="model", metadata={"stages": list(rows)})
    for path in [*artifacts.values(), report_path]:
        artifact.add_file(path)
    run.log_artifact(artifact)
