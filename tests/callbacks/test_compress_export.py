"""CompressExport at fit end: budget search on real digits, artifacts reloaded and compared, report, events, wandb,
OverfitGuard's restore first, ddp_spawn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from lightning_guard import CompressExport, GuardConfigError, OverfitGuard
from lightning_guard import compress as C
from lightning_guard.events import EVENTS_FILENAME
from tests.helpers import DigitsNet, digits_loaders, events_file, read_jsonl, trainer, wandb_history

pytest.importorskip("torchao")


class WideNet(DigitsNet):
    def __init__(self) -> None:
        super().__init__(hidden=256)


def _events(root: Path) -> list[dict]:
    return [e for e in read_jsonl(root) if e["guard"] == "compress"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"monitor": ""}, "`monitor` must be a non-empty string, got ''"),
        ({"mode": "up"}, "`mode` must be 'min', 'max' or None, got 'up'"),
        ({"finetune_epochs": -1}, "`finetune_epochs` must be an int >= 0, got -1"),
        ({"verify_batches": 0}, "`verify_batches` must be an int >= 1, got 0"),
        ({"tolerance": 0}, "`tolerance` must be a number > 0, got 0"),
        ({"eval_fn": 3}, "`eval_fn` must be callable or None, got 3"),
        ({"filename": "a/b"}, "`filename` must be a file name without directories, got 'a/b'"),
        ({"strict": "yes"}, "`strict` must be a bool, got 'yes'"),
        (
            {"quantize": "int2"},
            "`quantize` must be one of ('int8_weight_only', 'int8_dynamic', 'int4_weight_only'), got 'int2'",
        ),
        (
            {"prune": "magnitude"},
            "`prune` must be one of (None, 'auto', 'unstructured', 'structured'), got 'magnitude'",
        ),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(GuardConfigError) as err:
        CompressExport(**kwargs)
    assert str(err.value) == message


def test_mode_follows_the_metric_name_and_int8_is_an_alias():
    assert CompressExport(monitor="val_acc").mode == "max"
    assert CompressExport(monitor="val_loss").mode == "min"
    # whole words, not substrings: these were all taken for "max" (mape/smape contain "map", iou_loss "iou")
    for monitor in ("val_mape", "val_smape", "val_iou_loss", "val/rmse"):
        assert CompressExport(monitor=monitor).mode == "min", monitor
    assert CompressExport(monitor="val/mAP").mode == "max"
    for monitor, mode in (("valLoss", "min"), ("val_map50", "max"), ("val_errors", "min"), ("val_dist_acc", "max")):
        assert CompressExport(monitor=monitor).mode == mode, monitor
    for ambiguous in ("val_acc_drop", "val_accuracy_gap", "val_loss_improvement", "val_mse_gain"):
        with pytest.raises(GuardConfigError, match="cannot tell from its name"):
            CompressExport(monitor=ambiguous)
    assert CompressExport(monitor="val_score", mode="max").mode == "max"
    with pytest.raises(GuardConfigError, match=r"cannot tell from its name whether `monitor='val_score'` is better"):
        CompressExport(monitor="val_score")
    assert CompressExport(quantize="int8").quantize == "int8_weight_only"


def test_fit_end_compresses_within_budget_exports_verifies_and_reports(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    torch.manual_seed(0)
    tr, va = digits_loaders(n_train=1000, n_val=400, batch_size=64)
    logger = WandbLogger(save_dir=str(tmp_path), project="lg-test")
    out = tmp_path / "export"
    guard = CompressExport(
        dirpath=str(out), monitor="val_acc", prune="structured", formats=("pt2", "onnx"), max_metric_drop=0.01
    )
    t = trainer(tmp_path, [guard], max_epochs=12, logger=logger)
    model = WideNet()
    t.fit(model, tr, va)
    run_dir = Path(logger.experiment.dir).parent
    jsonl = Path(logger.experiment.dir) / EVENTS_FILENAME
    logger.experiment.finish()

    result = guard.result
    assert result is not None, guard.error
    assert result.baseline_metric - result.final_metric <= 0.01  # the budget
    assert result.prune_amount > 0
    # the pruned net's int8 .pt2 is no smaller than its fp32 .pt2 (torchao's fixed overhead): not kept, said why;
    # the ONNX file is still quantised by onnxruntime (below)
    assert result.quantized is None
    assert [s.decision for s in result.stages if s.stage == "quantize"] == ["accepted", "rejected"]
    baseline = result.stages[0]
    pt2 = out / "model.pt2"
    assert set(result.artifacts) == {"pt2", "onnx"}
    assert pt2.stat().st_size < baseline.file_bytes  # type: ignore[operator]
    # the artifacts reload through fresh load paths and reproduce the compressed model on held-out data
    x = torch.cat([b[0] for b in va])
    assert C.max_output_error(C.load_artifact(pt2), result.model, [(x,)]) <= 1e-4
    assert C.max_output_error(C.load_artifact(out / "model.onnx"), result.model, [(x,)]) <= 0.05
    assert not any("_orig" in k or "_mask" in k for k in result.model.state_dict())
    assert "training_step" not in result.model.__dict__
    report = json.loads((out / "compress_report.json").read_text())
    assert report["monitor"] == "val_acc"
    # the choosing and the held-out halves of the validation batches; every file measured itself on both
    n_val = len(va)
    assert report["held_out"] == (
        f"the odd-numbered {n_val // 2} of {n_val} validation batches: not used to choose the pruning or the "
        f"quantisation (chosen on the other {n_val - n_val // 2})"
    )
    exports = [s for s in report["stages"] if s["stage"] == "export"]
    assert [s["setting"] for s in exports] == ["model.pt2", "model.onnx"]
    assert all(s["metric"] is not None and s["held_out_metric"] is not None for s in exports)
    assert report["baseline_held_out"] is not None
    assert [s["stage"] for s in report["stages"]][:1] == ["baseline"]
    assert all(k in report["stages"][0] for k in ("size_bytes", "params", "sparsity", "metric", "latency_ms"))
    kinds = [e["kind"] for e in _events(jsonl)]
    assert kinds.count("compressed") == 2  # pruning and quantisation
    assert kinds.count("exported") == 2
    rows = [r for r in wandb_history(run_dir) if "guard/compress/nrows" in r]
    assert [r["guard/compress/nrows"] for r in rows] == [len(result.stages)]
    (table,) = (run_dir / "files" / "media" / "table" / "guard").glob("compress_*.table.json")
    assert json.loads(table.read_text())["columns"][:3] == ["stage", "setting", "decision"]


def test_best_weights_are_restored_before_compression(tmp_path):
    """OverfitGuard restores the best weights in on_train_end; CompressExport's baseline is measured after it."""
    torch.manual_seed(1)
    tr, va = digits_loaders(n_train=100, n_val=200, batch_size=20)
    og = OverfitGuard(monitor="val_loss", patience=3)
    ce = CompressExport(dirpath=str(tmp_path / "x"), monitor="val_loss", quantize=None, max_metric_drop=1.0)
    trainer(tmp_path, [ce, og], max_epochs=40).fit(DigitsNet(lr=0.02, hidden=256), tr, va)
    assert ce.result is not None
    # the budget is measured on the choosing half of the 10 validation batches of 20, the held-out half apart: their
    # mean is the whole validation set's, which OverfitGuard saw
    assert ce.result.baseline_held_out is not None
    assert (ce.result.baseline_metric + ce.result.baseline_held_out) / 2 == pytest.approx(og.best, rel=1e-5)


