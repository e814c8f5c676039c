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
EXTRAS := torch,compare,lightning,dask,dev,bench

# The package is installed editable in setuptools' strict mode: build/__editable__.normstats-*/
# (ignored by git) holds a link to every module file, laid out as the installed package
# (adapters/ as normstats/adapters/), a plain directory on the path that mypy, pyright and
# editors read. Edits to a file show at once; a file added, removed or renamed needs its link
# made or dropped: the stamp .linked depends on the package's directories, whose modification
# time changes when a file in them does (`make install` then re-links, in a few seconds).
STRICT       := --config-settings editable_mode=strict
PACKAGE_DIRS := $(shell find normstats adapters -type d -not -name __pycache__)
LINKED       := $(VENV)/.linked

# test-min installs, in its own .venv-min, exactly the lower bounds that pyproject.toml declares
# for numpy, attrs, array-api-compat and torch (read from it, so that they cannot drift apart).
# NumPy 1.24 needs older releases of packages the extras bring: these are the newest that
# support it (what pip finds too), pinned here for a reproducible run, never capped in the
# package's metadata.
VENV_MIN   := .venv-min
BIN_MIN    := $(VENV_MIN)/bin
STAMP_MIN  := $(VENV_MIN)/.installed
LINKED_MIN := $(VENV_MIN)/.linked
FLOORS     := $(shell grep -oE '"(numpy|attrs|array-api-compat|torch)>=[0-9.]+' pyproject.toml \
                | tr -d '"' | sed 's/>=/==/')
FOR_NUMPY_1_24 := scikit-learn==1.7.2 scipy==1.15.3 matplotlib==3.10.9 contourpy==1.3.2

.PHONY: test test-min lint typecheck pytest bench compare install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]" "$(TORCH)" $(STRICT)
	touch $(STAMP)

$(LINKED): $(STAMP) $(PACKAGE_DIRS)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . $(STRICT)
	touch $(LINKED)

$(STAMP_MIN): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_MIN)
	$(BIN_MIN)/python -m pip install --quiet --upgrade pip
	$(BIN_MIN)/python -m pip install --quiet $(FLOORS)
	$(BIN_MIN)/python -m pip install --quiet -e ".[torch,compare,lightning,dev]" $(STRICT) \
	    $(FLOORS) $(FOR_NUMPY_1_24)
	$(BIN_MIN)/python -m pip check
	touch $(STAMP_MIN)

$(LINKED_MIN): $(STAMP_MIN) $(PACKAGE_DIRS)
	$(BIN_MIN)/python -m pip install --quiet --no-deps --no-build-isolation -e . $(STRICT)
	touch $(LINKED_MIN)

install: $(LINKED)

lint: $(LINKED)
	$(BIN)/ruff check normstats adapters tests benchmarks
	$(BIN)/ruff format --check normstats adapters tests benchmarks

typecheck: $(LINKED)
	$(BIN)/mypy --strict normstats adapters

pytest: $(LINKED)
	$(BIN)/pytest -q

test: lint typecheck pytest

# The lowest declared versions: the test suite only (lint and types are checked by `make test`).
test-min: $(LINKED_MIN)
	$(BIN_MIN)/python -c "import numpy, torch, attrs, array_api_compat as c; \
	print('test-min: numpy', numpy.__version__, 'torch', torch.__version__, \
	'attrs', attrs.__version__, 'array-api-compat', c.__version__)"
	$(BIN_MIN)/pytest -q

bench: $(LINKED)
	$(BIN)/python benchmarks/estimators.py
	$(BIN)/python benchmarks/engine.py
	$(BIN)/python benchmarks/torch_bn.py
	$(BIN)/python benchmarks/distributed.py
	$(BIN)/python benchmarks/dask.py

compare: $(LINKED)
	$(BIN)/normstats compare

clean:
	rm -rf $(VENV) $(VENV_MIN) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
