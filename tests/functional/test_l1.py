"""L1 primitives: the subgradient with and without a kept workspace."""

import pytest
import torch

from lightning_guard.functional import l1_subgradient_


def test_the_subgradient_with_a_workspace_equals_the_one_without_and_skips_params_without_gradient():
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(5, 4)),
        torch.nn.Parameter(torch.randn(3)),
        torch.nn.Parameter(torch.randn(2, 2)),
    ]
    params[0].data[0, 0] = 0.0  # sign 0: no subgradient
    grads = [torch.randn_like(p) for p in params]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q, g in zip(params, plain, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    params[1].grad = plain[1].grad = None
    workspace = [torch.full_like(p, 7.0) for p in params]  # stale contents must not leak in
    for _ in range(2):  # reused across steps
        l1_subgradient_(params, 0.1, workspace=workspace)
        l1_subgradient_(plain, 0.1)
    for p, q in zip(params, plain, strict=True):
        if q.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    torch.testing.assert_close(params[0].grad, grads[0] + 0.2 * params[0].detach().sign(), rtol=0, atol=1e-6)


def test_l1_norm_and_zero_count_weighted_by_copies():
    from lightning_guard.functional.l1 import l1_norm, zero_count

    ps = [torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.0, 4.0])]
    assert l1_norm(ps, [0.5, 1.0]).item() == pytest.approx(1.5 + 4.0)
    assert zero_count(ps, [0.5, 1.0]).item() == pytest.approx(1.5)
    assert zero_count(ps).item() == 2
