"""The docs stay true to the code: every event kind the package emits is in the events reference."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATTERNS = [
    r"(?:_event|\.emit)\(\s*trainer,\s*\"([a-z_]+)\"",
    r"GuardEvent\.at\(\s*trainer,\s*[A-Za-z_.\"]+,\s*\"([a-z_]+)\"",
    r"notify\(\s*\"([a-z_]+)\"",
    r"GuardEvent\(\s*self\.guard_name,\s*\"([a-z_]+)\"",
    r"\bkind = \"([a-z_]+)\"",
]


def emitted_kinds() -> set[str]:
    kinds: set[str] = set()
    for path in (ROOT / "lightning_guard").rglob("*.py"):
        text = path.read_text()
        for pattern in PATTERNS:
            kinds.update(re.findall(pattern, text))
    kinds.discard("fault")  # FaultInjector's base default, never emitted as such
    kinds.discard("noticed")  # the example in emit()'s docstring
    kinds.update(f"nan_{t}" for t in ("batch", "loss", "grad"))  # InjectNaN: kind = f"nan_{target}"
    return kinds


def test_every_emitted_event_kind_is_in_the_events_reference():
    reference = (ROOT / "docs" / "events.md").read_text().split("## Reference: every event kind")[1]
    documented = set(re.findall(r"`([a-z_]+)`", reference))
    kinds = emitted_kinds()
    assert len(kinds) >= 30  # the scan finds the guards' events (it broke silently once the call style changed)
    assert kinds - documented == set()
