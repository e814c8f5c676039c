"""Running-statistics strategies: four estimators behind one protocol."""

from ._cumulative import CumulativeAverage
from ._ema import EMA, ExponentialMovingAverage
from ._fold import StackedMoments
from ._pooled import ExactFullPass, Welford
from ._protocol import RunningStats
from ._registry import STRATEGIES, make_stats, resolve_stats

__all__ = [
    "EMA",
    "STRATEGIES",
    "CumulativeAverage",
    "ExactFullPass",
    "ExponentialMovingAverage",
    "RunningStats",
    "StackedMoments",
    "Welford",
    "make_stats",
    "resolve_stats",
]
