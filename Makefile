# Each target sets itself up: a local virtual environment in .venv, the CPU torch wheel first
# (so pip never pulls a multi-GB CUDA build), then the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The oldest leg: the contract matrix again, with the lowest lightning and torchmetrics pyproject.toml declares
# (read from it, so a declared minimum is always a version the tests ran on).
OLD_VENV := .venv-oldest
OLD_BIN := $(OLD_VENV)/bin
OLD_STAMP := $(OLD_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
OLDEST = $(shell $(PY) -c "import re; t = open('pyproject.toml').read(); \
	print(' '.join(f'{n}=={v}' for n, v in re.findall(r'\"(lightning|torchmetrics)>=([0-9.]+)\"', t)))")
OLDEST_TESTS := tests/contract/test_matrix.py tests/structure/test_compat.py tests/test_state.py

.PHONY: demo test test-newest test-oldest lint typecheck docs bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev,export]"
	touch $(STAMP)

demo: $(STAMP)
	WANDB_SILENT=true $(BIN)/python -m lightning_guard.demo

lint: $(STAMP)
	$(BIN)/ruff check lightning_guard tests examples
	$(BIN)/ruff format --check lightning_guard tests examples

typecheck: $(STAMP)
	$(BIN)/mypy

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

$(OLD_STAMP): pyproject.toml
	@test -n "$(OLDEST)" || (echo "could not read the lightning/torchmetrics minimums from pyproject.toml" && exit 1)
	test -x $(OLD_BIN)/python || $(PY) -m venv $(OLD_VENV)
	$(OLD_BIN)/python -m pip install -q --upgrade pip
	$(OLD_BIN)/python -m pip install -q "torch==2.13.0"
	$(OLD_BIN)/python -m pip install -q -e ".[dev,export]" $(OLDEST)
	touch $(OLD_STAMP)

test: test-newest test-oldest

test-newest: $(STAMP) lint typecheck docs
	WANDB_MODE=offline WANDB_SILENT=true $(BIN)/python -m pytest -q -p no:randomly

test-oldest: $(OLD_STAMP)
	$(OLD_BIN)/python -c "import importlib.metadata as m, sys; pins = '$(OLDEST)'.split(); \
		bad = [p for p in pins if m.version(p.split('==')[0]).split('.')[:2] != p.split('==')[1].split('.')[:2]]; \
		sys.exit(f'the oldest leg is not on {bad or pins}' if bad or not pins else 0)"
	$(OLD_BIN)/python -c "import lightning, torchmetrics, torch; \
		print('oldest leg: lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'torch', torch.__version__)"
	WANDB_MODE=offline WANDB_SILENT=true $(OLD_BIN)/python -m pytest -q -p no:randomly $(OLDEST_TESTS)

bench: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m benchmark tests/benchmarks -s -o addopts="--strict-markers -p no:cacheprovider"

clean:
	rm -rf $(VENV) $(OLD_VENV) site .pytest_cache .mypy_cache .ruff_cache
