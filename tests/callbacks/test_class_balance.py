import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from lightning_guard import ClassBalance, GuardConfigError, event_stream
from lightning_guard.demo import long_tailed_digits
from lightning_guard.functional import balanced_loss, class_weights
from tests.helpers import DigitsNet, StopAfterEpoch, digits, events_file, precision_kwargs, read_jsonl, trainer


def long_tail_loader(batch_size=32):
    train, val, _, counts = long_tailed_digits(imbalance=100.0, seed=0)
    return DataLoader(train, batch_size=batch_size), DataLoader(val, batch_size=256), counts


class BalancedNet(DigitsNet):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.balanced_loss(logits, y))
        self.track_classes(logits, y)


def test_split_equals_whole_where_torch_weighted_mean_does_not():
    torch.manual_seed(0)
    logits, y = torch.randn(32, 10), torch.randint(0, 10, (32,))
    w = class_weights(torch.tensor([500.0, 200, 100, 50, 30, 20, 10, 6, 3, 1]), "inverse")
    whole = balanced_loss(logits, y, weights=w)
    pieces = torch.stack([balanced_loss(logits[i : i + 8], y[i : i + 8], weights=w) for i in range(0, 32, 8)]).mean()
    torch.testing.assert_close(whole, pieces, rtol=1e-6, atol=0)
    torch_loss = torch.nn.CrossEntropyLoss(weight=w)  # divides by the batch's sum of weights
    torch_pieces = torch.stack([torch_loss(logits[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]).mean()
    assert not torch.isclose(torch_loss(logits, y), torch_pieces, rtol=1e-3)  # pytorch #50528, #72047


def test_accumulation_equals_one_big_batch(tmp_path):
    train, _, _, _ = long_tailed_digits(imbalance=100.0, seed=0)
    train = Subset(
        train, list(range(len(train) // 32 * 32))
    )  # whole windows: Lightning scales every micro-batch by 1/2
    results = []
    for batch, acc in ((32, 1), (16, 2)):
        torch.manual_seed(0)
        model = DigitsNet(optimizer="sgd", lr=0.1)
        trainer(tmp_path / str(batch), [ClassBalance(method="inverse")], accumulate_grad_batches=acc).fit(
            model, DataLoader(train, batch_size=batch)
        )
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_counts_events_and_weights(tmp_path):
    tr, va, counts = long_tail_loader()
    cb = ClassBalance(method="inverse")
    t = trainer(tmp_path, [cb])
    model = BalancedNet()
    t.fit(model, tr, va)
    assert cb.counts.tolist() == counts
    events = {e.kind: e for e in event_stream(t).events if e.guard == "class_balance"}
    assert events["class_counts"].data["counts"] == counts
    assert events["class_counts"].data["imbalance_ratio"] == pytest.approx(counts[0] / counts[-1])
    assert events["class_weights"].data["weights"][-1] > events["class_weights"].data["weights"][0]
    w = model.guard_class_weights
    frac = torch.tensor(counts, dtype=torch.float32) / sum(counts)
    assert float((frac * w).sum()) == pytest.approx(1.0, rel=1e-5)  # CE's scale is kept


@pytest.mark.parametrize("kind", ["tensor_dataset", "subset", "targets_attr", "generic", "dict_items", "iterable"])
def test_counting_paths(tmp_path, kind):
    x, y = digits()
    x, y = x[:200], y[:200]
    expected = torch.bincount(y, minlength=10).tolist()

    class Generic(Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return (x[i], y[i]) if kind == "generic" else {"x": x[i], "label": y[i]}

    class WithTargets(Generic):
        targets = y.tolist()

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(x, y, strict=True)

    class DictNet(DigitsNet):
        def training_step(self, batch, batch_idx):
            return self.balanced_loss(self(batch["x"]), batch["label"])

    if kind == "tensor_dataset":
        ds = TensorDataset(x, y)
    elif kind == "subset":
        ds = Subset(TensorDataset(digits()[0], digits()[1]), list(range(200)))
    elif kind == "targets_attr":
        ds = WithTargets()
        kind = "generic"
    elif kind == "iterable":
        ds = Stream()
    else:
        ds = Generic()
    model = DictNet() if kind == "dict_items" else DigitsNet()
    label_fn = (lambda batch: batch[1]) if kind == "iterable" else None
    cb = ClassBalance(method="inverse", label_fn=label_fn, num_classes=10)
    trainer(tmp_path, [cb], max_epochs=1).fit(model, DataLoader(ds, batch_size=50))
    assert cb.counts.long().tolist() == expected


def test_fp32_under_bf16(tmp_path):
    tr, va, _ = long_tail_loader()

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.loss_dtype = outputs["loss"].dtype
            self.buffer_dtypes = {pl_module.guard_class_weights.dtype, pl_module.guard_class_log_prior.dtype}

    for precision in ("bf16-mixed", "bf16-true"):
        probe = Probe()
        trainer(
            tmp_path / precision, [ClassBalance(method="inverse"), probe], max_steps=2, **precision_kwargs(precision)
        ).fit(DigitsNet(), tr, va)
        assert probe.loss_dtype == torch.float32
        assert probe.buffer_dtypes == {torch.float32}  # survived the module's cast to bf16


def test_logit_adjustment_only_while_training():
    net = DigitsNet()
    cb = ClassBalance()  # logit adjustment
    cb.counts, cb.total, cb.num_classes = torch.tensor([80.0] + [20.0] * 9), 260, 10
    cb._install(None, net)
    logits, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    net.train()
    adjusted = net.balanced_loss(logits, y)
    net.eval()
    plain = net.balanced_loss(logits, y)
    assert torch.isclose(plain, torch.nn.functional.cross_entropy(logits, y))
    assert not torch.isclose(adjusted, plain)


def test_binary_pos_weight(tmp_path):
    x, y = digits()
    yb = (y == 0).float().unsqueeze(1)  # ~10% positives

    class Binary(DigitsNet):
        def __init__(self):
            super().__init__()
            self.net[2] = torch.nn.Linear(64, 1)

        def training_step(self, batch, batch_idx):
            xx, yy = batch
            return self.balanced_loss(self(xx), yy)

    cb = ClassBalance(task="binary", loss="bce")
    model = Binary()
    trainer(tmp_path, [cb], max_steps=2).fit(model, DataLoader(TensorDataset(x, yb), batch_size=64))
    pos = float(yb.sum())
    assert float(model.guard_pos_weight[0]) == pytest.approx((len(yb) - pos) / pos)


def test_zero_class_gets_the_stated_policy(tmp_path):
    x, y = digits()
    keep = y != 7
    cb = ClassBalance(method="inverse", num_classes=10)
    model = DigitsNet()
    t = trainer(tmp_path, [cb], max_steps=1)
    t.fit(model, DataLoader(TensorDataset(x[keep], y[keep]), batch_size=64))
    (ev,) = [e for e in event_stream(t).events if e.kind == "zero_class"]
    assert ev.data["classes"] == [7]
    w = model.guard_class_weights
    assert float(w[7]) == pytest.approx(float(w.max()))
    assert math.isfinite(float(model.guard_class_log_prior[7]))


def test_track_classes_logs_balanced_accuracy_and_recall(tmp_path):
    tr, va, _ = long_tail_loader()
    t = trainer(tmp_path, [ClassBalance()], logger=CSVLogger(tmp_path), max_epochs=2)
    t.fit(BalancedNet(), tr, va)
    m = t.callback_metrics
    assert 0 < float(m["guard/class_balance/balanced_acc"]) <= 1
    recalls = [float(m[f"guard/class_balance/recall/{c}"]) for c in range(10)]
    assert float(m["guard/class_balance/balanced_acc"]) == pytest.approx(sum(recalls) / 10, abs=1e-6)


class ValuesOnly(Dataset):
    """No `targets` attribute: counting has to read the items (split by index across ranks)."""

    def __init__(self):
        self.x, self.y = digits()

    def __len__(self):
        return 301

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class DumpCounts(Callback):
    def __init__(self, cb, out):
        self.cb, self.out = cb, out

    def on_train_end(self, trainer, pl_module):
        Path(self.out, f"c{trainer.global_rank}.json").write_text(json.dumps(self.cb.counts.tolist()))


@pytest.mark.ddp
def test_ddp_spawn_counts_equal_the_whole_data_set(tmp_path):
    cb = ClassBalance(method="inverse")
    t = trainer(tmp_path, [cb, DumpCounts(cb, str(tmp_path))], devices=2, strategy="ddp_spawn", max_steps=2)
    t.fit(DigitsNet(), DataLoader(ValuesOnly(), batch_size=32))
    expected = torch.bincount(digits()[1][:301], minlength=10).double().tolist()
    for r in (0, 1):
        assert json.loads((tmp_path / f"c{r}.json").read_text()) == expected  # exact: no DistributedSampler padding


class UnshardedStream(IterableDataset):
    """An IterableDataset that ignores the rank: every rank streams the same 120 digits."""

    def __iter__(self):
        x, y = digits()
        return iter(zip(x[:120], y[:120], strict=True))


class ShardedStream(UnshardedStream):
    """Disjoint shards whose label sequences are the same on every rank (class-sorted, 6 per class per rank)."""

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        x, y = digits()
        idx = [i for c in range(10) for i in (y == c).nonzero().flatten()[rank * 6 : (rank + 1) * 6].tolist()]
        return iter([(x[i], y[i]) for i in idx])


@pytest.mark.ddp
def test_ddp_spawn_an_unsharded_iterable_dataset_is_counted_once(tmp_path):
    """Main (from the code): an IterableDataset not sharded per rank was counted world-size times. Now ranks that
    streamed the same labels count them once and warn; a sharded stream is summed (both on 2 ddp_spawn ranks)."""
    unsharded = torch.bincount(digits()[1][:120], minlength=10).double().tolist()
    for name, data, expected in (
        ("unsharded", UnshardedStream(), unsharded),
        ("sharded", ShardedStream(), [12.0] * 10),  # review: equal label sequences on disjoint shards were counted once
    ):
        out = tmp_path / name
        out.mkdir()
        cb = ClassBalance(method="inverse", num_classes=10)
        t = trainer(out, [cb, DumpCounts(cb, str(out))], devices=2, strategy="ddp_spawn", max_steps=2)
        t.fit(DigitsNet(), DataLoader(data, batch_size=30))
        for r in (0, 1):
            assert json.loads((out / f"c{r}.json").read_text()) == expected, name
        events = [e for e in read_jsonl(events_file(out)) if e["kind"] == "unsharded_stream"]
        assert len(events) == (1 if name == "unsharded" else 0)
    (warning,) = [e for e in read_jsonl(events_file(tmp_path / "unsharded")) if e["kind"] == "unsharded_stream"]
    assert warning["message"].startswith("every rank read the same 120 labels from the training IterableDataset")
    assert "counted once, not 2 times" in warning["message"]


def test_resume_uses_the_saved_counts(tmp_path, monkeypatch):
    tr, va, _ = long_tail_loader()

    def run(root, extra=(), ckpt_path=None):
        ck = ModelCheckpoint(dirpath=root / "ck", every_n_epochs=1, save_top_k=-1)
        t = trainer(root, [ClassBalance(), ck, *extra], max_epochs=3, enable_checkpointing=True)
        torch.manual_seed(0)
        model = BalancedNet()
        t.fit(model, tr, va, ckpt_path=ckpt_path)
        return model

    full = run(tmp_path / "full")
    run(tmp_path / "part", extra=[StopAfterEpoch(0)])
    (ckpt,) = (tmp_path / "part" / "ck").glob("*.ckpt")
    calls = []
    original = ClassBalance._count
    monkeypatch.setattr(ClassBalance, "_count", lambda self, t: (calls.append(1), original(self, t)))
    resumed = run(tmp_path / "res", ckpt_path=str(ckpt))
    assert calls == []  # no second pass over the data
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_runtime_errors(tmp_path):
    x, y = digits()
    loader = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)

    class NoMixin(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 10)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.lin(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(
        GuardConfigError,
        match=r"ClassBalance sets the loss through GuardMixin.balanced_loss: mix "
        r"GuardMixin into NoMixin",
    ):
        trainer(tmp_path, [ClassBalance()], max_steps=1).fit(NoMixin(), loader)
    with pytest.raises(
        GuardConfigError, match=r"ClassBalance found labels out of range for num_classes=5: \[5, 6, 7, 8, 9\]"
    ):
        trainer(tmp_path, [ClassBalance(num_classes=5)], max_steps=1).fit(DigitsNet(), loader)
    bad = DataLoader(TensorDataset(x[:8], torch.full((8,), -1)), batch_size=8)
    with pytest.raises(GuardConfigError, match=r"ClassBalance found negative labels: \[-1\]"):
        trainer(tmp_path, [ClassBalance()], max_steps=1).fit(DigitsNet(), bad)
    wide = DataLoader(TensorDataset(x[:8], torch.zeros(8, 3)), batch_size=8)
    with pytest.raises(GuardConfigError, match=r"ClassBalance: num_classes=2 but the multilabel labels have width 3"):
        trainer(tmp_path, [ClassBalance(task="multilabel", loss="bce", num_classes=2)], max_steps=1).fit(
            DigitsNet(), wide
        )
    soft = DataLoader(TensorDataset(x[:8], torch.full((8, 1), 0.5)), batch_size=8)
    with pytest.raises(GuardConfigError, match=r"ClassBalance: binary/multilabel labels must be 0 or 1"):
        trainer(tmp_path, [ClassBalance(task="binary", loss="bce")], max_steps=1).fit(DigitsNet(), soft)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"method": "smote"},
            r"`method` must be one of \('logit_adjustment', 'inverse', 'sqrt_inverse', "
            r"'effective_number', 'none'\), got 'smote'",
        ),
        ({"task": "regression"}, r"`task` must be one of \('multiclass', 'binary', 'multilabel'\), got 'regression'"),
        ({"loss": "hinge"}, r"`loss` must be one of \('ce', 'focal', 'bce'\), got 'hinge'"),
        ({"loss": "bce"}, r"`loss` 'bce' does not fit `task` 'multiclass'"),
        ({"num_classes": 0}, r"`num_classes` must be a positive int or None, got 0"),
        ({"beta": 1.0}, r"`beta` must be in \(0, 1\), got 1.0"),
        ({"tau": 0}, r"`tau` must be a number > 0, got 0"),
        ({"gamma": -1}, r"`gamma` must be a number >= 0, got -1"),
        ({"label_fn": 3}, r"`label_fn` must be callable or None, got 3"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(GuardConfigError, match=match):
        ClassBalance(**kwargs)


class Labelled(Dataset):
    """60 samples, classes [40, 15, 5] in blocks, with a `targets` attribute (or a wrong one)."""

    def __init__(self, targets_len=None):
        self.y = torch.tensor([0] * 40 + [1] * 15 + [2] * 5)
        self.x = torch.randn(60, 64, generator=torch.Generator().manual_seed(0))
        self.targets = self.y.tolist()[: targets_len or 60]

    def __len__(self):
        return 60

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class NoLabelAttr(Labelled):
    def __init__(self):
        super().__init__()
        del self.targets


@pytest.mark.parametrize("dataset", [Labelled, NoLabelAttr], ids=["targets_attribute", "item_pass"])
def test_counts_follow_the_sampler_the_loader_uses(tmp_path, dataset):
    """A SubsetRandomSampler split counted the whole data set ([40, 15, 5] where the split has [30, 5, 1])."""
    split = list(range(0, 30)) + list(range(40, 45)) + [55]
    loader = DataLoader(dataset(), batch_size=8, sampler=torch.utils.data.SubsetRandomSampler(split))
    cb = ClassBalance(method="inverse")
    trainer(tmp_path, [cb], max_steps=1).fit(DigitsNet(), loader)
    assert cb.counts.tolist() == [30.0, 5.0, 1.0]
    assert cb.total == 36


def test_counting_through_a_random_sampler_leaves_the_training_order_alone(tmp_path):
    """Drawing the sampler's indices uses torch's global generator: the batches training sees must not change."""

    class FirstBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.y = batch[1].clone()

    seen = []
    for cbs in ([ClassBalance(num_classes=10)], []):
        probe = FirstBatch()
        torch.manual_seed(0)
        loader = DataLoader(Labelled(), batch_size=8, shuffle=True)
        trainer(tmp_path, [*cbs, probe], max_steps=1).fit(DigitsNet(), loader)
        seen.append(probe.y)
    assert torch.equal(seen[0], seen[1])


def test_a_label_attribute_of_the_wrong_length_is_refused(tmp_path):
    with pytest.raises(
        GuardConfigError,
        match=r"the dataset's `targets` attribute has 50 entries but the dataset has 60 samples: pass `label_fn`",
    ):
        trainer(tmp_path, [ClassBalance()], max_steps=1).fit(DigitsNet(), DataLoader(Labelled(50), batch_size=8))


def test_class_counts_skip_counting(tmp_path):
    cb = ClassBalance(method="inverse", class_counts=[10, 30, 60])
    model = DigitsNet()
    trainer(tmp_path, [cb], max_steps=1).fit(model, DataLoader(Labelled(), batch_size=8))
    assert cb.counts.tolist() == [10.0, 30.0, 60.0]
    assert model.guard_class_weights.tolist() == pytest.approx(class_weights(torch.tensor([10, 30, 60.0])).tolist())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"class_counts": [1, -2]},
            r"`class_counts` must be a list of numbers >= 0 \(one per class, not all 0\), got \[1, -2\]",
        ),
        ({"class_counts": [0, 0]}, r"`class_counts` must be a list of numbers >= 0 .*got \[0, 0\]"),
        ({"class_counts": "abc"}, r"`class_counts` must be a list of numbers >= 0 .*got 'abc'"),
        ({"class_counts": [1, 2], "num_classes": 3}, r"`class_counts` has 2 entries but `num_classes` is 3"),
        (
            {"class_counts": [1, 2], "task": "binary", "loss": "bce"},
            r"`class_counts` is for task='multiclass' \(samples per class\), got task='binary'",
        ),
        ({"ignore_index": 1.5}, r"`ignore_index` must be an int, got 1.5"),
    ],
)
def test_counting_argument_errors(kwargs, match):
    with pytest.raises(GuardConfigError, match=match):
        ClassBalance(**kwargs)


