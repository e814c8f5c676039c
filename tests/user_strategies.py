"""The user strategies of docs/strategies.md, importable as ``tests.user_strategies:LastK``.

The classes are those of the page, not copies: the page's ```python blocks that define a
class are read when this module is imported, and their imports and class definitions (no
usage code) are executed here, in this module's name, so that a change to the page is a
change to what the tests run. Import paths such as ``"tests.user_strategies:LastK"`` (for
``ns.make_stats``, a layer's ``stats``, ``normstats compare --strategies``) name them; a
subprocess needs the repository root on its ``PYTHONPATH`` to import them.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from .test_docs import python_blocks

PAGE = Path(__file__).resolve().parent.parent / "docs" / "strategies.md"
CLASSES = ("LastK", "WithinBatch")
"""The strategies the page defines, in the order it defines them."""


def definitions(path: Path) -> list[ast.stmt]:
    """The import statements and class definitions of the blocks of ``path`` that define a
    class, with the line numbers they have in ``path``."""
    kept: list[ast.stmt] = []
    for line, code in python_blocks(path.read_text(encoding="utf-8")):
        tree = ast.parse(code)
        if not any(isinstance(node, ast.ClassDef) for node in tree.body):
            continue
        for node in tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom | ast.ClassDef):
                kept.append(ast.increment_lineno(node, line - 1))
    return kept


def load(path: Path) -> dict[str, Any]:
    """The names the class definitions of ``path`` bind, defined as in this module."""
    namespace: dict[str, Any] = {"__name__": __name__}
    module = ast.Module(body=definitions(path), type_ignores=[])
    exec(compile(module, str(path), "exec"), namespace)
    missing = [name for name in CLASSES if name not in namespace]
    if missing:
        raise ImportError(f"{path} no longer defines {', '.join(missing)}")
    return namespace


_defined = load(PAGE)
LastK: Any = _defined["LastK"]
"""Pooled mean and unbiased variance of the last ``k`` batches (not mergeable)."""
WithinBatch: Any = _defined["WithinBatch"]
"""Count-weighted mean and pooled within-batch variance (mergeable)."""
