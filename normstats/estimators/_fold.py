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

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import array_api_compat

from ..moments import Moments, chan_merge
from ..typing import Array, Namespace

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


def fold_by_steps(strategy: Strategy, state: State, slots: StackedMoments) -> State:
    """``strategy.step`` over the slots in order, each masked slot leaving the state as it was.

    The default fold: correct for any strategy, ``K`` steps long. Counters come back as
    0-d arrays.
    """
    xp = array_api_compat.array_namespace(slots.means)
    for k, count in enumerate(slots.counts):
        keep = slots.finite[k]
        # a masked slot is stepped with zeros (never its NaN or Inf) and then discarded
        mean = xp.where(keep, slots.means[k], 0.0)
        batch = Moments._trusted(int(count), mean, xp.where(keep, slots.m2s[k], 0.0), mean * 0.0)
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
    relative = xp.where(mask, (kept_means - origin) - offset, 0.0)
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
