"""All guards on one CUDA GPU (marked `gpu`; never in CI): 16-mixed with the CUDA GradScaler and FSDP on one GPU.

Run by tests/benchmarks/gpu_check.sh (part `tests`).
"""

import pytest
import torch

from lightning_guard import ClassBalance, GradientGuard, L1Penalty, OOMGuard, OverfitGuard, WarmupCosine, event_stream
from lightning_guard.testing import InjectNaN, SimulatedOOM
from tests.helpers import DigitsNet, digits_loaders, trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _guards():
    return [
        WarmupCosine(warmup=0.1),
        GradientGuard(),
        L1Penalty(1e-5),
        OverfitGuard(monitor="val_loss", patience=20),
        ClassBalance(),
        OOMGuard(),
        InjectNaN("batch", steps=[3]),
        SimulatedOOM(16, where="backward", steps=[5]),
    ]


@pytest.mark.parametrize("strategy", ["auto", "fsdp"])
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_all_guards_on_one_gpu(tmp_path, strategy, precision):
    tr, va = digits_loaders(n_train=256, n_val=128, batch_size=32)
    t = trainer(tmp_path, _guards(), accelerator="cuda", strategy=strategy, precision=precision, max_epochs=3)
    model = DigitsNet()
    t.fit(model, tr, va)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    kinds = {(e.guard, e.kind) for e in event_stream(t).events}
    assert ("oom", "oom_retry") in kinds
    assert any(g == "gradient_guard" for g, _ in kinds)
