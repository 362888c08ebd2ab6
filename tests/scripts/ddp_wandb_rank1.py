"""ddp_spawn + WandbLogger scenario, run in a fresh interpreter by tests/callbacks/test_warmup_cosine.py.

A process that already started and finished wandb runs leaves WANDB_SERVICE in its environment; spawned workers
inherit it and rank 1 was seen to abort intermittently ("terminate called without an active exception"). Running
the scenario in its own interpreter keeps the test independent of what ran before it.
"""

import json
import os
import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from lightning_guard import WarmupCosine
from lightning_guard.testing import InjectNaN
from tests.helpers import DigitsNet, digits_loaders, precision_kwargs, trainer


class LRRecorder(Callback):
    def __init__(self, out: str) -> None:
        self.lrs: list[float] = []
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_end(self, trainer, pl_module):
        w = [p.detach().flatten().tolist()[:8] for p in pl_module.parameters()]
        Path(f"{self.out}.rank{trainer.global_rank}.json").write_text(json.dumps({"lrs": self.lrs, "w": w}))


if __name__ == "__main__":
    root, bad_rank = Path(sys.argv[1]), int(sys.argv[2])
    os.chdir(root)  # wandb writes media of a run attached in a spawned worker under the worker's cwd
    tr, va = digits_loaders()
    logger = WandbLogger(save_dir=str(root), project="lg-test")
    cbs = [WarmupCosine(warmup=1), InjectNaN("loss", steps=[2], ranks=[bad_rank]), LRRecorder(str(root / "rec"))]
    t = trainer(root, cbs, devices=2, strategy="ddp_spawn", logger=logger, max_epochs=2, **precision_kwargs("16-mixed"))
    t.fit(DigitsNet(), tr, va)
    logger.experiment.finish()  # flush the run the workers attached to
