"""The package as a whole: import cost, the public names, the adapters subpackage."""

from __future__ import annotations

import importlib
import subprocess
import sys

import normstats as ns


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_does_not_import_torch():
    code = (
        "import sys, normstats, normstats.estimators, normstats.moments; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    assert run_python(code) == "[]"


def test_import_does_not_import_adapters():
    code = "import sys, normstats; print('normstats.adapters' in sys.modules)"
    assert run_python(code) == "False"


def isort_style(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: SCREAMING_CASE, then CamelCase, then everything else."""
    if name.isupper():
        return (0, name)
    return (1, name) if name[:1].isupper() else (2, name)


def test_all_is_sorted_and_resolves():
    # sorted as ruff (RUF022, selected in pyproject.toml) keeps it: isort-style
    assert list(ns.__all__) == sorted(ns.__all__, key=isort_style)
    assert len(set(ns.__all__)) == len(ns.__all__)
    for name in ns.__all__:
        assert getattr(ns, name) is not None, name


def test_all_exports_the_contract():
    # The value type, the four strategies, the alias, protocol and factory.
    assert {
        "Moments",
        "ExactFullPass",
        "CumulativeAverage",
        "ExponentialMovingAverage",
        "EMA",
        "Welford",
        "RunningStats",
        "make_stats",
    } <= set(ns.__all__)


def test_star_import_gives_all():
    namespace: dict[str, object] = {}
    exec("from normstats import *", namespace)
    assert set(ns.__all__) <= set(namespace)


def test_version():
    assert isinstance(ns.__version__, str)
    assert ns.__version__.count(".") >= 1


def test_adapters_subpackage_imports():
    adapters = importlib.import_module("normstats.adapters")
    assert adapters.__name__ == "normstats.adapters"
