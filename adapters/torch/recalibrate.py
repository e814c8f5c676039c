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

A batch with NaN or Inf follows the layers' ``nan_policy``. With ``"skip"`` it is left out
of the pools, whole: in one pass, a batch in which any layer's input is not finite is left
out of every layer's pool (each layer holds the batch's moments back until the forward of
the batch is over), so the statistics are exactly those of the finite batches; layer by
layer, pass k leaves out the batches whose input to layer k is not finite. Each layer's
``num_batches_skipped`` then holds the number of batches left out of its pool, and one
``RuntimeWarning`` reports them. With ``"raise"`` (any layer that sees such a batch) the call
raises a ``ValueError`` naming the batch, and every layer is left as it was.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from normstats.estimators import State

from . import distributed
from .arguments import non_negative_real
from .batchnorm import BatchNorm, NonFiniteCalibrationError


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
    timeout: float | None = None,
) -> nn.Module:
    """Replace every normstats BatchNorm's statistics by the exact ones over ``data``.

    ``data`` yields input tensors or ``(input, ...)`` tuples (a ``DataLoader`` of
    ``(x, y)`` works); ``layerwise=True`` reads it once per layer, so it must be re-iterable
    (a one-shot iterator is refused). ``max_batches`` limits each pass; ``progress`` shows
    a progress bar (tqdm). Every strategy is reset and refilled: afterwards each layer's
    ``running_mean`` / ``running_var`` are the pooled mean and unbiased variance of its
    input. Layers with ``stats="batch"`` keep none and are left alone. Returns ``model``.

    A batch with NaN or Inf at a layer's input is left out of the pools and reported
    (``nan_policy="skip"``: one pass leaves it out of every layer's pool, layer by layer
    out of the pool of the layer whose input it spoils; ``num_batches_skipped`` holds the
    count and a ``RuntimeWarning`` says it) or raises a ``ValueError`` naming the batch
    (``"raise"``, model unchanged).

    When ``torch.distributed`` is initialized (and ``sync`` is True) each layer's pool is
    merged across the ranks of the layer's ``process_group`` (None: the world) before it is
    written, so a dataset sharded over the ranks gives every rank the statistics of one
    process over the whole dataset; a rank with no data still takes part. Before the
    merges the ranks agree that none of them failed: if one did (an exception in its
    forward, a NaN batch under ``nan_policy="raise"``), it raises its error and every
    other rank a :class:`~normstats.adapters.torch.distributed.RankFailedError` naming it,
    all with the model unchanged. ``timeout`` bounds, in seconds, how long a rank waits for
    the others at each of these collectives (their calibration passes included); None
    leaves it to the process group's own timeout. A rank that did not arrive in time makes
    the others raise ``TimeoutError``.
    """
    if layerwise and iter(data) is data:
        raise TypeError(
            "data: layer-by-layer recalibration reads the data once per layer; expected a "
            "re-iterable collection (a list, a DataLoader), got a one-shot iterator"
        )
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise ValueError(f"max_batches: expected a positive int or None, got {max_batches!r}")
    layers = [m for m in model.modules() if isinstance(m, BatchNorm) and m.strategy is not None]
    modes = [(module, module.training) for module in model.modules()]
    saved = [{k: v.detach().clone() for k, v in layer.state_dict().items()} for layer in layers]
    names = {layer: name or type(layer).__name__ for name, layer in model.named_modules()}
    peers = _Peers(layers, sync, _seconds(timeout), names)
    try:
        model.eval()
        with torch.no_grad():
            if layerwise:
                skipped = _layer_by_layer(model, layers, data, max_batches, progress, peers)
            else:
                skipped = _one_pass(model, layers, data, max_batches, progress, peers)
    except BaseException:
        _restore(layers, saved)
        raise
    finally:
        for module, mode in modes:
            module.training = mode
    _report(skipped, names, layerwise)
    return model


def _seconds(timeout: object) -> float | None:
    """``timeout`` as a positive number of seconds, or None."""
    if timeout is None:
        return None
    seconds = non_negative_real("timeout", timeout)  # a number, or a TypeError
    if seconds == 0:
        raise ValueError(f"timeout: expected a positive number of seconds or None, got {timeout!r}")
    return seconds


