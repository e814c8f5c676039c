"""What the comparison produces: one :class:`Record` per evaluation, a :class:`Missing` per
network that did not finish, and the errors that carry both.

A record is what ``results.json`` and ``results.csv`` hold, one row each; the table, the
plots and :func:`~normstats.adapters.compare.plots.plots_from_results` read nothing else.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import attrs

ALL = "all"
"""The calibration samples value that means the whole training set."""


@attrs.frozen
class Record:
    """One evaluation: a strategy's test accuracy on one trained network and one test set."""

    backend: str
    model: str
    dataset: str
    batch_size: int
    seed: int
    epochs: int
    train_mode: str
    """How the network trained: ``"batchnorm"``, ``"renorm"``, ``"renorm:welford"``,
    ``"ghost:4"``, ... (see :mod:`~normstats.adapters.compare.train_modes`)."""
    strategy: str
    shift: str
    """The covariate shift of the test set (``"none"``, ``"noise:0.5"``, ...)."""
    accuracy: float
    lr: float
    """The learning rate the network trained at (``--lr`` scaled to the batch size)."""
    calibration_batch_size: int
    calibration_samples: int | str
    """Training samples of the exact pass that gave ``exact``, ``exact-layerwise`` and the
    test-time strategies' source statistics: a seeded random subset of this size, or
    ``"all"``, the whole training set. Other strategies do not depend on it."""
    test_batch_size: int
    """Test batch size of the strategies that use test batches' own statistics."""
    test_size: int
    """Samples in the test set: the accuracy is a fraction of these."""
    version: str
    """The normstats version that computed it."""
    stats_distance: list[float | None]
    """Per BatchNorm layer: mean over channels of |mu - mu_exact| / sigma_exact +
    |sigma / sigma_exact - 1|, from the exact one-pass statistics of the whole training set
    (0 for those; empty for "batch" and the test-time strategies). Channels whose
    exact variance is 0 have no such distance and are left out; a layer with no channel left
    (or with non-finite statistics) gets None, and ``stats_distance_note`` says why."""
    stats_distance_note: str = ""
    """Why a layer's distance is None or leaves channels out; empty when every channel counts."""

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Record:
        """The record of a ``results.json`` row; a row written before ``calibration_samples``
        existed was calibrated on the whole training set, and one written before
        ``train_mode`` existed trained with plain BatchNorm."""
        return cls(**{"calibration_samples": ALL, "train_mode": "batchnorm", **row})


@attrs.frozen
class Missing:
    """A network whose records are missing, and why (it diverged, or the run was stopped)."""

    backend: str
    batch_size: int
    seed: int
    reason: str
    train_mode: str = "batchnorm"

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


class IncompleteError(RuntimeError):
    """Some networks did not finish: ``records`` holds every finished one's records and
    ``missing`` the others with their reasons; ``interrupted`` when Ctrl-C stopped the run."""

    def __init__(self, records: list[Record], missing: list[Missing], interrupted: bool) -> None:
        self.records, self.missing, self.interrupted = records, missing, interrupted
        total = len({(r.backend, r.batch_size, r.seed) for r in records}) + len(missing)
        what = "interrupted" if interrupted else missing[0].reason
        super().__init__(f"{len(missing)} of {total} networks did not finish ({what})")


class DivergedError(ValueError):
    """Training of one network diverged; the message says how."""


@attrs.define
class Timings:
    """Seconds spent, by backend and phase."""

    seconds: dict[tuple[str, str], float] = attrs.field(factory=lambda: defaultdict(float))

    def add(self, backend: str, phase: str, started: float) -> None:
        self.seconds[(backend, phase)] += time.perf_counter() - started
