import copy
import json
import math
import pickle
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torchmetrics
from lightning.pytorch.callbacks import Callback

from lightning_guard import GuardConfigError, OOMGuard, WarmupCosine
from lightning_guard.testing import InjectNaN, LossSpike, LRSpike, ScaleOverflow, SimulatedOOM, batch_size_of
from tests.helpers import DigitsNet, digits_loaders, events_file, precision_kwargs, read_jsonl, trainer

ROOT = Path(__file__).resolve().parents[2]


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
    events = [e for e in read_jsonl(events_file(tmp_path)) if e["guard"] == "fault_injector"]
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


def test_two_simulated_ooms_share_a_trainer(tmp_path):
    """Main: every SimulatedOOM had one state key, so forward at one step and backward at another were refused
    ("Found more than one stateful callback of type `SimulatedOOM`")."""
    tr, va = digits_loaders(batch_size=32)
    fwd = SimulatedOOM(16, where="forward", steps=[1])
    bwd = SimulatedOOM(8, where="backward", steps=[3])  # below the 16 that forward left
    assert fwd.state_key != bwd.state_key
    trainer(tmp_path, [fwd, bwd, OOMGuard()]).fit(DigitsNet(), tr, va)
    assert (fwd.injected, bwd.injected) == ([1], [3])


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
        (lambda: SimulatedOOM(4, module=0), r"`module` must be a dotted name \(str\) or None, got 0"),
        (
            lambda: SimulatedOOM(4, stages="train"),
            r"`stages` must be a non-empty list of \('train', 'validate', 'test', 'predict'\), got 'train'",
        ),
        (
            lambda: SimulatedOOM(4, stages=[]),
            r"`stages` must be a non-empty list of \('train', 'validate', 'test', 'predict'\), got \[\]",
        ),
        (
            lambda: SimulatedOOM(4, stages=["train", "fit"]),
            r"`stages` must hold values of \('train', 'validate', 'test', 'predict'\), got 'fit'",
        ),
        (lambda: InjectNaN("grad", param=["net.0.bias"]), r"`param` must be a dotted name \(str\) or None, got \["),
        (
            lambda: InjectNaN("loss", param="net.0.bias"),
            r"`param` applies to target='grad' only, got param='net.0.bias' with target='loss'",
        ),
        (lambda: InjectNaN("grad", value=True), r"`value` must be nan, inf or -inf, got True"),
        (lambda: ScaleOverflow(module=2.0), r"`module` must be a dotted name \(str\) or None, got 2.0"),
        (lambda: ScaleOverflow(steps=[-2]), r"`steps` must hold ints >= 0, got -2"),
        (lambda: ScaleOverflow(ranks=3), r"`ranks` must be a list of ints, got 3"),
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


# ---------------------------------------------------------------------------------------------- SimulatedOOM


class CountingNet(DigitsNet):
    """Counts what of training_step ran: the part before the forward call and the part after it."""

    def __init__(self, fraction: int = 1) -> None:
        super().__init__()
        self.fraction = fraction  # forward sees 1/fraction of the batch
        self.before = self.after = 0
        self.metric = torchmetrics.MeanMetric()

    def training_step(self, batch, batch_idx):
        x, y = batch
        n = len(x) // self.fraction
        self.before += 1
        logits = self(x[:n])
        self.log("after_forward", 1.0, sync_dist=True)
        self.metric.update(logits.detach().mean())
        self.after += 1
        return self.balanced_loss(logits, y[:n])


def test_forward_oom_leaves_training_step_inside_forward(tmp_path):
    """At step 1 the step starts, the forward raises, and nothing after `self(x)` runs: no log, no metric update."""
    tr, _ = digits_loaders(batch_size=32)
    model, inj = CountingNet(), SimulatedOOM(16, steps=[1])
    t = trainer(tmp_path, [inj])
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"in the forward of module 'net\.0' \(simulated by"):
        t.fit(model, tr)
    assert (model.before, model.after, model.metric.update_count) == (2, 1, 1)
    assert inj.seen_sizes == [32, 32]
    (event,) = [e for e in read_jsonl(events_file(tmp_path)) if e["kind"] == "simulated_oom"]
    assert (event["step"], event["data"]["module"], event["data"]["size"]) == (1, "net.0", 32)
    assert not model.net[0]._forward_pre_hooks  # removed although fit failed (Lightning calls no teardown then)
    assert "training_step" not in model.__dict__


