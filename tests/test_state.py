"""Strict, versioned checkpoint state: every stateful guard writes a version; an unknown or missing key, or a newer
version, is a clear error naming the guard and the key; a state from before versions (0) is migrated."""

from __future__ import annotations

import math
import tempfile

import lightning.pytorch as pl
import pytest

from lightning_guard import ClassBalance, GradientGuard, GuardEvent, OOMGuard, OverfitGuard, WarmupCosine
from lightning_guard._runtime import GuardRuntime
from lightning_guard._state import StateSchema
from lightning_guard.errors import GuardConfigError, GuardStateError

GUARDS = {
    "GradientGuard": GradientGuard,
    "OOMGuard": OOMGuard,
    "OverfitGuard": lambda: OverfitGuard(monitor="val_loss"),
    "ClassBalance": ClassBalance,
    "WarmupCosine": WarmupCosine,
}


@pytest.mark.parametrize("name", list(GUARDS))
def test_the_state_carries_its_version_and_loads_back(name):
    guard = GUARDS[name]()
    state = guard.state_dict()
    assert state["version"] == type(guard).STATE_VERSION == 1
    fresh = GUARDS[name]()
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state


@pytest.mark.parametrize("name", list(GUARDS))
def test_an_unknown_key_is_an_error_naming_the_guard_and_the_key(name):
    state = {**GUARDS[name]().state_dict(), "histroy": []}
    with pytest.raises(GuardStateError, match=rf"^{name}: unknown key 'histroy' in its checkpoint state"):
        GUARDS[name]().load_state_dict(state)


@pytest.mark.parametrize("name", list(GUARDS))
def test_a_missing_key_is_an_error_naming_the_guard_and_the_key(name):
    state = GUARDS[name]().state_dict()
    key = sorted(k for k in state if k != "version")[0]
    del state[key]
    with pytest.raises(GuardStateError, match=rf"^{name}: key '{key}' is missing from its checkpoint state"):
        GUARDS[name]().load_state_dict(state)


@pytest.mark.parametrize("name", list(GUARDS))
def test_a_newer_version_is_refused(name):
    state = {**GUARDS[name]().state_dict(), "version": 2}
    with pytest.raises(GuardStateError, match=rf"^{name}: the checkpoint's state is version 2, written by a newer"):
        GUARDS[name]().load_state_dict(state)


@pytest.mark.parametrize("name", list(GUARDS))
def test_a_state_from_before_versions_is_migrated(name):
    """Version 0 (no ``version`` key): the same keys load as version 1 does; missing keys take the old defaults."""
    current = GUARDS[name]().state_dict()
    v0 = {k: v for k, v in current.items() if k != "version"}
    fresh = GUARDS[name]()
    fresh.load_state_dict(v0)
    assert fresh.state_dict() == current
    partial = GUARDS[name]()
    partial.load_state_dict({})  # a 0.x state lacking every key: what its loader assumed
    assert partial.state_dict() == current


def test_gradient_guard_migrates_the_single_optimizer_values_of_0x():
    guard = GradientGuard()
    guard.load_state_dict({"consecutive_bad": 3, "backoff_scale": 0.5})  # 0.x: one value, not a list per optimizer
    state = guard.state_dict()
    assert state["consecutive_bad"] == [3]
    assert state["backoff_scale"] == [0.5]


def test_overfit_guard_migrates_val_min_by_its_direction():
    low = OverfitGuard(monitor="val_loss")
    low.load_state_dict({"best": 0.25})
    assert low.state_dict()["val_min"] == 0.25
    high = OverfitGuard(monitor="val_acc")
    high.load_state_dict({"best": 0.9})
    assert math.isinf(high.state_dict()["val_min"])


def test_the_runtime_and_event_log_are_strict_and_versioned():
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=tempfile.mkdtemp())
    runtime = GuardRuntime(trainer)
    runtime.events.emit(GuardEvent.at(trainer, "g", "k"))
    state = runtime.state_dict()
    assert state["version"] == 1
    assert state["events"]["version"] == 1
    other = GuardRuntime(trainer)
    other.load_state_dict(state)
    assert [e.kind for e in other.events.events] == ["k"]
    with pytest.raises(GuardStateError, match=r"runtime .*unknown key 'applied'"):
        GuardRuntime(trainer).load_state_dict({**state, "applied": []})
    with pytest.raises(GuardStateError, match=r"^lightning_guard event log: unknown key 'evnts'"):
        GuardRuntime(trainer).load_state_dict({**state, "events": {"version": 1, "evnts": []}})
    GuardRuntime(trainer).load_state_dict({"applied_steps": [3]})  # version 0: the events default to none


def test_schema_errors_are_clear():
    schema = StateSchema("MyGuard", 2, frozenset({"a"}), migrations={1: lambda s: {"a": s["old"]}})
    assert schema.load({"version": 1, "old": 5}) == {"a": 5}
    gap = StateSchema("MyGuard", 3, frozenset({"a"}), migrations={1: lambda s: s})
    with pytest.raises(GuardStateError, match=r"^MyGuard: no migration from checkpoint state version 2"):
        gap.load({"version": 2, "a": 1})
    with pytest.raises(GuardStateError, match=r"^MyGuard: checkpoint state version must be an int >= 0, got 'x'"):
        schema.load({"version": "x", "a": 1})
    with pytest.raises(GuardStateError, match=r"^MyGuard: its checkpoint state must be a mapping, got list"):
        schema.load([])  # type: ignore[arg-type]


