"""In-memory snapshots of model, optimizer and GradScaler state for GradientGuard's rollback.

Each rank copies its *local* tensors (so under FSDP every rank keeps only its own shards; under FSDP2 the local
parts of the ``DTensor`` parameters and optimizer states, restored shard by shard) into host memory: one flat
buffer per snapshot (pinned on CUDA, allocated once and grown only when the state grows, e.g. when the optimizer
creates its moments at the first step), with one fused ``_foreach_copy_`` on a side stream, so the copy overlaps the
next forward and backward. :meth:`Snapshot.wait` makes the current stream wait for it before the weights change.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_guard._compat import foreach_copy_, foreach_norm, non_persistent_buffer_names
from lightning_guard._sharded import Layout, fsdp_modules, layout, local, rebuild, reshard

_ALIGN = 64


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
    """A reusable host-memory copy of the training state (GradientGuard keeps two and alternates)."""

    def __init__(self) -> None:
        self._flat: torch.Tensor | None = None
        self._event: Any = None
        self._stream: Any = None
        self.params: list[torch.Tensor] = []
        self.buffers: list[torch.Tensor] = []
        self.optimizers: list[Any] = []
        self.scaler: dict[str, Any] | None = None
        self.applied_steps: list[int] = []
        self.step = -1
        self.nbytes = 0
        self.extra: dict[str, Any] = {}  # the owner's own state at capture time (statistics, LR schedulers)
        self._fsdp: list[torch.nn.Module] | None = None  # the model's FSDP2 modules, found at the first capture

    @property
    def taken(self) -> bool:
        """True once a snapshot exists."""
        return self.step >= 0

    def reserve(self, nbytes: int, pinned: bool) -> None:
        """Make sure the flat buffer holds ``nbytes`` (allocating pinned host memory takes long: do it early)."""
        if self._flat is None or self._flat.numel() < nbytes:
            self._flat = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=pinned)

    def capture(
        self,
        module: torch.nn.Module,
        optimizers: list[torch.optim.Optimizer],
        scaler: Any,
        applied_steps: list[int],
        step: int,
    ) -> None:
        """Copy the local parameters, buffers, optimizer states and scaler state."""
        self._sharded_view(module)
        sources: list[torch.Tensor] = []

        def take(t: torch.Tensor) -> int:
            sources.append(local(t))
            return len(sources) - 1

        params = [take(p) for p in module.parameters()]
        buffers = [take(b) for b in module.buffers()]
        states = [_walk(opt.state_dict(), lambda path, t: ("__tensor__", take(t), layout(t))) for opt in optimizers]
        offsets, total = [], 0
        for t in sources:
            offsets.append(total)
            total += (t.numel() * t.element_size() + _ALIGN - 1) // _ALIGN * _ALIGN
        cuda = any(t.is_cuda for t in sources)
        self.reserve(total, pinned=cuda)
        assert self._flat is not None
        views = [
            self._flat[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            for o, t in zip(offsets, sources, strict=True)
        ]
        if cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                foreach_copy_(views, sources, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record(self._stream)
        elif views:
            foreach_copy_(views, sources)
        self.params = [views[i] for i in params]
        self.buffers = [views[i] for i in buffers]
        self.optimizers = [_resolve(s, views) for s in states]
        self.scaler = dict(scaler.state_dict()) if scaler is not None else None
        self.applied_steps = list(applied_steps)
        self.step = step
        self.nbytes = total

    def _sharded_view(self, module: torch.nn.Module) -> None:
        """Under FSDP2, reshard first: the parameters are then the ``DTensor`` shards, not gathered full copies."""
        if self._fsdp is None:
            self._fsdp = fsdp_modules(module)
        reshard(self._fsdp)

    def load_tensors(self, params: list[torch.Tensor], buffers: list[torch.Tensor], step: int) -> None:
        """Adopt saved host tensors (weights only), e.g. restored from a checkpoint."""
        self.params, self.buffers, self.optimizers = list(params), list(buffers), []
        self.scaler, self.step = None, step

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
        self._sharded_view(module)
        with torch.no_grad():
            for p, saved in zip(module.parameters(), self.params, strict=True):
                local(p).copy_(saved)
            for b, saved in zip(module.buffers(), self.buffers, strict=True):
                local(b).copy_(saved)
        for opt, state in zip(optimizers, self.optimizers, strict=True):
            opt.load_state_dict(_rebuilt(state))
        if scaler is not None and self.scaler is not None:
            scaler.load_state_dict(self.scaler)


class _Shard:
    """The host copy of an optimizer state's ``DTensor``: its local part and how to rebuild it."""

    __slots__ = ("part", "where")

    def __init__(self, part: torch.Tensor, where: Layout) -> None:
        self.part, self.where = part, where


def _rebuilt(obj: Any) -> Any:
    """A copy of a saved optimizer state with fresh tensors (``DTensor`` where the live state had them)."""
    if isinstance(obj, _Shard):
        return rebuild(obj.part.clone(), obj.where)
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _rebuilt(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebuilt(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_rebuilt(v) for v in obj)
    return obj


def _resolve(obj: Any, views: list[torch.Tensor]) -> Any:
    """Replace ``("__tensor__", i, layout)`` markers with the i-th view (a :class:`_Shard` for a ``DTensor``)."""
    if isinstance(obj, tuple) and len(obj) == 3 and obj[0] == "__tensor__":
        return views[obj[1]] if obj[2] is None else _Shard(views[obj[1]], obj[2])
    if isinstance(obj, dict):
        return {k: _resolve(v, views) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, views) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v, views) for v in obj)
    return obj