@pytest.mark.parametrize("module", [None, "net.2", ""])
def test_oom_size_is_the_input_of_the_hooked_module_not_the_batch(tmp_path, module):
    """The DataLoader batch is 32 > 16, but the forward sees 8 samples: no OOM; at 4 memory runs out."""
    tr, _ = digits_loaders(batch_size=32)
    inj = SimulatedOOM(16, module=module)
    trainer(tmp_path / "a", [inj], max_steps=3).fit(CountingNet(fraction=4), tr)
    assert inj.seen_sizes == [8, 8, 8]
    assert inj.injected == []
    small = SimulatedOOM(4, module=module)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"micro-batch of 8 > 4"):
        trainer(tmp_path / "b", [small], max_steps=3).fit(CountingNet(fraction=4), tr)
    assert small.seen_sizes == [8]


def test_oom_is_training_only_unless_asked_and_oomguard_splits_validation(tmp_path):
    tr, va = digits_loaders(n_train=64, batch_size=16)  # validation batches: 32
    va = torch.utils.data.DataLoader(va.dataset, batch_size=32)
    train_only = SimulatedOOM(16)
    trainer(tmp_path / "a", [train_only]).fit(DigitsNet(), tr, va)  # validation at 32 > 16 is untouched
    assert train_only.seen_sizes == [16] * 4
    in_val, guard = SimulatedOOM(16, stages=["validate"]), OOMGuard()
    trainer(tmp_path / "b", [in_val, guard]).fit(DigitsNet(), tr, va)
    assert in_val.seen_sizes == [32, 16, 16] + [16, 16] * 3  # 4 validation batches: 32 fails, halves, then 16s
    assert guard.eval_micro_batch_size == {"validate": 16}


@pytest.mark.parametrize(
    ("module", "with_grad"),
    [(None, {"net.2.weight", "net.2.bias"}), ("net.2", set()), ("", set())],
)
def test_backward_oom_fires_mid_backward(tmp_path, module, with_grad):
    """The whole training_step ran; backward stopped where the gradient reached the hooked module's output: the later
    layer's parameters got gradients, the hooked layer's and earlier ones' did not (default: the middle layer)."""
    tr, _ = digits_loaders(batch_size=32)
    model, inj = CountingNet(), SimulatedOOM(16, where="backward", steps=[1], module=module)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"micro-batch of 32 > 16 in the backward of module"):
        trainer(tmp_path, [inj]).fit(model, tr)
    assert (model.before, model.after) == (2, 2)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == with_grad
    assert inj.injected == [1]


