"""ddp_spawn + WandbLogger(save_dir=...) started from another working directory; run in a fresh interpreter by
tests/test_events.py (see ddp_wandb_rank1.py for why a fresh interpreter).

argv: save_dir, working directory, "eager" (the run is created before fit) or "lazy" (Lightning creates it while
pickling the trainer for the spawn).
"""

import os
import sys
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from lightning_guard import GradientGuard
from lightning_guard.testing import InjectNaN
from tests.helpers import DigitsNet, digits_loaders, trainer

if __name__ == "__main__":
    root, cwd, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    os.chdir(cwd)
    tr, va = digits_loaders(n_train=128, n_val=64)
    logger = WandbLogger(save_dir=str(root), project="lg-test")
    if mode == "eager":
        _ = logger.experiment
    cbs = [GradientGuard(), InjectNaN("loss", steps=[1], ranks=[1])]
    t = trainer(root, cbs, devices=2, strategy="ddp_spawn", logger=logger, max_epochs=2)
    t.fit(DigitsNet(), tr, va)
    logger.experiment.finish()
