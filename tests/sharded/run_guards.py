"""A training script launched the way users launch a multi-process run, under FSDP2 (``ModelParallelStrategy`` with
``fully_shard``) or DDP, with the guards and faults on rank 1 only. Rank 0 writes ``result.json``: the final full
parameters, the events, the metrics.

    python -m tests.sharded.run_guards --strategy fsdp2 --out DIR     # Lightning re-runs the script per rank
    torchrun --nproc_per_node 2 -m tests.sharded.run_guards --strategy ddp --out DIR
    torchrun --nnodes 2 --node_rank R --nproc_per_node 1 ... -m tests.sharded.run_guards --devices 1 --nodes 2 ...
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import (
    ClassBalance,
    CompressExport,
    GradientGuard,
    GuardMixin,
    L1Penalty,
    OOMGuard,
    OverfitGuard,
    WarmupCosine,
)
from lightning_guard.testing import InjectNaN, LRSpike, SimulatedOOM

STEPS_PER_EPOCH = 8  # 256 samples, 2 ranks, 16 per rank


class ShardedMLP(GuardMixin, pl.LightningModule):
    """An MLP with LayerNorm whose Linear layers are sharded with ``fully_shard`` when the strategy has a mesh.

    Its loss is ``GuardMixin.balanced_loss`` (plain cross-entropy without a ClassBalance in the Trainer).
    """

    def __init__(self, hsdp: bool = False, shard_root: bool = True, pre: bool = False) -> None:
        super().__init__()
        self.hsdp, self.shard_root = hsdp, shard_root
        # a first layer outside every fully_shard (with the root unsharded): its backward comes after every collective
        self.pre = nn.Linear(16, 16) if pre else nn.Identity()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.head = nn.Linear(64, 4)

    def configure_model(self) -> None:
        if self.device_mesh is None:  # DDP: nothing to shard
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.head, FSDPModule):  # already sharded (Lightning calls the hook again for a validate)
            return
        mesh = self.device_mesh["data_parallel"]
        if self.hsdp:  # HSDP: a 2-D mesh, parameters replicated over its first dimension and sharded over its second
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(mesh.device_type, (mesh.size(), 1), mesh_dim_names=("replicate", "shard"))
        for block in (self.body[0], self.head):  # body[3] stays in the root's group: FSDP2 keeps it gathered after
            fully_shard(block, mesh=mesh)  # a validation (the sanity check) until the next training step
        if self.shard_root:  # else the root's own parameters (body.1, body.3) stay plain tensors, not synchronised
            fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.pre(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.balanced_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.track_classes(logits, y)  # per-class recall and balanced accuracy (torchmetrics, synced over ranks)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.0)


def data() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 16, generator=g)
    y = (x[:, :4] + 0.5 * torch.randn(320, 4, generator=g)).argmax(1)
    train, val = TensorDataset(x[:256], y[:256]), TensorDataset(x[256:], y[256:])
    return DataLoader(train, batch_size=16), DataLoader(val, batch_size=32)


class SyncDistAfterBackward(pl.Callback):
    """A collective after backward, outside the step: ``self.log(..., sync_dist=True)`` in ``on_after_backward``."""

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("after_backward", torch.ones((), device=pl_module.device), sync_dist=True)


class SecondOfWindowOOM(SimulatedOOM):
    """SimulatedOOM only in odd batches: the second batch of an ``accumulate_grad_batches=2`` window."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, idx)
        self.odd = idx % 2 == 1

    def _active(self, trainer: pl.Trainer) -> bool:
        return getattr(self, "odd", False) and super()._active(trainer)


