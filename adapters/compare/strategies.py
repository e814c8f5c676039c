"""The strategies a comparison evaluates, by name, and how each is obtained.

``cumulative``, ``ema:<momentum>`` (``ema:<momentum>:debias`` with bias correction),
``welford`` and a user's strategy named by its import
path ``module:Class`` (a subclass of :class:`normstats.Strategy`) are tracked during
training, all from the same batches of the same network; ``exact`` (one pass) and
``exact-layerwise`` come from recalibration after training; ``batch`` normalizes test
batches with their own statistics. The test-time strategies ``adapt``, ``prior:N`` and
``stream:<strategy>`` start from the exact one-pass statistics and adapt them to the (maybe
shifted) test data, as docs/test-time.md defines them.
"""

from __future__ import annotations

import normstats as ns
from normstats.estimators import Strategy

from ..testtime import parse_test_time

DEFAULT = ("exact", "exact-layerwise", "cumulative", "ema:0.1", "ema:0.01", "welford", "batch")
"""What ``normstats compare`` evaluates unless ``--strategies`` says otherwise."""

CALIBRATED = ("exact", "exact-layerwise")
"""Filled by recalibration after training (one pass / layer by layer)."""

TEST_TIME_KINDS = ("adapt", "prior", "stream")
"""Test-time strategies, from the exact statistics (``batch`` has a name of its own above)."""


def is_test_time(name: str) -> bool:
    """Whether ``name`` is a test-time strategy: ``adapt``, ``prior:N``, ``stream:<strategy>``."""
    return name.partition(":")[0] in TEST_TIME_KINDS


class StrategyError(ValueError):
    """An unknown strategy name; the message names ``--strategies``."""


def parse(names: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Validate strategy names (a comma-separated string or a sequence), keeping their order."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    for name in items:
        if name in (*CALIBRATED, "batch", "cumulative", "welford"):
            continue
        if name.startswith("ema:"):
            _ema(name)
            continue
        if is_test_time(name):
            try:
                parse_test_time(name, "--strategies")
            except (TypeError, ValueError) as error:
                raise StrategyError(str(error)) from None
            continue
        if ":" in name:
            try:
                ns.make_stats(name)
            except (TypeError, ValueError) as error:
                # make_stats names its own parameter ("name: ..."); here it is the option's
                reason = str(error).removeprefix("name: ")
                raise StrategyError(f"--strategies: {name!r}: {reason}") from None
            continue
        raise StrategyError(
            f"--strategies: unknown strategy {name!r}; expected some of {', '.join(DEFAULT)} "
            f"(ema takes any momentum, as ema:0.05, and :debias for bias correction, as "
            f"ema:0.1:debias), a test-time strategy (adapt, prior:N, stream:<strategy>), or a "
            f"strategy class as module:Class"
        )
    if not items:
        raise StrategyError("--strategies: expected at least one strategy, got none")
    return tuple(dict.fromkeys(items))


def tracked(names: tuple[str, ...]) -> tuple[str, ...]:
    """The strategies kept during training."""
    return tuple(
        n for n in names if n in ("cumulative", "welford") or (":" in n and not is_test_time(n))
    )


def estimator(name: str) -> Strategy:
    """A fresh estimator for a tracked strategy (``module:Class`` built with no arguments)."""
    if name.startswith("ema:"):
        return _ema(name)
    return ns.make_stats(name)


def _ema(name: str) -> ns.EMA:
    """``ema:<momentum>`` or ``ema:<momentum>:debias`` (zero start, Adam-style correction)."""
    momentum, _, flag = name[4:].partition(":")
    if flag not in ("", "debias"):
        raise StrategyError(
            f"--strategies: {name!r}: expected ema:<momentum> or ema:<momentum>:debias, "
            f"got {flag!r} after the momentum"
        )
    try:
        return ns.EMA(momentum=float(momentum), debias=flag == "debias")
    except ValueError as error:
        raise StrategyError(f"--strategies: {name!r}: {error}") from None
