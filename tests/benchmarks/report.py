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
