"""The protocol every running-statistics strategy implements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from ..moments import Moments
from ..typing import Array, Axis

StateValue = int | float | bool | Array
"""A ``state_dict`` value: a number or an array (0-d arrays count as numbers)."""


@runtime_checkable
class RunningStats(Protocol):
    """A population estimate of per-feature mean and variance, fed batch by batch.

    ``mean`` and ``var`` are the current estimates; ``var`` is the unbiased (``ddof=1``)
    estimate that BatchNorm uses at inference. ``count`` is the number of samples folded in,
    ``num_batches`` the number of batches, ``num_batches_skipped`` the non-finite batches
    skipped under ``nan_policy="skip"``.
    """

    @property
    def nan_policy(self) -> str:
        """``"raise"`` or ``"skip"``: what a batch with NaN or Inf does."""

    def update(self, x: Array, axis: Axis = 0) -> None:
        """Fold in a raw batch, reduced over ``axis``."""

    def update_moments(self, moments: Moments) -> None:
        """Fold in the precomputed moments of a batch."""

    def load_moments(self, moments: Moments, *, num_batches_skipped: int = 0) -> None:
        """Replace the estimate by population statistics (mean, unbiased var) measured
        elsewhere; ``num_batches_skipped`` is how many batches that measurement left out."""

    @property
    def mean(self) -> Array | float:
        """Current estimate of the population mean, per feature."""

    @property
    def var(self) -> Array | float:
        """Current estimate of the population variance (unbiased), per feature."""

    @property
    def count(self) -> int:
        """Samples folded in."""

    @property
    def num_batches(self) -> int:
        """Batches folded in."""

    @property
    def num_batches_skipped(self) -> int:
        """Non-finite batches skipped under ``nan_policy="skip"``."""

    def reset(self) -> None:
        """Forget every batch; hyperparameters stay."""

    def state_dict(self) -> dict[str, StateValue]:
        """A flat dict of numbers and arrays: hyperparameters and state."""

    def load_state_dict(self, state_dict: Mapping[str, object]) -> None:
        """Restore a ``state_dict`` of the same strategy and settings (validated first)."""

    def merge(self, other: RunningStats) -> None:
        """Fold in another estimator's stream, in place, as if this one had seen it."""
