"""The module every contract cell trains: scikit-learn digits, an MLP, and switches for the training code people write.

Each switch imitates one ordinary way of writing a LightningModule (a step without ``batch_idx``, a step that returns
``None``, ``self.log(..., sync_dist=True)`` with a torchmetrics metric, manual optimization, two optimizers, a user LR
scheduler, BatchNorm). :class:`Reference` holds what the reference run does by hand, without any guard, for the guards
whose effect on a clean run is by design (a schedule, a penalty, a prior, a restore of the best weights).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn

from lightning_guard import GuardMixin
from lightning_guard.functional import log_prior, warmup_cosine


@dataclass(frozen=True)
class Reference:
    """What the reference run computes by hand (all off: the plain run).

    Attributes:
        schedule: ``(warmup_fraction,)`` of WarmupCosine's defaults, as a LambdaLR over applied steps.
        l1: strength of ``loss + l1 * sum(|w|)`` over the weights of >= 2 dims.
        prior: logit adjustment with the training labels' prior (ClassBalance's default).
        restore_best: keep the weights of the best ``val_loss`` and load them at train end.
    """

    schedule: float | None = None
    l1: float = 0.0
    prior: bool = False
    restore_best: bool = False

    def __or__(self, other: Reference) -> Reference:
        return Reference(
            schedule=self.schedule if self.schedule is not None else other.schedule,
            l1=self.l1 or other.l1,
            prior=self.prior or other.prior,
            restore_best=self.restore_best or other.restore_best,
        )


PLAIN = Reference()


class ContractNet(GuardMixin, pl.LightningModule):
    """Digits MLP with the switches of the contract matrix's columns."""

    def __init__(
        self,
        *,
        batchnorm: bool = False,
        none_every: int = 0,
        sync_dist: bool = False,
        manual: bool = False,
        two_optimizers: bool = False,
        scheduler: str | None = None,
        fused: bool = False,
        lr: float = 0.01,
        reference: Reference = PLAIN,
        train_labels: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.none_every = none_every
        self.sync_dist = sync_dist
        self.automatic_optimization = not (manual or two_optimizers)
        self.two_optimizers = two_optimizers
        self.scheduler = scheduler
        self.fused = fused
        self.lr = lr
        self.reference = reference
        self._calls = 0
        self.applied_by_hand = [0, 0]  # reference schedule: optimizer steps that updated the weights
        norm: list[nn.Module] = [nn.BatchNorm1d(32)] if batchnorm else []
        self.a = nn.Sequential(nn.Linear(64, 32), *norm, nn.ReLU(), nn.Linear(32, 10))
        # the second optimizer's sub-network (two_optimizers): its loss is 10x the first one's
        self.b = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)) if two_optimizers else None
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=10) if sync_dist else None
        self.log_prior_by_hand = (
            log_prior(torch.bincount(train_labels, minlength=10).float()) if reference.prior else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)

    # ------------------------------------------------------------------ losses
    def _loss(self, logits: torch.Tensor, y: torch.Tensor, params: Any = None, scale: float = 1.0) -> torch.Tensor:
        if self.log_prior_by_hand is not None and self.training:
            logits = logits.float() + self.log_prior_by_hand.to(logits.device)
            loss = scale * nn.functional.cross_entropy(logits, y)
        else:
            loss = scale * self.balanced_loss(logits, y)
        if self.reference.l1:
            weights = [p for p in (params if params is not None else self.parameters()) if p.dim() >= 2]
            loss = loss + self.reference.l1 * sum(p.float().abs().sum() for p in weights)
        return loss

    def _skip(self) -> bool:
        self._calls += 1
        return bool(self.none_every) and self._calls % self.none_every == 0

    def _train(self, batch: Any) -> torch.Tensor | None:
        x, y = batch
        if self._skip():
            return None
        logits = self(x)
        loss = self._loss(logits, y, self.a.parameters() if self.two_optimizers else None)
        self.log("train_loss", loss, sync_dist=self.sync_dist, on_step=True, on_epoch=True)
        if self.train_acc is not None:
            self.train_acc(logits.detach(), y)
            self.log("train_acc", self.train_acc, sync_dist=True, on_step=True, on_epoch=True)
        if self.automatic_optimization:
            return loss
        self._manual_step(loss, x, y)
        return None

    def _manual_step(self, loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        opts[0].zero_grad()
        self.manual_backward(loss)
        opts[0].step()
        if self.two_optimizers:
            assert self.b is not None
            loss_b = self._loss(self.b(x), y, self.b.parameters(), scale=10.0)
            self.log("train_loss_b", loss_b, sync_dist=self.sync_dist)
            opts[1].zero_grad()
            self.manual_backward(loss_b)
            opts[1].step()
        schedulers = self.lr_schedulers()
        for sched in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            sched.step()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return self._train(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.balanced_loss(logits, y), sync_dist=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", self.balanced_loss(self(x), y), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(-1)

    # ------------------------------------------------------------------ optimizers
    def _optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lr, fused=True if self.fused else None)

    def configure_optimizers(self) -> Any:
        opts = [self._optimizer(self.a.parameters())]
        if self.b is not None:
            opts.append(self._optimizer(self.b.parameters()))
        scheds: list[dict[str, Any]] = []
        for idx, opt in enumerate(opts):
            if self.reference.schedule is not None:
                scheds.append({"scheduler": self._by_hand_schedule(opt, idx), "interval": "step"})
            elif self.scheduler is not None:
                sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.7)
                scheds.append({"scheduler": sched, "interval": self.scheduler})
        return (opts, scheds) if scheds else opts

    def _by_hand_schedule(self, opt: torch.optim.Optimizer, idx: int) -> torch.optim.lr_scheduler.LambdaLR:
        """WarmupCosine's defaults as a torch LambdaLR over the steps that really updated the weights."""
        total = int(self.trainer.estimated_stepping_batches)
        assert self.reference.schedule is not None
        warmup = round(self.reference.schedule * total)

        def applied(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            has_grad = any(p.grad is not None for g in optimizer.param_groups for p in g["params"])
            self.applied_by_hand[idx] += int(has_grad)

        opt.register_step_post_hook(applied)
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda _: warmup_cosine(self.applied_by_hand[idx], total, warmup, start_factor=0.01)
        )


class NoBatchIdxNet(ContractNet):
    """``training_step(self, batch)`` and ``validation_step(self, batch)``: Lightning allows leaving out batch_idx."""

    def training_step(self, batch: Any) -> torch.Tensor | None:  # type: ignore[override]
        return self._train(batch)

    def validation_step(self, batch: Any) -> None:  # type: ignore[override]
        super().validation_step(batch, 0)

    def test_step(self, batch: Any) -> None:  # type: ignore[override]
        super().test_step(batch, 0)

    def predict_step(self, batch: Any) -> torch.Tensor:  # type: ignore[override]
        return super().predict_step(batch, 0)


class RestoreBest(pl.Callback):
    """OverfitGuard's best-weight restore by hand: keep the best ``val_loss`` weights, load them at train end."""

    def __init__(self) -> None:
        self.best = math.inf
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = float(trainer.callback_metrics["val_loss"])
        if value < self.best:
            self.best, self.state = value, copy.deepcopy(pl_module.state_dict())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.state is not None:
            pl_module.load_state_dict(self.state)