# ------------------------------------------------------------------ found by the review of the strict state
def test_a_0x_gradient_guard_state_with_its_removed_key_is_migrated():
    """GradientGuard wrote ``spike_steps`` (and one loss-stats dict, one bad count) until 2026-12-02."""
    guard = GradientGuard()
    guard.load_state_dict({"spike_steps": [3, 7], "consecutive_bad": 2, "rollbacks": 1})
    state = guard.state_dict()
    assert "spike_steps" not in state
    assert state["consecutive_bad"] == [2]
    assert state["rollbacks"] == 1


class CountingGuard(GradientGuard):
    """A user's subclass adding its own key, the ordinary Lightning way."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def state_dict(self):
        return {**super().state_dict(), "seen": self.seen}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.seen = int(state_dict["seen"])


def test_a_subclass_keeps_its_own_keys_and_the_guard_stays_strict_on_its_own():
    guard = CountingGuard()
    guard.seen = 12
    fresh = CountingGuard()
    fresh.load_state_dict(guard.state_dict())
    assert fresh.seen == 12
    state = guard.state_dict()
    del state["rollbacks"]
    with pytest.raises(GuardStateError, match=r"^GradientGuard: key 'rollbacks' is missing"):
        CountingGuard().load_state_dict(state)


def test_the_old_protocol_names_are_refused_or_pointed_to_their_new_names():
    from lightning_guard import GuardCallback

    with pytest.raises(
        GuardConfigError, match=r"^Mine defines `_step_vote`, which the guard protocol calls `step_vote`"
    ):

        class Mine(GuardCallback):
            def _step_vote(self, trainer, pl_module, optimizer):
                return [1.0]

    with pytest.raises(AttributeError, match=r"^GuardCallback\._emit is now `emit`"):
        GradientGuard()._emit  # noqa: B018
    with pytest.raises(
        ImportError, match=r"^lightning_guard.events.event_stream moved: import it as `from lightning_guard"
    ):
        from lightning_guard.events import event_stream  # noqa: F401


def test_a_hand_back_a_guard_cannot_load_costs_the_others_nothing(tmp_path, monkeypatch):
    """ddp_spawn hand-back: a guard whose state does not load is warned about; the next guard and the events load."""
    import torch

    from lightning_guard import event_stream
    from lightning_guard.callbacks import _base

    first, second = GradientGuard(), WarmupCosine()
    trainer = pl.Trainer(accelerator="cpu", logger=False, default_root_dir=str(tmp_path), callbacks=[first, second])
    first.__dict__["_spawn_token"] = token = "test-hand-back"
    runtime_state = GuardRuntime(trainer).state_dict()
    good = {**WarmupCosine().state_dict(), "total_steps": [40]}
    payload = {
        "jsonl": str(tmp_path / "run" / "guard_events.jsonl"),
        "runtime": runtime_state,
        "guards": [{"x": 1}, good],
    }
    torch.save(payload, _base._hand_back_path(token))
    monkeypatch.setattr(_base, "_spawned_worker", lambda trainer: True)
    with pytest.warns(UserWarning, match=r"the final state of GradientGuard handed back .* unknown key 'x'"):
        event_stream(trainer)
    assert second.state_dict()["total_steps"] == [40]


def test_a_subclass_overriding_emit_sees_the_guards_events(tmp_path):
    """``emit`` is a protocol member: an OOMGuard subclass that tags its events through it sees OOMGuard's own."""
    from lightning_guard import OOMGuard, event_stream
    from lightning_guard.testing import SimulatedOOM
    from tests.helpers import DigitsNet, digits_loaders, trainer

    class Tagged(OOMGuard):
        def emit(self, trainer, kind, message, **kwargs):
            super().emit(trainer, kind, "[infra] " + message, **kwargs)

    tr, _ = digits_loaders(n_train=64, batch_size=32)
    t = trainer(tmp_path, [Tagged(), SimulatedOOM(max_batch_size=16, steps=[1])], max_steps=2)
    t.fit(DigitsNet(), tr)
    retries = [e for e in event_stream(t).events if e.guard == "oom" and e.kind == "oom_retry"]
    assert len(retries) == 1
    assert retries[0].message.startswith("[infra] ")


def test_gradient_guard_and_overfit_guard_events_go_through_emit_too(tmp_path):
    """Their ``_event`` helpers built the event and called the runtime's ``emit`` directly, so a subclass's ``emit``
    (docs/extending.md: "the built-in guards report through it too") never saw GradientGuard's or OverfitGuard's."""
    from lightning_guard import GradientGuard, OverfitGuard, event_stream
    from lightning_guard.testing import InjectNaN
    from tests.helpers import DigitsNet, digits_loaders, trainer

    class TaggedGG(GradientGuard):
        def emit(self, trainer, kind, message, **kwargs):
            super().emit(trainer, kind, "[gg] " + message, **kwargs)

    class TaggedOF(OverfitGuard):
        def emit(self, trainer, kind, message, **kwargs):
            super().emit(trainer, kind, "[of] " + message, **kwargs)

    tr, va = digits_loaders(n_train=128)
    t = trainer(tmp_path, [TaggedGG(), TaggedOF(patience=1), InjectNaN("loss", steps=[1])], max_epochs=3)
    t.fit(DigitsNet(), tr, va)
    events = event_stream(t).events
    (skip,) = [e for e in events if e.guard == "gradient_guard" and e.kind == "nonfinite_skip"]
    assert skip.message.startswith("[gg] ")
    assert skip.ranks == (0,)
    overfit = [e for e in events if e.guard == "overfit_guard"]
    assert overfit
    assert all(e.message.startswith("[of] ") for e in overfit)
