"""Every module of the package loads under exactly one name, ``normstats.…``.

adapters/ lives at the top of the repository and is installed as ``normstats.adapters``; the
repository root on ``sys.path`` (python started there, as pytest does) must not make it a second,
top-level package ``adapters``. conftest.py checks the same after the whole run.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import normstats
import normstats.adapters

from .module_names import import_everything, loaded_twice

ROOT = Path(__file__).resolve().parents[1]

IMPORT_EVERYTHING = """
from tests.module_names import import_everything, loaded_twice
print(len(import_everything()), loaded_twice())
"""


def run_in_root(code: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` started in the repository root, which Python puts first on sys.path."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_every_module_from_the_repository_root_has_one_name():
    done = run_in_root(IMPORT_EVERYTHING)
    assert done.returncode == 0, done.stderr
    count, twice = done.stdout.split(maxsplit=1)
    assert int(count) >= 30  # the core, the estimators and every adapter module
    assert twice.strip() == "[]"


def test_adapters_refuses_its_top_level_name():
    done = run_in_root("import adapters.torch")
    assert done.returncode == 1
    assert "ImportError: adapters/ is installed as normstats.adapters" in done.stderr


def test_adapters_found_where_normstats_comes_from_the_source_tree():
    # the root first on sys.path: normstats from normstats/, its adapters all the same
    code = "import normstats, normstats.adapters.numpy as a; print(normstats.__file__, a.Linear)"
    done = run_in_root(code)
    assert done.returncode == 0, done.stderr
    assert "normstats.adapters.numpy.layers.Linear" in done.stdout


def test_this_process_loaded_every_module_under_one_name():
    assert len(import_everything()) >= 30
    assert "adapters" not in sys.modules
    assert loaded_twice() == []


def test_a_second_name_is_found():
    # the check itself: one adapter file loaded again under its path's name
    file = Path(normstats.adapters.__path__[0]) / "numpy" / "layers.py"
    spec = importlib.util.spec_from_file_location("adapters_numpy_layers_copy", file)
    assert spec is not None
    copy = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = copy
    try:
        twice = loaded_twice()
    finally:
        del sys.modules[spec.name]
    assert len(twice) == 1
    assert twice[0].endswith("adapters_numpy_layers_copy, normstats.adapters.numpy.layers")
