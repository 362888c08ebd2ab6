"""GradientGuard and the LR machinery on the issue-13 defects: the GradScaler under deliberate skips, rollback
restoring schedulers and the guard's statistics, callback order, accumulation, per-optimizer schedules."""

import math
from collections import Counter
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from lightning_guard import GradientGuard, WarmupCosine, WarmupCosineLR, event_stream
from lightning_guard.callbacks._snapshot import Snapshot
from lightning_guard.testing import InjectNaN, LossSpike, LRSpike, ScaleOverflow
from tests.helpers import DigitsNet, digits_loaders, trainer


def guard_events(t, kinds=None):
    return [e for e in event_stream(t).events if e.guard == "gradient_guard" and (kinds is None or e.kind in kinds)]


class Fused(DigitsNet):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, fused=True)


class ScalerTrace(Callback):
    """(scale, growth tracker) after every batch."""

    def __init__(self) -> None:
        self.trace: list[tuple[float, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        scaler = trainer.precision_plugin.scaler
        self.trace.append((float(scaler.get_scale()), int(scaler._growth_tracker.item())))


def _fp16(growth_interval: int = 4) -> dict[str, Any]:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=growth_interval)
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused_adamw"])
def test_a_deliberate_skip_leaves_the_loss_scale_as_an_applied_step(tmp_path, fused):
    """Skipped spikes (finite gradients) must not lower the scale: the trace equals the unguarded run's, where the
    same steps were applied. Before: every skip halved the scale (65536 -> 256 in 400 steps on a clean run)."""
    tr, va = digits_loaders(n_train=640)  # 20 steps
    net = Fused if fused else DigitsNet
    traces, counts = [], []
    for guard in ([GradientGuard(spike_action="skip", warmup_steps=4, rollback_z=None)], []):
        trace = ScalerTrace()
        t = trainer(tmp_path, [*guard, LossSpike(factor=8.0, steps=[8, 12, 16]), trace], **_fp16())
        t.fit(net(lr=1e-3), tr, va)
        traces.append(trace.trace)
        counts.append(Counter(e.kind for e in guard_events(t)))
    assert counts[0]["spike_skip"] == 3
    assert counts[0]["rollback"] == 0
    assert traces[0] == traces[1]
    assert traces[0][-1] == (2.0**8 * 2**5, 0)  # grew every 4 clean steps: 20 steps, no overflow


def test_skips_after_a_rollback_leave_the_loss_scale_alone(tmp_path):
    """The issue's 16-mixed case: NaN at steps 5-7 and skip_after_rollback; before, every skip halved the scale (it
    fell to 0) and the run ended at chance. The rollback restores the scaler of its snapshot (step 4), the overflow
    of step 7 halves it once, and the 20 skips that follow let it count clean steps as applied ones would."""
    tr, va = digits_loaders(n_train=1280)  # 40 steps
    trace = ScalerTrace()
    gg = GradientGuard(skip_after_rollback=20, snapshot_every=2)
    t = trainer(tmp_path, [gg, InjectNaN("loss", steps=[5, 6, 7]), trace], **_fp16(growth_interval=1000))
    t.fit(DigitsNet(), tr, va)
    (rb,) = guard_events(t, ["rollback"])
    assert (rb.step, rb.data["to_step"]) == (7, 4)
    assert trace.trace[:7] == [(256.0, 1), (256.0, 2), (256.0, 3), (256.0, 4), (256.0, 5), (128.0, 0), (64.0, 0)]
    assert trace.trace[7:] == [(128.0, i) for i in range(33)]
    assert float(t.callback_metrics["val_acc"]) > 0.5


def test_a_growing_loss_scale_is_no_loss_spike(tmp_path):
    """Lightning hands on_before_backward the loss times the GradScaler's scale: each growth of the scale doubled
    the loss the guard judged, a "spike" that it skipped (and that could start a rollback)."""
    tr, va = digits_loaders(n_train=640)
    gg = GradientGuard(warmup_steps=4)
    trace = ScalerTrace()
    t = trainer(tmp_path, [gg, trace], **_fp16(growth_interval=2))
    t.fit(DigitsNet(lr=1e-3), tr, va)
    assert trace.trace[-1][0] == 2.0**8 * 2**10  # the scale doubled 10 times
    assert guard_events(t) == []
    assert 1.0 < gg._loss_stats[0].mean < 3.0  # the statistics are of the loss itself


def test_a_user_scheduler_is_restored_with_the_rollback(tmp_path):
    """CosineAnnealingLR went on from a stale LR after a rollback (about 2x too high): its state and the LR are the
    snapshot's, once Lightning has stepped it for the rollback's batch."""

    class Cosine(DigitsNet):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Record(Callback):
        def __init__(self):
            self.rows: dict[int, tuple[int, float]] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sched = trainer.lr_scheduler_configs[0].scheduler
            self.rows[trainer.global_step] = (sched.last_epoch, trainer.optimizers[0].param_groups[0]["lr"])

    tr, va = digits_loaders(n_train=640)
    gg = GradientGuard(snapshot_every=4, rollback_after=2)
    rec = Record()
    t = trainer(tmp_path, [gg, InjectNaN("loss", steps=[9, 10]), rec])
    t.fit(Cosine(), tr, va)
    (rb,) = guard_events(t, ["rollback"])
    assert (rb.step, rb.data["to_step"]) == (10, 8)
    assert rec.rows[11] == rec.rows[8]  # after the rollback's batch: the scheduler and LR of the snapshot (step 8)
    assert rec.rows[12][0] == rec.rows[8][0] + 1


def test_an_lr_scale_keeps_the_decay_of_a_step_the_scaler_skipped(tmp_path):
    """ExponentialLR lost a decay for good when an LR scale was active on a step the GradScaler skipped."""

    class Exp(DigitsNet):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    tr, va = digits_loaders(n_train=320)  # 10 steps
    faults = [LRSpike(factor=2.0, steps=[4]), ScaleOverflow(steps=[4])]
    t = trainer(tmp_path, [GradientGuard(), *faults], **_fp16())
    t.fit(Exp(), tr, va)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**10)


