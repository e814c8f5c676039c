"""A plain (non-editable) wheel of the project installs and imports, adapters included.

Development installs are editable; users get a wheel. The wheel is built from this checkout
and unpacked into a scratch directory that is put first on ``sys.path`` of a fresh
interpreter, run from outside the repository, so the import cannot fall back on the source
tree.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import sys, numpy as np
import normstats, normstats.adapters
assert normstats.__file__.startswith(sys.argv[1]), normstats.__file__
assert normstats.adapters.__file__.startswith(sys.argv[1]), normstats.adapters.__file__
stats = normstats.Welford()
stats.update(np.arange(6.0).reshape(3, 2))
assert stats.mean.tolist() == [2.0, 3.0]
print("ok")
"""


def test_wheel_installs_and_imports(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("normstats-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "normstats/py.typed" in names
    assert "normstats/adapters/__init__.py" in names
    assert not any(name.startswith(("tests/", "adapters/", "benchmarks/")) for name in names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.path.insert(0, {str(site)!r})\n{CHECK}",
            str(site),
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    assert result.stdout.strip() == "ok"
