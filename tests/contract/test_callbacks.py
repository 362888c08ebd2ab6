"""Contract of every exported callback: constructs with defaults, pickles (ddp_spawn pickles callbacks), round-trips
its state through a checkpoint dict, and survives `fit` twice, the second fit leaving it as a fresh instance's would."""

import inspect
import pickle

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_guard
import lightning_guard.testing
from tests.helpers import DigitsNet, digits_loaders, precision_kwargs, trainer

CALLBACKS = sorted(
    {
        obj
        for mod in (lightning_guard, lightning_guard.testing)
        for name in mod.__all__
        if inspect.isclass(obj := getattr(mod, name))
        and issubclass(obj, Callback)
        and not inspect.isabstract(obj)
        and name not in ("GuardCallback", "FaultInjector")
    },
    key=lambda c: c.__name__,
)
REQUIRED = {"SimulatedOOM": {"max_batch_size": 10_000}}
TRAINER_KWARGS = {"ScaleOverflow": precision_kwargs("16-mixed")}  # refused without a GradScaler, by design


def same(a, b) -> bool:
    """Equality for state dicts: tensors by value, NaN equal to NaN, containers recursively."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return a == b


def make(cls):
    return cls(**REQUIRED.get(cls.__name__, {}))


def test_discovers_the_public_callbacks():
    names = {c.__name__ for c in CALLBACKS}
    assert {"WarmupCosine", "InjectNaN", "LossSpike", "LRSpike", "SimulatedOOM"} <= names


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_constructs_and_pickles(cls):
    cb = make(cls)
    clone = pickle.loads(pickle.dumps(cb))
    assert type(clone) is cls
    assert clone.state_key == cb.state_key


@pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)
def test_state_round_trip_and_fit_twice(tmp_path, cls):
    tr, va = digits_loaders(n_train=64)
    cb = make(cls)
    kwargs = TRAINER_KWARGS.get(cls.__name__, {})
    for i in range(2):
        torch.manual_seed(i)
        t = trainer(tmp_path / str(i), [cb], **kwargs)
        model = DigitsNet()
        t.fit(model, tr, va)
        assert t.state.finished, f"fit #{i + 1} did not finish"
        assert all(torch.isfinite(p).all() or cls.__name__ in ("InjectNaN",) for p in model.parameters())
    state = cb.state_dict()
    torch.manual_seed(1)
    once = make(cls)
    trainer(tmp_path / "fresh", [once], **kwargs).fit(DigitsNet(), tr, va)
    assert same(once.state_dict(), state), "a reused instance ends its second fit unlike a fresh one"
    fresh = make(cls)
    fresh.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert same(fresh.state_dict(), state)


GUARDS = [c for c in CALLBACKS if c.__module__.startswith("lightning_guard.callbacks")]


@pytest.mark.parametrize("cls", GUARDS, ids=lambda c: c.__name__)
def test_lightning_cli_constructs_the_guard_as_python_does(tmp_path, cls):
    """The matrix's LightningCLI column: each guard from a config equals the same guard made in Python."""
    from lightning.pytorch.cli import LightningCLI

    config = {
        "trainer": {
            "callbacks": [{"class_path": f"{cls.__module__}.{cls.__name__}"}],
            "default_root_dir": str(tmp_path),
            "logger": False,
        }
    }
    cli = LightningCLI(DigitsNet, run=False, args=config, save_config_callback=None)
    (made,) = [c for c in cli.trainer.callbacks if isinstance(c, cls)]
    direct = make(cls)
    public = lambda cb: {k: v for k, v in vars(cb).items() if not k.startswith("_")}  # noqa: E731
    assert same(public(made), public(direct))
    assert made.state_key == direct.state_key
