# One place that knows how to set lowmem up on a fresh machine.
# torch is pinned: on the project's CPU machines `torch==2.13.0` is a local CPU wheel, while an
# unpinned torch would download several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup run test lint bench-tests clean

$(BIN)/lowmem: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/lowmem

# The main job: a short CPU pretraining run on built-in text; prints perplexity, tokens/s and memory.
run: setup
	$(BIN)/lowmem train

lint: setup
	$(BIN)/ruff check src tests benchmarks

# Two pytest workers (pytest-xdist): the tests use one torch thread each, so one process would
# leave one of CI's two cores idle (serial: ~30 min; two workers: 19.5 min on 2026-12-03).
TEST_WORKERS ?= 2

test: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# Long tests (full CPU-protocol runs); not part of CI.
bench-tests: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
