"""Constructor argument checks shared by the guards: each error names the argument and the value received."""

from __future__ import annotations

import math
from typing import Any

from lightning_guard.errors import GuardConfigError


def check_number(
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    high: float = math.inf,
    strict: bool = True,
    optional: bool = False,
) -> None:
    """A finite real number (not a bool) ``> low`` (``>= low`` when not ``strict``) and ``<= high``; or None."""
    if optional and value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(float(value))
    if ok:
        ok = (value > low if strict else value >= low) and value <= high
    if not ok:
        bound = f"> {low}" if strict else f">= {low}"
        if high != math.inf:
            bound += f" and <= {high}"
        raise GuardConfigError(f"`{name}` must be a number {bound}{' or None' if optional else ''}, got {value!r}")


def check_int(name: str, value: Any, *, low: int, optional: bool = False, none_first: bool = False) -> None:
    """An int (not a bool) ``>= low``; or None when ``optional``.

    The optional wording is "an int >= low or None", or "an int or None >= low" with ``none_first``.
    """
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        if optional and none_first:
            expected = f"an int or None >= {low}"
        else:
            expected = f"an int >= {low}{' or None' if optional else ''}"
        raise GuardConfigError(f"`{name}` must be {expected}, got {value!r}")