class CopyMidTraining(Callback):
    """Copies and pickles the module (and the injector) while the injector's hooks are registered."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 1:
            oom = next(c for c in trainer.callbacks if isinstance(c, SimulatedOOM))
            self.module_bytes = len(pickle.dumps(pl_module.net))
            self.copy = copy.deepcopy(pl_module.net)
            self.copy_out = self.copy(torch.zeros(64, 64))  # 64 > 16: an active hook would raise
            self.injector = pickle.loads(pickle.dumps(oom))


def test_copies_of_the_module_made_mid_training_carry_inert_hooks(tmp_path):
    tr, _ = digits_loaders(batch_size=16)
    inj, probe = SimulatedOOM(16), CopyMidTraining()
    model = DigitsNet()
    trainer(tmp_path, [inj, probe], max_steps=3).fit(model, tr)
    assert probe.copy_out.shape == (64, 10)
    assert probe.module_bytes > 0
    assert probe.injector._handles == {}
    assert probe.injector.seen_sizes == [16]
    assert inj.seen_sizes == [16, 16, 16]  # the copy's forward was not counted
    assert not model.net[0]._forward_pre_hooks
    assert not model.net[0]._forward_hooks


def test_backward_oom_needs_a_module_inside_the_graph(tmp_path):
    tr, _ = digits_loaders(batch_size=32)
    model = DigitsNet()
    model.net[0].requires_grad_(False)
    with pytest.raises(
        GuardConfigError,
        match=re.escape(
            "SimulatedOOM(where='backward'): the output of module 'net.0' needs no gradient, so backward never "
            "reaches it; pass a `module` inside the graph of the loss"
        ),
    ):
        trainer(tmp_path, [SimulatedOOM(16, where="backward", module="net.0")]).fit(model, tr)


_LEAVES = r"modules with trainable parameters: \['net.0', 'net.2'\]"


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SimulatedOOM(4, module="net.9"), r"`module` 'net.9' is not a submodule of DigitsNet; " + _LEAVES),
        (lambda: ScaleOverflow(module="head"), r"`module` 'head' is not a submodule of DigitsNet; " + _LEAVES),
        (
            lambda: InjectNaN("grad", param="net.9.bias"),
            r"`param` 'net.9.bias' is not a parameter of DigitsNet; parameters: \['net.0.weight', 'net.0.bias', ",
        ),
    ],
)
def test_unknown_module_or_parameter_is_refused_at_train_start(tmp_path, make, match):
    tr, _ = digits_loaders()
    with pytest.raises(GuardConfigError, match=match):
        trainer(tmp_path, [make()], max_steps=1, **precision_kwargs("16-mixed")).fit(DigitsNet(), tr)


# ---------------------------------------------------------------------------------------------- InjectNaN


class GradFinite(Callback):
    """Per step: the parameters whose gradient is non-finite at on_before_optimizer_step, and the loss scale after."""

    def __init__(self):
        self.bad, self.scale = {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        bad = {n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p.grad).all())}
        self.bad[trainer.global_step] = bad

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scale[trainer.global_step - 1] = scaler.get_scale() if scaler is not None else None


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
@pytest.mark.parametrize(("param", "expected"), [(None, "net.0.weight"), ("net.2.bias", "net.2.bias")])
def test_grad_nan_hits_exactly_the_named_parameter_before_unscaling(tmp_path, precision, param, expected):
    tr, _ = digits_loaders()
    probe = GradFinite()
    inj = InjectNaN("grad", steps=[2], param=param)
    trainer(tmp_path, [inj, probe], max_steps=4, **precision_kwargs(precision)).fit(DigitsNet(), tr)
    assert probe.bad[2] == {expected}
    assert probe.bad[0] == probe.bad[1] == set()
    if precision == "16-mixed":  # written before unscale_: the GradScaler itself found it, skipped and backed off
        assert probe.scale[2] == probe.scale[1] / 2
    (event,) = [e for e in read_jsonl(events_file(tmp_path)) if e["guard"] == "fault_injector"]
    assert (event["kind"], event["step"], event["data"]["param"]) == ("nan_grad", 2, expected)


def test_inf_loss_gives_non_finite_gradients_as_a_real_one(tmp_path):
    tr, _ = digits_loaders()
    probe, grads = Probe(), GradFinite()
    trainer(tmp_path, [probe, grads, InjectNaN("loss", steps=[1], value=float("inf"))], max_steps=2).fit(
        DigitsNet(), tr
    )
    assert probe.losses[1] == float("inf")
    assert grads.bad[1] == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert grads.bad[0] == set()


class DumpBadGrads(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == 1:
            bad = sorted(n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p.grad).all()))
            (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(bad))


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_ddp_grad_nan_on_one_rank_reaches_every_rank_through_the_all_reduce(tmp_path):
    """Written during backward on rank 1 (the hook is registered in the spawned worker), before DDP's all-reduce:
    both ranks see exactly that parameter non-finite, as with a real non-finite gradient on one rank."""
    tr, _ = digits_loaders(batch_size=32)
    cbs = [InjectNaN("grad", steps=[1], ranks=[1], param="net.2.bias"), DumpBadGrads(str(tmp_path))]
    trainer(tmp_path, cbs, devices=2, strategy="ddp_spawn", max_steps=2).fit(DigitsNet(), tr)
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [["net.2.bias"]] * 2
    events = [e for e in read_jsonl(events_file(tmp_path)) if e["guard"] == "fault_injector"]
    assert [(e["kind"], e["step"], e["ranks"]) for e in events] == [("nan_grad", 1, [1])]


# ---------------------------------------------------------------------------------------------- ScaleOverflow


class ScaleAndWeights(Callback):
    def __init__(self):
        self.moved, self.scale, self.bad = {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._w = [p.detach().clone() for p in pl_module.parameters()]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.bad[trainer.global_step] = {
            n for n, p in pl_module.named_parameters() if not bool(torch.isfinite(p.grad).all())
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.moved[step] = any(not torch.equal(a, p) for a, p in zip(self._w, pl_module.parameters(), strict=True))
        scaler = trainer.precision_plugin.scaler
        self.scale[step] = (scaler.get_scale(), int(scaler._get_growth_tracker()))


def test_scale_overflow_is_skipped_and_backed_off_by_the_grad_scaler(tmp_path):
    tr, _ = digits_loaders()
    clean, hit = ScaleAndWeights(), ScaleAndWeights()
    torch.manual_seed(0)
    trainer(tmp_path / "a", [clean], max_steps=6, **precision_kwargs("16-mixed")).fit(DigitsNet(), tr)
    torch.manual_seed(0)
    inj = ScaleOverflow(steps=[3])
    trainer(tmp_path / "b", [inj, hit], max_steps=6, **precision_kwargs("16-mixed")).fit(DigitsNet(), tr)
    assert clean.scale[5] == (65536.0, 6)  # no natural overflow in the clean run
    assert hit.scale[5] == (32768.0, 2)  # halved at step 3, growth count restarted
    assert hit.scale[2] == (65536.0, 3)
    assert [hit.moved[s] for s in range(6)] == [True, True, True, False, True, True]
    # the inf entered at the output layer's output: backward carried it into every parameter gradient
    assert hit.bad[3] == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert hit.bad[2] == hit.bad[4] == set()
    (event,) = [e for e in read_jsonl(events_file(tmp_path / "b")) if e["guard"] == "fault_injector"]
    assert (event["kind"], event["step"], event["data"]["module"]) == ("scale_overflow", 3, "net.2")
    assert (event["data"]["scale"], event["data"]["dtype"]) == (65536.0, "torch.float16")


@pytest.mark.parametrize(("precision", "plugin"), [("32-true", "Precision"), ("bf16-mixed", "MixedPrecision")])
def test_scale_overflow_is_refused_without_a_grad_scaler(tmp_path, precision, plugin):
    tr, _ = digits_loaders()
    t = trainer(tmp_path, [ScaleOverflow()], max_steps=1, **precision_kwargs(precision))
    with pytest.raises(GuardConfigError) as err:
        t.fit(DigitsNet(), tr)
    assert str(err.value) == (
        f"ScaleOverflow needs loss scaling with a GradScaler, and precision '{precision}' ({plugin}) has none: use "
        "precision='16-mixed' on CUDA, or on CPU plugins=[MixedPrecision('16-mixed', 'cpu', "
        "scaler=torch.amp.GradScaler('cpu'))]"
    )


# ---------------------------------------------------------------------------------------------- signatures, docs


class NoBatchIdxNet(DigitsNet):
    def training_step(self, batch):  # no batch_idx: Lightning reads the signature and passes only the batch
        x, y = batch
        return self.balanced_loss(self(x), y)


@pytest.mark.parametrize(
    "make",
    [
        lambda: [InjectNaN("batch", steps=[1])],
        lambda: [InjectNaN("loss", steps=[1])],
        lambda: [InjectNaN("grad", steps=[1])],
        lambda: [LossSpike(steps=[1])],
        lambda: [LossSpike(steps=[1]), InjectNaN("loss", steps=[1])],  # two wrappers
        lambda: [LRSpike(steps=[1])],
        lambda: [SimulatedOOM(16, steps=[1])],
        lambda: [SimulatedOOM(16, where="backward", steps=[1])],
        lambda: [ScaleOverflow(steps=[1])],
    ],
    ids=["nan_batch", "nan_loss", "nan_grad", "loss_spike", "two_wrappers", "lr_spike", "oom_fwd", "oom_bwd", "scale"],
)
def test_every_injector_works_with_a_training_step_without_batch_idx(tmp_path, make):
    tr, _ = digits_loaders(batch_size=32)
    injectors = make()
    t = trainer(tmp_path, injectors, max_steps=3, **precision_kwargs("16-mixed"))
    if isinstance(injectors[0], SimulatedOOM):
        with pytest.raises(torch.cuda.OutOfMemoryError):
            t.fit(NoBatchIdxNet(), tr)
    else:
        t.fit(NoBatchIdxNet(), tr)
        assert t.global_step == 3
    assert [inj.injected for inj in injectors] == [[1]] * len(injectors)


def test_fault_injection_doc_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "docs" / "fault-injection.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/fault-injection.md", "exec"), namespace)


class Logistic(DigitsNet):
    """Computes with its parameters directly: `self(x)` is never called in training_step."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = torch.nn.functional.linear(torch.relu(self.net[0](x)), self.net[2].weight, self.net[2].bias)
        return torch.nn.functional.cross_entropy(logits, y)


def test_simulated_oom_refuses_a_module_that_training_step_never_runs(tmp_path):
    tr, va = digits_loaders()
    oom = SimulatedOOM(max_batch_size=4, module="")  # the LightningModule itself: its forward never runs
    with pytest.raises(GuardConfigError, match=r"did not run in the first training step.*pass `module=`"):
        trainer(tmp_path, [oom]).fit(Logistic(), tr, va)


def test_one_carrier_of_events_a_guard_before_any_injector():
    """The injectors ask the runtime who carries the events (the base's rule, not a copy of it): the first guard,
    wherever it is listed; without a guard, the first injector. Before, an injector listed before a guard carried
    them too (two exchanges per epoch end)."""
    from lightning_guard import GradientGuard
    from lightning_guard._runtime import events_carrier

    first, second, guard = LossSpike(steps=[1]), InjectNaN(steps=[2]), GradientGuard()
    assert events_carrier(pl.Trainer(callbacks=[first, second, guard], logger=False)) is guard
    assert events_carrier(pl.Trainer(callbacks=[first, second], logger=False)) is first
    assert events_carrier(pl.Trainer(callbacks=[], logger=False)) is None
