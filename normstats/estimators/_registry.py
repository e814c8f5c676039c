"""Build a strategy from its name (``make_stats("ema", momentum=0.01)``) or a layer's stats."""

from __future__ import annotations

from typing import Any

from ._base import Estimator
from ._cumulative import CumulativeAverage
from ._ema import ExponentialMovingAverage
from ._pooled import ExactFullPass, Welford
from ._protocol import RunningStats

STRATEGIES: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (ExactFullPass, CumulativeAverage, ExponentialMovingAverage, Welford)
}
"""Every strategy by name: ``"exact"``, ``"cumulative"``, ``"ema"``, ``"welford"``."""


def resolve_stats(stats: object, **kwargs: Any) -> RunningStats | None:
    """What a layer's ``stats`` argument means: a strategy name (built with ``kwargs``), an
    estimator instance (no ``kwargs``), or ``"batch"`` (None: batch statistics, no strategy).
    """
    if isinstance(stats, str):
        if stats == "batch":
            if kwargs:
                raise TypeError(f"stats='batch' takes no strategy arguments, got {sorted(kwargs)}")
            return None
        if stats not in STRATEGIES:
            raise ValueError(
                f"stats: expected one of {sorted([*STRATEGIES, 'batch'])} or an estimator, "
                f"got {stats!r}"
            )
        return make_stats(stats, **kwargs)
    if isinstance(stats, RunningStats):
        if kwargs:
            raise TypeError(
                f"stats: strategy arguments {sorted(kwargs)} apply to a strategy name, not to "
                f"an estimator instance"
            )
        return stats
    raise TypeError(f"stats: expected a strategy name or an estimator, got {stats!r}")


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
