"""OOMGuard: re-running an out-of-memory batch as micro-batches, on one process and under ddp_spawn."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_guard import GuardConfigError, OOMGuard, OOMGuardError
from lightning_guard.testing import SimulatedOOM
from tests.helpers import DigitsNet, digits_loaders, events_file, precision_kwargs, read_jsonl, trainer


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) for x, y in zip(a, b, strict=True))


def _events(tmp_path: Path, kind: str | None = None) -> list[dict[str, Any]]:
    rows = [e for e in read_jsonl(events_file(tmp_path)) if e["guard"] == "oom"]
    return [e for e in rows if kind is None or e["kind"] == kind]


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"micro_batch_size": 0}, "`micro_batch_size` must be an int >= 1 or None, got 0"),
        ({"micro_batch_size": 2.0}, "`micro_batch_size` must be an int >= 1 or None, got 2.0"),
        ({"grow_after": 0}, "`grow_after` must be an int >= 1 or None, got 0"),
        ({"loss_reduction": "median"}, "`loss_reduction` must be 'mean' or 'sum', got 'median'"),
        ({"split_eval": "yes"}, "`split_eval` must be a bool, got 'yes'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(GuardConfigError) as err:
        OOMGuard(**kwargs)
    assert str(err.value) == message


class ManualNet(DigitsNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self.balanced_loss(self(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_is_refused(tmp_path):
    tr, _ = digits_loaders()
    with pytest.raises(GuardConfigError) as err:
        trainer(tmp_path, [OOMGuard()], max_steps=1).fit(ManualNet(), tr)
    assert str(err.value) == (
        "OOMGuard needs automatic optimization (`automatic_optimization=True`): with manual optimization your "
        "training_step runs backward and step itself, so a batch cannot be re-run"
    )


# ---------------------------------------------------------------------------------------------- one process


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_exact_sequence_of_micro_batch_sizes(tmp_path, where):
    """Batch 32, memory for 5: 32 fails, 16 fails, 8 fails, 4 fits; then every step runs 8 micro-batches of 4."""
    tr, _ = digits_loaders(batch_size=32)
    sim, guard = SimulatedOOM(5, where=where), OOMGuard()
    t = trainer(tmp_path, [sim, guard], max_steps=3)
    model = DigitsNet()
    t.fit(model, tr)
    assert sim.seen_sizes == [32, 16, 8] + [4] * 8 * 3
    assert guard.micro_batch_size == 4
    assert t.global_step == 3
    retries = _events(tmp_path, "oom_retry")
    assert [(e["data"]["old_micro_batch_size"], e["data"]["new_micro_batch_size"]) for e in retries] == [
        (32, 16),
        (16, 8),
        (8, 4),
    ]
    assert all(e["data"]["where"] == [where] and e["data"]["oom_ranks"] == [0] for e in retries)
    assert all(e["step"] == 0 for e in retries)


class LastStepParams(Callback):
    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.params = _params(pl_module)


@pytest.mark.parametrize(("precision", "tol"), [("32-true", 1e-6), ("bf16-mixed", 5e-3), ("16-mixed", 1e-3)])
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_recovered_step_matches_the_full_batch_step(tmp_path, precision, tol, where):
    """One optimizer step with recovery (32 -> 16 -> 8) against the same step on the whole batch: same parameters,
    same loss reported to callbacks. Tolerance: 1e-6 relative in fp32 (measured 1.1e-7); bf16/fp16 round each
    micro-batch's activations differently: 5e-3 (bf16, measured 8.9e-4) and 1e-3 (fp16, measured 1.0e-4)."""
    tr, _ = digits_loaders(batch_size=32)
    torch.manual_seed(0)
    ref_model = DigitsNet(optimizer="sgd", lr=0.5)
    model = copy.deepcopy(ref_model)
    init = _params(ref_model)
    ref = LastStepParams()
    trainer(tmp_path / "ref", [ref], max_steps=1, **precision_kwargs(precision)).fit(ref_model, tr)
    got = LastStepParams()
    cbs = [SimulatedOOM(10, where=where), OOMGuard(), got]
    trainer(tmp_path / "oom", cbs, max_steps=1, **precision_kwargs(precision)).fit(model, tr)
    assert _max_rel(got.params, ref.params) <= tol
    assert got.losses == pytest.approx(ref.losses, rel=tol)
    assert _max_rel(ref.params, init) > 50 * tol  # the step moved the weights far more than the tolerance


