"""Where benchmark results go: ``<out>/<name>.json`` (every number) and ``<out>/<name>.md`` (the table)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def save(out: str | Path, name: str, result: dict[str, Any], markdown: str) -> dict[str, Any]:
    """Write the result as JSON and its markdown table, print the table, return the result."""
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{name}.json").write_text(json.dumps(result, indent=2))
    (path / f"{name}.md").write_text(markdown)
    print(markdown)
    return result


def quiet_trainer(callbacks: list[Any], **kwargs: Any) -> Any:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or sanity check, in a fresh temp folder."""
    import tempfile

    import lightning.pytorch as pl

    options: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tempfile.mkdtemp(),
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block (the shared 2-core machine), then restore the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def git_state() -> str:
    """The commit measured, and whether the library had uncommitted changes (others edit it concurrently)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "lightning_guard"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    changed = len(dirty.stdout.splitlines())
    return head.stdout.strip() + (f" + {changed} uncommitted library files" if changed else "")


def machine() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    bf16 = "native bf16" if flags & {"avx512_bf16", "amx_bf16"} else "bf16 emulated (no avx512_bf16/amx)"
    return f"{name}, {os.cpu_count()} cores (shared), {bf16}, runs on 1 thread"
