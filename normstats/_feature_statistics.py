"""The per-feature running statistics of a Standardizer, with NaN as missing values.

scikit-learn's scalers leave NaN out of each feature's statistics: a feature's mean and
variance come from its own non-NaN values, so features can have seen different numbers of
samples. The strategies take whole batches of one sample count, so the features share one
strategy while their counts agree and split into one strategy per feature when they first
do not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np

from ._arrays import describe
from .deferred import ReducedBatch
from .estimators import ExactFullPass, RunningStats, Strategy, Welford
from .typing import Array, Namespace


class FeatureStatistics:
    """The running statistics of every feature of a stream, each from its non-NaN values.

    One strategy holds all features while every batch has given each feature as many values
    (the common case, one update per batch). The first batch whose NaN leave the features
    with different counts splits it into one strategy per feature, each carrying on from its
    slice of the shared state (the state arrays end with the feature axis) and fed that
    feature's values from then on: one update per feature and batch.
    """

    def __init__(self, make: Callable[[], RunningStats], n_features: int) -> None:
        self._make = make
        self.n_features = n_features
        self.shared: RunningStats | None = make()
        self.per_feature: list[RunningStats] = []

    @property
    def first(self) -> RunningStats:
        """A strategy of these statistics (they all have the same settings)."""
        return self.shared if self.shared is not None else self.per_feature[0]

    def update(self, xp: Namespace, X: Array) -> None:
        """Fold in the batch ``X`` (finite values and NaN); an error changes nothing."""
        missing = xp.isnan(X)
        counts = np.asarray(X.shape[0] - xp.sum(xp.astype(missing, xp.int64), axis=0))
        self._check_counts(counts, X)
        if self.shared is not None and np.ptp(counts) == 0:
            if counts[0] == X.shape[0]:  # no NaN: the common case
                self.shared.update(X)  # atomic: a refused batch changes nothing
            elif counts[0]:  # a feature-major compaction keeps each feature's values together
                values = xp.reshape(X.T[~missing.T], (self.n_features, int(counts[0])))
                self.shared.update(values.T)
            return
        streams = self._streams(counts)
        for j, stream in enumerate(streams):
            if counts[j]:
                stream.update(xp.reshape(X[:, j][~missing[:, j]], (-1, 1)))
        self.shared, self.per_feature = None, streams

    def update_reduced(self, batch: ReducedBatch, X: Array) -> None:
        """Fold in the batch ``X`` from its statistics, reduced where its data live with
        NaN left out (:mod:`normstats.deferred`), as :meth:`update` folds it."""
        counts = batch.counts
        self._check_counts(counts, X)
        if self.shared is not None and np.ptp(counts) == 0:
            if counts[0]:
                _strategy(self.shared)._update_reduced(batch, X)
            return
        streams = self._streams(counts)
        for j, stream in enumerate(streams):
            if counts[j]:
                _strategy(stream)._update_reduced(batch.feature(j), X)
        self.shared, self.per_feature = None, streams

    def _streams(self, counts: np.ndarray[Any, Any]) -> list[RunningStats]:
        """One strategy per feature for a batch with these counts: copies of those the batch
        updates, so that an error leaves the statistics as they were."""
        if self.shared is not None:
            return _split(self._make, self.shared, self.n_features)
        return [
            _copied(self._make, stream) if count else stream
            for stream, count in zip(self.per_feature, counts, strict=True)
        ]

    def _check_counts(self, counts: np.ndarray[Any, Any], X: Array) -> None:
        minimum = getattr(self.first, "min_batch_count", 1)
        short = np.flatnonzero((counts > 0) & (counts < minimum))
        if short.size:
            j = int(short[0])
            raise ValueError(
                f"X: expected at least {minimum} non-NaN values per feature in a batch (the "
                f"strategy's batch statistics need them), got {int(counts[j])} sample(s) "
                f"in feature {j} ({describe(X)})"
            )

    def summary(self) -> tuple[Array, Array, np.ndarray[Any, np.dtype[np.int64]]]:
        """Per-feature ``(mean, var, count)``: ``var`` the population variance (ddof=0) of
        the pooled strategies, the strategy's own estimate otherwise; NaN without values."""
        if self.shared is not None:
            mean, var = _mean_and_var(self.shared)
            return mean, var, np.full(self.n_features, self.shared.count, dtype=np.int64)
        parts = [_mean_and_var(stream) for stream in self.per_feature]
        counts = np.asarray([stream.count for stream in self.per_feature], dtype=np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), counts


def _mean_and_var(stream: RunningStats) -> tuple[Array, Array]:
    if stream.count == 0:
        return np.full(1, np.nan), np.full(1, np.nan)  # broadcast to the feature shape
    if isinstance(stream, Welford | ExactFullPass):
        return stream.mean, stream.moments.var(ddof=0)
    return cast(Array, stream.mean), cast(Array, stream.var)


def _strategy(stream: RunningStats) -> Strategy:
    """A Standardizer's statistics are strategies (built by ``make_stats`` or copied)."""
    return cast(Strategy, stream)


def _copied(make: Callable[[], RunningStats], stream: RunningStats) -> RunningStats:
    copy = make()
    copy.load_state_dict(stream.state_dict())
    return copy


def _split(
    make: Callable[[], RunningStats], shared: RunningStats, n_features: int
) -> list[RunningStats]:
    """One strategy per feature, each with its feature's slice of ``shared``'s state."""
    state = shared.state_dict()
    streams = []
    for j in range(n_features):
        stream = make()
        stream.load_state_dict(
            {
                k: cast(Array, v)[..., j : j + 1] if getattr(v, "ndim", 0) else v
                for k, v in state.items()
            }
        )
        streams.append(stream)
    return streams


__all__ = ["FeatureStatistics"]
