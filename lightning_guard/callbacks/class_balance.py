"""ClassBalance: count classes once, set the module's class weights or prior, report per-class results."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DistributedSampler, IterableDataset, Subset, TensorDataset
from typing_extensions import override

from lightning_guard._compat import tree_leaves
from lightning_guard._runtime import emit
from lightning_guard._state import StateSchema
from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.distributed import all_reduce_max, all_reduce_sum, gather_json
from lightning_guard.errors import GuardConfigError
from lightning_guard.events import GuardEvent
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
    """All labels of a map-style dataset without reading its items, when the dataset exposes them.

    A ``targets``/``labels`` attribute is used only when it has one entry per sample.
    """
    if isinstance(dataset, Subset):
        base = _dataset_labels(dataset.dataset)
        return None if base is None else base[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1]
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is None or callable(values):
            continue
        try:
            labels = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError):
            sample = list(values[:3]) if hasattr(values, "__getitem__") else values
            raise GuardConfigError(
                f"ClassBalance: the dataset's `{attr}` attribute does not hold class indices (first values "
                f"{sample!r}): pass `label_fn` returning class indices, or `class_counts`"
            ) from None
        n = len(dataset) if hasattr(dataset, "__len__") else None
        if labels.dim() == 0 or (n is not None and labels.shape[0] != n):
            raise GuardConfigError(
                f"ClassBalance: the dataset's `{attr}` attribute has {labels.shape[0] if labels.dim() else 0} entries "
                f"but the dataset has {n} samples: pass `label_fn`, or `class_counts`"
            )
        return labels
    return None


def _sampler_indices(loader: Any) -> list[int] | None:
    """The dataset indices this rank's training loader draws in an epoch (None when they cannot be known).

    Read from the sampler the loader really uses (Lightning's DistributedSampler under DDP, a user's
    SubsetRandomSampler or weighted sampler), so the counts are those of the data training sees.
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
    # The caller (`ClassBalance._collect`) restores torch's global generator and the loader's own ones: a
    # RandomSampler or a weighted sampler drawing here must not change the order training will see.
    try:
        if isinstance(sampler, DistributedSampler) and not sampler.drop_last:
            # Its padding repeats samples so that every rank gets as many: position r + k * R of the padded list
            # is rank r's k-th index, padding from len(dataset) on. Counted once, the ranks add up exactly.
            n, rank, replicas = len(sampler.dataset), sampler.rank, sampler.num_replicas  # type: ignore[arg-type]
            return [int(i) for k, i in enumerate(sampler) if rank + k * replicas < n]
        if sampler is not None:
            return [int(i) for i in sampler]
        if batch_sampler is not None:
            return [int(i) for batch in batch_sampler for i in batch]
    except TypeError:  # an iterable dataset's dummy sampler, or one yielding other things than indices
        return None
    return None


def _generators_of(loader: Any) -> list[torch.Generator]:
    """The torch generators a loader's shuffling draws from (the loader's own, its sampler's), each once."""
    found: list[torch.Generator] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not other for other in found):
            found.append(g)
    return found


def _identity(items: Any) -> Any:
    return items


