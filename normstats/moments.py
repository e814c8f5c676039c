r"""Moments: the sufficient statistics of a stream, and Chan's exact merge.

A :class:`Moments` record holds, per feature, the sample ``count``, the ``mean`` and ``m2``,
the sum of squared deviations from the mean. Two records of disjoint samples merge exactly
(Chan, Golub & LeVeque, 1979):

.. math::

    n = n_a + n_b,\quad \delta = \bar x_b - \bar x_a,\quad
    \bar x = \bar x_a + \delta\,\frac{n_b}{n},\quad
    M_2 = M_{2,a} + M_{2,b} + \delta^2\,\frac{n_a n_b}{n}

so the statistics of a stream do not depend on how it was split into batches. Variances are
derived on read, ``M2 / (n - ddof)``; nothing here ever forms ``E[x^2] - E[x]^2``.

A batch is reduced to the sums :math:`S_1 = \sum (x - s)` and :math:`S_2 = \sum (x - s)^2`
around a reference :math:`s`, and :math:`M_2 = S_2 - S_1^2 / n`. Around zero this is one
pass; when the data sit far from zero relative to their spread (1e8 + N(0, 1), say) the
subtraction would cancel every digit, so such a batch is reduced again around its own mean,
which the first pass found. Sums accumulate in float64 whatever the input dtype (float32
only on devices without float64). Merges use the difference of means, so an estimator that
tracks its mean to more than float64 precision (:class:`~normstats.Welford`) keeps every
digit over any number of batches.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import attrs
import numpy as np

from ._arrays import (
    accumulation_dtype,
    all_finite,
    arrays_equal,
    as_array,
    check_floating,
    clamp_non_negative,
    column_summer,
    describe,
    expand_to,
    normalize_axis,
    split_shape,
)
from ._typing import Array, Axis, Namespace


class ShiftedMoments(NamedTuple):
    """A reduced batch relative to a reference: its mean is ``shift + delta``."""

    count: int  # type: ignore[assignment]  # shadows tuple.count, like Moments.count
    shift: Array | None
    """The reference the batch was reduced around; None for zero."""
    delta: Array
    m2: Array
    finite: bool
    """Whether every statistic is finite (the batch held no NaN, Inf or overflowing value)."""

    @property
    def mean(self) -> Array:
        return self.delta if self.shift is None else self.shift + self.delta


DIGITS_AT_STAKE = 64.0
"""Largest ``sum(x**2) / M2`` (about ``1 + mean**2 / var``) reduced without a shift.

