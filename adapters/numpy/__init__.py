"""NumPy models with the normstats BatchNorm engine (``normstats.adapters.numpy``).

A small, typed layer kit — ``Linear``, ``Conv``, ``ReLU``, ``GlobalAveragePool``, ``BatchNorm``
(the engine), ``Sequential``,
softmax cross-entropy, ``SGD`` — enough to train a network with BatchNorm on real data, and
``recalibrate``, the exact full pass that fills each layer's statistics after training.
"""

from .conv import Conv, GlobalAveragePool
from .layers import BatchNorm, Layer, Linear, Parameter, ReLU, Sequential, flatten
from .recalibrate import recalibrate
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
    "evaluate",
    "fit",
    "flatten",
    "minibatches",
    "recalibrate",
    "softmax_cross_entropy",
]