class ClassBalance(GuardCallback):
    r"""Count the training labels once, then make ``GuardMixin.balanced_loss`` fight the class imbalance.

    At train start the labels are counted over the samples training really draws: the indices of the sampler the
    training loader uses on each rank (Lightning's ``DistributedSampler`` under DDP, a ``SubsetRandomSampler`` split,
    a weighted sampler), counts summed over ranks. Labels come from the dataset itself when it exposes them
    (``targets``/``labels`` attributes with one entry per sample, a ``TensorDataset``'s second tensor, ``Subset``\s of
    those - no data pass), otherwise from one pass that reads those items with the loader's own worker processes
    (with a progress bar); an iterable dataset is counted by iterating its loader. ``class_counts`` skips counting.
    One-hot or soft labels are counted by their class probabilities, segmentation masks per pixel, and labels equal
    to ``ignore_index`` not at all. Then, by ``method``:

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
        class_counts: samples per class (multiclass), given instead of counted: a list or 1-D tensor of numbers
            >= 0, one per class.
        ignore_index: label value that is not counted (multiclass, e.g. unlabelled pixels). Default ``-100``.

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
        class_counts: Sequence[float] | torch.Tensor | None = None,
        ignore_index: int = -100,
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
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise GuardConfigError(f"`ignore_index` must be an int, got {ignore_index!r}")
        given = None
        if class_counts is not None:
            if task != "multiclass":
                raise GuardConfigError(
                    f"`class_counts` is for task='multiclass' (samples per class), got task={task!r}: binary and "
                    "multilabel positives are counted"
                )
            try:
                given = torch.as_tensor(class_counts, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                given = None
            if (
                given is None
                or given.dim() != 1
                or given.numel() < 1
                or not bool(torch.isfinite(given).all())
                or bool((given < 0).any())
                or float(given.sum()) <= 0
            ):
                raise GuardConfigError(
                    f"`class_counts` must be a list of numbers >= 0 (one per class, not all 0), got {class_counts!r}"
                )
            if num_classes is not None and given.numel() != num_classes:
                raise GuardConfigError(
                    f"`class_counts` has {given.numel()} entries but `num_classes` is {num_classes}: give one count "
                    "per class"
                )
        self.class_counts = class_counts
        self.ignore_index = ignore_index
        self._given_counts = given
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

    def _collect(self, trainer: pl.Trainer) -> torch.Tensor:
        """The labels of the samples this rank's training loader draws (summed over ranks by the caller).

        Nothing here may change what training will draw: torch's global generator, and any generator of the loader
        or its sampler, are restored afterwards (item reads may use randomness too: augmentations).
        """
        loader = trainer.train_dataloader
        generators = _generators_of(loader)
        states = [g.get_state() for g in generators]
        try:
            with torch.random.fork_rng(devices=[]):
                return self._read_labels(trainer, loader)
        finally:
            for g, state in zip(generators, states, strict=True):
                g.set_state(state)

    def _read_labels(self, trainer: pl.Trainer, loader: Any) -> torch.Tensor:
        dataset = getattr(loader, "dataset", None)
        from rich.progress import track

        quiet = trainer.global_rank != 0 or not trainer.progress_bar_callback
        if dataset is not None and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
            indices = _sampler_indices(loader)
            if indices is None:
                indices = list(range(trainer.global_rank, len(dataset), trainer.world_size))
            labels = _dataset_labels(dataset) if self.label_fn is None else None
            if labels is not None:
                return labels[torch.as_tensor(indices, dtype=torch.long)]
            # One pass over those items, read by the loader's own worker processes.
            reader = torch.utils.data.DataLoader(
                Subset(dataset, indices),
                batch_size=64,
                num_workers=int(getattr(loader, "num_workers", 0) or 0),
                collate_fn=_identity,
                generator=torch.Generator(),
            )
            items = [
                self._extract(item)
                for chunk in track(reader, description="ClassBalance: counting labels", disable=quiet)
                for item in chunk
            ]
            if not items:
                return torch.zeros(0, dtype=torch.long)
            return torch.stack(items)  # one label per sample: an index, a one-hot/soft vector or a mask
        self._streamed = True  # an IterableDataset (or a loader without a dataset): each rank read its own stream
        batches = track(loader, description="ClassBalance: counting labels", disable=quiet)
        items = []
        self._stream_checksum = 0.0  # of the whole batches, inputs included: shards with equal labels still differ
        for i, batch in enumerate(batches):
            items.append(self._extract(batch))
            leaves = [t for t in tree_leaves(batch) if isinstance(t, torch.Tensor)]
            self._stream_checksum += (i + 1) * sum(float(t.double().sum()) for t in leaves)
        if not items:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([t.reshape(-1, *t.shape[1:]) if t.dim() else t.reshape(1) for t in items])

    def _reduce(
        self, trainer: pl.Trainer, counts: torch.Tensor, total: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """``[*counts, total]`` summed over ranks; once only when every rank streamed the very same labels.

        An IterableDataset that is not sharded per rank (no ``get_worker_info``/rank split in its ``__iter__``) gives
        every rank the whole stream: summing would count it world-size times. Ranks compare a fingerprint of what
        they read (the label sequence's length, counts and a position-weighted sum, and a position-weighted sum of
        every tensor of the batches, so disjoint shards with the same labels still differ); when all are equal the
        stream is counted once and a warning says so.
        """
        local = torch.cat([counts.double(), total.double().reshape(1)])
        if not self._streamed or trainer.world_size <= 1:
            return all_reduce_sum(trainer, local.to(trainer.strategy.root_device)).cpu()
        flat = labels.double().reshape(labels.shape[0], -1).sum(1) if labels.numel() else labels.double()
        checksum = float((flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64)).sum())
        prints = gather_json(trainer, [local.tolist(), checksum, self._stream_checksum])
        if all(p == prints[0] for p in prints):
            self.emit(
                trainer,
                "unsharded_stream",
                f"every rank read the same {int(total)} labels from the training IterableDataset (it is not sharded "
                f"per rank): counted once, not {trainer.world_size} times. Shard it by rank in `__iter__` to train "
                "each rank on different data",
                severity="warning",
                data={"samples_per_rank": int(total), "world_size": trainer.world_size},
                rank_zero_only=True,
            )
            return local
        return all_reduce_sum(trainer, local.to(trainer.strategy.root_device)).cpu()

    def _count(self, trainer: pl.Trainer) -> None:
        self._streamed, self._stream_checksum = False, 0.0
        if self._given_counts is not None:
            self.counts, self.num_classes = self._given_counts.clone(), int(self._given_counts.numel())
            self.total = round(float(self._given_counts.sum()))
            return
        labels = self._collect(trainer)
        device = trainer.strategy.root_device
        if self.task == "multiclass":
            if labels.is_floating_point() and labels.dim() == 2 and labels.shape[1] > 1:
                # one-hot or soft labels: each sample counts by its class probabilities
                n_classes = self.num_classes if self.num_classes is not None else labels.shape[1]
                if labels.shape[1] != n_classes:
                    raise GuardConfigError(
                        f"ClassBalance: num_classes={n_classes} but the one-hot/soft labels have width "
                        f"{labels.shape[1]}"
                    )
                counts, total = labels.double().sum(0), torch.tensor(float(labels.shape[0]))
                stats = self._reduce(trainer, counts, total, labels)
                self.counts, self.num_classes = stats[:-1].cpu(), n_classes
                self.total = round(float(stats[-1]))
                return
            labels = labels.long().reshape(-1)
            labels = labels[labels != self.ignore_index]
            if labels.numel() and int(labels.min()) < 0:
                raise GuardConfigError(
                    f"ClassBalance found negative labels: {sorted(set(labels[labels < 0].tolist()))[:10]} "
                    f"(ignore_index={self.ignore_index})"
                )
            seen = torch.tensor(int(labels.max()) + 1 if labels.numel() else 0, device=device)
            seen_max = int(all_reduce_max(trainer, seen).item())
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
        stats = self._reduce(trainer, counts, total, labels)
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
                "recall": MulticlassRecall(
                    num_classes=self.num_classes, average=None, ignore_index=self.ignore_index
                ).to(device),
                "balanced_acc": MulticlassAccuracy(
                    num_classes=self.num_classes, average="macro", ignore_index=self.ignore_index
                ).to(device),
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
        # torchmetrics' compute() has already reduced over the ranks: every rank logs the same numbers, and the mean
        # over ranks is an identity that keeps Lightning from warning about epoch-level logs without sync_dist
        GuardCallback.log_metrics(self, trainer, values, monitorable=True, sync_dist=trainer.world_size > 1)
        for m in metrics.values():
            m.reset()

    # ------------------------------------------------------------------ state
    #: the version of the checkpoint state this class writes
    STATE_VERSION = 1

    def _state_schema(self) -> StateSchema:
        legacy = {"counts": None, "total": 0, "num_classes": self.num_classes}
        return StateSchema("ClassBalance", self.STATE_VERSION, frozenset(legacy), legacy=legacy)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._state_schema().dump(
            {
                "counts": None if self.counts is None else self.counts.tolist(),
                "total": self.total,
                "num_classes": self.num_classes,
            }
        )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = self._state_schema().load(state_dict, extra=type(self) is not ClassBalance)
        counts = state["counts"]
        self.counts = None if counts is None else torch.tensor(counts, dtype=torch.float64)
        self.total = int(state["total"])
        self.num_classes = state["num_classes"]
