"""The guards' one per-step agreement: collectives and host syncs per optimizer step, counted inside ddp_spawn workers.

Every ``torch.distributed`` collective is counted (whatever group it runs on: the guards' own gloo group too), and
every read of a tensor's value into Python (``item``, ``tolist``, ``cpu``, ``bool``, ``float``...) made by
lightning_guard's code. A read of memory that a collective in the window has just filled (a gloo gather's output) or
that a counted ``cpu()`` copied is host memory already and is not counted again. On a GPU each counted read is a
device-to-host sync.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

import lightning_guard
from lightning_guard import GradientGuard, GuardCallback, L1Penalty, OOMGuard, WarmupCosine
from lightning_guard._fence import COLLECTIVES
from tests.helpers import DigitsNet, MicroBatchAt, digits_loaders, events_file, read_jsonl, trainer

_PACKAGE = str(Path(lightning_guard.__file__).parent)
_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


class CountPerStep(Callback):
    """In each worker: per optimizer step, the collectives issued and lightning_guard's reads of tensor values."""

    def __init__(self, out: str, first: int) -> None:
        self.out, self.first = out, first
        self.rows: list[dict[str, Any]] = []
        self._on = False

    def on_train_start(self, trainer, pl_module):
        self._host: list[torch.Tensor] = []  # host memory of the window, kept alive (a freed pointer is reused)
        self._patched: list[tuple[Any, str, Any]] = []
        for name in COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                self._patch(dist, name, self._collective(name, original))
        for name in _READS:
            self._patch(torch.Tensor, name, self._read(name, getattr(torch.Tensor, name)))

    def _patch(self, owner: Any, name: str, new: Any) -> None:
        self._patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, new)

    def _collective(self, name: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self._on:
                self._row["collectives"].append(name)
                for a in (*args, *kwargs.values()):
                    for t in a if isinstance(a, list) else [a]:
                        if isinstance(t, torch.Tensor):
                            self._host.append(t)
            return original(*args, **kwargs)

        return counted

    def _read(self, name: str, original: Any) -> Any:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            out = original(tensor, *args, **kwargs)
            if self._on and not self._is_host(tensor):
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(_PACKAGE):
                    self._row["reads"].append(f"{name} {Path(caller).name}:{sys._getframe(1).f_lineno}")
                    if isinstance(out, torch.Tensor):
                        self._host.append(out)
            return out

        return counted

    def _is_host(self, tensor: torch.Tensor) -> bool:
        ptr = tensor.untyped_storage().data_ptr()
        return any(ptr == t.untyped_storage().data_ptr() for t in self._host)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._row = {"collectives": [], "reads": []}
        self._host.clear()
        self._on = trainer.global_step >= self.first

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._on:
            self.rows.append(self._row)
        self._on = False

    def on_train_end(self, trainer, pl_module):
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))


class SyncLogNet(DigitsNet):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss


def _fit(tmp_path: Path, model: DigitsNet, oom_guard: bool = True) -> list[list[dict[str, Any]]]:
    tr, _ = digits_loaders(n_train=640, batch_size=32)
    counter = CountPerStep(str(tmp_path), first=2)  # steps 0 and 1 learn what a step issues
    guards = [WarmupCosine(warmup=2), GradientGuard(), L1Penalty(1e-5)] + ([OOMGuard()] if oom_guard else [])
    logger = CSVLogger(str(tmp_path), name="csv")
    t = trainer(
        tmp_path, [counter, *guards], devices=2, strategy="ddp_spawn", max_steps=10, max_epochs=-1, logger=logger
    )
    t.log_every_n_steps = 50
    t.fit(model, tr)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.ddp
