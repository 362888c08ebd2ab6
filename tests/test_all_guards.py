"""All guards together under ddp_spawn (2 CPU processes) in every precision, with faults on one rank each, and a
mid-run resume that must equal the uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_guard import (
    ClassBalance,
    CompressExport,
    GradientGuard,
    L1Penalty,
    OOMGuard,
    OverfitGuard,
    WarmupCosine,
)
from lightning_guard.testing import InjectNaN, LRSpike, SimulatedOOM
from tests.helpers import DigitsNet, StopAfterEpoch, digits_loaders, events_file, precision_kwargs, read_jsonl, trainer

pytest.importorskip("torchao")


class DumpRank(Callback):
    """Each rank writes its final weights and what its guards hold (ddp_spawn children cannot return them)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        oom = next(c for c in trainer.callbacks if isinstance(c, OOMGuard))
        state = {
            "w": [p.detach().float().flatten().tolist() for p in pl_module.parameters()],
            "micro_batch_size": oom.micro_batch_size,
            "applied": trainer.__dict__["_lightning_guard_runtime"].applied_steps,
            "lr": [g["lr"] for g in trainer.optimizers[0].param_groups],
        }
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps(state))


def _guards(out: Path) -> list[Any]:
    return [
        WarmupCosine(warmup=0.2),
        GradientGuard(),
        L1Penalty(1e-5),
        OverfitGuard(monitor="val_loss", patience=20),
        ClassBalance(),
        OOMGuard(),
        CompressExport(dirpath=str(out / "compressed"), monitor="val_acc", max_metric_drop=0.05),
        # faults, each on one rank only
        InjectNaN("batch", steps=[3], ranks=[1]),
        SimulatedOOM(16, where="backward", steps=[5], ranks=[0]),
        LRSpike(factor=100.0, steps=[9]),
    ]


def _fit(root: Path, precision: str, extra: list[Any], ckpt_path: str | None = None, max_epochs: int = 3) -> None:
    tr, va = digits_loaders(n_train=256, n_val=128, batch_size=32)  # 4 steps per epoch and rank
    cbs = [*_guards(root), DumpRank(str(root)), *extra]
    t = trainer(
        root,
        cbs,
        devices=2,
        strategy="ddp_spawn",
        max_epochs=max_epochs,
        enable_checkpointing=True,
        **precision_kwargs(precision),
    )
    torch.manual_seed(0)
    t.fit(DigitsNet(), tr, va, ckpt_path=ckpt_path)


def _ranks(root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    r0, r1 = (json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1))
    return r0, r1


@pytest.mark.ddp
@pytest.mark.timeout(240)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
def test_all_guards_ddp_identical_ranks_and_a_complete_event_log(tmp_path, precision):
    _fit(tmp_path, precision, [])
    r0, r1 = _ranks(tmp_path)
    assert r0 == r1  # weights, micro-batch size, applied steps and LRs: identical on both ranks
    assert r0["micro_batch_size"] == 16
    events = read_jsonl(events_file(tmp_path))
    seen = {(e["guard"], e["kind"], tuple(e["ranks"])) for e in events}
    # the NaN batch on rank 1 poisons the all-reduced gradients of both ranks: one agreed skip, at step 3
    skips = [e for e in events if (e["guard"], e["kind"]) == ("gradient_guard", "nonfinite_skip")]
    assert [(e["step"], 1 in e["ranks"]) for e in skips] == [(3, True)]
    assert ("fault_injector", "nan_batch", (1,)) in seen  # an event raised on rank 1 reached rank 0's log
    assert ("oom", "oom_retry", (0,)) in seen
    assert ("fault_injector", "simulated_oom", (0,)) in seen
    assert {("compress", "exported"), ("class_balance", "class_counts")} <= {(g, k) for g, k, _ in seen}
    assert (tmp_path / "compressed" / "model.pt2").exists()
    assert r0["applied"][0] < 12  # 3 epochs x 4 steps, minus the skipped one(s)


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_all_guards_ddp_resume_from_a_mid_run_checkpoint_equals_the_uninterrupted_run(tmp_path):
    _fit(tmp_path / "full", "32-true", [ModelCheckpoint(dirpath=tmp_path / "full" / "ck", save_top_k=-1)])
    _fit(
        tmp_path / "part",
        "32-true",
        [StopAfterEpoch(0), ModelCheckpoint(dirpath=tmp_path / "part" / "ck", save_top_k=-1)],
    )
    ckpt = tmp_path / "part" / "ck" / "epoch=0-step=4.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "part" / "ck").iterdir())
    _fit(tmp_path / "res", "32-true", [], ckpt_path=str(ckpt))
    full, res = _ranks(tmp_path / "full"), _ranks(tmp_path / "res")
    assert res[0] == res[1]
    assert res[0]["applied"] == full[0]["applied"]
    assert res[0]["lr"] == full[0]["lr"]
    assert res[0]["micro_batch_size"] == full[0]["micro_batch_size"]
    for a, b in zip(res[0]["w"], full[0]["w"], strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-7)
    key = lambda e: (e["guard"], e["kind"], e["step"], tuple(e["ranks"]))  # noqa: E731
    resumed = [key(e) for e in read_jsonl(events_file(tmp_path / "res"))]
    uninterrupted = [key(e) for e in read_jsonl(events_file(tmp_path / "full"))]
    assert resumed == uninterrupted  # the event log carried through the checkpoint, then continued alike
