"""Step-time overhead of gradient guarding, measured side by side in one process.

Configurations (each a fresh model and Trainer, rounds interleaved in rotated order, the median of rounds reported):

* ``bare``: Lightning, no callbacks;
* ``floor``: a minimal callback that computes one fused gradient norm and checks it is finite (one host sync) -
  the least any guard that looks at the gradients can cost;
* ``lightning_clip``: ``Trainer(gradient_clip_val=1.0)``;
* ``spike_detection``: Lightning's ``SpikeDetection`` (it only detects, then raises);
* ``guard``: ``GradientGuard()`` with its defaults (adaptive clip, loss monitor, backoff, rollback snapshots every
  100 applied steps);
* ``guard_snap10``: ``GradientGuard(snapshot_every=10)``, so the snapshot cost falls inside the timed window;
* L1 suite (``--suite l1``): ``l1_loss_term`` (the usual ``loss + lambda * sum|w|``), ``l1_subgradient`` and
  ``l1_proximal`` (``L1Penalty``), on the same parameters;
* all-guards suite (``--suite all``): ``all_guards`` = ``WarmupCosine``, ``GradientGuard``, ``L1Penalty`` and
  ``OOMGuard`` together (the guards with work on every step; OverfitGuard, ClassBalance and CompressExport act at
  validation, fit start or fit end), against ``bare``, ``floor`` and ``clip_spike`` (Lightning's own
  ``gradient_clip_val=1.0`` with its ``SpikeDetection``);
* DDP suite (``--suite ddp``, CPU): ``ddp_bare`` (plain DDP under ``ddp_spawn``, 2 processes, gloo, one intra-op
  thread each), ``ddp_floor`` (the floor plus one all-gather of three floats per step: the least a guard that agrees
  across ranks costs) and ``ddp_all_guards`` (the same four guards), on the same MLP; rank 0's time is reported;
* ``bare_fused`` and ``guard_fused`` (CUDA only): the same with a fused AdamW, which Lightning's clipping refuses
  under AMP (compare ``guard_fused`` with ``bare_fused``).

Per configuration the time of ``steps`` optimizer steps after ``warmup`` steps is taken between two device
synchronisations, so each configuration's own host syncs are part of what is measured.

Run on CPU through ``make bench``; on a GPU: ``python -m tests.benchmarks.overhead --device cuda --out DIR``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_guard import GradientGuard, L1Penalty, OOMGuard, WarmupCosine
from lightning_guard.functional import global_grad_norm
from tests.benchmarks.report import quiet_trainer, save


def _l1_term(module: torch.nn.Module) -> torch.Tensor | float:
    """The usual idiom, loss + lambda * sum|w| over the same parameters L1Penalty selects (>= 2-d weights)."""
    lam = getattr(module, "l1", 0.0)
    if not lam:
        return 0.0
    return lam * sum(p.abs().sum() for p in module.parameters() if p.dim() >= 2)


class Floor(Callback):
    """One fused fp32 norm of all gradients and a finiteness check: the cheapest gradient guard possible."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not torch.isfinite(global_grad_norm(grads)).item():
            raise RuntimeError("non-finite gradients")


class StepTimer(Callback):
    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.elapsed = warmup, steps, math.nan
        self._t0 = 0.0

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self._sync(pl_module)
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.warmup + self.steps - 1:
            self._sync(pl_module)
            self.elapsed = time.perf_counter() - self._t0


class _Random(Dataset):
    def __init__(self, n: int, make: Any) -> None:
        self.items = [make(i) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class MLP(pl.LightningModule):
    """About 300k parameters (64-512-512-10)."""

    def __init__(self, fused: bool = False, l1: float = 0.0) -> None:
        super().__init__()
        self.fused, self.l1 = fused, l1
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 10),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y) + _l1_term(self)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=self.fused or None)


