"""Small functions, small modules: no function of the package over 80 lines, no module over 600."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_guard"
MAX_FUNCTION = 80
MAX_MODULE = 600


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "functions over 80 lines (split them: decide, then act):\n" + "\n".join(long)


def test_no_module_is_longer_than_600_lines():
    over = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE:
            over.append(f"{path.relative_to(PACKAGE)}: {lines} lines")
    assert not over, "modules over 600 lines (split them along their seams):\n" + "\n".join(over)
