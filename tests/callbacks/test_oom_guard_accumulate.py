"""OOMGuard with Lightning's ``accumulate_grad_batches`` (issue 23, item 5): an out-of-memory anywhere in an
accumulation window is recovered within that window, with the gradient, the logs, the metrics and the BatchNorm
buffers of a run that never failed."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_guard import GradientGuard, OOMGuard
from tests.callbacks.test_oom_guard_steps import CountedSamples, MemoryLogger, MeteredConvNet
from tests.helpers import DigitsNet, digits_loaders, events_file, precision_kwargs, read_jsonl, trainer
from tests.workloads.digits_conv import digits_image_loaders


def _oom(where: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (test, {where})")


class OOMAtBatches(Callback):
    """At chosen batches of the first epoch, on chosen ranks, a micro-batch larger than a limit runs out of memory in
    ``layer``'s forward or half-way through backward (when the gradient reaches ``layer``'s output, after the layers
    above it have accumulated theirs). ``faults``: batch index -> (limit, "forward" or "backward")."""

    def __init__(self, faults: dict[int, tuple[int, str]], layer: str = "net.0", ranks: tuple[int, ...] = (0,)) -> None:
        self.faults, self.layer, self.ranks = faults, layer, ranks
        self.armed: tuple[int, str] | None = None
        self.raised = 0

    def on_train_start(self, trainer, pl_module):
        layer = pl_module.get_submodule(self.layer)

        def pre(mod, args):
            if self.armed is not None and self.armed[1] == "forward" and args[0].shape[0] > self.armed[0]:
                self.raised += 1
                raise _oom("forward")

        def post(mod, args, out):
            armed = self.armed
            if armed is not None and armed[1] == "backward" and args[0].shape[0] > armed[0] and out.requires_grad:

                def fail(grad):
                    self.raised += 1
                    raise _oom("backward")

                out.register_hook(fail)

        self._handles = [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        first = trainer.current_epoch == 0 and trainer.global_rank in self.ranks
        self.armed = self.faults.get(batch_idx) if first else None

    def on_train_end(self, trainer, pl_module):
        for h in self._handles:
            h.remove()


class Outputs(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _oom_events(path: Path) -> list[dict[str, Any]]:
    return [e for e in read_jsonl(events_file(path)) if e["kind"] == "oom_retry"]


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize(
    ("batch", "replayed"),
    [(1, 1), (2, 2), (0, 0)],
    ids=["accumulating-batch-after-one", "window-end-after-two", "window-start"],
)
def test_an_oom_in_an_accumulation_window_gives_lightnings_own_accumulated_step(tmp_path, where, batch, replayed):
    """Main: refused. Batch 32, ``accumulate_grad_batches=3``, memory for 16 at one batch of the first window: the
    batches of the window already accumulated are replayed for their gradients, the failed one runs again as two
    micro-batches of 16, and every step equals plain Lightning accumulation without OOMGuard: the same weights
    (fp32 summation order: 1e-6 relative), the same loss handed to callbacks, the same epoch mean of ``train_loss``
    (a replay's ``self.log`` is not counted twice)."""
    tr, _ = digits_loaders(batch_size=32)
    torch.manual_seed(0)
    ref_model = DigitsNet(optimizer="sgd", lr=0.5)
    model = copy.deepcopy(ref_model)
    init = _params(ref_model)
    ref_out, got_out, ref_log, got_log = Outputs(), Outputs(), MemoryLogger(), MemoryLogger()
    kw = {"max_epochs": 1, "accumulate_grad_batches": 3}
    trainer(tmp_path / "ref", [ref_out], logger=ref_log, **kw).fit(ref_model, tr)
    fault, guard = OOMAtBatches({batch: (16, where)}), OOMGuard()
    trainer(tmp_path, [fault, guard, got_out], logger=got_log, **kw).fit(model, tr)
    assert fault.raised == 1
    assert guard.micro_batch_size == 16
    for x, y, z in zip(_params(model), _params(ref_model), init, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        assert (y - z).abs().max() > 1e-3  # the steps moved the weights far more than the tolerance
    assert got_out.losses == pytest.approx(ref_out.losses, rel=1e-6)
    assert got_log.series("train_loss") == pytest.approx(ref_log.series("train_loss"), rel=1e-6)
    (event,) = _oom_events(tmp_path)
    data = event["data"]
    assert (data["where"], data["old_micro_batch_size"], data["new_micro_batch_size"]) == ([where], 32, 16)
    assert data["replayed_batches"] == replayed


@pytest.mark.parametrize(("precision", "tol"), [("bf16-mixed", 5e-3), ("16-mixed", 1e-3)])
def test_accumulated_recovery_under_mixed_precision(tmp_path, precision, tol):
    """bf16-mixed and 16-mixed (GradScaler): a backward OOM at the window's last batch, after two accumulated
    batches, ends where Lightning's own accumulation ends (the micro-batches round their activations differently:
    the tolerances of the unaccumulated OOMGuard test)."""
    tr, _ = digits_loaders(batch_size=32)
    torch.manual_seed(0)
    ref_model = DigitsNet(optimizer="sgd", lr=0.5)
    model = copy.deepcopy(ref_model)
    kw = {"max_steps": 2, "accumulate_grad_batches": 3, **precision_kwargs(precision)}
    trainer(tmp_path / "ref", [], **kw).fit(ref_model, tr)
    guard = OOMGuard()
    trainer(tmp_path, [OOMAtBatches({2: (16, "backward")}), guard], **kw).fit(model, tr)
    assert guard.retries == 1
    for x, y in zip(_params(model), _params(ref_model), strict=True):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


class SampleCountingNet(MeteredConvNet):
    """Also logs its batch's sample count as an epoch sum: a replay counted twice shows as more than the data set."""

    def training_step(self, batch, batch_idx):
        self.log("samples", float(len(batch[0])), on_step=False, on_epoch=True, reduce_fx="sum")
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("batch", [1, 2], ids=["accumulating-batch", "window-end"])
def test_a_replayed_window_leaves_metrics_logs_and_batchnorm_counted_once(tmp_path, batch):
    """BatchNorm conv net with a torchmetrics metric and ``self.log(sync_dist=True)``, ``accumulate_grad_batches=3``:
    a backward OOM in the window's second batch (its forward completed and stands) or its last (re-run for real as
    at any step) replays the window's earlier batches for their gradients only. The metric counts every sample
    once, BatchNorm's ``num_batches_tracked`` counts the forwards that were kept (a replay's are undone), the epoch
    sum of samples logged is the data set's 128, and the epoch mean of ``train_loss`` is the mean of the losses the
    batches handed to callbacks (Lightning divides those by 3)."""
    tr, _ = digits_image_loaders(n_train=128, batch_size=32)
    torch.manual_seed(0)
    log, out = MemoryLogger(), Outputs()
    fault = OOMAtBatches({batch: (16, "backward")}, layer="classifier")
    guard, counted, model = OOMGuard(), CountedSamples(), SampleCountingNet()
    trainer(tmp_path, [fault, guard, counted, out], logger=log, max_epochs=1, accumulate_grad_batches=3).fit(model, tr)
    assert fault.raised == 1
    assert counted.samples == [32, 64, 96, 128]
    # batches 0 and 1 whole (1's forward completed before its backward failed), 2 and 3 as two micro-batches of 16
    assert int(model.features[1].num_batches_tracked) == 1 + 1 + 2 + 2
    assert log.series("samples") == [128.0]
    (epoch_loss,) = log.series("train_loss_epoch")
    assert epoch_loss == pytest.approx(3 * sum(out.losses) / 4, rel=1e-6)


def test_gradient_guard_judges_the_whole_window_loss_after_a_recovery(tmp_path):
    """GradientGuard sums the window's losses (each divided by ``accumulate_grad_batches``) for its spike test: a
    recovery at the window's end forgets the failed attempt's loss only, not the window's earlier batches' (main's
    retry hook emptied the list, so the step's loss was one third of the window's)."""
    seen: list[float] = []

    class Spy(GradientGuard):
        def step_vote(self, trainer, pl_module, optimizer):
            vote = super().step_vote(trainer, pl_module, optimizer)
            seen.append(float(vote[2]))
            return vote

    tr, _ = digits_loaders(batch_size=32)
    torch.manual_seed(0)
    ref_model = DigitsNet(optimizer="sgd", lr=0.5)
    model = copy.deepcopy(ref_model)
    kw = {"max_steps": 1, "accumulate_grad_batches": 3}
    trainer(tmp_path / "ref", [Spy()], **kw).fit(ref_model, tr)
    trainer(tmp_path, [OOMAtBatches({2: (16, "forward")}), OOMGuard(), Spy()], **kw).fit(model, tr)
    assert seen[1] == pytest.approx(seen[0], rel=1e-6)


class DumpWeights(Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        state = [p.detach().flatten().tolist() for p in pl_module.parameters()]
        (Path(self.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(state))


def _assert_recovered_like(out: Path, ref: Path, told: list[Any]) -> None:
    """Both ranks' weights equal, and equal the fault-free run's (1e-5: fp32 summation order across micro-batches);
    the ``oom_retry`` events as ``(ranks, where, new micro-batch size, replayed batches)``."""
    got = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    want = json.loads((ref / "rank0.json").read_text())
    assert got[0] == got[1]
    for x, y in zip(got[0], want, strict=True):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=1e-5, atol=1e-5)
    assert [
        (e["ranks"], e["data"]["where"], e["data"]["new_micro_batch_size"], e["data"]["replayed_batches"])
        for e in _oom_events(out)
    ] == told


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_accumulated_window_recovered_with_the_oom_on_rank_1_only(tmp_path):
    """ddp_spawn, 2 ranks, ``accumulate_grad_batches=3``: rank 1 runs out of memory in backward at the second batch
    of the first window (its first batch accumulated, under ``no_sync``) and in forward at the last batch of the
    second window (DDP's synchronised step). Rank 0 does not hang; both ranks replay the same batches and end with
    identical weights, equal to a run without the faults (1e-5: fp32 summation order across micro-batches)."""
    tr, _ = digits_loaders(n_train=384, batch_size=32)  # 6 batches of 32 per rank
    torch.manual_seed(0)
    model = DigitsNet(optimizer="sgd", lr=0.5)
    ref = tmp_path / "ref"
    ref.mkdir()
    kw = {"devices": 2, "strategy": "ddp_spawn", "max_steps": 2, "accumulate_grad_batches": 3}

    trainer(ref, [OOMGuard(), DumpWeights(str(ref))], **kw).fit(copy.deepcopy(model), tr)
    faults = OOMAtBatches({1: (16, "backward"), 5: (8, "forward")}, ranks=(1,))
    trainer(tmp_path, [faults, OOMGuard(), DumpWeights(str(tmp_path))], **kw).fit(model, tr)
    _assert_recovered_like(tmp_path, ref, [([1], ["backward"], 16, 1), ([1], ["forward"], 8, 2)])


class BatchStartWriter(DigitsNet):
    """Writes in its own ``on_train_batch_start`` (which Lightning calls after every callback's): a buffer, a log."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd", lr=0.5)
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))

    def on_train_batch_start(self, batch, batch_idx):
        self.batches_seen += 1
        self.log("n_batches", 1.0, on_step=False, on_epoch=True, reduce_fx="sum")


def test_what_the_batch_hooks_wrote_survives_the_recovery_of_an_accumulating_batch(tmp_path):
    """Review: the recovery of a batch that accumulates restored a state taken at OOMGuard's on_train_batch_start,
    before the module's own hook ran: an OOM at batch 1 lost that batch's buffer increment and ``self.log`` (9 of
    10). The attempt's state is now taken at its training_step."""
    tr, _ = digits_loaders(n_train=320, batch_size=32)
    log, model = MemoryLogger(), BatchStartWriter()
    fault = OOMAtBatches({1: (16, "forward")})
    trainer(tmp_path, [OOMGuard(), fault], logger=log, max_epochs=1, accumulate_grad_batches=3).fit(model, tr)
    assert fault.raised == 1
    assert int(model.batches_seen) == 10
    assert log.series("n_batches") == [10.0]


@pytest.mark.ddp
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("micro", "faults", "told"),
    [
        (16, {4: (8, "backward"), 7: (4, "forward")}, [([1], ["backward"], 8, 1), ([1], ["forward"], 4, 1)]),
        (None, {3: (16, "forward"), 7: (8, "backward")}, [([1], ["forward"], 16, 0), ([1], ["backward"], 8, 1)]),
    ],
    ids=["first_micro_batch", "whole_batch"],
)
def test_ddp_a_quiet_accumulating_batch_tells_a_failure_after_its_backward(tmp_path, micro, faults, told):
    """Issue 26: in quiet steps the micro-batches of an accumulating batch (under no_sync) before its last no longer
    end with an agreement each. Rank 1 runs out of memory in the second window (step 1 on; the first step is never
    quiet): in the first of two micro-batches (backward, then forward in the third window: it skips to the last
    micro-batch and tells the others there), or in a whole batch's forward and then, in the third window, the
    backward of the first of two micro-batches (told after it). Both ranks end on the weights of a run without faults
    (1e-5) and report the same recoveries."""
    tr, _ = digits_loaders(n_train=576, batch_size=32)  # 9 batches of 32 per rank: 3 windows of 3
    torch.manual_seed(0)
    model = DigitsNet(optimizer="sgd", lr=0.5)
    ref = tmp_path / "ref"
    ref.mkdir()
    kw = {"devices": 2, "strategy": "ddp_spawn", "max_steps": 3, "accumulate_grad_batches": 3}
    trainer(ref, [OOMGuard(micro_batch_size=micro), DumpWeights(str(ref))], **kw).fit(copy.deepcopy(model), tr)
    guard = OOMGuard(micro_batch_size=micro, collective_timeout=30)
    trainer(tmp_path, [OOMAtBatches(faults, ranks=(1,)), guard, DumpWeights(str(tmp_path))], **kw).fit(model, tr)
    _assert_recovered_like(tmp_path, ref, told)


class FirstBackwardCollective(Callback):
    """At ``batch``, every rank's backward all-reduces a gradient of ``net.0``'s output (no step issued one before);
    on ``rank`` the backward runs out of memory first, at ``net.2`` (backward runs last layers first)."""

    def __init__(self, batch: int, rank: int) -> None:
        self.batch, self.rank, self.idx = batch, rank, -1

    def on_train_start(self, trainer, pl_module):
        def collective(mod, args, out):
            if self.idx == self.batch and out.requires_grad:

                def reduce(grad):
                    torch.distributed.all_reduce(torch.ones(1))
                    return grad

                out.register_hook(reduce)

        def fail(mod, args, out):
            if self.idx == self.batch and trainer.global_rank == self.rank and out.requires_grad:
                out.register_hook(lambda grad: (_ for _ in ()).throw(_oom("backward")))

        pl_module.net[0].register_forward_hook(collective)
        pl_module.net[2].register_forward_hook(fail)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.idx = batch_idx


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_ddp_a_backward_failure_before_a_first_backward_collective_stops_every_rank_at_once(tmp_path):
    """Review of issue 26: carrying an accumulating batch's backward failure (a quiet step) to the next agreement left
    the healthy rank waiting at the fence in front of its backward's first collective while the failed rank went on
    into Lightning's per-batch broadcast: both waited for ``collective_timeout``, then an error blaming a crashed rank.
    The failure is agreed after the backward, as on main: every rank stops at once with the reason. (The same fault
    in a window's last batch, DDP's synchronised backward, still waits for the timeout, on main too.)"""
    tr, _ = digits_loaders(n_train=768, batch_size=32)  # 12 batches per rank: batch 5 accumulates (window 4-7)
    torch.manual_seed(0)
    cbs = [FirstBackwardCollective(batch=5, rank=1), OOMGuard(collective_timeout=60)]
    kw = {"devices": 2, "strategy": "ddp_spawn", "max_steps": 3, "accumulate_grad_batches": 4}
    with pytest.raises(Exception, match=r"ran out of memory in backward, and this step's backward issues collectives"):
        trainer(tmp_path, cbs, **kw).fit(DigitsNet(optimizer="sgd", lr=0.5), tr)
