"""Shared test helpers: the strategies under test, exact references and state comparison.

Every reference here is independent of normstats: exact rational arithmetic with
:class:`fractions.Fraction` over the float values of the data, or NumPy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

import normstats as ns


@dataclasses.dataclass(frozen=True)
class StrategyConfig:
    """One configuration of a strategy: calling it builds a fresh estimator."""

    id: str
    build: Callable[..., Any]
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    mergeable: bool = True
    pooled: bool = False
    """Welford and ExactFullPass: count-weighted, split invariant, accept one-sample batches."""
    reports_before_first: bool = False
    """EMA without debias reports mean 0 / var 1 before any batch; the others raise."""

    def __call__(self, **extra: Any) -> Any:
        return self.build(**{**self.kwargs, **extra})

    @property
    def min_batch(self) -> int:
        """Fewest samples per feature a batch may have."""
        return 1 if self.pooled else 2


STRATEGIES = (
    StrategyConfig("exact", ns.ExactFullPass, pooled=True),
    StrategyConfig("cumulative", ns.CumulativeAverage),
    StrategyConfig("ema", ns.ExponentialMovingAverage, mergeable=False, reports_before_first=True),
    StrategyConfig("ema-debias", ns.ExponentialMovingAverage, {"debias": True}, mergeable=False),
    StrategyConfig("welford", ns.Welford, pooled=True),
)
"""Every exported strategy, EMA both with PyTorch's initialization and debiased."""

POOLED = tuple(s for s in STRATEGIES if s.pooled)
MERGEABLE = tuple(s for s in STRATEGIES if s.mergeable)


def to_numpy(a: Any) -> np.ndarray[Any, Any]:
    """A NumPy copy of a NumPy array, a torch tensor (any device) or a number."""
    if hasattr(a, "detach"):
        return np.asarray(a.detach().cpu().numpy())
    return np.asarray(a)


def max_relative_error(actual: Any, reference: Any) -> float:
    """Largest ``|actual - reference| / |reference|`` over the elements (reference nonzero)."""
    actual_np = to_numpy(actual).astype(np.float64)
    reference_np = to_numpy(reference).astype(np.float64)
    assert actual_np.shape == reference_np.shape, (actual_np.shape, reference_np.shape)
    return float(np.max(np.abs(actual_np - reference_np) / np.abs(reference_np)))


def assert_same_value(key: str, a: Any, b: Any) -> None:
    """Exactly the same number or array: type, dtype, shape, device and every value."""
    assert type(a) is type(b), f"{key}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, f"{key}: {a.dtype} != {b.dtype}"
        assert np.array_equal(a, b), f"{key}: {a!r} != {b!r}"
    elif hasattr(a, "detach"):  # a torch tensor
        assert a.dtype == b.dtype, f"{key}: {a.dtype} != {b.dtype}"
        assert a.device == b.device, f"{key}: {a.device} != {b.device}"
        assert a.shape == b.shape, f"{key}: {a.shape} != {b.shape}"
        assert bool((a == b).all()), f"{key}: {a!r} != {b!r}"
    else:
        assert a == b, f"{key}: {a!r} != {b!r}"


def assert_same_state(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    """Two state dicts are identical: same keys, and every value exactly equal."""
    assert list(a) == list(b)
    for key in a:
        assert_same_value(key, a[key], b[key])


def snapshot(estimator: Any) -> dict[str, Any]:
    """A deep copy of an estimator's state dict, immune to later in-place changes."""
    state = estimator.state_dict()
    return {
        k: v.clone() if hasattr(v, "clone") else np.copy(v) if isinstance(v, np.ndarray) else v
        for k, v in state.items()
    }


# -- exact references --------------------------------------------------------------------


def exact_mean_m2(x: Any) -> tuple[list[Fraction], list[Fraction]]:
    """Exact mean and sum of squared deviations of every column of a 2-d float array."""
    columns = to_numpy(x).astype(np.float64).T  # float32 -> float64 is exact
    means, m2s = [], []
    for column in columns:
        values = [Fraction(float(v)) for v in column]
        mean = sum(values, Fraction(0)) / len(values)
        means.append(mean)
        m2s.append(sum(((v - mean) ** 2 for v in values), Fraction(0)))
    return means, m2s


def exact_pooled(batches: Sequence[Any]) -> tuple[list[Fraction], list[Fraction]]:
    """Exact mean and unbiased variance of the concatenated batches (2-d, rows are samples)."""
    union = np.concatenate([to_numpy(b).astype(np.float64) for b in batches])
    means, m2s = exact_mean_m2(union)
    return means, [m2 / (len(union) - 1) for m2 in m2s]


def exact_batch_stats(batches: Iterable[Any]) -> list[tuple[list[Fraction], list[Fraction]]]:
    """Exact mean and unbiased variance of every batch."""
    stats = []
    for batch in batches:
        means, m2s = exact_mean_m2(batch)
        stats.append((means, [m2 / (len(batch) - 1) for m2 in m2s]))
    return stats


def exact_cumulative(batches: Sequence[Any]) -> tuple[list[Fraction], list[Fraction]]:
    """Exact equal-weight average of the batch means and unbiased batch variances."""
    stats = exact_batch_stats(batches)
    k = len(stats)
    features = len(stats[0][0])
    means = [sum((s[0][j] for s in stats), Fraction(0)) / k for j in range(features)]
    variances = [sum((s[1][j] for s in stats), Fraction(0)) / k for j in range(features)]
    return means, variances


def exact_ema(
    batches: Sequence[Any], momentum: float, *, debias: bool = False
) -> tuple[list[Fraction], list[Fraction]]:
    """Exact EMA recurrence ``r <- (1 - m) r + m b``; init 0/1, or 0/0 with bias correction."""
    m = Fraction(momentum)
    stats = exact_batch_stats(batches)
    features = len(stats[0][0])
    mean = [Fraction(0)] * features
    var = [Fraction(0) if debias else Fraction(1)] * features
    for batch_mean, batch_var in stats:
        mean = [(1 - m) * r + m * b for r, b in zip(mean, batch_mean, strict=True)]
        var = [(1 - m) * r + m * b for r, b in zip(var, batch_var, strict=True)]
    if debias:
        correction = 1 - (1 - m) ** len(stats)
        mean = [r / correction for r in mean]
        var = [r / correction for r in var]
    return mean, var


def exact_reference(
    strategy: StrategyConfig, batches: Sequence[Any]
) -> tuple[list[Fraction], list[Fraction]]:
    """What ``strategy`` estimates from ``batches``, in exact arithmetic."""
    if strategy.pooled:
        return exact_pooled(batches)
    if strategy.id == "cumulative":
        return exact_cumulative(batches)
    momentum = strategy().momentum
    return exact_ema(batches, momentum, debias=strategy.kwargs.get("debias", False))


def relative_error_to_exact(actual: Any, exact: Sequence[Fraction]) -> float:
    """Largest relative error of float results against exact rationals (computed exactly)."""
    values = to_numpy(actual).astype(np.float64).ravel()
    assert len(values) == len(exact)
    errors = [abs(Fraction(float(v)) - e) / abs(e) for v, e in zip(values, exact, strict=True)]
    return float(max(errors))


def finite_difference(f, a, h=1e-6):
    """Central differences of the scalar ``f`` with respect to every element of ``a``."""
    grad = np.empty_like(a)
    for index in np.ndindex(a.shape):
        saved = a[index]
        a[index] = saved + h
        plus = f()
        a[index] = saved - h
        minus = f()
        a[index] = saved
        grad[index] = (plus - minus) / (2 * h)
    return grad