def guards(names: list[str], bad: int = 1, root: Path | None = None) -> list[pl.Callback]:
    """The guards named, with their faults on rank ``bad`` (none with ``clean`` among the names)."""
    out: list[pl.Callback] = []
    if "wc" in names:
        out.append(WarmupCosine(warmup=2))
    if "gg" in names:
        out.append(GradientGuard(snapshot_every=2, rollback_after=2))
    if "l1" in names:
        out.append(L1Penalty(1e-3, log_every_n_steps=4))
    if "l1p" in names:
        out.append(L1Penalty(1e-3, mode="proximal", log_every_n_steps=4))
    if "l1a" in names:
        out.append(L1Penalty(1e-3, mode="adaptive_proximal", log_every_n_steps=4))
    if "cb" in names:  # logit adjustment from the class counts of the whole training set (summed over ranks)
        out.append(ClassBalance())
    if "of" in names:
        out.append(OverfitGuard(patience=2))
    if "gg" in names:  # faults on rank 1 only: a NaN loss at step 3 (skipped), NaN gradients at 9, 10 (rolled back)
        out += [InjectNaN("loss", steps=[3], ranks=[bad]), InjectNaN("grad", steps=[9, 10], ranks=[bad])]
    if (
        "oom" in names
    ):  # rank 1 runs out of memory: above 8 samples in forward at step 5, above 4 in backward at step 12
        out.append(OOMGuard())
        out += [SimulatedOOM(8, where="forward", ranks=[bad], steps=[5]), SimulatedOOM(4, "backward", [bad], [12])]
    if "oomb" in names:  # rank 1: above 8 samples in backward at step 2 (the whole batch), above 4 in forward at 6
        out.append(OOMGuard())  # (in the second batch of the window under accumulate_grad_batches=2: a replay)
        out += [SimulatedOOM(8, "backward", ranks=[bad], steps=[2]), SecondOfWindowOOM(4, "forward", [bad], [6])]
    if "oomv" in names:  # rank 1: above 16 samples in validation's forward (its batches are 32)
        out += [OOMGuard(), SimulatedOOM(16, "forward", ranks=[bad], stages=("validate",))]
    if "oomab" in names:  # rank 1: above 8 samples in the backward of the unsharded first layer (after every
        # collective of the backward), and a sync_dist log in on_after_backward, where the other rank goes next
        out += [OOMGuard(), SimulatedOOM(8, "backward", ranks=[bad], steps=[3], module="pre"), SyncDistAfterBackward()]
    if "oomt" in names:  # rank 1: above 16 samples in trainer.test's forward, after fit (its batches are 32)
        out += [OOMGuard(), SimulatedOOM(16, "forward", ranks=[bad], stages=("test",))]
    if "oomq" in names:  # OOMGuard with no fault (its steady-state cost)
        out.append(OOMGuard())
    if "oomm" in names:  # OOMGuard with no fault, each batch of 16 in micro-batches of 4 (see --micro-batch)
        out.append(OOMGuard(micro_batch_size=4))
    if "cx" in names:  # CompressExport at fit end: prune half of the weights, int8, export, verify
        compressed = str((root or Path(".")) / "compressed")
        out.append(CompressExport(compressed, prune="unstructured", prune_amounts=(0.5,), max_metric_drop=0.05))
    if "spike" in names:  # the LR x30 for the last steps: the final weights are worse than the best
        out.append(LRSpike(factor=30.0, steps=list(range(20, 24))))
    if "clean" in names:  # the guards alone: their cost on the common path (tests.sharded.collectives)
        out = [cb for cb in out if not isinstance(cb, InjectNaN | SimulatedOOM | LRSpike)]
    return out


def _compress_report(out: Path) -> dict | None:
    path = out / "compressed" / "compress_report.json"
    return json.loads(path.read_text()) if path.exists() else None


