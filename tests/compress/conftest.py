"""The trained model the quantisation and search tests share."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.compress.nets import mlp
from tests.helpers import digits


@pytest.fixture(scope="module")
def trained():
    """An MLP trained on 1400 digits; held-out accuracy is the metric (real data, about 97%)."""
    x, y = digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1400], perm[1400:]
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        for i in range(0, len(tr), 64):
            idx = tr[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x[te]).argmax(-1) == y[te]).float().mean())

    return model, accuracy, x[te]
