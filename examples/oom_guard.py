"""OOMGuard: a batch of 256 that "does not fit" (simulated out-of-memory above 48 samples), with and without the guard.

Without it the first step dies; with it the same batches are re-run as micro-batches of 32 and training matches the
run that never ran out of memory (same effective batch, same optimizer steps). The out-of-memory is SIMULATED by
``lightning_guard.testing.SimulatedOOM`` (a real one needs a GPU; see docs/guards/oom-guard.md). Measured on CPU (20
epochs): reference 95.31% after 100 steps; no guard: dies at step 0; OOMGuard: 256 -> 128 -> 64 -> 32 at the first
step, then 95.31% after 100 steps, as the reference. Run:
``python examples/oom_guard.py`` (``--fast`` for a smoke run).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from _digits import Net, loaders, trainer

from lightning_guard import OOMGuard, event_stream
from lightning_guard.testing import SimulatedOOM


def run(mode: str, epochs: int) -> dict[str, object]:
    pl.seed_everything(0, verbose=False)
    train, val = loaders(batch_size=256)
    callbacks: list[pl.Callback] = [] if mode == "reference" else [SimulatedOOM(max_batch_size=48)]
    guard = OOMGuard()
    if mode == "guard":
        callbacks.append(guard)
    t = trainer(callbacks, epochs, f"oom_{mode}")
    model = Net()
    try:
        t.fit(model, train, val)
    except torch.OutOfMemoryError as err:
        return {"died": str(err).split(":")[0], "steps": t.global_step}
    retries = [e.message for e in event_stream(t).events if e.kind == "oom_retry"]
    return {
        "val_acc": round(float(t.callback_metrics["val_acc"]), 4),
        "steps": t.global_step,
        "micro_batch_size": guard.micro_batch_size if mode == "guard" else None,
        "retries": retries,
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, object]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args(argv)
    epochs = 2 if args.fast else 20
    result = {mode: run(mode, epochs) for mode in ("reference", "no_guard", "guard")}
    for mode, r in result.items():
        print(f"{mode:>9}: {r}")
    return result


if __name__ == "__main__":
    main()
