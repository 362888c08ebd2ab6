"""The contract matrix: every guard (and all guards together) x the Lightning configurations users really run.

A cell has exactly one of two outcomes:

* **equal**: the guarded run ends with the same weights and validation metrics as a reference run - the same run
  without the guard, doing by hand what the guard does by design on a clean run (a LambdaLR over applied steps for
  WarmupCosine, ``loss + strength * sum|w|`` for L1Penalty, the logit-adjusted loss for ClassBalance, a best-weight
  restore for OverfitGuard); for resume and reuse, the uninterrupted run and fresh instances;
* **refused**: ``GuardConfigError`` before the first optimizer step, with a message naming the setting.

A new guard is one :class:`Row`, a new configuration one :class:`Column`; what is refused is in :data:`REFUSED`, and
cells failing for a defect of another open issue are in :data:`KNOWN` (strict xfails: they turn red when fixed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, DistributedSampler, Sampler

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
from tests.contract.model import PLAIN, ContractNet, NoBatchIdxNet, Reference, RestoreBest
from tests.helpers import StopAfterEpoch, digits_loaders, precision_kwargs, trainer

N_TRAIN, N_VAL, BATCH, EPOCHS = 128, 64, 16, 2  # 8 steps an epoch


# ---------------------------------------------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """A guard configuration: ``make(out_dir)`` builds fresh instances; ``reference`` is what it does by design."""

    name: str
    make: Callable[[Path], list[Callback]]
    reference: Reference = PLAIN
    columns: frozenset[str] | None = None  # None: every column


def _compress(out: Path) -> CompressExport:
    return CompressExport(dirpath=str(out / "compressed"))


def _all(out: Path) -> list[Callback]:
    return [
        WarmupCosine(),
        GradientGuard(),
        L1Penalty(),
        OverfitGuard(),
        ClassBalance(),
        OOMGuard(),
        _compress(out),
    ]


_EXPORT_COLUMNS = (
    "plain",
    "no_batch_idx",
    "two_optimizers_10x",
    "bf16_mixed",
    "16_mixed",
    "batchnorm",
    "no_validation",
    "resume",
    "reused_instances",
    "validate_test_predict",
)

ROWS = {
    r.name: r
    for r in (
        Row("warmup_cosine", lambda out: [WarmupCosine()], Reference(schedule=0.05)),
        Row("gradient_guard", lambda out: [GradientGuard()]),
        # its defaults judge spikes only after 25 steps: this row is past its warm-up within the matrix's 16 steps
        Row("gradient_guard_warm", lambda out: [GradientGuard(warmup_steps=4)]),
        # listed before the schedule it must compose with: the order of the callbacks must not matter
        Row(
            "gradient_guard_then_schedule",
            lambda out: [GradientGuard(warmup_steps=4), WarmupCosine()],
            Reference(schedule=0.05),
        ),
        Row("l1_penalty", lambda out: [L1Penalty()], Reference(l1=1e-5)),
        Row("overfit_guard", lambda out: [OverfitGuard()], Reference(restore_best=True)),
        Row("class_balance", lambda out: [ClassBalance()], Reference(prior=True)),
        Row("oom_guard", lambda out: [OOMGuard()]),
        # it acts at fit end on the trained module (seconds per cell): the columns that change the module, the
        # precision, the evaluation loops or the procedure; the training-code columns are covered by "all"
        Row("compress_export", lambda out: [_compress(out)], columns=frozenset(_EXPORT_COLUMNS)),
        Row("all", _all, Reference(schedule=0.05, l1=1e-5, prior=True, restore_best=True)),
    )
}


# ------------------------------------------------------------------------------------------------------- columns
@dataclass(frozen=True)
class Column:
    """A Lightning configuration: module switches, Trainer arguments and the procedure that runs it."""

    name: str
    net: dict[str, Any] = field(default_factory=dict)
    net_cls: type[ContractNet] = ContractNet
    trainer: dict[str, Any] = field(default_factory=dict)
    precision: str = "32-true"
    procedure: str = "fit"  # fit | resume | refit | after_fit | ddp | one of LAUNCHED
    validation: bool = True


COLUMNS = {
    c.name: c
    for c in (
        Column("plain"),
        Column("no_batch_idx", net_cls=NoBatchIdxNet),
        Column("step_returns_none", net={"none_every": 3}),
        Column("sync_dist_and_metric", net={"sync_dist": True}),
        Column("accumulate_4", trainer={"accumulate_grad_batches": 4}),
        Column("manual_optimization", net={"manual": True}),
        Column("two_optimizers_10x", net={"two_optimizers": True}),
        Column("user_scheduler_step", net={"scheduler": "step"}),
        Column("user_scheduler_epoch", net={"scheduler": "epoch"}),
        Column("gradient_clip_val", trainer={"gradient_clip_val": 0.5}),
        Column("bf16_mixed", precision="bf16-mixed"),
        Column("16_mixed", precision="16-mixed"),
        Column("16_mixed_fused", net={"fused": True}, precision="16-mixed"),
        Column("batchnorm", net={"batchnorm": True}),
        Column("val_check_interval_0.5", trainer={"val_check_interval": 0.5}),
        Column("check_val_every_2", trainer={"check_val_every_n_epoch": 2}),
        Column("no_validation", validation=False),
        Column("resume", procedure="resume"),
        Column("reused_instances", procedure="refit"),
        Column("validate_test_predict", procedure="after_fit"),
        Column("ddp_spawn", procedure="ddp"),
        # launched as users launch them (a subprocess per run, tests/contract/run_cell.py, bounded by a timeout)
        Column("ddp_subprocess", procedure="ddp_subprocess"),
        Column("torchrun", procedure="torchrun"),
        Column("two_nodes", procedure="two_nodes"),
        Column("fsdp2", procedure="fsdp2"),
        Column("fsdp2_bf16_mixed", procedure="fsdp2", precision="bf16-mixed"),
    )
}

#: two bf16-mixed ranks vs one process with both ranks' batches: bf16 products of 16-row and 32-row batches round
#: differently; the bound keeps a wide margin over the differences measured (docs/contract.md)
BF16_MULTI_RANK_TOL = {"rtol": 0.0, "atol": 1e-2}
#: the procedures that launch the cell in subprocesses (2 ranks; the same reference as ``ddp_spawn``)
LAUNCHED = ("ddp_subprocess", "torchrun", "two_nodes", "fsdp2")
#: two ranks: the reference is one process running both ranks' batches as one
MULTI_RANK = ("ddp", *LAUNCHED)

#: cells refused at set-up: (row, column) -> a regex of the GuardConfigError message
REFUSED: dict[tuple[str, str], str] = {}
for _row in ("warmup_cosine", "all"):
    for _col in ("user_scheduler_step", "user_scheduler_epoch"):
        REFUSED[(_row, _col)] = r"also returned the LR scheduler StepLR.*remove one of the two"
for _row in ("oom_guard", "all"):
    REFUSED[(_row, "manual_optimization")] = r"needs automatic optimization"
    REFUSED[(_row, "two_optimizers_10x")] = r"needs automatic optimization"
for _row in ("gradient_guard", "all"):
    REFUSED[(_row, "gradient_clip_val")] = r"also has gradient_clip_val=0.5.*remove `gradient_clip_val`"

for _col in ("gradient_clip_val",):
    REFUSED[("gradient_guard_warm", _col)] = REFUSED[("gradient_guard", _col)]
for _col in ("gradient_clip_val", "user_scheduler_step", "user_scheduler_epoch"):
    REFUSED[("gradient_guard_then_schedule", _col)] = REFUSED[("all", _col)]

#: cells that fail for a defect named in another open issue: (row, column) -> reason (strict xfail)
KNOWN: dict[tuple[str, str], str] = {}
for _row in ("compress_export", "all"):
    REFUSED[(_row, "no_validation")] = r"CompressExport needs validation data.*pass `eval_fn` and `example_input`"

#: the rows worth a multi-process cell (about 10 s each): all guards together covers every guard
DDP_ROWS = ("all",)


def cells() -> Iterator[tuple[str, str]]:
    """Every (row, column) pair of the matrix, in order."""
    for col in COLUMNS.values():
        for name, row in ROWS.items():
            if col.procedure in MULTI_RANK and name not in DDP_ROWS:
                continue
            if row.columns is not None and col.name not in row.columns:
                continue
            yield name, col.name


# ---------------------------------------------------------------------------------------------------------- runs
@dataclass
class Result:
    """What a run ends with: weights and buffers (no guard-owned buffers), metrics and the trainer."""

    weights: dict[str, torch.Tensor]
    metrics: dict[str, float]
    trainer: pl.Trainer
    module: ContractNet
    extra: dict[str, Any] = field(default_factory=dict)


def _loaders(col: Column, batch_size: int = BATCH) -> tuple[Any, Any]:
    train, val = digits_loaders(n_train=N_TRAIN, n_val=N_VAL, batch_size=batch_size)
    return train, (val if col.validation else None)


def train_labels() -> torch.Tensor:
    """The training labels in the order the loaders use (for the reference's prior)."""
    train, _ = digits_loaders(n_train=N_TRAIN, n_val=N_VAL, batch_size=BATCH)
    return train.dataset.tensors[1]  # type: ignore[attr-defined]


def _net(col: Column, reference: Reference) -> ContractNet:
    torch.manual_seed(0)
    return col.net_cls(**col.net, reference=reference, train_labels=train_labels())


def _trainer(col: Column, root: Path, callbacks: list[Callback], **extra: Any) -> pl.Trainer:
    kwargs: dict[str, Any] = {"max_epochs": EPOCHS, **precision_kwargs(col.precision), **col.trainer, **extra}
    if not col.validation:
        kwargs["limit_val_batches"] = 0
    return trainer(root, callbacks, **kwargs)


def _result(t: pl.Trainer, model: ContractNet, **extra: Any) -> Result:
    weights = {k: v.detach().clone().float() for k, v in model.state_dict().items() if not k.startswith("guard_")}
    metrics = {k: float(v) for k, v in t.callback_metrics.items() if k.startswith(("val_", "test_"))}
    return Result(weights, metrics, t, model, extra)


def fit(col: Column, root: Path, callbacks: list[Callback], reference: Reference = PLAIN, **extra: Any) -> Result:
    """One ordinary fit of the column's configuration."""
    model = _net(col, reference)
    if reference.restore_best:
        callbacks = [*callbacks, RestoreBest()]
    t = _trainer(col, root, callbacks, **extra)
    t.fit(model, *_loaders(col))
    return _result(t, model)


def run_guarded(row: Row, col: Column, root: Path) -> Result:
    """The guarded side of a cell, by the column's procedure."""
    if col.procedure == "resume":
        ck = {"enable_checkpointing": True}
        part = root / "part"
        fit(col, part, [*row.make(part), ModelCheckpoint(dirpath=part / "ck", save_top_k=-1), StopAfterEpoch(0)], **ck)
        (ckpt,) = (part / "ck").glob("*.ckpt")
        resumed = root / "resumed"
        model = _net(col, PLAIN)
        t = _trainer(col, resumed, [*row.make(resumed), ModelCheckpoint(dirpath=resumed / "ck", save_top_k=-1)], **ck)
        t.fit(model, *_loaders(col), ckpt_path=str(ckpt))
        return _result(t, model)
    if col.procedure == "refit":
        callbacks = row.make(root / "first")
        torch.manual_seed(1)
        first = col.net_cls(**col.net, train_labels=train_labels())
        first.a[0].weight.data.mul_(3.0)  # another model, so that anything left over from fit 1 shows
        t = _trainer(col, root / "first", callbacks)
        t.fit(first, *_loaders(col))
        return fit(col, root / "second", callbacks)
    if col.procedure == "after_fit":
        return _with_after_fit(fit(col, root, row.make(root)), col)
    if col.procedure == "ddp":
        return fit(col, root, row.make(root), strategy="ddp_spawn", devices=2)
    if col.procedure in LAUNCHED:
        return _launched(row, col, root)
    return fit(col, root, row.make(root))


def _launched(row: Row, col: Column, root: Path) -> Result:
    """The cell run by ``tests/contract/run_cell.py`` in subprocesses; a setup refusal is raised here again."""
    from lightning_guard import GuardConfigError
    from tests.sharded.launch import launch, torchrun

    script, args = "tests.contract.run_cell", ("--row", row.name, "--column", col.name)
    if col.procedure == "torchrun":
        got = torchrun(root, *args, script=script)
    elif col.procedure == "two_nodes":
        got = torchrun(root, *args, nodes=2, script=script)
    else:
        got = launch("fsdp2" if col.procedure == "fsdp2" else "ddp", root, *args, script=script)
    if "refused" in got:
        assert got["global_step"] == 0, "refused only after training had started"
        raise GuardConfigError(got["refused"])
    assert got["world_size"] == 2
    return Result(got["weights"], got["metrics"], None, None, {"events": got["events"]})  # type: ignore[arg-type]


class TwoRankOrder(Sampler[list[int]]):
    """One process's batches = the union of what Lightning's DistributedSampler (shuffled, seed 0) gives 2 ranks."""

    def __init__(self, n: int, per_rank: int) -> None:
        self.n, self.per_rank, self.epoch = n, per_rank, 0

    def __iter__(self) -> Iterator[list[int]]:  # one pass per epoch, as Lightning's set_epoch numbers them
        rank_orders = []
        self.epoch += 1
        for r in (0, 1):
            s = DistributedSampler(range(self.n), num_replicas=2, rank=r, shuffle=True, seed=0)
            s.set_epoch(self.epoch - 1)
            rank_orders.append(list(s))
        for k in range(0, len(rank_orders[0]), self.per_rank):
            yield [i for ranked in rank_orders for i in ranked[k : k + self.per_rank]]

    def __len__(self) -> int:
        return -(-self.n // (2 * self.per_rank))


def run_reference(row: Row, col: Column, root: Path) -> Result:
    """The reference side of a cell."""
    if col.procedure == "resume":  # the uninterrupted guarded run
        return fit(
            col, root, [*row.make(root), ModelCheckpoint(dirpath=root / "ck", save_top_k=-1)], enable_checkpointing=True
        )
    if col.procedure == "refit":  # fresh instances
        return fit(col, root, row.make(root))
    if col.procedure in MULTI_RANK:  # one process, one batch of 2 x 16 = the same samples as the two ranks' batches
        model = _net(col, row.reference)
        callbacks: list[Callback] = [RestoreBest()] if row.reference.restore_best else []
        t = _trainer(col, root, callbacks)
        train, val = _loaders(col, batch_size=2 * BATCH)
        train = DataLoader(train.dataset, batch_sampler=TwoRankOrder(len(train.dataset), BATCH))
        t.fit(model, train, val)
        return _result(t, model)
    key = (col.name, row.reference)
    if key not in _REFERENCES:  # rows with the same reference share its run
        result = fit(col, root, [], row.reference)
        _REFERENCES[key] = _with_after_fit(result, col) if col.procedure == "after_fit" else result
    return _REFERENCES[key]


_REFERENCES: dict[tuple[str, Reference], Result] = {}


def _with_after_fit(result: Result, col: Column) -> Result:
    t, model = result.trainer, result.module
    _, val = _loaders(col)
    result.extra["validate"] = t.validate(model, val, verbose=False)
    result.extra["test"] = t.test(model, val, verbose=False)
    result.extra["predict"] = torch.cat(t.predict(model, val))  # type: ignore[arg-type]
    return result


def check_equal(guarded: Result, reference: Result, col: Column) -> None:
    """Same weights, buffers and validation metrics (and after-fit results) within float tolerance."""
    assert guarded.weights.keys() == reference.weights.keys()
    tol = {"rtol": 2e-5, "atol": 2e-6} if col.procedure in MULTI_RANK else {"rtol": 1e-5, "atol": 1e-6}
    if col.procedure in MULTI_RANK and col.precision != "32-true":  # bf16 matmuls of 2 x 16 rows vs 32 rows
        tol = BF16_MULTI_RANK_TOL
    for name in reference.weights:
        torch.testing.assert_close(
            guarded.weights[name], reference.weights[name], msg=lambda m, n=name: f"{n}: {m}", **tol
        )
    assert guarded.metrics.keys() == reference.metrics.keys()
    metric_tol = tol["atol"] if tol is BF16_MULTI_RANK_TOL else 1e-5
    for name, value in reference.metrics.items():
        diff = abs(guarded.metrics[name] - value)
        assert diff <= metric_tol * max(1.0, abs(value)), (name, guarded.metrics[name], value)
    for key in ("validate", "test"):
        if key in reference.extra:
            (got,), (want,) = guarded.extra[key], reference.extra[key]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6), key
    if "predict" in reference.extra:
        assert torch.equal(guarded.extra["predict"], reference.extra["predict"])


def warning_events(t: pl.Trainer) -> list[tuple[str, str, int]]:
    """Guard events of warning or error severity (a clean run must have none)."""
    return [(e.guard, e.kind, e.step) for e in event_stream(t).events if e.severity != "info"]


@contextlib.contextmanager
def no_optimizer_step() -> Iterator[list[int]]:
    """Count optimizer steps taken inside the block (a refusal must come before the first)."""
    steps: list[int] = []
    handle = register_optimizer_step_post_hook(lambda *a: steps.append(1))
    try:
        yield steps
    finally:
        handle.remove()
