# Each target sets itself up: a local virtual environment in .venv, the CPU torch wheel first
# (so pip never pulls a multi-GB CUDA build), then the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint typecheck docs bench gpu-check clean

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

test: $(STAMP) lint typecheck docs
	WANDB_MODE=offline WANDB_SILENT=true $(BIN)/python -m pytest -q -p no:randomly

bench: $(STAMP)
	WANDB_MODE=offline $(BIN)/python -m pytest -q -m benchmark tests/benchmarks -s -o addopts="--strict-markers -p no:cacheprovider"

clean:
	rm -rf $(VENV) site .pytest_cache .mypy_cache .ruff_cache
