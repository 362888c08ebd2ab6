"""Where benchmark results go: ``<out>/<name>.json`` (every number) and ``<out>/<name>.md`` (the table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
