"""Data and chunkings shared by the Dask adapter's tests."""

from __future__ import annotations

from typing import Any

import numpy as np

ROWS, FEATURES = 240, 3
OFFSET = 1e8
"""1e8 + N(0, 1): a sum-of-squares formula loses every digit of the variance there."""

CHUNKINGS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "one chunk": ((240,), (3,)),
    "even rows": ((60, 60, 60, 60), (3,)),
    "uneven rows": ((1, 7, 100, 2, 1, 129), (3,)),
    "an empty chunk": ((100, 0, 140), (3,)),
    "single rows": ((1,) * 240, (3,)),
    "kept axis": ((240,), (1, 2)),
    "both axes, uneven": ((13, 90, 1, 136), (2, 1)),
}
"""Row and column chunks of a (240, 3) array: along the reduced axis, the kept one, both."""


def shifted_normal(seed: int, rows: int = ROWS, offset: float = OFFSET) -> np.ndarray[Any, Any]:
    """``offset + N(0, 1)`` of shape (rows, 3), float64, with a different scale per feature."""
    rng = np.random.default_rng(seed)
    return offset + rng.standard_normal((rows, FEATURES)) * np.array([1.0, 0.5, 3.0])