@pytest.mark.timeout(180)
@pytest.mark.parametrize("oom_guard", [True, False], ids=["on_the_fence_group", "through_the_strategy"])
def test_all_step_path_guards_agree_once_per_step_with_one_host_sync(tmp_path, oom_guard):
    """Main: each guard agreed on its own. Per optimizer step under DDP, OOMGuard all-gathered twice on its gloo group
    (at the end of training_step and after backward) and GradientGuard once more, with its host sync: 3 collectives.
    Now WarmupCosine, GradientGuard, L1Penalty and OOMGuard together issue one collective (OOMGuard's status,
    GradientGuard's norm and loss and the pending-event count travel together) and read one device value per step;
    without OOMGuard the agreement goes through the default group: one collective, one read too. Issue 26: that
    collective is an all-reduce of a fixed-size vector (it was an all-gather of a row per rank), and without
    OOMGuard it is no longer preceded by the barrier of Lightning's ``strategy.reduce``."""
    per_rank = _fit(tmp_path, DigitsNet(), oom_guard)
    for rows in per_rank:
        assert len(rows) == 8
        for row in rows:
            assert row["collectives"] == ["all_reduce"], row
            assert len(row["reads"]) == 1, row


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_a_step_with_its_own_collective_keeps_the_fence_and_still_one_host_sync(tmp_path):
    """``self.log(..., sync_dist=True)`` in training_step issues a barrier and an all-reduce (Lightning's
    ``_sync_ddp``): each is fenced (an agreement in front of it), one agreement ends the step (a rank that ran out of
    memory in forward must not reach DDP's all-reduce alone) and the step's agreement follows: four of the guards'
    around the user's two; still one device read. Every agreement is an all-reduce of a fixed-size vector."""
    per_rank = _fit(tmp_path, SyncLogNet())
    for rows in per_rank:
        for row in rows:
            fenced = ["all_reduce", "barrier", "all_reduce", "all_reduce"]
            assert row["collectives"] == [*fenced, "all_reduce", "all_reduce"], row
            assert len(row["reads"]) == 1, row


class DumpWeights(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        w = [p.detach().flatten().tolist() for p in pl_module.parameters()]
        (Path(self.out) / f"weights{trainer.global_rank}.json").write_text(json.dumps(w))


@pytest.mark.ddp
@pytest.mark.timeout(240)
def test_one_rank_out_of_memory_in_a_quiet_step_is_told_at_the_step_agreement(tmp_path):
    """A step with no collective of its own has no agreement at its end: rank 1, out of memory in forward at step 4,
    completes DDP's all-reduce with a zero loss and says so at the step's agreement, where every rank abandons the
    attempt before any guard looks at its gradients; rank 0 does the same after a backward out-of-memory at step 6.
    Both ranks end with the weights of a run that switched micro-batch sizes at those steps without failing."""
    from lightning_guard.testing import SimulatedOOM

    tr, _ = digits_loaders(n_train=640, batch_size=32)

    def fit(out: Path, extra: list[Any]) -> list[Any]:
        out.mkdir()
        guards = [WarmupCosine(warmup=2), GradientGuard(), L1Penalty(1e-5), OOMGuard()]
        counter = CountPerStep(str(out), first=0)
        cbs = [counter, *extra, *guards, DumpWeights(str(out))]
        t = trainer(out, cbs, devices=2, strategy="ddp_spawn", max_steps=8)
        torch.manual_seed(0)
        t.fit(DigitsNet(), tr)
        return [json.loads((out / f"weights{r}.json").read_text()) for r in (0, 1)]

    ref = fit(tmp_path / "ref", [MicroBatchAt(4, 16), MicroBatchAt(6, 8)])
    faults = [
        SimulatedOOM(16, where="forward", ranks=[1], steps=[4]),
        SimulatedOOM(8, where="backward", ranks=[0], steps=[6]),
    ]
    got = fit(tmp_path / "oom", faults)
    assert got[0] == got[1]
    for g, r in zip(got[0], ref[0], strict=True):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(r), rtol=1e-6, atol=1e-6)
    events = [e for e in read_jsonl(events_file(tmp_path / "oom")) if e["kind"] == "oom_retry"]
    assert [(e["step"], e["ranks"], e["data"]["where"]) for e in events] == [
        (4, [1], ["forward"]),
        (6, [0], ["backward"]),
    ]
    rows = json.loads((tmp_path / "oom" / "rank0.json").read_text())
    # Step 0 ends with an agreement (nothing is known of the step yet); steps 1-3 have the step's agreement only.
    # Step 4: the agreement that abandons the attempt, rank 1's injector event forwarded to rank 0 (two gathers), who
    # failed and at what size (one gather, at the recovery), and the re-run in two micro-batches of 16: the first,
    # under no_sync, needs no agreement of its own (issue 26: it had one). Step 5: the step's agreement alone.
    # Step 6: rank 0's backward fails in the first micro-batch; it posts the failure in the last one (the step's
    # agreement, which abandons the attempt), who failed (one gather), and the re-run at 8 (four micro-batches, the
    # step's agreement alone; rank 0's own event needs no forwarding).
    assert [len(r["collectives"]) for r in rows] == [2, 1, 1, 1, 1 + 2 + 1 + 1, 1, 1 + 1 + 1, 1]


