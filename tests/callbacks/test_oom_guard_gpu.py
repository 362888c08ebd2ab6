"""OOMGuard against a real CUDA out-of-memory (marked `gpu`; never in CI). Run by tests/benchmarks/gpu_check.sh.

The process is capped at ``CAP_GIB`` of GPU memory (``torch.cuda.set_per_process_memory_fraction``) so the failure is
real and reproducible on any card: a 4 x 4096 MLP (~0.27 GB of weights, ~1.1 GB with AdamW state and gradients) whose
batch of 32768 samples needs ~2.5 GB of activations in fp32. Recovery time and memory figures go to
``$LG_GPU_OUT/oom_guard_gpu.json`` when that variable is set.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import OOMGuard, event_stream

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CAP_GIB = 2.5
BATCH = 32768
WIDTH = 4096


class Wide(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        layers: list[torch.nn.Module] = []
        for _ in range(4):
            layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU()]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(WIDTH, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class StepTimes(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * 3, WIDTH, generator=g)
    y = torch.randint(0, 10, (BATCH * 3,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def _fit(tmp_path: Path, model: pl.LightningModule, callbacks: list[Any]) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    )
    trainer.fit(model, _loader())
    return trainer


def test_real_cuda_oom_trains_to_completion_and_matches_a_micro_batched_reference(tmp_path):
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(CAP_GIB * 1024**3 / total, 0)
    try:
        torch.manual_seed(0)
        init = Wide()
        model = copy.deepcopy(init)
        guard, times = OOMGuard(), StepTimes()
        start = time.perf_counter()
        trainer = _fit(tmp_path / "guard", model, [guard, times])
        wall = time.perf_counter() - start
        events = [e for e in event_stream(trainer).events if e.guard == "oom"]
        assert trainer.global_step == 3
        assert guard.micro_batch_size is not None
        assert guard.micro_batch_size < BATCH
        assert events
        assert all(e.kind == "oom_retry" for e in events)
        model_params = [p.detach().cpu() for p in model.parameters()]
        del model, trainer
        torch.cuda.empty_cache()

        reference = copy.deepcopy(init)  # the same micro-batches from the start: no OOM on the way
        _fit(tmp_path / "ref", reference, [OOMGuard(micro_batch_size=guard.micro_batch_size)])
        rel = max(
            float((a - b.detach().cpu()).abs().max() / b.detach().cpu().abs().max())
            for a, b in zip(model_params, reference.parameters(), strict=True)
        )
        assert rel <= 1e-5
        steady = sorted(times.times[1:])[len(times.times[1:]) // 2]
        recovery = times.times[0] - steady
        result = {
            "device": torch.cuda.get_device_name(0),
            "cap_gib": CAP_GIB,
            "batch": BATCH,
            "final_micro_batch_size": guard.micro_batch_size,
            "retries": len(events),
            "events": [e.data for e in events],
            "first_step_s": round(times.times[0], 3),
            "steady_step_s": round(steady, 3),
            "recovery_s": round(recovery, 3),
            "recovery_budget_s": round(2 * steady + 0.5, 3),
            "fit_wall_s": round(wall, 3),
            "max_rel_diff_vs_reference": rel,
        }
        out = os.environ.get("LG_GPU_OUT")
        if out:
            Path(out, "oom_guard_gpu.json").write_text(json.dumps(result, indent=2, default=str))
        print(json.dumps(result, indent=2, default=str))
        assert recovery <= 2 * steady + 0.5 * len(events)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
