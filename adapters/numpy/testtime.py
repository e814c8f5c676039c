"""Test-time statistics for NumPy models: ``with at_test_time(model, "prior:16"): ...``.

The strategies and the stream's layer-by-layer definition are
:mod:`normstats.adapters.testtime`'s, shared with the torch adapter; this module applies them
to the :class:`normstats.BatchNorm` layers of a kit model and puts the model back as it was
on leaving the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from normstats import BatchNorm, Moments, functional

from ..testtime import LayerStatistics, TestTimeModel, TestTimeStrategy, parse_test_time
from .layers import Layer, Sequential
from .recalibrate import recalibrate


@contextlib.contextmanager
def at_test_time(
    model: Layer,
    strategy: str | TestTimeStrategy,
    batches: Iterable[object] | None = None,
    *,
    layerwise: bool = False,
) -> Iterator[TestTimeModel[BatchNorm]]:
    """Evaluate ``model`` with a test-time strategy inside the ``with`` block.

    ``strategy`` is ``"adapt"`` (:func:`~normstats.adapters.numpy.recalibrate` on the
    unlabeled target ``batches``, one pass or ``layerwise``), ``"batch"`` (each batch
    normalized with its own mean and biased variance, as in training, updating nothing),
    ``"prior:N"`` (each batch normalized with the source statistics weighted ``N`` and its
    own weighted by its number of samples, Schneider et al. 2020) or ``"stream:<strategy>"``
    (statistics that keep updating along the test batches, from the source statistics);
    docs/test-time.md defines each.

    Inside the block the model is in evaluation mode. On leaving it, also by an exception,
    every layer's mode is what it was, every strategy's state dict is what it was (``adapt``
    writes statistics that are rolled back) and nothing of the strategy remains on the
    layers. Layers with ``stats="batch"`` normalize with batch statistics whatever the
    strategy.
    """
    parsed = parse_test_time(strategy)
    if parsed.kind == "adapt" and batches is None:
        raise ValueError(
            "batches: 'adapt' recalibrates on unlabeled target data; expected batches, got None"
        )
    if parsed.kind != "adapt" and batches is not None:
        raise ValueError(f"batches: only 'adapt' reads data, got batches with {str(parsed)!r}")
    modules = _modules(model)
    layers = list(
        dict.fromkeys(m for m in modules if isinstance(m, BatchNorm) and m.stats is not None)
    )
    sources = [] if parsed.kind == "adapt" else [layer.population_statistics() for layer in layers]
    modes = [(module, module.training) for module in modules]
    saved = [_stats(layer).state_dict() for layer in layers] if parsed.kind == "adapt" else []
    adapted: TestTimeModel[BatchNorm] = TestTimeModel(parsed, layers)
    try:
        model.train(False)
        if parsed.kind == "adapt":
            assert batches is not None  # checked above
            recalibrate(model, batches, layerwise=layerwise)
        else:
            for layer, (mean, var) in zip(layers, sources, strict=True):
                _install(layer, adapted, mean, var)
        yield adapted
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        for layer, state in zip(layers, saved, strict=False):
            _stats(layer).load_state_dict(state)
        for module, mode in modes:
            module.training = mode


def _modules(model: Layer) -> list[Layer]:
    """``model``, its nested Sequentials and its leaves."""
    if isinstance(model, Sequential):
        return [model, *(m for layer in model for m in _modules(layer))]
    return [model]


def _stats(layer: BatchNorm) -> Any:
    assert layer.stats is not None  # only layers with statistics are adapted
    return layer.stats


def _install(layer: BatchNorm, adapted: TestTimeModel[BatchNorm], mean: Any, var: Any) -> None:
    """Give ``layer`` the strategy's forward (an instance attribute, removed on exit)."""
    strategy = adapted.strategy
    if strategy.kind != "batch":
        shape = (layer.num_features,)
        adapted.statistics[layer] = LayerStatistics(
            strategy,
            np.broadcast_to(np.asarray(mean, dtype=np.float64), shape).copy(),
            np.broadcast_to(np.asarray(var, dtype=np.float64), shape).copy(),
        )

    def forward(x: Any) -> Any:
        x = np.asarray(x) if not hasattr(x, "shape") else x
        sample_axes = functional.reduced_axes(x.ndim, layer.axis)  # raises below 2 dims
        if x.ndim > 5 or x.shape[layer.axis] != layer.num_features:
            raise ValueError(
                f"x: expected input of 2 to 5 dimensions with {layer.num_features} features "
                f"along axis {layer.axis}, got shape {tuple(x.shape)}"
            )
        if strategy.kind == "batch":
            return functional.train_forward(
                x, layer.gamma, layer.beta, axis=layer.axis, eps=layer.eps
            )[0]
        batch = Moments.from_array(x, axis=sample_axes)
        mean, var = adapted.statistics[layer](batch, x.shape[0])
        return functional.eval_forward(
            x, mean, var, layer.gamma, layer.beta, axis=layer.axis, eps=layer.eps
        )

    layer.forward = forward  # type: ignore[method-assign]


__all__ = ["TestTimeModel", "at_test_time"]
