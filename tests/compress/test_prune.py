"""Pruning without a Trainer: unstructured (permanent masks) and structured (layers shrink, every head kept)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_guard import GuardConfigError
from lightning_guard import compress as C
from lightning_guard.compress import prune as P
from tests.compress.nets import mlp


def test_unstructured_pruning_is_permanent_keeps_existing_zeros_and_leaves_the_input_alone():
    model = mlp()
    with torch.no_grad():  # exact zeros, as L1Penalty's proximal mode leaves them
        model[2].weight[:, :10] = 0.0
    before = copy.deepcopy(model.state_dict())
    pruned = C.prune_unstructured(model, 0.6)
    assert C.sparsity(pruned) == pytest.approx(0.6, abs=1e-3)
    assert set(pruned.state_dict()) == set(before)  # no weight_orig / weight_mask
    assert bool((pruned[2].weight[:, :10] == 0).all())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_structured_pruning_really_shrinks_the_layers():
    model = mlp(128)
    x = torch.randn(4, 64)
    pruned = C.prune_structured(model, 0.5, (x,))
    assert [pruned[0].out_features, pruned[2].in_features, pruned[2].out_features, pruned[4].out_features] == [
        64,
        64,
        64,
        10,
    ]
    assert C.param_count(pruned) == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10 == 8970  # from 26122
    assert pruned(x).shape == (4, 10)
    assert model[0].out_features == 128


class SegNet(nn.Module):
    """A segmentation net whose hidden conv has as many channels (8) as the map is wide; the head has 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.hidden = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(torch.relu(self.stem(x)))))


def test_structured_pruning_keeps_a_segmentation_heads_classes():
    """The head was found by the output's last dim: for (N, C, H, W) maps with W = 8 it protected the hidden conv and
    pruned the real head, the output went from (2, 3, 8, 8) to (2, 1, 8, 8), and verification (pruned vs pruned)
    passed."""
    model, x = SegNet(), torch.randn(2, 1, 8, 8)
    pruned = C.prune_structured(model, 0.5, (x,))
    assert pruned(x).shape == (2, 3, 8, 8)
    assert pruned.head.out_channels == 3
    assert pruned.hidden.out_channels == 4  # the hidden conv is what shrinks


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.h = nn.Linear(8, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.h(torch.relu(self.a(x)))}


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.h1, self.h2 = nn.Linear(8, 32), nn.Linear(32, 5), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.relu(self.a(x))
        return self.h1(z), self.h2(z)


class FeaturesAndLogits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.h = nn.Linear(8, 32), nn.Linear(32, 16), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.b(torch.relu(self.a(x))))
        return f, self.h(f)


class SequenceLM(nn.Module):
    """(N, T, V) logits with T = 16, the width of a hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.h = nn.Linear(8, 16), nn.Linear(16, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize(
    ("model", "x"),
    [
        (DictOut, torch.randn(4, 8)),
        (TwoHeads, torch.randn(4, 8)),
        (FeaturesAndLogits, torch.randn(4, 8)),
        (SequenceLM, torch.randn(2, 16, 8)),
    ],
    ids=["dict", "two_heads", "features_and_logits", "sequence_logits"],
)
def test_structured_pruning_keeps_every_output(model, x):
    """A dict output raised a bare StopIteration; only the first output's head was protected (a second head lost its
    classes); (N, T, V) logits were read as T channels and the head was pruned."""
    torch.manual_seed(0)
    m = model()
    pruned = C.prune_structured(m, 0.5, (x,))
    assert P._shapes(pruned(x)) == P._shapes(m(x))
    assert C.param_count(pruned) < C.param_count(m)


def test_structured_pruning_refuses_to_change_the_output_signature():
    model, x = SegNet(), torch.randn(2, 1, 8, 8)
    with pytest.raises(
        GuardConfigError,
        match=r"output signature from \(2, 3, 8, 8\) to \(2, 1, 8, 8\): pass the layers that produce the output",
    ):
        C.prune_structured(model, 0.5, (x,), ignored=[model.hidden], protect_head=False)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: C.quantize(m, "int3"), "`quantize` must be one of"),
        (lambda m: C.quantize(m, "int4_weight_only"), "`quantize='int4_weight_only'` needs the model on a CUDA device"),
        (lambda m: C.prune_unstructured(m, 1.0), "`amount` must be a number in [0, 1), got 1.0"),
        (lambda m: C.prune_structured(m, -0.1, (torch.zeros(1, 64),)), "`amount` must be a number in [0, 1), got -0.1"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(GuardConfigError) as err:
        call(mlp())
    assert str(err.value).startswith(message)
