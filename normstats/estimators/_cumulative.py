r"""The cumulative average: every batch's statistics weighted equally."""

from __future__ import annotations

from typing import ClassVar

import attrs

from .._typing import Array
from ..moments import ShiftedMoments
from ._base import Estimator, NoBatchError
from ._protocol import RunningStats


@attrs.define(eq=False, repr=False, on_setattr=attrs.setters.NO_OP)
class CumulativeAverage(Estimator):
    r"""Equal-weight average of batch means and of unbiased batch variances.

    PyTorch's ``momentum=None`` and Algorithm 2 of the BatchNorm paper (Ioffe & Szegedy,
    2015). After batch :math:`k` with mean :math:`\bar x_k` and unbiased variance
    :math:`s_k^2`:

    .. math::

        \mu \leftarrow \mu + \tfrac{1}{k}(\bar x_k - \mu),\qquad
        \sigma^2 \leftarrow \sigma^2 + \tfrac{1}{k}(s_k^2 - \sigma^2)

    Batches are weighted equally whatever their size, and the spread *between* batch means is
    not part of the variance (use :class:`Welford` for the pooled variance). A batch needs at
    least two samples per feature. ``merge`` weights the two averages by their numbers of
    batches, which equals having averaged both streams' batches.

    Parameters
    ----------
    nan_policy : {"raise", "skip"}
        What to do with a batch containing NaN or Inf.

    Examples
    --------
    >>> import numpy as np
    >>> import normstats as ns
    >>> stats = ns.CumulativeAverage()
    >>> stats.update(np.array([[0.0], [2.0]]))
    >>> stats.update(np.array([[10.0], [10.0], [10.0]]))
    >>> stats.mean.tolist(), stats.var.tolist()
    ([5.5], [1.0])
    """

    name: ClassVar[str] = "cumulative"
    min_batch_count: ClassVar[int] = 2
    array_keys: ClassVar[tuple[str, ...]] = ("mean", "var")

    _mean: Array = attrs.field(default=None, init=False, repr=False)
    _var: Array = attrs.field(default=None, init=False, repr=False)

    @property
    def mean(self) -> Array:
        """Average of the batch means."""
        if self._mean is None:
            raise NoBatchError("mean: no batch seen yet; call update() first")
        return self._mean

    @property
    def var(self) -> Array:
        """Average of the unbiased batch variances."""
        if self._var is None:
            raise NoBatchError("var: no batch seen yet; call update() first")
        return self._var

    def merge(self, other: RunningStats) -> None:
        """Fold in ``other``'s batches, weighting each average by its number of batches."""
        theirs = self._check_mergeable(other)
        if theirs._mean is not None:
            if self._mean is None:
                self._mean, self._var = theirs._mean, theirs._var
            else:
                weight = theirs._num_batches / (self._num_batches + theirs._num_batches)
                self._mean = self._mean + (theirs._mean - self._mean) * weight
                self._var = self._var + (theirs._var - self._var) * weight
        self._merge_counters(theirs)

    def _state_template(self) -> Array | None:
        return self._mean

    def _fold(self, batch: ShiftedMoments) -> None:
        batch_var = batch.m2 / (batch.count - 1)
        if self._mean is None:
            self._mean, self._var = batch.mean, batch_var
            return
        weight = 1.0 / (self._num_batches + 1)
        self._mean = self._mean + (batch.mean - self._mean) * weight
        self._var = self._var + (batch_var - self._var) * weight

    def _arrays(self) -> dict[str, Array | float]:
        if self._mean is None:
            return {"mean": 0.0, "var": 0.0}
        return {"mean": self._mean, "var": self._var}

    def _set_arrays(self, arrays: dict[str, Array] | None) -> None:
        self._mean, self._var = (None, None) if arrays is None else (arrays["mean"], arrays["var"])
