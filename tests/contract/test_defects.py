"""The cross-cutting defects the contract matrix was built to catch, each reproduced as it was measured on main.

Each test failed before its fix: a step without ``batch_idx`` under an out-of-memory retry, a reused guard restoring
the previous model, a ``training_step`` returning ``None`` counted as an applied step, ``guard/lr`` showing the
schedule instead of the LR the step used, and an empty event stream in the process that launched ``ddp_spawn``.
"""

from __future__ import annotations

import csv
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lightning_guard import GradientGuard, OOMGuard, WarmupCosine, event_stream
from lightning_guard.testing import InjectNaN, LRSpike, SimulatedOOM
from tests.contract.model import NoBatchIdxNet
from tests.helpers import DigitsNet, digits_loaders, events_file, precision_kwargs, read_jsonl, trainer


class NoBatchIdxDigits(DigitsNet):
    def training_step(self, batch: Any) -> torch.Tensor:  # type: ignore[override]
        return super().training_step(batch, 0)

    def validation_step(self, batch: Any) -> None:  # type: ignore[override]
        super().validation_step(batch, 0)


def test_oom_retry_with_a_step_without_batch_idx_equals_the_run_without_oom(tmp_path):
    """Main: TypeError "takes 2 positional arguments but 3 were given" (the wrappers made Lightning pass batch_idx)."""
    tr, va = digits_loaders(n_train=128)
    oom = SimulatedOOM(max_batch_size=10)
    torch.manual_seed(0)
    guarded = NoBatchIdxDigits()
    trainer(tmp_path / "g", [OOMGuard(), oom]).fit(guarded, tr, va)
    torch.manual_seed(0)
    plain = NoBatchIdxDigits()
    trainer(tmp_path / "p", []).fit(plain, tr, va)
    assert oom.seen_sizes[:4] == [32, 16, 8, 8]  # the first batch failed at 32 and 16, then ran as 4 x 8
    for a, b in zip(guarded.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_contract_module_without_batch_idx_really_omits_it():
    """The matrix's column is only a test if Lightning would not pass batch_idx to it."""
    from lightning_guard._wrapping import takes_batch_idx

    net = NoBatchIdxNet()
    assert not takes_batch_idx(net.training_step)
    assert not takes_batch_idx(net.validation_step)


def test_reused_gradient_guard_rolls_back_to_its_own_run(tmp_path):
    """Main: a reused GradientGuard restored the FIRST fit's weights at the second fit's first rollback."""
    tr, va = digits_loaders(n_train=256)

    def fit(gg: GradientGuard, seed: int, root: Path) -> DigitsNet:
        torch.manual_seed(seed)
        model = DigitsNet()
        trainer(root, [gg, InjectNaN("loss", steps=[3, 4])]).fit(model, tr, va)
        return model

    reused = GradientGuard(rollback_after=1, snapshot_every=2)
    fit(reused, seed=1, root=tmp_path / "first")
    second = fit(reused, seed=2, root=tmp_path / "second")
    fresh_guard = GradientGuard(rollback_after=1, snapshot_every=2)
    fresh = fit(fresh_guard, seed=2, root=tmp_path / "fresh")
    assert reused.counts.get("rollback", 0) >= 1  # the second fit really rolled back
    assert reused.counts == fresh_guard.counts
    for a, b in zip(second.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


class SkipsSomeBatches(DigitsNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return None if batch_idx % 3 == 2 else super().training_step(batch, batch_idx)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_a_step_returning_none_is_not_applied_and_feeds_no_statistics(tmp_path, precision):
    """Main: counted as an applied step (the LR advanced) and fed a zero norm and loss into the statistics."""
    tr, va = digits_loaders(n_train=288)  # 9 batches: 3 return None
    gg, wc = GradientGuard(), WarmupCosine(warmup=2)
    t = trainer(tmp_path, [wc, gg], **precision_kwargs(precision))
    t.fit(SkipsSomeBatches(), tr, va)
    runtime = t.__dict__["_lightning_guard_runtime"]
    assert runtime.applied_steps == [6]
    assert gg._stats[0].count == 6
    assert gg._loss_stats[0].count == 6
    assert [e.kind for e in event_stream(t).events if e.guard == "warmup_cosine" and e.kind == "hold"] == []


def _csv_rows(root: Path) -> list[dict[str, str]]:
    (path,) = root.rglob("metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


def test_logged_lr_is_the_lr_the_step_used(tmp_path):
    """Main: guard/lr was the NEXT step's scheduled LR, so an LR scaled for one step (a backoff, a spike) never
    showed. Now guard/lr is the LR applied at that step and guard/lr_scheduled the schedule's value beside it."""
    tr, va = digits_loaders(n_train=256)
    seen: dict[int, float] = {}

    class RecordAppliedLR(Callback):  # listed last: it sees the LR after every guard and injector set it
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen[trainer.global_step] = optimizer.param_groups[0]["lr"]

    wc = WarmupCosine(warmup=2)
    logger = CSVLogger(tmp_path, name="csv")
    t = trainer(tmp_path, [wc, LRSpike(factor=100.0, steps=[5]), RecordAppliedLR()], logger=logger)
    t.fit(DigitsNet(), tr, va)
    rows = [r for r in _csv_rows(tmp_path) if r.get("guard/lr")]
    logged = {int(r["step"]): float(r["guard/lr"]) for r in rows}
    # Lightning logs on_train_batch_end metrics at the step after the optimizer step (global_step already advanced)
    for step, lr in seen.items():
        assert math.isclose(logged[step], lr, rel_tol=1e-6), (step, logged[step], lr)
    scheduled = {int(r["step"]): float(r["guard/lr_scheduled"]) for r in rows}
    differ = [s for s in scheduled if not math.isclose(scheduled[s], logged[s], rel_tol=1e-6)]
    assert differ == [5]
    assert math.isclose(logged[5], 100.0 * scheduled[5], rel_tol=1e-6)


@pytest.mark.ddp
def test_after_ddp_spawn_the_launching_process_holds_events_and_guard_state(tmp_path):
    """Main: event_stream(trainer).events and the guards' counters were empty in the launching process."""
    tr, va = digits_loaders(n_train=256)  # 4 steps per rank
    gg = GradientGuard()
    t = trainer(tmp_path, [gg, InjectNaN("loss", steps=[2], ranks=[1])], devices=2, strategy="ddp_spawn")
    t.fit(DigitsNet(), tr, va)
    handed_back = Path(tempfile.gettempdir()) / f"lightning_guard-{gg._spawn_token}.pt"
    logged = [(e["guard"], e["kind"], e["step"], tuple(e["ranks"])) for e in read_jsonl(events_file(tmp_path))]
    events = [(e.guard, e.kind, e.step, e.ranks) for e in event_stream(t).events]
    assert [(g, k, s) for g, k, s, _ in events if g == "gradient_guard"] == [("gradient_guard", "nonfinite_skip", 2)]
    assert sorted(events) == sorted(logged)
    assert gg.counts == {"nonfinite_skip": 1}
    assert t.__dict__["_lightning_guard_runtime"].applied_steps == [3]  # 4 steps per rank, one skipped
    assert not handed_back.exists()  # read once, removed
    assert event_stream(t).events == event_stream(t).events  # a second read changes nothing


# ---------------------------------------------------------------------------------- found by the hostile review
def test_reused_guard_keeps_what_the_user_changed_between_fits(tmp_path):
    tr, va = digits_loaders(n_train=128)
    wc = WarmupCosine(warmup=0.5)
    trainer(tmp_path / "a", [wc]).fit(DigitsNet(), tr, va)
    wc.warmup = 0  # a sweep changes it for the next run
    trainer(tmp_path / "b", [wc]).fit(DigitsNet(), tr, va)
    assert wc.warmup == 0
    assert wc.state_dict()["warmup_steps"] == [0]  # the second fit really ran without warmup

    class Named(GradientGuard):
        def setup(self, trainer, pl_module, stage):
            self.param_names = [n for n, _ in pl_module.named_parameters()]
            super().setup(trainer, pl_module, stage)

    named = Named()
    for root in ("c", "d"):
        trainer(tmp_path / root, [named]).fit(DigitsNet(), tr, va)
        assert named.param_names[0] == "net.0.weight"  # a subclass's own attribute survives the reset


class KeepsZeroGrads(SkipsSomeBatches):
    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        optimizer.zero_grad(set_to_none=False)  # gradients stay as zero tensors


@pytest.mark.parametrize(
    ("model", "accumulate", "precision", "applied"),
    [(KeepsZeroGrads, 1, "32-true", 6), (SkipsSomeBatches, 3, "16-mixed", 0), (SkipsSomeBatches, 3, "32-true", 3)],
    ids=["zeroed-grads", "16-mixed-accumulate-ends-on-none", "32-true-accumulate-ends-on-none"],
)
def test_a_step_without_loss_is_told_by_backward_passes(tmp_path, model, accumulate, precision, applied):
    """set_to_none=False leaves zero gradients on a None step; with a GradScaler Lightning skips the whole step when
    the last micro-batch returned None (32-true steps on what the others accumulated)."""
    tr, va = digits_loaders(n_train=288)  # 9 batches; every third returns None
    gg, wc = GradientGuard(), WarmupCosine(warmup=1)
    t = trainer(tmp_path, [wc, gg], accumulate_grad_batches=accumulate, **precision_kwargs(precision))
    t.fit(model(), tr, va)
    assert t.__dict__["_lightning_guard_runtime"].applied_steps == [applied]
    assert gg._stats[0].count == applied
    assert [e.kind for e in event_stream(t).events if e.kind == "hold"] == []


class FailsAtBatch(DigitsNet):
    def training_step(self, batch, batch_idx):
        if batch_idx == 2 and not getattr(self, "failed", False):
            self.failed = True
            raise RuntimeError("data hiccup")
        return super().training_step(batch, batch_idx)


def test_oom_guard_leaves_no_wrapper_after_a_failed_fit(tmp_path):
    import pickle

    tr, va = digits_loaders(n_train=128)
    guard, model = OOMGuard(), FailsAtBatch()
    with pytest.raises(RuntimeError, match="data hiccup"):
        trainer(tmp_path / "a", [guard]).fit(model, tr, va)
    assert [k for k in ("training_step", "backward", "optimizer_step") if k in model.__dict__] == []
    trainer(tmp_path / "b", [guard]).fit(model, tr, va)  # the notebook re-run
    assert [k for k in ("training_step", "backward", "optimizer_step", "validation_step") if k in model.__dict__] == []
    pickle.dumps(model)


@pytest.mark.ddp
def test_a_spawn_hand_back_never_reaches_another_fit(tmp_path):
    """An unread hand-back of a ddp_spawn fit stayed attached to the guard: a later one-process fit loaded it in the
    middle of training (its applied steps and counters jumped)."""
    import copy

    tr, va = digits_loaders(n_train=256)
    gg = GradientGuard()
    copies = [copy.deepcopy(gg) for _ in range(2)]
    trainer(tmp_path / "spawn", [gg, InjectNaN("loss", steps=[1])], devices=2, strategy="ddp_spawn").fit(
        DigitsNet(), tr, va
    )
    assert "_spawn_token" not in copies[0].__dict__  # a deep copy is another callback, with no token of its own yet
    handed_back = Path(tempfile.gettempdir()) / f"lightning_guard-{gg._spawn_token}.pt"
    assert handed_back.exists()  # nobody asked for it yet
    t = trainer(tmp_path / "one", [gg, InjectNaN("loss", steps=[5])])
    t.fit(DigitsNet(), tr, va)
    fresh = GradientGuard()
    trainer(tmp_path / "fresh", [fresh, InjectNaN("loss", steps=[5])]).fit(DigitsNet(), tr, va)
    assert gg.counts == fresh.counts == {"nonfinite_skip": 1}
    assert [(e.kind, e.step) for e in event_stream(t).events if e.guard == "gradient_guard"] == [("nonfinite_skip", 5)]
    assert not handed_back.exists()  # the one-process fit discarded it: nothing left behind
