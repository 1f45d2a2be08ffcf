# Set-up and the two commands the README starts with: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The marker file is rewritten whenever pyproject.toml changes, so a changed dependency reinstalls.
STAMP := $(VENV)/.installed
# Errors only: some machines' pip configuration prints a warning per package looked up.
PIP_INSTALL := $(BIN)/pip install --quiet --quiet

.PHONY: install demo test lint format clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: anything that depends on torch must find the CPU build already there.
	@echo "installing torch==2.13.0 (CPU build), then selfsup and its dependencies into $(VENV) ..."
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m selfsup.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .selfsup
