import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import GuardConfigError, L1Penalty, event_stream
from lightning_guard.testing import InjectNaN
from tests.helpers import DigitsNet, StopAfterEpoch, digits_loaders, precision_kwargs, trainer


class GradsAt(Callback):
    """Gradients as the optimizer receives them at step 0 (runs after L1Penalty)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 0:
            self.grads = [p.grad.detach().clone() for p in pl_module.parameters()]


def test_subgradient_equals_the_loss_term_gradient(tmp_path):
    tr, va = digits_loaders()
    probe = GradsAt()
    torch.manual_seed(0)
    trainer(tmp_path, [L1Penalty(0.01), probe], max_steps=1).fit(DigitsNet(optimizer="sgd"), tr, va)
    torch.manual_seed(0)
    ref = DigitsNet(optimizer="sgd")
    x, y = next(iter(tr))
    penalty = sum(p.abs().sum() for p in ref.parameters() if p.dim() >= 2)  # biases excluded by default
    (ref.balanced_loss(ref(x), y) + 0.01 * penalty).backward()
    for got, p in zip(probe.grads, ref.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=1e-7)


def _diabetes_with_noise():
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x, y = (x - x.mean(0)) / x.std(0), (y - y.mean()) / y.std()
    noise = torch.randn(len(x), 20, generator=torch.Generator().manual_seed(0))
    return torch.cat([torch.tensor(x, dtype=torch.float32), noise], 1), torch.tensor(y, dtype=torch.float32)


class Linear(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(30, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.lin(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_proximal_gives_exact_zeros_on_noise_features_where_subgradient_does_not(tmp_path):
    """Diabetes (10 real features) + 20 Gaussian noise features, full-batch SGD, 300 steps, lambda 0.12 (measured:
    proximal zeroes all 20 noise weights and 5 weak real ones; subgradient leaves every weight non-zero)."""
    x, y = _diabetes_with_noise()
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    weights = {}
    for mode in ("subgradient", "proximal"):
        torch.manual_seed(0)
        model = Linear()
        trainer(tmp_path / mode, [L1Penalty(0.12, mode=mode)], max_epochs=300).fit(model, loader)
        weights[mode] = model.lin.weight.detach()[0]
    assert int((weights["proximal"][10:] == 0).sum()) == 20
    assert int((weights["subgradient"] == 0).sum()) == 0
    assert int((weights["proximal"][:10] != 0).sum()) >= 4  # the strong real features survive


def test_accumulation_invariance(tmp_path):
    x, y = digits_loaders(n_train=256, batch_size=32)[0].dataset.tensors
    results = []
    for batch, accumulate in ((32, 1), (16, 2)):
        torch.manual_seed(0)
        model = DigitsNet(optimizer="sgd", lr=0.1)
        loader = DataLoader(TensorDataset(x, y), batch_size=batch)
        trainer(tmp_path / str(batch), [L1Penalty(0.01)], accumulate_grad_batches=accumulate).fit(model, loader)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the penalty is added once per optimizer step


def test_bf16_mixed_subgradient(tmp_path):
    tr, va = digits_loaders()
    probe = GradsAt()
    torch.manual_seed(0)
    trainer(tmp_path, [L1Penalty(0.01), probe], max_steps=1, **precision_kwargs("bf16-mixed")).fit(
        DigitsNet(optimizer="sgd"), tr, va
    )
    torch.manual_seed(0)
    ref = DigitsNet(optimizer="sgd")
    x, y = next(iter(tr))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ref.balanced_loss(ref(x), y)
    (loss + 0.01 * sum(p.abs().sum() for p in ref.parameters() if p.dim() >= 2)).backward()
    for got, p in zip(probe.grads, ref.parameters(), strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-5)


class Mixed(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 2)


def test_default_selection_and_patterns():
    l1 = L1Penalty()
    l1._select(Mixed())
    assert l1._selected_names == ["body.weight", "head.weight"]  # no embedding, norm or bias
    l1 = L1Penalty(exclude=["head.*"], group_strength={"body.*": 3.0})
    l1._select(Mixed())
    assert l1._selected_names == ["body.weight"]
    assert [m for m, _ in l1._groups] == [3.0]
    l1 = L1Penalty(include=["emb.*", "body.bias"])
    l1._select(Mixed())
    assert l1._selected_names == ["emb.weight", "body.bias"]
    with pytest.raises(GuardConfigError, match=r"L1Penalty selected no parameter \(include=\['nothing'\]"):
        L1Penalty(include=["nothing"])._select(Mixed())


def test_ramp_and_logging(tmp_path):
    tr, va = digits_loaders()
    l1 = L1Penalty(0.01, ramp_steps=4, log_every_n_steps=2)
    t = trainer(tmp_path, [l1], logger=CSVLogger(tmp_path))
    t.fit(DigitsNet(), tr, va)
    assert [l1.current_strength(s) for s in (0, 2, 4, 8)] == [0.0, 0.005, 0.01, 0.01]
    with open(Path(t.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("guard/l1/penalty")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 6]
    assert [float(r["guard/l1/strength"]) for r in rows] == pytest.approx([0.0, 0.005, 0.01, 0.01])
    assert float(rows[-1]["guard/l1/penalty"]) > 0
    kinds = [e.kind for e in event_stream(t).events if e.guard == "l1_penalty"]
    assert kinds == ["selected", "summary"]


def test_proximal_step_is_not_applied_when_the_step_was_skipped(tmp_path):
    class W(Callback):
        def __init__(self):
            self.after = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after[trainer.global_step - 1] = pl_module.net[0].weight.detach().clone()

    tr, va = digits_loaders()
    probe = W()
    trainer(
        tmp_path, [L1Penalty(0.5, mode="proximal"), InjectNaN("grad", steps=[3]), probe], **precision_kwargs("16-mixed")
    ).fit(DigitsNet(optimizer="sgd"), tr, va)
    assert torch.equal(probe.after[2], probe.after[3])  # GradScaler skipped step 3: no threshold either
    assert not torch.equal(probe.after[3], probe.after[4])


def test_ramp_resumes_exactly(tmp_path):
    tr, va = digits_loaders()

    def run(root, extra=(), ckpt_path=None):
        ck = ModelCheckpoint(dirpath=root / "ck", every_n_epochs=1, save_top_k=-1)
        t = trainer(
            root, [L1Penalty(0.05, mode="proximal", ramp_steps=12), ck, *extra], max_epochs=3, enable_checkpointing=True
        )
        torch.manual_seed(0)
        model = DigitsNet(optimizer="sgd")
        t.fit(model, tr, va, ckpt_path=ckpt_path)
        return model

    full = run(tmp_path / "full")
    run(tmp_path / "part", extra=[StopAfterEpoch(0)])
    (ckpt,) = (tmp_path / "part" / "ck").glob("*.ckpt")
    resumed = run(tmp_path / "res", ckpt_path=str(ckpt))
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strength": -1.0}, r"`strength` must be a finite number >= 0, got -1.0"),
        ({"strength": float("nan")}, r"`strength` must be a finite number >= 0, got nan"),
        ({"mode": "l2"}, r"`mode` must be one of \('subgradient', 'proximal', 'adaptive_proximal'\), got 'l2'"),
        ({"include": "body.*"}, r"`include` must be a list of name patterns or None, got 'body.\*'"),
        ({"exclude": [3]}, r"`exclude` must be a list of name patterns or None, got \[3\]"),
        ({"exclude_1d": "no"}, r"`exclude_1d` must be a bool, got 'no'"),
        ({"group_strength": {"a": -1}}, r"`group_strength` must map name patterns to numbers >= 0, got 'a': -1"),
        ({"ramp_steps": -1}, r"`ramp_steps` must be an int >= 0, got -1"),
        ({"log_every_n_steps": 0}, r"`log_every_n_steps` must be an int >= 1 or None, got 0"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(GuardConfigError, match=match):
        L1Penalty(**kwargs)


class DumpWeights(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        w = pl_module.net[0].weight.detach()
        state = {"w": w.flatten().tolist(), "zeros": int((w == 0).sum())}
        Path(self.out, f"w{trainer.global_rank}.json").write_text(json.dumps(state))


@pytest.mark.ddp
def test_ddp_spawn_proximal_keeps_ranks_identical(tmp_path):
    tr, va = digits_loaders()
    t = trainer(
        tmp_path,
        [L1Penalty(0.5, mode="proximal"), DumpWeights(str(tmp_path))],
        devices=2,
        strategy="ddp_spawn",
        max_epochs=2,
    )
    t.fit(DigitsNet(optimizer="sgd", lr=0.05), tr, va)
    w0, w1 = (json.loads((tmp_path / f"w{r}.json").read_text()) for r in (0, 1))
    assert w0 == w1
    assert w0["zeros"] > 0  # the proximal step made exact zeros, identically on both ranks


def test_proximal_thresholds_each_param_group_with_its_own_lr(tmp_path):
    """All groups were thresholded with param_groups[0]'s LR: a group at lr=0 still moved and gained exact zeros."""

    class Frozen(DigitsNet):
        def configure_optimizers(self):
            return torch.optim.SGD(
                [{"params": self.net[0].parameters(), "lr": 0.05}, {"params": self.net[2].parameters(), "lr": 0.0}]
            )

    tr, va = digits_loaders()
    torch.manual_seed(0)
    model = Frozen()
    head = model.net[2].weight.detach().clone()
    trainer(tmp_path, [L1Penalty(0.5, mode="proximal")]).fit(model, tr, va)
    assert torch.equal(model.net[2].weight, head)  # lr=0: the proximal step must not move it either
    assert (model.net[0].weight == 0).float().mean() > 0.5  # the other group is thresholded at its own LR