def test_one_hot_and_masked_labels_are_counted_as_cross_entropy_reads_them(tmp_path):
    """One-hot labels were miscounted with a bogus zero-class warning; masks with ignore_index raised."""
    y = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    one_hot = torch.nn.functional.one_hot(y, 10).float()
    x = torch.randn(10, 64)
    cb = ClassBalance()
    trainer(tmp_path, [cb], max_steps=1).fit(DigitsNet(), DataLoader(TensorDataset(x, one_hot), batch_size=5))
    assert cb.counts.tolist() == [6.0, 3.0, 1.0] + [0.0] * 7

    class PerPixel(DigitsNet):  # (N, C, 3) logits against (N, 3) masks
        def training_step(self, batch, batch_idx):
            xx, mask = batch
            return self.balanced_loss(self(xx).unsqueeze(-1).expand(-1, -1, 3), mask)

    masks = torch.tensor([[0, 0, -100], [1, 2, -100]]).repeat(5, 1)  # per-pixel labels, one pixel unlabelled
    cb = ClassBalance(num_classes=10)
    trainer(tmp_path, [cb], max_steps=1).fit(PerPixel(), DataLoader(TensorDataset(x, masks), batch_size=5))
    assert cb.counts.tolist() == [10.0, 5.0, 5.0] + [0.0] * 7


