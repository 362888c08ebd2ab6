"""Constructor argument checks shared by the guards: each error names the argument and the value received."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

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


# ---------------------------------------------------------------------------------- a metric's direction
_HIGHER_IS_BETTER = frozenset(
    {
        "acc",
        "accuracy",
        "f1",
        "fbeta",
        "auroc",
        "auc",
        "auprc",
        "ap",
        "precision",
        "recall",
        "iou",
        "miou",
        "dice",
        "map",
        "bleu",
        "rouge",
        "r2",
        "psnr",
        "ssim",
        "top1",
        "top5",
        "kappa",
        "mcc",
        "spearman",
        "pearson",
    }
)
_LOWER_IS_BETTER = frozenset(
    {
        "loss",
        "error",
        "err",
        "mae",
        "mse",
        "rmse",
        "mape",
        "smape",
        "nll",
        "ppl",
        "perplexity",
        "wer",
        "cer",
        "bpb",
        "bpc",
        "fid",
        "distance",
    }
)


#: words that turn a metric into a change of another (``val_acc_drop``): its direction cannot be told from the name
_CHANGE_WORDS = frozenset({"drop", "gap", "gain", "improvement", "delta", "diff", "change", "increase", "decrease"})


def metric_direction(monitor: str) -> Literal["min", "max"] | None:
    """``"min"`` or ``"max"`` from the words of a metric's name, or None when they do not say.

    The name is cut into words at every non-alphanumeric character (``val_iou_loss`` -> ``val``, ``iou``, ``loss``)
    and each word is compared whole, never as a substring (``val_mape`` is an error, not a mean average precision).
    A word of loss or error wins over a word of quality (``val_iou_loss`` is a loss); camelCase is split
    (``valLoss``), trailing digits dropped (``val_map50``); a word of change (``val_acc_drop``, ``val_loss_gain``)
    makes the name ambiguous.

    Example:
        >>> [metric_direction(m) for m in ("val_acc", "val_mape", "val_iou_loss", "val/mAP", "val_score")]
        ['max', 'min', 'min', 'max', None]
        >>> [metric_direction(m) for m in ("valLoss", "val_map50", "val_errors", "val_acc_drop")]
        ['min', 'max', 'min', None]
    """
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", monitor)  # camelCase: valLoss -> val_Loss
    words = {w for w in re.split(r"[^0-9a-z]+", spaced.lower()) if w}
    words |= {w.rstrip("0123456789") for w in words}  # map50 -> map, top5 stays top5 too
    words |= {w[:-1] for w in words if w.endswith("s") and w[:-1] in _LOWER_IS_BETTER}  # errors -> error
    if words & _CHANGE_WORDS:
        return None
    if words & _LOWER_IS_BETTER:
        return "min"
    if words & _HIGHER_IS_BETTER:
        return "max"
    return None


def resolve_mode(guard: str, monitor: str, mode: str | None) -> Literal["min", "max"]:
    """``mode`` when given, else the direction :func:`metric_direction` reads from ``monitor``'s name.

    Shared by every guard that judges a monitored metric (OverfitGuard, CompressExport): a guard that restores or
    accepts by a metric must not silently take the wrong direction (``val_acc`` minimised restores the worst weights).

    Raises:
        GuardConfigError: ``mode`` is not ``"min"``, ``"max"`` or None, or it is None and the name does not say.
    """
    if mode not in (None, "min", "max"):
        raise GuardConfigError(f"`mode` must be 'min', 'max' or None, got {mode!r}")
    direction = mode or metric_direction(monitor)
    if direction is None:
        raise GuardConfigError(
            f"{guard} cannot tell from its name whether `monitor={monitor!r}` is better higher or lower: "
            "pass mode='min' or mode='max'"
        )
    return direction  # type: ignore[return-value]