def test_unstructured_pruning_with_finetune_keeps_its_zeros(tmp_path):
    torch.manual_seed(2)
    tr, va = digits_loaders(n_train=1000, n_val=400, batch_size=64)
    ce = CompressExport(
        dirpath=str(tmp_path / "x"),
        monitor="val_acc",
        prune="unstructured",
        prune_amounts=(0.8,),
        finetune_epochs=2,
        quantize=None,
        max_metric_drop=0.05,
    )
    trainer(tmp_path, [ce], max_epochs=8).fit(WideNet(), tr, va)
    assert ce.result is not None
    assert ce.result.prune_amount == 0.8
    assert C.sparsity(ce.result.model) >= 0.8 - 1e-3


def test_missing_monitor_lists_the_logged_metrics(tmp_path):
    tr, va = digits_loaders()
    t = trainer(tmp_path, [CompressExport(monitor="val_f1", strict=True)], max_epochs=1)
    with pytest.raises(GuardConfigError) as err:
        t.fit(DigitsNet(), tr, va)
    assert str(err.value) == (
        "CompressExport: `monitor='val_f1'` is not logged by the validation loop; logged: ['val_acc', 'val_loss']"
    )


class StepCount(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps += 1


@pytest.mark.parametrize("how", ["no_loader", "limit_val_batches_0", "empty_list", "datamodule_empty"])
def test_no_validation_data_is_refused_before_training(tmp_path, how):
    """Found only after training before: fit() trained for hours, then raised."""
    import lightning.pytorch as pl

    tr, va = digits_loaders()
    count = StepCount()
    kwargs = {"limit_val_batches": 0} if how == "limit_val_batches_0" else {}
    val = {"no_loader": None, "limit_val_batches_0": va, "empty_list": []}.get(how)

    class EmptyVal(pl.LightningDataModule):
        def train_dataloader(self):
            return tr

        def val_dataloader(self):
            return []

    t = trainer(tmp_path, [CompressExport(), count], max_epochs=1, **kwargs)
    data = (
        {"datamodule": EmptyVal()} if how == "datamodule_empty" else {"train_dataloaders": tr, "val_dataloaders": val}
    )
    with pytest.raises(GuardConfigError) as err:
        t.fit(DigitsNet(), **data)
    assert count.steps == 0
    assert str(err.value) == (
        "CompressExport needs validation data to measure the metric budget, and this fit has none (no val "
        "dataloader, no `validation_step`, or `limit_val_batches=0`): give the fit a val dataloader and a "
        "validation_step, or pass `eval_fn` and `example_input`"
    )
    with pytest.raises(GuardConfigError) as err:
        trainer(tmp_path, [CompressExport(eval_fn=lambda m: 0.0)], max_epochs=1).fit(DigitsNet(), tr)
    assert str(err.value) == (
        "CompressExport needs an example input for export, and this fit has no validation data to take one from: "
        "pass `example_input`"
    )


def test_a_sharded_strategy_is_refused_at_setup_and_told_where_the_function_is(tmp_path, monkeypatch):
    """FSDP (or any strategy but single-device and DDP) is refused; the message names the function to call instead."""
    import lightning.pytorch as pl

    class FSDPStrategy:  # FSDP itself needs a GPU: a strategy of that name is enough for the refusal
        global_rank, world_size, local_rank, node_rank = 0, 1, 0, 0

    guard = CompressExport()
    t = trainer(tmp_path, [guard])
    monkeypatch.setattr(pl.Trainer, "strategy", property(lambda self: FSDPStrategy()))
    with pytest.raises(GuardConfigError) as err:
        guard.setup(t, DigitsNet(), "fit")
    assert str(err.value) == (
        "CompressExport supports single-device, DDP and FSDP2 (ModelParallelStrategy) training, got FSDPStrategy: "
        "gather the full model yourself and call `lightning_guard.compress.compress_and_export`"
    )


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_after_ddp_spawn_training_rank_0_exports_once(tmp_path):
    tr, va = digits_loaders(n_train=512, n_val=256, batch_size=32)
    ce = CompressExport(dirpath=str(tmp_path / "x"), monitor="val_acc", max_metric_drop=0.02)
    trainer(tmp_path, [ce], devices=2, strategy="ddp_spawn", max_epochs=3).fit(DigitsNet(), tr, va)
    pt2 = tmp_path / "x" / "model.pt2"
    assert pt2.exists()
    report = json.loads((tmp_path / "x" / "compress_report.json").read_text())
    assert report["artifacts"] == {"pt2": str(pt2)}
    kinds = [e["kind"] for e in _events(events_file(tmp_path))]
    assert kinds.count("exported") == 1
    out = C.load_artifact(pt2)(torch.cat([b[0] for b in va]))
    assert out.shape == (256, 10)


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_a_failure_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0's compression fails (the monitor is not logged): rank 1 must not wait for it forever; the error comes
    out of fit()."""
    tr, va = digits_loaders(n_train=128, n_val=64, batch_size=32)
    t = trainer(
        tmp_path, [CompressExport(monitor="val_f1", strict=True)], devices=2, strategy="ddp_spawn", max_epochs=1
    )
    with pytest.raises(Exception, match="`monitor='val_f1'` is not logged by the validation loop"):
        t.fit(DigitsNet(), tr, va)


def test_a_failed_export_leaves_the_trained_run_alone_unless_strict(tmp_path):
    """A compression failure after hours of training ended fit() with an exception; by default it is an error event
    now, the fit returns, the checkpoint and the module are as training left them."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    tr, va = digits_loaders(n_train=128, n_val=64, batch_size=32)
    ce = CompressExport(dirpath=str(tmp_path / "x"), monitor="val_f1", mode="max")
    ck = ModelCheckpoint(dirpath=tmp_path / "ck")
    model = DigitsNet()
    t = trainer(tmp_path, [ce, ck], max_epochs=1, enable_checkpointing=True)
    t.fit(model, tr, va)
    (event,) = [e for e in _events(events_file(tmp_path)) if e["kind"] == "export_failed"]
    assert event["severity"] == "error"
    assert "`monitor='val_f1'` is not logged by the validation loop" in event["message"]
    assert ce.result is None
    assert "val_f1" in str(ce.error)
    assert list((tmp_path / "ck").glob("*.ckpt"))
    with pytest.raises(GuardConfigError, match=r"`monitor=.val_f1.` is not logged"):
        trainer(tmp_path, [CompressExport(monitor="val_f1", mode="max", strict=True)], max_epochs=1).fit(
            DigitsNet(), tr, va
        )


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_a_failure_on_rank_0_is_an_event_and_every_rank_returns(tmp_path):
    """Without strict, rank 0's failed compression is an export_failed event; no rank raises or waits."""
    tr, va = digits_loaders(n_train=128, n_val=64, batch_size=32)
    t = trainer(tmp_path, [CompressExport(monitor="val_f1", mode="max")], devices=2, strategy="ddp_spawn", max_epochs=1)
    t.fit(DigitsNet(), tr, va)
    kinds = [e["kind"] for e in _events(events_file(tmp_path))]
    assert kinds.count("export_failed") == 1


class UntraceableNet(DigitsNet):
    """A forward with data-dependent Python control flow, which torch.export cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.steps_run = 0

    def forward(self, x):
        if x.sum() > 0:  # a branch on a tensor's value
            return self.net(x)
        return -self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return super().training_step(batch, batch_idx)


_UNTRACEABLE = "CompressExport: torch.export cannot trace this module's forward with the example input ("


def test_an_untraceable_forward_is_found_at_fit_start_not_after_training(tmp_path):
    """Main: a forward torch.export cannot trace was found only after training. Now the trial export at fit start
    refuses the fit with strict=True (no step run), and otherwise reports export_failed before the first step and
    skips the compression at the end (the fit returns normally)."""
    tr, va = digits_loaders(n_train=128, n_val=64, batch_size=32)
    model = UntraceableNet()
    with pytest.raises(GuardConfigError) as err:
        trainer(tmp_path / "a", [CompressExport(strict=True)], max_epochs=1).fit(model, tr, va)
    assert str(err.value).startswith(_UNTRACEABLE)
    assert "the export after training would fail" in str(err.value)
    assert model.steps_run == 0
    ce = CompressExport(dirpath=str(tmp_path / "b" / "out"))
    trainer(tmp_path / "b", [ce], max_epochs=1).fit(model, tr, va)
    assert model.steps_run == 4
    (event,) = [e for e in _events(events_file(tmp_path / "b")) if e["kind"] == "export_failed"]
    assert (event["step"], event["data"]["when"]) == (0, "fit_start")
    assert event["message"].startswith(_UNTRACEABLE)
    assert ce.result is None
    assert str(ce.error).startswith(_UNTRACEABLE)
    assert not (tmp_path / "b" / "out").exists()


class MLP512(DigitsNet):
    """The benchmark's digits MLP, 64-512-512-10."""

    def __init__(self) -> None:
        super().__init__(lr=3e-3)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 10),
        )


