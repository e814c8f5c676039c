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
only on devices without float64).

The mean of such a batch is ``shift + delta``, which one float64 can hold only rounded (by
up to half a unit in the last place of the mean, 7e-9 at 1e8). Chan's merge multiplies the
difference of two means by itself, so that rounding would reach M2 as a cross term
``2 delta err n_a n_b / n``. A :class:`Moments` therefore keeps the mean's low-order part
too (``mean_residual``, split off exactly by :func:`two_sum`), and merges take the
difference of means from both parts: merging precomputed moments is as exact as reducing
the raw batches together. Estimators that track their mean as an origin and an offset
(:class:`~normstats.Welford`) keep every digit the same way.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import array_api_compat
import attrs

from ._arrays import (
    accumulation_copy,
    all_finite,
    arrays_equal,
    as_array,
    check_floating,
    clamp_non_negative,
    column_summer,
    describe,
    expand_to,
    quiet_overflow,
    sample_axes,
    split_shape,
    zeros_like,
)
from .typing import Array, Axis, Namespace
from .validation import as_count


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
    check costs one host synchronisation on an accelerator. Values so large that their sums
    or squares overflow are reduced again in scaled units, so that M2 is infinite only when
    the true M2 overflows. NaN and Inf propagate into the
    result (``finite`` says so); call it under :func:`~normstats._arrays.quiet_overflow`
    so that NumPy does not warn about them (an estimator's update does, together with its
    fold: one context per batch).
    """
    count = split_shape(tuple(x.shape), axes)[1]
    delta, m2, s2 = _sums_around(xp, x, axes, count, None)
    if _precise(m2, s2):
        return ShiftedMoments(count, None, delta, m2, finite=True)
    shift = delta
    delta, m2, _ = _sums_around(xp, x, axes, count, shift)
    m2 = clamp_non_negative(xp, m2)
    batch = ShiftedMoments(count, shift, delta, m2, finite=all_finite(xp, m2))
    return batch if batch.finite else _reduce_rescaled(xp, x, axes, batch)


def _reduce_rescaled(
    xp: Namespace, x: Array, axes: tuple[int, ...], unscaled: ShiftedMoments
) -> ShiftedMoments:
    """The moments of finite data whose sums or squares overflow float64 (values beyond
    1e154), each feature reduced in units of a power of two near its own largest magnitude.

    Scaling by a power of two is exact, so M2 comes out infinite only when the true M2
    overflows: data all equal to 1e200, whose squares overflow, have M2 = 0, and a batch
    of 1e308s, whose sum overflows, has a finite mean. Each feature has its own unit, so
    that a feature of ordinary values beside one of huge values keeps its M2 (one unit for
    all would make its squares underflow to 0). Data with NaN or Inf give ``unscaled``.
    Reached only after a non-finite reduction (one more host synchronisation).
    """
    d = accumulation_copy(xp, x)
    largest = xp.max(xp.abs(d), axis=axes)
    if not all_finite(xp, largest):
        return unscaled
    # floor(log2) of a feature's largest magnitude, within the normal exponents: a feature
    # of zeros, or of tiny values, keeps a unit near 1, which needs no scaling
    exponent = xp.floor(xp.log2(xp.where(largest > 0, largest, 1.0)))
    unit = 2.0 ** xp.clip(exponent, min=-1022.0, max=1023.0)
    d /= expand_to(xp, unit, d.ndim, axes)  # now every value is below 2 in magnitude
    scaled = reduce_batch(xp, d, axes)
    m2 = scaled.m2 * unit * unit
    return ShiftedMoments(
        scaled.count,
        None if scaled.shift is None else scaled.shift * unit,
        scaled.delta * unit,
        m2,
        finite=all_finite(xp, m2),
    )


def non_finite_batch_error(xp: Namespace, x: Array, name: str) -> ValueError:
    """The error for a batch whose moments are not finite: it holds NaN or Inf, or values
    so far apart that their sum of squared deviations overflows float64."""
    return non_finite_statistics_error(all_finite(xp, x), name)


def non_finite_statistics_error(values_finite: bool, name: str) -> ValueError:
    """:func:`non_finite_batch_error` for a batch whose values are known to be finite (their
    statistics overflowed) or not."""
    if values_finite:
        return ValueError(
            f"{name}: expected values whose sum of squared deviations fits in float64, got "
            "values so far apart that it overflows"
        )
    return ValueError(f"{name}: expected finite values, got a batch containing NaN or Inf")


def _precise(m2: Array, s2: Array) -> bool:
    """``S2 <= DIGITS_AT_STAKE * M2`` for every feature; False for NaN and Inf."""
    margin = m2 * DIGITS_AT_STAKE - s2
    # compared as a Python float: on torch one kernel fewer than a tensor comparison
    return float(margin.min()) >= 0 if math.prod(margin.shape) else True


def _sums_around(
    xp: Namespace, x: Array, axes: tuple[int, ...], count: int, shift: Array | None
) -> tuple[Array, Array, Array]:
    """``(S1 / n, M2, S2)`` with ``S1 = sum(x - shift)``, ``S2 = sum((x - shift)**2)``.

    ``M2 = S2 - S1 * (S1 / n)``, the corrected two-pass formula when ``shift`` is near the mean.
    """
    d = accumulation_copy(xp, x)
    if shift is not None:
        d -= expand_to(xp, shift, d.ndim, axes)
    sum_over = column_summer(xp, d, axes)
    s1 = sum_over(d)
    d *= d
    s2 = sum_over(d)
    delta = s1 / max(count, 1)
    return delta, s2 - s1 * delta, s2


def chan_merge(
    count_a: int | Array, m2_a: Array, count_b: int | Array, delta: Array, m2_b: Array
) -> tuple[Array, Array]:
    """Chan's merge of two disjoint samples: ``(mean_merged - mean_a, m2_merged)``.

    ``delta`` is ``mean_b - mean_a``. Taking the difference rather than the two means lets a
    caller that reduced batch ``b`` around ``mean_a`` keep every digit of it. Counts may be
    arrays (one per feature) whose sums are positive.
    """
    weight_b = count_b / (count_a + count_b)
    # delta * (delta * w), not delta**2 * w: into an empty sample (w = 0) a delta whose
    # square overflows (data near 1e200 have units of 1e184) adds 0, not inf * 0 = NaN.
    return delta * weight_b, m2_a + m2_b + delta * (delta * (count_a * weight_b))


def blend(old: Array, new: Array, weight: Array | float) -> Array:
    """``old + (new - old) * weight``: a weighted average that moves ``old`` towards ``new``."""
    return old + (new - old) * weight


def two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """``(s, e)``: the rounded sum ``s = a + b`` and its rounding error, ``s + e == a + b``.

    Knuth's TwoSum (The Art of Computer Programming, vol. 2, 4.2.2, theorem B): six
    additions, exact in binary floating point with rounding to nearest whatever the
    magnitudes of ``a`` and ``b``, unless ``s`` overflows (``e`` is then NaN).

    >>> two_sum(1e8, 1e-9)
    (100000000.0, 1e-09)
    """
    s = a + b
    b_rounded = s - a
    a_rounded = s - b_rounded
    return s, (a - a_rounded) + (b - b_rounded)


def _as_count(value: object) -> int:
    return as_count("count", value)


def _as_statistic(value: object, name: str) -> Array:
    xp, array = as_array(value, name)
    check_floating(xp, array, name)
    return array


def _as_mean(value: object) -> Array:
    return _as_statistic(value, "mean")


def _as_m2(value: object) -> Array:
    return _as_statistic(value, "m2")


def _as_mean_residual(value: object) -> Array:
    return _as_statistic(value, "mean_residual")


def _zeros_like_mean(moments: Moments) -> Array:
    return array_api_compat.array_namespace(moments.mean).zeros_like(moments.mean)


@attrs.frozen
class Moments:
    """Count, mean and sum of squared deviations (M2) per feature; merges exactly.

    Parameters
    ----------
    count : int
        Number of samples per feature (a non-negative Python or NumPy integer).
    mean : array
        Mean per feature: a NumPy array or torch tensor (or numbers, converted) of a real
        floating-point dtype, finite.
    m2 : array
        Sum of squared deviations from the mean, per feature, finite and non-negative
        (``var(ddof) = m2 / (count - ddof)``).
    mean_residual : array, keyword-only
        The low-order part of the mean: the mean is ``mean + mean_residual``, which holds
        more digits than one float64. Zeros by default; :meth:`from_array` and :meth:`merge`
        fill it (with :func:`two_sum`), so that ``mean`` is the mean rounded to the dtype
        and merging keeps every digit. Finite, of the shape of ``mean``.

    Every value is checked: a wrong type or dtype raises ``TypeError``, a negative count,
    NaN or Inf, a negative ``m2`` or mismatched shapes raise ``ValueError``, each naming
    the field. So a ``Moments`` always holds statistics that can be merged.

    Shape
    -----
    ``mean``, ``m2`` and ``mean_residual`` have the feature shape: the input's shape
    without the reduced axes.

    Examples
    --------
    >>> import numpy as np
    >>> import normstats as ns
    >>> x = np.arange(12.0).reshape(6, 2)
    >>> m = ns.Moments.from_array(x[:2]) + ns.Moments.from_array(x[2:])
    >>> m.count, m.mean.tolist(), m.var(ddof=1).tolist()
    (6, [5.0, 6.0], [14.0, 14.0])
    """

    count: int = attrs.field(converter=_as_count)
    mean: Array = attrs.field(converter=_as_mean, eq=attrs.cmp_using(eq=arrays_equal))
    m2: Array = attrs.field(converter=_as_m2, eq=attrs.cmp_using(eq=arrays_equal))
    mean_residual: Array = attrs.field(
        default=attrs.Factory(_zeros_like_mean, takes_self=True),
        converter=_as_mean_residual,
        kw_only=True,
        eq=attrs.cmp_using(eq=arrays_equal),
    )

    def __attrs_post_init__(self) -> None:
        shape = tuple(self.mean.shape)
        xp = as_array(self.mean, "mean")[0]
        device = array_api_compat.device(self.mean)
        for name in ("m2", "mean_residual"):
            value = getattr(self, name)
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"{name}: expected the shape of mean {shape}, got {describe(value)}"
                )
            if as_array(value, name)[0] is not xp:
                raise TypeError(
                    f"{name}: expected an array of the kind of mean "
                    f"({type(self.mean).__module__}.{type(self.mean).__name__}), got "
                    f"{type(value).__module__}.{type(value).__name__}"
                )
            if array_api_compat.device(value) != device:
                raise ValueError(
                    f"{name}: expected an array on {device} like mean, got one on "
                    f"{array_api_compat.device(value)}"
                )
        for name in ("mean", "m2", "mean_residual"):
            if not all_finite(xp, getattr(self, name)):
                raise ValueError(f"{name}: expected finite values, got NaN or Inf")
        if math.prod(shape) and not self.m2.min() >= 0:
            raise ValueError(
                "m2: expected non-negative values (a sum of squared deviations), got negative ones"
            )

    @classmethod
    def _trusted(cls, count: int, mean: Array, m2: Array, mean_residual: Array) -> Moments:
        """Build without the checks: for statistics that the library has just computed.

        The checks cost about as much as a small batch's arithmetic; the library's own
        reductions and merges check finiteness themselves (:func:`moments_of_batch` leaves
        it to the caller, who applies a ``nan_policy``).
        """
        moments = object.__new__(cls)
        for name, value in (
            ("count", count),
            ("mean", mean),
            ("m2", m2),
            ("mean_residual", mean_residual),
        ):
            object.__setattr__(moments, name, value)
        return moments

    @classmethod
    def from_array(cls, x: Array, axis: Axis = 0) -> Moments:
        """Reduce ``x`` over ``axis`` (an int or a tuple; NCHW batches use ``(0, 2, 3)``).

        Statistics are float64 arrays in ``x``'s namespace and on its device (NumPy arrays
        for a Dask array, reduced where its chunks are: :mod:`normstats.deferred`). Raises
        ``TypeError`` for a non-floating dtype or a masked array and ``ValueError`` for NaN
        or Inf in ``x`` or values whose squares overflow float64.
        """
        from .deferred import handler_for  # deferred builds on this module

        xp, x = as_array(x, "x")
        check_floating(xp, x, "x")
        deferred = handler_for(x)
        if deferred is not None:  # a Dask array: reduced on its cluster
            reduced = deferred.reduce(x, sample_axes(x, axis), ignore_nan=False)
            if not reduced.finite:
                raise reduced.error("x")
            return reduced.moments()
        with quiet_overflow(x):
            batch = reduce_batch(xp, x, sample_axes(x, axis))
        if not batch.finite:
            raise non_finite_batch_error(xp, x, "x")
        return moments_of_batch(xp, batch)

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
        """The moments of both samples together (Chan's formula); ``count == 0`` is the identity.

        Raises ``ValueError`` when the merged statistics overflow float64 (the means of two
        samples near the largest float64 apart, say).
        """
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
        with quiet_overflow(self.mean):  # overflow is checked below
            mean, residual, m2 = merge_statistics(
                (self.count, self.mean, self.mean_residual, self.m2),
                (other.count, other.mean, other.mean_residual, other.m2),
            )
        if not all_finite(array_api_compat.array_namespace(mean), mean, m2, residual):
            raise ValueError(
                "other: expected moments whose merge with these fits in float64, got a merge "
                "whose mean or sum of squared deviations overflows"
            )
        return Moments._trusted(self.count + other.count, mean, m2, residual)

    def __add__(self, other: object) -> Moments:
        if not isinstance(other, Moments):
            return NotImplemented
        return self.merge(other)


Statistics = tuple[Array, Array, Array, Array]
"""``(count, mean, mean_residual, m2)`` of a sample; ``count`` an int or an array."""


def merge_statistics(a: Statistics, b: Statistics) -> tuple[Array, Array, Array]:
    """``(mean, mean_residual, m2)`` of two disjoint samples together, exactly:
    :meth:`Moments.merge` without its checks.

    Counts may be arrays (one per feature, as a reduction that leaves NaN out gives) whose
    sums are positive. The difference of the means is taken from both parts of each, so
    that close means subtract exactly and their residuals keep the digits beyond float64.
    """
    count_a, mean_a, residual_a, m2_a = a
    count_b, mean_b, residual_b, m2_b = b
    delta = (mean_b - mean_a) + (residual_b - residual_a)
    step, m2 = chan_merge(count_a, m2_a, count_b, delta, m2_b)
    high, low = two_sum(mean_a, step)
    mean, residual = two_sum(high, low + residual_a)
    return mean, residual, m2


def moments_of_batch(xp: Namespace, batch: ShiftedMoments) -> Moments:
    """The :class:`Moments` of a reduced batch, its mean ``shift + delta`` split exactly into
    ``mean + mean_residual``. Not checked: a batch with NaN or Inf gives moments that are not
    finite, and the caller decides (``batch.finite`` says which)."""
    if batch.shift is None:
        return Moments._trusted(batch.count, batch.delta, batch.m2, zeros_like(xp, batch.delta))
    mean, residual = two_sum(batch.shift, batch.delta)
    return Moments._trusted(batch.count, mean, batch.m2, residual)
