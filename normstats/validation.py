"""Checks of user input shared by the estimators, the engine and the Standardizer.

Each raises ``TypeError`` for a wrong type and ``ValueError`` for a wrong value, with a
message that names the parameter and says what was expected and what arrived.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

NAN_POLICIES = ("raise", "skip")


def check_nan_policy(instance: object, attribute: Any, value: object) -> None:
    """attrs validator: ``nan_policy`` is ``"raise"`` or ``"skip"``."""
    if value not in NAN_POLICIES:
        raise ValueError(f"nan_policy: expected 'raise' or 'skip', got {value!r}")


def check_unit_interval(name: str, value: object, *, include_zero: bool = False) -> float:
    """Return ``value`` as a float in (0, 1] (or [0, 1) with ``include_zero``) or raise."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    inside = 0.0 <= number < 1.0 if include_zero else 0.0 < number <= 1.0
    if not inside or math.isnan(number):
        interval = "[0, 1)" if include_zero else "(0, 1]"
        raise ValueError(f"{name}: expected a number in {interval}, got {value!r}")
    return number


def as_count(name: str, value: object) -> int:
    """Return a non-negative integer given as a Python, NumPy or 0-d array number."""
    number = getattr(value, "item", lambda: value)() if _is_scalar_array(value) else value
    if isinstance(number, bool) or not isinstance(number, int | np.integer):
        raise TypeError(f"{name}: expected a non-negative integer, got {value!r}")
    if number < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
    return int(number)


def as_real(name: str, value: object) -> float:
    """Return a real number given as a Python, NumPy or 0-d array number."""
    number = getattr(value, "item", lambda: value)() if _is_scalar_array(value) else value
    if isinstance(number, bool) or not isinstance(number, int | float | np.integer | np.floating):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    return float(number)


def as_flag(name: str, value: object) -> bool:
    """Return a boolean given as a Python, NumPy or 0-d array bool (or 0/1)."""
    number = getattr(value, "item", lambda: value)() if _is_scalar_array(value) else value
    if isinstance(number, bool | np.bool_):
        return bool(number)
    if isinstance(number, int | np.integer) and number in (0, 1):
        return bool(number)
    raise TypeError(f"{name}: expected a bool, got {value!r}")


def _is_scalar_array(value: object) -> bool:
    return hasattr(value, "shape") and tuple(getattr(value, "shape", (1,))) == ()
