"""normstats: streaming statistics with exact merges, and BatchNorm built on them.

>>> import numpy as np
>>> import normstats as ns
>>> stats = ns.make_stats("welford")
>>> stats.update(np.array([[1.0, 10.0], [3.0, 30.0]]))
>>> stats.mean.tolist()
[2.0, 20.0]
"""

import pkgutil

from . import functional
from .batchnorm import BatchNorm
from .estimators import (
    EMA,
    CumulativeAverage,
    ExactFullPass,
    ExponentialMovingAverage,
    RunningStats,
    Strategy,
    Welford,
    make_stats,
)
from .moments import Moments
from .standardizer import Standardizer

__version__ = "0.1.0"

__all__ = [
    "EMA",
    "BatchNorm",
    "CumulativeAverage",
    "ExactFullPass",
    "ExponentialMovingAverage",
    "Moments",
    "RunningStats",
    "Standardizer",
    "Strategy",
    "Welford",
    "functional",
    "make_stats",
]

# The development install (`make install`) links every module into build/__editable__.*/, an
# ordinary package tree that type checkers read. Where the repository root comes first on
# sys.path (python started there, pytest), this package is found in normstats/ of the source
# tree, which does not hold adapters/: extend_path appends the linked normstats/ too, so
# normstats.adapters resolves the same either way. A wheel install has one tree: no change.
__path__ = pkgutil.extend_path(__path__, __name__)
