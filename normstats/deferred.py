"""Arrays whose data live elsewhere: how the core hands their reduction to an adapter.

A Dask array is a graph of chunks that may sit on the workers of a cluster and need not fit in
memory anywhere. The core never imports Dask: an adapter (``normstats.adapters.dask``)
registers a :class:`DeferredArrays` handler, and every estimator's ``update`` and the
Standardizer's ``fit`` / ``partial_fit`` then reduce such an array where its chunks are, in one
pass, and fold the per-feature result in exactly as an in-memory batch's. ``transform`` stays
lazy: the handler applies the value checks to every chunk when the result is computed.

Without a handler, a Dask array is refused with a one-line ``TypeError`` that says what to
install and import (it is recognised without importing Dask).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import array_api_compat
import numpy as np

from ._arrays import all_finite, describe
from .moments import Moments, non_finite_statistics_error
from .typing import Array

Counts = np.ndarray[Any, np.dtype[np.int64]]
Statistic = np.ndarray[Any, np.dtype[np.float64]]


class ReducedBatch(NamedTuple):
    """A batch reduced where its data live: NumPy statistics of each feature.

    ``mean + mean_residual`` is each feature's mean to more than float64 precision, as in
    :class:`~normstats.Moments`. Reduced with ``ignore_nan=True``, each feature's statistics
    are those of its non-NaN values (``counts`` says how many); otherwise NaN reach the
    statistics and ``nan`` says so.
    """

    count: int  # type: ignore[assignment]  # shadows tuple.count, like Moments.count
    """Samples per feature in the batch, NaN included (the product of the reduced axes)."""
    counts: Counts
    """Samples per feature that the statistics hold (fewer than ``count`` where NaN were
    left out), of the feature shape."""
    mean: Statistic
    mean_residual: Statistic
    m2: Statistic
    """Sum of squared deviations from the mean, per feature."""
    nan: bool
    """Whether NaN reached the statistics (never when reduced with ``ignore_nan=True``)."""
    inf: bool
    """Whether the batch held +-Inf (its statistics then mean nothing)."""

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    @property
    def finite(self) -> bool:
        """No NaN or Inf reached the statistics and none overflowed float64."""
        return not (self.nan or self.inf) and all_finite(np, self.mean, self.m2, self.mean_residual)

    def error(self, name: str) -> ValueError:
        """The error for a batch that is not :attr:`finite`, naming the parameter ``name``."""
        return non_finite_statistics_error(not (self.nan or self.inf), name)

    def moments(self) -> Moments:
        """The :class:`~normstats.Moments` of a finite batch whose features all hold
        ``counts`` samples, unchecked (as the library's own reductions are)."""
        count = int(self.counts.flat[0]) if self.counts.size else self.count
        return Moments._trusted(count, self.mean, self.m2, self.mean_residual)

    def feature(self, j: int) -> ReducedBatch:
        """The statistics of feature ``j`` of a 1-d feature shape, as a batch of one feature."""
        part = slice(j, j + 1)
        return self._replace(
            counts=self.counts[part],
            mean=self.mean[part],
            mean_residual=self.mean_residual[part],
            m2=self.m2[part],
        )


class DeferredArrays(Protocol):
    """What an adapter provides for a kind of array whose data live elsewhere."""

    def owns(self, x: object) -> bool:
        """Whether ``x`` is an array of this kind (cheap, and never loads data)."""
        ...

    def reduce(self, x: Any, axes: tuple[int, ...], *, ignore_nan: bool) -> ReducedBatch:
        """Reduce ``x`` (of a real floating dtype) over ``axes`` where its data live, to
        exact float64 statistics; raise whatever the computation raised."""
        ...

    def checked(self, x: Any, check: Callable[[np.ndarray[Any, Any]], None]) -> Any:
        """``x`` unchanged, lazily: ``check`` (which raises for bad values) runs on every
        chunk as it is computed."""
        ...


_HANDLERS: list[DeferredArrays] = []


def register(handler: DeferredArrays) -> None:
    """Reduce the arrays that ``handler.owns`` with ``handler`` (an adapter calls this on
    import; registering a handler of the same class again replaces it)."""
    _HANDLERS[:] = [h for h in _HANDLERS if type(h) is not type(handler)]
    _HANDLERS.append(handler)


def handler_for(x: object, name: str = "x") -> DeferredArrays | None:
    """The handler of ``x``, or None for an array whose data are in memory.

    A Dask array without a registered handler raises ``TypeError`` saying what to install.
    """
    if type(x) is np.ndarray:  # the common case, on every batch: kept cheap
        return None
    for handler in _HANDLERS:
        if handler.owns(x):
            return handler
    if array_api_compat.is_dask_array(x):
        raise TypeError(
            f"{name}: expected an array in memory, got a Dask array ({describe(x)}); its "
            "statistics are computed on its cluster by normstats' Dask adapter: run pip "
            "install 'normstats[dask]' and import normstats.adapters.dask"
        )
    return None


def checked(x: Array, check: Callable[[Array], None], name: str = "x") -> Array:
    """``x`` after ``check`` (which raises for bad values): now for an array in memory,
    on every chunk as it is computed for an array whose data live elsewhere."""
    handler = handler_for(x, name)
    if handler is None:
        check(x)
        return x
    return handler.checked(x, check)
