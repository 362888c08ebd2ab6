"""The package's imports only look down its layers, and no module imports itself back through others.

Every import counts: at module level, inside functions, and under ``TYPE_CHECKING``. The layers are those of
``docs/architecture.md``; a module not named in :data:`LAYERS` fails the test until it is placed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_guard"

#: lowest first; a module may import modules of its own layer or below (prefix match on the dotted name)
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "lightning_guard.errors",
        "lightning_guard._checks",
        "lightning_guard._compat",
        "lightning_guard._sharded",
        "lightning_guard._state",
        "lightning_guard._wrapping",
    ),
    ("lightning_guard.functional", "lightning_guard.lr_scheduler"),
    (
        "lightning_guard.distributed",
        "lightning_guard._agreement",
        "lightning_guard._fence",
        "lightning_guard._wandb",
        "lightning_guard._metrics",
    ),
    ("lightning_guard.events",),
    ("lightning_guard._runtime",),
    ("lightning_guard.mixin",),
    ("lightning_guard.callbacks._base", "lightning_guard.callbacks._snapshot"),
    ("lightning_guard.callbacks", "lightning_guard.compress"),
    ("lightning_guard.testing", "lightning_guard.plot"),
    ("lightning_guard.demo", "lightning_guard"),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    """The layer of a module: the longest prefix in :data:`LAYERS` that names it or a package above it."""
    best, layer = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), i
    if layer < 0:
        raise AssertionError(f"{name} is in no layer of tests/structure/test_layers.py: place it")
    return layer


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """The package modules ``name`` imports, with the line, wherever the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            # `from pkg import sub` imports the submodule `pkg.sub` where one exists, else a name of `pkg`
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found += [(t, node.lineno) for t in targets if t == "lightning_guard" or t.startswith("lightning_guard.")]
    return found


def graph() -> dict[str, list[tuple[str, int]]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_only_look_down():
    upward = [
        f"{name}:{line} imports {target} (layer {layer_of(target)} above {layer_of(name)})"
        for name, targets in graph().items()
        for target, line in targets
        if layer_of(target) > layer_of(name)
    ]
    assert not upward, "imports that look up:\n" + "\n".join(upward)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle of the graph (modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle():
    # a package's __init__ re-exporting its modules is not an arrow back: only module-to-module edges count
    edges = {
        name: {t for t, _ in targets if t != name and not name.startswith(t + ".")} for name, targets in graph().items()
    }
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("edges", "expected"),
    [({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]), ({"a": {"b"}, "b": {"c"}, "c": set()}, None)],
)
def test_the_circle_finder_finds_circles(edges, expected):
    assert find_cycle(edges) == expected


def test_the_layer_check_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "lightning_guard" / "events.py"
    src.parent.mkdir()
    src.write_text("def f():\n    from lightning_guard._runtime import get_runtime\n")
    known = {"lightning_guard._runtime", "lightning_guard.events"}
    assert imports_of("lightning_guard.events", src, known) == [("lightning_guard._runtime", 2)]
    assert layer_of("lightning_guard._runtime") > layer_of("lightning_guard.events")


class _TwoRankStrategy:
    """A strategy of rank 1 of 2 whose all_gather returns this rank's tensor twice (no process group needed)."""

    root_device = __import__("torch").device("cpu")

    def __init__(self) -> None:
        self.gathers = 0

    def all_gather(self, tensor):
        import torch

        self.gathers += 1
        return torch.stack([tensor, tensor])


def _rank1_trainer(tmp_path):
    from types import SimpleNamespace

    return SimpleNamespace(
        world_size=2,
        global_rank=1,
        global_step=0,
        current_epoch=0,
        strategy=_TwoRankStrategy(),
        default_root_dir=str(tmp_path),
        loggers=[],
    )


def test_collectives_know_no_events_the_runtime_carries_them(tmp_path):
    import torch

    from lightning_guard._runtime import GuardRuntime
    from lightning_guard.distributed import agree
    from lightning_guard.events import GuardEvent

    trainer = _rank1_trainer(tmp_path)
    runtime = GuardRuntime(trainer)  # type: ignore[arg-type]
    runtime.events.emit(GuardEvent.at(trainer, "g", "k"))  # type: ignore[arg-type]
    assert runtime.events.pending() == 1
    plain = agree(trainer, True, torch.tensor([2.5]))  # type: ignore[arg-type]
    assert plain.values == ((2.5,), (2.5,))
    assert runtime.events.pending() == 1
    carried = runtime.agree(True, torch.tensor([2.5]))
    # the pending count rode in the same row (stripped from the values); the exchange followed (rank 1: outbox sent)
    assert carried.flags == (True, True)
    assert carried.values == ((2.5,), (2.5,))
    assert runtime.events.pending() == 0
    assert trainer.strategy.gathers == 1 + 1 + 2  # plain agree, the runtime's agree, gather_json's two gathers