class LM(pl.LightningModule):
    """A GPT-style decoder: d=768, 12 layers, 12 heads, vocab 32000, untied head - about 134M parameters."""

    def __init__(
        self, fused: bool = False, d: int = 768, layers: int = 12, vocab: int = 32000, seq: int = 1024, l1: float = 0.0
    ) -> None:
        super().__init__()
        self.fused, self.l1 = fused, l1
        self.emb = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Parameter(torch.zeros(seq, d))
        layer = torch.nn.TransformerEncoderLayer(
            d, d // 64, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def training_step(self, batch, batch_idx):
        tokens = batch
        h = self.emb(tokens[:, :-1]) + self.pos[: tokens.shape[1] - 1]
        n = h.shape[1]
        h = self.blocks(h, mask=self.mask[:n, :n], is_causal=True)
        logits = self.head(self.norm(h))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()) + _l1_term(self)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-4, fused=self.fused or None)


CONFIGS = ["bare", "floor", "lightning_clip", "spike_detection", "guard", "guard_snap10", "bare_fused", "guard_fused"]
L1_CONFIGS = ["bare", "l1_loss_term", "l1_subgradient", "l1_proximal"]
ALL_CONFIGS = ["bare", "floor", "clip_spike", "all_guards"]
DDP_CONFIGS = ["ddp_bare", "ddp_floor", "ddp_all_guards"]


def _step_path_guards() -> list[Callback]:
    """Every guard with work on the step path, at their defaults."""
    return [WarmupCosine(warmup=0.05), GradientGuard(), L1Penalty(1e-6), OOMGuard()]


class _FileTimer(StepTimer):
    """A StepTimer whose rank 0 writes its seconds per step to a file (ddp_spawn workers are other processes)."""

    def __init__(self, warmup: int, steps: int, path: str) -> None:
        super().__init__(warmup, steps)
        self.path = path

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            with open(self.path, "w") as f:
                f.write(str(self.elapsed / self.steps))


