"""A guard of your own: flag a straggler rank, agreed in the guards' one collective per step, reported as an event.

``StragglerGuard`` times each rank's own part of a batch (from ``on_train_batch_start`` to ``on_before_backward``:
the data and the forward pass, before DDP's gradient all-reduce makes every rank wait for the slowest), votes the
time in the step agreement that the built-in guards already hold (no collective of its own; every rank's time is
gathered in a second one only on a step whose summed time says a straggler is possible), and when the slowest
rank took more than ``factor`` times the fastest one, every rank learns it from the same numbers and rank 0 reports
one ``straggler`` event (JSONL, every logger's ``guard/straggler/straggler`` counter, W&B table, fit-end summary).

Run: ``python examples/custom_guard.py --devices 2`` (two CPU processes under ddp_spawn, rank 1 slowed every fifth
step: each of those steps is reported once, naming rank 1). See docs/extending.md.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_guard import GuardCallback, StepVotes, event_stream


class StragglerGuard(GuardCallback):
    """Report optimizer steps in which one rank's batch took ``factor`` times as long as the fastest rank's."""

    guard_name = "straggler"

    def __init__(self, factor: float = 2.0, min_seconds: float = 0.05) -> None:
        super().__init__()
        self.factor = factor
        self.min_seconds = min_seconds
        self.stragglers = 0
        self._start = 0.0
        self._forward = 0.0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)  # every hook calls super()
        self._start = time.perf_counter()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        self._forward = time.perf_counter() - self._start

    @override
    def step_vote(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> list[float]:
        return [self._forward]  # the same count of numbers on every rank

    @override
    def step_detail(self, total: tuple[float, ...]) -> bool:
        # The agreement sums the votes over the ranks (one fixed-size all-reduce). Every rank's time is needed only
        # when a straggler is possible: the slowest rank took over `min_seconds`, so the sum of the times did.
        return total[0] > self.min_seconds

    @override
    def step_verdict(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, votes: StepVotes) -> None:
        if votes.rows is None:
            return  # no rank was slow enough to matter: the rows were not gathered
        times = [row[0] for row in votes.rows]  # every rank's vote, in rank order: the same list on every rank
        slowest = max(range(len(times)), key=times.__getitem__)
        if len(times) > 1 and times[slowest] > max(self.factor * min(times), self.min_seconds):
            self.stragglers += 1  # every rank counts alike: the decision is shared
            self.emit(
                trainer,
                "straggler",
                f"rank {slowest} took {times[slowest]:.3f} s, the fastest {min(times):.3f} s",
                severity="warning",
                data={"seconds": times},
                ranks=(slowest,),
                rank_zero_only=True,  # one event for the shared decision
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"stragglers": self.stragglers}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stragglers = int(state_dict["stragglers"])


class SlowRank(pl.Callback):
    """For the demonstration: rank ``rank`` sleeps ``seconds`` at the start of every ``every``-th batch."""

    def __init__(self, rank: int = 1, seconds: float = 0.2, every: int = 5) -> None:
        self.rank, self.seconds, self.every = rank, seconds, every

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank == self.rank and trainer.global_step % self.every == self.every - 1:
            time.sleep(self.seconds)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    from _digits import Net, loaders

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="one short epoch")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (ddp_spawn when more than one)")
    args = parser.parse_args(argv)
    train, val = loaders(n_train=320 if args.fast else 1200)
    guard = StragglerGuard()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp_spawn" if args.devices > 1 else "auto",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[guard, SlowRank()],
    )
    trainer.fit(Net(), train, val)
    events = [e for e in event_stream(trainer).events if e.guard == "straggler"]
    result = {"steps": trainer.global_step, "stragglers": guard.stragglers, "events": [e.ranks for e in events]}
    print(result)
    return result


if __name__ == "__main__":
    main()
