"""The exact full pass for PyTorch models: population statistics of every BatchNorm input.

With the trained weights frozen, each normstats BatchNorm layer's statistics are replaced by
the pooled mean and unbiased variance of its input over ``data`` (Ioffe & Szegedy's
"inference" statistics; fvcore's PreciseBN; after SWA or pruning, where running statistics
are stale):

- one pass (``layerwise=False``, as PreciseBN): every layer pools its input while the layers
  upstream of it normalize with batch statistics, as in training;
- layer by layer (``layerwise=True``): each layer pools the inputs it will see at inference,
  with every layer upstream already calibrated and in evaluation mode. Pass k stops the
  forward right after the k-th layer (in execution order) has seen its input, so L layers
  cost about (L + 1) / 2 forward passes.

One-pass statistics differ from layerwise ones by terms of order 1 / batch size, so the two
modes part only for small calibration batches. During the pass every other module is in
evaluation mode (dropout off). Afterwards, and when anything fails, every module's mode is
what it was, no hook remains, and on failure every layer's statistics are what they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from normstats.estimators._base import State

from . import distributed
from .batchnorm import BatchNorm


class _StopForwardError(Exception):
    """Raised by a hook to end a forward early (layerwise calibration)."""


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    layerwise: bool = False,
    max_batches: int | None = None,
    progress: bool = False,
    sync: bool = True,
) -> nn.Module:
    """Replace every normstats BatchNorm's statistics by the exact ones over ``data``.

    ``data`` yields input tensors or ``(input, ...)`` tuples (a ``DataLoader`` of
    ``(x, y)`` works); ``layerwise=True`` reads it once per layer, so it must be re-iterable
    (a one-shot iterator is refused). ``max_batches`` limits each pass; ``progress`` shows
    a progress bar (tqdm). Every strategy is reset and refilled: afterwards each layer's
    ``running_mean`` / ``running_var`` are the pooled mean and unbiased variance of its
    input. Layers with ``stats="batch"`` keep none and are left alone. Returns ``model``.

    When ``torch.distributed`` is initialized (and ``sync`` is True) each layer's pool is
    merged across the ranks of the world before it is written, so a dataset sharded over
    the ranks gives every rank the statistics of one process over the whole dataset; a
    rank with no data still takes part.
    """
    if layerwise and iter(data) is data:
        raise TypeError(
            "data: layer-by-layer recalibration reads the data once per layer; expected a "
            "re-iterable collection (a list, a DataLoader), got a one-shot iterator"
        )
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise ValueError(f"max_batches: expected a positive int or None, got {max_batches!r}")
    layers = [m for m in model.modules() if isinstance(m, BatchNorm) and m.strategy is not None]
    shared = sync and distributed.active()
    modes = [(module, module.training) for module in model.modules()]
    saved = [{k: v.detach().clone() for k, v in layer.state_dict().items()} for layer in layers]
    try:
        model.eval()
        with torch.no_grad():
            if layerwise:
                _layer_by_layer(model, layers, data, max_batches, progress, shared)
            else:
                _one_pass(model, layers, data, max_batches, progress, shared)
    except BaseException:
        for layer, state in zip(layers, saved, strict=True):
            layer.stop_calibration()
            layer.load_state_dict(state)
        raise
    finally:
        for module, mode in modes:
            module.training = mode
    return model


def _one_pass(
    model: nn.Module,
    layers: list[BatchNorm],
    data: Iterable[Any],
    max_batches: int | None,
    progress: bool,
    shared: bool,
) -> None:
    for layer in layers:
        layer.start_calibration()
    for inputs in _batches(data, max_batches, progress, "recalibrate"):
        model(inputs)
    pooled = [_merged(layer.stop_calibration(), layer, shared) for layer in layers]
    for layer, state in zip(layers, pooled, strict=True):
        layer.load_calibration(_reached(state, layer))


def _layer_by_layer(
    model: nn.Module,
    layers: list[BatchNorm],
    data: Iterable[Any],
    max_batches: int | None,
    progress: bool,
    shared: bool,
) -> None:
    """Calibrate the first uncalibrated layer the forward reaches, then the next, ..."""
    remaining = set(layers)
    target: list[BatchNorm] = []

    def enter(module: nn.Module, args: Any) -> None:
        if module in remaining and not target:
            assert isinstance(module, BatchNorm)
            target.append(module)
            module.start_calibration()

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if target and module is target[0]:
            raise _StopForwardError

    hooks = [h for layer in layers for h in _hooks(layer, enter, leave)]
    try:
        for step in range(len(layers)):
            target.clear()
            label = f"recalibrate layer {step + 1}/{len(layers)}"
            for inputs in _batches(data, max_batches, progress, label):
                with contextlib.suppress(_StopForwardError):
                    model(inputs)
            layer = _agreed_target(target, layers, shared)
            if layer is None:
                raise ValueError(
                    f"data: the forward never reached {len(remaining)} BatchNorm layer(s); "
                    "expected every layer to be used by the model"
                )
            pooled = layer.stop_calibration() if target else None
            layer.load_calibration(_reached(_merged(pooled, layer, shared), layer))
            remaining.discard(layer)
    finally:
        for hook in hooks:
            hook.remove()


def _merged(pooled: State | None, layer: BatchNorm, shared: bool) -> State | None:
    """A layer's pooled calibration state, merged with the other ranks' when ``shared``."""
    if not shared:
        return pooled
    return distributed.merge_pooled(pooled, layer.num_features, layer._device())


def _agreed_target(
    target: list[BatchNorm], layers: list[BatchNorm], shared: bool
) -> BatchNorm | None:
    """The layer this layerwise pass calibrated; ranks without data learn it from the others."""
    if not shared:
        return target[0] if target else None
    mine = layers.index(target[0]) if target else -1
    device = layers[0]._device()
    chosen = {
        int(i)
        for i in distributed.gather_rows(torch.tensor([mine], device=device))[:, 0].tolist()
        if i >= 0
    }
    if len(chosen) > 1:
        raise ValueError(
            f"model: the ranks reached different BatchNorm layers first ({sorted(chosen)}); "
            "expected the same model on every rank"
        )
    return layers[chosen.pop()] if chosen else None


def _hooks(layer: BatchNorm, enter: Any, leave: Any) -> list[Any]:
    return [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]


def _reached(state: State | None, layer: BatchNorm) -> State:
    if state is None:
        raise ValueError(
            f"data: no batch reached {layer.__class__.__name__}({layer.num_features}); "
            "expected at least one non-empty batch"
        )
    return state


def _batches(
    data: Iterable[Any], max_batches: int | None, progress: bool, label: str
) -> Iterator[Tensor]:
    """The input tensor of each batch (the first element of a tuple or list)."""
    items: Iterable[Any] = data
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(data, desc=label, total=max_batches, leave=False)
    for index, batch in enumerate(items):
        if max_batches is not None and index >= max_batches:
            break
        yield batch[0] if isinstance(batch, tuple | list) else batch


__all__ = ["recalibrate"]
