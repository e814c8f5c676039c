"""The exact full pass for NumPy models: population statistics of every BatchNorm input.

The algorithm (one pass or layer by layer with early exit, the NaN policy, rollback) is
:mod:`normstats.adapters.recalibration`'s, shared with the torch adapter; this module says
how a :class:`~normstats.adapters.numpy.Sequential` runs a calibration forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from normstats import BatchNorm, Moments, RunningStats, functional

from .. import recalibration
from .layers import Layer, flatten


def recalibrate(
    model: Layer,
    batches: Iterable[object],
    layerwise: bool = False,
    *,
    max_batches: int | None = None,
    progress: bool = False,
) -> Layer:
    """Replace every BatchNorm layer's statistics by the exact ones over ``batches``.

    ``batches`` holds arrays or ``(input, ...)`` tuples; with ``layerwise=True`` it is read
    once per layer, so it must be re-iterable (a list, not a generator). One pass pools every
    layer's input while the layers upstream normalize with batch statistics (as in
    training); ``layerwise=True`` pools each layer's input with the layers before it already
    calibrated and in evaluation mode, and pass k stops at the k-th layer. ``max_batches``
    limits each pass; ``progress`` shows a progress bar (tqdm). Every strategy is refilled
    (``stats.load_moments``): afterwards each layer's ``stats.mean`` and ``stats.var`` are
    the pooled mean and unbiased variance of its input. Layers with ``stats="batch"`` keep
    none and are skipped. Returns ``model``.

    A batch with NaN or Inf at a layer's input follows that layer's ``stats.nan_policy``:
    ``"skip"`` leaves it out of the pools (in one pass out of every layer's pool, layer by
    layer out of the pool of the layer whose input it spoils), counts it in
    ``stats.num_batches_skipped`` and reports it in a ``RuntimeWarning``; ``"raise"`` (the
    estimators' default) raises a ``ValueError`` naming the batch and the layer. Modes are
    restored afterwards, and on failure every layer's statistics are what they were before
    the call.
    """
    recalibration.recalibrate(
        _Model(model),
        batches,
        layerwise=layerwise,
        max_batches=max_batches,
        progress=progress,
    )
    return model


class _Model(recalibration.Network[BatchNorm]):
    """A NumPy model's leaf layers as the recalibration algorithm sees them; layers are
    named by their position among the leaves (as a torch ``Sequential`` names them)."""

    data_name = "batches"

    def __init__(self, model: Layer) -> None:
        self.leaves = flatten(model)
        self.modes = [layer.training for layer in self.leaves]
        self.positions: dict[BatchNorm, int] = {}
        for position, layer in enumerate(self.leaves):
            if isinstance(layer, BatchNorm) and layer.stats is not None:
                self.positions.setdefault(layer, position)
        self.last = max(
            (i for i, layer in enumerate(self.leaves) if layer in self.positions), default=-1
        )
        self.layerwise = False

    @property
    def layers(self) -> Sequence[BatchNorm]:
        return list(self.positions)

    def name(self, layer: BatchNorm) -> str:
        return str(self.positions[layer])

    def nan_policy(self, layer: BatchNorm) -> str:
        return _stats(layer).nan_policy

    def sample_axes(self, layer: BatchNorm, x: Any) -> tuple[int, ...]:
        return functional.reduced_axes(x.ndim, layer.axis)

    def statistics(self) -> object:
        return [_stats(layer).state_dict() for layer in self.positions]

    def restore(self, saved: object) -> None:
        assert isinstance(saved, list)  # what statistics() returned
        for layer, state in zip(self.positions, saved, strict=True):
            _stats(layer).load_state_dict(state)

    def begin(self, layerwise: bool) -> None:
        self.layerwise = layerwise
        for layer in self.leaves:
            layer.train(False)

    def end(self) -> None:
        for layer, mode in zip(self.leaves, self.modes, strict=True):
            layer.train(mode)

    def forward(self, inputs: Any, observe: recalibration.Observe[BatchNorm]) -> None:
        """The leaves in order up to the last calibrated layer; in one pass BatchNorm layers
        normalize with batch statistics (updating nothing), layer by layer with their
        population statistics (evaluation mode)."""
        h = inputs
        for index, layer in enumerate(self.leaves[: self.last + 1]):
            if isinstance(layer, BatchNorm) and layer in self.positions:
                observe(layer, h)
            if index == self.last:
                return
            if isinstance(layer, BatchNorm) and not self.layerwise:
                h = functional.train_forward(
                    h, layer.gamma, layer.beta, axis=layer.axis, eps=layer.eps
                )[0]
            else:
                h = layer.forward(h)

    def load(self, layer: BatchNorm, moments: Moments, num_batches_skipped: int) -> None:
        stats = _stats(layer)
        stats.load_moments(moments, num_batches_skipped=num_batches_skipped)


def _stats(layer: BatchNorm) -> RunningStats:
    assert layer.stats is not None  # only layers with statistics are calibrated
    return layer.stats


__all__ = ["recalibrate"]
