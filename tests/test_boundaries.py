"""The adapters use the core only through its public names.

The core (``normstats``) is what users program against; the adapters (``adapters/``,
installed as ``normstats.adapters``) are its clients like any user's code. So no adapter
imports a private module of the core (``normstats._arrays``, ``normstats.estimators._pooled``)
or a private name (``from normstats.moments import _sums_around``), and none reaches into a
private attribute of a core module (``ns._something``). If one needs something that is
private today, the core makes it public, documented, first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADAPTER_FILES = sorted((ROOT / "adapters").rglob("*.py"))


def private(dotted: str) -> bool:
    """Whether a dotted name has a part that is private (``_x``, not ``__init__``-like)."""
    return any(part.startswith("_") and not part.endswith("__") for part in dotted.split("."))


def core_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, what)`` of every private core name the module imports or reads."""
    found: list[tuple[int, str]] = []
    aliases = set()  # local names bound to a core module: ``import normstats as ns``
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "normstats":
                    if private(alias.name):
                        found.append((node.lineno, f"import {alias.name}"))
                    aliases.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "normstats":
                continue
            if private(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
            for alias in node.names:
                if private(alias.name):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and private(node.attr)
        ):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


@pytest.mark.parametrize("path", ADAPTER_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_adapters_use_only_public_core_names(path):
    uses = core_uses(ast.parse(path.read_text(encoding="utf-8")))
    assert uses == [], f"{path.relative_to(ROOT)} uses private core names: {uses}"


def test_the_check_finds_private_uses():
    code = (
        "import normstats as ns\n"
        "from normstats._arrays import as_array\n"
        "from normstats.estimators._pooled import Welford\n"
        "from normstats.moments import _sums_around, Moments\n"
        "import normstats._typing\n"
        "x = ns._private\n"
        "from .sibling import _fine\n"
    )
    assert [what for _, what in core_uses(ast.parse(code))] == [
        "from normstats._arrays import ...",
        "from normstats.estimators._pooled import ...",
        "from normstats.moments import _sums_around",
        "import normstats._typing",
        "ns._private",
    ]


def test_every_adapter_module_is_checked():
    names = {str(p.relative_to(ROOT / "adapters")) for p in ADAPTER_FILES}
    assert {"torch/batchnorm.py", "numpy/recalibrate.py", "compare/strategies.py"} <= names
