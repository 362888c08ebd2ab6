"""Every guard at once under DDP: ``ddp_spawn`` with 2 CPU processes and bf16-mixed, faults injected on one rank each.

Rank 1 gets a NaN batch, rank 0 runs out of memory (SIMULATED) once, every rank gets an LR x100 step; the guards skip,
re-run, restore and finally compress and export the model. Prints the summary table of what the guards did (rank 0).
Run: ``python examples/all_guards_ddp.py`` (``--fast`` for a smoke run). On GPUs use ``strategy="ddp"``,
``accelerator="gpu"``, ``devices=N`` with the same callbacks.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
from _digits import Net, loaders, trainer

from lightning_guard import (
    ClassBalance,
    CompressExport,
    GradientGuard,
    L1Penalty,
    OOMGuard,
    OverfitGuard,
    WarmupCosine,
    event_stream,
)
from lightning_guard.testing import InjectNaN, LRSpike, SimulatedOOM

OUT = Path("runs/all_guards")


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast", action="store_true")
    args = parser.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    train, val = loaders(batch_size=64)
    steps = len(train) // 2  # per rank and epoch
    callbacks = [
        WarmupCosine(warmup=0.1),
        GradientGuard(),
        L1Penalty(1e-5),
        OverfitGuard(monitor="val_loss", patience=5),
        ClassBalance(),
        OOMGuard(),
        CompressExport(dirpath=str(OUT / "compressed"), monitor="val_acc", max_metric_drop=0.02),
        InjectNaN("batch", steps=[steps + 2], ranks=[1]),
        SimulatedOOM(max_batch_size=32, where="backward", steps=[steps + 4], ranks=[0]),
        LRSpike(factor=100.0, steps=[2 * steps + 3]),
    ]
    t = trainer(
        callbacks, 3 if args.fast else 15, "all_guards", devices=2, strategy="ddp_spawn", precision="bf16-mixed"
    )
    t.fit(Net(), train, val)
    counts: dict[str, int] = {}
    # the run's own file (without a logger: runs/all_guards/guard_logs/<start>-<run_id>/guard_events.jsonl)
    for line in event_stream(t).jsonl_path.read_text().splitlines():
        event = json.loads(line)
        key = f"{event['guard']}/{event['kind']}"
        counts[key] = counts.get(key, 0) + 1
    print(json.dumps(counts, indent=2))
    return counts


if __name__ == "__main__":
    main()
