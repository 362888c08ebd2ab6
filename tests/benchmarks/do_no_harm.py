"""Do no harm: each guard at its defaults, on a clean run, must end where the unguarded run ends.

For each workload of :mod:`tests.workloads` (char LM on the standard library's sources, conv+BatchNorm net and MLP on
digits), each guard alone at its defaults, and all of them together, train from the same seed as a reference run and
compare the final validation loss of the weights each run ends with (``trainer.validate`` after ``fit``, so a
best-weight restore counts) and the guard events the run produced.

* References: the unguarded run, except for ``all`` (every guard together), which is compared with a run under
  ``WarmupCosine`` alone: the schedule changes training by design.
* Criteria (DESIGN.md, "What a guard owes its user", 1): the relative difference of the final validation loss is at
  most ``TOLERANCE`` (0.5%) and no event of severity ``warning`` or ``error`` was emitted.
* ``WarmupCosine`` is a schedule, not a guard that must be invisible: its difference from the unguarded run is
  reported and judged apart (verdict ``schedule``), only its events must stay below ``warning``.
* Under a fault: the BatchNorm conv net with a NaN batch (``tests.benchmarks.bn_nan_batch``), ``GradientGuard()``'s
  skip against the clean run of the same seed (final accuracy within ``FAULT_ACC_TOLERANCE``, every buffer finite),
  beside the unguarded run and the skip as main did it (BatchNorm statistics left as the NaN forward wrote them).
* ``L1Penalty`` has a default strength (``1e-5``) and runs at it; ``ClassBalance`` runs only on the workloads whose
  loss is ``GuardMixin.balanced_loss`` (not the LM).

Runs use one CPU thread (``torch.set_num_threads(1)``): on the shared 2-core machine two threads were 3-10x slower
and gave the same numbers. ``python -m tests.benchmarks.do_no_harm`` or ``make bench``.
"""

from __future__ import annotations

import itertools
import math
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_guard import (
    ClassBalance,
    GradientGuard,
    L1Penalty,
    OOMGuard,
    OverfitGuard,
    WarmupCosine,
    configure_events,
    event_stream,
)
from tests.benchmarks import bn_nan_batch
from tests.benchmarks.report import git_state, machine, one_thread, quiet_trainer, save
from tests.helpers import precision_kwargs
from tests.workloads import WORKLOADS

TOLERANCE = 0.005
SCHEDULE = "warmup_cosine"
UNGUARDED = "unguarded"
ALL = "all"
#: the unguarded run with its initial weights scaled by ``1 + NOISE_EPS * N(0, 1)``: how far a harmless change moves
#: the final loss (reported, never judged)
NOISE = "noise_floor"
NOISE_EPS = 1e-4

#: every guard at its defaults, by name (a fresh instance per run)
GUARDS: dict[str, Callable[[], Any]] = {
    "warmup_cosine": WarmupCosine,
    "gradient_guard": GradientGuard,
    "l1_penalty": L1Penalty,
    "overfit_guard": OverfitGuard,
    "class_balance": ClassBalance,
    "oom_guard": OOMGuard,
}


def guards_for(workload: str) -> list[str]:
    """The guards that apply to a workload (``ClassBalance`` needs ``balanced_loss``), then ``"all"``."""
    names = [g for g in GUARDS if g != "class_balance" or WORKLOADS[workload].uses_balanced_loss]
    return [*names, ALL]


def reference_of(guard: str) -> str:
    """The run a guarded run is compared with."""
    return SCHEDULE if guard == ALL else UNGUARDED


def callbacks_for(workload: str, guard: str) -> list[Any]:
    """Fresh callbacks of a configuration (``unguarded``, a guard name, or ``all``)."""
    if guard in (UNGUARDED, NOISE):
        return []
    if guard == ALL:
        return [GUARDS[g]() for g in guards_for(workload) if g != ALL]
    return [GUARDS[guard]()]


def _perturb(model: torch.nn.Module, eps: float) -> None:
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + eps * torch.randn(p.shape, generator=g))


def _event_row(e: Any) -> dict[str, Any]:
    keep = ("norm", "z", "threshold", "loss", "factor")
    return {
        "guard": e.guard,
        "kind": e.kind,
        "severity": e.severity,
        "step": e.step,
        "epoch": e.epoch,
        "message": e.message,
        "data": {k: v for k, v in e.data.items() if k in keep},
    }


