"""One contract-matrix cell run as users launch a multi-process job: the column's strategy in a script that
``python -m`` (Lightning re-runs it per rank), ``torchrun`` or two ``torchrun --nnodes 2`` launches start. Rank 0
writes ``cell.pt``: the full weights, the validation metrics and the guard events, or the setup refusal's message.

    python -m tests.contract.run_cell --row all --strategy ddp --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_guard import GuardConfigError, event_stream
from tests.contract.matrix import COLUMNS, ROWS, Column, _loaders, _net, _trainer
from tests.contract.model import PLAIN


def _shard(model: Any) -> None:
    """FSDP2: ``fully_shard`` each Linear and the module (parameters become ``DTensor``), once."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule) or model.device_mesh is None:
        return
    mesh = model.device_mesh["data_parallel"]
    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in model.state_dict().items():
        if name.startswith("guard_"):
            continue
        full = value.full_tensor() if hasattr(value, "full_tensor") else value  # every rank takes part in a gather
        out[name] = full.detach().clone().float().cpu()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--row", required=True)
    ap.add_argument("--column", default="plain")  # its precision (the strategy comes from --strategy)
    ap.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=1)
    args = ap.parse_args(argv)
    out, row = Path(args.out), ROWS[args.row]
    col = Column("launched", precision=COLUMNS[args.column].precision)
    world = args.devices * args.nodes
    strategy: Any = "ddp"
    if args.strategy == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    model = _net(col, PLAIN)
    if args.strategy == "fsdp2":
        model.configure_model = lambda: _shard(model)  # type: ignore[method-assign]
    t = _trainer(col, out, row.make(out), strategy=strategy, devices=args.devices, num_nodes=args.nodes)
    result: dict[str, Any]
    try:
        t.fit(model, *_loaders(col))
    except GuardConfigError as refused:
        result = {"refused": str(refused), "global_step": t.global_step}
    else:
        weights = _full_state(model)
        metrics = {k: float(v) for k, v in t.callback_metrics.items() if k.startswith(("val_", "test_"))}
        events = [(e.guard, e.kind, e.step, e.severity) for e in event_stream(t).events]
        result = {"weights": weights, "metrics": metrics, "events": events, "world_size": t.world_size}
    if t.global_rank == 0:
        torch.save(result, out / "cell.pt")
    if torch.distributed.is_initialized():  # a gloo worker left with its group open may abort at interpreter exit
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
