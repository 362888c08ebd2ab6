import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_guard import GuardConfigError, WarmupCosine
from lightning_guard.events import EVENTS_FILENAME
from lightning_guard.testing import InjectNaN, LossSpike, LRSpike, SimulatedOOM, batch_size_of
from tests.helpers import DigitsNet, digits_loaders, read_jsonl, trainer


class Probe(Callback):
    def __init__(self):
        self.losses, self.grad_finite, self.batch_finite, self.lrs = {}, {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_finite[trainer.global_step] = bool(torch.isfinite(batch[0]).all())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step - 1] = float(outputs["loss"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grad_finite[trainer.global_step] = all(bool(torch.isfinite(p.grad).all()) for p in pl_module.parameters())

    def on_train_batch_end_lr(self, trainer):
        pass


@pytest.mark.parametrize("target", ["batch", "loss", "grad"])
def test_inject_nan_hits_its_target_at_its_step_only(tmp_path, target):
    tr, va = digits_loaders()
    probe = Probe()
    inj = InjectNaN(target, steps=[2], value=float("inf") if target == "grad" else float("nan"))
    # Probe first so that it sees the batch before the injector touches it; the injector then writes it.
    t = trainer(tmp_path, [probe, inj, WarmupCosine(warmup=1)])
    t.fit(DigitsNet(), tr, va)
    assert inj.injected == [2]
    assert not probe.grad_finite[2]
    assert all(probe.grad_finite[s] for s in range(2))
    if target in ("batch", "loss"):
        assert math.isnan(probe.losses[2])
        assert math.isfinite(probe.losses[1])
    events = [e for e in read_jsonl(tmp_path / EVENTS_FILENAME) if e["guard"] == "fault_injector"]
    assert [(e["kind"], e["step"], e["severity"]) for e in events] == [(f"nan_{target}", 2, "warning")]
    assert events[0]["message"].startswith("INJECTED")


def test_inject_nan_respects_ranks(tmp_path):
    tr, va = digits_loaders()
    inj = InjectNaN("loss", steps=[1], ranks=[1])  # single process is rank 0: nothing happens
    trainer(tmp_path, [inj]).fit(DigitsNet(), tr, va)
    assert inj.injected == []


def test_loss_spike_multiplies_the_loss(tmp_path):
    tr, va = digits_loaders()
    probe = Probe()
    trainer(tmp_path, [probe, LossSpike(factor=100.0, steps=[3])]).fit(DigitsNet(), tr, va)
    ratio = probe.losses[3] / probe.losses[2]
    assert 30 < ratio < 300  # ~100x the neighbouring loss


class EffectiveLR(Callback):
    """The LR the update really used: with SGD (no momentum), -delta_w / grad, measured around the step."""

    def __init__(self):
        self.used, self.scheduled = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._w = pl_module.net[0].bias.detach().clone()
        self._g = pl_module.net[0].bias.grad.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dw = self._w - pl_module.net[0].bias.detach()
        i = self._g.abs().argmax()
        self.used.append(float(dw[i] / self._g[i]))
        self.scheduled.append(trainer.optimizers[0].param_groups[0]["lr"])  # LR set for the next step


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_lr_spike_is_step_scoped_and_composes_with_the_schedule(tmp_path, precision):
    from tests.helpers import precision_kwargs

    tr, va = digits_loaders()
    eff = EffectiveLR()
    cbs = [WarmupCosine(warmup=1), LRSpike(factor=1000.0, steps=[4]), eff]
    trainer(tmp_path, cbs, **precision_kwargs(precision)).fit(DigitsNet(lr=0.01, optimizer="sgd"), tr, va)
    assert eff.used[4] == pytest.approx(1000.0 * eff.scheduled[3], rel=1e-2)  # the spiked step
    assert eff.used[3] == pytest.approx(eff.scheduled[2], rel=1e-2)
    assert eff.used[5] == pytest.approx(eff.scheduled[4], rel=1e-2)  # undone right after; the schedule went on
    assert eff.scheduled[4] < eff.scheduled[3]


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_simulated_oom_raises_cuda_oom_above_the_size(tmp_path, where):
    tr, va = digits_loaders(batch_size=32)
    inj = SimulatedOOM(max_batch_size=16, where=where, steps=[1])
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"CUDA out of memory\. .*simulated by lightning_guard"):
        trainer(tmp_path, [inj]).fit(DigitsNet(), tr, va)
    assert inj.seen_sizes == [32, 32]  # step 0 passed, step 1 ran out of memory
    assert inj.injected == [1]


def test_simulated_oom_passes_small_batches(tmp_path):
    tr, va = digits_loaders(batch_size=16)
    inj = SimulatedOOM(max_batch_size=16)
    trainer(tmp_path, [inj]).fit(DigitsNet(), tr, va)
    assert inj.seen_sizes == [16] * 16
    assert inj.injected == []


def test_batch_size_of_structures():
    from dataclasses import dataclass

    @dataclass
    class B:
        x: torch.Tensor

    assert batch_size_of((torch.zeros(5, 2), torch.zeros(5))) == 5
    assert batch_size_of({"a": [torch.zeros(3)]}) == 3
    assert batch_size_of(B(torch.zeros(7, 1))) == 7
    assert batch_size_of("text") == -1


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: InjectNaN("weights"), r"`target` must be one of \('batch', 'loss', 'grad'\), got 'weights'"),
        (lambda: InjectNaN("loss", value=1.0), r"`value` must be nan, inf or -inf, got 1.0"),
        (lambda: InjectNaN("loss", steps=5), r"`steps` must be a list of ints, got 5"),
        (lambda: InjectNaN("loss", steps=[-1]), r"`steps` must hold ints >= 0, got -1"),
        (lambda: InjectNaN("loss", ranks=["0"]), r"`ranks` must hold ints >= 0, got '0'"),
        (lambda: LossSpike(factor=0), r"`factor` must be a finite number > 0, got 0"),
        (lambda: LRSpike(factor=float("inf")), r"`factor` must be a finite number > 0, got inf"),
        (lambda: SimulatedOOM(max_batch_size=-1), r"`max_batch_size` must be an int >= 0, got -1"),
        (
            lambda: SimulatedOOM(4, where="optimizer"),
            r"`where` must be one of \('forward', 'backward'\), got 'optimizer'",
        ),
    ],
)
def test_injector_errors(make, match):
    with pytest.raises(GuardConfigError, match=match):
        make()


