"""The exact full pass, one algorithm for every adapter: population statistics of the input
of every BatchNorm layer, measured with the trained weights frozen.

After training, a BatchNorm layer's running statistics are only an estimate of what it will
see at inference (Ioffe & Szegedy's "inference" statistics; fvcore's PreciseBN; after SWA or
pruning they are stale). Recalibration replaces them by the pooled mean and unbiased
variance of the layer's input over the calibration data, in one of two orders:

- one pass (``layerwise=False``, as PreciseBN): every layer pools its input while the
  layers upstream of it normalize with *batch* statistics, as in training;
- layer by layer (``layerwise=True``): pass k pools the input of the k-th layer the forward
  reaches, with every layer before it already calibrated and in evaluation mode, so each
  layer's statistics are those of exactly the inputs it sees at inference. Pass k stops the
  forward as soon as that layer has seen its input (early exit), so L layers cost about
  (L + 1) / 2 forward passes, not L; the data is read once per layer.

The two orders differ by terms of order 1 / batch size (batch statistics fluctuate around
the population ones), so they part only for small calibration batches. Batches are weighted
by their size: a layer's pool is the :class:`~normstats.ExactFullPass` of every sample of its
input, as if the batches were one.

A batch with NaN or Inf at a layer's input follows that layer's ``nan_policy``:

- ``"skip"``: the batch is left out of the pools, whole. In one pass, a batch in which any
  layer's input is not finite is left out of every layer's pool (each layer's part of the
  batch is held back until the batch's forward is over), so the statistics are exactly
  those of the finite batches; layer by layer, pass k leaves out the batches whose input to
  its layer is not finite. Each layer's ``num_batches_skipped`` then holds the number of
  batches left out of its pool, and one ``RuntimeWarning`` reports them.
- ``"raise"``: a ``ValueError`` naming the batch and the layer, and every layer is left as
  it was.

Afterwards, and when anything fails, every layer's mode is what it was, and on failure every
layer's statistics are what they were before the call (rollback).

An adapter supplies only what depends on its models (:class:`Network`): which layers keep
statistics, how to observe a layer's input and run a forward that can stop early, how to read
and write a layer's statistics, and, for processes that calibrate together, how to merge
their pools. This module imports no framework.
"""

from __future__ import annotations

import abc
import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from normstats import ExactFullPass, Moments
from normstats.estimators import StackedMoments, update_stacked_all

Layer = TypeVar("Layer")

Observe = Callable[[Layer, Any], Moments | None]
"""Called with a calibrated layer and its input array, before the layer runs. It pools the
input and returns its moments (count, mean and M2 over the sample axes, float64, in the
input's namespace; None when the input brought none: no samples, or NaN or Inf that its
layer skips), so that the layer can normalize with them instead of reducing the batch again.
It raises :class:`StopForward` when nothing downstream of the layer is needed."""


class StopForward(Exception):  # noqa: N818 - a signal, not an error
    """Ends a forward early (a layer-by-layer pass, at the input of its layer).

    :func:`recalibrate` catches it, so an adapter's forward only has to let it through.
    """


