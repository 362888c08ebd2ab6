from pathlib import Path

import pytest
import torch

from lightning_guard import demo
from tests.helpers import read_jsonl


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = demo.main(["--fast", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert "what the guards did" in out
    assert "wandb run:" in out
    assert result["test_acc"] > 0.3  # 3 epochs on a long-tailed split; chance is 0.1
    events = read_jsonl(result["jsonl"])
    assert len(events) == result["events"] > 0
    kinds = {(e["guard"], e["kind"]) for e in events}
    assert {("oom", "oom_retry"), ("oom", "grow_back"), ("fault_injector", "simulated_oom")} <= kinds
    assert {("compress", "exported")} <= kinds
    from lightning_guard.functional import load_artifact

    logits = load_artifact(result["artifacts"]["pt2"])(torch.zeros(3, 64))  # the demo leaves a verified model
    assert logits.shape == (3, 10)
    assert Path(result["figure"]).stat().st_size > 10_000  # the PNG of the run with its events
    assert str(tmp_path) in result["wandb_dir"]