class _AgreeingFloor(Floor):
    """The floor plus the least a guard that agrees across ranks costs: one all-gather of three floats per step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = global_grad_norm(grads)
        row = torch.stack([torch.ones(()), norm, torch.zeros(())])
        if not all(math.isfinite(v) for v in trainer.strategy.all_gather(row).reshape(-1).tolist()):
            raise RuntimeError("non-finite gradients")


class _OneThread(Callback):
    """One intra-op thread per worker: two workers on two cores must not fight over four threads (both configs)."""

    def setup(self, trainer, pl_module, stage):
        torch.set_num_threads(1)


def _run_ddp(config: str, warmup: int, steps: int) -> float:
    from tests.helpers import ReleaseProcessGroup

    fd, path = tempfile.mkstemp(suffix=".txt")
    os.close(fd)
    callbacks: list[Callback] = [_FileTimer(warmup, steps, path), ReleaseProcessGroup(), _OneThread()]
    if config == "ddp_all_guards":
        callbacks += _step_path_guards()
    elif config == "ddp_floor":
        callbacks.append(_AgreeingFloor())
    n = warmup + steps
    g = torch.Generator().manual_seed(0)
    # two tensors, not one per sample: ddp_spawn sends every tensor through its own shared-memory file
    data = TensorDataset(torch.randn(2 * n * 256, 64, generator=g), torch.randint(0, 10, (2 * n * 256,), generator=g))
    trainer = quiet_trainer(callbacks, devices=2, strategy="ddp_spawn", max_steps=n)
    trainer.fit(MLP(), DataLoader(data, batch_size=256))
    try:
        with open(path) as f:
            return float(f.read())
    finally:
        os.unlink(path)


def _run(config: str, device: str, warmup: int, steps: int, precision: str) -> float:
    from lightning.pytorch.callbacks import SpikeDetection

    timer = StepTimer(warmup, steps)
    callbacks: list[Callback] = [timer]
    kwargs: dict[str, Any] = {}
    fused = config in ("bare_fused", "guard_fused")
    if config == "floor":
        callbacks.append(Floor())
    elif config == "lightning_clip":
        kwargs["gradient_clip_val"] = 1.0
    elif config == "spike_detection":
        callbacks.append(SpikeDetection())
    elif config == "clip_spike":  # what Lightning offers itself: clipping and its spike detector together
        kwargs["gradient_clip_val"] = 1.0
        callbacks.append(SpikeDetection())
    elif config in ("guard", "guard_fused"):
        callbacks.append(GradientGuard())
    elif config == "guard_snap10":
        callbacks.append(GradientGuard(snapshot_every=10))
    elif config == "all_guards":
        callbacks += _step_path_guards()
    elif config == "l1_subgradient":
        callbacks.append(L1Penalty(1e-6, mode="subgradient"))
    elif config == "l1_proximal":
        callbacks.append(L1Penalty(1e-6, mode="proximal"))
    l1 = 1e-6 if config == "l1_loss_term" else 0.0
    n = warmup + steps
    if device == "cuda":
        g = torch.Generator().manual_seed(0)
        data = _Random(n * 16, lambda i: torch.randint(0, 32000, (1025,), generator=g))
        loader = DataLoader(data, batch_size=16)
        with torch.device("cuda"):
            model: pl.LightningModule = LM(fused=fused, l1=l1)
    else:
        g = torch.Generator().manual_seed(0)
        data = _Random(n * 256, lambda i: (torch.randn(64, generator=g), torch.randint(0, 10, (), generator=g)))
        loader = DataLoader(data, batch_size=256)
        model = MLP(fused=fused, l1=l1)
    # quiet_trainer's temporary root folder takes the guards' event log, not the working tree
    trainer = quiet_trainer(callbacks, accelerator=device, devices=1, precision=precision, max_steps=n, **kwargs)
    trainer.fit(model, loader)
    return timer.elapsed / steps


def measure(
    device: str = "cpu",
    rounds: int = 5,
    warmup: int = 20,
    steps: int = 200,
    precision: str = "32-true",
    configs: list[str] | None = None,
) -> dict[str, Any]:
    """Interleaved rounds; returns per-config median step time (ms) and ratios to bare and floor."""
    configs = configs or [c for c in CONFIGS if device == "cuda" or "fused" not in c]
    times: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(rounds):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for c in order:
            run = _run_ddp(c, warmup, steps) if c.startswith("ddp_") else _run(c, device, warmup, steps, precision)
            times[c].append(run * 1000)
    med = {c: statistics.median(v) for c, v in times.items()}
    return {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "precision": precision,
        "rounds": rounds,
        "steps": steps,
        "ms_per_step": med,
        "all_ms": times,
        "vs_bare_pct": {c: 100 * (med[c] / med["ddp_bare" if c.startswith("ddp_") else "bare"] - 1) for c in configs},
        "vs_floor_pct": {
            c: 100 * (med[c] / med["ddp_floor" if c.startswith("ddp_") else "floor"] - 1)
            for c in configs
            if ("ddp_floor" if c.startswith("ddp_") else "floor") in med
        },
    }


def to_markdown(result: dict[str, Any]) -> str:
    floors = result.get("vs_floor_pct") or {}
    lines = [
        f"device: {result['device']}; torch {result['torch']}, Lightning {result['lightning']}, "
        f"{result['precision']}, median of {result['rounds']} interleaved rounds of {result['steps']} steps",
        "",
        "| configuration | ms/step | vs bare |" + (" vs floor |" if floors else ""),
        "|---|---|---|" + ("---|" if floors else ""),
    ]
    for c, ms in result["ms_per_step"].items():
        row = f"| {c} | {ms:.3f} | {result['vs_bare_pct'][c]:+.2f}% |"
        if floors:
            row += f" {floors[c]:+.2f}% |" if c in floors else " - |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--suite", choices=["gradient_guard", "l1", "all", "ddp"], default="gradient_guard")
    args = parser.parse_args(argv)
    configs = {"l1": L1_CONFIGS, "all": ALL_CONFIGS, "ddp": DDP_CONFIGS}.get(args.suite)
    result = measure(args.device, args.rounds, args.warmup, args.steps, args.precision, configs)
    return save(args.out, f"{args.suite}_overhead_{args.device}", result, to_markdown(result))


if __name__ == "__main__":
    main()