def run(
    workload: str, guard: str, seed: int, precision: str = "32-true", size: str = "ci", root: str | Path | None = None
) -> dict[str, Any]:
    """Train one configuration and return its final validation loss, its events and its cost.

    Args:
        workload: a key of ``tests.workloads.WORKLOADS``.
        guard: ``"unguarded"``, a key of :data:`GUARDS`, or ``"all"``.
        seed: model and data seed.
        precision: Lightning precision (``16-mixed`` through the CPU GradScaler plugin).
        size: ``"ci"`` or ``"bench"``.
        root: the Trainer's ``default_root_dir`` (where ``guard_events.jsonl`` goes); a fresh temp folder if None.

    Returns:
        ``val_loss`` (and ``val_acc`` where logged) of the final weights, ``last_val_loss`` (the last validation
        during fit), every event, the warning/error events, the steps run, the final LR of the first param group
        and the wall time.
    """
    model, train, val, kwargs = WORKLOADS[workload](seed, size)
    if guard == NOISE:
        _perturb(model, NOISE_EPS)
    if root is None:
        root = tempfile.mkdtemp(prefix="do_no_harm_")
    trainer = quiet_trainer(
        callbacks_for(workload, guard), default_root_dir=str(root), **kwargs, **precision_kwargs(precision)
    )
    start = time.perf_counter()
    trainer.fit(model, train, val)
    wall = time.perf_counter() - start
    events = list(event_stream(trainer).events)
    last_val = float(trainer.callback_metrics["val_loss"])
    lr_end = float(trainer.optimizers[0].param_groups[0]["lr"])
    (final,) = trainer.validate(model, val, verbose=False)
    rows = [_event_row(e) for e in events]
    return {
        "workload": workload,
        "guard": guard,
        "seed": seed,
        "precision": precision,
        "size": size,
        "val_loss": float(final["val_loss"]),
        "val_acc": float(final["val_acc"]) if "val_acc" in final else None,
        "last_val_loss": last_val,
        "steps": int(trainer.global_step),
        "lr_end": lr_end,
        "wall_s": wall,
        "events": rows,
        "event_counts": dict(Counter(f"{r['guard']}/{r['kind']}" for r in rows)),
        "warnings": [r for r in rows if r["severity"] in ("warning", "error")],
    }


