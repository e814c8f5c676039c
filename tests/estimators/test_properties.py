"""Property: any split of any finite float64 stream gives the exact statistics.

For every strategy and both namespaces (NumPy arrays, torch CPU tensors), a stream (an
offset up to +-1e12 plus values of mixed magnitudes, spread 1e-3 to 1e6) cut into batches
at random is fed three ways: ``update`` with the raw batches,
``update_moments(Moments.from_array(batch))`` and, for the strategies that merge, two
estimators fed the two halves of the batch list and merged. Each must agree with the
strategy's own definition evaluated in exact rational arithmetic (``fractions.Fraction``
over the float values; :func:`tests.helpers.exact_reference`): the pooled mean and
unbiased variance for Welford and ExactFullPass, the equal-weight average of batch means
and unbiased batch variances for CumulativeAverage, the EMA recurrence (bias-corrected or
from PyTorch's 0/1) for the EMA.

"Agree" is relative, in a form that stays meaningful for a mean near zero and a variance
near zero:

* mean: ``|mean - exact| <= RTOL * (|exact mean| + exact std)``, the error against the
  scale of the data;
* var: ``|var - exact| <= RTOL * (exact var + (EPS * |exact mean|)**2)``: relative to the
  variance, except that a variance below the square of one unit in the last place of the
  mean (which float64 data at that offset cannot resolve from 0) must be 0 within the same
  margin;
* both up to an absolute ``TINY`` (2.2e-308, the smallest normal float64): smaller results
  are subnormal, or round to 0, and carry fewer digits than 12.

Streams with values up to 1e200, whose squares overflow float64, give either the exact
statistics or a ``ValueError`` that names the parameter and says "overflow", and only when
an exact sum of squared deviations (of a batch, or of the union for the pooled strategies)
exceeds 1e307 (the largest float64 is 1.8e308; the margin covers rounding at the edge).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import normstats as ns

from ..helpers import STRATEGIES, exact_mean_m2, exact_reference, to_numpy

RTOL = Fraction(1e-12)
EPS = Fraction(2.0**-52)
TINY = Fraction(2.0**-1022)
"""The smallest normal float64: below it float64 holds a result to fewer than 12 digits."""
OFFSETS = (0.0, 1.0, -1e3, 1e8, -1e12, 1e12)
SPREADS = (1e-3, 1.0, 1e3, 1e6)
NAMESPACES = ("numpy", "torch")


@st.composite
def streams(draw, min_batch, magnitude=None):
    """``(data, cuts)``: a float64 stream of 1-2 features and where it is cut into batches."""
    sizes = draw(st.lists(st.integers(min_batch, 10), min_size=1, max_size=6))
    if sum(sizes) < 2:
        sizes.append(2)
    features = draw(st.integers(1, 2))
    if magnitude is None:  # an offset plus values of mixed magnitudes
        offset = draw(st.sampled_from(OFFSETS))
        spread = draw(st.sampled_from(SPREADS))
        elements = st.floats(-spread, spread).map(lambda v: offset + v)
    else:
        elements = st.floats(-magnitude, magnitude)
    data = draw(arrays(np.float64, (sum(sizes), features), elements=elements))
    return data, np.cumsum(sizes)[:-1]


def as_namespace(batches, namespace):
    if namespace == "numpy":
        return batches
    torch = pytest.importorskip("torch")
    return [torch.from_numpy(b) for b in batches]


def fed(strategy, batches, path):
    estimator = strategy()
    for batch in batches:
        if path == "update":
            estimator.update(batch)
        else:
            estimator.update_moments(ns.Moments.from_array(batch))
    return estimator


def ways(strategy, batches, split):
    """``(path, estimate function)``: the ways of feeding ``batches`` to ``strategy``."""

    def merged():
        mine, theirs = (
            fed(strategy, batches[:split], "update"),
            fed(strategy, batches[split:], "update"),
        )
        mine.merge(theirs)
        return mine

    yield "update", lambda: fed(strategy, batches, "update")
    yield "update_moments", lambda: fed(strategy, batches, "update_moments")
    if strategy.mergeable:
        yield "merge", merged


def assert_exact(estimator, mean, var, where):
    got_mean = to_numpy(estimator.mean).ravel()
    got_var = to_numpy(estimator.var).ravel()
    for j, (m, v, exact_m, exact_v) in enumerate(zip(got_mean, got_var, mean, var, strict=True)):
        std = Fraction(math.sqrt(exact_v))
        mean_error = abs(Fraction(float(m)) - exact_m)
        var_error = abs(Fraction(float(v)) - exact_v)
        assert mean_error <= RTOL * (abs(exact_m) + std) + TINY, (where, j, "mean", m, exact_m)
        floor = (EPS * abs(exact_m)) ** 2
        assert var_error <= RTOL * (exact_v + floor) + TINY, (where, j, "var", v, exact_v)


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("strategy", STRATEGIES, ids=[s.id for s in STRATEGIES])
@given(data=st.data())
def test_every_path_gives_the_exact_statistics(strategy, namespace, data):
    stream, cuts = data.draw(streams(strategy.min_batch))
    batches = np.split(stream, cuts)
    split = data.draw(st.integers(0, len(batches)))
    mean, var = exact_reference(strategy, batches)
    for path, feed in ways(strategy, as_namespace(batches, namespace), split):
        estimator = feed()
        assert estimator.count == len(stream)
        assert_exact(estimator, mean, var, f"{path} of {[len(b) for b in batches]}")


def largest_exact_m2(strategy, batches):
    """The largest exact sum of squared deviations the strategy's statistics involve."""
    groups = list(batches) + ([np.concatenate(batches)] if strategy.pooled else [])
    return max(max(exact_mean_m2(group)[1]) for group in groups)


@pytest.mark.parametrize("namespace", NAMESPACES)
@pytest.mark.parametrize("strategy", STRATEGIES, ids=[s.id for s in STRATEGIES])
@given(data=st.data())
def test_values_whose_squares_overflow_give_exact_statistics_or_a_clear_error(
    strategy, namespace, data
):
    stream, cuts = data.draw(streams(strategy.min_batch, magnitude=1e200))
    batches = np.split(stream, cuts)
    split = data.draw(st.integers(0, len(batches)))
    too_large = largest_exact_m2(strategy, batches) > 1e307
    for path, feed in ways(strategy, as_namespace(batches, namespace), split):
        try:
            estimator = feed()
        except ValueError as error:
            message = str(error)
            assert message.split(":")[0] in ("x", "moments", "other"), message
            assert "overflow" in message, message
            assert too_large, (path, message)
        else:
            mean, var = exact_reference(strategy, batches)
            assert_exact(estimator, mean, var, path)