def test_defaults_search_structured_pruning_and_int8_to_4x_within_a_point(tmp_path):
    """Main: `CompressExport()` at its defaults only quantised: 2.7x on the digits MLP. The default `prune="auto"`
    searches structured pruning within the budget when the model allows it: the .pt2 is at least 1.5x smaller than the
    fp32 .pt2, and the file's own accuracy on the held-out half is within 1 point of the baseline's."""
    torch.manual_seed(0)
    tr, va = digits_loaders(n_train=1000, n_val=400, batch_size=50)
    ce = CompressExport(dirpath=str(tmp_path / "out"), monitor="val_acc")
    trainer(tmp_path, [ce], max_epochs=10).fit(MLP512(), tr, va)
    report = json.loads((tmp_path / "out" / "compress_report.json").read_text())
    assert (report["prune"], report["prune_note"]) == (
        "structured",
        "auto: structured pruning within the budget (the model allows it)",
    )
    (pt2,) = [s for s in report["stages"] if s["stage"] == "export"]
    ratio = report["stages"][0]["file_bytes"] / pt2["file_bytes"]
    # int8 is kept only where its .pt2 is smaller and no slower than fp32; torchao's CPU int8 is slower here, so the
    # default ships the pruned fp32 file (still well below the fp32 baseline), and the report says why
    assert ratio >= 1.5, ratio
    quantize_rows = [s for s in report["stages"] if s["stage"] == "quantize"]
    assert report["quantized"] is None or quantize_rows[-1]["decision"] == "accepted"
    assert report["baseline_held_out"] - pt2["held_out_metric"] <= 0.01