class LateSyncLogNet(DigitsNet):
    """A collective that no step before step 5 issued (a periodic ``sync_dist`` log, a metric synced every N steps)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.global_step == 5:
            self.log("synced", loss, sync_dist=True)
        return loss


class SyncLogBeforeStep(Callback):
    """A user callback with a collective between backward and the optimizer step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pl_module.log("seen", torch.tensor(1.0), sync_dist=True)


@pytest.mark.ddp
@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", ["late_in_training_step", "in_a_callback_after_backward"])
def test_one_rank_out_of_memory_in_a_quiet_step_with_a_collective_of_its_own_recovers(tmp_path, where):
    """Review: after quiet steps, rank 1 ran out of memory in forward and went on to DDP's all-reduce, while rank 0
    waited at the fence's agreement in front of the step's first ``sync_dist`` all-reduce (at step 5): both stopped
    with ``OOMGuardError`` after ``collective_timeout``. The first mend (the failed rank posts its failure without
    waiting, then waited for it after backward) deadlocked against a user callback's ``sync_dist`` log between
    backward and the optimizer step. Now the failed rank waits for its post only at the step's agreement; every rank
    re-runs the batch."""
    from lightning_guard.testing import SimulatedOOM

    tr, _ = digits_loaders(n_train=640, batch_size=32)
    late = where == "late_in_training_step"
    fault = SimulatedOOM(16, where="forward", ranks=[1], steps=[5 if late else 4])
    cbs: list[Any] = [fault] + ([] if late else [SyncLogBeforeStep()])
    cbs += [OOMGuard(collective_timeout=30), GradientGuard(), DumpWeights(str(tmp_path))]
    model = LateSyncLogNet() if late else DigitsNet()
    trainer(tmp_path, cbs, devices=2, strategy="ddp_spawn", max_steps=8).fit(model, tr)
    w0, w1 = (json.loads((tmp_path / f"weights{r}.json").read_text()) for r in (0, 1))
    assert w0 == w1
    events = [e for e in read_jsonl(events_file(tmp_path)) if e["guard"] == "oom"]
    assert [(e["kind"], e["step"], e["ranks"]) for e in events] == [("oom_retry", 5 if late else 4, [1])]


class MeteredNet(DigitsNet):
    """A torchmetrics accuracy updated and logged on step (synced on step or not)."""

    def __init__(self, sync_on_step: bool) -> None:
        super().__init__(optimizer="sgd", lr=0.5)
        from torchmetrics.classification import MulticlassAccuracy

        self.acc = MulticlassAccuracy(num_classes=10, dist_sync_on_step=sync_on_step)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.acc(logits, y)
        self.log("acc", self.acc, on_step=True, on_epoch=False)
        return F.cross_entropy(logits, y)


