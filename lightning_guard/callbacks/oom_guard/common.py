"""What OOMGuard's parts share: the failure row's layout, the ``_Retry`` unwinding, and reading a step's loss."""

from __future__ import annotations

from typing import Any, Literal

import torch

from lightning_guard.distributed import Agreement

_WHERE = {1.0: "forward", 2.0: "backward"}
_CODE = {"forward": 1.0, "backward": 2.0}
_MEM_KEYS = ("allocated_mib", "reserved_mib", "peak_mib")
_MARK = "_lightning_guard_original"
_EVAL_HOOKS = {"validation_step": "validate", "test_step": "test", "predict_step": "predict"}


#: where a micro-batch under ``no_sync`` tells a failure instead of at its end (``_RetryLoop._guarded_step``): the
#: batch's last micro-batch, in a synced quiet step ("last": the failure is posted at once) or an accumulating one
#: ("end": agreed at its end)
Defer = Literal["", "last", "end"]

#: the verdict of a failure agreed on the fence group (an all-reduce of counts): who failed, where and at what size is
#: gathered at the recovery, where every rank stands (``_failure_details``)
FENCED = Agreement((), ())


class _Retry(Exception):
    """Unwinds a failed attempt out of Lightning's closure (releasing its graph) up to ``optimizer_step``."""

    def __init__(self, agreement: Agreement) -> None:
        super().__init__("lightning_guard: batch re-run after out-of-memory")
        self.agreement = agreement


def _memory_lists(ranks: tuple[int, ...], memory: dict[int, dict[str, float]]) -> dict[str, list[float]]:
    present = [k for k in _MEM_KEYS if any(k in m for m in memory.values())]
    return {k: [memory.get(r, {}).get(k, 0.0) for r in ranks] for k in present}


def _error_text(exc: BaseException) -> str:
    return " ".join(str(a) for a in exc.args)


def _loss_of(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        loss = out.get("loss")
        return loss if isinstance(loss, torch.Tensor) else None
    return None


def _with_loss(out: Any, loss: torch.Tensor) -> Any:
    return {**out, "loss": loss} if isinstance(out, dict) else loss
