"""The second do-no-harm round: harm that ordinary scripts met outside the matrix, each reproduced as measured on main.

A NaN batch that GradientGuard skipped left NaN in BatchNorm's running statistics (validation NaN for the rest of the
run); each test here failed on main before its fix.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import (
    ClassBalance,
    CompressExport,
    GradientGuard,
    GuardConfigError,
    GuardRuntimeError,
    OOMGuard,
    OverfitGuard,
    WarmupCosine,
    emit,
    event_stream,
)
from lightning_guard.events import EVENTS_FILENAME, RUNS_DIRNAME, GuardEvent
from lightning_guard.testing import InjectNaN
from tests.helpers import DigitsNet, digits_loaders, precision_kwargs, read_jsonl, trainer
from tests.workloads.digits_conv import DigitsConvNet, digits_image_loaders

NAN_STEP = 5


class BufferProbe(pl.Callback):
    """Records the BatchNorm buffers before and after the optimizer step ``step``, and every rank's final buffers."""

    def __init__(self, step: int, out: Path | None = None) -> None:
        self.step, self.out = step, out
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def _buffers(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.named_buffers()}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            self.before = self._buffers(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step + 1:
            self.after = self._buffers(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.out is not None:
            torch.save(
                {
                    "final": self._buffers(pl_module),
                    "before": self.before,
                    "after": self.after,
                    "val_loss": float(trainer.callback_metrics["val_loss"]),
                },
                self.out / f"rank{trainer.global_rank}.pt",
            )


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_skipped_nan_batch_leaves_batchnorm_as_before_the_step(tmp_path, precision):
    """Main: nonfinite_skip reported, but running_mean/var were NaN from the step on (val_loss NaN, accuracy 0.1)."""
    tr, va = digits_image_loaders(n_train=256, n_val=128)
    probe = BufferProbe(NAN_STEP)
    guard = GradientGuard()
    torch.manual_seed(0)
    model = DigitsConvNet()
    trainer(
        tmp_path, [guard, InjectNaN("batch", steps=[NAN_STEP]), probe], max_epochs=2, **precision_kwargs(precision)
    ).fit(model, tr, va)
    assert guard.counts.get("nonfinite_skip") == 1
    assert probe.before
    assert probe.after
    for name, before in probe.before.items():  # the skipped step wrote nothing: not the statistics, not the count
        assert torch.equal(probe.after[name], before), name
    for name, buf in model.named_buffers():
        assert torch.isfinite(buf.float()).all(), name
    assert math.isfinite(float(model.trainer.callback_metrics["val_loss"]))


@pytest.mark.ddp
@pytest.mark.parametrize("rank", [0, 1])
def test_a_nan_batch_on_one_ddp_rank_leaves_no_nan_in_any_ranks_batchnorm(tmp_path, rank):
    """Main: a NaN batch on rank 0 reached every rank's BatchNorm (DDP broadcasts rank 0's buffers): accuracy 0.13."""
    tr, va = digits_image_loaders(n_train=256, n_val=128)
    torch.manual_seed(0)
    model = DigitsConvNet()
    cbs = [GradientGuard(), InjectNaN("batch", steps=[NAN_STEP], ranks=[rank]), BufferProbe(NAN_STEP, tmp_path)]
    trainer(tmp_path, cbs, devices=2, strategy="ddp_spawn", max_epochs=2).fit(model, tr, va)
    for r in (0, 1):
        seen = torch.load(tmp_path / f"rank{r}.pt")
        assert math.isfinite(seen["val_loss"])
        for name, buf in seen["final"].items():
            assert torch.isfinite(buf.float()).all(), (r, name)
        assert torch.equal(
            seen["after"]["features.1.num_batches_tracked"], seen["before"]["features.1.num_batches_tracked"]
        )


# ------------------------------------------------------------------------------------ OverfitGuard's direction
def test_overfit_guard_reads_the_direction_from_the_monitored_name():
    """Main: OverfitGuard(monitor="val_acc") minimised accuracy and restored the worst weights (0.114 vs 0.543)."""
    assert OverfitGuard(monitor="val_acc").mode == "max"
    assert OverfitGuard(monitor="val_loss").mode == "min"
    assert OverfitGuard(monitor="val_score", mode="max").mode == "max"
    with pytest.raises(GuardConfigError, match=r"OverfitGuard cannot tell from its name whether `monitor='val_score'`"):
        OverfitGuard(monitor="val_score")
    with pytest.raises(GuardConfigError, match=r"`mode` must be 'min', 'max' or None, got 'up'"):
        OverfitGuard(mode="up")  # type: ignore[arg-type]


class Sabotage(pl.Callback):
    """Scrambles the weights after validation ``at`` (as a bad LR would): validation falls to chance from there."""

    def __init__(self, at: int) -> None:
        self.at, self.seen = at, 0

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen += 1
        if self.seen == self.at:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.mul_(-3.0)


def test_overfit_guard_on_val_acc_restores_the_most_accurate_weights(tmp_path):
    tr, va = digits_loaders(n_train=256, n_val=128)
    guard = OverfitGuard(monitor="val_acc", patience=2)
    torch.manual_seed(0)
    model = DigitsNet()
    trainer(tmp_path, [guard, Sabotage(at=3)], max_epochs=6).fit(model, tr, va)
    accs = [h["val"] for h in guard.history]
    assert guard.best == max(accs) > min(accs) + 0.3  # the best is the highest accuracy, not the lowest
    restore = [e for e in event_stream(model.trainer).events if e.kind == "restore_best"]
    assert len(restore) == 1
    assert restore[0].data["best"] == max(accs)
    assert restore[0].data["final"] < restore[0].data["best"]  # compared before restoring, and said so
    final = model.trainer.validate(model, va, verbose=False)[0]["val_acc"]
    assert final == pytest.approx(max(accs), abs=1e-6)


def test_overfit_guard_keeps_final_weights_that_are_not_worse_than_the_best(tmp_path):
    """With min_delta the best is not updated by a small gain: restoring it would go back to worse weights."""
    tr, va = digits_loaders(n_train=256, n_val=128)
    guard = OverfitGuard(monitor="val_loss", min_delta=10.0)  # only the first validation counts as an improvement
    torch.manual_seed(0)
    model = DigitsNet()
    trainer(tmp_path, [guard], max_epochs=3).fit(model, tr, va)
    before = [p.detach().clone() for p in model.parameters()]
    assert guard.history[-1]["val"] < guard.best  # the final weights are better than the recorded best
    kinds = [e.kind for e in event_stream(model.trainer).events]
    assert "kept_final" in kinds
    assert "restore_best" not in kinds
    for a, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_model_at_chance_level_is_not_called_overfitting(tmp_path, seed):
    """Main: `overfitting` at the second or third validation while training and validation were at chance level."""
    tr, va = digits_loaders(n_train=256, n_val=128)
    guard = OverfitGuard(monitor="val_acc", patience=10)
    torch.manual_seed(seed)
    model = DigitsNet(lr=3e-5)  # learns next to nothing in 3 epochs
    trainer(tmp_path, [guard], max_epochs=3).fit(model, tr, va)
    assert max(h["val"] for h in guard.history) < 0.25
    assert "overfitting" not in [e.kind for e in event_stream(model.trainer).events]


def test_a_model_that_memorises_its_training_set_is_still_called_overfitting(tmp_path):
    tr, va = digits_loaders(n_train=256, n_val=128)
    x, y = va.dataset.tensors
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]  # nothing to generalise to
    va = DataLoader(TensorDataset(x, shuffled), batch_size=32)
    guard = OverfitGuard(monitor="val_acc", patience=10)
    torch.manual_seed(0)
    model = DigitsNet()
    trainer(tmp_path, [guard], max_epochs=4).fit(model, tr, va)
    assert guard.history[-1]["train"] < 0.5 * guard.history[0]["train"]
    assert "overfitting" in [e.kind for e in event_stream(model.trainer).events]


# ---------------------------------------------------------------------------------------- the crash checkpoint
class CrashAt(pl.Callback):
    """Raises at optimizer step ``step`` (after the step ran), keeping the weights of that moment."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            raise RuntimeError("crash for the test")


class WeightsAtStart(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.step = trainer.global_step


def test_the_crash_checkpoint_holds_the_weights_of_the_crash_and_the_best_are_restored_after_it(tmp_path):
    """Main: OnExceptionCheckpoint saved global_step=47 with the step-40 best weights (two points of the run)."""
    tr, va = digits_image_loaders(n_train=256, n_val=128)  # 8 steps an epoch
    crash = CrashAt(step=21)
    guard = OverfitGuard(monitor="val_loss")
    torch.manual_seed(0)
    model = DigitsConvNet()
    t = trainer(tmp_path, [guard, crash, OnExceptionCheckpoint(str(tmp_path))], max_epochs=4, enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="crash for the test"):
        t.fit(model, tr, va)
    ckpt = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)
    assert ckpt["global_step"] == 21
    for name, value in crash.weights.items():  # the checkpoint is the run at the crash, BatchNorm counters too
        assert torch.equal(ckpt["state_dict"][name], value), name
    assert guard.best_step in (8, 16)
    kinds = [e.kind for e in event_stream(t).events]
    assert "restore_best" in kinds  # the in-memory model got the best weights, after the checkpoint was written
    assert not torch.equal(
        model.state_dict()["features.1.num_batches_tracked"], crash.weights["features.1.num_batches_tracked"]
    )

    start = WeightsAtStart()  # a resume starts from that one point of the run
    resumed_guard = OverfitGuard(monitor="val_loss")
    torch.manual_seed(0)
    resumed = DigitsConvNet()
    trainer(tmp_path / "resume", [resumed_guard, start], max_epochs=4).fit(
        resumed, tr, va, ckpt_path=str(tmp_path / "on_exception.ckpt")
    )
    assert start.step == 21
    for name, value in crash.weights.items():
        assert torch.equal(start.weights[name], value), name


# ---------------------------------------------------------------------------------- CompressExport, per format
def test_a_failed_onnx_does_not_fail_a_verified_pt2_and_everything_is_reported(tmp_path, caplog, capsys):
    """Main: the ONNX int8 error exceeded its fixed tolerance, the whole export was marked failed although the .pt2
    verified: nothing on the console, no report, `result` None, `model.onnx` left under its normal name."""
    tr, va = digits_image_loaders(n_train=256, n_val=128)
    out = tmp_path / "out"
    ce = CompressExport(
        dirpath=str(out),
        monitor="val_acc",
        formats=("pt2", "onnx"),
        max_metric_drop=1.0,
        prune=None,
        onnx_int8_tolerance=1e-9,  # no int8 file reproduces fp32 outputs this closely: the ONNX must be rejected
    )
    torch.manual_seed(0)
    t = trainer(tmp_path, [GradientGuard(), ce], max_epochs=1)
    caplog.clear()
    capsys.readouterr()
    t.fit(DigitsConvNet(), tr, va)
    printed = capsys.readouterr().out
    assert ce.result is not None
    assert set(ce.result.artifacts) == {"pt2"}
    assert (out / "model.pt2").exists()
    assert not (out / "model.onnx").exists()  # cannot be mistaken for a verified file
    assert (out / "model.onnx.rejected").exists()
    assert "onnx" in ce.result.rejected
    assert "> tolerance 1e-09" in ce.result.rejected["onnx"]
    report = json.loads((out / "compress_report.json").read_text())
    assert set(report["rejected"]) == {"onnx"}
    assert "lightning_guard: compression (val_acc)" in printed  # the table, with the reason under it
    assert "model.onnx does not reproduce" in printed
    summary = printed.split("lightning_guard: what the guards did")[1]  # the fit-end summary comes after compression
    assert "verify_failed" in summary
    assert "exported" in summary
    assert "GPU available" not in caplog.text  # the nested evaluation Trainers are quiet
    assert "Tip:" not in caplog.text
    assert "[torch.onnx]" not in printed


def test_a_failed_compression_still_writes_its_report_and_table(tmp_path, capsys):
    tr, va = digits_loaders(n_train=128, n_val=64)
    out = tmp_path / "out"
    ce = CompressExport(dirpath=str(out), monitor="val_f1", mode="max")  # never logged: the search fails
    trainer(tmp_path, [ce], max_epochs=1).fit(DigitsNet(), tr, va)
    assert "val_f1" in str(ce.error)
    report = json.loads((out / "compress_report.json").read_text())
    assert "`monitor='val_f1'` is not logged" in report["error"]
    assert "is not logged by the validation loop" in capsys.readouterr().out


# ------------------------------------------------------------------------------- refusals, all at once
def test_every_set_up_problem_is_refused_together_in_one_error(tmp_path):
    """Main: the LM script took three restarts, one refusal each: gradient_clip_val (GradientGuard),
    accumulate_grad_batches (OOMGuard), a user LR scheduler (WarmupCosine). Now the two left are told together."""
    tr, va = digits_loaders(n_train=64, n_val=32)
    steps = []
    t = trainer(
        tmp_path,
        [WarmupCosine(warmup=0.1), GradientGuard(), OOMGuard(), StepCounter(steps)],
        gradient_clip_val=1.0,
        accumulate_grad_batches=2,
    )
    with pytest.raises(GuardConfigError) as err:
        t.fit(DigitsNet(scheduler=True), tr, va)
    message = str(err.value)
    assert message.startswith(
        "lightning_guard refuses this set-up, 2 problems:\n  1. WarmupCosine sets the learning rate"
    )
    assert "\n  2. GradientGuard clips gradients itself (spike_action='clip') but the Trainer also has" in message
    assert "OOMGuard" not in message  # accumulate_grad_batches is supported now (tests/callbacks/...accumulate.py)
    assert steps == []  # refused before the first optimizer step


class StepCounter(pl.Callback):
    def __init__(self, steps: list[int]) -> None:
        self.steps = steps

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        self.steps.append(trainer.global_step)


def test_without_a_logger_each_run_has_its_own_event_file_and_every_line_its_run_id(tmp_path):
    """Main: with logger=False a two-run sweep was one guard_events.jsonl with restarting steps and no run id. Now
    each fit writes ``guard_logs/<start>-<run_id>/guard_events.jsonl`` under ``default_root_dir`` (sorted by start
    time), each line names its run, and ``trainer.validate`` after a fit writes to the fit's file."""
    tr, va = digits_loaders(n_train=64, n_val=32)
    for seed in (0, 1):
        torch.manual_seed(seed)
        t = trainer(tmp_path, [GradientGuard(), InjectNaN("loss", steps=[1]), EmitAtValidateEnd()])
        t.fit(DigitsNet(), tr, va)
        t.validate(t.lightning_module, va)
    files = sorted((tmp_path / RUNS_DIRNAME).glob(f"*/{EVENTS_FILENAME}"))
    assert len(files) == 2
    assert not (tmp_path / EVENTS_FILENAME).exists()
    for path in files:
        lines = read_jsonl(path)
        assert {line["run_id"] for line in lines} == {path.parent.name.rsplit("-", 1)[1]}
        assert [x["kind"] for x in lines].count("nonfinite_skip") == 1
        assert [x["kind"] for x in lines].count("validated") == 1  # trainer.validate's event, in the fit's file


class EmitAtValidateEnd(pl.Callback):
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            emit(trainer, GuardEvent.at(trainer, "probe", "validated", message="trainer.validate ran"))


class RecordWarnings(pl.Callback):
    """Inside each ddp_spawn worker: the warnings the fit raised, written to ``rank<k>.warnings``."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._seen = self._catcher.__enter__()
        warnings.simplefilter("always")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catcher.__exit__(None, None, None)
        text = "\n".join(str(w.message) for w in self._seen)
        (self.out / f"rank{trainer.global_rank}.warnings").write_text(text)


@pytest.mark.ddp
def test_class_balance_logs_under_ddp_without_sync_dist_warnings(tmp_path):
    """Main: ClassBalance's own log_dict made Lightning warn about sync_dist 11 times per DDP run."""
    tr, va = digits_loaders(n_train=128, n_val=64)
    cbs = [ClassBalance(), RecordWarnings(tmp_path)]
    trainer(tmp_path, cbs, devices=2, strategy="ddp_spawn", max_epochs=2).fit(DigitsNet(), tr, va)
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.warnings").read_text()
        assert "guard/class_balance" not in text


# ------------------------------------------------ buffers the first fix missed (found by the hostile review)
class MaskedConvNet(DigitsConvNet):
    """A persistent additive mask with -inf entries (hand-written attention code keeps one): legitimately infinite."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + torch.softmax(self.mask, dim=-1).unsqueeze(0).unsqueeze(0) * 0.0  # reads the mask, changes nothing
        return super().forward(x)


def test_a_buffer_that_is_infinite_by_design_does_not_make_steps_non_finite(tmp_path):
    """Review: every step of a clean run was skipped ("non-finite buffers") and the guard gave up at step 11."""
    tr, va = digits_image_loaders(n_train=128, n_val=64)
    guard = GradientGuard()
    torch.manual_seed(0)
    guarded = MaskedConvNet()
    trainer(tmp_path / "g", [guard], max_epochs=2).fit(guarded, tr, va)
    torch.manual_seed(0)
    plain = MaskedConvNet()
    trainer(tmp_path / "p", [], max_epochs=2).fit(plain, tr, va)
    assert guard.counts == {}
    for a, b in zip(guarded.state_dict().values(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b)


class ReassignedEMA(DigitsConvNet):
    """An EMA of the features kept in a persistent buffer that the forward replaces (the usual way to write one)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("feature_ema", torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training:
            self.feature_ema = 0.9 * self.feature_ema + 0.1 * out.detach().mean(0)
        return out


def test_a_buffer_the_forward_replaces_is_put_back_too(tmp_path):
    """Review: a NaN batch left the replaced EMA NaN: 3 skips and a rollback to step 0 (11 of 16 steps skipped
    without rollback)."""
    tr, va = digits_image_loaders(n_train=256, n_val=128)
    probe = BufferProbe(NAN_STEP)
    guard = GradientGuard()
    torch.manual_seed(0)
    model = ReassignedEMA()
    trainer(tmp_path, [guard, InjectNaN("batch", steps=[NAN_STEP]), probe], max_epochs=2).fit(model, tr, va)
    assert guard.counts == {"nonfinite_skip": 1}
    assert torch.equal(probe.after["feature_ema"], probe.before["feature_ema"])
    assert torch.isfinite(model.feature_ema).all()


class TwoOptimizers(DigitsConvNet):
    """Manual optimization, GAN-style: one forward and one step per optimizer in each batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():
            loss = torch.nn.functional.cross_entropy(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.AdamW(self.features.parameters(), lr=3e-3),
            torch.optim.AdamW(self.classifier.parameters(), lr=3e-3),
        ]


def test_with_two_optimizers_in_a_batch_each_skip_restores_the_batchs_buffers(tmp_path):
    """Review: the second optimizer's skip restored nothing (its capture was dropped after the first): NaN BatchNorm
    statistics, five more skips and a rollback to step 0."""
    tr, va = digits_image_loaders(n_train=256, n_val=128)
    guard = GradientGuard()
    torch.manual_seed(0)
    model = TwoOptimizers()
    # two optimizer steps a batch: global_step is even at each batch start, so the NaN goes into batch 2 (step 4)
    trainer(tmp_path, [guard, InjectNaN("batch", steps=[4])], max_epochs=2).fit(model, tr, va)
    assert guard.counts.get("rollback", 0) == 0
    assert 1 <= guard.counts.get("nonfinite_skip", 0) <= 2  # the poisoned batch, for each of its two optimizer steps
    for name, buf in model.named_buffers():
        assert torch.isfinite(buf.float()).all(), name


def test_strict_compression_that_rejects_a_format_raises_after_printing_everything(tmp_path, capsys):
    """Review: with strict=True and the ONNX rejected, the fit raised before the guards' summary was printed."""
    tr, va = digits_image_loaders(n_train=128, n_val=64)
    ce = CompressExport(
        dirpath=str(tmp_path / "out"),
        monitor="val_acc",
        formats=("pt2", "onnx"),
        max_metric_drop=1.0,
        prune=None,
        onnx_int8_tolerance=1e-9,
        strict=True,
    )
    with pytest.raises(GuardRuntimeError, match=r"the exported model.onnx does not reproduce"):
        trainer(tmp_path, [GradientGuard(), ce], max_epochs=1).fit(DigitsConvNet(), tr, va)
    printed = capsys.readouterr().out
    assert "lightning_guard: compression (val_acc)" in printed
    assert "verify_failed" in printed.split("lightning_guard: what the guards did")[1]
    assert (tmp_path / "out" / "model.onnx.rejected").exists()