class NthCallOOM(Callback):
    """Out of memory in the forward of the ``n``-th call (0-based) of ``module`` in step ``step`` on ``rank``."""

    def __init__(self, rank: int, step: int, n: int, module: str = "net.0") -> None:
        self.rank, self.step, self.n, self.module = rank, step, n, module
        self.calls = 0

    def on_train_start(self, trainer, pl_module):
        def pre(mod, args):
            if trainer.global_rank == self.rank and trainer.global_step == self.step and trainer.training:
                self.calls += 1
                if self.calls == self.n + 1:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")

        pl_module.get_submodule(self.module).register_forward_pre_hook(pre)


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_a_metric_synced_on_step_and_one_rank_out_of_memory_in_a_later_micro_batch_recovers(tmp_path):
    """Review of issue 26 (a hang on main too): a torchmetrics metric with ``dist_sync_on_step`` logged on step,
    micro-batches of 8, rank 0 out of memory in the second micro-batch's forward. The failed attempt's log combining
    computed the metric (a collective) on the rank whose metric had seen two updates while the other waited for who
    failed: both timed out. Now a failed attempt combines nothing; the run equals one that switched sizes there."""
    tr, _ = digits_loaders(n_train=384, batch_size=24)

    def fit(out: Path, extra: list[Any]) -> list[Any]:
        out.mkdir()
        cbs = [*extra, OOMGuard(micro_batch_size=8, collective_timeout=30), DumpWeights(str(out))]
        torch.manual_seed(0)
        trainer(out, cbs, devices=2, strategy="ddp_spawn", max_steps=4).fit(MeteredNet(sync_on_step=True), tr)
        return [json.loads((out / f"weights{r}.json").read_text()) for r in (0, 1)]

    ref = fit(tmp_path / "ref", [MicroBatchAt(2, 4)])
    got = fit(tmp_path / "oom", [NthCallOOM(rank=0, step=2, n=1)])
    assert got[0] == got[1]
    for g, r in zip(got[0], ref[0], strict=True):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(r), rtol=1e-6, atol=1e-6)
    events = [e for e in read_jsonl(events_file(tmp_path / "oom")) if e["kind"] == "oom_retry"]
    assert [(e["step"], e["ranks"], e["data"]["where"]) for e in events] == [(2, [0], ["forward"])]


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_a_metric_logged_on_step_costs_no_collective_with_micro_batches(tmp_path):
    """Review of issue 26: a metric logged on step (not synced on step) in a step run as 3 micro-batches. Combining
    its value over the micro-batches computed it synced: 8 all-gathers and 4 barriers per step on main (13
    collectives with the step's agreement). Now this rank's value, as the whole batch logs it: the step's agreement
    alone."""
    tr, _ = digits_loaders(n_train=384, batch_size=24)
    counter = CountPerStep(str(tmp_path), first=2)
    t = trainer(tmp_path, [counter, OOMGuard(micro_batch_size=8)], devices=2, strategy="ddp_spawn", max_steps=6)
    t.fit(MeteredNet(sync_on_step=False), tr)
    for rank in (0, 1):
        rows = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [row["collectives"] for row in rows] == [["all_reduce"]] * 4, rows


class FirstVoter(GuardCallback):
    """A guard of the user's own with ``vote_first``, listed before OOMGuard, on the protocol before sums."""

    guard_name, vote_first = "first_voter", True

    def step_vote(self, trainer, pl_module, optimizer):
        return [float(trainer.global_rank)]

    def step_verdict(self, trainer, optimizer, rows):
        assert [r[0] for r in rows] == [0.0, 1.0]


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_a_voter_ahead_of_oom_guard_leaves_its_place_first(tmp_path):
    """Review of issue 26: a ``vote_first`` guard listed before OOMGuard put its number where the fence reads a rank's
    place; a one-rank backward out-of-memory went unseen (both ranks stepped on the failed attempt's gradients,
    1.3e-2 off), and a guard reading every rank's row crashed at the first step. OOMGuard, whose group holds the
    agreement, now votes first; the run equals one that switched sizes at the failure."""
    from lightning_guard.testing import SimulatedOOM

    tr, _ = digits_loaders(n_train=640, batch_size=32)

    def fit(out: Path, extra: list[Any]) -> list[Any]:
        out.mkdir()
        cbs = [FirstVoter(), *extra, OOMGuard(collective_timeout=30), DumpWeights(str(out))]
        torch.manual_seed(0)
        trainer(out, cbs, devices=2, strategy="ddp_spawn", max_steps=4).fit(DigitsNet(), tr)
        return [json.loads((out / f"weights{r}.json").read_text()) for r in (0, 1)]

    ref = fit(tmp_path / "ref", [MicroBatchAt(2, 16)])
    got = fit(tmp_path / "oom", [SimulatedOOM(16, where="backward", ranks=[1], steps=[2])])
    for g, r in zip(got[0], ref[0], strict=True):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(r), rtol=1e-6, atol=1e-6)
    events = [e for e in read_jsonl(events_file(tmp_path / "oom")) if e["kind"] == "oom_retry"]
    assert [(e["step"], e["ranks"], e["data"]["where"]) for e in events] == [(2, [1], ["backward"])]
