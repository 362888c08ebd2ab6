"""CompressExport's plumbing that is not the search.

Quiet nested work, the model inputs of a batch, the held-out deal of the validation batches, a detached copy of the
module.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import logging
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_guard.errors import GuardConfigError

__all__ = ["EveryOther", "detached_copy", "inputs_of", "maybe_len", "quiet"]

_MARK = "_lightning_guard_original"


#: the loggers of the nested work (Lightning's banners and tips, torch.onnx's progress, torchao, onnxruntime; the
#: root logger too: onnxruntime's quantiser warns through it)
_CHATTY = (
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
    "torch.onnx",
    "torch.export",
    "torch._dynamo",
    "torchao",
    "onnxruntime",
    "onnxscript",
    "",
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep the nested evaluation, export and verification out of the user's log.

    Each validation run of the search is a nested Trainer (its banners, tips and ``limit_val_batches`` notes), and the
    exporters and quantisers log progress and advice: none of it is about the user's run. Their loggers are raised
    to ERROR, Python warnings are ignored and standard output is dropped for the duration; errors still raise, and
    what the search decided reaches the user as guard events, the report and its table.
    """
    loggers = [logging.getLogger(name) for name in _CHATTY]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def maybe_len(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


def inputs_of(batch: Any) -> tuple[Any, ...]:
    """The model inputs of a batch: the batch itself, its first element, or its first tensor value."""
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, list | tuple) and batch:
        return (batch[0],)
    if isinstance(batch, Mapping):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return (value,)
    raise GuardConfigError(
        f"CompressExport cannot find the model input in a batch of type {type(batch).__name__}; pass `example_input`"
    )


class EveryOther:
    """Every other batch of a loader, in order: ``parity`` 0 the even-numbered ones, 1 the odd-numbered ones."""

    def __init__(self, loader: Any, parity: int) -> None:
        self.loader, self.parity = loader, parity

    def __iter__(self) -> Any:
        return itertools.islice(iter(self.loader), self.parity, None, 2)

    def __len__(self) -> int:
        return (len(self.loader) - self.parity + 1) // 2


def detached_copy(module: pl.LightningModule) -> pl.LightningModule:
    """A deep copy without the trainer and without the guards' per-instance hook wrappers."""
    clone = copy.deepcopy(module)
    for name, value in list(clone.__dict__.items()):
        if callable(value) and hasattr(value, _MARK):
            del clone.__dict__[name]
    return clone