class OneHotItems(Dataset):
    """No label attribute: labels are read item by item; one-hot (or an index) per item, in a tuple or a dict."""

    def __init__(self, one_hot=True, as_dict=False):
        self.y = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
        self.x = torch.randn(60, 64, generator=torch.Generator().manual_seed(1))
        self.one_hot, self.as_dict = one_hot, as_dict

    def __len__(self):
        return 60

    def __getitem__(self, i):
        y = torch.nn.functional.one_hot(self.y[i], 10).float() if self.one_hot else self.y[i]
        return {"x": self.x[i], "label": y} if self.as_dict else (self.x[i], y)


class DictNet(DigitsNet):
    def training_step(self, batch, batch_idx):
        x, y = (batch["x"], batch["label"]) if isinstance(batch, dict) else batch
        return self.balanced_loss(self(x), y)


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_one_hot_labels_read_from_items_count_by_class(tmp_path, as_dict):
    """Per-item one-hot vectors were flattened together: [120, 60, 0] where the classes are [30, 20, 10]."""
    cb = ClassBalance()
    loader = DataLoader(OneHotItems(as_dict=as_dict), batch_size=8)
    trainer(tmp_path, [cb], max_steps=1).fit(DictNet(), loader)
    assert cb.counts.tolist() == [30.0, 20.0, 10.0] + [0.0] * 7


