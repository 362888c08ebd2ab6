import itertools
import math

import pytest

from lightning_guard.functional import cosine_cycle_bounds, warmup_cosine, warmup_cosine_phase


def test_warmup_is_linear_monotone_and_never_zero():
    vals = [warmup_cosine(s, 100, 10, start_factor=0.1) for s in range(11)]
    assert vals[0] == pytest.approx(0.1)
    assert all(b > a for a, b in itertools.pairwise(vals))
    assert vals[10] == pytest.approx(1.0)


def test_decay_is_monotone_and_reaches_min_exactly_at_the_end():
    vals = [warmup_cosine(s, 50, 5, min_lr_ratio=0.2) for s in range(5, 51)]
    assert all(b <= a for a, b in itertools.pairwise(vals))
    assert vals[-1] == 0.2  # exactly, after the last step
    assert warmup_cosine(500, 50, 5, min_lr_ratio=0.2) == 0.2  # floor holds past the end
    assert min(vals[:-1]) > 0.2


def test_cosine_midpoint_and_zero_warmup():
    assert warmup_cosine(0, 10, 0) == pytest.approx(1.0)
    assert warmup_cosine(5, 10, 0) == pytest.approx(0.5)


def test_restarts_peaks_and_lengths():
    assert cosine_cycle_bounds(70, 3, 2.0) == [(0, 10), (10, 20), (30, 40)]
    assert sum(n for _, n in cosine_cycle_bounds(97, 4, 1.7)) == 97
    total, warm = 2 + 70, 2
    f = [warmup_cosine(s, total, warm, cycles=3, cycle_mult=2.0, peak_decay=0.5) for s in range(total + 1)]
    assert f[warm] == pytest.approx(1.0)
    assert f[warm + 10] == pytest.approx(0.5)  # second cycle starts at peak 0.5
    assert f[warm + 30] == pytest.approx(0.25)  # third at 0.25
    assert f[warm + 9] < f[warm + 10]  # a restart jumps up
    assert f[-1] == 0.0


def test_phase():
    assert [warmup_cosine_phase(s, 5, 2) for s in range(7)] == [
        "warmup",
        "warmup",
        "decay",
        "decay",
        "decay",
        "floor",
        "floor",
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start_factor": 0.0}, r"`start_factor` must be in \(0, 1\], got 0.0"),
        ({"min_lr_ratio": 1.5}, r"`min_lr_ratio` must be in \[0, 1\], got 1.5"),
        ({"cycles": 0}, r"`cycles` must be an int >= 1, got 0"),
        ({"cycle_mult": -1.0}, r"`cycle_mult` must be a number > 0, got -1.0"),
        ({"peak_decay": 2.0}, r"`peak_decay` must be in \(0, 1\], got 2.0"),
    ],
)
def test_shape_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        warmup_cosine(0, 10, 1, **kwargs)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 10, 1), r"`step` must be >= 0, got -1"),
        ((0, 0, 0), r"`total_steps` must be >= 1, got 0"),
        ((0, 10, 11), r"`warmup_steps` must be in \[0, total_steps=10\], got 11"),
    ],
)
def test_count_errors(args, match):
    with pytest.raises(ValueError, match=match):
        warmup_cosine(*args)


def test_values_match_closed_form():
    total, warm = 40, 4
    for s in range(warm, total):
        expected = 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert warmup_cosine(s, total, warm) == pytest.approx(expected)
