"""The guards' cost per training batch under FSDP2 (ModelParallelStrategy + fully_shard, 2 CPU processes, gloo),
beside the same run without guards: no fault, the steady state. Launched as users launch it (``python -m``),
configurations interleaved round by round, medians of the ratios (run with ``make bench``).

OOMGuard under FSDP2 fences every all-gather and reduce-scatter with a small agreement on a gloo group of CPU
tensors (as Composer syncs before each FSDP block): this measures what that costs where the collectives themselves
are cheap (gloo on one machine, a small MLP), i.e. close to the worst case.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from tests.benchmarks.report import git_state, machine, save
from tests.sharded.launch import launch

CONFIGS = {"none": "none", "oom_guard": "oomq", "step_guards": "wc,gg,l1,of", "step_guards_oom": "wc,gg,l1,of,oomq"}


def measure(rounds: int = 3, epochs: int = 6) -> dict[str, Any]:
    times: dict[str, list[float]] = {k: [] for k in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, guards in CONFIGS.items():
                got = launch("fsdp2", Path(tmp) / f"{name}{r}", "--guards", guards, "--epochs", str(epochs))
                times[name].append(got["seconds_per_batch"])
    ratios = {
        name: statistics.median(100.0 * (t / base - 1.0) for t, base in zip(ts, times["none"], strict=True))
        for name, ts in times.items()
    }
    return {
        "machine": machine().replace("runs on 1 thread", "2 processes (gloo), 1 thread each"),
        "commit": git_state(),
        "rounds": rounds,
        "batches_timed_per_run": epochs * 8 - 4,
        "ms_per_batch_median": {k: 1000.0 * statistics.median(v) for k, v in times.items()},
        "vs_none_pct_median": ratios,
        "raw_s": times,
    }


def to_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Guards under FSDP2: cost per training batch",
        "",
        f"{result['machine']}; {result['rounds']} interleaved rounds, {result['batches_timed_per_run']} batches timed "
        "per run (validation excluded); medians.",
        "",
        "| configuration | ms / batch | vs no guard |",
        "|---|---|---|",
    ]
    for k, v in result["ms_per_batch_median"].items():
        lines.append(f"| {k} | {v:.2f} | {result['vs_none_pct_median'][k]:+.1f}% |")
    return "\n".join(lines) + "\n"


def main(out: str = "docs/benchmarks") -> dict[str, Any]:
    result = measure()
    return save(out, "fsdp2_overhead_cpu", result, to_markdown(result))


if __name__ == "__main__":
    main()
