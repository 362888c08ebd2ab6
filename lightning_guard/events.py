"""Guard events: what a guard did, when, where, and why - and the per-trainer stream that reports them.

One :class:`EventStream` lives on each trainer (held by its guard runtime). ``lightning_guard.emit`` may be called on
any rank:

* on rank 0 the event is published at once: appended to ``guard_events.jsonl`` in the run's log directory (flushed
  per event, so a crash loses nothing), counted in the ``guard/<guard>/<kind>`` metric of every attached Lightning
  logger at the trainer's global step, and, with a ``WandbLogger``, kept for the ``guard/events`` table, the run
  summary and (opt-in) ``run.alert`` for error events;
* on any other rank the event waits in an outbox and reaches rank 0 with the next rank-agreement collective or the
  next epoch-end exchange (:meth:`EventStream.exchange`); if that rank crashes first, the outbox is written to
  ``guard_events.rank<k>.jsonl`` beside the main file.

At fit end rank 0 prints a summary table (rich) of what every guard did.

This module is the record and its sinks: it knows no guards and no runtime. ``emit`` and ``event_stream`` (which find a
trainer's stream) live one layer up, in ``lightning_guard._runtime``, and are exported by ``lightning_guard``.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_guard import _wandb
from lightning_guard._metrics import write_metrics
from lightning_guard._state import StateSchema
from lightning_guard.distributed import gather_json
from lightning_guard.errors import GuardConfigError

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["EVENTS_FILENAME", "RUNS_DIRNAME", "EventStream", "GuardEvent", "configure_events"]

EVENTS_FILENAME = "guard_events.jsonl"
Severity = Literal["info", "warning", "error"]
Scalar = bool | int | float | str | None
DataValue = Scalar | Sequence[Scalar]
_SEVERITIES: tuple[str, ...] = ("info", "warning", "error")
_SEVERITY_RANK = {s: i for i, s in enumerate(_SEVERITIES)}
#: the event log's checkpoint state (inside the runtime's)
_STATE = StateSchema("lightning_guard event log", 1, frozenset({"events"}), legacy={"events": []})

# Process-wide defaults, changed with `configure_events` (or the LIGHTNING_GUARD_ALERTS environment variable).
_OPTIONS: dict[str, Any] = {
    "alerts": os.environ.get("LIGHTNING_GUARD_ALERTS", "0").lower() in ("1", "true", "yes", "error"),
    "summary": True,
    "jsonl": True,
}


def configure_events(*, alerts: bool | None = None, summary: bool | None = None, jsonl: bool | None = None) -> None:
    """Change how events are reported, for every trainer in this process.

    Args:
        alerts: send ``run.alert`` to W&B for each ``error`` event (default off; also set by the environment
            variable ``LIGHTNING_GUARD_ALERTS=1``).
        summary: print the rich summary table at fit end (default on).
        jsonl: write ``guard_events.jsonl`` (default on).

    Example:
        >>> configure_events(alerts=False)
    """
    for name, value in (("alerts", alerts), ("summary", summary), ("jsonl", jsonl)):
        if value is None:
            continue
        if not isinstance(value, bool):
            raise GuardConfigError(f"`{name}` must be a bool, got {value!r}")
        _OPTIONS[name] = value


def _clean_value(key: str, value: Any) -> DataValue:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _clean_value(key, value.item())
    if isinstance(value, Sequence):
        return [_clean_value(key, v) for v in value]  # type: ignore[misc]
    raise GuardConfigError(
        f"GuardEvent `data[{key!r}]` must be a scalar, a string or a list of them, got {type(value).__name__}"
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf": JSON has no literal for them
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class GuardEvent:
    """One intervention (or observation) of a guard.

    Args:
        guard: the guard's name, e.g. ``"gradient_guard"``.
        kind: what happened, e.g. ``"nonfinite_skip"``; together with ``guard`` it names the counter metric
            ``guard/<guard>/<kind>``.
        step: the trainer's global step when it happened.
        epoch: the trainer's epoch when it happened.
        ranks: the ranks it happened on (filled with the emitting rank when empty).
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        message: one human sentence.
        data: the numbers behind it (scalars, strings, or flat lists of them).
        time: wall-clock time (seconds since the epoch).

    Raises:
        GuardConfigError: an unknown severity, an empty guard or kind, or data that is not scalar.

    Example:
        >>> e = GuardEvent("gradient_guard", "nonfinite_skip", step=12, epoch=0, data={"norm": float("nan")})
        >>> e.metric_name
        'guard/gradient_guard/nonfinite_skip'
        >>> GuardEvent.from_dict(e.to_dict()).step
        12
    """

    guard: str
    kind: str
    step: int
    epoch: int
    ranks: tuple[int, ...] = ()
    severity: Severity = "info"
    message: str = ""
    data: Mapping[str, DataValue] = field(default_factory=dict)
    time: float = field(default_factory=time.time, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.guard, str) or not self.guard:
            raise GuardConfigError(f"GuardEvent `guard` must be a non-empty string, got {self.guard!r}")
        if not isinstance(self.kind, str) or not self.kind:
            raise GuardConfigError(f"GuardEvent `kind` must be a non-empty string, got {self.kind!r}")
        if self.severity not in _SEVERITIES:
            raise GuardConfigError(f"GuardEvent `severity` must be one of {_SEVERITIES}, got {self.severity!r}")
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        clean = {str(k): _clean_value(str(k), v) for k, v in dict(self.data).items()}
        object.__setattr__(self, "data", MappingProxyType(clean))

    @property
    def metric_name(self) -> str:
        """The counter metric this event increments."""
        return f"guard/{self.guard}/{self.kind}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite floats become the strings ``"nan"``/``"inf"``)."""
        return {
            "guard": self.guard,
            "kind": self.kind,
            "step": int(self.step),
            "epoch": int(self.epoch),
            "ranks": list(self.ranks),
            "severity": self.severity,
            "message": self.message,
            "data": {k: _json_safe(v) for k, v in self.data.items()},
            "time": self.time,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GuardEvent:
        """Rebuild an event from :meth:`to_dict` output (or a line of ``guard_events.jsonl``).

        The strings ``"nan"``, ``"inf"`` and ``"-inf"`` in ``data`` become floats again.
        """
        return cls(
            guard=d["guard"],
            kind=d["kind"],
            step=int(d["step"]),
            epoch=int(d["epoch"]),
            ranks=tuple(d.get("ranks", ())),
            severity=d.get("severity", "info"),
            message=d.get("message", ""),
            data={k: _unjson(v) for k, v in dict(d.get("data", {})).items()},
            time=float(d.get("time", 0.0)),
        )

    @classmethod
    def at(
        cls,
        trainer: pl.Trainer,
        guard: str,
        kind: str,
        *,
        severity: Severity = "info",
        message: str = "",
        data: Mapping[str, Any] | None = None,
        ranks: Sequence[int] = (),
    ) -> GuardEvent:
        """Build an event stamped with the trainer's current global step and epoch."""
        return cls(
            guard=guard,
            kind=kind,
            step=int(trainer.global_step),
            epoch=int(trainer.current_epoch),
            ranks=tuple(ranks),
            severity=severity,
            message=message,
            data=dict(data or {}),
        )


#: without a logger, each run's events go to ``<default_root_dir>/guard_logs/<start time>-<run_id>/``
RUNS_DIRNAME = "guard_logs"


def _resolve_log_dir(trainer: pl.Trainer, run_id: str) -> Path:
    """The run's log directory, computed without collectives (call on rank 0).

    The wandb run's files, else the first logger's ``log_dir``, else a folder of its own for this run under
    ``default_root_dir`` (a sweep in one folder is one file per run, sorted by start time).
    """
    run_dir = _wandb.run_dir(trainer)
    if run_dir is not None:
        return Path(run_dir)
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            return Path(log_dir)
    return Path(trainer.default_root_dir) / RUNS_DIRNAME / f"{time.strftime('%Y%m%d-%H%M%S')}-{run_id}"


class EventStream:
    """The guard events of one trainer: publication on rank 0, an outbox on the other ranks.

    Obtain it with :func:`event_stream`; guards use :func:`emit`.
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self._trainer = trainer
        self.events: list[GuardEvent] = []  # rank 0: every published event; other ranks: their own events
        self.counts: Counter[tuple[str, str]] = Counter()
        self._outbox: list[GuardEvent] = []
        self._log_dir: Path | None = None
        #: this fit's id, in every line of the JSONL (a sweep in one folder is told apart); rank 0's on every rank
        self.run_id = uuid.uuid4().hex[:12]
        self._file: Any = None
        self._table_dirty = False

    # ------------------------------------------------------------------ paths
    @property
    def rank(self) -> int:
        """This process's global rank."""
        return int(getattr(self._trainer, "global_rank", 0))

    def set_log_dir(self, path: str | os.PathLike[str], run_id: str | None = None) -> None:
        """Fix where ``guard_events.jsonl`` is written, and the run's id (at setup, identically on every rank)."""
        self._log_dir = Path(path)
        if run_id is not None:
            self.run_id = run_id

    @property
    def has_log_dir(self) -> bool:
        """Whether the log directory is fixed already (by :meth:`set_log_dir` or a first write)."""
        return self._log_dir is not None

    @property
    def log_dir(self) -> Path:
        """The directory holding ``guard_events.jsonl``."""
        if self._log_dir is None:
            root = Path(self._trainer.default_root_dir)
            self._log_dir = _resolve_log_dir(self._trainer, self.run_id) if self.rank == 0 else root
        return self._log_dir

    @property
    def jsonl_path(self) -> Path:
        """Path of the append-only event log."""
        return self.log_dir / EVENTS_FILENAME

    # ------------------------------------------------------------------ emit / publish
    def emit(self, event: GuardEvent) -> None:
        """Publish on rank 0; queue for rank 0 elsewhere."""
        if not event.ranks:
            event = GuardEvent(**{**event.__dict__, "ranks": (self.rank,)})
        if self.rank == 0:
            self._publish(event)
        else:
            self.events.append(event)
            self._outbox.append(event)

    def pending(self) -> int:
        """Number of events on this rank not yet handed to rank 0."""
        return len(self._outbox)

    def _write_line(self, event: GuardEvent) -> None:
        if not _OPTIONS["jsonl"]:
            return
        if self._file is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115 - kept open, flushed per event
        self._file.write(json.dumps({**event.to_dict(), "run_id": self.run_id}) + "\n")
        self._file.flush()

    def _publish(self, event: GuardEvent, *, log_metric: bool = True) -> None:
        self.events.append(event)
        key = (event.guard, event.kind)
        self.counts[key] += 1
        self._table_dirty = True
        try:
            self._write_line(event)
        except OSError as err:  # never let reporting kill training
            rank_zero_warn(f"lightning_guard could not write {self.jsonl_path}: {err}")
        if log_metric:
            write_metrics(self._trainer, {event.metric_name: float(self.counts[key])})
        _wandb.on_event(self._trainer, event, alerts=bool(_OPTIONS["alerts"]))

    # ------------------------------------------------------------------ distributed
    def exchange(self) -> None:
        """Collective: hand every rank's outbox to rank 0. All ranks must call it at the same point."""
        payload = [e.to_dict() for e in self._outbox]
        gathered = gather_json(self._trainer, payload)
        self._outbox.clear()
        if self.rank != 0:
            return
        for rank_events in gathered[1:]:
            for d in rank_events:
                self._publish(GuardEvent.from_dict(d))

    def dump_outbox(self) -> Path | None:
        """Write this rank's undelivered events next to the main log (used when training crashes)."""
        if not self._outbox or self.rank == 0:
            return None
        path = self.log_dir / f"guard_events.rank{self.rank}.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                for e in self._outbox:
                    f.write(json.dumps({**e.to_dict(), "run_id": self.run_id}) + "\n")
        except OSError:
            return None
        self._outbox.clear()
        return path

    # ------------------------------------------------------------------ reporting
    def refresh_table(self, *, force: bool = False) -> None:
        """Log the ``guard/events`` W&B table if new events arrived (rank 0; no-op without a WandbLogger)."""
        if self.rank != 0 or not (self._table_dirty or force):
            return
        _wandb.log_events_table(self._trainer, self.events, self.counts)
        self._table_dirty = False

    def summary_rows(self) -> list[tuple[str, str, int, str, int, int, str]]:
        """One row per (guard, kind): count, worst severity, first and last step, last message."""
        rows: dict[tuple[str, str], list[Any]] = {}
        for e in self.events:
            key = (e.guard, e.kind)
            if key not in rows:
                rows[key] = [e.guard, e.kind, 0, e.severity, e.step, e.step, e.message]
            row = rows[key]
            row[2] += 1
            if _SEVERITY_RANK[e.severity] > _SEVERITY_RANK[row[3]]:
                row[3] = e.severity
            row[4], row[5], row[6] = min(row[4], e.step), max(row[5], e.step), e.message
        return [tuple(r) for r in rows.values()]

    def print_summary(self) -> None:
        """Print the rich "what did the guards do" table (rank 0)."""
        if self.rank != 0 or not _OPTIONS["summary"]:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="lightning_guard: what the guards did", title_justify="left")
        for col in ("guard", "event", "count", "severity", "first step", "last step", "last message"):
            table.add_column(col, overflow="fold", justify="right" if col in ("count",) else "left")
        colours = {"info": "green", "warning": "yellow", "error": "bold red"}
        rows = self.summary_rows()
        for guard, kind, count, sev, first, last, msg in rows:
            table.add_row(guard, kind, str(count), f"[{colours[sev]}]{sev}[/]", str(first), str(last), msg)
        if not rows:
            table.add_row("-", "no interventions", "0", "info", "-", "-", "training needed no guard action")
        console = Console()
        if not console.is_terminal:
            console = Console(width=max(console.width, 140))
        console.print(table)
        if self._file is not None or self.jsonl_path.exists():
            console.print(f"guard events: {self.jsonl_path}")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The published events (for checkpoints: a resumed run keeps the whole log)."""
        return _STATE.dump({"events": [e.to_dict() for e in self.events]})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore published events; a fresh log file receives them first, so it is complete on its own."""
        state = _STATE.load(state)
        restored = [GuardEvent.from_dict(d) for d in state["events"]]
        if not restored:
            return
        known = {(e.guard, e.kind, e.step, e.time) for e in self.events}
        new_file = self.rank == 0 and not self.jsonl_path.exists()
        for e in restored:
            if (e.guard, e.kind, e.step, e.time) in known:
                continue
            self.events.append(e)
            self.counts[(e.guard, e.kind)] += 1
            if new_file:
                self._write_line(e)
        self.events.sort(key=lambda e: (e.step, e.time))
        self._table_dirty = True

    def close(self) -> None:
        """Close the log file (it is reopened in append mode if more events come)."""
        if self._file is not None:
            self._file.close()
            self._file = None


#: names this module exported before the runtime layer held them (lightning_guard 0.1)
_MOVED = {"emit": "lightning_guard.emit", "event_stream": "lightning_guard.event_stream"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:  # `from lightning_guard.events import emit` of 0.1 scripts: say where it went
        raise ImportError(f"lightning_guard.events.{name} moved: import it as `from lightning_guard import {name}`")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _unjson(v: Any) -> Any:
    if v in ("nan", "inf", "-inf"):
        return float(v)
    if isinstance(v, list):
        return [_unjson(x) for x in v]
    return v
