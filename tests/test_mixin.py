import pytest
import torch

from lightning_guard import GuardEvent, GuardMixin, WarmupCosine, emit
from tests.helpers import DigitsNet, digits_loaders, trainer


def test_balanced_loss_is_fp32_cross_entropy_under_autocast():
    net = DigitsNet()
    logits = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net.balanced_loss(logits.bfloat16(), y)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits.bfloat16().float(), y).item())


def test_balanced_loss_binary_targets_use_bce_when_the_task_says_so():
    net = DigitsNet()
    logits, y = torch.randn(4, 3), torch.randint(0, 2, (4, 3)).float()
    for task in ("binary", "multilabel"):
        assert net.balanced_loss(logits, y, task=task).item() == pytest.approx(
            torch.nn.functional.binary_cross_entropy_with_logits(logits, y).item()
        )
    with pytest.raises(ValueError, match=r"`task` must be 'multiclass', 'binary', 'multilabel' or None, got 'bce'"):
        net.balanced_loss(logits, y, task="bce")


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((8, 5), {}),
        ((4, 5, 6, 7), {}),  # segmentation maps: classes on dim 1
        ((4, 5, 5, 5), {}),  # H = W = C: a silently wrong loss before (softmax over W)
        ((4, 5, 6, 7), {"ignore_index": -100}),
        ((4, 5, 6, 7), {"ignore_index": 2, "label_smoothing": 0.1}),
        ((8, 5), {"label_smoothing": 0.2}),
        ((5,), {}),  # one unbatched sample
    ],
)
def test_balanced_loss_equals_cross_entropy_without_balancing(shape, kwargs):
    """What F.cross_entropy takes, balanced_loss takes and computes the same (before: softmax over the last dim, no
    ignore_index - an index error on -100 - and no label_smoothing)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*shape, generator=g)
    n_classes = shape[1] if len(shape) > 1 else shape[0]
    target_shape = (shape[0], *shape[2:]) if len(shape) > 1 else ()
    target = torch.randint(0, n_classes, target_shape, generator=g)
    if "ignore_index" in kwargs and target.dim() > 0:
        target[:, 0] = kwargs["ignore_index"]
    got = DigitsNet().balanced_loss(logits, target, **kwargs)
    torch.testing.assert_close(got, torch.nn.functional.cross_entropy(logits, target, **kwargs), rtol=1e-6, atol=1e-6)


def test_balanced_loss_takes_class_probability_targets_like_cross_entropy():
    """Soft or one-hot targets shaped like the logits silently became an unweighted BCE."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 3, generator=g)
    probs = torch.softmax(torch.randn(6, 4, 3, generator=g), dim=1)
    net = DigitsNet()
    for smoothing in (0.0, 0.1):
        torch.testing.assert_close(
            net.balanced_loss(logits, probs, label_smoothing=smoothing),
            torch.nn.functional.cross_entropy(logits, probs, label_smoothing=smoothing),
        )


def test_guard_events_property(tmp_path):
    assert DigitsNet().guard_events == []  # no trainer: no events, no error
    tr, va = digits_loaders(n_train=64)

    class Emitting(DigitsNet):
        def on_train_epoch_end(self):
            emit(self.trainer, GuardEvent.at(self.trainer, "user", "note"))

    net = Emitting()
    trainer(tmp_path, [WarmupCosine(warmup=0)]).fit(net, tr, va)
    assert [e.kind for e in net.guard_events if e.guard == "user"] == ["note"]
    assert isinstance(net, GuardMixin)


def test_balancing_a_segmentation_map_acts_on_the_class_dim():
    """Weights, prior and focal term on (N, C, H, W) maps equal those on the same pixels laid out as (N*H*W, C)."""
    from lightning_guard.functional import balanced_loss

    g = torch.Generator().manual_seed(0)
    seg, mask = torch.randn(2, 4, 5, 5, generator=g), torch.randint(0, 4, (2, 5, 5), generator=g)
    mask[0, 0] = -100
    kw = {"weights": torch.tensor([0.5, 1.0, 2.0, 4.0]), "log_prior": torch.tensor([0.1, 0.2, 0.3, 0.4]).log()}
    flat = seg.movedim(1, -1).reshape(-1, 4), mask.reshape(-1)
    for gamma in (0.0, 2.0):
        torch.testing.assert_close(balanced_loss(seg, mask, gamma=gamma, **kw), balanced_loss(*flat, gamma=gamma, **kw))
