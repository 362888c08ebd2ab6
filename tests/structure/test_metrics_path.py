"""One path for metrics: every number reaches the loggers through ``GuardCallback.log_metrics`` (direct, through
``lightning_guard._metrics.write_metrics``, or monitorable, through the module's ``log_dict``); nothing else in the
package calls a logger's ``log_metrics`` or a module's ``log``/``log_dict``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from lightning.pytorch import Callback

from lightning_guard import GradientGuard, GuardCallback, GuardConfigError
from lightning_guard.testing import InjectNaN
from tests.callbacks.test_oom_guard_steps import MemoryLogger  # keeps every log_metrics call
from tests.helpers import DigitsNet, digits_loaders, trainer

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_guard"
#: the one writer to loggers, and the one method that chooses between it and ``log_dict``
WRITER = "_metrics.py"
CHOOSER = "callbacks/_base.py"
#: a LightningModule of the package's own (the demo's model logs its losses like any user's module)
USER_MODULES = {"demo.py"}


def _calls(path: Path) -> list[tuple[str, int]]:
    """``(attribute, line)`` for each call of ``.log_metrics`` (but ``self.log_metrics``, the guard base's method),
    ``.log_dict`` or ``.log("name", ...)``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name = node.func.attr
        named_log = (
            name == "log" and bool(node.args) and isinstance(node.args[0], ast.Constant | ast.JoinedStr)
        )  # Lightning's self.log("key", value), not torch's x.log()
        receiver = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        if name == "log_metrics" and receiver in ("self", "GuardCallback"):
            continue  # GuardCallback.log_metrics: the path itself
        if name in ("log_metrics", "log_dict") or named_log:
            found.append((name, node.lineno))
    return found


def test_only_the_writer_and_the_base_reach_the_loggers():
    stray = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        for name, line in _calls(path):
            allowed = (
                (rel == WRITER and name == "log_metrics")
                or (rel == CHOOSER and name in ("log_dict", "log_metrics"))
                or rel in USER_MODULES
            )
            if not allowed:
                stray.append(f"{rel}:{line} .{name}(...)")
    assert not stray, "metrics reach the loggers only through GuardCallback.log_metrics:\n" + "\n".join(stray)


def test_the_scan_sees_each_way_of_logging(tmp_path):
    """The scan above would see a stray writer (so it can fail)."""
    src = tmp_path / "m.py"
    src.write_text(
        "def f(logger, pl_module, x):\n"
        "    logger.log_metrics({'a': 1.0}, step=0)\n"
        "    pl_module.log_dict({'a': 1.0})\n"
        "    pl_module.log('a', 1.0)\n"
        "    pl_module.log(f'a{x}', 1.0)\n"
        "    self.log_metrics(None, {})\n"
        "    return x.log()\n"
    )
    assert [n for n, _ in _calls(src)] == ["log_metrics", "log_dict", "log", "log"]


class Reporter(GuardCallback):
    """A third-party guard that reports one number each way at every batch end."""

    guard_name = "reporter"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.log_metrics(trainer, {"reporter/direct": float(batch_idx)}, every=2)
        self.log_metrics(trainer, {"reporter/monitored": float(batch_idx)}, monitorable=True, on_step=True)


def test_direct_metrics_land_at_the_global_step_and_monitorable_ones_reach_callback_metrics(tmp_path):
    tr, va = digits_loaders(n_train=192)  # 6 steps
    rows = MemoryLogger()
    seen: dict[str, float] = {}

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("reporter/")})

    t = trainer(tmp_path, [Reporter(), Watch()], logger=rows, max_epochs=1)
    t.fit(DigitsNet(), tr, va)
    direct = [(step, m["reporter/direct"]) for step, m in rows.rows if "reporter/direct" in m]
    # on_train_batch_end runs after the step: the global step is batch_idx + 1; due at 2, 4, 6
    assert direct == [(2, 1.0), (4, 3.0), (6, 5.0)]
    monitored = [(step, m["reporter/monitored"]) for step, m in rows.rows if "reporter/monitored" in m]
    assert [v for _, v in monitored] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # Lightning's cadence (every step here)
    assert seen == {"reporter/monitored": 5.0}  # only the monitorable route reaches callback_metrics


def test_every_guard_number_goes_through_the_base_method(tmp_path, monkeypatch):
    """GradientGuard's norms and the event counters come out of write_metrics (the one writer)."""
    from lightning_guard import _metrics

    written: list[dict[str, float]] = []
    real = _metrics.write_metrics

    def spy(trainer, metrics, *, step=None):
        written.append(dict(metrics))
        return real(trainer, metrics, step=step)

    monkeypatch.setattr("lightning_guard.callbacks._base.write_metrics", spy)
    monkeypatch.setattr("lightning_guard.events.write_metrics", spy)
    tr, va = digits_loaders(n_train=128)
    t = trainer(tmp_path, [GradientGuard(), InjectNaN("loss", steps=[2])], logger=MemoryLogger(), max_epochs=1)
    t.fit(DigitsNet(), tr, va)
    keys = {k for m in written for k in m}
    assert "guard/grad_norm" in keys
    assert "guard/gradient_guard/nonfinite_skip" in keys  # the NaN step's skip, counted (an event counter)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every": 5, "monitorable": True}, r"`every` is for direct metrics.*got every=5"),
        ({"on_step": True}, r"\['on_step'\] are `self.log` options: pass them with monitorable=True"),
        ({"every": 0}, r"`every` must be an int >= 1, got 0"),
    ],
)
def test_log_metrics_refuses_mixed_routes(kwargs, message):
    with pytest.raises(GuardConfigError, match=message):
        Reporter().log_metrics(None, {"a": 1.0}, **kwargs)  # type: ignore[arg-type]


def test_a_subclass_helper_named_log_metrics_does_not_take_over_the_built_in_guards(tmp_path):
    """Review: GradientGuard and OverfitGuard called self.log_metrics, so a 0.1.0 subclass with a helper of that name
    crashed at the first step (``MyGG.log_metrics() got an unexpected keyword argument 'every'``)."""
    from lightning_guard import OverfitGuard

    class MyGG(GradientGuard):
        def log_metrics(self, metrics):  # type: ignore[override]
            self.mine = dict(metrics)

    class MyOverfit(OverfitGuard):
        def log_metrics(self, name, value):  # type: ignore[override]
            raise AssertionError("not this one")

    rows = MemoryLogger()
    tr, va = digits_loaders(n_train=128)
    t = trainer(tmp_path, [MyGG(), MyOverfit(patience=3)], logger=rows, max_epochs=2)
    t.fit(DigitsNet(), tr, va)
    keys = {k for _, m in rows.rows for k in m}
    assert {"guard/grad_norm", "guard/overfit/gap"} <= keys
