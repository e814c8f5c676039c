r"""Folding many batches into a strategy's state at once.

A layer that trains on an accelerator should not pay a strategy's update, a few dozen small
operations, on every step. It can instead keep each step's batch moments in a slot of a
preallocated buffer and fold the pending slots together now and then: when the buffer is
full and whenever the statistics are read. :meth:`Strategy.fold` is that fold, a pure
function of a state and a :class:`StackedMoments` of ``K`` batches (the slots, oldest
first), some of which may be masked out (a batch with NaN or Inf that is skipped).

The rule is always the same: ``fold(state, slots)`` is the state that
:meth:`~Strategy.step` reaches slot by slot, skipping the masked slots, up to float64
rounding. Every strategy gets it from the loop :func:`fold_by_steps`; the built-in
strategies replace that loop by closed forms whose cost does not grow with ``K`` in
operations (only in arithmetic):

* averages of batch statistics (:func:`fold_batch_averages`): with the weight :math:`w_t`
  of slot :math:`t` (0 for a masked slot) the recurrence
  :math:`r_t = r_{t-1} + w_t (b_t - r_{t-1})` unrolls to

  .. math::

      r_K = r_0 \prod_{t=1}^{K} (1 - w_t) + \sum_{t=1}^{K} w_t\, b_t \prod_{s=t+1}^{K} (1 - w_s)

* pooled moments (:func:`fold_pooled`): the unmasked slots are merged among themselves
  relative to the state's mean, then merged into the state with one Chan merge.

Operations are array-API ones, so a fold runs on NumPy arrays and on torch tensors on any
device, without a host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import array_api_compat

from .._arrays import (
    as_array,
    check_floating,
    describe,
    normalize_axis,
    quiet_overflow,
    split_shape,
)
from ..moments import Moments, chan_merge, moments_of_batch, reduce_batch
from ..typing import Array, Axis, Namespace

if TYPE_CHECKING:
    from ._batch_average import BatchAverage
    from ._strategy import State, Strategy


class StackedMoments(NamedTuple):
    """The moments of ``K`` batches stacked along a leading axis, oldest first.

    Shape: ``means`` and ``m2s`` are ``(K, *feature_shape)``, ``finite`` and ``counts`` are
    ``(K,)``.

    Examples
    --------
    >>> import numpy as np
    >>> import normstats as ns
    >>> from normstats.estimators import StackedMoments
    >>> ema = ns.EMA(momentum=0.5)
    >>> slots = StackedMoments(
    ...     [2, 2], np.array([[1.0], [np.nan]]), np.array([[0.5], [0.5]]), np.array([True, False])
    ... )
    >>> state = ema.fold(ema.initial_state(np.zeros(1)), slots)
    >>> state["mean"].tolist(), state["var"].tolist(), int(state["num_batches"])
    ([0.5], [0.75], 1)
    """

    counts: Sequence[int] | Array
    """Samples per feature of each batch: host ints (they are shapes, known without a look at
    the data), or an array of them on the device of ``means`` (which spares the vectorized
    folds a copy from the host)."""
    means: Array
    m2s: Array
    """Sums of squared deviations from each batch's mean."""
    finite: Array
    """Whether each batch is folded in (booleans); a masked slot's values are never read
    into the result, whatever they are (NaN, Inf or stale)."""
    mean_residuals: Array | None = None
    """The low-order parts of the means (each batch's :attr:`Moments.mean_residual`), or
    None for zeros: the pooled strategies keep them, as they do batch by batch."""

    @classmethod
    def from_moments(cls, moments: Sequence[Moments]) -> StackedMoments:
        """The :class:`Moments` of ``K`` batches (one feature shape, namespace and device),
        stacked in their order, with their mean residuals.

        A batch whose ``m2`` is not finite (the moments of a batch with NaN, which the library
        hands on unchecked) is masked. Raises ``TypeError`` for anything but ``Moments`` and
        ``ValueError`` for no batch or batches of different feature shapes.

        >>> import numpy as np
        >>> import normstats as ns
        >>> from normstats.estimators import StackedMoments
        >>> batches = [ns.Moments.from_array(np.array([[1.0], [3.0]])), ns.Moments.from_array(
        ...     np.array([[5.0], [7.0], [9.0]]))]
        >>> slots = StackedMoments.from_moments(batches)
        >>> slots.counts, slots.means[:, 0].tolist(), slots.finite.tolist()
        ([2, 3], [2.0, 7.0], [True, True])
        """
        moments = list(moments)
        for k, m in enumerate(moments):
            if not isinstance(m, Moments):
                raise TypeError(
                    f"moments: expected normstats.Moments, got {type(m).__name__} at index {k}"
                )
        if not moments:
            raise ValueError("moments: expected the Moments of at least one batch, got none")
        shape = moments[0].feature_shape
        for k, m in enumerate(moments):
            if m.feature_shape != shape:
                raise ValueError(
                    f"moments: expected Moments of one feature shape {shape}, got "
                    f"{m.feature_shape} at index {k}"
                )
        xp = array_api_compat.array_namespace(moments[0].mean)
        m2s = xp.stack([m.m2 for m in moments])
        return cls(
            [m.count for m in moments],
            xp.stack([m.mean for m in moments]),
            m2s,
            _finite_slots(xp, m2s),
            xp.stack([m.mean_residual for m in moments]),
        )

    @classmethod
    def from_batches(cls, x: Array, axis: Axis = 0) -> StackedMoments:
        """The moments of ``K`` equal batches stacked along ``x``'s first axis, each reduced
        over ``axis`` (the axes of one batch, ``x[k]``, as :meth:`Moments.from_array` takes
        them), in one reduction over the whole stack.

        The statistics are the float64 ones :meth:`Moments.from_array` gives each batch, up
        to rounding. A batch with NaN or Inf is masked out (``finite`` is False there)
        rather than raised: the estimators that fold the slots apply their ``nan_policy``.
        Raises ``TypeError`` for a non-floating dtype and ``ValueError`` for an ``x`` with
        no batch axis.

        >>> import numpy as np
        >>> from normstats.estimators import StackedMoments
        >>> slots = StackedMoments.from_batches(np.array([[[1.0], [3.0]], [[2.0], [np.nan]]]))
        >>> slots.counts, slots.means[0].tolist(), slots.m2s[0].tolist(), slots.finite.tolist()
        ([2, 2], [2.0], [2.0], [True, False])
        """
        xp, x = as_array(x, "x")
        check_floating(xp, x, "x")
        if x.ndim < 2:
            raise ValueError(
                "x: expected batches stacked along the first axis (at least 2 axes), got "
                f"{describe(x)}"
            )
        axes = tuple(a + 1 for a in normalize_axis(axis, x.ndim - 1))  # K may be 0
        count = split_shape(tuple(x.shape), axes)[1]
        with quiet_overflow(x):  # non-finite slots are masked below
            batch = reduce_batch(xp, x, axes)
            stacked = moments_of_batch(xp, batch)
            mean, residual, m2 = stacked.mean, stacked.mean_residual, stacked.m2
            finite = _finite_slots(xp, m2)
            if not batch.finite and bool(xp.any(finite)):
                # one slot's NaN keeps a stack from being rescaled: the finite slots whose
                # squares overflowed get their own reduction
                for k in range(int(x.shape[0])):
                    if not bool(finite[k]):
                        one = reduce_batch(xp, x[k : k + 1], axes)
                        if one.finite:
                            slot = moments_of_batch(xp, one)
                            mean[k], residual[k] = slot.mean[0], slot.mean_residual[0]
                            m2[k] = slot.m2[0]
                            finite[k] = True
        return cls([count] * int(x.shape[0]), mean, m2, finite, residual)


