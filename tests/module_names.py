"""Which files of the package are loaded under more than one module name.

adapters/ of the source tree is the package ``normstats.adapters``. Imported by its path as a
top-level ``adapters`` (pytest collecting the directory, python started in the repository root)
each of its files would run a second time as another module, with its own classes: an
``adapters.torch.BatchNorm`` that is not ``normstats.adapters.torch.BatchNorm``.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from collections import defaultdict

import normstats
import normstats.adapters


def import_everything() -> list[str]:
    """Import every module of the package by its name; the names imported. A module whose
    optional extra (torch, Lightning, ...) is not installed is left out."""
    names = sorted({info.name for info in pkgutil.walk_packages(normstats.__path__, "normstats.")})
    imported = []
    for name in names:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name is None or error.name.startswith("normstats"):
                raise
            continue
        imported.append(name)
    return imported


def package_directories() -> list[str]:
    """Where the package's files are, links resolved: normstats/ and adapters/ of the source
    tree for the development install (which links them into build/__editable__.*/)."""
    packages = (normstats, normstats.adapters)
    return sorted({os.path.dirname(os.path.realpath(str(p.__file__))) for p in packages})


def loaded_twice() -> list[str]:
    """``"file: name, name"`` for every file of the package in ``sys.modules`` under more
    than one name, or under a name outside ``normstats``; empty when each has one name."""
    directories = tuple(d + os.sep for d in package_directories())
    names: defaultdict[str, list[str]] = defaultdict(list)
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file is None:
            continue
        path = os.path.realpath(file)
        if path.startswith(directories):
            names[path].append(name)
    return [
        f"{path}: {', '.join(sorted(found))}"
        for path, found in sorted(names.items())
        if len(found) > 1 or not all(n == "normstats" or n.startswith("normstats.") for n in found)
    ]
