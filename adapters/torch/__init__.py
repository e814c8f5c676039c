"""PyTorch models with pluggable BatchNorm statistics (``normstats.adapters.torch``).

``BatchNorm`` is a drop-in ``nn.Module`` whose population statistics are a strategy;
``convert`` swaps every BatchNorm of a model for it and ``revert`` goes back to torch's
classes for export; ``recalibrate`` is the exact full pass after training; ``at_test_time``
evaluates with test-time statistics for shifted data (docs/test-time.md).
"""

from .batchnorm import BatchNorm
from .convert import convert, revert
from .recalibrate import recalibrate
from .state import StrategyState
from .testtime import TestTimeModel, at_test_time

__all__ = [
    "BatchNorm",
    "StrategyState",
    "TestTimeModel",
    "at_test_time",
    "convert",
    "recalibrate",
    "revert",
]