def fold_by_steps(strategy: Strategy, state: State, slots: StackedMoments) -> State:
    """``strategy.step`` over the slots in order, each masked slot leaving the state as it was.

    The default fold: correct for any strategy, ``K`` steps long. Counters come back as
    0-d arrays of the statistics' dtype, as a layer's buffers hold them (torch divides
    integer tensors in float32).
    """
    xp = array_api_compat.array_namespace(slots.means)
    state = {key: _counter(xp, value, slots.means) for key, value in state.items()}
    for k, count in enumerate(slots.counts):
        keep = slots.finite[k]
        # a masked slot is stepped with zeros (never its NaN or Inf) and then discarded
        mean = xp.where(keep, slots.means[k], 0.0)
        residual = (
            mean * 0.0
            if slots.mean_residuals is None
            else xp.where(keep, slots.mean_residuals[k], 0.0)
        )
        batch = Moments._trusted(int(count), mean, xp.where(keep, slots.m2s[k], 0.0), residual)
        new = strategy.step(state, batch)
        state = {key: xp.where(keep, _as(xp, new[key]), _as(xp, state[key])) for key in new}
    return state


def fold_batch_averages(strategy: BatchAverage, state: State, slots: StackedMoments) -> State:
    r"""The closed form of an average of batch statistics (EMA, cumulative average).

    The weight of slot :math:`t` is the strategy's :meth:`~BatchAverage.batch_weight` for
    the number of batches folded before it, times its mask :math:`f_t`; the averages of means
    and of unbiased variances then follow the formula in this module's docstring, the
    products :math:`\prod_{s > t}(1 - w_s)` all taken by one cumulative product.
    """
    xp, mask, finite, counts = _masks(slots)
    before = state["num_batches"] + (xp.cumulative_sum(finite) - finite)
    weights = strategy.batch_weight({"num_batches": before}) * finite
    after, decay = _suffix_products(xp, 1.0 - weights)
    coefficients = weights * after
    means = xp.where(mask, slots.means, 0.0)
    divisors = _per_slot(xp, xp.clip(counts - 1.0, min=1.0), slots.m2s.ndim)
    variances = xp.where(mask, slots.m2s / divisors, 0.0)
    return {
        "count": state["count"] + counts @ finite,
        "num_batches": state["num_batches"] + xp.sum(finite),
        "mean": state["mean"] * decay + _weighted_sum(xp, coefficients, means),
        "var": state["var"] * decay + _weighted_sum(xp, coefficients, variances),
    }


