"""GradientGuard on a CUDA GPU (marked `gpu`; never in CI). Run by tests/benchmarks/gpu_check.sh."""

import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_guard import GradientGuard, event_stream
from lightning_guard.functional import global_grad_norm
from lightning_guard.testing import InjectNaN
from tests.helpers import DigitsNet, digits_loaders, trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class FirstNorm(Callback):
    """Global gradient norm of step 0 as the optimizer receives it (after GradientGuard)."""

    def __init__(self):
        self.norms = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.norms[trainer.global_step] = global_grad_norm(grads).item() if grads else math.nan


def _kinds(t):
    return [(e.kind, e.step) for e in event_stream(t).events if e.guard == "gradient_guard"]


def test_cuda_16_mixed_gradscaler(tmp_path):
    tr, va = digits_loaders()
    gg = GradientGuard()
    t = trainer(
        tmp_path,
        [gg, InjectNaN("loss", steps=[3]), InjectNaN("grad", steps=[5], value=float("inf"))],
        accelerator="cuda",
        precision="16-mixed",
    )
    model = DigitsNet()
    t.fit(model, tr, va)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _kinds(t) == [("nonfinite_skip", 3), ("amp_overflow", 5)]
    assert gg.runtime(t).applied_steps == [6]
    assert t.precision_plugin.scaler.get_scale() < 65536.0


def test_bf16_mixed_fused_adamw_clips_where_lightning_refuses(tmp_path):
    class Fused(DigitsNet):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)

    tr, va = digits_loaders()
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        trainer(tmp_path, [], accelerator="cuda", precision="bf16-mixed", gradient_clip_val=1.0).fit(Fused(), tr, va)
    probe = FirstNorm()
    gg = GradientGuard(max_norm=0.05)
    t = trainer(tmp_path, [gg, InjectNaN("loss", steps=[2]), probe], accelerator="cuda", precision="bf16-mixed")
    model = Fused()
    t.fit(model, tr, va)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max(v for k, v in probe.norms.items() if k != 2) <= 0.05 * 1.001
    assert _kinds(t) == [("nonfinite_skip", 2)]


def test_fsdp_one_gpu_norm_clip_and_skip(tmp_path):
    import json
    import os

    from lightning.pytorch.strategies import FSDPStrategy

    tr, va = digits_loaders()
    with pytest.raises(Exception, match="gradient_clip_algorithm='norm'"):
        trainer(tmp_path, [], accelerator="cuda", strategy=FSDPStrategy(), gradient_clip_val=1.0).fit(
            DigitsNet(), tr, va
        )
    before, after = FirstNorm(), FirstNorm()
    gg = GradientGuard(max_norm=0.3)
    torch.manual_seed(0)
    t = trainer(
        tmp_path, [before, gg, InjectNaN("loss", steps=[3]), after], accelerator="cuda", strategy=FSDPStrategy()
    )
    model = DigitsNet()
    t.fit(model, tr, va)
    assert _kinds(t) == [("nonfinite_skip", 3)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert gg.runtime(t).applied_steps == [7]
    history = list(gg._history)
    for step in (0, 1, 2, 4, 5):  # the guard's norm is the true norm of the sharded gradients ...
        assert history[step] == pytest.approx(before.norms[step], rel=1e-5)
        assert after.norms[step] <= 0.3 * 1.001  # ... and its clip holds where Lightning's norm clipping refuses
    out = os.environ.get("LG_GPU_OUT")
    if out:  # an observation for the notes: FSDP's gradients vs an unsharded run on the same weights and batch
        ref = FirstNorm()
        torch.manual_seed(0)
        trainer(tmp_path, [ref], accelerator="cuda").fit(DigitsNet(), tr, va)
        with open(os.path.join(out, "fsdp_vs_plain_norm.json"), "w") as f:
            json.dump({"fsdp_step0": before.norms[0], "plain_step0": ref.norms[0]}, f)


def test_rollback_from_async_pinned_snapshot_is_bit_exact(tmp_path):
    class ParamsAt(Callback):
        def __init__(self):
            self.params = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.params[trainer.global_step - 1] = [p.detach().clone() for p in pl_module.parameters()]

    tr, va = digits_loaders(n_train=640)
    probe = ParamsAt()
    gg = GradientGuard(snapshot_every=4, rollback_after=3)
    t = trainer(tmp_path, [gg, InjectNaN("loss", steps=[6, 7, 8]), probe], accelerator="cuda", precision="16-mixed")
    t.fit(DigitsNet(), tr, va)
    assert _kinds(t)[-1] == ("rollback", 8)
    assert gg._snapshot.params[0].is_pinned()
    for a, b in zip(probe.params[3], probe.params[8], strict=True):
        assert torch.equal(a, b)
