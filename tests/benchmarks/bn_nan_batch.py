"""Do no harm under a fault: a NaN batch on the BatchNorm conv net, skipped by GradientGuard.

The conv+BatchNorm workload of :mod:`tests.workloads` (size ``bench``) trains from the same seed four ways, and the
final weights' validation loss and accuracy are compared:

* ``clean``: no fault, no guard (the target);
* ``nan_unguarded``: one sample of the batch at step ``NAN_STEP`` holds a NaN (``InjectNaN("batch")``), no guard;
* ``skip_without_buffers``: ``GradientGuard()`` skips that step but its forward's BatchNorm statistics stay as the
  forward left them (main's behaviour before the second do-no-harm round, reproduced by disabling the restore);
* ``skip``: ``GradientGuard()`` as shipped: the skip also puts back the buffers the forward wrote.

``python -m tests.benchmarks.bn_nan_batch`` or ``make bench``; one CPU thread, as the do-no-harm benchmark.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any
from unittest import mock

import torch

from lightning_guard import GradientGuard
from lightning_guard.callbacks._snapshot import StepBuffers
from lightning_guard.testing import InjectNaN
from tests.benchmarks.report import git_state, machine, one_thread, quiet_trainer, save
from tests.workloads import WORKLOADS

NAN_STEP = 15
SEEDS = (0, 1, 2)
CONFIGS = ("clean", "nan_unguarded", "skip_without_buffers", "skip")


def run(config: str, seed: int, size: str = "bench") -> dict[str, Any]:
    """Train one configuration; the final weights' ``val_loss`` and ``val_acc`` and whether every buffer is finite."""
    model, train, val, kwargs = WORKLOADS["conv_bn"](seed, size)
    callbacks: list[Any] = [] if config == "clean" else [InjectNaN("batch", steps=[NAN_STEP])]
    if config.startswith("skip"):
        callbacks.insert(0, GradientGuard())
    main_like = contextlib.ExitStack()  # the skip as it was: buffers neither put back nor judged
    if config == "skip_without_buffers":
        main_like.enter_context(mock.patch.object(StepBuffers, "restore", return_value=None))
        main_like.enter_context(mock.patch.object(StepBuffers, "newly_nonfinite", return_value=torch.zeros(())))
    with main_like:
        trainer = quiet_trainer(callbacks, **kwargs)
        trainer.fit(model, train, val)
    (final,) = trainer.validate(model, val, verbose=False)
    finite = all(bool(b.float().isfinite().all()) for b in model.buffers())
    return {
        "config": config,
        "seed": seed,
        "val_loss": float(final["val_loss"]),
        "val_acc": float(final["val_acc"]),
        "buffers_finite": finite,
    }


def to_markdown(result: dict[str, Any]) -> str:
    """The table of the docs: one row per configuration, each seed's accuracy and loss."""
    lines = [
        f"BatchNorm conv net on digits (`conv_bn`, size bench), NaN in one sample of the batch at step {NAN_STEP}; "
        f"{result['machine']}; {result['git']}.",
        "",
        "| run | val accuracy per seed | val loss per seed | buffers finite |",
        "|---|---|---|---|",
    ]
    for config in CONFIGS:
        rows = [r for r in result["rows"] if r["config"] == config]
        acc = ", ".join(f"{r['val_acc']:.3f}" for r in rows)
        loss = ", ".join("nan" if math.isnan(r["val_loss"]) else f"{r['val_loss']:.4f}" for r in rows)
        lines.append(f"| `{config}` | {acc} | {loss} | {all(r['buffers_finite'] for r in rows)} |")
    return "\n".join(lines) + "\n"


def main(out: str = "docs/benchmarks") -> dict[str, Any]:
    """Run every configuration and seed, write ``bn_nan_batch.json`` / ``.md`` under ``out``."""
    with one_thread():
        rows = [run(config, seed) for seed in SEEDS for config in CONFIGS]
    result = {"nan_step": NAN_STEP, "seeds": list(SEEDS), "rows": rows, "git": git_state(), "machine": machine()}
    return save(out, "bn_nan_batch", result, to_markdown(result))


if __name__ == "__main__":
    main()
