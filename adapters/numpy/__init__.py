"""NumPy models with the normstats BatchNorm engine (``normstats.adapters.numpy``).

A small, typed layer kit — ``Linear``, ``Conv``, ``ReLU``, ``GlobalAveragePool``, ``BatchNorm``
(the engine), ``Sequential``,
softmax cross-entropy, ``SGD`` — enough to train a network with BatchNorm on real data, and
``recalibrate``, the exact full pass that fills each layer's statistics after training, and
``at_test_time``, the test-time statistics for shifted data (docs/test-time.md).
"""

from .conv import Conv, GlobalAveragePool
from .layers import BatchNorm, Layer, Linear, Parameter, ReLU, Sequential, flatten
from .recalibrate import recalibrate
from .testtime import TestTimeModel, at_test_time
from .training import SGD, evaluate, fit, minibatches, softmax_cross_entropy

__all__ = [
    "SGD",
    "BatchNorm",
    "Conv",
    "GlobalAveragePool",
    "Layer",
    "Linear",
    "Parameter",
    "ReLU",
    "Sequential",
    "TestTimeModel",
    "at_test_time",
    "evaluate",
    "fit",
    "flatten",
    "minibatches",
    "recalibrate",
    "softmax_cross_entropy",
]
