"""Shared, small comparison runs (computed once per session) and .npz helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

GRID: dict[str, Any] = {
    "backends": ("torch", "numpy"),
    "batch_sizes": [16, 64],
    "seeds": 2,
    "epochs": [1, 2],
}
"""The small grid most function tests look at: 2 backends x 2 batch sizes x 2 seeds x 2
training lengths x 7 default strategies = 112 records, a few seconds on one core."""

RECORD_FIELDS = (
    "backend",
    "model",
    "dataset",
    "batch_size",
    "seed",
    "epochs",
    "train_mode",
    "strategy",
    "shift",
    "accuracy",
    "lr",
    "calibration_batch_size",
    "calibration_samples",
    "test_batch_size",
    "test_size",
    "version",
    "stats_distance",
    "stats_distance_note",
)


@pytest.fixture(scope="session")
def grid() -> list[Any]:
    """``compare("digits", **GRID, workers=1)``: every default strategy."""
    from normstats.adapters.compare import compare

    return compare("digits", **GRID, workers=1)


def blobs(n: int = 120, d: int = 6, classes: int = 3, seed: int = 0) -> tuple[Any, Any]:
    """Well separated Gaussian blobs, far from zero and at a large scale."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    centers = 4.0 * rng.normal(size=(classes, d))
    x = 1000.0 + 50.0 * (centers[y] + rng.normal(size=(n, d)))
    return x, y.astype(np.int64)


@pytest.fixture
def write_npz(tmp_path: Path) -> Any:
    """``write_npz(name, **arrays)``: an .npz in tmp_path; returns its path."""

    def write(name: str, **arrays: Any) -> Path:
        path = tmp_path / name
        np.savez(path, **arrays)
        return path

    return write
