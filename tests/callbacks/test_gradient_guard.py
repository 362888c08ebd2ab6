import json
import math
from collections import Counter
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_guard import GradientExplosionError, GradientGuard, GuardConfigError, WarmupCosine, event_stream
from lightning_guard.functional import global_grad_norm
from lightning_guard.testing import InjectNaN, LossSpike, LRSpike
from tests.helpers import DigitsNet, StopAfterEpoch, digits_loaders, events_file, precision_kwargs, read_jsonl, trainer


class StepState(Callback):
    """Per optimizer step: first weight tensor, Adam's exp_avg and step count, after the step."""

    def __init__(self):
        self.after: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        p = next(pl_module.parameters())
        st = opt.state.get(p, {})
        self.after[trainer.global_step - 1] = (
            p.detach().clone(),
            st.get("exp_avg", torch.zeros(1)).clone(),
            float(st.get("step", torch.tensor(0.0))),
        )


def guard_events(t, kinds=None):
    return [e for e in event_stream(t).events if e.guard == "gradient_guard" and (kinds is None or e.kind in kinds)]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("target", ["loss", "batch"])
def test_nonfinite_is_a_true_skip(tmp_path, precision, target):
    tr, va = digits_loaders()
    state = StepState()
    gg = GradientGuard()
    t = trainer(
        tmp_path, [WarmupCosine(warmup=1), gg, InjectNaN(target, steps=[3]), state], **precision_kwargs(precision)
    )
    model = DigitsNet()
    t.fit(model, tr, va)
    assert t.global_step == 8  # training went on
    assert all(torch.isfinite(p).all() for p in model.parameters())
    w2, m2, s2 = state.after[2]
    w3, m3, s3 = state.after[3]
    assert torch.equal(w2, w3)  # neither the weights ...
    assert torch.equal(m2, m3)  # ... nor Adam's moments ...
    assert s2 == s3  # ... nor its step count moved
    assert not torch.equal(w3, state.after[4][0])  # the next step did
    (event,) = guard_events(t)
    assert (event.kind, event.step, event.severity) == ("nonfinite_skip", 3, "warning")
    assert event.data["top_layers"]  # the diagnosis names layers
    assert gg.runtime(t).applied_steps == [7]  # the schedule did not advance on the skip


def test_without_guard_nan_poisons_weights(tmp_path):
    """What Lightning does today (research exp2): gradient_clip_val clips NaN into NaN and the run 'finishes'."""
    tr, va = digits_loaders()
    model = DigitsNet()
    trainer(tmp_path, [InjectNaN("loss", steps=[3])], gradient_clip_val=1.0).fit(model, tr, va)
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_amp_overflow_is_info_and_not_an_explosion(tmp_path):
    tr, va = digits_loaders()
    gg = GradientGuard(rollback_after=1)
    t = trainer(tmp_path, [gg, InjectNaN("grad", steps=[2, 3], value=float("inf"))], **precision_kwargs("16-mixed"))
    t.fit(DigitsNet(), tr, va)
    kinds = [(e.kind, e.severity, e.step) for e in guard_events(t)]
    assert kinds == [("amp_overflow", "info", 2), ("amp_overflow", "info", 3)]  # no rollback: not counted as bad
    assert gg.runtime(t).applied_steps == [6]
    assert t.precision_plugin.scaler.get_scale() < 65536.0


def test_gradient_accumulation_skips_the_whole_step(tmp_path):
    tr, va = digits_loaders()
    state = StepState()
    gg = GradientGuard()
    t = trainer(tmp_path, [gg, InjectNaN("loss", steps=[1]), state], accumulate_grad_batches=2, max_epochs=2)
    t.fit(DigitsNet(), tr, va)
    assert t.global_step == 8
    assert torch.equal(state.after[0][0], state.after[1][0])
    assert [(e.kind, e.step) for e in guard_events(t)] == [("nonfinite_skip", 1)]


class NormProbe(Callback):
    """The global gradient norm each optimizer step really applies (runs after GradientGuard)."""

    def __init__(self):
        self.norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = global_grad_norm(grads).item() if grads else math.nan


