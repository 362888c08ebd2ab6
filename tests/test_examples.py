"""Every example runs (with --fast) and returns its result."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLE_DIR = Path(__file__).parent.parent / "examples"
EXAMPLES = sorted(p for p in EXAMPLE_DIR.glob("*.py") if not p.name.startswith("_"))  # _digits.py is shared code


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLE_DIR))  # as `python examples/x.py` does
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--fast"])
    assert result  # each example returns what it measured