def fold_pooled(state: State, slots: StackedMoments) -> State:
    r"""The pooled moments of the state and every unmasked slot (Welford, ExactFullPass).

    Relative to the state's mean :math:`\mu` (``mean_origin + mean_offset``) each slot's
    mean is :math:`d_t = \bar x_t - \mu`; with :math:`c_t = f_t n_t` the unmasked counts,
    the slots pool to

    .. math::

        n_B = \sum_t c_t,\quad \delta_B = \frac{\sum_t c_t d_t}{n_B},\quad
        M_{2,B} = \sum_t f_t M_{2,t} + \sum_t c_t (d_t - \delta_B)^2

    which one Chan merge adds to the state. A state without samples takes the first
    unmasked slot's mean as its origin (as :meth:`PooledEstimator.step` takes the first
    batch's), so that the mean's offset from it, small for data far from zero, keeps the
    digits that one float64 mean would round away.
    """
    xp, mask, finite, counts = _masks(slots)
    empty = _as(xp, state["count"] == 0)
    kept_means = xp.where(mask, slots.means, 0.0)
    # the first unmasked slot's mean, exactly: a product with the one-hot vector of that slot
    first = finite * xp.astype(xp.cumulative_sum(finite) == 1.0, finite.dtype)
    origin = xp.where(empty, _weighted_sum(xp, first, kept_means), state["mean_origin"])
    offset = xp.where(empty, 0.0, state["mean_offset"])
    counts = counts * finite
    relative = kept_means - origin
    if slots.mean_residuals is not None:  # (as PooledEstimator.step takes each batch's)
        relative = relative + slots.mean_residuals
    relative = xp.where(mask, relative - offset, 0.0)
    pooled_count = xp.sum(counts)
    delta = _weighted_sum(xp, counts, relative) / xp.clip(pooled_count, min=1.0)
    spread = relative - delta
    m2s = xp.where(mask, slots.m2s, 0.0)
    pooled_m2 = _weighted_sum(xp, finite, m2s) + _weighted_sum(xp, counts, spread * spread)
    total = state["count"] + pooled_count
    # with no sample on either side any positive count avoids 0 / 0 (and the merge is 0)
    count_a = state["count"] + xp.astype(total == 0, counts.dtype)
    step, m2 = chan_merge(count_a, state["m2"], pooled_count, delta, pooled_m2)
    return {
        "count": total,
        "num_batches": state["num_batches"] + xp.sum(finite),
        "mean_origin": origin,
        "mean_offset": offset + step,
        "m2": m2,
    }


def _masks(slots: StackedMoments) -> tuple[Namespace, Array, Array, Array]:
    """The namespace, the mask shaped to broadcast against ``means``, the mask as 0/1 numbers
    and the counts, in the dtype of the statistics."""
    xp = array_api_compat.array_namespace(slots.means, slots.m2s)
    dtype = slots.means.dtype
    counts: Array = slots.counts
    if not hasattr(counts, "shape"):
        counts = xp.asarray(list(counts), dtype=dtype, device=array_api_compat.device(slots.means))
    elif counts.dtype != dtype:
        counts = xp.astype(counts, dtype)
    mask = _per_slot(xp, slots.finite, slots.means.ndim)
    return xp, mask, xp.astype(slots.finite, dtype), counts


def _suffix_products(xp: Namespace, keep: Array) -> tuple[Array, Array]:
    """``(prod_{s > t} keep[s] for every t, prod_t keep[t])``, by one cumulative product of
    the reversed factors."""
    products = xp.cumulative_prod(xp.flip(keep), include_initial=True)
    return xp.flip(products[:-1]), products[-1]


def _weighted_sum(xp: Namespace, weights: Array, stacked: Array) -> Array:
    """``sum_t weights[t] * stacked[t]`` as one vector-matrix product."""
    if stacked.ndim == 2:
        return weights @ stacked
    flat = xp.reshape(stacked, (stacked.shape[0], -1))
    return xp.reshape(weights @ flat, tuple(stacked.shape[1:]))


def _per_slot(xp: Namespace, a: Array, ndim: int) -> Array:
    """A ``(K,)`` array shaped ``(K, 1, ...)`` to broadcast against ``ndim``-d slots."""
    return xp.reshape(a, (-1,) + (1,) * (ndim - 1))


def _as(xp: Namespace, value: Any) -> Array:
    """A number as a 0-d array (a state's counters may be either)."""
    return value if hasattr(value, "shape") else xp.asarray(value)


def _counter(xp: Namespace, value: Any, like: Array) -> Array:
    """A number as a 0-d array of ``like``'s dtype and device; an array as it is."""
    if hasattr(value, "shape"):
        return value
    return xp.asarray(value, dtype=like.dtype, device=array_api_compat.device(like))


def _finite_slots(xp: Namespace, m2s: Array) -> Array:
    """Whether each slot's statistics are finite (NaN or Inf anywhere in a batch reach its
    sum of squared deviations), a ``(K,)`` boolean array."""
    flat = xp.reshape(m2s, (m2s.shape[0], math.prod(m2s.shape[1:])))  # -1 fails for K = 0
    return xp.all(xp.isfinite(flat), axis=1)
