import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from lightning_guard import GuardConfigError, OverfitGuard, event_stream
from tests.helpers import DigitsNet, StopAfterEpoch, digits_loaders, events_file, read_jsonl, trainer

# A deliberately oversized MLP on 100 digits: it overfits within a few epochs (measured: best val_loss at epoch 2).
OVERFIT = {"n_train": 100, "n_val": 400, "batch_size": 32}


def fit(tmp_path, callbacks, max_epochs=60, model=None, **kw):
    pl.seed_everything(0, verbose=False)
    tr, va = digits_loaders(**OVERFIT)
    t = trainer(tmp_path, callbacks, max_epochs=max_epochs, **kw)
    model = model or DigitsNet(lr=0.01, hidden=1024)
    t.fit(model, tr, va)
    (metrics,) = t.validate(model, va, verbose=False)
    return t, model, metrics["val_loss"]


def kinds(t):
    return [
        (e.kind, e.epoch) for e in event_stream(t).events if e.guard == "overfit_guard" and e.kind != "no_improvement"
    ]


def test_stops_within_patience_and_restores_the_best_weights_exactly(tmp_path):
    guard = OverfitGuard(patience=5)
    t, _, restored = fit(tmp_path / "og", [guard])
    assert guard.stopped_reason == "patience"
    assert t.current_epoch == guard.best_epoch + 5 + 1  # stopped exactly `patience` validations after the best
    assert restored == pytest.approx(guard.best, abs=1e-6)  # the final model IS the best recorded one
    assert ("overfitting", guard.best_epoch + 1) in kinds(t)
    assert not {"distribution_shift_suspected", "underfitting"} & {k for k, _ in kinds(t)}  # no false diagnosis
    assert kinds(t)[-2:] == [("stop", t.current_epoch - 1), ("restore_best", t.current_epoch)]
    # Lightning's EarlyStopping on the same run stops at the same epoch but keeps the last weights
    es_t, _, es_final = fit(tmp_path / "es", [EarlyStopping("val_loss", patience=5)])
    assert es_t.current_epoch == t.current_epoch
    assert es_final > restored + 0.05  # measured: 0.588 vs 0.485
    # and without any stopping the model ends far worse
    _, _, none_final = fit(tmp_path / "none", [], max_epochs=30)
    assert none_final > es_final


class ValLossAtFitEnd(Callback):
    """What an export at fit end would see."""

    def __init__(self):
        self.val = math.nan

    def on_fit_end(self, trainer, pl_module):
        x, y = (torch.cat(t) for t in zip(*list(trainer.val_dataloaders), strict=True))
        with torch.no_grad():
            self.val = float(torch.nn.functional.cross_entropy(pl_module(x), y))


def test_restores_whatever_ended_the_run_before_fit_end(tmp_path):
    guard = OverfitGuard(patience=5, stop=False)
    probe = ValLossAtFitEnd()
    t, _, final = fit(tmp_path, [guard, probe], max_epochs=12)
    assert t.current_epoch == 12  # max_epochs ended it
    assert guard.stopped_reason is None
    assert final == pytest.approx(guard.best, abs=1e-6)
    assert probe.val == pytest.approx(guard.best, abs=1e-5)  # already restored when on_fit_end runs


def test_respects_val_check_interval(tmp_path):
    guard = OverfitGuard(patience=50)
    pl.seed_everything(0, verbose=False)
    tr, va = digits_loaders(n_train=256, n_val=128)
    trainer(tmp_path, [guard], max_epochs=2, val_check_interval=0.5).fit(DigitsNet(), tr, va)
    assert [h["step"] for h in guard.history] == [4, 8, 12, 16]


def test_missing_monitor_lists_the_available_keys(tmp_path):
    tr, va = digits_loaders()
    with pytest.raises(
        GuardConfigError,
        match=r"OverfitGuard's `monitor` 'val_los' was not logged; available metrics: "
        r"\['train_loss', 'val_acc', 'val_loss'\]",
    ):
        trainer(tmp_path, [OverfitGuard(monitor="val_los", mode="min")]).fit(DigitsNet(), tr, va)


class NaNValidation(DigitsNet):
    """Validation loss becomes NaN from a given epoch on (optionally on one rank only)."""

    def __init__(self, nan_epoch: int, rank: int | None = None, **kw):
        super().__init__(**kw)
        self.nan_epoch, self.nan_rank = nan_epoch, rank

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = self.balanced_loss(self(x), y)
        if self.current_epoch >= self.nan_epoch and self.nan_rank in (None, self.global_rank):
            loss = loss * float("nan")
        self.log("val_loss", loss)