def compare(guarded: dict[str, Any], reference: dict[str, Any], tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Judge a guarded run against its reference run (same workload, seed and precision).

    Returns:
        ``rel_diff`` (guarded / reference - 1 of the final validation loss), ``warning_kinds`` (kind -> count),
        ``within`` (``|rel_diff| <= tolerance``), ``quiet`` (no warning/error event) and the ``verdict``:
        ``"ok"``, ``"harm: events"``, ``"harm: loss"``, ``"harm: loss+events"``, or ``"schedule"`` for
        ``WarmupCosine`` (reported, judged apart; ``"schedule, harm: events"`` if it emitted warnings).
    """
    rel = guarded["val_loss"] / reference["val_loss"] - 1.0
    kinds = Counter(f"{w['guard']}/{w['kind']}" for w in guarded["warnings"])
    within, quiet = abs(rel) <= tolerance, not kinds
    if guarded["guard"] == NOISE:
        verdict = "noise floor"
    elif guarded["guard"] == SCHEDULE:
        verdict = "schedule" if quiet else "schedule, harm: events"
    elif within and quiet:
        verdict = "ok"
    else:
        verdict = "harm: " + "+".join(p for p, bad in (("loss", not within), ("events", not quiet)) if bad)
    return {
        "guard": guarded["guard"],
        "reference": reference["guard"],
        "reference_val_loss": reference["val_loss"],
        "val_loss": guarded["val_loss"],
        "rel_diff": rel,
        "warning_kinds": dict(kinds),
        "info_kinds": dict(Counter(f"{e['guard']}/{e['kind']}" for e in guarded["events"] if e["severity"] == "info")),
        "within": within,
        "quiet": quiet,
        "verdict": verdict,
    }


#: precisions where the benchmark also measures the noise floor
NOISE_PRECISIONS: tuple[str, ...] = ("32-true",)

#: (workload, precisions) measured by the benchmark
PLAN: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("char_lm", ("32-true", "bf16-mixed")),
    ("conv_bn", ("32-true",)),
    ("mlp", ("32-true",)),
)


def measure_set(workload: str, precision: str, seed: int, size: str, root: Path) -> list[dict[str, Any]]:
    """The unguarded run, the noise floor (where measured), each guard alone and all together, in that order."""
    done: dict[str, dict[str, Any]] = {}
    noise = [NOISE] if precision in NOISE_PRECISIONS else []
    for guard in [UNGUARDED, *noise, *guards_for(workload)]:
        done[guard] = run(workload, guard, seed, precision, size, root / f"{workload}-{precision}-{seed}-{guard}")
    return list(done.values())


#: the fault rows: the BatchNorm conv net with a NaN in one sample of one batch (``tests.benchmarks.bn_nan_batch``)
FAULT_CONFIGS: tuple[str, ...] = ("nan_unguarded", "skip_without_buffers", "skip")
#: a faulted run guarded by GradientGuard is "ok" when its final accuracy is within this of the clean run's
FAULT_ACC_TOLERANCE = 0.02


def measure_faults(seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Each fault configuration against the clean run of the same seed (final weights' loss and accuracy)."""
    rows = []
    for seed in seeds:
        clean = bn_nan_batch.run("clean", seed)
        for config in FAULT_CONFIGS:
            r = bn_nan_batch.run(config, seed)
            acc_diff = r["val_acc"] - clean["val_acc"]
            finite = not math.isnan(r["val_loss"]) and r["buffers_finite"]
            verdict = "ok" if finite and abs(acc_diff) <= FAULT_ACC_TOLERANCE else "harm"
            if config != "skip":
                verdict = "reference: " + verdict  # what happens without the guard, or with main's skip
            rows.append(
                {
                    "workload": "conv_bn",
                    "fault": f"NaN batch at step {bn_nan_batch.NAN_STEP}",
                    "config": config,
                    "seed": seed,
                    "clean_val_loss": clean["val_loss"],
                    "clean_val_acc": clean["val_acc"],
                    "val_loss": r["val_loss"],
                    "val_acc": r["val_acc"],
                    "rel_diff": r["val_loss"] / clean["val_loss"] - 1.0,
                    "acc_diff": acc_diff,
                    "buffers_finite": r["buffers_finite"],
                    "verdict": verdict,
                }
            )
    return rows


def measure(
    seeds: Sequence[int] = (0, 1), size: str = "bench", plan: Sequence[tuple[str, Sequence[str]]] = PLAN
) -> dict[str, Any]:
    """Every (workload, precision, seed) of the plan measured with :func:`measure_set`, and compared."""
    runs: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    configure_events(summary=False)
    try:
        with one_thread(), tempfile.TemporaryDirectory(prefix="do_no_harm_") as tmp:
            for workload, precisions in plan:
                for precision, seed in itertools.product(precisions, seeds):
                    done = {r["guard"]: r for r in measure_set(workload, precision, seed, size, Path(tmp))}
                    runs.extend(done.values())
                    for guard, guarded in done.items():
                        if guard != UNGUARDED:
                            verdict = compare(guarded, done[reference_of(guard)])
                            rows.append({"workload": workload, "precision": precision, "seed": seed, **verdict})
        with one_thread():
            faults = measure_faults(seeds)
    finally:
        configure_events(summary=True)
    return {
        "tolerance": TOLERANCE,
        "size": size,
        "seeds": list(seeds),
        "rows": rows,
        "fault_rows": faults,
        "runs": runs,
        "total_s": time.perf_counter() - start,
        "machine": machine(),
        "git": git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": pl.__version__,
    }


def _kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "-"


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (workload, precision, guard): the per-seed differences, the noise floor and the verdicts."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in result["rows"]:
        groups.setdefault((r["workload"], r["precision"], r["guard"]), []).append(r)
    floors: dict[str, float] = {}
    for (workload, _, guard), rows in groups.items():
        if guard == NOISE:
            floors[workload] = max(floors.get(workload, 0.0), *(abs(r["rel_diff"]) for r in rows))
    out = []
    for (workload, precision, guard), rows in groups.items():
        warnings: Counter[str] = Counter()
        for r in rows:
            warnings.update(r["warning_kinds"])
        out.append(
            {
                "workload": workload,
                "precision": precision,
                "guard": guard,
                "rel_diffs": [r["rel_diff"] for r in rows],
                "noise_floor": floors.get(workload),
                "warning_kinds": dict(warnings),
                "verdicts": sorted({r["verdict"] for r in rows}),
            }
        )
    return out


def to_markdown(result: dict[str, Any]) -> str:
    """A summary per guard, every run against its reference, then the warning events of clean runs."""
    pct = "{:+.2f}%".format
    lines = [
        f"Do no harm: each guard at its defaults on a clean run vs the same seed without it ({result['machine']}; "
        f"Python {result['python']}, torch {result['torch']}, Lightning {result['lightning']}; git {result['git']}; "
        f"size `{result['size']}`, seeds {result['seeds']}, {result['total_s'] / 60:.1f} min in all).",
        "",
        f"Criterion: final validation loss (of the weights the run ends with) within "
        f"{100 * result['tolerance']:.1f}% relative of the reference and no warning/error event. Reference: the "
        "unguarded run; for `all`, the run with `warmup_cosine` alone. `warmup_cosine` changes the schedule by "
        "design: its difference is reported, not judged. `noise_floor`: the unguarded run with its initial weights "
        f"scaled by 1 + {NOISE_EPS:g}·N(0,1), i.e. how far a harmless change moves the final loss.",
        "",
        "| workload | precision | guard | rel. diff per seed | noise floor (max abs) | beyond the noise floor | "
        "warning events | verdicts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in summarize(result):
        floor, beyond = "-", "-"
        if r["noise_floor"] is not None and r["precision"] in NOISE_PRECISIONS and r["guard"] != NOISE:
            floor = f"{100 * r['noise_floor']:.2f}%"
            beyond = "yes" if max(abs(d) for d in r["rel_diffs"]) > r["noise_floor"] else "no"
        lines.append(
            f"| {r['workload']} | {r['precision']} | {r['guard']} | {', '.join(pct(100 * d) for d in r['rel_diffs'])} "
            f"| {floor} | {beyond} | {_kinds(r['warning_kinds'])} | {'; '.join(r['verdicts'])} |"
        )
    lines += [
        "",
        "Every run:",
        "",
        "| workload | precision | guard | seed | reference val loss | guarded val loss | rel. diff | "
        "warning events (kinds) | info events | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['workload']} | {r['precision']} | {r['guard']} | {r['seed']} | {r['reference_val_loss']:.4f} "
            f"({r['reference']}) | {r['val_loss']:.4f} | {100 * r['rel_diff']:+.3f}% | "
            f"{_kinds(r['warning_kinds'])} | {_kinds(r['info_kinds'])} | {r['verdict']} |"
        )
    lines += [
        "",
        f"Under a fault (`tests/benchmarks/bn_nan_batch.py`): the conv+BatchNorm net with a NaN in one sample of the "
        f"batch at step {bn_nan_batch.NAN_STEP}, against the clean run of the same seed. `skip`: `GradientGuard()` as "
        "shipped (the skip also puts back the BatchNorm statistics the forward wrote); `skip_without_buffers`: the "
        "skip as main did it before the second do-no-harm round; `nan_unguarded`: no guard. Verdict `ok`: final loss "
        f"finite, every buffer finite, accuracy within {FAULT_ACC_TOLERANCE} of the clean run.",
        "",
        "| workload | fault | run | seed | clean val loss / acc | val loss / acc | rel. diff (loss) | acc diff | "
        "buffers finite | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.get("fault_rows", []):
        loss = "nan" if math.isnan(r["val_loss"]) else f"{r['val_loss']:.4f}"
        rel = "nan" if math.isnan(r["rel_diff"]) else f"{100 * r['rel_diff']:+.2f}%"
        lines.append(
            f"| {r['workload']} | {r['fault']} | {r['config']} | {r['seed']} | {r['clean_val_loss']:.4f} / "
            f"{r['clean_val_acc']:.3f} | {loss} / {r['val_acc']:.3f} | {rel} | {r['acc_diff']:+.3f} | "
            f"{r['buffers_finite']} | {r['verdict']} |"
        )
    noisy = [run for run in result["runs"] if run["warnings"]]
    if noisy:
        lines += ["", "Warning events on clean runs (`norm`: gradient norm; `z`: the z-score that triggered):", ""]
        lines += ["| workload | precision | guard | seed | event | step | norm | z | threshold | loss | message |"]
        lines += ["|---" * 11 + "|"]
        for run in noisy:
            for w in run["warnings"]:
                d = w["data"]
                nums = [
                    f"{d[k]:.4g}" if isinstance(d.get(k), float) else "-" for k in ("norm", "z", "threshold", "loss")
                ]
                lines.append(
                    f"| {run['workload']} | {run['precision']} | {run['guard']} | {run['seed']} | "
                    f"{w['guard']}/{w['kind']} | {w['step']} | {' | '.join(nums)} | {w['message']} |"
                )
    return "\n".join(lines) + "\n"


def main(out: str = "docs/benchmarks") -> dict[str, Any]:
    result = measure()
    return save(out, "do_no_harm", result, to_markdown(result))


if __name__ == "__main__":
    main()