def test_batch_injection_needs_a_float_tensor(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    class IntNet(DigitsNet):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.balanced_loss(self(x.float()), y)

    x = torch.randint(0, 16, (32, 64))
    loader = DataLoader(TensorDataset(x, torch.randint(0, 10, (32,))), batch_size=8)
    with pytest.raises(
        GuardConfigError, match=r"InjectNaN\(target='batch'\) found no floating-point tensor in the batch"
    ):
        trainer(tmp_path, [InjectNaN("batch", steps=[0])]).fit(IntNet(), loader)


def test_two_injectors_of_one_type_share_a_trainer_and_a_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    tr, va = digits_loaders()
    a, b = InjectNaN("loss", steps=[1]), InjectNaN("grad", steps=[2], value=float("inf"))
    assert a.state_key != b.state_key
    ck = ModelCheckpoint(dirpath=tmp_path / "ck")
    t = trainer(tmp_path, [WarmupCosine(warmup=0), a, b, ck], enable_checkpointing=True)
    t.fit(DigitsNet(), tr, va)
    (path,) = (tmp_path / "ck").glob("*.ckpt")
    states = torch.load(path, weights_only=False)["callbacks"]
    assert states[a.state_key] == {"injected": [1]}
    assert states[b.state_key] == {"injected": [2]}
