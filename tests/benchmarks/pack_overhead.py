"""The whole pack's step cost against its floor, with confidence intervals that can see 3% (issue 26).

Every step-path guard together (``WarmupCosine``, ``GradientGuard``, ``L1Penalty``, ``OOMGuard``) is timed against:

* ``bare``: Lightning alone;
* ``floor``: one fused gradient norm and a finiteness check with one host read (the least a gradient guard costs);
  under DDP the **agreeing floor**: the same plus one all-reduce of three floats (the least a guard that agrees
  across ranks costs);
* ``floor_l1``: the floor plus the least L1Penalty's own job costs (``1e-6 * sign(w)`` added to the gradients of the
  same weights, fused, into preallocated signs): arithmetic over every weight, which no implementation of an L1
  penalty avoids (a ``loss + lambda * sum|w|`` term costs more);
* ``clip_spike``: Lightning's own ``gradient_clip_val=1.0`` with its ``SpikeDetection`` callback (one process).

**Design.** Configurations are interleaved in many short rounds (rotated order, a fresh Trainer each, the same data);
each round's step time is the mean over ``steps`` steps after ``warmup``, taken between two timestamps at batch
starts. The figure is the median over rounds of the *paired* ratio (guards / floor in the same round: a slow spell of
the machine hits both), with a 95% bootstrap interval of that median (rounds resampled). A target fails only when
the interval lies wholly above it.

Three settings: one process; ``strategy="ddp"`` launched as users launch it (``python -m``: Lightning starts the
other ranks; every round's Trainers run in the same processes), at 2 processes and at 4 (oversubscribed on a 2-core
machine: reported, not asserted); and ``ddp_spawn`` at 2 (a spawn per fit: fewer, longer rounds). Under DDP the
Python-level collectives of the guards and their bytes per step are counted too (``tests.sharded.collectives``).

**Host time per guard.** A separate fit with every hook of every guard (and OOMGuard's wrappers of
``training_step``, ``backward`` and ``optimizer_step``, their inner calls subtracted) timed with
``time.perf_counter_ns``: microseconds per step, per guard.

``make bench`` runs it (``tests/benchmarks/test_pack_overhead.py``); by hand:
``python -m tests.benchmarks.pack_overhead --out docs/benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_guard import GradientGuard, L1Penalty, OOMGuard, WarmupCosine
from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.functional import global_grad_norm, l1_subgradient_
from tests.benchmarks.overhead import MLP, Floor
from tests.benchmarks.report import quiet_trainer, save

ROOT = Path(__file__).resolve().parents[2]
ONE_PROCESS = ["bare", "floor", "floor_l1", "clip_spike", "all_guards"]
DDP = ["ddp_bare", "ddp_floor", "ddp_floor_l1", "ddp_all_guards"]
TARGET = 1.05  # the guards / the floor
BATCH = 256


def step_path_guards() -> list[Callback]:
    """Every guard with work on the step path, at their defaults."""
    return [WarmupCosine(warmup=0.05), GradientGuard(), L1Penalty(1e-6), OOMGuard()]


class AgreeingFloor(Floor):
    """The floor plus the least a guard that agrees across ranks costs: one all-reduce of three floats, one read."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        row = torch.stack([torch.ones(()), global_grad_norm(grads), torch.zeros(())])
        dist.all_reduce(row)
        if not all(math.isfinite(v) for v in row.tolist()):
            raise RuntimeError("non-finite gradients")


class L1Floor(Callback):
    """The least L1Penalty's job costs: ``strength * sign(w)`` added to the gradients of the >= 2-d weights, fused,
    into signs allocated once (``functional.l1_subgradient_``), with nothing else around it."""

    def on_train_start(self, trainer, pl_module):
        self.params = [p for p in pl_module.parameters() if p.dim() >= 2]
        self.workspace = [torch.empty_like(p) for p in self.params]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        l1_subgradient_(self.params, 1e-6, workspace=self.workspace)


