import math

import pytest
import torch

from lightning_guard.functional import (
    EmaStats,
    clip_grads_,
    collect_grads,
    global_grad_norm,
    top_k_grad_norms,
    zclip_threshold,
)


def _grads(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(7, 5, dtype=dtype), torch.randn(11, dtype=dtype), torch.randn(3, 3, 3, dtype=dtype)]


def test_global_norm_matches_torch_reference():
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in _grads()]
    for p, g in zip(params, _grads(), strict=True):
        p.grad = g.clone()
    ref = torch.nn.utils.clip_grad_norm_(params, max_norm=1e9)
    assert global_grad_norm(collect_grads(params)).item() == pytest.approx(ref.item(), rel=1e-6)


def test_low_precision_grads_are_accumulated_in_fp32():
    grads = [torch.full((4096,), 300.0, dtype=torch.float16)]  # sum of squares overflows fp16
    norm = global_grad_norm(grads)
    assert norm.dtype == torch.float32
    assert norm.item() == pytest.approx(300.0 * 64.0)


def test_nonfinite_propagates_and_reduce_hook_is_used():
    assert math.isnan(global_grad_norm([torch.tensor([1.0, float("nan")])]).item())
    assert math.isinf(global_grad_norm([torch.tensor([float("inf")])]).item())
    # a sharded norm: the squared norm is reduced (here: as if 2 ranks held the same shard)
    assert global_grad_norm([torch.tensor([3.0, 4.0])], reduce_sq=lambda sq: sq * 2).item() == pytest.approx(
        5.0 * math.sqrt(2)
    )
    assert global_grad_norm([]).item() == 0.0


def test_clip_grads_in_place_mixed_dtypes():
    grads = [torch.ones(3), torch.ones(2, dtype=torch.bfloat16)]
    clip_grads_(grads, torch.tensor(0.25))
    assert grads[0].tolist() == [0.25] * 3
    assert grads[1].float().tolist() == [0.25] * 2


def test_ema_stats_are_nan_safe_and_track():
    s = EmaStats(alpha=0.9, warmup=5)
    for v in [1.0, float("nan"), 2.0, float("inf"), 3.0, 4.0, 5.0]:
        s.update(v)
    assert s.count == 5
    assert s.ready
    assert s.mean == pytest.approx(3.0)
    assert s.var == pytest.approx(2.0)  # population variance of 1..5
    assert math.isinf(s.z(float("nan")))
    before = (s.mean, s.var)
    s.update(float("nan"))
    assert (s.mean, s.var) == before  # a NaN never poisons the statistics (ZClip's flaw)
    s.update(13.0)
    assert s.mean == pytest.approx(4.0)


def test_ema_state_round_trip():
    s = EmaStats(alpha=0.8, warmup=2)
    for v in (1.0, 3.0, 2.0):
        s.update(v)
    t = EmaStats()
    t.load_state_dict(s.state_dict())
    assert (t.mean, t.var, t.count, t.alpha, t.warmup) == (s.mean, s.var, s.count, s.alpha, s.warmup)


def test_zclip_threshold_shrinks_for_bigger_outliers():
    at_bound = zclip_threshold(1.0, 0.2, z=3.0, z_threshold=3.0)
    assert at_bound == pytest.approx(1.0 + 3.0 * 0.2)
    assert zclip_threshold(1.0, 0.2, z=30.0, z_threshold=3.0) < at_bound


def test_top_k_puts_nonfinite_first():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, b.grad, c.grad = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0]), torch.tensor([float("inf"), 0.0])
    assert top_k_grad_norms([("a", a), ("b", b), ("c", c)], k=2) == [("c", math.inf), ("a", 5.0)]


def test_weighted_norm_counts_a_replicated_part_once():
    """HSDP: a part held by 2 replicas weighs 1/2 in the sum of squares over ranks; unweighted parts count fully."""
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    assert global_grad_norm([a, b], weights=[1.0, 1.0]).item() == pytest.approx(5.0)
    assert global_grad_norm([a, b], weights=[0.5, 1.0]).item() == pytest.approx((4.5 + 16.0) ** 0.5)
