"""The torch BatchNorm's constructor arguments: checked, and turned into what the layer runs.

Every argument is validated when the layer is built, with an error that names it, so that a
wrong setting fails there and not at the first forward, or later in ``revert``. NumPy
scalars are accepted wherever Python numbers are.

``stats`` may be an estimator instance. It is a source of settings (``nan_policy``,
``momentum``, ``debias``, ...) and, if it has seen batches, of a starting state: the layer
runs a fresh estimator with the same settings, keeps its statistics in its own float64
buffers and never reads or writes the instance again.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from normstats import ExactFullPass, ExponentialMovingAverage, RunningStats
from normstats.estimators import Strategy, resolve_stats
from normstats.functional import renorm_limits
from normstats.validation import NAN_POLICIES, as_flag, check_unit_interval

DEFAULT_NAN_POLICY = "skip"
"""A layer built from a strategy name skips non-finite training batches (an instance brings
its own policy): one bad batch in a long run should not end it."""


def positive_int(name: str, value: object) -> int:
    """``value`` as a positive int (Python or NumPy integer)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def non_negative_real(name: str, value: object) -> float:
    """``value`` as a finite non-negative float (Python or NumPy number)."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise TypeError(
            f"{name}: expected a non-negative real number, got {type(value).__name__} {value!r}"
        )
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name}: expected a finite non-negative number, got {value!r}")
    return number


def flag(name: str, value: object) -> bool:
    """``value`` as a bool (Python or NumPy bool, or 0 / 1)."""
    return as_flag(name, value)


def checked_momentum(momentum: object) -> float | None:
    """None, or a real number in (0, 1]."""
    return None if momentum is None else check_unit_interval("momentum", momentum)


def checked_nan_policy(nan_policy: object) -> str | None:
    """None (the strategy's default), ``"skip"`` or ``"raise"``."""
    if nan_policy is None:
        return None
    if not isinstance(nan_policy, str):
        raise TypeError(
            f"nan_policy: expected 'skip', 'raise' or None, got {type(nan_policy).__name__} "
            f"{nan_policy!r}"
        )
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy: expected 'skip', 'raise' or None, got {nan_policy!r}")
    return nan_policy


def build_strategy(
    stats: str | type[Strategy] | RunningStats,
    momentum: float | None,
    nan_policy: str | None,
    kwargs: dict[str, Any],
) -> tuple[Strategy | None, str]:
    """The estimator a layer runs (None for ``"batch"``) and the layer's ``nan_policy``.

    For a strategy name (or class), ``momentum`` is the EMA's (PyTorch's ``momentum=None`` is the
    cumulative average, asked for by name) and ``nan_policy`` defaults to
    :data:`DEFAULT_NAN_POLICY`. For an instance, its own settings apply: a ``nan_policy``
    that contradicts its own is refused, and the returned estimator is a fresh copy with the
    same settings and no state (the instance is not touched).
    """
    momentum = checked_momentum(momentum)
    nan_policy = checked_nan_policy(nan_policy)
    if isinstance(stats, str) and stats == "ema":
        if momentum is None:
            raise ValueError(
                "momentum: None means a cumulative average in PyTorch; pass "
                "stats='cumulative' for it, or a momentum in (0, 1] for stats='ema'"
            )
        kwargs = {"momentum": momentum, **kwargs}
    if isinstance(stats, str | type) and stats != "batch":  # a strategy built here
        kwargs = {"nan_policy": nan_policy or DEFAULT_NAN_POLICY, **kwargs}
    strategy = resolve_stats(stats, **kwargs)
    if strategy is None:
        return None, nan_policy or DEFAULT_NAN_POLICY
    if not isinstance(strategy, Strategy):
        raise TypeError(
            f"stats: a torch layer runs a strategy's update rule on the device; expected a "
            f"normstats.Strategy (a built-in one or a subclass), got {type(strategy).__name__}"
        )
    if strategy is stats:
        if nan_policy is not None and nan_policy != strategy.nan_policy:
            raise ValueError(
                f"nan_policy: the estimator passed as stats has nan_policy="
                f"{strategy.nan_policy!r}, got nan_policy={nan_policy!r}; leave nan_policy "
                f"unset to use the estimator's, or build the estimator with the one you want"
            )
        strategy = copy.deepcopy(strategy)
        strategy.reset()
    return strategy, strategy.nan_policy


def layer_momentum(strategy: Strategy | None, momentum: float | None) -> float | None:
    """The layer's ``momentum``: an EMA's own, else the (checked) argument."""
    if isinstance(strategy, ExponentialMovingAverage):
        return strategy.momentum
    return momentum


def small_batch_mode(
    strategy: Strategy | None,
    renorm: bool,
    r_max: float,
    d_max: float,
    renorm_warmup: int,
    virtual_batch_size: int | None,
) -> tuple[bool, float, float, int, int | None]:
    """``(renorm, r_max, d_max, renorm_warmup, virtual_batch_size)``, checked.

    Batch Renormalization corrects each training batch towards the running estimate of
    ``strategy``: ``"batch"`` keeps none and ``"exact"`` has none during training (it is
    filled by ``recalibrate`` afterwards), so both are refused with it. It and Ghost
    BatchNorm (``virtual_batch_size``) are two different training normalizations: asking
    for both is refused. The clipping limits are checked whether ``renorm`` is on or not.
    """
    renorm = flag("renorm", renorm)
    renorm_limits(0, renorm_warmup, r_max, d_max)  # checks the three of them
    # (NumPy numbers or 0-d arrays, checked just above)
    r_max, d_max, warmup = float(r_max), float(d_max), int(renorm_warmup)
    virtual = (
        None
        if virtual_batch_size is None
        else positive_int("virtual_batch_size", virtual_batch_size)
    )
    if renorm and virtual is not None:
        raise ValueError(
            f"renorm, virtual_batch_size: Batch Renormalization normalizes the whole batch and "
            f"Ghost BatchNorm each virtual batch; expected one of them, got renorm=True and "
            f"virtual_batch_size={virtual}"
        )
    if renorm and (strategy is None or isinstance(strategy, ExactFullPass)):
        name = "batch" if strategy is None else strategy.name
        raise ValueError(
            f"renorm: Batch Renormalization corrects each training batch towards the running "
            f"estimate of the layer's strategy, and stats={name!r} has none during training; "
            f"expected a strategy that training feeds ('ema', 'cumulative', 'welford' or an "
            f"estimator), got stats={name!r}"
        )
    return renorm, r_max, d_max, warmup, virtual


__all__ = [
    "DEFAULT_NAN_POLICY",
    "build_strategy",
    "checked_momentum",
    "checked_nan_policy",
    "flag",
    "layer_momentum",
    "non_negative_real",
    "positive_int",
    "small_batch_mode",
]
