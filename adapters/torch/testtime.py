"""Test-time statistics for PyTorch models: ``with at_test_time(model, "prior:16"): ...``.

The strategies and the stream's layer-by-layer definition are
:mod:`normstats.adapters.testtime`'s, shared with the NumPy kit. This module applies them to
every BatchNorm layer of a torch model — normstats' :class:`BatchNorm` and torch's own
``nn.BatchNorm*d`` and ``SyncBatchNorm`` alike, for ``batch``, ``prior:N`` and ``stream:*`` —
and puts the model back as it was on leaving the block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normstats import Moments
from normstats.functional import reduced_axes

from ..testtime import LayerStatistics, TestTimeModel, TestTimeStrategy, parse_test_time
from .batchnorm import BatchNorm
from .recalibrate import recalibrate
from .state import STATS_DTYPE


@contextlib.contextmanager
def at_test_time(
    model: nn.Module,
    strategy: str | TestTimeStrategy,
    data: Iterable[Any] | None = None,
    *,
    layerwise: bool = False,
) -> Iterator[TestTimeModel[_BatchNorm]]:
    """Evaluate ``model`` with a test-time strategy inside the ``with`` block.

    ``strategy`` is ``"adapt"`` (:func:`~normstats.adapters.torch.recalibrate` on the
    unlabeled target ``data``, one pass or ``layerwise``), ``"batch"`` (each batch
    normalized with its own mean and biased variance, as in training, updating nothing),
    ``"prior:N"`` (each batch normalized with the source statistics weighted ``N`` and its
    own weighted by its number of samples, Schneider et al. 2020) or ``"stream:<strategy>"``
    (statistics that keep updating along the test batches, from the source statistics:
    ``stream:ema:0.1``, ``stream:welford``, ...); docs/test-time.md defines each.

    Inside the block the model is in evaluation mode. On leaving it, also by an exception,
    every module's mode is what it was, every layer's state dict is what it was (``adapt``
    writes statistics that are rolled back) and nothing of the strategy remains on the
    layers. ``adapt`` needs normstats BatchNorm layers (``convert`` a torch model first);
    the other strategies work on torch's BatchNorm layers too. Layers that keep no running
    statistics (``stats="batch"``, ``track_running_stats=False``) normalize with batch
    statistics whatever the strategy. Under ``prior`` and ``stream`` the statistics are
    constants for autograd, as in evaluation.
    """
    parsed = parse_test_time(strategy)
    if parsed.kind == "adapt" and data is None:
        raise ValueError(
            "data: 'adapt' recalibrates on unlabeled target data; expected data, got None"
        )
    if parsed.kind != "adapt" and data is not None:
        raise ValueError(f"data: only 'adapt' reads data, got data with {str(parsed)!r}")
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and _keeps_statistics(m)]
    if parsed.kind == "adapt":
        foreign = [name for name, m in model.named_modules() if m in layers and not _ours(m)]
        if foreign:
            raise TypeError(
                f"model: 'adapt' recalibrates normstats BatchNorm layers; expected none of "
                f"torch's, got {', '.join(foreign)} (normstats.adapters.torch.convert first)"
            )
    for layer in layers:
        if isinstance(layer, BatchNorm) and parsed.kind != "adapt":
            layer.check_calibrated()  # its source statistics
    modes = [(module, module.training) for module in model.modules()]
    saved = [_snapshot(layer) for layer in layers] if parsed.kind == "adapt" else []
    adapted: TestTimeModel[_BatchNorm] = TestTimeModel(parsed, layers)
    try:
        model.eval()
        if parsed.kind == "adapt":
            assert data is not None  # checked above
            recalibrate(model, data, layerwise=layerwise)
        else:
            for layer in layers:
                _install(layer, adapted)
        yield adapted
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        for layer, state in zip(layers, saved, strict=False):
            layer.load_state_dict(state)
        for module, mode in modes:
            module.training = mode


def _ours(layer: nn.Module) -> bool:
    return isinstance(layer, BatchNorm)


def _keeps_statistics(layer: _BatchNorm) -> bool:
    return layer.running_mean is not None and layer.running_var is not None


def _snapshot(layer: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _source(layer: _BatchNorm) -> tuple[Tensor, Tensor]:
    """The layer's population mean and unbiased variance, float64."""
    if isinstance(layer, BatchNorm):
        return layer.population_statistics()
    assert layer.running_mean is not None  # _keeps_statistics
    assert layer.running_var is not None
    return layer.running_mean.to(STATS_DTYPE), layer.running_var.to(STATS_DTYPE)


def _install(layer: _BatchNorm, adapted: TestTimeModel[_BatchNorm]) -> None:
    """Give ``layer`` the strategy's forward (an instance attribute, removed on exit)."""
    strategy = adapted.strategy
    if strategy.kind != "batch":
        mean, var = _source(layer)
        adapted.statistics[layer] = LayerStatistics(strategy, mean.detach(), var.detach())

    def forward(x: Tensor) -> Tensor:
        if not 2 <= x.dim() <= 5 or x.shape[1] != layer.num_features:
            raise ValueError(
                f"x: expected input (N, {layer.num_features}, ...) of 2 to 5 dimensions, got "
                f"shape {tuple(x.shape)}"
            )
        if strategy.kind == "batch":
            return F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
        with torch.no_grad():
            batch = Moments.from_array(x.detach(), axis=reduced_axes(x.dim(), 1))
            mean, var = adapted.statistics[layer](batch, x.shape[0])
        return F.batch_norm(
            x, mean.to(x.dtype), var.to(x.dtype), layer.weight, layer.bias, False, 0.0, layer.eps
        )

    layer.forward = forward  # type: ignore[method-assign,assignment]  # removed on exit


__all__ = ["TestTimeModel", "at_test_time"]
