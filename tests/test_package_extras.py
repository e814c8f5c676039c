"""Each optional dependency is declared in the extra whose code imports it, and the
``normstats`` command says which extra to install instead of failing with a traceback.

The missing packages are simulated: a ``sitecustomize`` module on ``PYTHONPATH`` of the child
process sets their ``sys.modules`` entries to None, which makes importing them fail as if
they were not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

SCRIPT = str(Path(sys.executable).parent / "normstats")
COMPARE_EXTRA = ("sklearn", "matplotlib", "threadpoolctl", "tqdm", "mnist1d")


def without(
    modules: tuple[str, ...], *args: str, tmp_path: Path, module: bool = False
) -> subprocess.CompletedProcess[str]:
    """``normstats *args`` (or ``python -m normstats``) as if ``modules`` were not installed."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        f"import sys\nfor name in {modules!r}:\n    sys.modules[name] = None\n"
    )
    launcher = [sys.executable, "-m", "normstats"] if module else [SCRIPT]
    environment = {**os.environ, "PYTHONPATH": str(blocker)}
    return subprocess.run(
        [*launcher, *args],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("module", [False, True], ids=["script", "python-m"])
def test_compare_without_its_extra_says_what_to_install(tmp_path, module):
    done = without(COMPARE_EXTRA, "compare", "--out", "out", tmp_path=tmp_path, module=module)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        "normstats compare: scikit-learn, matplotlib, threadpoolctl, tqdm not installed; "
        "run: pip install 'normstats[compare]'\n"
    )
    assert not (tmp_path / "out").exists()


def test_compare_names_the_one_missing_package(tmp_path):
    done = without(("threadpoolctl",), "compare", "--backend", "numpy", tmp_path=tmp_path)
    assert (done.returncode, done.stderr) == (
        2,
        "normstats compare: threadpoolctl not installed; run: pip install 'normstats[compare]'\n",
    )


def test_compare_with_torch_names_the_torch_extra(tmp_path):
    done = without(("torch", "sklearn"), "compare", "--backend", "torch", tmp_path=tmp_path)
    assert (done.returncode, done.stderr) == (
        2,
        "normstats compare: scikit-learn, torch not installed; "
        "run: pip install 'normstats[compare,torch]'\n",
    )


def test_help_needs_no_extra(tmp_path):
    done = without((*COMPARE_EXTRA, "torch"), "compare", "--help", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: normstats compare")


def requirements() -> dict[str, list[str]]:
    """The installed metadata's requirements, by extra ("" for the core)."""
    found: dict[str, list[str]] = {}
    for requirement in metadata.requires("normstats") or []:
        extra = re.search(r"""extra\s*==\s*["']([\w-]+)["']""", requirement)
        found.setdefault(extra[1] if extra else "", []).append(requirement.split(";")[0].strip())
    return found


def test_each_extra_declares_what_its_code_imports():
    extras = requirements()
    assert "threadpoolctl>=3.1" in extras["compare"]  # the comparison's workers
    assert "tqdm>=4.60" in extras["torch"]  # recalibrate(progress=True)
    assert "pytorch-lightning>=2.6" in extras["lightning"]


def test_no_upper_bound_on_any_requirement():
    # pins belong to the Makefile, never to a library's metadata
    for extra, found in requirements().items():
        for requirement in found:
            assert not re.search(r"<|~=|==", requirement), (extra, requirement)
    assert any(r.startswith("torch>=") for r in requirements()["torch"])
