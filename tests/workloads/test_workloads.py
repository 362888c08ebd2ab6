"""The shared workloads are sane: real data, deterministic, and they learn in their CI configuration."""

import math
import pickle
import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from tests.benchmarks.do_no_harm import one_thread
from tests.helpers import DigitsNet as HelpersDigitsNet
from tests.helpers import digits_loaders as helpers_digits_loaders
from tests.helpers import trainer
from tests.workloads import (
    WORKLOADS,
    CharLM,
    DigitsConvNet,
    DigitsNet,
    char_lm_loaders,
    digits_image_loaders,
    digits_loaders,
    stdlib_text,
)
from tests.workloads.char_lm import TEXT_BYTES, VOCAB


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


class ValHistory(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.values.append(float(trainer.callback_metrics["val_loss"]))


def test_mlp_is_the_helpers_one():
    assert DigitsNet is HelpersDigitsNet
    assert digits_loaders is helpers_digits_loaders


def test_stdlib_text_is_real_source_read_once():
    text = stdlib_text()
    assert stdlib_text() is text  # cached per process
    assert len(text) == TEXT_BYTES
    first = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[0]
    assert text.startswith(first.read_bytes())
    assert b"def " in text
    assert b"import " in text


def test_char_lm_loaders_are_deterministic_shifted_and_picklable():
    train_a, val_a = char_lm_loaders(seq_len=32, batch_size=4, n_train_batches=3, n_val_batches=2, seed=5)
    train_b, val_b = char_lm_loaders(seq_len=32, batch_size=4, n_train_batches=3, n_val_batches=2, seed=5)
    train_c, val_c = char_lm_loaders(seq_len=32, batch_size=4, n_train_batches=3, n_val_batches=2, seed=6)
    (xa, ya), (xb, yb), (xc, _) = (train_a.dataset.tensors, train_b.dataset.tensors, train_c.dataset.tensors)
    assert xa.shape == ya.shape == (12, 32)
    assert xa.dtype == torch.long
    assert int(xa.max()) < VOCAB
    assert torch.equal(xa, xb)
    assert torch.equal(ya, yb)
    assert not torch.equal(xa, xc)  # the seed draws the training windows
    assert torch.equal(val_a.dataset.tensors[0], val_b.dataset.tensors[0])
    assert torch.equal(val_a.dataset.tensors[0], val_c.dataset.tensors[0])  # validation does not depend on the seed
    assert torch.equal(xa[:, 1:], ya[:, :-1])  # the target is the next byte
    assert len(train_a) == 3
    assert len(val_a) == 2
    # ddp_spawn pickles the loaders: no torch.Generator inside
    assert train_a.generator is None
    assert pickle.loads(pickle.dumps(train_a)).dataset.tensors[0].equal(xa)


def test_char_lm_validation_is_held_out():
    train, val = char_lm_loaders(seq_len=64, batch_size=8, n_train_batches=2, n_val_batches=2, seed=0)
    text = stdlib_text()
    split = int(len(text) * 0.9)
    x_val, x_train = val.dataset.tensors[0], train.dataset.tensors[0]
    assert bytes(x_val[0].tolist()) == text[split : split + 64]  # validation windows start at the held-out tail
    assert bytes(x_val[-1].tolist()) == text[-65:-1]  # ... and end at the end of the text
    starts = [text.find(bytes(row.tolist())) for row in x_train]
    assert all(0 <= s < split for s in starts)


def test_digits_image_loaders_match_the_mlp_split():
    images, _ = digits_image_loaders(n_train=64, n_val=32, batch_size=16, seed=3)
    flat, _ = digits_loaders(n_train=64, n_val=32, batch_size=16, seed=3)
    x_img, y_img = images.dataset.tensors
    x_flat, y_flat = flat.dataset.tensors
    assert x_img.shape == (64, 1, 8, 8)
    assert torch.equal(x_img.flatten(1), x_flat)
    assert torch.equal(y_img, y_flat)
    with pytest.raises(ValueError, match="n_train \\+ n_val must be at most 1797"):
        digits_image_loaders(n_train=1700, n_val=200)


def test_char_lm_loss_is_fp32_under_bf16_autocast():
    model = CharLM(n_layer=1, d_model=32, n_head=2, seq_len=16)
    x = torch.randint(0, VOCAB, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        loss = model.loss((x, x))
    assert loss.dtype == torch.float32
    assert math.isfinite(loss.item())


def test_char_lm_rejects_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="`n_head` must divide `d_model`, got n_head=3, d_model=64"):
        CharLM(d_model=64, n_head=3)


def test_registry_rejects_an_unknown_size():
    with pytest.raises(ValueError, match="`size` must be one of \\('ci', 'bench'\\), got 'huge'"):
        WORKLOADS["mlp"](0, "huge")


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workload_is_deterministic(name):
    losses = []
    for seed in (0, 0, 1):
        model, train, _, kwargs = WORKLOADS[name](seed, "ci")
        assert kwargs["max_epochs"] >= 2  # at least two validations, so OverfitGuard has something to compare
        x, y = next(iter(train))
        logits = model(x)
        losses.append(torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)))
    assert torch.equal(losses[0], losses[1])  # bit-identical
    assert not torch.equal(losses[0], losses[2])


def test_char_lm_learns_in_its_ci_config(tmp_path):
    model, train, val, kwargs = WORKLOADS["char_lm"](0, "ci")
    assert isinstance(model, CharLM)
    (before,) = trainer(tmp_path).validate(model, val, verbose=False)
    assert abs(before["val_loss"] - math.log(256)) < 0.05  # a fresh model guesses uniformly
    history = ValHistory()
    trainer(tmp_path, callbacks=[history], **kwargs).fit(model, train, val)
    assert len(history.values) == kwargs["max_epochs"]
    assert history.values[-1] < math.log(256) - 2.0  # well below a uniform guess (about 2.9 nats/byte)
    assert history.values[-1] < history.values[0]  # still improving from the first validation to the last


def test_conv_bn_beats_80_percent_in_its_ci_config(tmp_path):
    model, train, val, kwargs = WORKLOADS["conv_bn"](0, "ci")
    assert isinstance(model, DigitsConvNet)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    t = trainer(tmp_path, **kwargs)
    t.fit(model, train, val)
    (result,) = t.validate(model, val, verbose=False)
    assert result["val_acc"] > 0.8
    assert model.features[1].num_batches_tracked.item() == t.global_step  # BatchNorm saw every training batch
