"""Training curves with the guards' interventions marked (needs matplotlib, a ``dev`` dependency).

:class:`MetricHistory` records the training loss and learning rate per step and the validation metrics per
validation (rank 0); :func:`plot_run` draws them in stacked panels with a vertical line at every guard event, coloured
by guard, and writes a PNG.

Example:
    >>> import lightning.pytorch as pl
    >>> history = MetricHistory()
    >>> history.series
    {}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_guard.events import GuardEvent

__all__ = ["MetricHistory", "plot_run"]

#: (colour, line style) of the curves of one panel, in order
_CURVES = (("black", "-"), ("#d95f02", "--"), ("#1b9e77", "-."), ("#7570b3", ":"))


class MetricHistory(Callback):
    """Record ``train_loss`` and ``lr`` per optimizer step and the logged ``val*`` metrics per validation.

    ``series`` maps a name to ``(global_step, value)`` pairs. One host sync per step (the loss value); meant for
    demos, examples and benchmarks rather than production runs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.series: dict[str, list[tuple[int, float]]] = {}

    def _add(self, name: str, step: int, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                return
            value = value.item()
        if isinstance(value, int | float):
            self.series.setdefault(name, []).append((step, float(value)))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank != 0:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        step = int(trainer.global_step)
        self._add("train_loss", step, loss)
        if trainer.optimizers:
            self._add("lr", step, trainer.optimizers[0].param_groups[0]["lr"])

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0 or trainer.sanity_checking:
            return
        for name, value in trainer.callback_metrics.items():
            if name.startswith("val"):
                self._add(name, int(trainer.global_step), value)


def _event_fields(event: GuardEvent | Mapping[str, Any]) -> tuple[int, str, str]:
    if isinstance(event, GuardEvent):
        return event.step, event.guard, event.kind
    return int(event["step"]), str(event["guard"]), str(event["kind"])


def plot_run(
    series: Mapping[str, Sequence[tuple[int, float]]],
    events: Sequence[GuardEvent | Mapping[str, Any]],
    path: str | Path,
    *,
    title: str = "",
    panels: Sequence[Sequence[str]] | None = None,
    skip_guards: Sequence[str] = (),
) -> Path:
    """Draw the recorded curves in stacked panels and mark every guard event; write a PNG and return its path.

    Args:
        series: name -> ``(step, value)`` pairs, e.g. :attr:`MetricHistory.series`.
        events: guard events (objects, or the dicts of ``guard_events.jsonl``).
        path: the PNG to write.
        title: figure title.
        panels: groups of series names, one panel each (default: one panel per series).
        skip_guards: guards whose events are not drawn (e.g. ``"fault_injector"``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [list(p) for p in panels] if panels is not None else [[name] for name in series]
    groups = [[n for n in g if series.get(n)] for g in groups]
    groups = [g for g in groups if g]
    rows = max(len(groups), 1)
    fig, axes = plt.subplots(rows, 1, figsize=(12, max(2.4 * rows, 3.6) + 0.6), sharex=True)
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    marks = [_event_fields(e) for e in events if _event_fields(e)[1] not in skip_guards]
    guards = sorted({g for _, g, _ in marks})
    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(guards)}
    for ax, group in zip(axes, groups, strict=False):
        for i, name in enumerate(group):
            steps, values = zip(*series[name], strict=True)
            # dark, distinct curves (black first); the light vertical lines belong to the guards' events
            style = _CURVES[i % len(_CURVES)]
            ax.plot(steps, values, label=name, linewidth=1.6, color=style[0], linestyle=style[1])
            finite = [v for v in values if math.isfinite(v) and v > 0]
            if name.endswith("loss") and finite and max(finite) / min(finite) > 50:
                ax.set_yscale("log")
        for step, guard, _ in marks:
            ax.axvline(step, color=colours[guard], alpha=0.3, linewidth=1.0)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        ax.grid(alpha=0.3)
    if marks:
        handles = [plt.Line2D([0], [0], color=colours[g], linewidth=2) for g in guards]
        counts = {g: sum(1 for _, gg, _ in marks if gg == g) for g in guards}
        axes[0].legend(
            handles + axes[0].get_legend_handles_labels()[0],
            [f"{g} ({counts[g]} events)" for g in guards] + axes[0].get_legend_handles_labels()[1],
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=8,
        )
    axes[-1].set_xlabel("optimizer step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