@pytest.mark.parametrize("how", ["item_pass", "loader_generator"])
def test_counting_never_changes_the_batches_training_draws(tmp_path, how):
    """The item pass's reader drew its seed from torch's global generator, and iterating a sampler used up the
    generator the user gave the loader: the first batch changed."""

    class FirstBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                self.x = batch[0].clone()

    seen = []
    for cbs in ([ClassBalance(num_classes=10)], []):
        probe = FirstBatch()
        torch.manual_seed(0)
        if how == "item_pass":
            loader = DataLoader(OneHotItems(one_hot=False), batch_size=8, shuffle=True)
        else:
            g = torch.Generator().manual_seed(123)
            loader = DataLoader(Labelled(), batch_size=8, shuffle=True, generator=g)
        trainer(tmp_path, [*cbs, probe], max_steps=1).fit(DigitsNet(), loader)
        seen.append(probe.x)
    assert torch.equal(seen[0], seen[1])


def test_a_label_attribute_of_names_is_refused_with_the_way_out(tmp_path):
    class Named(Labelled):
        def __init__(self):
            super().__init__()
            self.targets = ["cat"] * 40 + ["dog"] * 20

    with pytest.raises(
        GuardConfigError,
        match=r"the dataset's `targets` attribute does not hold class indices "
        r"\(first values \['cat', 'cat', 'cat'\]\): pass `label_fn` returning class indices, or `class_counts`",
    ):
        trainer(tmp_path, [ClassBalance()], max_steps=1).fit(DigitsNet(), DataLoader(Subset(Named(), range(40))))