def _restore(layers: list[BatchNorm], saved: list[dict[str, Tensor]]) -> None:
    for layer, state in zip(layers, saved, strict=True):
        layer.stop_calibration()
        layer.load_state_dict(state)


def _report(skipped: dict[BatchNorm, int], names: dict[nn.Module, str], layerwise: bool) -> None:
    """One warning for the batches left out of the pools, if any."""
    left_out = {layer: count for layer, count in skipped.items() if count}
    if not left_out:
        return
    if layerwise:
        listed = ", ".join(
            f"{count} for layer {names[layer]!r}" for layer, count in left_out.items()
        )
        what = f"left out batches whose input to the layer held NaN or Inf: {listed}"
    else:
        count = max(left_out.values())
        what = f"left out {count} batch(es) with NaN or Inf at a layer's input from every pool"
    warnings.warn(
        f"recalibrate: {what} (nan_policy='skip'); the statistics are those of the other "
        f"batches, and num_batches_skipped holds the count",
        RuntimeWarning,
        stacklevel=3,
    )


class _Peers:
    """The other ranks a recalibration merges with: each layer's process group (None: the
    world) when ``sync`` and ``torch.distributed`` has more than one rank in it, else none.

    The ranks agree, before they merge, that none of them failed, over the group the layers
    share (the world when their groups differ), so that one rank's error stops every rank
    instead of leaving the others waiting in a merge.
    """

    def __init__(
        self,
        layers: list[BatchNorm],
        sync: bool,
        timeout: float | None,
        names: dict[nn.Module, str],
    ) -> None:
        self.sync, self.timeout, self.names = sync, timeout, names
        groups = {id(_group(layer)): _group(layer) for layer in layers}
        self.group = groups.popitem()[1] if len(groups) == 1 else distributed.resolved(None)
        self.device = layers[0]._device() if layers else torch.device("cpu")

    def agree(self, failure: Exception | None, value: int = -1) -> list[int]:
        """Every rank's ``value`` (only this rank's without peers), unless a rank failed:
        then the failing ranks raise their errors and the others name them."""
        if failure is not None:
            failure = self._described(failure)
        if not (self.sync and distributed.active(self.group)):
            if failure is not None:
                raise failure
            return [value]
        what = "recalibrate: agreeing that every rank calibrated"
        return distributed.agree(failure, value, self.group, self.device, self.timeout, what)

    def merged(
        self, pooled: State | None, skipped: int, layer: BatchNorm
    ) -> tuple[State | None, int]:
        """A layer's pooled calibration state and the number of batches left out of it,
        merged with those of the other ranks of its process group."""
        group = _group(layer)
        if not (self.sync and distributed.active(group)):
            return pooled, skipped
        return distributed.merge_pooled(
            pooled, layer.num_features, layer._device(), group, skipped, self.timeout
        )

    def _described(self, error: Exception) -> Exception:
        """The error a user sees (a layer's refusal of a NaN batch names the batch)."""
        if not isinstance(error, NonFiniteCalibrationError):
            return error
        return ValueError(
            f"data: expected finite values, got NaN or Inf in batch {error.batch} at the input "
            f"of layer {self.names.get(error.layer, '?')!r}, whose nan_policy is 'raise'; "
            f"remove the batch, or build the layer with nan_policy='skip' to leave such "
            f"batches out"
        )


def _group(layer: BatchNorm) -> Any:
    return distributed.resolved(layer.process_group)