@pytest.mark.parametrize("order", ["guard_first", "schedule_first"])
def test_the_order_of_callbacks_does_not_matter(tmp_path, order):
    """GradientGuard before WarmupCosine took its first snapshot with the configured base LR: after a rollback to it
    the first step ran at 100x the scheduled LR. Both orders now give the same weights, bit for bit."""
    tr, va = digits_loaders(n_train=640)
    results = []
    for first in (True, False):
        gg, wc = GradientGuard(rollback_after=2, snapshot_every=50), WarmupCosine(warmup=10)
        cbs = [gg, wc] if first else [wc, gg]
        t = trainer(tmp_path, [*cbs, InjectNaN("loss", steps=[2, 3])])
        torch.manual_seed(0)
        model = DigitsNet()
        t.fit(model, tr, va)
        assert [e.data["to_step"] for e in guard_events(t, ["rollback"])] == [0]
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_accumulation_captures_once_per_optimizer_step(tmp_path, monkeypatch):
    """A full host copy was retaken on every micro-batch until the next optimizer step (9 where 3 were due)."""
    captured = []
    original = Snapshot.capture

    def counting(self, module, optimizers, scaler, applied_steps, step):
        captured.append(list(applied_steps))
        return original(self, module, optimizers, scaler, applied_steps, step)

    monkeypatch.setattr(Snapshot, "capture", counting)
    tr, va = digits_loaders(n_train=384)  # 12 micro-batches: 4 optimizer steps
    t = trainer(tmp_path, [GradientGuard(snapshot_every=1)], accumulate_grad_batches=3)
    t.fit(DigitsNet(), tr, va)
    assert captured == [[0], [1], [2], [3], [4]]  # the starting state, then once per optimizer step


