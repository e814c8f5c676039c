r"""Pooled strategies: the count-weighted mean and variance of every sample seen.

Batches are weighted by their size: the state is the :class:`~normstats.Moments` of the
union of all samples, kept with Chan's merge, so the result is that of one pass over the
concatenated stream however it was split. It includes the variance *between* batch means,
which the per-batch averages of :class:`~normstats.CumulativeAverage` leave out.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from .._typing import Array
from ..moments import Moments, ShiftedMoments, chan_merge
from ._base import Estimator, NoBatchError
from ._protocol import RunningStats


@attrs.define(eq=False, repr=False, on_setattr=attrs.setters.NO_OP)
class PooledEstimator(Estimator):
    """Shared state and math of :class:`Welford` and :class:`ExactFullPass`.

    The running mean is kept as ``origin + offset``: ``origin`` is the first batch's mean and
    never changes, ``offset`` takes every update. For data far from zero (1e8 + N(0, 1)) the
    offset is small, so it is known to a tiny fraction of one float64 ulp of the mean, and
    Chan's ``delta`` (batch mean minus running mean) keeps every digit over any number of
    batches; elsewhere it is as accurate as a plain float64 mean.
    """

    array_keys: ClassVar[tuple[str, ...]] = ("mean_origin", "mean_offset", "m2")

    # State arrays of the feature shape; None before the first batch.
    _origin: Array = attrs.field(default=None, init=False, repr=False)
    _offset: Array = attrs.field(default=None, init=False, repr=False)
    _m2: Array = attrs.field(default=None, init=False, repr=False)

    @property
    def mean(self) -> Array:
        """Mean of every sample folded in."""
        return self._filled_moments("mean").mean

    @property
    def var(self) -> Array:
        """Unbiased (``ddof=1``) variance of every sample folded in."""
        moments = self._filled_moments("var")
        if moments.count < 2:
            raise ValueError(
                f"var: the unbiased variance needs at least 2 samples, got {moments.count}"
            )
        return moments.var(ddof=1)

    @property
    def moments(self) -> Moments:
        """Count, mean and M2 of every sample folded in."""
        return self._filled_moments("moments")

    def _filled_moments(self, name: str) -> Moments:
        if self._origin is None:
            raise NoBatchError(f"{name}: no batch seen yet; {self._unfilled_hint()}")
        return Moments(self._count, self._origin + self._offset, self._m2)

    def merge(self, other: RunningStats) -> None:
        """Fold in ``other``'s samples: equal to having seen both streams (exact)."""
        theirs = self._check_mergeable(other)
        if theirs._origin is not None:
            if self._origin is None:
                self._origin, self._offset, self._m2 = theirs._origin, theirs._offset, theirs._m2
            else:
                delta = (theirs._origin - self._origin) + (theirs._offset - self._offset)
                self._merge_in(theirs._count, delta, theirs._m2)
        self._merge_counters(theirs)

    def _unfilled_hint(self) -> str:
        return "call update() first"

    def _state_template(self) -> Array | None:
        return self._m2

    def _fold(self, batch: ShiftedMoments) -> None:
        if self._origin is None:
            if batch.shift is None:  # reduced around zero: the mean is delta
                self._origin, self._offset = batch.delta, batch.delta * 0.0
            else:
                self._origin, self._offset = batch.shift, batch.delta
            self._m2 = batch.m2
            return
        # With offset data batch.shift and origin are close float64 values, so their
        # difference is exact, and delta is exact up to the batch's own rounding.
        if batch.shift is None:  # reduced around zero
            delta = batch.delta - self._origin
        else:
            delta = (batch.shift - self._origin) + batch.delta
        delta -= self._offset
        self._merge_in(batch.count, delta, batch.m2)

    def _merge_in(self, count: int, delta: Array, m2: Array) -> None:
        step, self._m2 = chan_merge(self._count, self._m2, count, delta, m2)
        self._offset = self._offset + step

    def _arrays(self) -> dict[str, Array | float]:
        if self._origin is None:
            return dict.fromkeys(self.array_keys, 0.0)
        return {"mean_origin": self._origin, "mean_offset": self._offset, "m2": self._m2}

    def _set_arrays(self, arrays: dict[str, Array] | None) -> None:
        if arrays is None:
            self._origin = self._offset = self._m2 = None
        else:
            self._origin, self._offset, self._m2 = (arrays[k] for k in self.array_keys)


@attrs.define(eq=False, repr=False, on_setattr=attrs.setters.NO_OP)
class Welford(PooledEstimator):
    r"""Count-weighted pooled mean and variance of every training sample (Welford / Chan).

    Every batch is merged into the running :class:`~normstats.Moments` with Chan's parallel
    formula, so batches are weighted by their size and the estimate equals ``np.mean`` and
    ``np.var(ddof=1)`` of the concatenated stream, including the spread between batch means:

    .. math::

        \delta = \bar x_b - \mu,\quad
        \mu \leftarrow \mu + \delta\,\tfrac{n_b}{n + n_b},\quad
        M_2 \leftarrow M_2 + M_{2,b} + \delta^2\,\tfrac{n\,n_b}{n + n_b},\quad
        \sigma^2 = \tfrac{M_2}{n - 1}

    Data far from zero (1e8 + N(0, 1)) keep every digit: batches are reduced around their
    own mean and the running mean is tracked as a fixed origin plus a small offset.

    Parameters
    ----------
    nan_policy : {"raise", "skip"}
        What to do with a batch containing NaN or Inf: raise ``ValueError``, or skip it and
        count it in ``num_batches_skipped``.

    Examples
    --------
    >>> import numpy as np
    >>> import normstats as ns
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, size=(1000, 4))
    >>> stats = ns.Welford()
    >>> for batch in np.array_split(x, 7):
    ...     stats.update(batch)
    >>> bool(np.allclose(stats.var, x.var(axis=0, ddof=1), rtol=1e-12))
    True
    """

    name: ClassVar[str] = "welford"


@attrs.define(eq=False, repr=False, on_setattr=attrs.setters.NO_OP)
class ExactFullPass(PooledEstimator):
    r"""The exact population statistics of a dedicated pass over the data after training.

    The "ideal solution" of the BatchNorm paper (Ioffe & Szegedy, 2015, Sec. 3.1) and fvcore's
    PreciseBN: with the trained weights frozen, every training sample's layer input is pooled
    (count-weighted, exactly as :class:`Welford`) into one mean and unbiased variance. A
    BatchNorm layer never feeds it training batches; only a calibration pass fills it, and
    reading it before calibration raises an error that says so.

    Parameters
    ----------
    nan_policy : {"raise", "skip"}
        What to do with a batch containing NaN or Inf.

    Examples
    --------
    >>> import numpy as np
    >>> import normstats as ns
    >>> stats = ns.ExactFullPass()
    >>> stats.update(np.array([[1.0], [2.0], [3.0], [6.0]]))
    >>> stats.mean.tolist(), stats.var.tolist()
    ([3.0], [4.666666666666667])
    """

    name: ClassVar[str] = "exact"

    def _unfilled_hint(self) -> str:
        return "an exact full pass is filled by calibration: run recalibrate() (or update()) first"