class Network(abc.ABC, Generic[Layer]):
    """A model as :func:`recalibrate` sees it; each adapter subclasses it.

    ``layers`` are the BatchNorm layers to calibrate (those that keep statistics), each
    usable as a dict key; ``data_name`` is the name under which the user passed the data,
    which errors name.
    """

    data_name = "data"

    @property
    @abc.abstractmethod
    def layers(self) -> Sequence[Layer]:
        """The layers to calibrate, in a fixed order (errors and distributed peers use it)."""

    @abc.abstractmethod
    def name(self, layer: Layer) -> str:
        """How errors and warnings call ``layer``."""

    @abc.abstractmethod
    def nan_policy(self, layer: Layer) -> str:
        """``"skip"`` or ``"raise"``: what a non-finite input of ``layer`` does."""

    @abc.abstractmethod
    def sample_axes(self, layer: Layer, x: Any) -> tuple[int, ...]:
        """The axes of ``x``, an input of ``layer``, that hold samples (all but the features)."""

    @abc.abstractmethod
    def statistics(self) -> object:
        """A copy of every layer's statistics, for :meth:`restore`."""

    @abc.abstractmethod
    def restore(self, saved: object) -> None:
        """Put back the statistics that :meth:`statistics` copied."""

    @abc.abstractmethod
    def begin(self, layerwise: bool) -> None:
        """Set the modes of the pass: every module in evaluation mode, and in one pass the
        calibrated layers normalizing with batch statistics (and updating nothing)."""

    @abc.abstractmethod
    def end(self) -> None:
        """Put every module's mode back as it was before :meth:`begin` (also on failure)."""

    @abc.abstractmethod
    def forward(self, inputs: Any, observe: Observe[Layer]) -> None:
        """Run the model on one batch's ``inputs``, calling ``observe`` with each calibrated
        layer and its input before the layer runs, and letting :class:`StopForward` through
        (it may also stop where no calibrated layer is left downstream)."""

    @abc.abstractmethod
    def load(self, layer: Layer, moments: Moments, num_batches_skipped: int) -> None:
        """Make ``moments`` the layer's statistics (its strategy's mean and unbiased
        variance) and ``num_batches_skipped`` the number of batches left out of them."""

    def agree(self, failure: Exception | None, value: int = -1) -> list[int]:
        """Every process's ``value`` once they all finished a pass, unless one failed: then
        each raises (the failing ones their own error). A single process has only its own."""
        if failure is not None:
            raise failure
        return [value]

    def merged(self, layer: Layer, pool: ExactFullPass, skipped: int) -> tuple[ExactFullPass, int]:
        """``layer``'s pool and the number of batches left out of it, merged with those of
        the other processes that calibrate it (a single process: as they are)."""
        return pool, skipped


def recalibrate(
    network: Network[Layer],
    data: Iterable[Any],
    *,
    layerwise: bool = False,
    max_batches: int | None = None,
    progress: bool = False,
) -> None:
    """Replace every layer's statistics by the exact ones of its input over ``data``.

    ``data`` yields input arrays or ``(input, ...)`` tuples; with ``layerwise=True`` it is
    read once per layer, so it must be re-iterable (a one-shot iterator is refused before
    anything changes). ``max_batches`` limits each pass; ``progress`` shows a progress bar
    (tqdm). See the module's docstring for the two orders, the NaN policy and rollback.
    """
    if layerwise and iter(data) is data:
        raise TypeError(
            f"{network.data_name}: layer-by-layer recalibration reads the data once per layer; "
            "expected a re-iterable collection (a list, a tuple, a DataLoader), got a one-shot "
            "iterator"
        )
    limit = _batch_limit(max_batches)
    bar = _progress_bar() if progress else None
    saved = network.statistics()
    try:
        network.begin(layerwise)
        try:
            calibrate = _layer_by_layer if layerwise else _one_pass
            skipped = calibrate(network, _Batches(data, limit, bar))
        finally:
            network.end()
    except BaseException:
        network.restore(saved)
        raise
    _report(network, skipped, layerwise)


def _batch_limit(max_batches: object) -> int | None:
    """``max_batches`` as a positive int, or None."""
    if max_batches is None:
        return None
    if isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral):
        raise TypeError(f"max_batches: expected a positive int or None, got {max_batches!r}")
    if max_batches < 1:
        raise ValueError(f"max_batches: expected a positive int or None, got {max_batches!r}")
    return int(max_batches)


def _progress_bar() -> Callable[..., Iterable[Any]]:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(
            "progress: recalibrate(progress=True) shows a tqdm progress bar; install tqdm "
            "(pip install tqdm)"
        ) from None
    bar: Callable[..., Iterable[Any]] = tqdm
    return bar