def test_auto_prune_falls_back_to_none_when_the_model_does_not_allow_it(tmp_path, monkeypatch):
    from lightning_guard.callbacks import compress_export as ce_module

    def refuse(*args, **kwargs):
        raise GuardConfigError("this model's output signature would change")

    monkeypatch.setattr(ce_module, "prune_structured", refuse)
    tr, va = digits_loaders(n_train=128, n_val=64, batch_size=32)
    ce = CompressExport(dirpath=str(tmp_path / "out"), monitor="val_acc")
    trainer(tmp_path, [ce], max_epochs=1).fit(DigitsNet(), tr, va)
    report = json.loads((tmp_path / "out" / "compress_report.json").read_text())
    assert report["prune"] is None
    assert report["prune_note"] == (
        "auto: no pruning, structured pruning does not apply to this model (GuardConfigError: this model's output "
        "signature would change)"
    )
    assert not [s for s in report["stages"] if s["stage"] == "prune"]


def test_a_batchnorm_conv_net_gets_a_smaller_verified_artifact_and_the_report_names_its_quantised_layers(tmp_path):
    """Main: quantisation touched only Linear layers, undocumented; a conv net's file barely changed. Now the report
    names which layers torchao quantised and which stayed fp32 (its int8 has no convolution kernel), the ONNX file
    quantises the convolutions too (ConvInteger) and is the smaller verified artifact, and both verified files keep
    the original output shape."""
    from tests.workloads.digits_conv import DigitsConvNet, digits_image_loaders

    torch.manual_seed(0)
    tr, va = digits_image_loaders(n_train=512, n_val=256, batch_size=32)
    ce = CompressExport(dirpath=str(tmp_path / "out"), monitor="val_acc", formats=("pt2", "onnx"), max_metric_drop=0.02)
    model = DigitsConvNet()
    trainer(tmp_path, [ce], max_epochs=3).fit(model, tr, va)
    assert ce.result is not None, ce.error
    report = json.loads((tmp_path / "out" / "compress_report.json").read_text())
    (quant,) = [s for s in report["stages"] if s["stage"] == "quantize" and s["layers"] is not None]
    assert quant["layers"] == {"int8": ["classifier"], "fp32": ["features.0", "features.3"]}
    exports = {s["setting"]: s for s in report["stages"] if s["stage"] == "export"}
    assert exports["model.onnx"]["layers"]["int8"].get("ConvInteger") == 2
    baseline_file = report["stages"][0]["file_bytes"]
    # the smaller verified file is the ONNX one (3.9x measured): torchao's int8 .pt2 of this net, whose weights are
    # mostly convolutions, was larger than fp32 and was not kept, and every structured pruning broke the budget
    assert exports["model.onnx"]["file_bytes"] * 3 < baseline_file
    assert exports["model.pt2"]["quantized"] is None
    x = torch.cat([b[0] for b in va])[:16]
    expected = model.eval()(x).shape
    for name in ("model.pt2", "model.onnx"):
        assert C.load_artifact(tmp_path / "out" / name)(x).shape == expected


