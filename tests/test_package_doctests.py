"""The doctests of ``normstats.adapters``, run from the modules as installed.

pytest's ``--doctest-modules`` imports a file by its path, and adapters/ by its path is a
top-level package ``adapters``: a second copy of every adapter module (adapters/__init__.py
refuses that name). So pyproject.toml collects doctests from normstats/ only, and the
adapters' docstrings run here, one test per docstring with examples, with pytest's default
doctest option (ELLIPSIS).
"""

from __future__ import annotations

import doctest
import importlib
import io
from pathlib import Path
from typing import Any

import pytest

import normstats.adapters

PACKAGE = normstats.adapters


def module_names() -> list[str]:
    """Every module of the package, found from its files (nothing imported)."""
    names = [PACKAGE.__name__]
    for path in PACKAGE.__path__:
        for file in sorted(Path(path).rglob("*.py")):
            parts = file.relative_to(path).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts:
                names.append(".".join((PACKAGE.__name__, *parts)))
    return sorted(set(names))


def docstring_tests() -> list[Any]:
    """A pytest param per docstring with examples; a module whose optional extra is not
    installed gives one skipped param."""
    params: list[Any] = []
    finder = doctest.DocTestFinder()
    for name in module_names():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            reason = f"{name} needs {error.name}, not installed"
            params.append(pytest.param(None, id=name, marks=pytest.mark.skip(reason=reason)))
            continue
        tests = sorted((t for t in finder.find(module, name) if t.examples), key=lambda t: t.name)
        params += [pytest.param(t, id=t.name) for t in tests]
    return params


DOCTESTS = docstring_tests()


def test_the_adapters_have_doctests():
    # the numpy layers, the numpy training loop, the torch module and convert
    found = {p.id for p in DOCTESTS if p.values[0] is not None}
    assert {
        "normstats.adapters.numpy.layers.Linear",
        "normstats.adapters.torch.batchnorm.BatchNorm",
        "normstats.adapters.torch.convert.convert",
    } <= found, found


@pytest.mark.parametrize("test", DOCTESTS)
def test_doctest(test: doctest.DocTest) -> None:
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS, verbose=False)
    result = runner.run(test, out=report.write)
    assert result.attempted == len(test.examples)
    assert result.failed == 0, report.getvalue()
