import itertools
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_guard import GuardConfigError, GuardMixin, WarmupCosine, event_stream
from lightning_guard.functional import warmup_cosine
from lightning_guard.testing import InjectNaN
from tests.helpers import (
    DigitsNet,
    StopAfterEpoch,
    digits_loaders,
    events_file,
    precision_kwargs,
    read_jsonl,
    trainer,
    wandb_history,
    wandb_run_dirs,
)


class LRRecorder(Callback):
    """Records, per optimizer step, the LR each param group of each optimizer steps with."""

    def __init__(self, out: str | None = None) -> None:
        self.lrs: list[list[float]] = []
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append([float(g["lr"]) for g in optimizer.param_groups])

    def on_train_end(self, trainer, pl_module):
        if self.out:
            w = [p.detach().flatten().tolist()[:8] for p in pl_module.parameters()]
            Path(f"{self.out}.rank{trainer.global_rank}.json").write_text(json.dumps({"lrs": self.lrs, "w": w}))


def expected(n: int, total: int, warm: int, base: float = 0.01, **kw) -> list[float]:
    return [base * warmup_cosine(s, total, warm, **kw) for s in range(n)]


def test_trajectory_follows_the_function_and_ends_at_min(tmp_path):
    tr, va = digits_loaders()  # 8 batches per epoch
    rec = LRRecorder()
    t = trainer(tmp_path, [WarmupCosine(warmup=0.25, min_lr_ratio=0.1), rec], max_epochs=2)
    t.fit(DigitsNet(lr=0.01), tr, va)
    got = [lr[0] for lr in rec.lrs]
    assert got == pytest.approx(expected(16, 16, 4, min_lr_ratio=0.1))
    assert got[0] > 0  # start_factor: the first step is not wasted at LR 0
    assert all(b > a for a, b in itertools.pairwise(got[:5]))  # warmup monotone (steps 0..4)
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.001)  # exactly min after the last step


def test_accumulation_moves_once_per_optimizer_step(tmp_path):
    tr, va = digits_loaders()
    rec = LRRecorder()
    t = trainer(tmp_path, [WarmupCosine(warmup=1), rec], max_epochs=2, accumulate_grad_batches=2)
    t.fit(DigitsNet(), tr, va)
    assert len(rec.lrs) == 8
    assert t.global_step == 8
    assert [lr[0] for lr in rec.lrs] == pytest.approx(expected(8, 8, 1))


def test_two_param_groups_follow_their_own_base(tmp_path):
    tr, va = digits_loaders()
    rec = LRRecorder()
    trainer(tmp_path, [WarmupCosine(warmup=2), rec]).fit(DigitsNet(lr=0.02, two_groups=True), tr, va)
    assert [lr[0] for lr in rec.lrs] == pytest.approx(expected(8, 8, 2, base=0.02))
    assert [lr[1] for lr in rec.lrs] == pytest.approx(expected(8, 8, 2, base=0.002))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_same_schedule(tmp_path, precision):
    tr, va = digits_loaders()
    rec = LRRecorder()
    trainer(tmp_path, [WarmupCosine(warmup=2), rec], **precision_kwargs(precision)).fit(DigitsNet(), tr, va)
    assert [lr[0] for lr in rec.lrs] == pytest.approx(expected(8, 8, 2))


def test_gradscaler_skip_holds_the_lr_and_is_reported(tmp_path):
    tr, va = digits_loaders()
    rec = LRRecorder()
    cb = WarmupCosine(warmup=2)
    t = trainer(tmp_path, [cb, InjectNaN("grad", steps=[3]), rec], **precision_kwargs("16-mixed"))
    t.fit(DigitsNet(), tr, va)
    got = [lr[0] for lr in rec.lrs]
    # step 3 was skipped by the GradScaler: step 4 runs at the same LR, the schedule ends one step short
    assert got == pytest.approx(
        expected(4, 8, 2) + expected(4, 8, 2)[3:] + [0.01 * warmup_cosine(s, 8, 2) for s in (4, 5, 6)]
    )
    assert event_stream(t).__class__
    assert cb.runtime(t).applied_steps == [7]
    holds = [e for e in read_jsonl(events_file(tmp_path)) if e["kind"] == "hold"]
    assert [(h["step"], h["data"]["reason"]) for h in holds] == [(3, "amp_overflow")]