def test_chunked_steps_match_plain_training_over_an_epoch(tmp_path):
    """Two epochs at micro-batch 8 of batch 32 (fp32): the trajectory matches plain training within 1e-5."""
    tr, _ = digits_loaders(batch_size=32)
    torch.manual_seed(1)
    ref_model = DigitsNet()
    model = copy.deepcopy(ref_model)
    trainer(tmp_path / "ref", [], max_epochs=2).fit(ref_model, tr)
    guard = OOMGuard(micro_batch_size=8)
    trainer(tmp_path / "oom", [guard], max_epochs=2).fit(model, tr)
    assert _max_rel(_params(model), _params(ref_model)) <= 1e-5
    assert guard.retries == 0


def test_sum_reduction_adds_micro_batch_losses(tmp_path):
    class SumNet(DigitsNet):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y, reduction="sum")

    tr, _ = digits_loaders(batch_size=32)
    torch.manual_seed(2)
    ref_model = SumNet(optimizer="sgd", lr=0.001)
    model = copy.deepcopy(ref_model)
    ref, got = LastStepParams(), LastStepParams()
    trainer(tmp_path / "ref", [ref], max_steps=2).fit(ref_model, tr)
    trainer(tmp_path / "oom", [OOMGuard(micro_batch_size=8, loss_reduction="sum"), got], max_steps=2).fit(model, tr)
    assert _max_rel(got.params, ref.params) <= 1e-5
    assert got.losses == pytest.approx(ref.losses, rel=1e-5)


def test_non_oom_errors_pass_through_untouched(tmp_path):
    class Broken(DigitsNet):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("shape mismatch in my layer")

    tr, _ = digits_loaders()
    with pytest.raises(RuntimeError, match="shape mismatch in my layer"):
        trainer(tmp_path, [OOMGuard()], max_steps=1).fit(Broken(), tr)
    assert _events(tmp_path) == []


def test_cudnn_not_supported_down_to_one_sample_says_it_is_likely_not_memory(tmp_path):
    """cuDNN answers NOT_SUPPORTED both when its workspace does not fit and when it has no kernel for an input: it was
    halved down to a fatal "one sample does not fit". At one sample the error now says what it most likely is."""

    class NoKernel(DigitsNet):
        def forward(self, x):
            raise RuntimeError(
                "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if you passed in a "
                "non-contiguous input."
            )

    tr, _ = digits_loaders(batch_size=4)
    with pytest.raises(OOMGuardError) as err:
        trainer(tmp_path, [OOMGuard()], max_steps=1).fit(NoKernel(), tr)
    assert str(err.value).startswith(
        "OOMGuard: cuDNN kept answering CUDNN_STATUS_NOT_SUPPORTED down to micro-batch size 1 on rank [0]. cuDNN says "
        "this when its workspace does not fit, which is why the batch was halved, but also for an input it has no "
        "kernel for (dtype, layout, shape): at one sample this is most likely not an out-of-memory."
    )
    assert "The error was: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear" in str(err.value)
    assert [e["kind"] for e in _events(tmp_path)] == ["oom_retry", "oom_retry", "oom_fatal"]


def test_out_of_memory_inside_the_optimizer_step_is_reported_not_retried(tmp_path):
    """Adam allocating its state at the first step ran out of memory: the raw error escaped with no event. Halving the
    micro-batch cannot help there: an oom_fatal event says so, and OOMGuardError carries it."""

    class StateHungry(torch.optim.AdamW):
        def step(self, closure=None):
            loss = closure() if closure is not None else None  # forward and backward go through
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return loss

    class Net(DigitsNet):
        def configure_optimizers(self):
            return StateHungry(self.parameters(), lr=1e-3)

    tr, _ = digits_loaders(batch_size=8)
    with pytest.raises(OOMGuardError) as err:
        trainer(tmp_path, [OOMGuard()], max_steps=1).fit(Net(), tr)
    assert str(err.value).startswith(
        "OOMGuard: out of memory inside optimizer.step on rank 0, after backward (the optimizer allocating its state "
        "or a workspace: AdamW keeps two fp32 copies of every parameter): smaller micro-batches cannot help."
    )
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    (event,) = _events(tmp_path)
    assert (event["kind"], event["data"]["where"]) == ("oom_fatal", "optimizer_step")