class Timer(Callback):
    """Seconds per step: from the start of batch ``warmup`` to the start of batch ``warmup + steps`` (or fit end)."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.t0 = self.t1 = math.nan

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.t0 = time.perf_counter()
        elif batch_idx == self.warmup + self.steps:
            self.t1 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if math.isnan(self.t1):
            self.t1 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return (self.t1 - self.t0) / self.steps


def _data(n_batches: int, world: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = n_batches * BATCH * world
    return DataLoader(TensorDataset(torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)), BATCH)


def _callbacks(config: str) -> tuple[list[Callback], dict[str, Any]]:
    from lightning.pytorch.callbacks import SpikeDetection

    name = config.removeprefix("ddp_")
    if name in ("floor", "floor_l1"):
        floor = AgreeingFloor() if config.startswith("ddp_") else Floor()
        return [floor, *([L1Floor()] if name == "floor_l1" else [])], {}
    if name == "clip_spike":
        return [SpikeDetection()], {"gradient_clip_val": 1.0}
    if name == "all_guards":
        return step_path_guards(), {}
    return [], {}


def run_one(config: str, warmup: int, steps: int, **trainer_kwargs: Any) -> tuple[float, pl.Trainer]:
    """One fit of ``config``; its seconds per step (rank 0's under DDP)."""
    timer = Timer(warmup, steps)
    callbacks, kwargs = _callbacks(config)
    world = int(trainer_kwargs.get("devices", 1))
    trainer = quiet_trainer([timer, *callbacks], max_steps=warmup + steps + 1, **kwargs, **trainer_kwargs)
    torch.manual_seed(0)
    trainer.fit(MLP(), _data(warmup + steps + 1, world))
    return timer.seconds, trainer


def interval(guards: list[float], floor: list[float], *, samples: int = 4000, seed: int = 0) -> dict[str, float]:
    """The median of the paired ratios guards/floor over rounds, and its 95% bootstrap interval."""
    ratios = [g / f for g, f in zip(guards, floor, strict=True)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(samples))
    return {
        "median": statistics.median(ratios),
        "low": medians[int(0.025 * samples)],
        "high": medians[int(0.975 * samples) - 1],
        "rounds": len(ratios),
    }


def rotated(configs: list[str], rounds: int) -> list[list[str]]:
    return [configs[r % len(configs) :] + configs[: r % len(configs)] for r in range(rounds)]


# ---------------------------------------------------------------------------------------------------- one process
def one_process(rounds: int, warmup: int, steps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {c: [] for c in ONE_PROCESS}
    for order in rotated(ONE_PROCESS, rounds):
        for config in order:
            times[config].append(run_one(config, warmup, steps, devices=1)[0])
    return times


class _HookClock:
    """Nanoseconds spent in each guard's hooks and OOMGuard's wrappers (their inner calls subtracted)."""

    HOOKS = (
        "on_train_batch_start",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_before_zero_grad",
        "on_train_batch_end",
    )
    WRAPPED = ("_wrapped_training_step", "_wrapped_backward", "_wrapped_optimizer_step", "_wrapped_optimizer_zero_grad")

    def __init__(self) -> None:
        self.ns: dict[str, int] = defaultdict(int)
        self.by_hook: dict[str, int] = defaultdict(int)
        self._inner_ns = 0

    def attach(self, guard: GuardCallback) -> None:
        name = type(guard).__name__
        for hook in self.HOOKS:
            setattr(guard, hook, self._timed(name, getattr(guard, hook), hook))
        for wrapped in self.WRAPPED:
            if hasattr(guard, wrapped):
                setattr(guard, wrapped, self._timed_wrapper(name, getattr(guard, wrapped), wrapped))

    def _timed(self, name: str, method: Any, hook: str) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0, inner0 = time.perf_counter_ns(), self._inner_ns
            try:
                return method(*args, **kwargs)
            finally:
                spent = time.perf_counter_ns() - t0
                self.ns[name] += spent - (self._inner_ns - inner0)
                self.by_hook[f"{name}.{hook}"] += spent - (self._inner_ns - inner0)
                self._inner_ns = inner0 + spent  # what encloses this call counts it as inner

        return timed

    def _timed_wrapper(self, name: str, method: Any, hook: str) -> Any:
        timed = self._timed(name, method, hook)

        def wrapper(inner: Any, *args: Any, **kwargs: Any) -> Any:
            def counted_inner(*a: Any, **k: Any) -> Any:  # the user's own work: not the guard's
                t0, inner0 = time.perf_counter_ns(), self._inner_ns
                try:
                    return inner(*a, **k)
                finally:  # all of it inner to the wrapper (other guards' hooks in it are counted for them)
                    self._inner_ns = inner0 + time.perf_counter_ns() - t0

            return timed(counted_inner, *args, **kwargs)

        return wrapper


def host_time(warmup: int, steps: int, repeats: int = 3) -> dict[str, float]:
    """Microseconds of host time per step in each guard's hooks (the median of ``repeats`` fits)."""
    per_guard: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        clock = _HookClock()
        guards = step_path_guards()
        for guard in guards:
            clock.attach(guard)  # type: ignore[arg-type]
        timer = Timer(warmup, steps)
        trainer = quiet_trainer([timer, *guards], max_steps=warmup + steps, devices=1)
        torch.manual_seed(0)
        trainer.fit(MLP(), _data(warmup + steps))
        n = warmup + steps
        for name, ns in clock.ns.items():
            per_guard[name].append(ns / n / 1000.0)
    return {name: statistics.median(v) for name, v in per_guard.items()}


# ---------------------------------------------------------------------------------------------------- DDP
def ddp_worker(args: argparse.Namespace) -> None:
    """Inside ``python -m tests.benchmarks.pack_overhead --worker``: every rank runs every round; rank 0 writes."""
    from tests.sharded.collectives import CollectiveCounter

    torch.set_num_threads(1)
    times: dict[str, list[float]] = {c: [] for c in DDP}
    counts: dict[str, Any] = {}
    rank = 0
    for order in rotated(DDP, args.rounds):
        for config in order:
            counter = CollectiveCounter(skip=args.warmup)
            timer = Timer(args.warmup, args.steps)
            callbacks, kwargs = _callbacks(config)
            trainer = quiet_trainer(
                [counter, timer, *callbacks],
                devices=args.devices,
                strategy="ddp",
                max_steps=args.warmup + args.steps + 1,
                **kwargs,
            )
            torch.manual_seed(0)
            trainer.fit(MLP(), _data(args.warmup + args.steps + 1, args.devices))
            times[config].append(timer.seconds)
            counts[config] = counter.result()
            rank = trainer.global_rank
    if rank == 0:
        Path(args.out).write_text(json.dumps({"times": times, "collectives": counts}))
    if dist.is_initialized():
        dist.destroy_process_group()


def ddp_launch(devices: int, rounds: int, warmup: int, steps: int, timeout: int = 1800) -> dict[str, Any]:
    """``strategy="ddp"`` as users launch it: ``python -m`` this module, Lightning starts the other ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "tests.benchmarks.pack_overhead", "--worker", "--devices", str(devices)]
        cmd += ["--rounds", str(rounds), "--warmup", str(warmup), "--steps", str(steps), "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
        for key in ("MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
            env.pop(key, None)
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        return json.loads(out.read_text())


def ddp_spawn(rounds: int, warmup: int, steps: int) -> dict[str, list[float]]:
    """``ddp_spawn`` at 2 processes: a spawn per fit, so fewer, longer rounds."""
    from tests.benchmarks.overhead import _FileTimer, _OneThread
    from tests.helpers import ReleaseProcessGroup

    times: dict[str, list[float]] = {c: [] for c in DDP}
    for order in rotated(DDP, rounds):
        for config in order:
            fd, path = tempfile.mkstemp(suffix=".txt")
            os.close(fd)
            callbacks, kwargs = _callbacks(config)
            timer = _FileTimer(warmup, steps, path)
            trainer = quiet_trainer(
                [timer, ReleaseProcessGroup(), _OneThread(), *callbacks],
                devices=2,
                strategy="ddp_spawn",
                max_steps=warmup + steps,
                **kwargs,
            )
            trainer.fit(MLP(), _data(warmup + steps, 2))
            with open(path) as f:
                times[config].append(float(f.read()))
            os.unlink(path)
    return times


# ---------------------------------------------------------------------------------------------------- report
def _summary(times: dict[str, list[float]], prefix: str = "") -> dict[str, Any]:
    floor, floor_l1 = times[f"{prefix}floor"], times[f"{prefix}floor_l1"]
    return {
        "ms_per_step": {c: 1000 * statistics.median(v) for c, v in times.items()},
        "vs_floor": {c: interval(v, floor) for c, v in times.items() if c != f"{prefix}floor"},
        "vs_floor_l1": {c: interval(v, floor_l1) for c, v in times.items() if c == f"{prefix}all_guards"},
        "vs_bare": {c: interval(v, times[f"{prefix}bare"]) for c, v in times.items() if c != f"{prefix}bare"},
    }


def measure(quick: bool = False) -> dict[str, Any]:
    r1, r2, r4, rs = (4, 3, 2, 2) if quick else (30, 16, 8, 6)
    result: dict[str, Any] = {
        "device": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "target": TARGET,
    }
    with_one_thread = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result["one_process"] = _summary(one_process(r1, warmup=10, steps=60))
        result["host_us_per_step"] = host_time(warmup=10, steps=100)
    finally:
        torch.set_num_threads(with_one_thread)
    for devices, rounds in ((2, r2), (4, r4)):
        launched = ddp_launch(devices, rounds, warmup=10, steps=60)
        result[f"ddp_{devices}"] = {**_summary(launched["times"], "ddp_"), "collectives": launched["collectives"]}
    result["ddp_spawn_2"] = _summary(ddp_spawn(rs, warmup=10, steps=100), "ddp_")
    return result


def _row(name: str, ms: float, vs_floor: dict[str, float] | None, vs_bare: dict[str, float] | None) -> str:
    def fmt(ci: dict[str, float] | None) -> str:
        return "" if ci is None else f"{ci['median']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"

    return f"| {name} | {ms:.3f} | {fmt(vs_bare)} | {fmt(vs_floor)} |"


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"device: {result['device']} ({result['cpus']} CPUs); torch {result['torch']}, Lightning "
        f"{result['lightning']}, 32-true, an MLP of 300k parameters, batches of {BATCH}. Ratios: the median over "
        "rounds of the paired ratio, [95% bootstrap interval]; a target fails only when the interval lies wholly "
        "above it.",
        "",
    ]
    settings = [
        ("one process", "one_process", ""),
        ('`strategy="ddp"`, 2 processes', "ddp_2", "ddp_"),
        ('`strategy="ddp"`, 4 processes (oversubscribed: reported)', "ddp_4", "ddp_"),
        ("`ddp_spawn`, 2 processes", "ddp_spawn_2", "ddp_"),
    ]
    for title, key, prefix in settings:
        part = result[key]
        rounds = next(iter(part["vs_floor"].values()))["rounds"]
        lines += [f"**{title}** ({rounds} rounds)", ""]
        lines += ["| configuration | ms/step | vs bare | vs floor |", "|---|---|---|---|"]
        for config, ms in part["ms_per_step"].items():
            lines.append(_row(config, ms, part["vs_floor"].get(config), part["vs_bare"].get(config)))
        ci = part["vs_floor_l1"][f"{prefix}all_guards"]
        lines += [
            "",
            f"{prefix}all_guards vs {prefix}floor_l1 (the floor with L1's own arithmetic): {ci['median']:.3f} "
            f"[{ci['low']:.3f}, {ci['high']:.3f}]",
        ]
        if "collectives" in part:
            c = part["collectives"][f"{prefix}all_guards"]
            lines += [
                "",
                f"The guards' collectives per optimizer step on rank 0: {c['per_step']:.2f} "
                f"({', '.join(f'{k} {v}' for k, v in sorted(c['origins'].items()))} over {c['steps']} steps); "
                f"bytes sent {c['sent_per_step']:.0f}, received {c['received_per_step']:.0f} per step.",
            ]
        lines.append("")
    lines += [
        "**Host time per step in each guard's hooks** (one process, µs; WarmupCosine is first in the list, so it owns "
        "the runtime's per-step bookkeeping; GradientGuard holds the step's agreement: every guard's vote, the one "
        "host read and the verdicts; OOMGuard: its hooks and its wrappers of training_step, backward and "
        "optimizer_step, the wrapped calls themselves left out)",
        "",
    ]
    lines += ["| guard | µs/step |", "|---|---|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in result["host_us_per_step"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="docs/benchmarks")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        ddp_worker(args)
        return None
    result = measure(quick=args.quick)
    return save(args.out, "pack_overhead_cpu", result, to_markdown(result))


if __name__ == "__main__":
    main()
