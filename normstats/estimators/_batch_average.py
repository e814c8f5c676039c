"""Strategies that average per-batch statistics: the cumulative average and the EMA."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from ..moments import Moments, blend
from ..typing import Array
from ._fold import StackedMoments, fold_batch_averages
from ._strategy import State, Strategy


@attrs.define(eq=False, repr=False, on_setattr=attrs.setters.NO_OP)
class BatchAverage(Strategy):
    r"""Averages of the batch mean and the unbiased batch variance, one weight per batch.

    After a batch with mean :math:`\bar x_b` and unbiased variance :math:`s_b^2`:
    :math:`\mu \leftarrow \mu + w(\bar x_b - \mu)`, :math:`\sigma^2 \leftarrow \sigma^2 +
    w(s_b^2 - \sigma^2)`, with the weight :math:`w` a strategy gives (:meth:`batch_weight`).
    Batches need two samples per feature (the unbiased variance), and the spread between
    batch means is not part of the variance.
    """

    min_batch_count: ClassVar[int] = 2
    array_keys: ClassVar[tuple[str, ...]] = ("mean", "var")
    # The variance is a weighted average of finite non-negative variances, which cannot
    # overflow; the mean moves by (new - old) * weight, and new - old can.
    overflow_keys: ClassVar[tuple[str, ...]] = ("mean",)
    non_negative_keys: ClassVar[tuple[str, ...]] = ("var",)

    def batch_weight(self, state: State) -> Any:
        """The weight of the next batch given the state before it.

        It may depend on the state through ``num_batches`` only, elementwise: :meth:`fold`
        asks for the weights of many batches at once, with ``num_batches`` an array.
        """
        raise NotImplementedError

    def step(self, state: State, batch: Moments) -> State:
        weight = self.batch_weight(state)
        return {
            "count": state["count"] + batch.count,
            "num_batches": state["num_batches"] + 1,
            "mean": blend(state["mean"], batch.mean, weight),
            "var": blend(state["var"], batch.m2 / (batch.count - 1), weight),
        }

    def estimate(self, state: State) -> tuple[Array, Array]:
        return state["mean"], state["var"]

    def fold(self, state: State, slots: StackedMoments) -> State:
        return fold_batch_averages(self, state, slots)
