import pytest
import torch

from lightning_guard import GuardConfigError, WarmupCosineLR
from lightning_guard.functional import warmup_cosine


def _step(model, opt, sched, grad_value=1.0):
    opt.zero_grad()
    (model(torch.ones(1, 2)).sum() * grad_value).backward()
    opt.step()
    sched.step()


def test_follows_the_function_with_two_groups():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.1}])
    sched = WarmupCosineLR(opt, total_steps=20, warmup=0.2, min_lr_ratio=0.1)
    for s in range(1, 21):
        _step(model, opt, sched)
        f = warmup_cosine(s, 20, 4, min_lr_ratio=0.1)
        assert opt.param_groups[0]["lr"] == pytest.approx(f)
        assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * f)


def test_gradscaler_skip_holds_the_schedule():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = WarmupCosineLR(opt, total_steps=10, warmup=2)
    scaler = torch.amp.GradScaler("cpu")
    lrs = []
    for s in range(4):
        opt.zero_grad()
        loss = model(torch.ones(1, 2)).sum() * (float("inf") if s == 1 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    # step 1 was skipped by the scaler: the LR did not move on it
    assert sched.real_steps == 3
    assert lrs[1] == lrs[0]
    assert lrs[-1] == pytest.approx(warmup_cosine(3, 10, 2))


def test_state_dict_round_trip_resumes_exactly():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = WarmupCosineLR(opt, total_steps=10, warmup=3)
    for _ in range(4):
        _step(model, opt, sched)
    state = sched.state_dict()
    assert "_hook" not in state
    assert "optimizer" not in state
    opt2 = torch.optim.SGD(model.parameters(), lr=1.0)
    sched2 = WarmupCosineLR(opt2, total_steps=10, warmup=3)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    for _ in range(3):
        _step(model, opt, sched)
        _step(model, opt2, sched2)
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_steps": 0}, r"`total_steps` must be a positive int, got 0"),
        ({"total_steps": 10, "warmup": 1.0}, r"`warmup` as a fraction must be in \[0, 1\), got 1.0"),
        ({"total_steps": 10, "warmup": 10}, r"`warmup` must give between 0 and total_steps - 1 \(9\) steps, got 10"),
        (
            {"total_steps": 10, "warmup": "5"},
            r"`warmup` must be an int \(steps\) or a float in \[0, 1\) \(fraction\), got '5'",
        ),
        ({"total_steps": 10, "start_factor": 0}, r"`start_factor` must be in \(0, 1\], got 0"),
    ],
)
def test_errors(kwargs, match):
    opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=1.0)
    with pytest.raises(GuardConfigError, match=match):
        WarmupCosineLR(opt, **kwargs)
