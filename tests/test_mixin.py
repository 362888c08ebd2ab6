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


def test_balanced_loss_binary_targets_use_bce():
    net = DigitsNet()
    logits, y = torch.randn(4, 3), torch.randint(0, 2, (4, 3)).float()
    assert net.balanced_loss(logits, y).item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(logits, y).item()
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
