"""The compression report as a rich table: one row per stage, what went wrong under it."""

from __future__ import annotations

from typing import Any

from lightning_guard.compress.result import Stage

__all__ = ["print_report"]


def print_report(stages: list[Stage], monitor: str, problems: dict[str, str]) -> None:
    """Print ``stages`` as a table titled by ``monitor``; ``problems`` (what: why) go in red under it."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lightning_guard: compression ({monitor})")
    columns = [
        "stage",
        "setting",
        "decision",
        monitor,
        "held-out",
        "state kB",
        "file kB",
        "params",
        "sparsity",
        "CPU ms",
    ]
    for column in [*columns, "max err"]:
        table.add_column(column, no_wrap=True)

    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for s in stages:
        table.add_row(
            s.stage,
            s.setting,
            s.decision,
            fmt(s.metric, ".4f"),
            fmt(s.held_out_metric, ".4f"),
            fmt(None if s.size_bytes is None else s.size_bytes / 1000, ".1f"),
            fmt(None if s.file_bytes is None else s.file_bytes / 1000, ".1f"),
            fmt(s.params, "d"),
            fmt(s.sparsity, ".2%"),
            fmt(s.latency_ms, ".3f"),
            fmt(s.max_error, ".1e"),
        )
    if problems:
        table.caption = "\n".join(f"{what}: {why}" for what, why in problems.items())
        table.caption_style = "bold red"
    console = Console()
    console.width = max(console.width, 130)
    console.print(table)
