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
    from lightning_guard.compress import load_artifact

    logits = load_artifact(result["artifacts"]["pt2"])(torch.zeros(3, 64))  # the demo leaves a verified model
    assert logits.shape == (3, 10)
    assert Path(result["figure"]).stat().st_size > 10_000  # the PNG of the run with its events
    assert str(tmp_path) in result["wandb_dir"]


@pytest.mark.slow
def test_demo_output_is_the_guards_story_only(tmp_path):
    """A new user's first run: no third-party noise to scroll past (Lightning banners per inner Trainer, torchao and
    ONNX-exporter notes, onnxruntime advice, a pytree deprecation, wandb's `anonymous` warning)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run = subprocess.run(
        [sys.executable, "-m", "lightning_guard.demo", "--fast", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=True,
    )
    out = run.stdout + run.stderr
    assert "what the guards did" in out
    assert "compression (val_balanced_acc)" in out
    for noise in (
        "GPU available",
        "litlogger",
        "LeafSpec",
        "Failed to load",
        "torchvision",
        "anonymous",
        "pre-processing",
    ):
        assert noise not in out, noise
    assert len(out.splitlines()) < 80  # two screens, tables included


def test_the_demo_silences_only_inside_itself():
    import logging
    import warnings

    lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    before = lightning_log.level
    with demo._quiet_third_party():
        assert lightning_log.level == logging.ERROR
    assert lightning_log.level == before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("isinstance(treespec, LeafSpec) is deprecated", FutureWarning, stacklevel=1)
    assert caught  # a user's own code keeps its warnings