def _one_pass(
    model: nn.Module,
    layers: list[BatchNorm],
    data: Iterable[Any],
    max_batches: int | None,
    progress: bool,
    peers: _Peers,
) -> dict[BatchNorm, int]:
    """Calibrate every layer in one pass; the number of batches left out, per layer."""
    for layer in layers:
        layer.start_calibration()
    skipped = 0
    failure = None
    try:
        for index, inputs in _batches(data, max_batches, progress, "recalibrate"):
            _forward(model, inputs, index)
            skipped += _end_batch(layers)
    except Exception as error:  # the other ranks learn it before any merge
        failure = error
    peers.agree(failure)
    pooled = [peers.merged(layer.stop_calibration(), skipped, layer) for layer in layers]
    for layer, (state, left_out) in zip(layers, pooled, strict=True):
        layer.load_calibration(_reached(state, left_out, layer), left_out)
    return {layer: left_out for layer, (_, left_out) in zip(layers, pooled, strict=True)}


def _forward(model: nn.Module, inputs: Tensor, index: int) -> None:
    """One calibration forward; the error of a layer that refuses the batch gets its index."""
    try:
        model(inputs)
    except NonFiniteCalibrationError as error:
        error.batch = index
        raise


def _end_batch(layers: list[BatchNorm]) -> int:
    """Pool the batch every layer held back if all of them saw finite inputs; 1 if not."""
    finite = all(layer.calibration_batch_finite for layer in layers)
    for layer in layers:
        layer.end_calibration_batch(keep=finite)
    return 0 if finite else 1


def _layer_by_layer(
    model: nn.Module,
    layers: list[BatchNorm],
    data: Iterable[Any],
    max_batches: int | None,
    progress: bool,
    peers: _Peers,
) -> dict[BatchNorm, int]:
    """Calibrate the first uncalibrated layer the forward reaches, then the next, ...;
    the number of batches each layer's pass left out."""
    remaining = set(layers)
    target: list[BatchNorm] = []
    skipped: dict[BatchNorm, int] = {}

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
            left_out = 0
            label = f"recalibrate layer {step + 1}/{len(layers)}"
            failure = None
            try:
                for index, inputs in _batches(data, max_batches, progress, label):
                    with contextlib.suppress(_StopForwardError):
                        _forward(model, inputs, index)
                    left_out += _end_batch(target)
            except Exception as error:  # the other ranks learn it before any merge
                failure = error
            mine = layers.index(target[0]) if target else -1
            layer = _agreed_target(peers.agree(failure, mine), layers)
            if layer is None:
                raise ValueError(
                    f"data: the forward never reached {len(remaining)} BatchNorm layer(s); "
                    "expected every layer to be used by the model"
                )
            pooled, left_out = peers.merged(
                layer.stop_calibration() if target else None, left_out, layer
            )
            layer.load_calibration(_reached(pooled, left_out, layer), left_out)
            skipped[layer] = left_out
            remaining.discard(layer)
    finally:
        for hook in hooks:
            hook.remove()
    return skipped


def _agreed_target(reached: list[int], layers: list[BatchNorm]) -> BatchNorm | None:
    """The layer a layerwise pass calibrated, from the index each rank's forward reached
    first (-1: a rank without data, which learns it from the others)."""
    chosen = {index for index in reached if index >= 0}
    if len(chosen) > 1:
        raise ValueError(
            f"model: the ranks reached different BatchNorm layers first ({sorted(chosen)}); "
            "expected the same model on every rank"
        )
    return layers[chosen.pop()] if chosen else None


def _hooks(layer: BatchNorm, enter: Any, leave: Any) -> list[Any]:
    return [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]


def _reached(state: State | None, skipped: int, layer: BatchNorm) -> State:
    if state is None:
        why = f" ({skipped} left out for NaN or Inf)" if skipped else ""
        raise ValueError(
            f"data: no finite batch reached {layer.__class__.__name__}({layer.num_features})"
            f"{why}; expected at least one non-empty batch without NaN or Inf"
        )
    return state


def _batches(
    data: Iterable[Any], max_batches: int | None, progress: bool, label: str
) -> Iterator[tuple[int, Tensor]]:
    """The index and input tensor of each batch (the first element of a tuple or list)."""
    items: Iterable[Any] = data
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(data, desc=label, total=max_batches, leave=False)
    for index, batch in enumerate(items):
        if max_batches is not None and index >= max_batches:
            break
        yield index, batch[0] if isinstance(batch, tuple | list) else batch


__all__ = ["recalibrate"]
