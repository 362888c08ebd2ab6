"""Every example runs (with --fast) and returns its result."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE_DIR = Path(__file__).parent.parent / "examples"
EXAMPLES = [
    # the ddp_spawn example gets the `ddp` mark: a worker that aborts at interpreter exit is rerun (see conftest.py)
    pytest.param(p, marks=[pytest.mark.ddp] if "ddp" in p.stem else [], id=p.stem)
    for p in sorted(EXAMPLE_DIR.glob("*.py"))
    if not p.name.startswith("_")  # _digits.py is shared code
]


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES)
def test_example_runs(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))  # as `python examples/x.py` does
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--fast"])
    assert result  # each example returns what it measured
