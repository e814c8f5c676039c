"""A fold of finite batches whose result overflows float64 is bad input like a NaN batch.

Under ``nan_policy="raise"`` it raises ``ValueError`` naming the parameter and leaves the
state as it was; under ``"skip"`` the batch is left out and counted. A merge of two
estimators has no skip: it raises and changes neither.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import normstats as ns

from ..helpers import (
    MERGEABLE,
    POOLED,
    STRATEGIES,
    assert_same_state,
    exact_reference,
    relative_error_to_exact,
    snapshot,
)
from .test_bad_input import names

FEATURES = 3
HUGE = 1.7e308
"""A mean whose difference from -HUGE overflows float64 (the largest float64 is 1.8e308)."""


def normal_batch(seed=0, rows=8):
    return np.random.default_rng(seed).normal(0.0, 1.0, size=(rows, FEATURES))


def ids(strategies):
    return [s.id for s in strategies]


def constant_moments(value, count=2):
    return ns.Moments(count, np.full(FEATURES, value), np.zeros(FEATURES))


def assert_unchanged_but_skipped(estimator, before, skipped):
    after = estimator.state_dict()
    counter = [key for key in after if key.endswith(".num_batches_skipped")]
    assert len(counter) == 1
    assert after.pop(counter[0]) == skipped
    rest = {key: value for key, value in before.items() if key != counter[0]}
    assert_same_state(after, rest)


# -- update ----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", POOLED, ids=ids(POOLED))
def test_pooled_update_whose_fold_overflows_raises(strategy):
    # The case: a normal batch, then one all equal to 1e300. Its moments are finite
    # but the spread between the two means squared is not: var used to be inf, no error.
    estimator = strategy()
    estimator.update(normal_batch())
    before = snapshot(estimator)
    with pytest.raises(ValueError, match=names("x")) as info:
        estimator.update(np.full((8, FEATURES), 1e300))
    assert "overflow" in str(info.value)
    assert "expected" in str(info.value)
    assert_same_state(estimator.state_dict(), before)
    estimator.update(normal_batch(seed=1))  # and it carries on
    assert estimator.num_batches == 2


@pytest.mark.parametrize("strategy", POOLED, ids=ids(POOLED))
def test_pooled_update_whose_fold_overflows_is_skipped(strategy):
    skipping = strategy(nan_policy="skip")
    skipping.update(normal_batch())
    before = snapshot(skipping)
    skipping.update(np.full((8, FEATURES), 1e300))
    assert_unchanged_but_skipped(skipping, before, skipped=1)
    skipping.update(normal_batch(seed=1))
    never_saw_it = strategy()
    never_saw_it.update(normal_batch())
    never_saw_it.update(normal_batch(seed=1))
    np.testing.assert_array_equal(skipping.var, never_saw_it.var)


@pytest.mark.parametrize(
    "strategy",
    [s for s in STRATEGIES if not s.pooled],
    ids=ids(s for s in STRATEGIES if not s.pooled),
)
def test_averages_of_batch_statistics_take_the_same_batches_exactly(strategy):
    # Averages of batch means and variances do not overflow on these batches: they must
    # give the exact statistics, not an error.
    batches = [normal_batch(), np.full((8, FEATURES), 1e300)]
    estimator = strategy()
    for batch in batches:
        estimator.update(batch)
    mean, var = exact_reference(strategy, batches)
    assert relative_error_to_exact(estimator.mean, mean) <= 1e-15
    assert max(
        abs(Fraction(float(v)) - e) for v, e in zip(np.ravel(estimator.var), var, strict=True)
    ) <= 1e-15 * max(abs(e) for e in var)


# -- update_moments ----------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_update_moments_whose_fold_overflows(estimator_factory, policy):
    # Means of -1.7e308 then 1.7e308: every strategy's fold takes their difference, which
    # overflows. Cumulative and EMA used to report a mean of inf without an error.
    estimator = estimator_factory(nan_policy=policy)
    estimator.update_moments(constant_moments(-HUGE))
    before = snapshot(estimator)
    if policy == "raise":
        with pytest.raises(ValueError, match=names("moments")) as info:
            estimator.update_moments(constant_moments(HUGE))
        assert "overflow" in str(info.value)
        assert_same_state(estimator.state_dict(), before)
    else:
        estimator.update_moments(constant_moments(HUGE))
        assert_unchanged_but_skipped(estimator, before, skipped=1)
    assert np.isfinite(estimator.mean).all()


# -- merge -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", MERGEABLE, ids=ids(MERGEABLE))
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_merge_that_overflows_raises_and_changes_neither(strategy, policy):
    # No skip for a merge: nothing would say that the other stream was left out.
    mine, theirs = strategy(nan_policy=policy), strategy(nan_policy=policy)
    mine.update_moments(constant_moments(-HUGE))
    theirs.update_moments(constant_moments(HUGE))
    if policy == "skip":  # a skipped batch: its count must not be added either
        theirs.update(np.full((4, FEATURES), np.nan))
    mine_before, theirs_before = snapshot(mine), snapshot(theirs)
    with pytest.raises(ValueError, match=names("other")) as info:
        mine.merge(theirs)
    assert "overflow" in str(info.value)
    assert_same_state(mine.state_dict(), mine_before)
    assert_same_state(theirs.state_dict(), theirs_before)


# -- load_moments and load_state_dict ------------------------------------------------------


class Amplified(ns.CumulativeAverage):
    """A user strategy whose state is the variance scaled by 1e300, so that its folds can
    overflow where the built-in strategies' cannot (load_moments of valid moments)."""

    name = "amplified"
    overflow_keys = None  # it changes the update rule: every array may overflow

    def step(self, state, batch):
        new = super().step(state, batch)
        return {**new, "var": new["var"] * 1e300}

    def estimate(self, state):
        return state["mean"], state["var"] / 1e300


def test_load_moments_whose_state_overflows_raises():
    estimator = Amplified()
    estimator.load_moments(ns.Moments.from_array(normal_batch()))
    before = snapshot(estimator)
    with pytest.raises(ValueError, match=names("moments")) as info:
        estimator.load_moments(ns.Moments(4, np.zeros(FEATURES), np.full(FEATURES, 3e10)))
    assert "overflow" in str(info.value)
    assert_same_state(estimator.state_dict(), before)


def test_user_strategy_update_whose_state_overflows_raises():
    estimator = Amplified()
    estimator.update(normal_batch())
    before = snapshot(estimator)
    with pytest.raises(ValueError, match=names("x")):
        estimator.update(normal_batch(seed=2) * 1e9)
    assert_same_state(estimator.state_dict(), before)


def test_debiased_ema_state_whose_estimate_overflows_cannot_load():
    # A finite state divided by the bias correction (0.01 after one batch of momentum 0.01)
    # gave an inf estimate after loading; no stream of batches produces such a state.
    source = ns.EMA(momentum=0.01, debias=True)
    source.update(normal_batch())
    state = {**source.state_dict(), "ema.mean": np.full(FEATURES, 1e307)}
    target = ns.EMA(momentum=0.01, debias=True)
    target.update(normal_batch(seed=3))
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"state_dict.*ema\.num_batches") as info:
        target.load_state_dict(state)
    assert "expected" in str(info.value)
    assert_same_state(target.state_dict(), before)
    # the same state is a valid one without bias correction
    plain = ns.EMA(momentum=0.01)
    plain.load_state_dict({**state, "ema.debias": False})
    assert np.all(plain.mean == 1e307)
