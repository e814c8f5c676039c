# normstats — every target sets itself up on a fresh machine.
#   make test     lint, type-check and run the whole test suite (what CI runs)
#   make test-min the test suite against the lowest versions pyproject.toml declares
#   make bench    run the benchmarks in benchmarks/ and print their ratios
#   make compare  the strategy comparison on real data (results/ and a table)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A CPU build of torch lies on this machine's disk; an unpinned torch may pull a CUDA build.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

# test-min installs, in its own .venv-min, exactly the lower bounds that pyproject.toml declares
# for numpy, attrs, array-api-compat and torch (read from it, so that they cannot drift apart).
# NumPy 1.24 needs older releases of packages the extras bring: these are the newest that
# support it (what pip finds too), pinned here for a reproducible run, never capped in the
# package's metadata.
VENV_MIN  := .venv-min
BIN_MIN   := $(VENV_MIN)/bin
STAMP_MIN := $(VENV_MIN)/.installed
FLOORS    := $(shell grep -oE '"(numpy|attrs|array-api-compat|torch)>=[0-9.]+' pyproject.toml \
               | tr -d '"' | sed 's/>=/==/')
FOR_NUMPY_1_24 := scikit-learn==1.7.2 scipy==1.15.3 matplotlib==3.10.9 contourpy==1.3.2

.PHONY: test test-min lint typecheck pytest bench compare install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[torch,compare,dev,bench]" "$(TORCH)"
	touch $(STAMP)

$(STAMP_MIN): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_MIN)
	$(BIN_MIN)/python -m pip install --quiet --upgrade pip
	$(BIN_MIN)/python -m pip install --quiet $(FLOORS)
	$(BIN_MIN)/python -m pip install --quiet -e ".[torch,compare,dev]" $(FLOORS) $(FOR_NUMPY_1_24)
	$(BIN_MIN)/python -m pip check
	touch $(STAMP_MIN)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check normstats adapters tests benchmarks
	$(BIN)/ruff format --check normstats adapters tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy --strict normstats adapters

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

# The lowest declared versions: the test suite only (lint and types are checked by `make test`).
test-min: $(STAMP_MIN)
	$(BIN_MIN)/python -c "import numpy, torch, attrs, array_api_compat as c; \
	print('test-min: numpy', numpy.__version__, 'torch', torch.__version__, \
	'attrs', attrs.__version__, 'array-api-compat', c.__version__)"
	$(BIN_MIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/estimators.py
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/torch_bn.py
	$(BIN)/python benchmarks/distributed.py

compare: $(STAMP)
	$(BIN)/normstats compare

clean:
	rm -rf $(VENV) $(VENV_MIN) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
