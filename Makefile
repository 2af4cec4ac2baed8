# The two commands a user needs: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
ARGS ?=
# CPU torch for the reference tests (transformers as an independent implementation); pinned so
# pip never pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: serve test lint install test-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -q -e .
	touch $@

install: $(VENV)/.installed

$(VENV)/.test-installed: pyproject.toml $(VENV)/.installed
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	touch $@

test-deps: $(VENV)/.test-installed

serve: install
	$(BIN)/mlx-dropin serve $(ARGS)

test: test-deps
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

lint: test-deps
	$(BIN)/ruff check server tests bench compat examples
	$(BIN)/ruff format --check server tests bench compat examples
	$(BIN)/mypy server

clean:
	rm -rf $(VENV) .pytest_cache