``M2 = S2 - S1**2 / n`` loses ``log10(S2 / M2)`` digits to cancellation; below this ratio
(a mean within 8 standard deviations of zero) the loss is under two digits, and above it
the batch is reduced again around its own mean.
"""


def reduce_batch(xp: Namespace, x: Array, axes: tuple[int, ...]) -> ShiftedMoments:
    """Count, mean and M2 of ``x`` over ``axes``, accumulated in float64.

    One pass of sums :math:`S_1, S_2` around zero; when the data's offset would cost digits
    (or a value is not finite), a second pass around the mean that the first one found. The
    check costs one host synchronisation on an accelerator. NaN and Inf propagate into the
    result (``finite`` says so) without NumPy warnings.
    """
    count = split_shape(tuple(x.shape), axes)[1]
    with np.errstate(invalid="ignore", over="ignore"):
        delta, m2, s2 = _sums_around(xp, x, axes, count, None)
        if _precise(m2, s2):
            return ShiftedMoments(count, None, delta, m2, finite=True)
        shift = delta
        delta, m2, _ = _sums_around(xp, x, axes, count, shift)
        m2 = clamp_non_negative(xp, m2)
    return ShiftedMoments(count, shift, delta, m2, finite=all_finite(xp, m2))


def _precise(m2: Array, s2: Array) -> bool:
    """``S2 <= DIGITS_AT_STAKE * M2`` for every feature; False for NaN and Inf."""
    margin = m2 * DIGITS_AT_STAKE - s2
    return bool(margin.min() >= 0) if math.prod(margin.shape) else True


def _sums_around(
    xp: Namespace, x: Array, axes: tuple[int, ...], count: int, shift: Array | None
) -> tuple[Array, Array, Array]:
    """``(S1 / n, M2, S2)`` with ``S1 = sum(x - shift)``, ``S2 = sum((x - shift)**2)``.

    ``M2 = S2 - S1 * (S1 / n)``, the corrected two-pass formula when ``shift`` is near the mean.
    """
    d = xp.astype(x, accumulation_dtype(xp, x), copy=True)
    if shift is not None:
        d -= expand_to(xp, shift, d.ndim, axes)
    sum_over = column_summer(xp, d, axes)
    s1 = sum_over(d)
    d *= d
    s2 = sum_over(d)
    delta = s1 / max(count, 1)
    return delta, s2 - s1 * delta, s2


def chan_merge(
    count_a: int, m2_a: Array, count_b: int, delta: Array, m2_b: Array
) -> tuple[Array, Array]:
    """Chan's merge of two disjoint samples: ``(mean_merged - mean_a, m2_merged)``.

    ``delta`` is ``mean_b - mean_a``. Taking the difference rather than the two means lets a
    caller that reduced batch ``b`` around ``mean_a`` keep every digit of it.
    """
    weight_b = count_b / (count_a + count_b)
    return delta * weight_b, m2_a + m2_b + delta * delta * (count_a * weight_b)


def blend(old: Array, new: Array, weight: Array | float) -> Array:
    """``old + (new - old) * weight``: a weighted average that moves ``old`` towards ``new``."""
    return old + (new - old) * weight


def _check_count(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"count: expected a non-negative int, got {value!r}")
    if value < 0:
        raise ValueError(f"count: expected a non-negative int, got {value!r}")


@attrs.frozen
class Moments:
    """Count, mean and sum of squared deviations (M2) per feature; merges exactly.

    Parameters
    ----------
    count : int
        Number of samples per feature.
    mean : array
        Mean per feature.
    m2 : array
        Sum of squared deviations from the mean, per feature (``var(ddof) = m2 / (count - ddof)``).

    Shape
    -----
    ``mean`` and ``m2`` have the feature shape: the input's shape without the reduced axes.

    Examples
    --------
    >>> import numpy as np
    >>> import normstats as ns
    >>> x = np.arange(12.0).reshape(6, 2)
    >>> m = ns.Moments.from_array(x[:2]) + ns.Moments.from_array(x[2:])
    >>> m.count, m.mean.tolist(), m.var(ddof=1).tolist()
    (6, [5.0, 6.0], [14.0, 14.0])
    """

    count: int = attrs.field(validator=_check_count)
    mean: Array = attrs.field(eq=attrs.cmp_using(eq=arrays_equal))
    m2: Array = attrs.field(eq=attrs.cmp_using(eq=arrays_equal))

    @m2.validator
    def _check_shapes(self, attribute: attrs.Attribute[Array], value: Array) -> None:
        mean_shape = tuple(getattr(self.mean, "shape", ()))
        m2_shape = tuple(getattr(value, "shape", ()))
        if mean_shape != m2_shape:
            raise ValueError(f"m2: expected the shape of mean {mean_shape}, got {describe(value)}")

    @classmethod
    def from_array(cls, x: Array, axis: Axis = 0) -> Moments:
        """Reduce ``x`` over ``axis`` (an int or a tuple; NCHW batches use ``(0, 2, 3)``).

        Statistics are float64 arrays in ``x``'s namespace and on its device.
        """
        xp, x = as_array(x, "x")
        check_floating(xp, x, "x")
        batch = reduce_batch(xp, x, normalize_axis(axis, x.ndim))
        return cls(batch.count, batch.mean, batch.m2)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of ``mean`` and ``m2``."""
        return tuple(self.mean.shape)

    def var(self, ddof: int = 0) -> Array:
        """Variance ``m2 / (count - ddof)``; raises ``ValueError`` when ``count <= ddof``."""
        if self.count <= ddof:
            raise ValueError(
                f"ddof: expected fewer than count={self.count} degrees of freedom, got {ddof}"
            )
        return self.m2 / (self.count - ddof)

    def merge(self, other: Moments) -> Moments:
        """The moments of both samples together (Chan's formula); ``count == 0`` is the identity."""
        if not isinstance(other, Moments):
            raise TypeError(f"other: expected Moments, got {type(other).__name__}")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        if self.feature_shape != other.feature_shape:
            raise ValueError(
                f"other: expected moments of feature shape {self.feature_shape}, "
                f"got {other.feature_shape}"
            )
        step, m2 = chan_merge(self.count, self.m2, other.count, other.mean - self.mean, other.m2)
        return Moments(self.count + other.count, self.mean + step, m2)

    def __add__(self, other: object) -> Moments:
        if not isinstance(other, Moments):
            return NotImplemented
        return self.merge(other)