def test_out_of_memory_at_one_sample_raises_with_the_figures(tmp_path):
    tr, _ = digits_loaders(batch_size=4)
    t = trainer(tmp_path, [SimulatedOOM(0), OOMGuard()], max_steps=1)
    with pytest.raises(OOMGuardError) as err:
        t.fit(DigitsNet(), tr)
    assert str(err.value) == (
        "OOMGuard: out of memory at micro-batch size 1 on rank [0] (rank 0: no CUDA memory figures): one sample does "
        "not fit; reduce the model, the sequence length or the precision, or shard the model"
    )
    assert err.value.micro_batch_size == 1
    assert err.value.ranks == (0,)
    kinds = [e["kind"] for e in _events(tmp_path)]
    assert kinds == ["oom_retry", "oom_retry", "oom_fatal"]  # 4 -> 2 -> 1 -> fatal, every event on disk


def test_grow_back_after_clean_steps_and_backoff_when_it_fails(tmp_path):
    """Memory for 16 of 32: halve to 16; after 2 clean steps try 32 again, fail, return to 16 and wait 4 clean
    steps, fail again, wait 8. Each failed try re-runs its batch at 16 in the same step (events carry the step)."""
    tr, _ = digits_loaders(batch_size=32)
    sim, guard = SimulatedOOM(16), OOMGuard(grow_after=2)
    trainer(tmp_path, [sim, guard], max_steps=8).fit(DigitsNet(), tr)
    events = [(e["kind"], e["step"]) for e in _events(tmp_path)]
    assert events == [
        ("oom_retry", 0),
        ("grow_back", 2),  # after steps 0 and 1
        ("oom_retry", 2),
        ("grow_back", 6),  # after steps 2..5
        ("oom_retry", 6),
    ]
    failed = _events(tmp_path, "oom_retry")[1:]
    assert [e["data"].get("reason") for e in failed] == ["grow_back_failed"] * 2
    assert [e["data"]["new_micro_batch_size"] for e in failed] == [16, 16]
    assert guard.micro_batch_size == 16
    assert sim.seen_sizes == [32] + [16] * 4 + [32] + [16] * 8 + [32] + [16] * 4


class RecordSizes(Callback):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        guard = next(c for c in trainer.callbacks if isinstance(c, OOMGuard))
        self.sizes.append(guard.micro_batch_size or 0)


