"""Every guard under FSDP2 (Lightning's ``ModelParallelStrategy`` with ``fully_shard``, parameters are ``DTensor``)
on 2 CPU processes (gloo), launched as users launch it (``python -m ...``: Lightning re-runs the script per rank),
equals the same run under DDP: same seeds, same effective batch, faults on rank 1 only.

Main crashed here: GradientGuard's snapshot ("aten._foreach_copy_.default got mixed torch.Tensor and DTensor"),
L1Penalty's statistics ("Operator c10d.allreduce_.default does not have a sharding strategy registered"), and
refused CompressExport ("CompressExport supports single-device and DDP training, got ModelParallelStrategy").
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.sharded.conftest import LAUNCHER_GUARDS
from tests.sharded.launch import close, launch


@pytest.mark.ddp
@pytest.mark.parametrize(("precision", "atol"), [("32-true", 1e-4), ("bf16-mixed", 2e-2)])
def test_every_step_guard_under_fsdp2_equals_ddp(tmp_path, ddp_reference, precision, atol):
    fsdp = launch("fsdp2", tmp_path / "fsdp2", "--precision", precision)
    ddp = ddp_reference if precision == "32-true" else launch("ddp", tmp_path / "ddp", "--precision", precision)
    assert fsdp["world_size"] == ddp["world_size"] == 2
    kinds = lambda r: Counter((e["guard"], e["kind"], e["step"]) for e in r["events"])  # noqa: E731
    assert kinds(fsdp) == kinds(ddp)
    got = kinds(fsdp)
    assert got[("gradient_guard", "nonfinite_skip", 3)] == 1  # rank 1's NaN loss: every rank skipped the step
    assert any(k[:2] == ("gradient_guard", "rollback") for k in got)  # rank 1's NaN gradients: rolled back
    assert any(k[:2] == ("l1_penalty", "selected") for k in got)
    assert fsdp["global_step"] == ddp["global_step"]
    assert not close(fsdp["params"], ddp["params"], atol), close(fsdp["params"], ddp["params"], atol)
    assert fsdp["val_loss"] == pytest.approx(ddp["val_loss"], abs=10 * atol)
    # CompressExport: the full weights gathered once to rank 0, compressed, exported and verified there, as under DDP
    assert got[("compress", "exported", fsdp["global_step"])] == 1
    stages = lambda r: [(s["decision"], s["metric"]) for s in r["compress_report"]["stages"]]  # noqa: E731
    assert [d for d, _ in stages(fsdp)] == [d for d, _ in stages(ddp)]
    for (_, a), (_, b) in zip(stages(fsdp), stages(ddp), strict=True):
        assert (a is None) == (b is None)
        assert a is None or a == pytest.approx(b, abs=10 * atol)


@pytest.mark.ddp
def test_best_weights_restored_and_proximal_l1_under_fsdp2_equal_ddp(tmp_path):
    """OverfitGuard snapshots and restores the local shards of the sharded parameters; proximal L1 thresholds them.

    With a ModelCheckpoint (its save reshards the model) and a validation after fit: the root module's own
    parameters (the LayerNorm) are unsharded by FSDP2 after each validation; a restore into those temporary full
    tensors was undone at the next reshard (main: val loss 0.952 after fit vs 0.822 under DDP) or crashed on the
    shape once a save had resharded them ("size 32 vs 64")."""
    args = ("--guards", "l1p,of,spike", "--epochs", "3", "--checkpoint", "--post-validate")
    fsdp = launch("fsdp2", tmp_path / "fsdp2", *args)
    ddp = launch("ddp", tmp_path / "ddp", *args)
    restored = [e for e in fsdp["events"] if e["kind"] == "restore_best"]
    assert len(restored) == 1  # the LR spike made the final weights worse: the best came back
    assert [(e["guard"], e["kind"], e["step"]) for e in fsdp["events"]] == [
        (e["guard"], e["kind"], e["step"]) for e in ddp["events"]
    ]
    assert not close(fsdp["params"], ddp["params"], 1e-4), close(fsdp["params"], ddp["params"], 1e-4)
    assert fsdp["post_val_loss"] == pytest.approx(ddp["post_val_loss"], abs=1e-4)
    assert fsdp["post_val_loss"] < fsdp["val_loss"]  # the best weights, not the spiked final ones, were validated


@pytest.mark.ddp
def test_class_balance_mixin_and_adaptive_proximal_l1_under_fsdp2_equal_ddp(tmp_path):
    """ClassBalance counts, GuardMixin's balanced loss and per-class metrics, WarmupCosine, and L1's adaptive proximal
    step (thresholds from Adam's sharded second moments) under FSDP2 equal the same run under DDP."""
    args = ("--guards", "wc,cb,l1a")
    fsdp = launch("fsdp2", tmp_path / "fsdp2", *args)
    ddp = launch("ddp", tmp_path / "ddp", *args)
    events = lambda r: [(e["guard"], e["kind"], e["step"]) for e in r["events"]]  # noqa: E731
    assert events(fsdp) == events(ddp)
    assert ("class_balance", "class_weights") in [e[:2] for e in events(fsdp)]
    assert not close(fsdp["params"], ddp["params"], 1e-4), close(fsdp["params"], ddp["params"], 1e-4)
    for key in ("guard/l1/sparsity", "guard/l1/penalty", "guard/lr", "guard/class_balance/balanced_acc"):
        assert key in ddp["guard_metrics"], sorted(ddp["guard_metrics"])
        assert fsdp["guard_metrics"][key] == pytest.approx(ddp["guard_metrics"][key], rel=1e-3, abs=1e-6), key
    assert ddp["guard_metrics"]["guard/l1/sparsity"][-1] > 0.05  # the adaptive proximal step zeroed weights


@pytest.mark.ddp
def test_oom_in_validation_on_one_rank_under_fsdp2_is_split_on_every_rank(tmp_path):
    """Rank 1 runs out of memory in validation's forward: every rank re-runs the step in halves together (its
    forward is a chain of all-gathers: rank 1 alone re-running would pair its all-gathers with the wrong blocks)."""
    args = ("--guards", "wc,of,oomv")
    fsdp = launch("fsdp2", tmp_path / "fsdp2", *args)
    ddp = launch("ddp", tmp_path / "ddp", *args)
    retries = [e for e in fsdp["events"] if e["kind"] == "oom_retry"]
    assert retries
    assert all(e["data"]["stage"] == "validate" for e in retries)
    assert all(e["ranks"] == e["data"]["oom_ranks"] == [1] for e in retries)  # reported once, for rank 1
    assert {e["data"]["new_micro_batch_size"] for e in retries} == {16}
    assert fsdp["val_loss"] == pytest.approx(ddp["val_loss"], abs=1e-5)
    assert not close(fsdp["params"], ddp["params"], 1e-5), close(fsdp["params"], ddp["params"], 1e-5)


@pytest.mark.ddp
def test_parameters_outside_fully_shard_are_reported_by_the_guards_that_count_them(tmp_path):
    """Only the blocks are sharded: the root's own parameters stay plain tensors that Lightning does not synchronise
    (each rank trains its copy). GradientGuard and L1Penalty count them as one copy each; they say so at train start."""
    got = launch("fsdp2", tmp_path / "fsdp2", "--guards", "gg,l1", "--no-root-shard", "--epochs", "1")
    warned = [e for e in got["events"] if e["kind"] == "unsynchronised_parameters"]
    assert sorted(e["guard"] for e in warned) == ["gradient_guard", "l1_penalty"]
    assert warned[0]["data"]["parameters"] == ["body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias"]
    assert all(e["step"] == 0 for e in warned)


@pytest.mark.ddp
def test_backward_oom_after_the_last_collective_then_a_sync_dist_log_after_backward_recovers(tmp_path):
    """Rank 1 runs out of memory in the backward of an unsharded first layer, after the backward's last collective;
    rank 0 goes on into a ``sync_dist`` log in ``on_after_backward``. Rank 1 used to raise out of backward and wait at
    its agreement while rank 0 waited in the log's all-reduce (a review's hang). Now every rank runs the hooks after
    backward and unwinds at the step's agreement: the run equals the same run without the log."""
    args = ("--guards", "wc,oomab", "--no-root-shard", "--pre-layer", "--epochs", "1")
    logged = launch("fsdp2", tmp_path / "logged", *args)
    retries = [e for e in logged["events"] if e["kind"] == "oom_retry"]
    assert [(e["step"], e["ranks"], e["data"]["where"]) for e in retries] == [(3, [1], ["backward"])]
    assert logged["global_step"] == 8


@pytest.mark.ddp
def test_oom_in_trainer_test_after_fit_on_one_rank_under_fsdp2_is_split_on_every_rank(tmp_path):
    """``trainer.test`` after fit, rank 1 out of memory: the fence is set up for the test stage too (it was only for
    fit: rank 1 split alone and gloo failed on mismatched all-gathers, "8544 vs 1344")."""
    args = ("--guards", "wc,oomt", "--post-test", "--epochs", "1")
    fsdp = launch("fsdp2", tmp_path / "fsdp2", *args)
    ddp = launch("ddp", tmp_path / "ddp", *args)
    assert fsdp["test_loss"] == pytest.approx(ddp["test_loss"], abs=1e-5)
    assert not close(fsdp["params"], ddp["params"], 1e-5)


@pytest.mark.ddp
def test_validation_oom_inside_an_accumulation_window_keeps_the_window_s_gradients(tmp_path):
    """accumulate_grad_batches=2 and a validation after batch 3 (inside a window), rank 1 out of memory there: the
    FSDP2 reset after an evaluation failure keeps the gradients (the first version dropped them: weights 0.012 off)."""
    args = ("--accumulate", "2", "--val-every", "3", "--epochs", "1")
    faulted = launch("fsdp2", tmp_path / "faulted", "--guards", "wc,oomv", *args)
    clean = launch("fsdp2", tmp_path / "clean", "--guards", "wc,oomq", *args)
    assert any(e["kind"] == "oom_retry" for e in faulted["events"])
    assert not close(faulted["params"], clean["params"], 1e-6), close(faulted["params"], clean["params"], 1e-6)


def test_sharded_best_weights_stay_out_of_checkpoints_and_a_resume_says_so(tmp_path, monkeypatch):
    """Lightning writes callback states from rank 0 only: under sharded training rank 0's shards in the checkpoint
    would be loaded by every rank on resume (wrong weights, silently). They stay out; the restore says why it cannot."""
    from lightning.pytorch.callbacks import Callback

    from lightning_guard import OverfitGuard, event_stream
    from tests.callbacks.test_overfit_guard import fit

    monkeypatch.setattr("lightning_guard.callbacks.overfit_guard.guard.sharded_training", lambda trainer: True)
    saved = {}

    class Keep(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 3:
                saved.update(guard.state_dict())

    guard = OverfitGuard(patience=3)
    fit(tmp_path / "a", [guard, Keep()], max_epochs=4)
    assert guard.best_step >= 0
    assert saved["best_step"] == guard.best_step
    assert "best_weights" not in saved
    resumed = OverfitGuard(patience=3)
    resumed.load_state_dict(saved)
    monkeypatch.setattr(resumed, "_record", lambda *a, **k: False)  # no new best after the "resume"
    t, _, _ = fit(tmp_path / "b", [resumed], max_epochs=1)
    (event,) = [e for e in event_stream(t).events if e.kind == "restore_unavailable"]
    assert event.severity == "warning"
    assert "under sharded training, are not kept in checkpoints" in event.message


def test_checkpoint_snapshot_is_refused_under_sharded_training(tmp_path, monkeypatch):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_guard import GuardConfigError, OverfitGuard
    from tests.callbacks.test_overfit_guard import fit

    monkeypatch.setattr("lightning_guard.callbacks.overfit_guard.base.sharded_training", lambda trainer: True)
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val_loss", mode="min")
    with pytest.raises(
        GuardConfigError,
        match=r"OverfitGuard\(snapshot='checkpoint'\) cannot reload a sharded checkpoint under SingleDeviceStrategy; "
        r"use snapshot='memory'",
    ):
        fit(tmp_path, [OverfitGuard(snapshot="checkpoint"), ck], enable_checkpointing=True)


@pytest.mark.ddp
def test_oom_guard_under_fsdp2_recovers_a_one_rank_oom_as_ddp_does(tmp_path, ddp_oom_reference):
    """Rank 1 runs out of memory in forward (the whole batch, step 5) and in backward (a micro-batch, step 12): under
    FSDP2 every block's all-gather and reduce-scatter is fenced, so the other rank stops at its next one, every rank
    resets FSDP2 and re-runs the batch in halves. Main refused FSDP2 at setup. The run ends as under DDP."""
    fsdp = launch("fsdp2", tmp_path / "fsdp2", *LAUNCHER_GUARDS)
    ddp = ddp_oom_reference
    kinds = lambda r: Counter((e["guard"], e["kind"], e["step"]) for e in r["events"])  # noqa: E731
    assert kinds(fsdp) == kinds(ddp)
    assert kinds(fsdp)[("oom", "oom_retry", 5)] == kinds(fsdp)[("oom", "oom_retry", 12)] == 1
    assert fsdp["guard_metrics"]["guard/oom/micro_batch_size"] == ddp["guard_metrics"]["guard/oom/micro_batch_size"]
    assert fsdp["guard_metrics"]["guard/oom/micro_batch_size"][-1] == 4
    # a block whose backward ran before the abort kept its gradient on the gathered parameter: main-of-this-change
    # leaked it into the re-run (grad norm 0.751 vs 0.715 at step 12)
    assert fsdp["guard_metrics"]["guard/grad_norm"] == pytest.approx(
        ddp["guard_metrics"]["guard/grad_norm"], rel=1e-5, nan_ok=True
    )
    assert not close(fsdp["params"], ddp["params"], 1e-5), close(fsdp["params"], ddp["params"], 1e-5)


@pytest.mark.ddp
def test_oom_guard_under_fsdp2_with_gradient_accumulation_equals_ddp(tmp_path):
    """accumulate_grad_batches=2; rank 1 out of memory in the whole batch's backward (step 2) and in a micro-batch's
    forward (step 6): the window's earlier batch is replayed for its gradients, as under DDP."""
    args = ("--guards", "wc,oomb", "--accumulate", "2")
    fsdp = launch("fsdp2", tmp_path / "fsdp2", *args)
    ddp = launch("ddp", tmp_path / "ddp", *args)
    events = lambda r: Counter((e["guard"], e["kind"], e["step"]) for e in r["events"])  # noqa: E731
    assert events(fsdp) == events(ddp)
    assert sum(n for (g, k, _), n in events(fsdp).items() if k == "oom_retry") == 2
    retries = [e for e in fsdp["events"] if e["kind"] == "oom_retry"]
    # the step-6 failure replayed the window's first batch
    assert [e["data"]["replayed_batches"] for e in retries] == [0, 1]
    assert fsdp["global_step"] == ddp["global_step"] == 8
    assert not close(fsdp["params"], ddp["params"], 1e-5), close(fsdp["params"], ddp["params"], 1e-5)


@pytest.mark.ddp
def test_hsdp_norms_and_l1_statistics_count_each_replicated_part_once(tmp_path, ddp_reference):
    """HSDP (a 2-D mesh: replicate x shard): each replica holds the same shard. Main summed the replicas' squares and
    magnitudes over all ranks: the gradient norm came out x sqrt(2) and L1's penalty x 2."""
    hsdp = launch("hsdp", tmp_path / "hsdp")
    ref = ddp_reference["guard_metrics"]
    got = hsdp["guard_metrics"]
    for key in ("guard/grad_norm", "guard/l1/penalty", "guard/l1/sparsity"):
        assert key in ref, sorted(ref)
        assert got[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-6, nan_ok=True), key
    assert not close(hsdp["params"], ddp_reference["params"], 1e-4)


@pytest.mark.ddp
def test_fsdp2_run_resumed_from_its_sharded_checkpoint_follows_the_uninterrupted_trajectory(tmp_path):
    """A FSDP2 run (GradientGuard, L1, WarmupCosine; NaN faults on rank 1 in epoch 1, an LR spike in epoch 2)
    interrupted after epoch 1 and resumed from its sharded checkpoint ends where the uninterrupted run ends: the
    guards' state (statistics, schedule, counters) travels in it. (The rollback snapshots do not, by design: the
    faults are before the interruption; docs/guards/gradient-guard.md "Resume".)"""
    args = ("--guards", "wc,gg,l1,spike", "--epochs", "3", "--checkpoint")
    whole = launch("fsdp2", tmp_path / "whole", *args)
    launch("fsdp2", tmp_path / "part", *args, "--stop-after-epoch", "1")
    (ckpt,) = (tmp_path / "part" / "ck").glob("epoch=1*")
    resumed = launch("fsdp2", tmp_path / "resumed", *args, "--resume", str(ckpt))
    assert resumed["global_step"] == whole["global_step"] == 24
    after = lambda r: [(e["guard"], e["kind"], e["step"]) for e in r["events"] if e["step"] >= 16]  # noqa: E731
    assert after(resumed) == after(whole)
    assert ("fault_injector", "lr_spike", 20) in after(whole)
    assert not close(resumed["params"], whole["params"], 1e-6), close(resumed["params"], whole["params"], 1e-6)
    for key in ("guard/lr", "guard/l1/penalty", "guard/grad_norm"):
        tail = len(resumed["guard_metrics"][key])
        assert resumed["guard_metrics"][key] == pytest.approx(whole["guard_metrics"][key][-tail:], rel=1e-5), key
