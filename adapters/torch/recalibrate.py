"""The exact full pass for PyTorch models: population statistics of every BatchNorm input.

The algorithm (one pass or layer by layer with early exit, the NaN policy, rollback) is
:mod:`normstats.adapters.recalibration`'s, shared with the NumPy adapter. This module says
how a torch model runs a calibration forward (a forward pre-hook on each layer hands its
input to the algorithm, which may stop the forward there), reads and writes a layer's
statistics, and merges the pools of the ranks of a ``torch.distributed`` group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from normstats import ExactFullPass, Moments

from .. import recalibration
from . import distributed
from .arguments import non_negative_real
from .batchnorm import BatchNorm


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
    ``(x, y)`` works). One pass (as fvcore's PreciseBN) pools every layer's input while the
    layers upstream normalize with batch statistics, as in training; ``layerwise=True``
    pools each layer's input with every layer before it (in execution order) already
    calibrated and in evaluation mode, and pass k stops the forward as soon as the k-th
    layer has seen its input, so L layers cost about (L + 1) / 2 forward passes. It reads
    ``data`` once per layer, so it must be re-iterable (a one-shot iterator is refused).
    ``max_batches`` limits each pass; ``progress`` shows a progress bar (tqdm). During the
    pass every other module is in evaluation mode (dropout off). Every strategy is reset
    and refilled: afterwards each layer's ``running_mean`` / ``running_var`` are the pooled
    mean and unbiased variance of its input. Layers with ``stats="batch"`` keep none and
    are left alone. Returns ``model``; afterwards, and when it fails, every module's mode is
    what it was and no hook remains, and on failure every layer's statistics are too.

    A batch with NaN or Inf at a layer's input follows that layer's ``nan_policy``:
    ``"skip"`` (the layer's default) leaves it out of the pools (in one pass out of every
    layer's pool, layer by layer out of the pool of the layer whose input it spoils), counts
    it in ``num_batches_skipped`` and reports it in a ``RuntimeWarning``; ``"raise"`` raises
    a ``ValueError`` naming the batch and the layer, with the model unchanged.

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
    network = _Model(model, sync=sync, timeout=_seconds(timeout))
    recalibration.recalibrate(
        network, data, layerwise=layerwise, max_batches=max_batches, progress=progress
    )
    return model


def _seconds(timeout: object) -> float | None:
    """``timeout`` as a positive number of seconds, or None."""
    if timeout is None:
        return None
    seconds = non_negative_real("timeout", timeout)  # a number, or a TypeError
    if seconds == 0:
        raise ValueError(f"timeout: expected a positive number of seconds or None, got {timeout!r}")
    return seconds


class _Model(recalibration.Network[BatchNorm]):
    """A torch model as the recalibration algorithm sees it: its normstats BatchNorm layers
    that keep statistics, in registration order, named as ``named_modules`` names them.

    The peers it merges with are each layer's process group (None: the world) when ``sync``
    and ``torch.distributed`` has more than one rank in it. The ranks agree, before they
    merge, that none of them failed, over the group the layers share (the world when their
    groups differ), so that one rank's error stops every rank instead of leaving the others
    waiting in a merge.
    """

    def __init__(self, model: nn.Module, sync: bool, timeout: float | None) -> None:
        self.model, self.sync, self.timeout = model, sync, timeout
        self._layers = [
            m for m in model.modules() if isinstance(m, BatchNorm) and m.strategy is not None
        ]
        self.names = {layer: name or type(layer).__name__ for name, layer in model.named_modules()}
        self.modes = [(module, module.training) for module in model.modules()]
        self.hooks: list[Any] = []
        self.observe: recalibration.Observe[BatchNorm] | None = None
        groups = {id(_group(layer)): _group(layer) for layer in self._layers}
        self.group = groups.popitem()[1] if len(groups) == 1 else distributed.resolved(None)
        self.device = self._layers[0]._device() if self._layers else torch.device("cpu")

    @property
    def layers(self) -> Sequence[BatchNorm]:
        return self._layers

    def name(self, layer: BatchNorm) -> str:
        return self.names.get(layer, "?")

    def nan_policy(self, layer: BatchNorm) -> str:
        return layer.nan_policy

    def sample_axes(self, layer: BatchNorm, x: Any) -> tuple[int, ...]:
        return tuple(d for d in range(x.dim()) if d != 1)

    def statistics(self) -> object:
        return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self._layers]

    def restore(self, saved: object) -> None:
        assert isinstance(saved, list)  # what statistics() returned
        for layer, state in zip(self._layers, saved, strict=True):
            layer.load_state_dict(state)

    def begin(self, layerwise: bool) -> None:
        self.model.eval()
        for layer in self._layers:
            if not layerwise:
                layer.start_calibration()
            self.hooks.append(layer.register_forward_pre_hook(self._enter, with_kwargs=True))

    def end(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for layer in self._layers:
            layer.stop_calibration()
        for module, mode in self.modes:
            module.training = mode

    def forward(self, inputs: Any, observe: recalibration.Observe[BatchNorm]) -> None:
        self.observe = observe
        with torch.no_grad():
            self.model(inputs)

    def _enter(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """The forward pre-hook: the layer's input to the algorithm (which may stop the
        forward here); in one pass the layer then normalizes with the moments it measured."""
        assert isinstance(module, BatchNorm)  # the hooks are on these layers only
        assert self.observe is not None  # set by forward
        x: Tensor = args[0] if args else kwargs["input"]
        moments = self.observe(module, x.detach())
        if module.calibrating:
            module.set_calibration_moments(moments)

    def load(self, layer: BatchNorm, moments: Moments, num_batches_skipped: int) -> None:
        layer.load_calibration(moments, num_batches_skipped)

    def agree(self, failure: Exception | None, value: int = -1) -> list[int]:
        if not (self.sync and distributed.active(self.group)):
            return super().agree(failure, value)
        what = "recalibrate: agreeing that every rank calibrated"
        return distributed.agree(failure, value, self.group, self.device, self.timeout, what)

    def merged(
        self, layer: BatchNorm, pool: ExactFullPass, skipped: int
    ) -> tuple[ExactFullPass, int]:
        group = _group(layer)
        if not (self.sync and distributed.active(group)):
            return pool, skipped
        return distributed.merge_pooled(
            pool, layer.num_features, layer._device(), group, skipped, self.timeout
        )


def _group(layer: BatchNorm) -> Any:
    return distributed.resolved(layer.process_group)


__all__ = ["recalibrate"]