class TupleOutNet(DigitsNet):
    def forward(self, x):
        h = torch.relu(self.net[0](x))
        return self.net[2](h), h

    def validation_step(self, batch, batch_idx):
        logits, _ = self(batch[0])
        self.log("val_acc", (logits.argmax(-1) == batch[1]).float().mean())

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0])[0], batch[1])


class DictOutNet(TupleOutNet):
    def forward(self, x):
        logits, h = super().forward(x)
        return {"logits": logits, "hidden": h}

    def validation_step(self, batch, batch_idx):
        logits = self(batch[0])["logits"]
        self.log("val_acc", (logits.argmax(-1) == batch[1]).float().mean())

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0])["logits"], batch[1])


class TwoInputNet(DigitsNet):
    def forward(self, x, scale):
        return self.net(x * scale)

    def validation_step(self, batch, batch_idx):
        logits = self(batch[0], torch.ones(len(batch[0]), 1))
        self.log("val_acc", (logits.argmax(-1) == batch[1]).float().mean())

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0], torch.ones(len(batch[0]), 1)), batch[1])


@pytest.mark.parametrize("net", [TupleOutNet, DictOutNet, TwoInputNet])
def test_forwards_with_several_outputs_or_inputs_export_verify_and_measure_every_output(tmp_path, net):
    """Review: a forward returning a tuple or a dict failed after training (the artifact returned its first output
    only, and only that was verified); a two-input forward failed although `example_input` was given (verification
    used the batches' first element). Now every output is verified, the files keep the output structure, and each
    file's own metric is measured."""
    torch.manual_seed(0)
    tr, va = digits_loaders(n_train=128, n_val=128, batch_size=32)
    x = next(iter(va))[0]
    example = (x[:4], torch.ones(4, 1)) if net is TwoInputNet else None
    ce = CompressExport(
        dirpath=str(tmp_path / "out"), monitor="val_acc", formats=("pt2", "onnx"), example_input=example
    )
    model = net()
    trainer(tmp_path, [ce], max_epochs=1).fit(model, tr, va)
    assert ce.result is not None, ce.error
    exports = [s for s in ce.result.stages if s.stage == "export"]
    assert [s.setting for s in exports] == ["model.pt2", "model.onnx"]
    assert all(s.metric is not None for s in exports)
    args = example or (x[:4],)
    compressed = ce.result.model.eval()
    for name in ("model.pt2", "model.onnx"):
        out = C.load_artifact(tmp_path / "out" / name, C.output_spec(compressed, args))(*args)
        ref = compressed(*args)
        assert type(out) is type(ref)
        assert C.max_output_error(lambda *a, o=out: o, lambda *a, r=ref: r, [args]) <= 0.05


