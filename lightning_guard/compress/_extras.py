"""The optional libraries of the ``export`` extra: a clear error naming the extra when one is missing."""

from __future__ import annotations

from lightning_guard.errors import GuardConfigError


def require(module: str, extra: str = "export") -> None:
    """Raise ``GuardConfigError`` naming the extra to install when ``module`` is not importable."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise GuardConfigError(
            f"this needs `{module}`: install the `{extra}` extra (pip install lightning-guard[{extra}])"
        )
