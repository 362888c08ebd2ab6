"""ClassBalance: count classes once, set the module's class weights or prior, report per-class results."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import IterableDataset, Subset, TensorDataset
from typing_extensions import override

from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.distributed import all_reduce_max, all_reduce_sum
from lightning_guard.errors import GuardConfigError
from lightning_guard.events import GuardEvent, emit
from lightning_guard.functional.class_balance import class_weights, log_prior
from lightning_guard.mixin import GuardMixin

__all__ = ["ClassBalance"]

LabelFn = Callable[[Any], torch.Tensor]


def _default_label(item: Any) -> Any:
    if isinstance(item, dict):
        for key in ("label", "labels", "target", "targets", "y"):
            if key in item:
                return item[key]
        raise GuardConfigError(f"ClassBalance found no label key in a dict item (keys {sorted(item)}): pass `label_fn`")
    if isinstance(item, list | tuple) and len(item) >= 2:
        return item[1]
    raise GuardConfigError(
        f"ClassBalance cannot find the label in an item of type {type(item).__name__}: pass `label_fn`"
    )


def _dataset_labels(dataset: Any) -> torch.Tensor | None:
    """All labels of a map-style dataset without reading its items, when the dataset exposes them."""
    if isinstance(dataset, Subset):
        base = _dataset_labels(dataset.dataset)
        return None if base is None else base[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1]
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None and not callable(values):
            return torch.as_tensor(values)
    return None


class ClassBalance(GuardCallback):
    r"""Count the training labels once, then make ``GuardMixin.balanced_loss`` fight the class imbalance.

    At train start the labels are counted: from the dataset itself when it exposes them (``targets``/``labels``
    attributes, a ``TensorDataset``'s second tensor, ``Subset``\s of those - no data pass), otherwise in one pass over
    the dataset split by index across ranks (or over the loader for iterable datasets), counts summed over ranks so
    every rank holds the counts of the whole data set. Then, by ``method``:

    * ``"inverse"``: weights :math:`\propto 1/n_c`; ``"sqrt_inverse"``: :math:`1/\sqrt{n_c}`;
    * ``"effective_number"`` (Cui et al. 2019): :math:`(1-\beta)/(1-\beta^{n_c})`;
    * ``"logit_adjustment"`` (Menon et al. 2021): the training loss is cross-entropy of
      ``logits + tau * log(prior)``; predictions use the raw logits;
    * ``"none"``: counts and reports only;

    with ``loss="ce"``, ``"focal"`` (``gamma``) or, for binary/multilabel targets, ``"bce"`` with
    ``pos_weight = negatives / positives`` per class. Weights are normalised so the data-weighted mean weight is 1 and
    the loss keeps cross-entropy's scale; the loss is divided by the number of samples (not by the sum of weights as
    PyTorch's weighted ``CrossEntropyLoss`` does), so micro-batches and ranks add up to the whole batch exactly.

    Validation: call ``self.track_classes(logits, y)`` in ``validation_step``; the guard logs
    ``guard/class_balance/balanced_acc`` and ``guard/class_balance/recall/<c>`` (torchmetrics, synced over ranks).

    Args:
        method: ``"logit_adjustment"`` (default), ``"inverse"``, ``"sqrt_inverse"``, ``"effective_number"``,
            ``"none"``.
        num_classes: number of classes; default: the largest label + 1 (multiclass) or the label width.
        task: ``"multiclass"`` (default), ``"binary"`` or ``"multilabel"``.
        loss: ``"ce"`` (default), ``"focal"`` or ``"bce"`` (binary/multilabel).
        beta: for ``effective_number``, in ``(0, 1)``. Default ``0.999``.
        tau: logit-adjustment temperature, > 0. Default ``1.0``.
        gamma: focal exponent, >= 0. Default ``2.0``.
        label_fn: function from a dataset item (or a batch, for iterable datasets) to its label(s); default: the
            second element of a tuple/list or the ``label``/``labels``/``target``/``y`` entry of a dict.

    Zero-count classes: a ``zero_class`` warning event; stated policy: such a class is treated as the rarest (its
    weight is the largest present weight, its prior that of half a sample).

    Events:
        ``class_counts`` (counts, imbalance ratio), ``class_weights`` (weights or log prior), ``zero_class``.

    Raises:
        GuardConfigError: a bad argument; at train start: a module without ``GuardMixin``, labels out of range, or a
            ``num_classes`` that contradicts the labels.

    Example:
        >>> from lightning_guard import ClassBalance
        >>> cb = ClassBalance(method="effective_number", beta=0.99, num_classes=10)
    """

    guard_name = "class_balance"
    METHODS: tuple[str, ...] = ("logit_adjustment", "inverse", "sqrt_inverse", "effective_number", "none")
    TASKS: tuple[str, ...] = ("multiclass", "binary", "multilabel")
    LOSSES: tuple[str, ...] = ("ce", "focal", "bce")

    def __init__(
        self,
        method: Literal["logit_adjustment", "inverse", "sqrt_inverse", "effective_number", "none"] = "logit_adjustment",
        num_classes: int | None = None,
        task: Literal["multiclass", "binary", "multilabel"] = "multiclass",
        loss: Literal["ce", "focal", "bce"] = "ce",
        beta: float = 0.999,
        tau: float = 1.0,
        gamma: float = 2.0,
        label_fn: LabelFn | None = None,
    ) -> None:
        super().__init__()
        if method not in self.METHODS:
            raise GuardConfigError(f"`method` must be one of {self.METHODS}, got {method!r}")
        if task not in self.TASKS:
            raise GuardConfigError(f"`task` must be one of {self.TASKS}, got {task!r}")
        if loss not in self.LOSSES:
            raise GuardConfigError(f"`loss` must be one of {self.LOSSES}, got {loss!r}")
        if (loss == "bce") != (task != "multiclass"):
            raise GuardConfigError(
                f"`loss` {loss!r} does not fit `task` {task!r}: use 'bce' for binary/multilabel, 'ce' or 'focal' for "
                "multiclass"
            )
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise GuardConfigError(f"`num_classes` must be a positive int or None, got {num_classes!r}")
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta < 1:
            raise GuardConfigError(f"`beta` must be in (0, 1), got {beta!r}")
        if isinstance(tau, bool) or not isinstance(tau, int | float) or not math.isfinite(tau) or tau <= 0:
            raise GuardConfigError(f"`tau` must be a number > 0, got {tau!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not math.isfinite(gamma) or gamma < 0:
            raise GuardConfigError(f"`gamma` must be a number >= 0, got {gamma!r}")
        if label_fn is not None and not callable(label_fn):
            raise GuardConfigError(f"`label_fn` must be callable or None, got {label_fn!r}")
        self.method, self.num_classes, self.task, self.loss = method, num_classes, task, loss
        self.beta, self.tau, self.gamma, self.label_fn = float(beta), float(tau), float(gamma), label_fn
        self.counts: torch.Tensor | None = None  # positives per class for binary/multilabel
        self.total = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, task=self.task)

    # ------------------------------------------------------------------ counting
    def _extract(self, item: Any) -> torch.Tensor:
        label = self.label_fn(item) if self.label_fn is not None else _default_label(item)
        return torch.as_tensor(label)

    def _collect(self, trainer: pl.Trainer) -> tuple[torch.Tensor, bool]:
        """Labels visible to this rank, and whether they are the whole data set already (no reduction needed)."""
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        labels = _dataset_labels(dataset) if dataset is not None and self.label_fn is None else None
        if labels is not None:
            return labels, True
        from rich.progress import track

        rank, world = trainer.global_rank, trainer.world_size
        quiet = rank != 0 or not trainer.progress_bar_callback
        if dataset is not None and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
            indices = range(rank, len(dataset), world)
            items = [
                self._extract(dataset[i])
                for i in track(indices, description="ClassBalance: counting labels", disable=quiet)
            ]
        else:
            batches = track(loader, description="ClassBalance: counting labels", disable=quiet)  # type: ignore[arg-type]
            items = [self._extract(batch) for batch in batches]
        if not items:
            return torch.zeros(0, dtype=torch.long), False
        return torch.cat([t.reshape(-1, *t.shape[1:]) if t.dim() else t.reshape(1) for t in items]), False

    def _count(self, trainer: pl.Trainer) -> None:
        labels, whole = self._collect(trainer)
        device = trainer.strategy.root_device
        if self.task == "multiclass":
            labels = labels.long().reshape(-1)
            if labels.numel() and int(labels.min()) < 0:
                raise GuardConfigError(
                    f"ClassBalance found negative labels: {sorted(set(labels[labels < 0].tolist()))[:10]}"
                )
            seen = torch.tensor(int(labels.max()) + 1 if labels.numel() else 0, device=device)
            seen_max = int(seen.item() if whole else all_reduce_max(trainer, seen).item())
            n_classes = self.num_classes if self.num_classes is not None else seen_max
            if seen_max > n_classes:
                bad = sorted(set(labels[labels >= n_classes].tolist()))[:10]
                raise GuardConfigError(
                    f"ClassBalance found labels out of range for num_classes={n_classes}: {bad or [seen_max - 1]}"
                )
            counts = torch.bincount(labels, minlength=n_classes).double()
            total = torch.tensor(float(labels.numel()))
        else:
            labels = labels.float().reshape(labels.shape[0], -1) if labels.numel() else labels.float().reshape(0, 1)
            n_classes = self.num_classes if self.num_classes is not None else labels.shape[1]
            if labels.shape[1] != n_classes:
                raise GuardConfigError(
                    f"ClassBalance: num_classes={n_classes} but the {self.task} labels have width {labels.shape[1]}"
                )
            if labels.numel() and not bool(((labels == 0) | (labels == 1)).all()):
                raise GuardConfigError("ClassBalance: binary/multilabel labels must be 0 or 1")
            counts = labels.sum(0).double()
            total = torch.tensor(float(labels.shape[0]))
        if not whole:
            stats = all_reduce_sum(trainer, torch.cat([counts, total.double().reshape(1)]).to(device))
            counts, total = stats[:-1].cpu(), stats[-1].cpu()
        self.counts, self.total, self.num_classes = counts.cpu(), int(total.item()), n_classes

    # ------------------------------------------------------------------ set-up
    def _install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.counts is not None
        device = pl_module.device
        buffers: dict[str, torch.Tensor] = {}
        if self.task == "multiclass":
            buffers["guard_class_weights"] = class_weights(self.counts, self.method, beta=self.beta)
            buffers["guard_class_log_prior"] = log_prior(self.counts)
        else:
            pos = self.counts.clamp_min(1.0)
            buffers["guard_pos_weight"] = ((self.total - self.counts).clamp_min(0.0) / pos).float()
        for name, value in buffers.items():
            pl_module.register_buffer(name, value.to(device), persistent=False)
        pl_module.__dict__["_guard_fp32_buffers"] = {k: v.float() for k, v in buffers.items()}
        pl_module.__dict__["_guard_balance"] = {
            "weighted": self.task == "multiclass" and self.method in ("inverse", "sqrt_inverse", "effective_number"),
            "adjust": self.task == "multiclass" and self.method == "logit_adjustment",
            "tau": self.tau,
            "gamma": self.gamma if self.loss == "focal" else 0.0,
            "task": self.task,
        }
        if self.task == "multiclass":
            from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall

            assert self.num_classes is not None
            pl_module.__dict__["_guard_class_metrics"] = {
                "recall": MulticlassRecall(num_classes=self.num_classes, average=None).to(device),
                "balanced_acc": MulticlassAccuracy(num_classes=self.num_classes, average="macro").to(device),
            }

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if not isinstance(pl_module, GuardMixin):
            raise GuardConfigError(
                f"ClassBalance sets the loss through GuardMixin.balanced_loss: mix GuardMixin into "
                f"{type(pl_module).__name__} and return self.balanced_loss(logits, target) from training_step"
            )
        restored = self.counts is not None and self.num_classes is not None and len(self.counts) == self.num_classes
        if not restored:
            self._count(trainer)
        self._install(trainer, pl_module)
        self._report(trainer)

    def _report(self, trainer: pl.Trainer) -> None:
        if trainer.global_rank != 0 or self.counts is None or self._reported(trainer, "class_counts"):
            return  # once per run: a resumed run's event log already has it
        counts = [int(c) for c in self.counts.tolist()]
        present = [c for c in counts if c > 0]
        ratio = max(present) / min(present) if present else math.nan
        emit(
            trainer,
            GuardEvent.at(
                trainer,
                self.guard_name,
                "class_counts",
                message=f"{self.total} samples, {len(counts)} classes, imbalance ratio {ratio:.1f}",
                data={"counts": counts, "total": self.total, "imbalance_ratio": ratio},
            ),
        )
        zero = [i for i, c in enumerate(counts) if c == 0]
        if zero:
            emit(
                trainer,
                GuardEvent.at(
                    trainer,
                    self.guard_name,
                    "zero_class",
                    severity="warning",
                    message=(
                        f"classes {zero} have no training sample: treated as the rarest class (largest weight, "
                        "prior of half a sample)"
                    ),
                    data={"classes": zero},
                ),
            )
        if self.task == "multiclass":
            weights = class_weights(self.counts, self.method, beta=self.beta)
            data: dict[str, Any] = {"method": self.method, "weights": [round(w, 6) for w in weights.tolist()]}
            if self.method == "logit_adjustment":
                data["log_prior"] = [round(v, 6) for v in log_prior(self.counts).tolist()]
                data["tau"] = self.tau
        else:
            data = {
                "method": "pos_weight",
                "pos_weight": [
                    round(float(n - c) / max(c, 1.0), 6)
                    for c, n in zip(self.counts.tolist(), [self.total] * len(counts), strict=True)
                ],
            }
        emit(trainer, GuardEvent.at(trainer, self.guard_name, "class_weights", message=f"{data['method']}", data=data))

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = pl_module.__dict__.get("_guard_class_metrics")
        if not metrics or trainer.sanity_checking:
            return
        if not metrics["balanced_acc"].update_called:
            return
        recall = metrics["recall"].compute()
        values = {"guard/class_balance/balanced_acc": metrics["balanced_acc"].compute()}
        values.update({f"guard/class_balance/recall/{c}": r for c, r in enumerate(recall)})
        pl_module.log_dict(values)
        for m in metrics.values():
            m.reset()

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": None if self.counts is None else self.counts.tolist(),
            "total": self.total,
            "num_classes": self.num_classes,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        counts = state_dict.get("counts")
        self.counts = None if counts is None else torch.tensor(counts, dtype=torch.float64)
        self.total = int(state_dict.get("total", 0))
        self.num_classes = state_dict.get("num_classes", self.num_classes)
