"""Shared pytest configuration."""

import pytest


def pytest_collection_modifyitems(config, items):
    """Rerun a `ddp` test only when a spawned worker died by a signal, never on an assertion.

    On these CPU machines a ddp_spawn worker occasionally aborts at interpreter exit, after training finished
    ("terminate called without an active exception" -> SIGABRT, about one full-suite run in four, never in isolation),
    which torch reports as ProcessExitedException "... terminated with signal SIGABRT". That is the runtime's
    shutdown, not the behaviour under test; any failed assertion still fails the test at once. tests/helpers.trainer
    also destroys the process group at teardown in the workers (ReleaseProcessGroup), which made the abort go away in
    the runs measured (0 of 6 vs 1 of 4); the rerun stays as a backstop.
    """
    for item in items:
        if item.get_closest_marker("ddp"):
            item.add_marker(pytest.mark.flaky(reruns=2, only_rerun=["terminated with signal"]))


def _tree_status() -> set[str] | None:
    """`git status --porcelain` lines of the repository (None outside a git checkout)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return None
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def _leaves_the_tree_clean(request):
    """The suite writes only under pytest's tmp paths: `git status` after it equals `git status` before it.

    Benchmarks (`-m benchmark`, `make bench`) may also write their documented outputs under `docs/benchmarks/`.
    """
    before = _tree_status()
    yield
    after = _tree_status()
    if before is not None and after is not None:
        written = sorted(after - before)
        if "benchmark" in (request.config.getoption("markexpr", "") or ""):
            written = [line for line in written if not line[3:].startswith("docs/benchmarks/")]
        assert not written, f"the tests wrote into the working tree: {written[:10]}"