def test_the_pt2_carries_no_validation_data_and_a_batch_of_one_exports(tmp_path):
    """Review: torch.export.save stored the example input (the first validation batch, or the whole storage a
    slice viewed: a 954 kB .pt2 for a 5k-parameter MLP), and a validation batch of 1 made torch.export specialise the
    batch dimension and refuse the export at fit start."""
    tr, va = digits_loaders(n_train=128, n_val=64, batch_size=32)
    one = torch.utils.data.DataLoader(va.dataset, batch_size=1)
    ce = CompressExport(dirpath=str(tmp_path / "out"), monitor="val_acc", quantize=None, prune=None)
    trainer(tmp_path, [ce], max_epochs=1, limit_val_batches=8).fit(DigitsNet(hidden=16), tr, one)
    assert ce.result is not None, ce.error
    pt2 = tmp_path / "out" / "model.pt2"
    assert torch.export.load(str(pt2)).example_inputs is None
    assert pt2.stat().st_size < 40_000  # the weights (1.2k parameters) and the graph, no data
    assert C.load_artifact(pt2)(torch.zeros(5, 64)).shape == (5, 10)  # the batch dimension stayed dynamic


class UntraceableOnRank1(DigitsNet):
    def forward(self, x):
        if self.trainer.global_rank == 1 and x.sum() > 0:  # a data-dependent branch, traced on rank 1 only
            return -self.net(x)
        return self.net(x)


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_ddp_a_trial_export_failing_on_one_rank_is_agreed_by_every_rank(tmp_path):
    """The trial export at fit start fails on rank 1 only: every rank skips the compression at fit end. Before the
    ranks agreed on it, rank 0 would have compressed and waited at fit end for a rank 1 that had returned."""
    tr, va = digits_loaders(n_train=128, n_val=64, batch_size=32)
    ce = CompressExport(dirpath=str(tmp_path / "out"), monitor="val_acc")
    trainer(tmp_path, [ce], devices=2, strategy="ddp_spawn", max_epochs=1).fit(UntraceableOnRank1(), tr, va)
    events = [e for p in tmp_path.rglob("guard_events*.jsonl") for e in read_jsonl(p) if e["guard"] == "compress"]
    assert [(e["kind"], e["ranks"], e["data"]["when"]) for e in events] == [("export_failed", [1], "fit_start")]
    assert not (tmp_path / "out").exists()
