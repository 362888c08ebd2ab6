"""In-memory snapshots of model, optimizer and GradScaler state for GradientGuard's rollback.

Each rank copies its *local* tensors (so under FSDP every rank keeps only its own shards) into host memory. On CUDA
the copies go to pinned buffers, allocated once and reused, on a side stream, so they overlap the next forward and
backward; :meth:`Snapshot.wait` makes the current stream wait for them before the weights are modified again.
"""

from __future__ import annotations

from typing import Any

import torch


def _walk(obj: Any, fn: Any, path: str = "") -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(path, obj)
    if isinstance(obj, dict):
        return {k: _walk(v, fn, f"{path}/{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk(v, fn, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_walk(v, fn, f"{path}/{i}") for i, v in enumerate(obj))
    return obj


class Snapshot:
    """A reusable host-memory copy of the training state (one buffer; GradientGuard keeps two)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._event: Any = None
        self._stream: Any = None
        self.params: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        self.optimizers: list[Any] = []
        self.scaler: dict[str, Any] | None = None
        self.applied_steps: list[int] = []
        self.step = -1
        self.nbytes = 0

    @property
    def taken(self) -> bool:
        """True once a snapshot exists."""
        return self.step >= 0

    def _copy(self, key: str, t: torch.Tensor) -> torch.Tensor:
        src = t.detach()
        buf = self._buffers.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=src.is_cuda)
            self._buffers[key] = buf
        buf.copy_(src, non_blocking=src.is_cuda)
        return buf

    def capture(
        self,
        module: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        scaler: Any,
        applied_steps: list[int],
        step: int,
    ) -> None:
        """Copy the local parameters, buffers, optimizer states and scaler state."""
        cuda = any(p.is_cuda for p in module.parameters())
        ctx: Any = None
        if cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            self._stream.wait_stream(torch.cuda.current_stream())
            ctx = torch.cuda.stream(self._stream)
            ctx.__enter__()
        try:
            self.params = [self._copy(f"p{i}", p) for i, p in enumerate(module.parameters())]
            self.buffers = [self._copy(f"b{i}", b) for i, b in enumerate(module.buffers())]
            self.optimizers = [
                _walk(opt.state_dict(), lambda path, t, i=i: self._copy(f"o{i}{path}", t))
                for i, opt in enumerate(optimizers)
            ]
        finally:
            if ctx is not None:
                self._event = torch.cuda.Event()
                self._event.record(self._stream)
                ctx.__exit__(None, None, None)
        self.scaler = dict(scaler.state_dict()) if scaler is not None else None
        self.applied_steps = list(applied_steps)
        self.step = step
        self.nbytes = sum(b.numel() * b.element_size() for b in self._buffers.values())

    def wait(self) -> None:
        """Make the current CUDA stream wait until the copies are done (no-op on CPU)."""
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
            self._event = None

    def restore(self, module: torch.nn.Module, optimizers: list[torch.optim.Optimizer], scaler: Any) -> None:
        """Write the snapshot back (bit-exact) into the live model, optimizers and scaler."""
        self.wait()
        if self._stream is not None:
            self._stream.synchronize()
        with torch.no_grad():
            for p, saved in zip(module.parameters(), self.params, strict=True):
                p.copy_(saved)
            for b, saved in zip(module.buffers(), self.buffers, strict=True):
                b.copy_(saved)
        for opt, state in zip(optimizers, self.optimizers, strict=True):
            opt.load_state_dict(_walk(state, lambda path, t: t.clone()))
        if scaler is not None and self.scaler is not None:
            scaler.load_state_dict(self.scaler)