def _guard_metrics(out: Path) -> dict[str, list[float]]:
    """The values each ``guard/...`` metric took, in step order, from the CSV logger."""
    import csv

    metrics: dict[str, list[float]] = {}
    for path in sorted(out.glob("csv/*/metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key.startswith("guard/") and value not in ("", None):
                        metrics.setdefault(key, []).append(float(value))
    return metrics


class StepTimer(pl.Callback):
    """Seconds per training batch (start to end of the batch: validation left out), after the first ``skip``."""

    def __init__(self, skip: int = 4) -> None:
        self.skip, self.seconds, self.batches, self._start = skip, 0.0, 0, 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        if trainer.global_step > self.skip:
            self.seconds += time.perf_counter() - self._start
            self.batches += 1


def _procedure(args: argparse.Namespace, out: Path) -> list[pl.Callback]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers import StopAfterEpoch

    extra: list[pl.Callback] = []
    if args.checkpoint:  # every epoch's checkpoint kept (a sharded checkpoint is a directory under FSDP2)
        extra.append(ModelCheckpoint(dirpath=out / "ck", save_top_k=-1, filename="{epoch}"))
    if args.stop_after_epoch is not None:
        extra.append(StopAfterEpoch(args.stop_after_epoch))
    return extra


def full_params(module: nn.Module) -> dict[str, list[float]]:
    out = {}
    for name, p in module.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # a DTensor gathers; every rank must call it
        out[name] = full.detach().float().reshape(-1).tolist()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=["fsdp2", "hsdp", "fsdp1", "ddp"], required=True)
    ap.add_argument("--accelerator", default="cpu")  # gpu: tests/benchmarks/gpu_check.sh OUT sharded
    ap.add_argument("--fault-rank", type=int, default=1)  # 0 on one GPU
    ap.add_argument("--out", required=True)
    ap.add_argument("--precision", default="32-true")
    ap.add_argument("--guards", default="wc,gg,l1,of,cx")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--devices", type=int, default=2)  # processes per node (torchrun's --nproc_per_node)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--no-root-shard", action="store_true")  # fully_shard the blocks only, not the module
    ap.add_argument("--pre-layer", action="store_true")  # an unsharded first Linear (with --no-root-shard)
    ap.add_argument("--val-every", type=int)  # val_check_interval in batches (mid-epoch validations)
    ap.add_argument("--post-test", action="store_true")  # trainer.test after fit (on the validation data)
    ap.add_argument("--accumulate", type=int, default=1)  # accumulate_grad_batches
    ap.add_argument("--checkpoint", action="store_true")  # a ModelCheckpoint saving every epoch (reshards the model)
    ap.add_argument("--stop-after-epoch", type=int)  # interrupt the run there, as a crash would (resume tests)
    ap.add_argument("--resume")  # ckpt_path: a checkpoint of a run with the same arguments
    ap.add_argument("--post-validate", action="store_true")  # validate again after fit: the weights users get back
    ap.add_argument(
        "--count-collectives", action="store_true"
    )  # result.json: "collectives" (tests.sharded.collectives)
    args = ap.parse_args(argv)
    out = Path(args.out)
    world = args.devices * args.nodes
    strategy: Any = "ddp"
    if args.strategy in ("fsdp2", "hsdp"):
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    elif args.strategy == "fsdp1":  # Lightning's FSDPStrategy refuses the CPU: GPU only
        from lightning.pytorch.strategies import FSDPStrategy

        strategy = FSDPStrategy(auto_wrap_policy={nn.Linear})
    torch.manual_seed(0)
    model = ShardedMLP(hsdp=args.strategy == "hsdp", shard_root=not args.no_root_shard, pre=args.pre_layer)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.nodes,
        strategy=strategy,
        precision=args.precision,
        max_epochs=args.epochs,
        accumulate_grad_batches=args.accumulate,
        val_check_interval=args.val_every,
        logger=CSVLogger(out, name="csv"),
        enable_checkpointing=args.checkpoint,
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=2,  # Lightning's default: FSDP2 then starts training with the root's weights gathered
        use_distributed_sampler=True,
        callbacks=[*guards(args.guards.split(","), args.fault_rank, out), *_procedure(args, out)],
    )
    train, val = data()
    timer = StepTimer()
    trainer.callbacks.append(timer)  # type: ignore[attr-defined]
    counter = None
    if args.count_collectives:
        from tests.sharded.collectives import CollectiveCounter

        counter = CollectiveCounter()
        trainer.callbacks.insert(0, counter)  # type: ignore[attr-defined]  # first: its batch start opens the count
    trainer.fit(model, train, val, ckpt_path=args.resume)
    params = full_params(model)
    val_loss = float(trainer.callback_metrics["val_loss"])  # the last validation during fit
    post_val_loss = None
    if args.post_validate:  # FSDP2 unshards the root for the validation and reshards it at the next step: must agree
        post_val_loss = float(trainer.validate(model, val, verbose=False)[0]["val_loss"])
        again = full_params(model)
        params = {name: again[name] for name in params}
    test_loss = float(trainer.test(model, val, verbose=False)[0]["test_loss"]) if args.post_test else None
    if trainer.global_rank == 0:
        from lightning_guard import event_stream

        events = [
            {
                "guard": e.guard,
                "kind": e.kind,
                "step": e.step,
                "ranks": list(e.ranks),
                "data": json.loads(json.dumps(dict(e.data), default=str)),
            }
            for e in event_stream(trainer).events
        ]
        result = {
            "global_step": trainer.global_step,
            "params": params,
            "events": events,
            "val_loss": val_loss,
            "post_val_loss": post_val_loss,
            "test_loss": test_loss,
            "seconds_per_batch": timer.seconds / max(timer.batches, 1),
            "world_size": trainer.world_size,
            "pid": os.getpid(),
            "compress_report": _compress_report(out),
            "guard_metrics": _guard_metrics(out),
            "collectives": None if counter is None else counter.result(),
        }
        (out / "result.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():  # a gloo worker left with its group open may abort at interpreter exit
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
