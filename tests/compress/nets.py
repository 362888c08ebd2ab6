"""Small models shared by the compression tests."""

from __future__ import annotations

import torch
from torch import nn


def mlp(hidden: int = 128) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