def test_track_classes_on_segmentation_masks_skips_ignored_pixels(tmp_path):
    """(N, C, H, W) maps against (N, H, W) masks with unlabelled pixels: argmax on the class dim, ignore_index honoured
    (the metrics raised on -100 before, and took argmax over W)."""

    class Seg(DigitsNet):
        def forward(self, x):  # (N, 10, 2, 3) maps: the same logits at every pixel
            return self.net(x)[:, :, None, None].expand(-1, -1, 2, 3)

        def training_step(self, batch, batch_idx):
            x, mask = batch
            return self.balanced_loss(self(x), mask)

        def validation_step(self, batch, batch_idx):
            x, mask = batch
            self.track_classes(self(x), mask)

    x, y = digits()
    masks = y[:, None, None].expand(-1, 2, 3).clone()
    masks[:, 0, 0] = -100
    loader = DataLoader(TensorDataset(x[:256], masks[:256]), batch_size=64)
    t = trainer(tmp_path, [ClassBalance(num_classes=10)], max_epochs=1)
    model = Seg()
    t.fit(model, loader, loader)
    from torchmetrics.functional.classification import multiclass_accuracy

    with torch.no_grad():  # every pixel of a sample has its label: the pixels' balanced accuracy is the samples'
        expected = multiclass_accuracy(model.net(x[:256]).argmax(-1), y[:256], num_classes=10, average="macro")
    assert float(t.callback_metrics["guard/class_balance/balanced_acc"]) == pytest.approx(float(expected), abs=1e-6)
