r"""Pooled strategies: the count-weighted mean and variance of every sample seen.

Batches are weighted by their size: the state is the :class:`~normstats.Moments` of the
union of all samples, kept with Chan's merge, so the result is that of one pass over the
concatenated stream however it was split. It includes the variance *between* batch means,
which the per-batch averages of :class:`~normstats.CumulativeAverage` leave out.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from ..moments import Moments, chan_merge, two_sum
from ..typing import Array
from ._fold import StackedMoments, fold_pooled
from ._strategy import State, Strategy


@attrs.define(eq=False, repr=False, on_setattr=attrs.setters.NO_OP)
class PooledEstimator(Strategy):
    """Shared state and math of :class:`Welford` and :class:`ExactFullPass`.

    The state is ``count``, ``m2`` and the running mean kept as ``mean_origin +
    mean_offset``: the origin is the first batch's mean and never changes, the offset takes
    every update. For data far from zero (1e8 + N(0, 1)) the offset is small, so it is known
    to a tiny fraction of one float64 ulp of the mean, and Chan's ``delta`` (batch mean minus
    running mean) keeps every digit over any number of batches; elsewhere it is as accurate
    as a plain float64 mean.
    """

    array_keys: ClassVar[tuple[str, ...]] = ("mean_origin", "mean_offset", "m2")
    # A fold moves the offset by less than delta, whose square (times at least 1/2) is
    # added to m2: m2 overflows before the mean can.
    overflow_keys: ClassVar[tuple[str, ...]] = ("m2",)
    non_negative_keys: ClassVar[tuple[str, ...]] = ("m2",)
    mergeable: ClassVar[bool] = True

    @property
    def mean(self) -> Array:
        """Mean of every sample folded in."""
        state = self._filled_state("mean")
        return state["mean_origin"] + state["mean_offset"]

    @property
    def var(self) -> Array:
        """Unbiased (``ddof=1``) variance of every sample folded in."""
        state = self._filled_state("var")
        if state["count"] < 2:
            raise ValueError(
                f"var: the unbiased variance needs at least 2 samples, got {state['count']}"
            )
        return self.estimate(state)[1]

    @property
    def moments(self) -> Moments:
        """Count, mean and M2 of every sample folded in; the mean's digits beyond float64
        are its ``mean_residual``, so that merging these moments elsewhere loses none."""
        state = self._filled_state("moments")
        mean, residual = two_sum(state["mean_origin"], state["mean_offset"])
        return Moments(state["count"], mean, state["m2"], mean_residual=residual)

    # -- functional core ---------------------------------------------------------------

    def initial_state(self, template: Array) -> State:
        return {
            "count": 0,
            "num_batches": 0,
            "mean_origin": template * 0.0,
            "mean_offset": template * 0.0,
            "m2": template * 0.0,
        }

    def _first_state(self, batch: Moments) -> State:
        # The first batch's mean becomes the origin, so later offsets are small.
        state = self.initial_state(batch.m2)
        state["mean_origin"] = batch.mean
        return state

    def step(self, state: State, batch: Moments) -> State:
        origin, offset = state["mean_origin"], state["mean_offset"]
        # With offset data batch.mean and origin are close float64 values, so their
        # difference is exact, and with the mean's residual delta is exact up to the
        # batch's own rounding.
        delta = (batch.mean - origin) + batch.mean_residual - offset
        step, m2 = chan_merge(state["count"], state["m2"], batch.count, delta, batch.m2)
        return {
            "count": state["count"] + batch.count,
            "num_batches": state["num_batches"] + 1,
            "mean_origin": origin,
            "mean_offset": offset + step,
            "m2": m2,
        }

    def estimate(self, state: State) -> tuple[Array, Array]:
        return state["mean_origin"] + state["mean_offset"], state["m2"] / (state["count"] - 1)

    def fold(self, state: State, slots: StackedMoments) -> State:
        return fold_pooled(state, slots)

    def merge_states(self, mine: State, theirs: State) -> State:
        delta = (theirs["mean_origin"] - mine["mean_origin"]) + (
            theirs["mean_offset"] - mine["mean_offset"]
        )
        step, m2 = chan_merge(mine["count"], mine["m2"], theirs["count"], delta, theirs["m2"])
        return {
            "count": mine["count"] + theirs["count"],
            "num_batches": mine["num_batches"] + theirs["num_batches"],
            "mean_origin": mine["mean_origin"],
            "mean_offset": mine["mean_offset"] + step,
            "m2": m2,
        }


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