class FusedDigits(DigitsNet):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)


class UpdateAt0(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.update = [p.detach() - b for p, b in zip(pl_module.parameters(), self.before, strict=True)]


@pytest.mark.parametrize("net", [DigitsNet, FusedDigits], ids=["adamw", "fused_adamw"])
def test_16_mixed_subgradient_matches_32_true(tmp_path, net):
    """Under 16-mixed a fused optimizer unscales inside its step: the subgradient was added to gradients still
    multiplied by 65536, so the update carried none of it. With a strength that dominates the gradient, the first
    AdamW update is -lr * sign(w) in both precisions."""
    updates = {}
    for precision in ("32-true", "16-mixed"):
        tr, va = digits_loaders()
        probe = UpdateAt0()
        torch.manual_seed(0)
        model = net(lr=1e-3)
        trainer(tmp_path, [L1Penalty(10.0), probe], max_steps=1, **precision_kwargs(precision)).fit(model, tr, va)
        updates[precision] = probe.update
        w = model.net[0].weight
    assert torch.allclose(updates["16-mixed"][0], updates["32-true"][0], atol=2e-5)
    assert updates["16-mixed"][0].abs().mean() > 0.9e-3  # -lr * sign(w): the penalty moved every weight
    assert w.shape == updates["32-true"][0].shape


def test_adaptive_proximal_gives_adamw_sparsity_at_a_small_cost(tmp_path):
    """Plain proximal L1 after AdamW's step zeroes almost nothing at useful strengths (Adam moves every weight by about
    lr a step); thresholding in Adam's metric does. Measured here: digits, AdamW 3e-3, 4 epochs."""
    results = {}
    for mode in (None, "proximal", "adaptive_proximal"):
        tr, va = digits_loaders(n_train=1200, n_val=597)
        torch.manual_seed(0)
        model = DigitsNet(lr=3e-3, hidden=128)
        t = trainer(tmp_path, [L1Penalty(1e-3, mode=mode)] if mode else [], max_epochs=4)
        t.fit(model, tr, va)
        w = torch.cat([model.net[0].weight.flatten(), model.net[2].weight.flatten()])
        results[mode] = (float((w == 0).float().mean()), float(t.callback_metrics["val_acc"]))
    assert results["proximal"][0] < 0.05
    assert results["adaptive_proximal"][0] > 0.3
    assert results["adaptive_proximal"][1] >= results[None][1] - 0.02


def test_adaptive_proximal_needs_an_adam_family_optimizer(tmp_path):
    tr, va = digits_loaders()
    with pytest.raises(
        GuardConfigError,
        match=r"mode='adaptive_proximal'\) scales its threshold by Adam's second moments, but optimizer 0 is SGD: "
        r"use mode='proximal'",
    ):
        trainer(tmp_path, [L1Penalty(1e-3, mode="adaptive_proximal")]).fit(DigitsNet(optimizer="sgd"), tr, va)