class _Batches:
    """The index and input of each calibration batch (the first element of a tuple or list),
    at most ``limit`` of them, through a progress bar when one is given."""

    def __init__(
        self, data: Iterable[Any], limit: int | None, bar: Callable[..., Iterable[Any]] | None
    ) -> None:
        self.data, self.limit, self.bar = data, limit, bar

    def read(self, label: str) -> Iterator[tuple[int, Any]]:
        items = self.data
        if self.bar is not None:
            items = self.bar(self.data, desc=label, total=self.limit, leave=False)
        for index, batch in enumerate(items):
            if self.limit is not None and index >= self.limit:
                break
            yield index, batch[0] if isinstance(batch, tuple | list) else batch


class _Batch(Generic[Layer]):
    """What one calibration batch brings to each layer's pool, held back until the batch's
    forward is over: then pooled, or left out of every pool if any input was not finite."""

    def __init__(self, network: Network[Layer], index: int) -> None:
        self.network, self.index = network, index
        self.parts: dict[Layer, list[Moments]] = {}
        self.finite = True

    def observe(self, layer: Layer, x: Any) -> Moments | None:
        """Hold ``x``'s moments back for ``layer``'s pool (a layer may run twice in a
        forward) and return them; None if ``x`` brings none."""
        axes = self.network.sample_axes(layer, x)
        if math.prod(x.shape[a] for a in axes) == 0:  # an empty batch brings nothing
            return None
        try:
            moments = Moments.from_array(x, axis=axes)
        except ValueError:  # NaN or Inf, or values so far apart that their M2 overflows
            moments = None
        if moments is not None:
            self.parts.setdefault(layer, []).append(moments)
            return moments
        if self.network.nan_policy(layer) == "raise":
            raise ValueError(
                f"{self.network.data_name}: expected finite values, got NaN or Inf in batch "
                f"{self.index} at the input of layer {self.network.name(layer)!r}, whose "
                "nan_policy is 'raise'; remove the batch, or build the layer with "
                "nan_policy='skip' to leave such batches out"
            )
        self.finite = False
        return None

    def pool_into(self, pools: dict[Layer, _Pool]) -> int:
        """Add the batch to ``pools`` if it was finite everywhere; 1 if it was not."""
        if not self.finite:
            return 1
        for layer, parts in self.parts.items():
            for moments in parts:
                pools[layer].add(moments)
        return 0


class _Pool:
    """A layer's pool: the :class:`~normstats.ExactFullPass` of every sample of its input.

    The batches' moments are held back and folded :data:`HELD` at a time (one vectorized
    Chan merge of all of them, with every mean's residual) rather than merged one by one:
    on small batches the merge costs as much as the reduction.
    """

    HELD = 256
    """Batches held back before they are folded."""

    def __init__(self) -> None:
        self.stats = ExactFullPass()
        self.held: list[Moments] = []

    def add(self, moments: Moments) -> None:
        self.held.append(moments)
        if len(self.held) == self.HELD:
            self.fold()

    def fold(self) -> ExactFullPass:
        """The pool with every batch held back folded in."""
        held, self.held = self.held, []
        if held:
            update_stacked_all((self.stats,), StackedMoments.from_moments(held))
        return self.stats


def _one_pass(network: Network[Layer], batches: _Batches) -> dict[Layer, int]:
    """Calibrate every layer in one pass; the number of batches left out, per layer."""
    layers = network.layers
    pools = {layer: _Pool() for layer in layers}
    skipped = 0
    failure = None

    try:
        for index, inputs in batches.read("recalibrate"):
            batch = _Batch(network, index)
            _forward(network, inputs, batch.observe)
            skipped += batch.pool_into(pools)
    except Exception as error:  # other processes learn it before any merge
        failure = error
    network.agree(failure)
    merged = {layer: network.merged(layer, pools[layer].fold(), skipped) for layer in layers}
    for layer, (pool, left_out) in merged.items():
        network.load(layer, _pooled_moments(network, layer, pool, left_out), left_out)
    return {layer: left_out for layer, (_, left_out) in merged.items()}