def test_spike_is_clipped_to_the_adaptive_threshold(tmp_path):
    tr, va = digits_loaders(n_train=640, batch_size=32)  # 20 steps per epoch
    probe = NormProbe()
    gg = GradientGuard(warmup_steps=10, monitor_loss=False, rollback_z=None)
    t = trainer(tmp_path, [gg, LossSpike(factor=100.0, steps=[15]), probe])
    t.fit(DigitsNet(), tr, va)
    (clip,) = [e for e in guard_events(t, ["spike_clip"]) if e.step == 15]  # ZClip also trims natural spikes
    assert clip.data["z"] > 2.5
    assert clip.data["norm"] > 10 * probe.norms[14]
    assert probe.norms[15] == pytest.approx(clip.data["threshold"], rel=1e-4)  # applied norm == threshold
    assert clip.data["threshold"] < clip.data["norm"] / 10


def test_spike_skip_action_leaves_weights(tmp_path):
    tr, va = digits_loaders(n_train=640)
    state = StepState()
    gg = GradientGuard(spike_action="skip", z_threshold=6.0, warmup_steps=10, rollback_z=None)
    t = trainer(tmp_path, [gg, LossSpike(factor=100.0, steps=[15]), state])
    t.fit(DigitsNet(), tr, va)
    assert [(e.kind, e.step) for e in guard_events(t, ["spike_skip"])] == [("spike_skip", 15)]
    assert torch.equal(state.after[14][0], state.after[15][0])


def test_fixed_max_norm_clip(tmp_path):
    tr, va = digits_loaders()
    probe = NormProbe()
    gg = GradientGuard(max_norm=0.05)
    trainer(tmp_path, [gg, probe]).fit(DigitsNet(), tr, va)
    assert max(probe.norms.values()) <= 0.05 * (1 + 1e-5)
    assert gg.last_norm > gg.last_post_clip_norm == pytest.approx(0.05)


class EffectiveLR(Callback):
    """LR the SGD update really used: -delta_w / grad on the largest-gradient bias entry."""

    def __init__(self):
        self.used: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        b = pl_module.net[0].bias
        self._w, self._g = b.detach().clone(), None if b.grad is None else b.grad.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._g is None:  # a skipped step
            return
        i = self._g.abs().argmax()
        self.used[trainer.global_step - 1] = float((self._w - pl_module.net[0].bias.detach())[i] / self._g[i])


def test_lr_backoff_then_recovery_composes_with_the_schedule(tmp_path):
    tr, va = digits_loaders(n_train=1280)  # 40 steps
    eff = EffectiveLR()
    gg = GradientGuard(
        spike_action="skip",
        warmup_steps=10,
        backoff_after=2,
        backoff_window=10,
        backoff_factor=0.5,
        backoff_recovery=10,
        rollback_z=None,
        monitor_loss=False,
    )
    sched = WarmupCosine(warmup=1, total_steps=1000)  # nearly flat, so the backoff is visible
    t = trainer(tmp_path, [sched, gg, LossSpike(factor=100.0, steps=[12, 14]), eff])
    t.fit(DigitsNet(optimizer="sgd", lr=0.05), tr, va)
    kinds = [(e.kind, e.step) for e in guard_events(t)]
    # two skipped spikes are evidence of instability (a clipped or merely warned spike is not)
    assert kinds[:3] == [("spike_skip", 12), ("spike_skip", 14), ("lr_backoff", 14)]
    assert ("lr_recovered", 24) in kinds  # 10 applied steps: 15 (at x0.5) .. 24
    base = lambda s: 0.05 * sched.factor(s - 2)  # noqa: E731 - the schedule's LR at global step s (2 skipped)
    assert eff.used[13] == pytest.approx(0.05 * sched.factor(12), rel=1e-3)
    assert eff.used[15] == pytest.approx(0.5 * base(15), rel=1e-3)
    assert eff.used[16] == pytest.approx(0.5 * base(16) + 0.05 * base(16), rel=1e-3)  # 0.5 + 1 step of recovery
    assert eff.used[30] == pytest.approx(base(30), rel=1e-3)  # recovered
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(base(40))  # the backoff never leaks into the LR


