# Everything a developer or CI runs goes through these targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser s3rver run test lint typecheck check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[embedded,dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the package and its dev tools

# The dashboard test drives Debian's chromium headless; install it where we may (root + apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing and not root: the dashboard browser test will be skipped"; fi; }

# A local S3 server (npm s3rver) for the test of the embedded broker's durable S3 storage.
s3rver:
	@test -x .s3rver/node_modules/.bin/s3rver || { \
	  if command -v npm >/dev/null 2>&1; then \
	    npm install --silent --no-audit --no-fund --prefix .s3rver s3rver@3.7.1 >/dev/null; \
	  else echo "npm missing: the durable broker storage test will be skipped"; fi; }

run: install  ## start the whole stack on the embedded defaults
	$(BIN)/maniac serve

test: install browser s3rver  ## lint, type-check and run every test against the real broker and engine
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
	rm -rf $(VENV) .s3rver .maniac .pytest_cache .mypy_cache .ruff_cache