def test_divergence_stops_at_once_and_restores(tmp_path):
    guard = OverfitGuard(patience=50)
    pl.seed_everything(0, verbose=False)
    tr, va = digits_loaders()
    t = trainer(tmp_path, [guard], max_epochs=10)
    model = NaNValidation(nan_epoch=3)
    t.fit(model, tr, va)
    assert guard.stopped_reason == "divergence"
    assert t.current_epoch == 4
    assert guard.best_epoch == 2
    assert [k for k, _ in kinds(t)] == ["divergence", "stop", "restore_best"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_mode_max_on_accuracy(tmp_path):
    guard = OverfitGuard(monitor="val_acc", mode="max", patience=3)
    t, model, _ = fit(tmp_path, [guard], max_epochs=40)
    assert guard.stopped_reason == "patience"
    _, va = digits_loaders(**OVERFIT)
    (m,) = t.validate(model, va, verbose=False)
    assert m["val_acc"] == pytest.approx(guard.best, abs=1e-6)


@pytest.mark.parametrize(("criterion", "kw"), [("gl", {"gl_alpha": 5.0}), ("pq", {"pq_alpha": 0.5}), ("up", {})])
def test_prechelt_criteria_stop(tmp_path, criterion, kw):
    guard = OverfitGuard(criterion=criterion, strip_length=3, up_strips=2, **kw)
    t, _, final = fit(tmp_path, [guard])
    assert guard.stopped_reason == criterion
    assert t.current_epoch < 60
    assert final == pytest.approx(guard.best, abs=1e-6)
    last = guard.history[-1]
    if criterion == "gl":
        assert last["gl"] > 5.0
    if criterion == "pq":
        assert last["pq"] > 0.5


def test_min_delta_relative(tmp_path):
    strict = OverfitGuard(patience=2, min_delta=0.5, min_delta_mode="rel")  # 50% better needed: stops very early
    t, _, _ = fit(tmp_path, [strict])
    assert strict.stopped_reason == "patience"
    assert t.current_epoch <= 4


def test_distribution_shift_is_flagged(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from tests.helpers import digits

    x, y = digits()
    tr = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32)
    shifted = DataLoader(TensorDataset(x[256:512], (y[256:512] + 3) % 10), batch_size=128)  # labels shifted
    guard = OverfitGuard(patience=3)
    t = trainer(tmp_path, [guard], max_epochs=3)
    t.fit(DigitsNet(lr=0.01), tr, shifted)
    (event,) = [e for e in event_stream(t).events if e.kind == "distribution_shift_suspected"]
    assert event.epoch <= 2  # within the first 3 evaluations
    assert event.data["val"] > 3 * event.data["train"]


def test_underfitting_is_diagnosed(tmp_path):
    guard = OverfitGuard(patience=3, stop=False, strip_length=3)
    pl.seed_everything(0, verbose=False)
    tr, va = digits_loaders(n_train=256)
    t = trainer(tmp_path, [guard], max_epochs=25)
    t.fit(DigitsNet(lr=1e-6, hidden=2), tr, va)  # far too small and too slow to learn anything
    assert any(k == "underfitting" for k, _ in kinds(t))


def test_restore_from_the_best_checkpoint_file(tmp_path):
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_loss", mode="min")
    guard = OverfitGuard(patience=3, snapshot="checkpoint")
    t, _, final = fit(tmp_path, [guard, ck], enable_checkpointing=True)
    assert final == pytest.approx(guard.best, abs=1e-6)
    (restore,) = [e for e in event_stream(t).events if e.kind == "restore_best"]
    assert restore.data["source"] == ck.best_model_path
    assert "best_weights" not in guard.state_dict()  # no host copy kept in this mode
    with pytest.raises(
        GuardConfigError,
        match=r"OverfitGuard\(snapshot='checkpoint'\) needs a ModelCheckpoint with "
        r"monitor='val_loss' and mode='min'",
    ):
        fit(tmp_path / "x", [OverfitGuard(snapshot="checkpoint")])


def test_resume_trajectory_equals_uninterrupted(tmp_path):
    def run(root, extra=(), ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        tr, va = digits_loaders(**OVERFIT)
        guard = OverfitGuard(patience=5)
        ck = ModelCheckpoint(dirpath=root / "ck", every_n_epochs=1, save_top_k=-1)
        t = trainer(root, [guard, ck, *extra], max_epochs=60, enable_checkpointing=True)
        torch.manual_seed(0)
        model = DigitsNet(lr=0.01, hidden=1024)
        t.fit(model, tr, va, ckpt_path=ckpt_path)
        return t, model, guard

    full_t, full_m, full_g = run(tmp_path / "full")
    run(tmp_path / "part", extra=[StopAfterEpoch(4)])  # interrupted after the best (epoch 2), before the stop
    ckpt = tmp_path / "part" / "ck" / "epoch=4-step=20.ckpt"
    res_t, res_m, res_g = run(tmp_path / "res", ckpt_path=str(ckpt))
    assert res_t.current_epoch == full_t.current_epoch
    assert (res_g.best, res_g.best_step, res_g.stopped_reason) == (full_g.best, full_g.best_step, "patience")
    assert json.dumps(res_g.history) == json.dumps(full_g.history)
    for a, b in zip(full_m.parameters(), res_m.parameters(), strict=True):
        assert torch.equal(a, b)  # the best weights seen before the interruption came back from the checkpoint
    key = lambda e: (e.guard, e.kind, e.step)  # noqa: E731
    assert [key(e) for e in event_stream(res_t).events] == [key(e) for e in event_stream(full_t).events]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"monitor": ""}, r"`monitor` must be a non-empty metric name, got ''"),
        ({"train_monitor": 3}, r"`train_monitor` must be a metric name or None, got 3"),
        ({"mode": "up"}, r"`mode` must be 'min', 'max' or None, got 'up'"),
        ({"min_delta_mode": "pct"}, r"`min_delta_mode` must be one of \('abs', 'rel'\), got 'pct'"),
        ({"criterion": "keras"}, r"`criterion` must be one of \('patience', 'gl', 'pq', 'up'\), got 'keras'"),
        (
            {"criterion": "gl", "mode": "max"},
            r"`criterion='gl'` needs a positive, lower-is-better metric \(mode='min'\)",
        ),
        ({"snapshot": "disk"}, r"`snapshot` must be one of \('memory', 'checkpoint'\), got 'disk'"),
        ({"patience": 0}, r"`patience` must be an int >= 1, got 0"),
        ({"min_delta": -1}, r"`min_delta` must be a number >= 0.0, got -1"),
        ({"gl_alpha": 0}, r"`gl_alpha` must be a number > 0.0, got 0"),
        ({"pq_alpha": float("inf")}, r"`pq_alpha` must be a number > 0.0, got inf"),
        ({"up_strips": 0}, r"`up_strips` must be an int >= 1, got 0"),
        ({"strip_length": 1}, r"`strip_length` must be an int >= 2, got 1"),
        ({"divergence_factor": 0.5}, r"`divergence_factor` must be a number > 1.0 or None, got 0.5"),
        ({"shift_ratio": 1.0}, r"`shift_ratio` must be a number > 1.0 or None, got 1.0"),
        ({"shift_evaluations": 0}, r"`shift_evaluations` must be an int >= 1, got 0"),
        ({"min_evaluations": 0}, r"`min_evaluations` must be an int >= 1, got 0"),
        ({"stop": "yes"}, r"`stop` must be a bool, got 'yes'"),
        ({"restore_best": 1}, r"`restore_best` must be a bool, got 1"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(GuardConfigError, match=match):
        OverfitGuard(**kwargs)


class DumpWeights(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_fit_end(self, trainer, pl_module):
        w = [p.detach().flatten().tolist() for p in pl_module.parameters()]
        Path(self.out, f"w{trainer.global_rank}.json").write_text(json.dumps(w))


@pytest.mark.ddp
@pytest.mark.parametrize("bad_rank", [1])
def test_ddp_divergence_on_one_rank_stops_every_rank(tmp_path, bad_rank):
    pl.seed_everything(0, verbose=False)
    tr, va = digits_loaders()
    guard = OverfitGuard(patience=50)
    t = trainer(tmp_path, [guard, DumpWeights(str(tmp_path))], max_epochs=10, devices=2, strategy="ddp_spawn")
    t.fit(NaNValidation(nan_epoch=3, rank=bad_rank), tr, va)
    w0, w1 = (json.loads((tmp_path / f"w{r}.json").read_text()) for r in (0, 1))
    assert w0 == w1  # both ranks restored the same best weights
    events = [e for e in read_jsonl(events_file(tmp_path)) if e["guard"] == "overfit_guard"]
    div = [e for e in events if e["kind"] == "divergence"]
    assert [(e["epoch"], e["ranks"]) for e in div] == [(3, [bad_rank])]
    assert [e["kind"] for e in events if e["kind"] in ("stop", "restore_best")] == ["stop", "restore_best"]
    assert [e["data"]["reason"] for e in events if e["kind"] == "stop"] == ["divergence"]


# ---------------------------------------------------------------------------------------------- issue 14 defects
class WithEpochMetrics(DigitsNet):
    """Logs what a user compares with mode='max': accuracy on both sides, and the loss per epoch."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = self.balanced_loss(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)  # keys train_loss_step and train_loss_epoch
        self.log("train_acc", (logits.argmax(-1) == y).float().mean(), on_step=True, on_epoch=True)
        return loss


def test_train_monitor_epoch_metric_is_read_at_epoch_end(tmp_path):
    """Main: `train_monitor="train_loss_epoch"` raised GuardConfigError at the first validation (Lightning validates
    before it aggregates the epoch's training metrics)."""
    guard = OverfitGuard(train_monitor="train_loss_epoch", patience=50)
    seen = []

    class Probe(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append(float(trainer.callback_metrics["train_loss_epoch"]))

    fit(tmp_path, [guard, Probe()], max_epochs=4, model=WithEpochMetrics(lr=0.01, hidden=1024))
    assert [h["train"] for h in guard.history] == pytest.approx(seen, rel=1e-6)  # each epoch's own mean
    assert seen == sorted(seen, reverse=True)


def test_train_monitor_missing_mid_epoch_is_refused_with_the_available_keys(tmp_path):
    guard = OverfitGuard(train_monitor="train_loss_epoch")
    pl.seed_everything(0, verbose=False)
    tr, va = digits_loaders(n_train=256, n_val=64)
    t = trainer(tmp_path, [guard], max_epochs=1, val_check_interval=0.5)
    with pytest.raises(GuardConfigError, match=r"`train_monitor` 'train_loss_epoch' was not logged; available"):
        t.fit(WithEpochMetrics(), tr, va)


def test_mode_max_diagnoses_overfitting_with_accuracy_on_both_sides(tmp_path):
    """Main: the gap was training LOSS minus validation ACCURACY and the test assumed lower-is-better: a run whose
    validation accuracy peaks and falls while training accuracy rises got no diagnosis."""
    guard = OverfitGuard(monitor="val_acc", train_monitor="train_acc_epoch", mode="max", patience=6)
    t, _, _ = fit(tmp_path, [guard], max_epochs=30, model=WithEpochMetrics(lr=0.01, hidden=1024))
    diagnosed = [e for e in event_stream(t).events if e.kind == "overfitting"]
    assert diagnosed, [(h["val"], h["train"]) for h in guard.history]
    row = diagnosed[0].data
    assert row["val"] < row["best"]  # accuracy: validation fell below its best
    assert row["train"] > row["val"]
    assert row["gap"] == pytest.approx(row["train"] - row["val"])
    assert all(math.isfinite(h["gap"]) for h in guard.history)


def test_mode_max_with_the_training_loss_has_no_mixed_gap(tmp_path):
    guard = OverfitGuard(monitor="val_acc", mode="max", patience=50)
    fit(tmp_path, [guard], max_epochs=3)
    assert all(math.isnan(h["gap"]) for h in guard.history)  # a loss and an accuracy are not subtracted


class Interrupt(Callback):
    def __init__(self, epoch, error):
        self.epoch, self.error = epoch, error

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise self.error


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("data loader died")], ids=["ctrl_c", "error"])
def test_best_weights_are_restored_when_the_run_is_interrupted(tmp_path, error):
    """Main: KeyboardInterrupt or an exception ended the run without the restore the docs promise."""
    guard = OverfitGuard(patience=50)
    model = DigitsNet(lr=0.01, hidden=1024)
    pl.seed_everything(0, verbose=False)
    tr, va = digits_loaders(**OVERFIT)
    t = trainer(tmp_path, [guard, Interrupt(12, error)], max_epochs=30)
    # Lightning 2.6 ends the process on Ctrl-C (SystemExit 1) after its on_exception hooks; an error is re-raised
    expected = (SystemExit, "1") if isinstance(error, KeyboardInterrupt) else (RuntimeError, "data loader died")
    with pytest.raises(expected[0], match=expected[1]):
        t.fit(model, tr, va)
    assert guard.best_epoch < 11  # the last weights are not the best ones
    (metrics,) = trainer(tmp_path / "v", []).validate(model, va, verbose=False)
    assert metrics["val_loss"] == pytest.approx(guard.best, abs=1e-6)
    restores = [e for e in read_jsonl(events_file(tmp_path)) if e["kind"] == "restore_best"]
    assert len(restores) == 1
    assert type(error).__name__ in restores[0]["message"]


def test_checkpoint_snapshot_reports_the_step_it_restored(tmp_path):
    """Main: snapshot='checkpoint' restored ModelCheckpoint's best file and reported the guard's best epoch, which
    can be another one (here ModelCheckpoint keeps only every 3rd epoch)."""
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_loss", mode="min", every_n_epochs=3, save_top_k=1)
    guard = OverfitGuard(patience=50, snapshot="checkpoint")
    t, _, final = fit(tmp_path, [guard, ck], max_epochs=9, enable_checkpointing=True)
    (event,) = [e for e in event_stream(t).events if e.kind == "restore_best"]
    restored = torch.load(ck.best_model_path, weights_only=False)
    assert event.data["restored_step"] == restored["global_step"]
    assert event.data["restored"] == pytest.approx(float(ck.best_model_score))
    assert final == pytest.approx(float(ck.best_model_score), abs=1e-5)
    if restored["global_step"] != guard.best_step:
        assert f"OverfitGuard's best was step {guard.best_step}" in event.message
