"""Type checkers resolve the installed package from a user's script outside the repository.

The development install (``make install``) links the package into build/__editable__.*/, a
directory on the interpreter's path that mypy and pyright read like site-packages, adapters
included; the checks run in a scratch directory, so the source tree is not on their path.
Each checker must pass a correctly typed script and report the errors of a wrong one (an
attribute that ``normstats.adapters.torch`` does not have proves that it read the module).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

USER_SCRIPT = """\
import numpy as np
import numpy.typing as npt
from torch import nn

import normstats as ns
from normstats.adapters.numpy import BatchNorm as NumpyBatchNorm, Linear, ReLU, Sequential
from normstats.adapters.torch import BatchNorm, convert


def population_mean(batches: list[npt.NDArray[np.float64]]) -> npt.NDArray[np.float64]:
    stats: ns.Welford = ns.Welford()
    for batch in batches:
        stats.update(batch)
    return np.asarray(stats.mean, dtype=np.float64)


network = Sequential(Linear(4, 3), NumpyBatchNorm(3, stats="ema"), ReLU())
model = convert(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), stats="welford")
layer: BatchNorm = BatchNorm(3, stats="cumulative")
"""

WRONG_SCRIPT = """\
import normstats as ns
from normstats.adapters.torch import BatchNorm, not_in_the_adapter

count: int = ns.Welford()
"""

MYPY_CONFIG = """\
[mypy]
strict = True

# torch's own ~2,000 modules take minutes to analyse and are not under test.
[mypy-torch.*]
follow_imports = skip
"""


def write(directory: Path, source: str) -> Path:
    script = directory / "user.py"
    script.write_text(source)
    return script


def mypy(directory: Path) -> subprocess.CompletedProcess[str]:
    (directory / "mypy.ini").write_text(MYPY_CONFIG)
    command = [sys.executable, "-m", "mypy", "--strict", "--config-file", "mypy.ini", "user.py"]
    return subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=600)


def pyright(directory: Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("pyright", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.skip("pyright is not installed (the dev extra installs it)")
    command = [executable, "--pythonpath", sys.executable, "user.py"]
    # without this the wrapper asks PyPI whether a newer pyright exists: no network in tests
    environment = {**os.environ, "PYRIGHT_PYTHON_IGNORE_WARNINGS": "1"}
    return subprocess.run(
        command, cwd=directory, env=environment, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(params=[mypy, pyright], ids=["mypy", "pyright"])
def checker(request: pytest.FixtureRequest) -> object:
    pytest.importorskip("torch")
    return request.param


def test_a_typed_user_script_passes(checker, tmp_path):
    write(tmp_path, USER_SCRIPT)
    done = checker(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_errors_of_a_wrong_script_are_reported(checker, tmp_path):
    write(tmp_path, WRONG_SCRIPT)
    done = checker(tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    errors = [line for line in output.splitlines() if "error:" in line]
    assert len(errors) == 2, output
    wrong_name, wrong_type = errors
    assert "user.py:2" in wrong_name, output
    assert '"not_in_the_adapter"' in wrong_name, output
    assert "user.py:4" in wrong_type, output
    assert '"Welford"' in wrong_type, output
    assert '"int"' in wrong_type, output
