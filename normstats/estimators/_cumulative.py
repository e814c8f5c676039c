r"""The cumulative average: every batch's statistics weighted equally."""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from ..moments import blend
from ..typing import Array
from ._batch_average import BatchAverage
from ._strategy import State


@attrs.define(eq=False, repr=False, on_setattr=attrs.setters.NO_OP)
class CumulativeAverage(BatchAverage):
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
    mergeable: ClassVar[bool] = True

    def initial_state(self, template: Array) -> State:
        return {"count": 0, "num_batches": 0, "mean": template * 0.0, "var": template * 0.0}

    def resumed_state(self, template: Array, mean: Array, var: Array, num_batches: Any) -> State:
        zeros = template * 0.0
        return {"count": 0, "num_batches": num_batches, "mean": zeros + mean, "var": zeros + var}

    def batch_weight(self, state: State) -> Any:
        return 1.0 / (state["num_batches"] + 1)

    def merge_states(self, mine: State, theirs: State) -> State:
        weight = theirs["num_batches"] / (mine["num_batches"] + theirs["num_batches"])
        return {
            "count": mine["count"] + theirs["count"],
            "num_batches": mine["num_batches"] + theirs["num_batches"],
            "mean": blend(mine["mean"], theirs["mean"], weight),
            "var": blend(mine["var"], theirs["var"], weight),
        }
