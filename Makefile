# normstats — every target sets itself up on a fresh machine.
#   make test     lint, type-check and run the whole test suite (what CI runs)
#   make bench    run the benchmarks in benchmarks/ and print their ratios
#   make compare  the strategy comparison on real data (results/ and a table)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A CPU build of torch lies on this machine's disk; an unpinned torch may pull a CUDA build.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: test lint typecheck pytest bench compare install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[torch,compare,dev,bench]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check normstats adapters tests benchmarks
	$(BIN)/ruff format --check normstats adapters tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy --strict normstats adapters

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/estimators.py
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/torch_bn.py
	$(BIN)/python benchmarks/distributed.py

compare: $(STAMP)
	$(BIN)/normstats compare

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
