"""L1Penalty: L1 regularisation injected into the gradients, or applied as a proximal step."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_guard._checks import check_int
from lightning_guard._compat import NORM_BASE, scaler_scale, steps_unscale_inside
from lightning_guard._runtime import StepOutcome, emit
from lightning_guard._sharded import local, sharded_training, shares
from lightning_guard.callbacks._base import GuardCallback
from lightning_guard.callbacks._sharding import warn_unsynchronised
from lightning_guard.distributed import all_reduce_sum
from lightning_guard.errors import GuardConfigError
from lightning_guard.events import GuardEvent
from lightning_guard.functional.l1 import (
    l1_adaptive_proximal_,
    l1_norm,
    l1_proximal_,
    l1_subgradient_,
    zero_count,
)

__all__ = ["L1Penalty"]

_EXCLUDED_MODULES = (
    torch.nn.Embedding,
    torch.nn.EmbeddingBag,
    NORM_BASE,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    *((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ()),
)


class L1Penalty(GuardCallback):
    r"""L1 regularisation ``strength * sum(|w|)`` without an extra autograd pass.

    * ``mode="subgradient"``: ``grad += strength * sign(w)`` with fused foreach ops in ``on_before_optimizer_step``
      (after AMP unscaling; for a fused optimizer under the GradScaler, which unscales inside its step, the
      subgradient is multiplied by the loss scale), once per optimizer step whatever the gradient accumulation -
      the same gradient as adding the penalty to the loss, without its extra pass through autograd.
    * ``mode="proximal"``: after each *applied* optimizer step, soft-threshold
      ``w <- sign(w) * max(|w| - lr * strength, 0)`` with the LR that step used, per param group (decoupled L1, as
      AdamW decouples L2).
      It produces exact zeros that pruning and export can use; a step skipped by the GradScaler or a guard is not
      thresholded.

    * ``mode="adaptive_proximal"``: the proximal step in Adam's metric (proximal Adam), for Adam-family optimizers:
      each coordinate's threshold ``lr * strength`` is divided by Adam's bias-corrected ``sqrt(v) + eps``, the same
      per-coordinate scaling as Adam's own update. Plain ``proximal`` under AdamW hardly zeroes anything at useful
      strengths (Adam moves every weight by about ``lr`` a step, far more than ``lr * strength``); this mode does (see
      the docs page for the measured trade-off).

    Parameters: by default every parameter with at least 2 dimensions outside normalisation and embedding modules
    (so biases, norm weights and embeddings are excluded); ``include`` / ``exclude`` take name patterns
    (``fnmatch``, e.g. ``"encoder.*.weight"``), ``group_strength`` multiplies the strength per name pattern (the first
    matching pattern wins; 0 excludes).

    Strength: constant, or ramped linearly from 0 over ``ramp_steps`` applied optimizer steps.

    Logging: ``guard/l1/penalty`` (``strength * sum(|w|)`` in fp32, summed over ranks when parameters are sharded),
    ``guard/l1/sparsity`` (fraction of exact zeros among the penalised parameters) and ``guard/l1/strength``, every
    ``log_every_n_steps`` steps only (one host sync then, none otherwise).

    Args:
        strength: lambda, >= 0. Default ``1e-5``.
        mode: ``"subgradient"``, ``"proximal"`` or ``"adaptive_proximal"`` (Adam-family optimizers). Default
            ``"subgradient"``.
        include: name patterns to penalise (default: the rule above).
        exclude: name patterns never penalised.
        exclude_1d: exclude parameters with fewer than 2 dimensions (biases, norm scales). Default ``True``.
        group_strength: ``{pattern: multiplier}`` per name pattern.
        ramp_steps: applied steps of the linear ramp; 0 for a constant strength. Default ``0``.
        log_every_n_steps: logging interval; default the Trainer's ``log_every_n_steps``.

    Events:
        ``selected`` (info, at train start: how many tensors and elements are penalised, and which were excluded),
        ``summary`` (info, at train end: penalty and sparsity).

    Raises:
        GuardConfigError: a bad argument; at train start, a selection that matches no parameter.

    Example:
        >>> from lightning_guard import L1Penalty
        >>> l1 = L1Penalty(1e-4, mode="proximal", exclude=["head.*"], ramp_steps=1000)
    """

    guard_name = "l1_penalty"
    MODES: tuple[str, ...] = ("subgradient", "proximal", "adaptive_proximal")

    def __init__(
        self,
        strength: float = 1e-5,
        mode: Literal["subgradient", "proximal", "adaptive_proximal"] = "subgradient",
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        exclude_1d: bool = True,
        group_strength: Mapping[str, float] | None = None,
        ramp_steps: int = 0,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if (
            isinstance(strength, bool)
            or not isinstance(strength, int | float)
            or not math.isfinite(strength)
            or strength < 0
        ):
            raise GuardConfigError(f"`strength` must be a finite number >= 0, got {strength!r}")
        if mode not in self.MODES:
            raise GuardConfigError(f"`mode` must be one of {self.MODES}, got {mode!r}")
        for name, patterns in (("include", include), ("exclude", exclude)):
            if patterns is not None and (isinstance(patterns, str) or not all(isinstance(x, str) for x in patterns)):
                raise GuardConfigError(f"`{name}` must be a list of name patterns or None, got {patterns!r}")
        if not isinstance(exclude_1d, bool):
            raise GuardConfigError(f"`exclude_1d` must be a bool, got {exclude_1d!r}")
        for pattern, mult in dict(group_strength or {}).items():
            if not isinstance(pattern, str) or isinstance(mult, bool) or not isinstance(mult, int | float) or mult < 0:
                raise GuardConfigError(
                    f"`group_strength` must map name patterns to numbers >= 0, got {pattern!r}: {mult!r}"
                )
        check_int("ramp_steps", ramp_steps, low=0)
        check_int("log_every_n_steps", log_every_n_steps, low=1, optional=True)
        self.strength = float(strength)
        self.mode = mode
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude or [])
        self.exclude_1d = exclude_1d
        self.group_strength = {str(k): float(v) for k, v in dict(group_strength or {}).items()}
        self.ramp_steps = ramp_steps
        self.log_every_n_steps = log_every_n_steps
        self._groups: list[tuple[float, list[torch.Tensor]]] = []  # (multiplier, params)
        self._selected_names: list[str] = []
        self._numel = 0
        self._step_lrs: dict[int, list[tuple[float, set[int]]]] = {}
        self._opt_params: list[set[int]] = []
        self._per_optimizer: dict[int, list[tuple[float, list[torch.Tensor]]]] = {}  # _params_of, computed once
        self._signs: dict[tuple[int, float], list[torch.Tensor] | None] = {}  # subgradient workspace (CPU only)
        self._reduce = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(strength=self.strength, mode=self.mode)

    # ------------------------------------------------------------------ selection
    def _select(self, pl_module: pl.LightningModule) -> None:
        excluded_by_module: set[int] = set()
        for module in pl_module.modules():
            if isinstance(module, _EXCLUDED_MODULES):
                excluded_by_module.update(id(p) for p in module.parameters(recurse=False))
        groups: dict[float, list[torch.Tensor]] = {}
        names, skipped = [], []
        for name, p in pl_module.named_parameters():
            if not p.requires_grad:
                continue
            if self.include is not None:
                chosen = any(fnmatch.fnmatchcase(name, pat) for pat in self.include)
            else:
                chosen = id(p) not in excluded_by_module and not (self.exclude_1d and p.dim() < 2)
            if chosen and any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude):
                chosen = False
            mult = next((m for pat, m in self.group_strength.items() if fnmatch.fnmatchcase(name, pat)), 1.0)
            if not chosen or mult == 0:
                skipped.append(name)
                continue
            groups.setdefault(mult, []).append(p)
            names.append(name)
        if not names:
            raise GuardConfigError(
                f"L1Penalty selected no parameter (include={self.include}, exclude={self.exclude}, "
                f"exclude_1d={self.exclude_1d}); parameters: {[n for n, _ in pl_module.named_parameters()][:20]}"
            )
        self._groups = sorted(groups.items())
        self._selected_names = names
        self._numel = sum(local(p).numel() for _, ps in self._groups for p in ps)  # this rank's part (summed in _stats)
        self._skipped = skipped

    def current_strength(self, applied_steps: int) -> float:
        """Lambda at an applied-step count (after the ramp)."""
        if self.ramp_steps <= 0:
            return self.strength
        return self.strength * min(1.0, applied_steps / self.ramp_steps)

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)  # resharded there: the selection takes the sharded parameters
        self._select(pl_module)
        self._opt_params = [{id(p) for g in opt.param_groups for p in g["params"]} for opt in trainer.optimizers]
        self._per_optimizer, self._signs = {}, {}
        self._reduce = sharded_training(trainer)  # each rank penalises and measures its shards: sums over ranks
        if self._reduce:
            warn_unsynchronised(self, trainer, pl_module, "the logged penalty and sparsity")
        if self.mode == "adaptive_proximal":
            for i, opt in enumerate(trainer.optimizers):
                owns = any(id(p) in self._opt_params[i] for _, ps in self._groups for p in ps)
                if owns and "betas" not in opt.defaults:
                    raise GuardConfigError(
                        f"L1Penalty(mode='adaptive_proximal') scales its threshold by Adam's second moments, but "
                        f"optimizer {i} is {type(opt).__name__}: use mode='proximal' with it (plain soft-thresholding "
                        "is already exact for SGD)"
                    )
        if self.mode != "subgradient":
            self.runtime(trainer).add_listener(self._on_step)
        if trainer.global_rank == 0 and not self._reported(trainer, "selected"):  # once per run, not per resume
            elements = sum(p.numel() for _, ps in self._groups for p in ps)  # a DTensor counts the whole tensor
            emit(
                trainer,
                GuardEvent.at(
                    trainer,
                    self.guard_name,
                    "selected",
                    message=f"{self.mode} L1 on {len(self._selected_names)} tensors ({elements} elements); "
                    f"{len(self._skipped)} excluded",
                    data={
                        "mode": self.mode,
                        "strength": self.strength,
                        "tensors": len(self._selected_names),
                        "elements": elements,
                        "excluded": self._skipped[:50],
                    },
                ),
            )

    def _params_of(self, optimizer_idx: int) -> list[tuple[float, list[torch.Tensor]]]:
        found = self._per_optimizer.get(optimizer_idx)
        if found is None:
            found = self._per_optimizer[optimizer_idx] = self._find_params_of(optimizer_idx)
        return found

    def _workspace(self, optimizer_idx: int, mult: float, params: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Buffers for the subgradient's signs, kept across steps for CPU parameters only.

        On CPU a fresh parameter-sized allocation every step costs more than the arithmetic (fresh pages); CUDA's
        caching allocator makes a fresh one free, and a kept copy there would cost parameter-sized device memory.
        """
        key = (optimizer_idx, mult)
        if key not in self._signs:
            cpu = bool(params) and all(p.device.type == "cpu" for p in params)
            self._signs[key] = [torch.empty_like(local(p)) for p in params] if cpu else None
        return self._signs[key]

    def _find_params_of(self, optimizer_idx: int) -> list[tuple[float, list[torch.Tensor]]]:
        if optimizer_idx < 0 or optimizer_idx >= len(self._opt_params):
            return self._groups
        ids = self._opt_params[optimizer_idx]
        return [(m, [p for p in ps if id(p) in ids]) for m, ps in self._groups]

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        runtime = self.runtime(trainer)
        idx = runtime.optimizer_index(optimizer)
        applied = runtime.applied_steps[idx] if 0 <= idx < len(runtime.applied_steps) else 0
        lam = self.current_strength(applied)
        if not runtime.has_loss(optimizer):  # training_step returned None: no gradient to penalise, no step to take
            return
        if self.mode == "subgradient":
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            # A fused optimizer under a GradScaler unscales inside its own step: Lightning hands this hook gradients
            # still multiplied by the loss scale, so the subgradient is scaled alike (or it would be 65536x too weak).
            scale = scaler_scale(scaler) if steps_unscale_inside(optimizer) else None
            for mult, params in self._params_of(idx):
                l1_subgradient_(params, lam * mult, scale=scale, workspace=self._workspace(idx, mult, params))
        else:  # remember the LR each param group uses this step (a schedule may change it before the proximal step)
            factor = runtime.lr_scale(idx)
            self._step_lrs[idx] = [
                (float(group["lr"]) * factor, {id(p) for p in group["params"]}) for group in optimizer.param_groups
            ]
        self._log(trainer, lam)

    def _on_step(self, outcome: StepOutcome) -> None:
        if not outcome.applied or self._trainer is None:
            return
        idx = outcome.optimizer_idx
        groups = self._step_lrs.pop(idx, None)
        if groups is None:
            return
        lam = self.current_strength(outcome.applied_steps - 1)
        optimizer = self._trainer.optimizers[idx] if self.mode == "adaptive_proximal" else None
        for mult, params in self._params_of(idx):
            for lr, ids in groups:  # each param group with its own LR (a group at lr=0 must not move)
                chosen = [p for p in params if id(p) in ids]
                if optimizer is None:
                    l1_proximal_(chosen, lr * lam * mult)
                else:
                    self._adaptive_step(optimizer, chosen, lr * lam * mult)

    @staticmethod
    def _adaptive_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], threshold: float) -> None:
        """Proximal Adam: each param's threshold divided by Adam's bias-corrected sqrt(v) + eps."""
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for p in params:
            state = optimizer.state.get(p, {})
            v = state.get("exp_avg_sq")
            if v is None:  # not stepped yet (no gradient so far)
                continue
            group = group_of[id(p)]
            step = float(state["step"]) if "step" in state else 1.0
            bias_correction = 1.0 - group["betas"][1] ** step
            l1_adaptive_proximal_([p], [v], threshold, bias_correction=bias_correction, eps=group.get("eps", 1e-8))

    def _stats(self, trainer: pl.Trainer) -> tuple[float, float]:
        params = [p for _, ps in self._groups for p in ps]
        # a part replicated over ranks (HSDP's replicate dimension) weighs 1 / copies in the sums over ranks
        share = shares(params, trainer) if self._reduce else None
        weight = None if share is None else dict(zip(map(id, params), share, strict=True))

        def weights(ps: list[torch.Tensor]) -> list[float] | None:
            return None if weight is None else [weight[id(p)] for p in ps]

        weighted = torch.stack([l1_norm(ps, weights(ps)).to(params[0].device) * m for m, ps in self._groups]).sum()
        numel = self._numel if weight is None else sum(local(p).numel() * weight[id(p)] for p in params)
        stats = torch.stack(
            [
                weighted,
                zero_count(params, share).to(weighted.device).float(),
                torch.tensor(float(numel), device=weighted.device),
            ]
        )
        if self._reduce:
            stats = all_reduce_sum(trainer, stats)
        penalty, zeros, numel = stats.tolist()  # the one host sync, only at the logging interval
        return penalty, zeros / max(numel, 1.0)

    def _log(self, trainer: pl.Trainer, lam: float) -> None:
        every = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 50) or 50
        if not trainer.loggers or trainer.global_step % every:
            return
        penalty, sparsity = self._stats(trainer)
        metrics = {"guard/l1/penalty": lam * penalty, "guard/l1/sparsity": sparsity, "guard/l1/strength": lam}
        # due was checked above: the statistics are a collective under DDP
        GuardCallback.log_metrics(self, trainer, metrics)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._groups:
            return
        penalty, sparsity = self._stats(trainer)
        applied = self.runtime(trainer).applied_steps
        lam = self.current_strength(applied[0] if applied else 0)
        if trainer.global_rank == 0:
            emit(
                trainer,
                GuardEvent.at(
                    trainer,
                    self.guard_name,
                    "summary",
                    message=(
                        f"L1 {lam * penalty:.4g} ({self.mode}); {100 * sparsity:.2f}% of penalised weights exactly 0"
                    ),
                    data={"penalty": lam * penalty, "sparsity": sparsity, "strength": lam},
                ),
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._groups = []
        self._per_optimizer, self._signs = {}, {}
