"""Running-statistics strategies: four built-in estimators, and the protocol that user
strategies implement too."""

from ._cumulative import CumulativeAverage
from ._ema import EMA, ExponentialMovingAverage
from ._fold import StackedMoments
from ._pooled import ExactFullPass, Welford
from ._protocol import RunningStats, StateValue
from ._registry import STRATEGIES, make_stats, resolve_stats, strategy_class
from ._strategy import NoBatchError, State, Strategy, update_moments_all, update_stacked_all

__all__ = [
    "EMA",
    "STRATEGIES",
    "CumulativeAverage",
    "ExactFullPass",
    "ExponentialMovingAverage",
    "NoBatchError",
    "RunningStats",
    "StackedMoments",
    "State",
    "StateValue",
    "Strategy",
    "Welford",
    "make_stats",
    "resolve_stats",
    "strategy_class",
    "update_moments_all",
    "update_stacked_all",
]
