import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_guard import GuardConfigError, GuardEvent, WarmupCosine, configure_events, emit, event_stream
from lightning_guard.events import EVENTS_FILENAME
from tests.helpers import (
    DigitsNet,
    digits_loaders,
    events_file,
    read_jsonl,
    trainer,
    wandb_history,
    wandb_run_dirs,
    wandb_summary,
)


class EmitAt(Callback):
    """Emits one event at a given step and records what the JSONL held right after (flushed per event)."""

    def __init__(self, step: int, severity: str = "info") -> None:
        self.step, self.severity, self.seen_in_file = step, severity, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            emit(trainer, GuardEvent.at(trainer, "probe", "poke", severity=self.severity, message="m", data={"x": 1.5}))
            path = event_stream(trainer).jsonl_path
            self.seen_in_file = [json.loads(line)["kind"] for line in path.read_text().splitlines()]


def test_event_round_trip_and_nonfinite_json():
    e = GuardEvent("g", "k", step=3, epoch=1, ranks=(0, 1), severity="warning", data={"n": float("nan"), "v": [1, 2.5]})
    d = e.to_dict()
    assert json.loads(json.dumps(d))["data"]["n"] == "nan"
    back = GuardEvent.from_dict(d)
    assert back.ranks == (0, 1)
    assert back.severity == "warning"
    assert math.isnan(back.data["n"])
    assert back.data["v"] == [1, 2.5]
    assert GuardEvent("g", "k", 0, 0, data={"t": torch.tensor(2.0)}).data["t"] == 2.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guard": ""}, r"GuardEvent `guard` must be a non-empty string, got ''"),
        ({"kind": 3}, r"GuardEvent `kind` must be a non-empty string, got 3"),
        ({"severity": "fatal"}, r"GuardEvent `severity` must be one of \('info', 'warning', 'error'\), got 'fatal'"),
        (
            {"data": {"obj": object()}},
            r"GuardEvent `data\['obj'\]` must be a scalar, a string or a list of them, got object",
        ),
    ],
)
def test_event_errors(kwargs, match):
    base = {"guard": "g", "kind": "k", "step": 0, "epoch": 0}
    with pytest.raises(GuardConfigError, match=match):
        GuardEvent(**{**base, **kwargs})


def test_emit_rejects_non_events(tmp_path):
    with pytest.raises(GuardConfigError, match=r"`event` must be a GuardEvent, got dict"):
        emit(trainer(tmp_path), {"guard": "g"})


def test_configure_events_errors():
    with pytest.raises(GuardConfigError, match=r"`alerts` must be a bool, got 'yes'"):
        configure_events(alerts="yes")


