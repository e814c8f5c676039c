"""Build a strategy from its name (``make_stats("ema", momentum=0.01)``), from a user's
strategy class or its import path (``make_stats("mypkg.stats:LastK", k=4)``), or from a
layer's ``stats`` argument."""

from __future__ import annotations

import importlib
from typing import Any

from ._cumulative import CumulativeAverage
from ._ema import ExponentialMovingAverage
from ._pooled import ExactFullPass, Welford
from ._protocol import RunningStats
from ._strategy import Strategy

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (ExactFullPass, CumulativeAverage, ExponentialMovingAverage, Welford)
}
"""The built-in strategies by name: ``"exact"``, ``"cumulative"``, ``"ema"``, ``"welford"``."""


def strategy_class(name: object) -> type[Strategy]:
    """The strategy class that ``name`` means: a built-in name, ``"module:Class"`` (the
    class is imported from ``module``), or a :class:`Strategy` subclass itself.

    >>> strategy_class("welford").__name__
    'Welford'
    >>> strategy_class("normstats:CumulativeAverage").name
    'cumulative'
    """
    if isinstance(name, type):
        if issubclass(name, Strategy) and name is not Strategy:
            return name
        raise TypeError(f"name: expected a subclass of normstats.Strategy, got class {name!r}")
    if not isinstance(name, str):
        raise TypeError(
            f"name: expected a strategy name, 'module:Class' or a Strategy subclass, got "
            f"{type(name).__name__} {name!r}"
        )
    if name in STRATEGIES:
        return STRATEGIES[name]
    if ":" not in name:
        raise ValueError(
            f"name: expected one of {sorted(STRATEGIES)} or 'module:Class' naming a "
            f"normstats.Strategy subclass, got {name!r}"
        )
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"name: cannot import module {module_name!r} of {name!r}: {error}"
        ) from error
    found = getattr(module, attribute, None)
    if found is None:
        raise ValueError(f"name: module {module_name!r} has no attribute {attribute!r}")
    if not (isinstance(found, type) and issubclass(found, Strategy)):
        raise TypeError(
            f"name: expected {name!r} to be a subclass of normstats.Strategy, got {found!r}"
        )
    return found


def resolve_stats(stats: object, **kwargs: Any) -> RunningStats | None:
    """What a layer's ``stats`` argument means: a strategy name, ``"module:Class"`` or a
    strategy class (built with ``kwargs``), an estimator instance (no ``kwargs``), or
    ``"batch"`` (None: batch statistics, no strategy).
    """
    if stats == "batch":
        if kwargs:
            raise TypeError(f"stats='batch' takes no strategy arguments, got {sorted(kwargs)}")
        return None
    if isinstance(stats, str | type):
        try:
            return make_stats(stats, **kwargs)
        except (TypeError, ValueError) as error:
            message = str(error)
            if message.startswith("name: "):
                message = message[len("name: ") :]
                if isinstance(stats, str) and stats not in STRATEGIES and ":" not in stats:
                    message = message.replace("expected one of", "expected 'batch', one of")
                raise type(error)(f"stats: {message}") from None
            raise
    if isinstance(stats, RunningStats):
        if kwargs:
            raise TypeError(
                f"stats: strategy arguments {sorted(kwargs)} apply to a strategy name, not to "
                f"an estimator instance"
            )
        return stats
    raise TypeError(
        f"stats: expected a strategy name, 'module:Class', a Strategy subclass or an "
        f"estimator, got {stats!r}"
    )


def make_stats(name: str | type[Strategy], **kwargs: Any) -> Strategy:
    """Build the strategy ``name`` means (see :func:`strategy_class`) with its keyword
    arguments.

    >>> import normstats as ns
    >>> ns.make_stats("ema", momentum=0.01)
    ExponentialMovingAverage(momentum=0.01, debias=False, nan_policy='raise')
    """
    cls = strategy_class(name)
    try:
        return cls(**kwargs)
    except TypeError as error:
        if "unexpected keyword" in str(error):
            label = name if isinstance(name, str) else cls.__name__
            raise TypeError(f"make_stats({label!r}): {error}") from None
        raise
