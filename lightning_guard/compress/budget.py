"""The search's judgements, pure: numbers in, a verdict out (no model, no file, no event).

:mod:`~lightning_guard.compress.search` measures (evaluations, files, timings) and acts on what these return: a
candidate kept or backed off, a quantised ``.pt2`` shipped or replaced by the fp32 one, the metric reported as final.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning_guard.compress.result import Stage

__all__ = [
    "kept_metric",
    "latency_not_worth_it",
    "metric_drop",
    "size_not_worth_it",
    "within_budget",
]


def metric_drop(baseline: float, metric: float, *, higher_is_better: bool) -> float:
    """How much worse than ``baseline`` the ``metric`` is, in its own units (positive: worse).

    Example:
        >>> metric_drop(0.75, 0.5, higher_is_better=True), metric_drop(0.5, 0.25, higher_is_better=False)
        (0.25, -0.25)
    """
    sign = 1.0 if higher_is_better else -1.0
    return sign * (baseline - metric)


def within_budget(baseline: float, metric: float, max_metric_drop: float, *, higher_is_better: bool) -> bool:
    """Whether a candidate of ``metric`` is kept: it is at most ``max_metric_drop`` worse than ``baseline``.

    Example:
        >>> within_budget(0.75, 0.5, 0.25, higher_is_better=True), within_budget(0.75, 0.5, 0.2, higher_is_better=True)
        (True, False)
    """
    return metric_drop(baseline, metric, higher_is_better=higher_is_better) <= max_metric_drop


def size_not_worth_it(mode: str, fp32_bytes: int, q_bytes: int, min_size_ratio: float) -> str | None:
    """Why a quantised file of ``q_bytes`` is not worth deploying for its size against the fp32 one, or None.

    Example:
        >>> print(size_not_worth_it("int8", 1000, 900, 1.5))
        the int8 .pt2 (900 bytes) is only 1.11x smaller than the fp32 one (1000), below min_size_ratio 1.5
        >>> size_not_worth_it("int8", 1000, 250, 1.5) is None
        True
    """
    ratio = fp32_bytes / max(q_bytes, 1)
    if ratio < min_size_ratio:
        return (
            f"the {mode} .pt2 ({q_bytes} bytes) is only {ratio:.2f}x smaller than the fp32 one ({fp32_bytes}), "
            f"below min_size_ratio {min_size_ratio:g}"
        )
    return None


def latency_not_worth_it(mode: str, fp32_ms: float, q_ms: float, max_latency_ratio: float) -> str | None:
    """Why a quantised file running in ``q_ms`` is too slow against the fp32 one's ``fp32_ms``, or None.

    Example:
        >>> print(latency_not_worth_it("int8", 0.2, 0.8, 1.1))
        the int8 .pt2 runs in 0.8 ms on CPU against 0.2 ms for the fp32 one (more than max_latency_ratio 1.1 times)
        >>> latency_not_worth_it("int8", 0.2, 0.21, 1.1) is None
        True
    """
    if q_ms > max_latency_ratio * fp32_ms:
        return (
            f"the {mode} .pt2 runs in {q_ms:.3g} ms on CPU against {fp32_ms:.3g} ms for the fp32 one "
            f"(more than max_latency_ratio {max_latency_ratio:g} times)"
        )
    return None


def kept_metric(stages: Sequence[Stage], baseline: float, stage: str | None = None) -> float:
    """The metric of the last accepted candidate (of ``stage`` only, when given), else the baseline's.

    Example:
        >>> rows = [Stage("prune", "structured 0.5", "accepted", 0.96), Stage("quantize", "int8", "accepted", 0.95)]
        >>> kept_metric(rows, 0.97), kept_metric(rows, 0.97, "prune"), kept_metric([], 0.97)
        (0.95, 0.96, 0.97)
    """
    kept = [
        st.metric
        for st in stages
        if (stage is None or st.stage == stage) and st.decision == "accepted" and st.metric is not None
    ]
    return float(kept[-1] if kept else baseline)