class _Pass(Generic[Layer]):
    """One pass of layer-by-layer calibration: its layer is the first uncalibrated one the
    forward reaches, and the forward stops as soon as that layer has seen its input."""

    def __init__(self, network: Network[Layer], remaining: set[Layer]) -> None:
        self.network, self.remaining = network, remaining
        self.layer: Layer | None = None
        self.pool = _Pool()
        self.left_out = 0

    def run(self, index: int, inputs: Any) -> None:
        batch: _Batch[Layer] = _Batch(self.network, index)

        def observe(layer: Layer, x: Any) -> Moments | None:
            if self.layer is None and layer in self.remaining:
                self.layer = layer
            if layer is not self.layer:
                return None
            batch.observe(layer, x)
            raise StopForward

        _forward(self.network, inputs, observe)
        if self.layer is not None:
            self.left_out += batch.pool_into({self.layer: self.pool})


def _forward(network: Network[Layer], inputs: Any, observe: Observe[Layer]) -> None:
    with contextlib.suppress(StopForward):
        network.forward(inputs, observe)


def _layer_by_layer(network: Network[Layer], batches: _Batches) -> dict[Layer, int]:
    """Calibrate the first uncalibrated layer the forward reaches, then the next, ...;
    the number of batches each layer's pass left out."""
    layers = list(network.layers)
    remaining = set(layers)
    skipped: dict[Layer, int] = {}
    for step in range(len(layers)):
        this = _Pass(network, remaining)
        failure = None
        try:
            for index, inputs in batches.read(f"recalibrate layer {step + 1}/{len(layers)}"):
                this.run(index, inputs)
        except Exception as error:  # other processes learn it before any merge
            failure = error
        mine = -1 if this.layer is None else layers.index(this.layer)
        layer = _agreed_layer(network.agree(failure, mine), layers)
        if layer is None:
            raise ValueError(
                f"{network.data_name}: the forward never reached {len(remaining)} BatchNorm "
                "layer(s); expected every layer to be used by the model"
            )
        pool, left_out = network.merged(layer, this.pool.fold(), this.left_out)
        network.load(layer, _pooled_moments(network, layer, pool, left_out), left_out)
        skipped[layer] = left_out
        remaining.discard(layer)
    return skipped


def _agreed_layer(reached: list[int], layers: list[Layer]) -> Layer | None:
    """The layer a layer-by-layer pass calibrated, from the index each process's forward
    reached first (-1: a process without data, which learns it from the others)."""
    chosen = {index for index in reached if index >= 0}
    if len(chosen) > 1:
        raise ValueError(
            f"model: the ranks reached different BatchNorm layers first ({sorted(chosen)}); "
            "expected the same model on every rank"
        )
    return layers[chosen.pop()] if chosen else None


def _pooled_moments(
    network: Network[Layer], layer: Layer, pool: ExactFullPass, skipped: int
) -> Moments:
    """The pool's moments, or the error that says why there are none to calibrate with."""
    if pool.count == 0:
        why = f" ({skipped} left out for NaN or Inf)" if skipped else ""
        raise ValueError(
            f"{network.data_name}: no finite batch reached layer {network.name(layer)!r}{why}; "
            "expected at least one non-empty batch without NaN or Inf"
        )
    if pool.count < 2:
        raise ValueError(
            f"{network.data_name}: layer {network.name(layer)!r} saw 1 value per feature in "
            "all; expected at least 2 (its unbiased variance needs them)"
        )
    return pool.moments


def _report(network: Network[Layer], skipped: dict[Layer, int], layerwise: bool) -> None:
    """One warning for the batches left out of the pools, if any."""
    left_out = {layer: count for layer, count in skipped.items() if count}
    if not left_out:
        return
    if layerwise:
        listed = ", ".join(
            f"{count} for layer {network.name(layer)!r}" for layer, count in left_out.items()
        )
        what = f"left out batches whose input to the layer held NaN or Inf: {listed}"
    else:
        count = max(left_out.values())
        what = f"left out {count} batch(es) with NaN or Inf at a layer's input from every pool"
    warnings.warn(
        f"recalibrate: {what} (nan_policy='skip'); the statistics are those of the other "
        f"batches, and num_batches_skipped holds the count",
        RuntimeWarning,
        stacklevel=4,  # the caller of the adapter's recalibrate
    )


__all__ = ["Network", "Observe", "StopForward", "recalibrate"]
