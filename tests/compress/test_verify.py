"""An artifact's own metric: the loaded file stands in for the model's forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_guard import compress as C
from tests.compress.nets import mlp


def test_artifact_metric_is_the_files_and_none_when_forward_is_never_called():
    host = mlp(16).eval()
    x = torch.randn(32, 64)

    def mean_output(m: nn.Module) -> float:
        with torch.no_grad():
            return float(m(x).mean())

    assert C.artifact_metric(mean_output, host, lambda t: torch.full((t.shape[0], 10), 3.0)) == pytest.approx(3.0)
    assert "forward" not in host.__dict__  # the stand-in is removed again
    assert C.artifact_metric(lambda m: float(m[0].weight.sum()), host, lambda t: t) is None


def test_artifact_metric_needs_forward_alone_and_binds_keywords():
    """Review: a step calling submodules besides forward got a metric half from the in-memory model, and a keyword
    call (`self(input=x)` for a Sequential) got none. Now the first gives None (not the file's metric), the second
    binds the keyword and measures the file."""
    host = mlp(16).eval()
    x = torch.randn(8, 64)
    constant = lambda t: torch.full((t.shape[0], 10), 3.0)  # noqa: E731
    assert C.artifact_metric(lambda m: float(m(input=x).mean()), host, constant) == pytest.approx(3.0)
    assert C.artifact_metric(lambda m: float((m(x) + m[0](x).sum()).mean()), host, constant) is None


class _HostWithMetric(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        import torchmetrics

        self.net = mlp(16)
        self.mean = torchmetrics.MeanMetric()
        self.loss = nn.MSELoss()

    def forward(self, x):
        return self.net(x)


def test_artifact_metric_allows_metrics_and_losses_beside_forward():
    """The demo's validation_step updates a torchmetrics metric (a child module) after `self(x)`: that is not the
    in-memory model computing, and the file's metric is still its own."""
    host = _HostWithMetric().eval()
    x = torch.randn(8, 64)

    def evaluate(m: nn.Module) -> float:
        out = m(x)
        m.mean.update(out.mean())
        return float(m.mean.compute() + 0 * m.loss(out, out))

    assert C.artifact_metric(evaluate, host, lambda t: torch.full((t.shape[0], 10), 2.0)) == pytest.approx(2.0)
