"""The exact full pass for NumPy models: population statistics of every BatchNorm input.

After training, a BatchNorm layer's running statistics are only an estimate of what it will
see at inference. Recalibration measures them exactly, with the trained weights frozen:

- one pass (``layerwise=False``, as fvcore's PreciseBN): every layer's input is pooled over
  the data while upstream layers normalize with *batch* statistics, as in training;
- layer by layer (``layerwise=True``): layer k is calibrated on the inputs it will see at
  inference, with the layers before it already calibrated and in evaluation mode. Pass k
  stops at layer k, so L layers cost about (L + 1) / 2 full forward passes.

The two differ by terms of order 1 / batch size (the batch statistics of upstream layers
fluctuate around the population ones), so they part only for small calibration batches.
"""

from __future__ import annotations

from collections.abc import Iterable

from normstats import BatchNorm, ExactFullPass, Moments, functional
from normstats.typing import Array

from .layers import Layer, flatten


def recalibrate(model: Layer, batches: Iterable[object], layerwise: bool = False) -> Layer:
    """Replace every BatchNorm layer's statistics by the exact ones over ``batches``.

    ``batches`` holds arrays or ``(input, ...)`` tuples; with ``layerwise=True`` it is read
    once per layer, so it must be re-iterable (a list, not a generator). Every strategy is
    refilled (``stats.load_moments``): afterwards each layer's ``stats.mean`` and
    ``stats.var`` are the pooled mean and unbiased variance of its input. Layers with
    ``stats="batch"`` keep none and are skipped. Modes are restored afterwards, and on
    failure every layer's statistics are what they were before the call.
    """
    layers = flatten(model)
    targets = {
        i: layer.stats
        for i, layer in enumerate(layers)
        if isinstance(layer, BatchNorm) and layer.stats is not None
    }
    if layerwise and iter(batches) is batches:
        raise TypeError(
            "batches: layer-by-layer recalibration reads the data once per layer; expected a "
            "re-iterable collection (list, tuple, array), got a one-shot iterator"
        )
    modes = [layer.training for layer in layers]
    saved = {i: stats.state_dict() for i, stats in targets.items()}
    try:
        for layer in layers:
            layer.train(False)
        if layerwise:
            for position, stats in targets.items():
                stats.load_moments(_pooled_inputs(layers, batches, [position], layerwise=True)[0])
        else:
            pooled = _pooled_inputs(layers, batches, list(targets), layerwise=False)
            for stats, moments in zip(targets.values(), pooled, strict=True):
                stats.load_moments(moments)
    except BaseException:
        for position, state in saved.items():
            targets[position].load_state_dict(state)
        raise
    finally:
        for layer, mode in zip(layers, modes, strict=True):
            layer.train(mode)
    return model


def _pooled_inputs(
    layers: list[Layer], batches: Iterable[object], positions: list[int], layerwise: bool
) -> list[Moments]:
    """Pooled moments of the inputs of ``layers[p]`` for each p in ``positions``.

    Upstream BatchNorm layers normalize with batch statistics in one-pass mode and with
    their population statistics (evaluation mode) in layerwise mode. The forward stops at
    the last position.
    """
    pools = {position: ExactFullPass() for position in positions}
    last = max(positions, default=-1)
    for batch in batches:
        h: Array = batch[0] if isinstance(batch, tuple | list) else batch
        for index, layer in enumerate(layers[: last + 1]):
            if index in pools and isinstance(layer, BatchNorm):
                pools[index].update(h, axis=functional.reduced_axes(h.ndim, layer.axis))
            if index == last:
                break
            if isinstance(layer, BatchNorm) and not layerwise:
                h = functional.train_forward(
                    h, layer.gamma, layer.beta, axis=layer.axis, eps=layer.eps
                )[0]
            else:
                h = layer.forward(h)
    return [pools[position].moments for position in positions]


__all__ = ["recalibrate"]
