"""Test-time statistics for shifted data, one definition for every adapter.

A BatchNorm layer trained on one distribution (the *source*) normalizes test data with the
source's population statistics. When the test data are shifted (a new sensor, corrupted
inputs), those statistics are wrong, and re-estimating them on the test data recovers much
of the accuracy (Li et al. 2016, AdaBN; Nado et al. 2020; Schneider et al. 2020; Mirza et
al. 2022, DUA). The strategies, named as :func:`parse_test_time` reads them:

- ``adapt``: recalibrate (the exact full pass) on unlabeled target data, then evaluate;
- ``batch``: each test batch normalized with its own statistics (mean and biased variance);
- ``prior:N``: each test batch normalized with the source statistics weighted ``N`` and the
  batch's own weighted by its size ``n`` (:func:`normstats.functional.prior_statistics`);
- ``stream:<strategy>``: a running-statistics strategy (``ema:<momentum>``,
  ``ema:<momentum>:debias``, ``welford``, ``cumulative``, ``exact`` or a user's
  ``module:Class``) keeps updating along the test stream, from the source statistics.

Stream, layer by layer: at every layer, the statistics start as the source statistics, which
enter the strategy as its first batch (with the size of the first test batch, at least 2
values per feature); each test batch then first updates them and is normalized with the
result, so that a batch is never normalized with statistics that have not seen it (under a
shift the source statistics alone are wrong, and ``stream:ema:1`` is the batch's own
statistics, as ``batch``). Layers run in the order of the forward, so each layer's stream
sees the inputs it receives at test time, with the layers upstream already normalized by
their updated statistics. :meth:`LayerStatistics.reset` starts a layer's stream again.

This module imports no framework; the torch adapter and the NumPy kit apply it to their
layers, and the comparison reads strategy names with :func:`parse_test_time`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Generic, TypeVar

import normstats as ns
from normstats import Moments
from normstats.estimators import Strategy
from normstats.functional import prior_statistics

KINDS = ("adapt", "batch", "prior", "stream")
"""The kinds of test-time strategy."""

NAMES = ("adapt", "batch", "prior:N", "stream:<strategy>")
"""How the strategies are written, for help texts and error messages."""


@dataclasses.dataclass(frozen=True)
class TestTimeStrategy:
    """A parsed test-time strategy: its ``kind`` (one of :data:`KINDS`), the prior strength
    ``N`` of ``prior:N`` and the running-statistics strategy of ``stream:<strategy>``.

    ``str()`` gives back its canonical name, which :func:`parse_test_time` reads.
    """

    __test__: ClassVar[bool] = False  # a library class, not a pytest test class

    kind: str
    prior: float = 0.0
    stream: str = ""

    def __str__(self) -> str:
        if self.kind == "prior":
            return f"prior:{self.prior:g}"
        if self.kind == "stream":
            return f"stream:{self.stream}"
        return self.kind


def parse_test_time(text: object, parameter: str = "strategy") -> TestTimeStrategy:
    """Read a test-time strategy name: ``adapt``, ``batch``, ``prior:N`` (``N`` a finite
    non-negative number) or ``stream:<strategy>``; errors name ``parameter``.

    >>> parse_test_time("prior:16")
    TestTimeStrategy(kind='prior', prior=16.0, stream='')
    >>> str(parse_test_time("stream:ema:0.1"))
    'stream:ema:0.1'
    """
    if isinstance(text, TestTimeStrategy):
        return text
    if not isinstance(text, str):
        raise TypeError(
            f"{parameter}: expected a test-time strategy name ({', '.join(NAMES)}), got "
            f"{type(text).__name__} {text!r}"
        )
    kind, _, argument = text.strip().partition(":")
    if kind in ("adapt", "batch") and not argument:
        return TestTimeStrategy(kind)
    if kind == "prior":
        return TestTimeStrategy("prior", prior=_prior(argument, text, parameter))
    if kind == "stream":
        stream_estimator(argument, parameter)  # refuses what it cannot build
        return TestTimeStrategy("stream", stream=argument)
    raise ValueError(
        f"{parameter}: expected one of {', '.join(NAMES)} (for example prior:16 or "
        f"stream:ema:0.1), got {text!r}"
    )


def _prior(argument: str, text: str, parameter: str) -> float:
    try:
        prior = float(argument)
    except ValueError:
        prior = math.nan
    if not (math.isfinite(prior) and prior >= 0):
        raise ValueError(
            f"{parameter}: expected prior:N with N the prior strength, a finite non-negative "
            f"number (prior:0 is batch), got {text!r}"
        )
    return prior


def stream_estimator(name: str, parameter: str = "strategy") -> Strategy:
    """A fresh estimator for ``stream:<name>``: ``ema:<momentum>``, ``ema:<momentum>:debias``,
    or what :func:`normstats.make_stats` builds from a name (``welford``, ``cumulative``,
    ``exact``, ``module:Class``) with no arguments."""
    where = f"{parameter}: 'stream:{name}'"
    if name == "ema" or name.startswith("ema:"):
        _, _, setting = name.partition(":")
        momentum, _, flag = setting.partition(":")
        if not momentum or flag not in ("", "debias"):
            raise ValueError(f"{where}: expected stream:ema:<momentum>[:debias], got {name!r}")
        try:
            return ns.EMA(momentum=float(momentum), debias=flag == "debias")
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    if not name:
        raise ValueError(f"{where}: expected a strategy after 'stream:', as stream:welford")
    try:
        return ns.make_stats(name)
    except (TypeError, ValueError) as error:
        reason = str(error).removeprefix("name: ")
        raise type(error)(f"{where}: {reason}") from None


class LayerStatistics:
    """The statistics one layer normalizes a test batch with under ``prior:N`` or
    ``stream:<strategy>``, from the layer's source statistics (its population mean and
    unbiased variance, float64 arrays of the feature shape, in the namespace and on the
    device of the layer's inputs)."""

    def __init__(self, strategy: TestTimeStrategy, source_mean: Any, source_var: Any) -> None:
        if strategy.kind not in ("prior", "stream"):
            raise ValueError(f"strategy: expected prior:N or stream:<strategy>, got {strategy}")
        self.strategy = strategy
        self.source_mean, self.source_var = source_mean, source_var
        self.stream: Strategy | None = None
        """The stream's estimator; None until the next batch starts it from the source."""

    def __call__(self, batch: Moments, batch_size: int) -> tuple[Any, Any]:
        """``(mean, var)`` to normalize the batch whose moments (float64, over every axis but
        the feature axis) are ``batch`` and whose first axis has ``batch_size`` samples."""
        if self.strategy.kind == "prior":
            return prior_statistics(
                self.source_mean,
                self.source_var,
                batch.mean,
                batch.var(ddof=0),
                self.strategy.prior,
                batch_size,
            )
        if self.stream is None:
            self.stream = stream_estimator(self.strategy.stream)
            count = max(batch.count, 2)
            self.stream.load_moments(
                Moments(count, self.source_mean, self.source_var * (count - 1))
            )
        self.stream.update_moments(batch)
        return self.stream.mean, self.stream.var

    def reset(self) -> None:
        """Start the stream again from the source statistics (nothing to do for a prior)."""
        self.stream = None


Layer = TypeVar("Layer")


class TestTimeModel(Generic[Layer]):
    """What ``with at_test_time(...) as adapted`` gives: the parsed ``strategy``, the
    ``layers`` it applies to, and :meth:`reset` for the ``stream:*`` strategies."""

    __test__ = False  # a library class, not a pytest test class

    def __init__(self, strategy: TestTimeStrategy, layers: list[Layer]) -> None:
        self.strategy = strategy
        self.layers = layers
        self.statistics: dict[Layer, LayerStatistics] = {}

    def reset(self) -> None:
        """Start every layer's stream again from its source statistics."""
        for statistics in self.statistics.values():
            statistics.reset()


__all__ = [
    "KINDS",
    "NAMES",
    "LayerStatistics",
    "TestTimeModel",
    "TestTimeStrategy",
    "parse_test_time",
    "stream_estimator",
]