def test_jsonl_flushed_per_event_and_counters_reach_csv_logger(tmp_path):
    tr, va = digits_loaders()
    probe = EmitAt(step=2)
    t = trainer(tmp_path, [WarmupCosine(warmup=1), probe], logger=CSVLogger(tmp_path), max_epochs=1)
    t.fit(DigitsNet(), tr, va)
    assert probe.seen_in_file is not None
    assert probe.seen_in_file[-1] == "poke"
    events = read_jsonl(t.logger.log_dir + "/" + EVENTS_FILENAME)
    assert [e["kind"] for e in events if e["guard"] == "probe"] == ["poke"]
    assert events[-1]["ranks"] == [0]
    import csv

    with open(t.logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    counted = [r for r in rows if r.get("guard/probe/poke")]
    assert [(r["step"], float(r["guard/probe/poke"])) for r in counted] == [("2", 1.0)]
    assert any(r.get("guard/lr") for r in rows)  # WarmupCosine logs the LR


def test_no_logger_writes_to_default_root_dir(tmp_path):
    tr, va = digits_loaders()
    t = trainer(tmp_path, [WarmupCosine(warmup=1), EmitAt(step=1)])
    t.fit(DigitsNet(), tr, va)
    assert [e["kind"] for e in read_jsonl(events_file(tmp_path)) if e["guard"] == "probe"] == ["poke"]


def test_events_reach_a_real_wandb_offline_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    tr, va = digits_loaders()
    logger = WandbLogger(save_dir=str(tmp_path), project="lg-test")
    t = trainer(tmp_path, [WarmupCosine(warmup=1), EmitAt(step=3, severity="error")], logger=logger, max_epochs=2)
    t.fit(DigitsNet(), tr, va)
    run_dir = logger.experiment.dir
    logger.experiment.finish()
    (run,) = wandb_run_dirs(tmp_path)
    # history: the counter metric at the right global step
    rows = [r for r in wandb_history(run) if "guard/probe/poke" in r]
    assert [(r["trainer/global_step"], r["guard/probe/poke"]) for r in rows] == [(3, 1)]
    # the table, as JSON under files/media/table/
    tables = sorted((run / "files" / "media" / "table" / "guard").glob("events_*.table.json"))
    assert tables, "no guard/events table written"
    last = json.loads(tables[-1].read_text())
    assert last["columns"][:4] == ["step", "epoch", "guard", "kind"]
    assert [3, 0, "probe", "poke"] in [row[:4] for row in last["data"]]
    # the summary and the JSONL inside the run's files (synced with the run)
    assert wandb_summary(run)["guard/probe/poke"] == 1
    assert [e["kind"] for e in read_jsonl(f"{run_dir}/{EVENTS_FILENAME}") if e["guard"] == "probe"] == ["poke"]
    out = capsys.readouterr().out
    assert "what the guards did" in out
    assert "probe" in out
    assert "poke" in out


def test_alert_is_sent_for_error_events_when_enabled(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sent = []
    configure_events(alerts=True)
    try:
        tr, va = digits_loaders()
        logger = WandbLogger(save_dir=str(tmp_path), project="lg-test")
        monkeypatch.setattr(type(logger.experiment), "alert", lambda self, **kw: sent.append(kw), raising=False)
        t = trainer(tmp_path, [WarmupCosine(warmup=1), EmitAt(step=1, severity="error"), EmitAt(step=2)], logger=logger)
        t.fit(DigitsNet(), tr, va)
        logger.experiment.finish()
    finally:
        configure_events(alerts=False)
    assert len(sent) == 1
    assert "probe/poke" in sent[0]["title"]
    assert "step 1" in sent[0]["text"]


def test_summary_can_be_turned_off(tmp_path, capsys):
    configure_events(summary=False)
    try:
        tr, va = digits_loaders()
        trainer(tmp_path, [WarmupCosine(warmup=1)]).fit(DigitsNet(), tr, va)
    finally:
        configure_events(summary=True)
    assert "what the guards did" not in capsys.readouterr().out


def test_event_log_survives_checkpoint_resume(tmp_path):
    tr, va = digits_loaders()
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_epochs=1, save_top_k=-1)
    t1 = trainer(tmp_path / "a", [WarmupCosine(warmup=1), EmitAt(step=2), ck], max_epochs=1, enable_checkpointing=True)
    t1.fit(DigitsNet(), tr, va)
    (ckpt,) = (tmp_path / "ck").glob("*.ckpt")
    assert [e["kind"] for e in torch.load(ckpt, weights_only=False)["lightning_guard"]["events"]["events"]].count(
        "poke"
    ) == 1
    t2 = trainer(tmp_path / "b", [WarmupCosine(warmup=1)], max_epochs=2)
    t2.fit(DigitsNet(), tr, va, ckpt_path=str(ckpt))
    # the resumed run's own log is complete: it starts with the restored events
    kinds = [e["kind"] for e in read_jsonl(events_file(tmp_path / "b"))]
    assert kinds.count("poke") == 1
    assert [e.kind for e in event_stream(t2).events].count("poke") == 1


@pytest.mark.ddp
@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_ddp_spawn_wandb_tables_never_land_in_the_working_directory(tmp_path, mode):
    """Main: under ddp_spawn with ``WandbLogger(save_dir=...)`` the ``guard/events`` table media were written to
    ``./wandb/`` of the working directory (wandb builds an attached run's settings from the worker's environment).
    Now a run that exists before the spawn ("eager") gets its tables in its own folder, as the workers inherit its
    root as WANDB_DIR; one Lightning creates during the spawn ("lazy") gets no table from the workers, with a
    warning saying how to have them; the working directory stays empty and the JSONL is complete either way."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    save, cwd = tmp_path / "save", tmp_path / "cwd"
    save.mkdir()
    cwd.mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(root)}
    env.pop("WANDB_SERVICE", None)
    env.pop("WANDB_DIR", None)
    script = root / "tests" / "scripts" / "ddp_wandb_media.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(save), str(cwd), mode], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    (run,) = wandb_run_dirs(save)
    events = read_jsonl(events_file(run / "files"))
    assert [e["kind"] for e in events if e["guard"] == "gradient_guard"] == ["nonfinite_skip"]
    tables = sorted((run / "files" / "media" / "table" / "guard").glob("events_*.table.json"))
    warned = "does not log its W&B tables from this ddp_spawn worker" in proc.stdout + proc.stderr
    if mode == "eager":
        assert tables
        assert not warned
        assert any(r[3] == "nonfinite_skip" for r in json.loads(tables[-1].read_text())["data"])
    else:
        assert not tables
        assert warned