def test_rollback_restores_the_guards_statistics(tmp_path):
    """The restored model is judged against statistics of its own time, not those of the damaged steps."""

    class Stats(Callback):
        def __init__(self, gg):
            self.gg, self.at = gg, {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.at[trainer.global_step] = (self.gg._stats[0].state_dict(), self.gg._loss_stats[0].state_dict())

    tr, va = digits_loaders(n_train=640)
    gg = GradientGuard(warmup_steps=3, snapshot_every=4, rollback_after=2)
    rec = Stats(gg)
    t = trainer(tmp_path, [gg, InjectNaN("loss", steps=[9, 10]), rec])
    t.fit(DigitsNet(), tr, va)
    (rb,) = guard_events(t, ["rollback"])
    assert rb.data["to_step"] == 8
    assert rec.at[11] == rec.at[8]  # statistics as they were when the snapshot was taken


def test_a_healthy_digits_run_gets_no_intervention(tmp_path):
    """A clean digits run (AdamW 3e-3, no faults) where the former defaults made 8 spike_clips and 2 lr_backoffs
    between steps 33 and 167 (early training's natural drift of the norm). Now: no event at all, the same weights as
    without the guard."""
    results = []
    for cbs in ([GradientGuard()], []):
        tr, va = digits_loaders(n_train=1024, batch_size=16)
        t = trainer(tmp_path, cbs, max_epochs=3)
        torch.manual_seed(0)
        model = DigitsNet(lr=3e-3)
        t.fit(model, tr, va)
        results.append((model, guard_events(t)))
    assert results[0][1] == []
    for a, b in zip(results[0][0].parameters(), results[1][0].parameters(), strict=True):
        assert torch.equal(a, b)


class TwoRates(DigitsNet):
    """Manual optimization: optimizer 0 steps every batch, optimizer 1 every fifth."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd", lr=0.1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        o0, o1 = self.optimizers()
        loss = self.balanced_loss(self(x), y)
        o0.zero_grad()
        o1.zero_grad()
        self.manual_backward(loss)
        o0.step()
        if batch_idx % 5 == 4:
            o1.step()

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.1),
            torch.optim.SGD(self.net[2].parameters(), lr=0.1),
        ]


def test_warmup_cosine_takes_one_length_per_optimizer(tmp_path):
    """An optimizer stepping 20 times against a total of 100 ended at 97% of its peak. With one length each, both
    reach their floor; with one length for both, a warning says so at the end."""
    tr, va = digits_loaders(n_train=1600, batch_size=16)  # 100 batches
    wc = WarmupCosine(warmup=2, total_steps=[100, 20])
    t = trainer(tmp_path, [wc])
    t.fit(TwoRates(), tr, va)
    assert [o.param_groups[0]["lr"] for o in t.optimizers] == [0.0, 0.0]
    assert not [e for e in event_stream(t).events if e.kind == "schedule_mismatch"]

    t = trainer(tmp_path, [WarmupCosine(warmup=2)])
    t.fit(TwoRates(), tr, va)
    (warn,) = [e for e in event_stream(t).events if e.kind == "schedule_mismatch"]
    assert warn.severity == "warning"
    assert "pass total_steps=[100, 20]" in warn.message
    assert t.optimizers[1].param_groups[0]["lr"] > 0.9 * 0.1


def test_warmup_cosine_total_steps_list_must_match_the_optimizers(tmp_path):
    from lightning_guard import GuardConfigError

    tr, va = digits_loaders()
    t = trainer(tmp_path, [WarmupCosine(total_steps=[10, 10])])
    with pytest.raises(GuardConfigError, match=r"`total_steps` has 2 values \(\[10, 10\]\) but the module has 1"):
        t.fit(DigitsNet(), tr, va)
    with pytest.raises(GuardConfigError, match=r"a list of positive ints \(one per optimizer\) or None, got \[10, 0\]"):
        WarmupCosine(total_steps=[10, 0])


def test_warmup_cosine_lr_does_not_count_fused_overflow_steps(tmp_path):
    class FusedSched(Fused):
        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)
            self.sched = WarmupCosineLR(opt, total_steps=10, warmup=2)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self.sched, "interval": "step"}}

    tr, va = digits_loaders(n_train=320)  # 10 steps, 2 of them overflow
    model = FusedSched(lr=1e-3)
    t = trainer(tmp_path, [ScaleOverflow(steps=[3, 6])], **_fp16())
    t.fit(model, tr, va)
    assert model.sched.real_steps == 8


def test_the_guard_brings_a_faulted_char_lm_back(tmp_path):
    """The issue's LM story at CI size (2-layer pre-LN transformer, bf16-mixed, 75 steps): NaN loss at steps 20-21 and
    one step at LR x100 at step 40. Unguarded the run ends in NaN; guarded it skips the NaNs, rolls back the damage to
    a snapshot taken before it (not to step 0) and ends within 3% of the clean run."""
    from tests.workloads import WORKLOADS

    def run(cbs):
        model, train, val, kwargs = WORKLOADS["char_lm"](seed=0, size="ci")
        t = trainer(tmp_path, cbs, precision="bf16-mixed", **kwargs)
        t.fit(model, train, val)
        return float(t.callback_metrics["val_loss"]), t

    faults = lambda: [InjectNaN("loss", steps=[20, 21]), LRSpike(100.0, steps=[40])]  # noqa: E731
    clean, _ = run([])
    broken, _ = run(faults())
    guarded, t = run([GradientGuard(), *faults()])
    assert not math.isfinite(broken)
    assert guarded <= clean * 1.03
    (rb,) = guard_events(t, ["rollback"])
    assert 0 < rb.data["to_step"] < 40 < rb.data["from_step"] <= 43


def test_a_rollback_does_not_back_off_the_lr_for_the_skips_it_undid(tmp_path):
    """The demo's story: a NaN batch, then one LR x1000 step whose damage is skipped twice and rolled back. The
    rollback counts once as instability; before, the skips it undid also triggered an LR backoff at the same step."""
    tr, va = digits_loaders(n_train=1280)
    t = trainer(
        tmp_path, [GradientGuard(snapshot_every=10), InjectNaN("loss", steps=[15]), LRSpike(1000.0, steps=[29])]
    )
    t.fit(DigitsNet(lr=3e-3), tr, va)
    kinds = [e.kind for e in guard_events(t)]
    assert kinds == ["nonfinite_skip", "spike_skip", "spike_skip", "rollback"]


class TwoHeads(DigitsNet):
    """Manual optimization, one backward per optimizer (toggle_optimizer); head 2's loss is 10x and NaN on chosen
    batches."""

    def __init__(self, nan_batches):
        super().__init__()
        self.automatic_optimization = False
        self.head2 = torch.nn.Linear(64, 10)
        self.nan_batches = set(nan_batches)

    def configure_optimizers(self):
        return [torch.optim.AdamW(self.net.parameters(), lr=1e-2), torch.optim.AdamW(self.head2.parameters(), lr=1e-2)]

    def training_step(self, batch, batch_idx):
        x, y = batch
        for i, opt in enumerate(self.optimizers()):
            self.toggle_optimizer(opt)
            loss = self.balanced_loss(self.net(x), y) if i == 0 else 10 * self.balanced_loss(self.head2(x), y)
            if i == 1 and batch_idx in self.nan_batches:
                loss = loss * float("nan")
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
            self.untoggle_optimizer(opt)


def test_each_optimizer_counts_its_own_bad_steps(tmp_path):
    """One optimizer's healthy steps reset the bad-step count of all: the second optimizer skipped NaN after NaN (60
    in a row) and never rolled back or gave up."""
    tr, va = digits_loaders(n_train=1280)
    t = trainer(tmp_path, [GradientGuard(warmup_steps=3, snapshot_every=4)])
    t.fit(TwoHeads(nan_batches=range(10, 14)), tr, va)
    kinds = [e.kind for e in guard_events(t)]
    assert kinds == ["nonfinite_skip"] * 3 + ["rollback", "nonfinite_skip"]


def test_a_noisy_small_batch_run_gets_no_warning(tmp_path):
    """Batches of 4: hard batches give loss z-scores above 12 and runs of loss spikes. Before, a loss spike followed
    by a norm spike was taken for damage (a warning skip and a rollback on a clean run); a huge loss alone was
    skipped. Only clips (info) remain."""
    tr, va = digits_loaders(n_train=640, batch_size=4)
    torch.manual_seed(0)
    t = trainer(tmp_path, [GradientGuard()], max_epochs=3)
    t.fit(DigitsNet(), tr, va)
    assert [(e.kind, e.step) for e in guard_events(t) if e.severity != "info"] == []


def test_a_users_instance_override_of_the_strategy_step_is_wrapped_and_put_back(tmp_path):
    """The runtime declined to wrap a strategy whose optimizer_step a user had patched on the instance, so a step
    the scaler skipped under an LR scale undid the scheduler's decay again."""

    class Exp(DigitsNet):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Patch(Callback):  # a profiling callback wrapping the strategy's step on the instance
        def setup(self, trainer, pl_module, stage):
            inner = trainer.strategy.optimizer_step
            self.wrapped = lambda *args, **kwargs: inner(*args, **kwargs)
            trainer.strategy.optimizer_step = self.wrapped

    patch = Patch()
    tr, va = digits_loaders(n_train=320)
    t = trainer(tmp_path, [GradientGuard(), patch, LRSpike(factor=2.0, steps=[4]), ScaleOverflow(steps=[4])], **_fp16())
    t.fit(Exp(), tr, va)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.9**10)
    assert t.strategy.__dict__["optimizer_step"] is patch.wrapped
