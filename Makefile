# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed
# torch/torchvision only serve the parity tests (timm reference); this pair installs from
# the machine's local wheels (see WORKSPACE.md) instead of a multi-GB registry download.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

# rembg's pymatting compiles itself with numba on first import (minutes); the tests pay it
# once here rather than inside a timed test. (The demo never imports rembg.)
WARM_UP := $(BIN)/python -c "import rembg"

.PHONY: demo test lint format bench browser clean export-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# jax2onnx pins orbax-checkpoint<0.11.37, which it never imports: its other requirements come
# from the `export` extra and jax2onnx itself without dependencies (see pyproject.toml).
JAX2ONNX := jax2onnx==0.17.1

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e ".[test,parity,export]"
	$(BIN)/pip install --quiet --no-deps $(JAX2ONNX)
	$(WARM_UP)
	touch $@ $(RUNTIME_STAMP)

export-deps: $(RUNTIME_STAMP)
	$(BIN)/pip install --quiet -e ".[export]"
	$(BIN)/pip install --quiet --no-deps $(JAX2ONNX)

demo: $(RUNTIME_STAMP)
	$(BIN)/python scripts/demo.py

browser:
	@bash scripts/install_chromium.sh

test: $(TEST_STAMP) browser
	$(BIN)/python -m pytest -q tests

# ruff: lint and format check (configured in pyproject.toml); `make format` rewrites.
lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(TEST_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(TEST_STAMP)
	$(BIN)/python scripts/bench.py all

clean:
	rm -rf $(VENV) demo_out
