"""Build a strategy from its name: ``make_stats("ema", momentum=0.01)``."""

from __future__ import annotations

from typing import Any

from ._base import Estimator
from ._cumulative import CumulativeAverage
from ._ema import ExponentialMovingAverage
from ._pooled import ExactFullPass, Welford

STRATEGIES: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (ExactFullPass, CumulativeAverage, ExponentialMovingAverage, Welford)
}
"""Every strategy by name: ``"exact"``, ``"cumulative"``, ``"ema"``, ``"welford"``."""


def make_stats(name: str, **kwargs: Any) -> Estimator:
    """Build the strategy called ``name`` with its keyword arguments.

    >>> import normstats as ns
    >>> ns.make_stats("ema", momentum=0.01)
    ExponentialMovingAverage(momentum=0.01, debias=False, nan_policy='raise')
    """
    if name not in STRATEGIES:
        raise ValueError(f"name: expected one of {sorted(STRATEGIES)}, got {name!r}")
    try:
        return STRATEGIES[name](**kwargs)
    except TypeError as error:
        if "unexpected keyword" in str(error):
            raise TypeError(f"make_stats({name!r}): {error}") from None
        raise