def test_resume_trajectory_equals_uninterrupted(tmp_path):
    tr, va = digits_loaders()

    def run(root, max_epochs, ckpt_path=None, extra=()):
        rec = LRRecorder()
        ck = ModelCheckpoint(dirpath=root / "ck", every_n_epochs=1, save_top_k=-1)
        cbs = [WarmupCosine(warmup=3, min_lr_ratio=0.05), InjectNaN("grad", steps=[2]), rec, ck, *extra]
        t = trainer(root, cbs, max_epochs=max_epochs, enable_checkpointing=True, **precision_kwargs("16-mixed"))
        torch.manual_seed(0)
        model = DigitsNet()
        t.fit(model, tr, va, ckpt_path=ckpt_path)
        return t, model, rec

    full_t, full_m, full_rec = run(tmp_path / "full", 3)
    _, _, first = run(tmp_path / "part", 3, extra=[StopAfterEpoch(0)])
    (ckpt,) = (tmp_path / "part" / "ck").glob("*.ckpt")
    res_t, res_m, res_rec = run(tmp_path / "resumed", 3, ckpt_path=str(ckpt))
    assert first.lrs + res_rec.lrs == full_rec.lrs  # LR trajectory, bit for bit
    assert full_t.__dict__["_lightning_guard_runtime"].applied_steps == [23]
    assert res_t.__dict__["_lightning_guard_runtime"].applied_steps == [23]
    for a, b in zip(full_m.parameters(), res_m.parameters(), strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    key = lambda e: (e.guard, e.kind, e.step, e.ranks, e.message)  # noqa: E731
    assert [key(e) for e in event_stream(res_t).events] == [key(e) for e in event_stream(full_t).events]


class TwoOptimizers(GuardMixin, pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.nn.Linear(64, 10), torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for opt, layer in ((opt_a, self.a), (opt_b, self.b)):
            if opt is opt_b and batch_idx % 2:  # b steps every other batch: its schedule must lag
                continue
            opt.zero_grad()
            self.manual_backward(self.balanced_loss(layer(x), y))
            opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.AdamW(self.b.parameters(), lr=0.01)


def test_several_optimizers_each_follow_their_own_applied_steps(tmp_path):
    tr, va = digits_loaders()
    cb = WarmupCosine(warmup=1, total_steps=8)
    t = trainer(tmp_path, [cb])
    t.fit(TwoOptimizers(), tr, va)
    assert cb.runtime(t).applied_steps == [8, 4]
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)
    assert t.optimizers[1].param_groups[0]["lr"] == pytest.approx(0.01 * warmup_cosine(4, 8, 1))


def test_refuses_a_lightning_scheduler_on_the_same_optimizer(tmp_path):
    tr, va = digits_loaders()
    with pytest.raises(
        GuardConfigError,
        match=r"WarmupCosine sets the learning rate of optimizer 0 \(AdamW\), but "
        r"`configure_optimizers` also returned the LR scheduler StepLR for it",
    ):
        trainer(tmp_path, [WarmupCosine()]).fit(DigitsNet(scheduler=True), tr, va)


def test_infinite_training_needs_total_steps(tmp_path):
    tr, va = digits_loaders()
    with pytest.raises(
        GuardConfigError,
        match=r"WarmupCosine needs a finite number of optimizer steps, but "
        r"`trainer.estimated_stepping_batches` is inf: pass `total_steps=`",
    ):
        trainer(tmp_path, [WarmupCosine()], max_epochs=-1, max_steps=-1).fit(DigitsNet(), tr, va)


def test_warmup_longer_than_training(tmp_path):
    tr, va = digits_loaders()
    with pytest.raises(GuardConfigError, match=r"`warmup` \(8 steps\) must be shorter than `total_steps` \(8\)"):
        trainer(tmp_path, [WarmupCosine(warmup=8)]).fit(DigitsNet(), tr, va)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup": True}, r"`warmup` must be an int \(steps\) or a float in \[0, 1\) \(fraction\), got True"),
        ({"warmup": 1.5}, r"`warmup` as a fraction must be in \[0, 1\), got 1.5"),
        ({"warmup": -2}, r"`warmup` as a number of steps must be >= 0, got -2"),
        (
            {"total_steps": 0},
            r"`total_steps` must be a positive int, a list of positive ints \(one per optimizer\) or None, got 0",
        ),
        ({"min_lr_ratio": -0.1}, r"`min_lr_ratio` must be in \[0, 1\], got -0.1"),
        ({"start_factor": 0.0}, r"`start_factor` must be in \(0, 1\], got 0.0"),
        ({"cycles": 0}, r"`cycles` must be an int >= 1, got 0"),
        ({"cycle_mult": 0}, r"`cycle_mult` must be a number > 0, got 0"),
        ({"peak_decay": 0}, r"`peak_decay` must be in \(0, 1\], got 0"),
        ({"log_lr": "yes"}, r"`log_lr` must be a bool, got 'yes'"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(GuardConfigError, match=match):
        WarmupCosine(**kwargs)


def test_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_guard.WarmupCosine\n"
        "      init_args:\n        warmup: 0.1\n        min_lr_ratio: 0.05\n        cycles: 2\n"
    )
    cli = LightningCLI(DigitsNet, args=["--config", str(cfg)], run=False, save_config_callback=None)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, WarmupCosine)]
    assert (cb.warmup, cb.min_lr_ratio, cb.cycles) == (0.1, 0.05, 2)


@pytest.mark.ddp
@pytest.mark.parametrize("bad_rank", [1])
def test_ddp_spawn_rank1_event_reaches_rank0_and_wandb_and_ranks_agree(tmp_path, bad_rank):
    """2 processes, 16-mixed: a NaN loss on rank 1 only. The event raised on rank 1 reaches rank 0's JSONL and the
    wandb run; both ranks hold the schedule on that step and end with identical LRs and weights.
    (Runs in a fresh interpreter: see tests/scripts/ddp_wandb_rank1.py.)"""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONPATH": str(root)}
    env.pop("WANDB_SERVICE", None)
    script = root / "tests" / "scripts" / "ddp_wandb_rank1.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(bad_rank)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rec.rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert len(r0["lrs"]) == 8  # 4 batches per rank per epoch, 2 epochs
    assert r0["lrs"][2] == r0["lrs"][3]  # held on the skipped step, on both ranks
    (run,) = wandb_run_dirs(tmp_path)
    events = read_jsonl(events_file(run / "files"))
    injected = [e for e in events if e["guard"] == "fault_injector"]
    assert [(e["kind"], e["step"], e["ranks"]) for e in injected] == [("nan_loss", 2, [bad_rank])]
    assert [(e["kind"], e["step"]) for e in events if e["kind"] == "hold"] == [("hold", 2)]
    tables = sorted((run / "files" / "media" / "table" / "guard").glob("events_*.table.json"))
    rows = json.loads(tables[-1].read_text())["data"]
    assert any(r[2] == "fault_injector" and r[5] == f"[{bad_rank}]" for r in rows)
    assert any("guard/fault_injector/nan_loss" in h for h in wandb_history(run))