def test_backoff_settings_changed_mid_fit_take_effect(tmp_path):
    """Review of the LrBackoff split: the backoff read its settings once at train start, so a factor changed mid-fit
    was reported in the event but not applied (and backoff_after=None still backed off). They are read live again."""
    tr, va = digits_loaders(n_train=1280)
    gg = GradientGuard(spike_action="skip", warmup_steps=10, backoff_after=2, backoff_window=10, backoff_factor=0.5)
    gg.rollback_z = None
    gg.monitor_loss = False

    class Retune(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 5:
                gg.backoff_factor = 0.1

    t = trainer(tmp_path, [gg, LossSpike(factor=100.0, steps=[12, 14]), Retune()])
    t.fit(DigitsNet(optimizer="sgd", lr=0.05), tr, va)
    backoff = [e for e in guard_events(t) if e.kind == "lr_backoff"]
    assert [e.data["factor"] for e in backoff] == [0.1]
    assert gg.runtime(t).lr_scale(0) < 0.5  # recovering from 0.1 (from 0.5 it would be above 0.5 by now)


def test_warned_and_clipped_spikes_never_back_off_the_lr(tmp_path):
    tr, va = digits_loaders(n_train=1280)
    events = []
    for action in ("warn", "clip"):
        gg = GradientGuard(
            spike_action=action,
            warmup_steps=10,
            backoff_after=2,
            backoff_window=10,
            rollback_z=None,
            monitor_loss=False,
        )
        t = trainer(tmp_path, [gg, LossSpike(factor=100.0, steps=[12, 14])])
        t.fit(DigitsNet(optimizer="sgd", lr=0.05), tr, va)
        events.append(Counter(e.kind for e in guard_events(t)))
    assert events[0]["spike_warn"] >= 2
    assert events[1]["spike_clip"] >= 2
    assert events[0]["lr_backoff"] == events[1]["lr_backoff"] == 0


def test_lr_spike_on_digits_guard_keeps_accuracy(tmp_path):
    """The issue's scenario: one step at LR x1000 on digits. Measured on CPU: clean 95.6%, no guard 78.6%,
    Lightning gradient_clip_val=1.0 80.4%, GradientGuard() 95.6% (two spike_skip, one rollback)."""

    def run(callbacks, **kw):
        pl.seed_everything(0, verbose=False)
        tr, va = digits_loaders(n_train=1200, n_val=597)
        t = trainer(tmp_path, callbacks, max_epochs=6, **kw)
        t.fit(DigitsNet(lr=3e-3, hidden=128), tr, va)
        return float(t.callback_metrics["val_acc"]), t

    clean, _ = run([])
    clipped, _ = run([LRSpike(1000.0, steps=[60])], gradient_clip_val=1.0)
    guarded, t = run([GradientGuard(snapshot_every=10), LRSpike(1000.0, steps=[60])])
    assert guarded >= clean - 0.02
    assert clipped < clean - 0.05  # Lightning's clipping does not undo a damaging update
    assert Counter(e.kind for e in guard_events(t))["rollback"] == 1


class ParamsAt(Callback):
    """Copies of all parameters at the end of chosen steps."""

    def __init__(self, steps):
        self.steps, self.params = set(steps), {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 in self.steps:
            self.params[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.parameters()]


def test_rollback_restores_the_validated_snapshot_bit_exactly(tmp_path):
    tr, va = digits_loaders(n_train=640)
    # snapshot after step 3 (4 applied steps), validated by step 4; NaN at steps 6, 7, 8 -> rollback at step 8
    probe = ParamsAt([3, 8])
    gg = GradientGuard(snapshot_every=4, rollback_after=3)
    t = trainer(tmp_path, [gg, InjectNaN("loss", steps=[6, 7, 8]), probe], **precision_kwargs("16-mixed"))
    t.fit(DigitsNet(), tr, va)
    (rb,) = guard_events(t, ["rollback"])
    assert (rb.step, rb.data["from_step"], rb.data["to_step"]) == (8, 8, 4)
    for a, b in zip(probe.params[3], probe.params[8], strict=True):
        assert torch.equal(a, b)
    assert gg.runtime(t).applied_steps[0] == 4 + 11  # rolled back to the snapshot's 4, then steps 9..19


def test_gives_up_with_a_diagnosis(tmp_path):
    tr, va = digits_loaders(n_train=640)
    gg = GradientGuard(rollback_after=2, max_rollbacks=1, snapshot_every=2)
    t = trainer(tmp_path, [gg, InjectNaN("grad", steps=list(range(5, 20)))])
    with pytest.raises(
        GradientExplosionError,
        match=r"GradientGuard gave up at step 8 \(2 bad steps\) after 1 "
        r"rollback\(s\) \(max_rollbacks=1\)\. Recent gradient norms: \[.*nan.*\]\. Largest gradient "
        r"norms by layer: \[\('net\.0\.weight', nan\)",
    ):
        t.fit(DigitsNet(), tr, va)
    kinds = [e["kind"] for e in read_jsonl(events_file(tmp_path)) if e["guard"] == "gradient_guard"]
    assert kinds == ["nonfinite_skip", "nonfinite_skip", "rollback", "nonfinite_skip", "nonfinite_skip", "gave_up"]


def test_resume_mid_run_equals_uninterrupted(tmp_path):
    tr, va = digits_loaders(n_train=640)  # 20 steps per epoch

    def run(root, extra=(), ckpt_path=None):
        gg = GradientGuard(warmup_steps=5, snapshot_every=7)
        faults = [LossSpike(factor=100.0, steps=[12, 30]), InjectNaN("loss", steps=[8, 26])]
        ck = ModelCheckpoint(dirpath=root / "ck", every_n_epochs=1, save_top_k=-1)
        t = trainer(root, [WarmupCosine(warmup=3), gg, *faults, ck, *extra], max_epochs=2, enable_checkpointing=True)
        torch.manual_seed(0)
        model = DigitsNet()
        t.fit(model, tr, va, ckpt_path=ckpt_path)
        return t, model, gg

    full_t, full_m, full_g = run(tmp_path / "full")
    run(tmp_path / "part", extra=[StopAfterEpoch(0)])
    (ckpt,) = (tmp_path / "part" / "ck").glob("*.ckpt")
    res_t, res_m, res_g = run(tmp_path / "res", ckpt_path=str(ckpt))
    for a, b in zip(full_m.parameters(), res_m.parameters(), strict=True):
        assert torch.equal(a, b)
    as_json = lambda g: json.dumps(g.state_dict() | {"snapshot_step": 0}, sort_keys=True)  # noqa: E731 - NaN-aware
    a_, b_ = json.loads(as_json(res_g)), json.loads(as_json(full_g))
    assert {k: (a_[k], b_[k]) for k in a_ if a_[k] != b_[k]} == {}
    assert as_json(res_g) == as_json(full_g)
    assert {"nonfinite_skip", "spike_skip"} <= set(full_g.counts)  # the resumed window holds real interventions
    key = lambda e: (e.guard, e.kind, e.step, e.message)  # noqa: E731
    assert [key(e) for e in event_stream(res_t).events] == [key(e) for e in event_stream(full_t).events]


def test_fused_adamw_under_16_mixed(tmp_path):
    """Lightning's clipping refuses fused optimizers under AMP; the guard clips and skips them correctly."""

    class Fused(DigitsNet):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)

    tr, va = digits_loaders()
    probe = NormProbe()
    gg = GradientGuard(max_norm=0.1)
    t = trainer(tmp_path, [gg, InjectNaN("loss", steps=[3]), probe], **precision_kwargs("16-mixed"))
    model = Fused()
    t.fit(model, tr, va)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [(e.kind, e.step) for e in guard_events(t)] == [("nonfinite_skip", 3)]
    scale = t.precision_plugin.scaler.get_scale()
    # grads are still scaled here (fused optimizers unscale inside step); the applied norm is max_norm * scale
    assert probe.norms[5] / scale <= 0.1 * 1.001
    assert gg.runtime(t).applied_steps == [7]


class TwoOpt(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Linear(64, 10), torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt, layer in zip(self.optimizers(), (self.a, self.b), strict=True):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(layer(x), y)
            if layer is self.b and self.trainer.global_step // 2 == 3:
                loss = loss * float("nan")
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)


def test_several_optimizers_are_guarded_separately(tmp_path):
    tr, va = digits_loaders()
    gg = GradientGuard()
    t = trainer(tmp_path, [gg])
    model = TwoOpt()
    t.fit(model, tr, va)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [e.kind for e in guard_events(t)] == ["nonfinite_skip"]
    assert gg.runtime(t).applied_steps == [8, 7]


def test_refuses_trainer_clipping_together_with_its_own(tmp_path):
    tr, va = digits_loaders()
    with pytest.raises(
        GuardConfigError,
        match=r"GradientGuard clips gradients itself \(spike_action='clip'\) but the "
        r"Trainer also has gradient_clip_val=1.0: remove `gradient_clip_val`",
    ):
        trainer(tmp_path, [GradientGuard()], gradient_clip_val=1.0).fit(DigitsNet(), tr, va)
    # skip/warn without max_norm compose with Trainer clipping
    trainer(tmp_path, [GradientGuard(spike_action="skip")], gradient_clip_val=1.0).fit(DigitsNet(), tr, va)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spike_action": "drop"}, r"`spike_action` must be one of \('clip', 'skip', 'warn'\), got 'drop'"),
        ({"z_threshold": 0}, r"`z_threshold` must be a number > 0.0, got 0"),
        ({"min_ratio": 0.5}, r"`min_ratio` must be a number >= 1.0, got 0.5"),
        ({"loss_min_rise": -0.1}, r"`loss_min_rise` must be a number >= 0.0, got -0.1"),
        ({"warmup_steps": 0}, r"`warmup_steps` must be an int >= 1, got 0"),
        ({"ema_alpha": 1.0}, r"`ema_alpha` must be a number > 0.0 and < 1.0, got 1.0"),
        ({"ema_alpha": 1.5}, r"`ema_alpha` must be a number > 0.0 and <= 1.0, got 1.5"),
        ({"max_norm": -1.0}, r"`max_norm` must be a number > 0.0, got -1.0"),
        ({"max_norm": float("nan")}, r"`max_norm` must be a number > 0.0, got nan"),
        ({"monitor_loss": 1}, r"`monitor_loss` must be a bool, got 1"),
        ({"backoff_after": 0}, r"`backoff_after` must be an int or None >= 1, got 0"),
        ({"backoff_window": 0}, r"`backoff_window` must be an int >= 1, got 0"),
        ({"backoff_factor": 1.0}, r"`backoff_factor` must be a number > 0.0 and < 1.0, got 1.0"),
        ({"backoff_recovery": 0}, r"`backoff_recovery` must be an int >= 1, got 0"),
        ({"rollback_after": 0}, r"`rollback_after` must be an int or None >= 1, got 0"),
        ({"rollback_z": 2.0}, r"`rollback_z` must be greater than `z_threshold` \(2.5\), got 2.0"),
        ({"snapshot_every": 0}, r"`snapshot_every` must be an int >= 1, got 0"),
        ({"skip_after_rollback": -1}, r"`skip_after_rollback` must be an int >= 0, got -1"),
        ({"max_rollbacks": 1.5}, r"`max_rollbacks` must be an int >= 0, got 1.5"),
        ({"log_every_n_steps": 0}, r"`log_every_n_steps` must be an int or None >= 1, got 0"),
        ({"diagnose_top_k": -1}, r"`diagnose_top_k` must be an int >= 0, got -1"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(GuardConfigError, match=match):
        GradientGuard(**kwargs)


def test_metrics_are_logged(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    tr, va = digits_loaders()
    t = trainer(tmp_path, [GradientGuard(max_norm=1e-3, log_every_n_steps=2)], logger=CSVLogger(tmp_path))
    t.fit(DigitsNet(), tr, va)
    import csv

    with open(Path(t.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("guard/grad_norm")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 6]
    assert all(float(r["guard/grad_norm_post_clip"]) == pytest.approx(1e-3) for r in rows)


class DumpRankState(Callback):
    """Writes each rank's final weights, applied-step count and loss scale (ddp_spawn children cannot return them)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        state = {
            "w": [p.detach().flatten().tolist() for p in pl_module.parameters()],
            "applied": trainer.__dict__["_lightning_guard_runtime"].applied_steps,
            "scale": scaler.get_scale() if scaler is not None else None,
        }
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(state))


class NaNAfterReduce(Callback):
    """A NaN that only one rank sees: written after DDP's all-reduce (InjectNaN writes it during backward, before the
    all-reduce, where a real one appears - and the all-reduce then spreads it to every rank)."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            with torch.no_grad():
                next(pl_module.parameters()).grad.view(-1)[0] = float("nan")


@pytest.mark.ddp
@pytest.mark.parametrize(("bad_rank", "precision"), [(0, "32-true"), (1, "16-mixed")])
def test_ddp_fault_on_one_rank_all_ranks_agree(tmp_path, bad_rank, precision):
    """NaN written into one rank's gradients after DDP's all-reduce: only that rank sees it. Every rank must skip
    (16-mixed: every GradScaler lowers its scale alike), weights stay identical and finite, one event."""

    tr, va = digits_loaders()
    cbs = [GradientGuard(), NaNAfterReduce(step=2, rank=bad_rank), DumpRankState(str(tmp_path))]
    t = trainer(tmp_path, cbs, devices=2, strategy="ddp_spawn", max_epochs=2, **precision_kwargs(precision))
    t.fit(DigitsNet(), tr, va)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert all(math.isfinite(v) for w in r0["w"] for v in w)
    assert r0["applied"] == [7]  # 8 steps, one skipped on both ranks
    events = [e for e in read_jsonl(events_file(tmp_path)) if e["guard"] == "gradient_guard"]
    expected_kind = "nonfinite_skip" if precision == "32-true" else "amp_overflow"
    assert [(e["kind"], e["step"], e["ranks"]) for e in events] == [(expected_kind, 2, [bad_rank])]


def test_the_cached_state_key_follows_a_changed_argument():
    """The guards keep their ``state_key`` (Lightning reads it at every hook call); a changed argument changes it,
    as it names the guard's state in checkpoints."""
    guard = GradientGuard()
    first = guard.state_key
    assert guard.state_key is first  # built once
    guard.z_threshold = 5.0
    assert guard.state_key != first
    assert guard.state_key == GradientGuard(z_threshold=5.0).state_key


class _NaNGradsAt(Callback):
    """A user callback that edits the gradients in ``on_before_optimizer_step`` (gradient noise, a custom clip)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.grad.fill_(float("nan"))


def test_the_norm_is_taken_where_the_guard_sits_after_a_user_callback_that_edits_the_gradients(tmp_path):
    """Review: with the step's one agreement run in the first guard's hook, GradientGuard measured the gradients
    before a user callback listed between that guard and it had made them NaN: the NaN step was applied (weights
    NaN, three skips and a rollback after). The agreement now runs in GradientGuard's own hook."""
    tr, _ = digits_loaders(batch_size=32)
    guard = GradientGuard()
    t = trainer(tmp_path, [WarmupCosine(warmup=2), _NaNGradsAt(2), guard], max_steps=6)
    model = DigitsNet()
    t.fit(model, tr)
    assert guard.counts == {"nonfinite_skip": 1}
    assert t.__dict__["_lightning_guard_runtime"].applied_steps == [5]
    assert all(torch.isfinite(p).all() for p in model.parameters())