def persistent_buffers(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
    """Where the module's persistent buffers live: ``(submodule, name)`` pairs (the module's state in ``state_dict``).

    BatchNorm statistics, EMA counters and queues are persistent. Non-persistent buffers (``register_buffer(...,
    persistent=False)``: causal masks, rotary caches) are derived from other state by convention and are left out.
    Pairs, not tensors: a forward may replace a buffer (``self.ema = 0.9 * self.ema + ...``) rather than write it.
    """
    out: list[tuple[torch.nn.Module, str]] = []
    for sub in module.modules():
        skip = non_persistent_buffer_names(sub)
        out.extend((sub, name) for name, b in sub.named_buffers(recurse=False) if name not in skip and b is not None)
    return out


def _inf_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The largest magnitude of each tensor (NaN when it holds a NaN, inf when an infinity), as one float tensor."""
    return torch.stack([n.float() for n in foreach_norm(tensors, ord=float("inf"))])


class StepBuffers:
    """The module's persistent buffers as they were before an optimizer step's first forward.

    A forward in training mode writes buffers (BatchNorm's running statistics and ``num_batches_tracked``, an EMA)
    before any guard sees the gradients: a step skipped for a NaN batch has already written NaN there. ``capture``
    copies the buffers on their own device before the batch's first forward (one fused copy into tensors allocated
    once); ``restore`` writes them back into whatever tensors the module holds under those names now (a forward may
    have replaced them); ``newly_nonfinite`` is a device flag (no host sync) for the step's vote: the step's forwards
    put a NaN or an infinity into a buffer that had none (a buffer that legitimately holds infinities, such as an
    additive attention mask, is judged only for new NaNs). The capture stands until :meth:`drop` (batch end), so
    several optimizer steps in one batch (manual optimization) each restore the batch's starting state.
    """

    def __init__(self) -> None:
        self._where: list[tuple[torch.nn.Module, str]] = []
        self._saved: list[torch.Tensor] = []
        self._norms: torch.Tensor | None = None  # the saved floating buffers' inf-norms (NaN/inf where already so)
        self.taken = False  # a capture of the batch being run exists
        self._layout: tuple[torch.nn.Module, list[tuple[torch.nn.Module, str]]] | None = None

    def forget_layout(self) -> None:
        """Walk the module's buffers again at the next capture (a new fit: the module may have changed)."""
        self._layout = None

    def _live(self) -> list[torch.Tensor]:
        return [getattr(m, name) for m, name in self._where]

    def capture(self, module: torch.nn.Module) -> None:
        """Copy the persistent buffers now (before the batch's first forward).

        Where they live is walked once per module (a Python walk over every submodule: kept off the step path);
        :meth:`forget_layout` walks it again (a new fit).
        """
        if self._layout is None or self._layout[0] is not module:
            self._layout = (module, persistent_buffers(module))
        where = self._layout[1]
        live = [getattr(m, name).detach() for m, name in where]
        same = len(where) == len(self._where) and all(
            a[0] is b[0] and a[1] == b[1] and t.shape == s.shape and t.dtype == s.dtype and t.device == s.device
            for a, b, t, s in zip(where, self._where, live, self._saved, strict=True)
        )
        if not same:
            self._where = where
            self._saved = [t.clone() for t in live]
        elif live:
            foreach_copy_(self._saved, live)
        floats = [t for t in self._saved if t.is_floating_point()]
        self._norms = _inf_norms(floats) if floats else None
        self.taken = bool(where)

    @property
    def count(self) -> int:
        """How many buffers a :meth:`restore` now writes back."""
        return len(self._where) if self.taken else 0

    def restore(self) -> None:
        """Write the captured buffers back into the module (the step is skipped)."""
        if not self.taken:
            return
        with torch.no_grad():
            for (m, name), saved in zip(self._where, self._saved, strict=True):
                current = getattr(m, name)
                if isinstance(current, torch.Tensor) and current.shape == saved.shape and current.dtype == saved.dtype:
                    current.copy_(saved)
                else:  # replaced by another shape or type: put a copy of the saved tensor back under the name
                    setattr(m, name, saved.clone())

    def drop(self) -> None:
        """Forget the capture (the batch is over; the next one captures its own)."""
        self.taken = False

    def newly_nonfinite(self, device: torch.device) -> torch.Tensor:
        """1.0 (a 0-d float tensor) when the step's forwards made a floating buffer non-finite, else 0.0."""
        if not self.taken or self._norms is None:
            return torch.zeros((), device=device)
        live = [t.detach() for t in self._live() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if len(live) != len(self._norms):
            return torch.zeros((), device=device)
        now, before = _inf_norms(live).to(self._norms.device), self._norms
        new_nan = torch.isnan(now) & ~torch.isnan(before)
        new_inf = torch.isinf(now) & torch.isfinite(before)
        return (new_nan | new_inf).any().float().to(device)