def test_resume_starts_at_the_saved_micro_batch_size_and_follows_the_same_trajectory(tmp_path):
    tr, _ = digits_loaders(batch_size=32)  # 8 batches per epoch
    torch.manual_seed(3)
    init = DigitsNet()
    full = copy.deepcopy(init)
    trainer(tmp_path / "full", [SimulatedOOM(8, steps=[1]), OOMGuard()], max_epochs=2).fit(full, tr)

    part = copy.deepcopy(init)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = trainer(
        tmp_path / "a", [SimulatedOOM(8, steps=[1]), OOMGuard(), ckpt], max_epochs=1, enable_checkpointing=True
    )
    first.fit(part, tr)
    resumed_guard, sizes = OOMGuard(), RecordSizes()
    sim = SimulatedOOM(8, steps=[1])
    second = trainer(tmp_path / "b", [sim, resumed_guard, sizes], max_epochs=2, enable_checkpointing=True)
    resumed = copy.deepcopy(init)
    second.fit(resumed, tr, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert sizes.sizes == [8] * 8  # no new OOM, no search: the saved size from the first batch on
    assert set(sim.seen_sizes) == {8}
    assert _max_rel(_params(resumed), _params(full)) <= 1e-6
    assert resumed_guard.retries == 2


def test_resume_in_the_middle_of_a_grow_back_keeps_its_backoff(tmp_path):
    """A checkpoint taken right after a grow-back (step 2): the resumed run fails at 32, returns to 16 and waits 4
    steps before the next try, exactly as the uninterrupted run does."""
    tr, _ = digits_loaders(batch_size=32)
    full_sizes = RecordSizes()
    trainer(tmp_path / "full", [SimulatedOOM(16), OOMGuard(grow_after=2), full_sizes], max_steps=8).fit(DigitsNet(), tr)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    cbs = [SimulatedOOM(16), OOMGuard(grow_after=2), ckpt]
    trainer(tmp_path / "a", cbs, max_steps=3, enable_checkpointing=True).fit(DigitsNet(), tr)
    resumed_sizes = RecordSizes()
    cbs = [SimulatedOOM(16), OOMGuard(grow_after=2), resumed_sizes]
    second = trainer(tmp_path / "b", cbs, max_steps=8)
    second.fit(DigitsNet(), tr, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert resumed_sizes.sizes == full_sizes.sizes[2:]
    assert full_sizes.sizes == [16, 0, 16, 16, 16, 0, 16, 16]  # 0: the whole batch (a grow-back being tried next)


class EvalOOMNet(DigitsNet):
    """predict/validation steps run out of memory above ``limit`` samples."""

    limit = 1000

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        if batch[0].shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB (test)")
        names = [f"sample {int(v)}" for v in batch[1]]  # per-sample values that are no tensor
        return {"logits": self(batch[0]), "n": batch[0].shape[0], "names": names, "pairs": [(n, 1) for n in names]}

    def validation_step(self, batch, batch_idx):
        if batch[0].shape[0] > self.limit:
            raise RuntimeError("CUDA error: out of memory (test)")
        return super().validation_step(batch, batch_idx)


def test_predict_splitting_gives_identical_outputs(tmp_path):
    _, va = digits_loaders(batch_size=32)
    model = EvalOOMNet()
    plain = trainer(tmp_path / "a", []).predict(model, va)
    model.limit = 5
    guard = OOMGuard()
    split = trainer(tmp_path / "b", [guard]).predict(model, va)
    assert len(split) == len(plain)
    for a, b in zip(plain, split, strict=True):
        assert torch.equal(a["logits"], b["logits"])
        assert a["n"] == b["n"]
        assert a["names"] == b["names"]  # per-sample lists: 32 names became 16 before
        assert a["pairs"] == b["pairs"]
    assert guard.eval_micro_batch_size == {"predict": 4}


def test_validation_splitting_logs_the_same_metrics(tmp_path):
    _, va = digits_loaders(batch_size=32)
    model = EvalOOMNet()
    plain = trainer(tmp_path / "a", []).validate(model, va, verbose=False)[0]
    model.limit = 10
    split = trainer(tmp_path / "b", [OOMGuard()]).validate(model, va, verbose=False)[0]
    assert split == pytest.approx(plain, rel=1e-6)
    model.limit = 0
    with pytest.raises(OOMGuardError, match="out of memory at micro-batch size 1"):
        trainer(tmp_path / "c", [OOMGuard()]).validate(model, va, verbose=False)


def test_eval_splitting_can_be_turned_off(tmp_path):
    _, va = digits_loaders(batch_size=32)
    model = EvalOOMNet()
    model.limit = 5
    with pytest.raises(torch.OutOfMemoryError):
        trainer(tmp_path, [OOMGuard(split_eval=False)]).predict(model, va)


def test_micro_batch_size_metric_and_module_restored_after_fit(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    tr, _ = digits_loaders(batch_size=32)
    model = DigitsNet()
    t = trainer(tmp_path, [SimulatedOOM(20), OOMGuard()], max_steps=2, logger=CSVLogger(tmp_path))
    t.fit(model, tr)
    import csv

    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    sizes = [float(r["guard/oom/micro_batch_size"]) for r in rows if r.get("guard/oom/micro_batch_size")]
    assert sizes == [16.0, 16.0]
    for name in ("training_step", "backward", "optimizer_step", "optimizer_zero_grad", "validation_step"):
        assert name not in model.__dict__  # the instance wrappers are gone: the module pickles as before


# ---------------------------------------------------------------------------------------------- ddp_spawn


class _OOMMidBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fail):
        ctx.fail = fail
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.fail:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB (test, mid-backward)")
        return grad, None


class MidBackwardNet(DigitsNet):
    """On rank 1, the backward of chosen forward calls runs out of memory between the two layers, after the last
    layer's gradients were produced (so part of DDP's buckets are already reduced)."""

    def __init__(self, fail_calls: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.fail_calls = fail_calls
        self.calls = 0

    def forward(self, x):
        h = torch.relu(self.net[0](x))
        fail = self.trainer.global_rank == 1 and self.calls in self.fail_calls and self.training
        if self.training:
            self.calls += 1
        return self.net[2](_OOMMidBackward.apply(h, fail))


class DumpWeights(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        guard = next(c for c in trainer.callbacks if isinstance(c, OOMGuard))
        state = {"w": [p.detach().flatten().tolist() for p in pl_module.parameters()], "mbs": guard.micro_batch_size}
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(state))


def _rank_states(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    return r0, r1


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_ddp_forward_oom_on_rank_1_only(tmp_path):
    """Rank 1 runs out of memory in forward at step 1 only: rank 0 does not hang in the all-reduce, both ranks re-run
    the batch at 16 and finish with identical weights; one event naming rank 1."""
    tr, _ = digits_loaders(batch_size=32)
    cbs = [SimulatedOOM(16, where="forward", ranks=[1], steps=[1]), OOMGuard(), DumpWeights(str(tmp_path))]
    trainer(tmp_path, cbs, devices=2, strategy="ddp_spawn", max_steps=3).fit(DigitsNet(), tr)
    r0, r1 = _rank_states(tmp_path)
    assert r0 == r1
    assert r0["mbs"] == 16
    (event,) = _events(tmp_path, "oom_retry")
    assert (event["step"], event["ranks"], event["data"]["where"]) == (1, [1], ["forward"])


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_ddp_backward_oom_on_rank_1_only_mid_graph(tmp_path):
    """Rank 1 runs out of memory half-way through backward, twice: at step 0 on the whole batch (no gradients yet),
    and at step 2 in the last micro-batch after the first one accumulated. Both times rank 1 completes DDP's
    all-reduce for the parameters it had not reached, both ranks re-run and end with identical weights."""
    tr, _ = digits_loaders(batch_size=32)
    # forward calls: step 0 -> 0 (fails), 1, 2 at 16; step 1 -> 3, 4; step 2 -> 5, 6 (fails), then 7..10 at 8
    model = MidBackwardNet(fail_calls=(0, 6))
    cbs = [OOMGuard(), DumpWeights(str(tmp_path))]
    trainer(tmp_path, cbs, devices=2, strategy="ddp_spawn", max_steps=4).fit(model, tr)
    r0, r1 = _rank_states(tmp_path)
    assert r0 == r1
    assert r0["mbs"] == 8
    events = _events(tmp_path, "oom_retry")
    assert [(e["step"], e["ranks"], e["data"]["where"], e["data"]["new_micro_batch_size"]) for e in events] == [
        (0, [1], ["backward"], 16),
        (2, [1], ["backward"], 8),
    ]


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_ddp_fatal_on_rank_1_only_stops_every_rank(tmp_path):
    """Rank 1 cannot fit even one sample: both ranks agree, rank 0 records `oom_fatal` naming rank 1 and every rank
    raises OOMGuardError (no rank is left waiting in a collective)."""
    tr, _ = digits_loaders(batch_size=4)
    cbs = [SimulatedOOM(0, ranks=[1]), OOMGuard()]
    with pytest.raises(Exception, match="OOMGuard: out of memory at micro-batch size 1 on rank \\[1\\]"):
        trainer(tmp_path, cbs, devices=2, strategy="ddp_spawn", max_steps=2).fit(DigitsNet(), tr)
    events = _events(tmp_path)
    assert [(e["kind"], e["ranks"]) for e in events] == [("oom_retry", [1]), ("oom_retry", [1]), ("oom_fatal", [1])]


def test_an_oom_in_the_short_last_micro_batch_halves_the_configured_size(tmp_path):
    """Batch 50 in micro-batches of 12 (12, 12, 12, 12, 2): an OOM in the last, short one halved *its* size (2 -> 1)
    instead of the configured 12, and the next such OOM ended training."""

    class ShortTailOOM(DigitsNet):
        fired = 0

        def training_step(self, batch, batch_idx):
            if batch[0].shape[0] == 2 and self.fired < 1:
                type(self).fired += 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB (test)")
            return super().training_step(batch, batch_idx)

    tr, _ = digits_loaders(n_train=100, batch_size=50)
    guard = OOMGuard(micro_batch_size=12)
    trainer(tmp_path, [guard], max_steps=2).fit(ShortTailOOM(), tr)
    (retry,) = [e for e in _events(tmp_path) if e["kind"] == "oom_retry"]
    assert (retry["data"]["old_micro_batch_size"], retry["data"]["new_micro_batch_size"]) == (12, 6)
    assert guard.micro_batch_size == 6


class StateHungryOnRank1(torch.optim.AdamW):
    def step(self, closure=None):
        if closure is not None:
            closure()
        if torch.distributed.get_rank() == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (rank 1)")
        return super().step()


class HungryNet(DigitsNet):
    def configure_optimizers(self):
        return StateHungryOnRank1(self.parameters(), lr=1e-3)


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_ddp_optimizer_step_oom_on_one_rank_ends_the_run_with_its_event(tmp_path):
    """Rank 1 alone runs out of memory inside optimizer.step: the run ends (no rank left waiting forever) with the
    OOMGuardError, and rank 1's oom_fatal event is on disk."""
    tr, _ = digits_loaders(batch_size=8)
    t = trainer(tmp_path, [OOMGuard()], devices=2, strategy="ddp_spawn", max_steps=3)
    with pytest.raises(Exception, match=r"out of memory inside optimizer\.step on rank 1"):
        t.fit(HungryNet(), tr)
    events = [e for p in tmp_path.rglob("guard_events*.jsonl") for e in read_jsonl(p)]
    assert [(e["kind"], e["data"]["where"]) for e in events if e["guard"] == "oom"] == [("oom_fatal", "optimizer_step")]


def _two_process_trainer(strategy):
    from types import SimpleNamespace

    return SimpleNamespace(strategy=strategy, world_size=2)


def test_fsdp1_and_deepspeed_are_refused_with_the_reason():
    from lightning.pytorch.strategies import FSDPStrategy

    (problem,) = OOMGuard()._strategy_problems(_two_process_trainer(FSDPStrategy()))
    assert problem == (
        "OOMGuard supports DDP and FSDP2 (ModelParallelStrategy) among multi-process strategies, got FSDPStrategy with "
        "2 processes: under FSDP (FSDPStrategy) and DeepSpeed the sharded blocks' collectives run where OOMGuard "
        "cannot fence them, so a rank that runs out of memory mid-step would leave the others waiting. Use DDP or "
        "FSDP2 (ModelParallelStrategy with fully_shard), or lower the batch size"
    )


def test_tensor_parallelism_is_refused_and_fsdp2_needs_reset_iter_state(monkeypatch):
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    def strategy(tp):
        s = ModelParallelStrategy(data_parallel_size=2 // tp, tensor_parallel_size=tp)
        s._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: tp)}
        return s

    (problem,) = OOMGuard()._strategy_problems(_two_process_trainer(strategy(2)))
    assert problem == (
        "OOMGuard under ModelParallelStrategy supports data-parallel sharding (FSDP2) only, got "
        "tensor_parallel_size=2: tensor parallelism's collectives run inside DTensor operations, where OOMGuard "
        "cannot fence them, so a rank that runs out of memory mid-step would leave the others waiting. Use "
        "tensor_parallel_size=1, or lower the batch size"
    )
    assert OOMGuard()._strategy_problems(_two_process_trainer(strategy(1))) == []
    monkeypatch.setattr("lightning_guard.callbacks.oom_guard.guard.can_reset_after_failure", lambda: False)
    (problem,) = OOMGuard()._strategy_problems(_two_process_trainer(strategy(1)))
    assert problem.startswith("OOMGuard under FSDP2 needs torch's FSDPModule.reset_iter_state (torch 2.13 has it)")
