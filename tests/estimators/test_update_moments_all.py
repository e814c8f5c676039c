"""update_moments_all: one batch's moments into several estimators, checked once.

It must leave every estimator exactly as its own ``update_moments`` would, apply each
estimator's ``nan_policy``, and refuse a batch that any of them refuses before changing any.
"""

from __future__ import annotations

import numpy as np
import pytest

import normstats as ns
from normstats.estimators import update_moments_all

from ..helpers import STRATEGIES, assert_same_state, snapshot
from .test_bad_input import names, nan_batch_moments
from .test_overflow import assert_unchanged_but_skipped

FEATURES = 3


def stream(seed=0):
    """Moments of batches of uneven sizes around a large offset: their means carry a
    ``mean_residual``, which the folds must take as ``update_moments`` does."""
    rng = np.random.default_rng(seed)
    batches = [1e8 + rng.normal(0.0, 1.0, size=(rows, FEATURES)) for rows in (2, 7, 3, 16)]
    return [ns.Moments.from_array(batch) for batch in batches]


def every_strategy(**kwargs):
    return [strategy(**kwargs) for strategy in STRATEGIES]


def test_every_estimator_as_its_own_update_moments():
    together, alone = every_strategy(), every_strategy()
    for moments in stream():
        update_moments_all(together, moments)
        for estimator in alone:
            estimator.update_moments(moments)
    for mine, reference in zip(together, alone, strict=True):
        assert_same_state(mine.state_dict(), reference.state_dict())
        assert mine.num_batches == 4


def test_torch_estimators_as_their_own_update_moments(torch, torch_device):
    together, alone = every_strategy(), every_strategy()
    for moments in stream(seed=1):
        tensors = ns.Moments(
            moments.count,
            torch.as_tensor(moments.mean, device=torch_device),
            torch.as_tensor(moments.m2, device=torch_device),
            mean_residual=torch.as_tensor(moments.mean_residual, device=torch_device),
        )
        update_moments_all(together, tensors)
        for estimator in alone:
            estimator.update_moments(tensors)
    for mine, reference in zip(together, alone, strict=True):
        assert_same_state(mine.state_dict(), reference.state_dict())


def test_no_samples_change_nothing():
    estimators = every_strategy()
    update_moments_all(estimators, stream()[0])
    before = [snapshot(e) for e in estimators]
    update_moments_all(estimators, ns.Moments(0, np.zeros(FEATURES), np.zeros(FEATURES)))
    for estimator, state in zip(estimators, before, strict=True):
        assert_same_state(estimator.state_dict(), state)


def one_sample():
    return ns.Moments.from_array(np.ones((1, FEATURES)))


def other_features():
    return ns.Moments.from_array(np.ones((4, FEATURES + 1)))


@pytest.mark.parametrize(
    ("moments", "expected"),
    [
        # Welford takes one sample per feature; the cumulative average needs two.
        pytest.param(one_sample, "at least 2 samples", id="too-few-for-one"),
        # the fresh estimator would take any feature shape; the other has seen FEATURES
        pytest.param(other_features, "feature shape", id="shape-of-one"),
    ],
)
def test_a_batch_that_one_refuses_changes_none(moments, expected):
    fed, fresh = ns.Welford(), ns.CumulativeAverage()
    fed.update_moments(stream()[1])
    estimators = [fresh, fed] if expected == "feature shape" else [ns.Welford(), fed, fresh]
    before = [snapshot(e) for e in estimators]
    with pytest.raises(ValueError, match=names("moments")) as info:
        update_moments_all(estimators, moments())
    assert expected in str(info.value)
    for estimator, state in zip(estimators, before, strict=True):
        assert_same_state(estimator.state_dict(), state)


def test_non_finite_moments_raise_when_one_estimator_raises():
    skipping, raising = ns.Welford(nan_policy="skip"), ns.EMA()
    for estimator in (skipping, raising):
        estimator.update_moments(stream()[1])
    before = [snapshot(skipping), snapshot(raising)]
    with pytest.raises(ValueError, match=names("moments")) as info:
        update_moments_all([skipping, raising], nan_batch_moments())
    assert "NaN or Inf" in str(info.value)
    assert_same_state(skipping.state_dict(), before[0])  # not even counted as skipped
    assert_same_state(raising.state_dict(), before[1])


def test_non_finite_moments_are_skipped_by_each_when_all_skip():
    estimators = every_strategy(nan_policy="skip")
    update_moments_all(estimators, stream()[1])
    before = [snapshot(e) for e in estimators]
    update_moments_all(estimators, nan_batch_moments())
    for estimator, state in zip(estimators, before, strict=True):
        assert_unchanged_but_skipped(estimator, state, skipped=1)


def far_away():
    """Two samples of 1e300: finite moments whose difference from a mean near 0, squared,
    overflows Welford's M2; an average of batch means takes them (1e300 * 0.1 is finite)."""
    return ns.Moments(2, np.full(FEATURES, 1e300), np.zeros(FEATURES))


def test_a_fold_that_overflows_one_raises_before_any_changes():
    welford, ema = ns.Welford(), ns.EMA()
    for estimator in (welford, ema):
        estimator.update_moments(stream()[1])
    before = [snapshot(welford), snapshot(ema)]
    with pytest.raises(ValueError, match=names("moments")) as info:
        update_moments_all([ema, welford], far_away())
    assert "overflow" in str(info.value)
    assert_same_state(welford.state_dict(), before[0])
    assert_same_state(ema.state_dict(), before[1])  # listed first, yet not folded


def test_a_fold_that_overflows_one_that_skips_is_skipped_by_it_only():
    welford, ema, reference = ns.Welford(nan_policy="skip"), ns.EMA(), ns.EMA()
    for estimator in (welford, ema, reference):
        estimator.update_moments(stream()[1])
    before = snapshot(welford)
    update_moments_all([welford, ema], far_away())
    reference.update_moments(far_away())
    assert_unchanged_but_skipped(welford, before, skipped=1)
    assert_same_state(ema.state_dict(), reference.state_dict())
    assert ema.num_batches == 2


def test_what_is_not_an_estimator_or_moments_is_refused():
    welford = ns.Welford()
    moments = stream()[0]
    with pytest.raises(TypeError, match=names("estimators")) as info:
        update_moments_all([welford, "ema"], moments)  # type: ignore[list-item]
    assert "got str" in str(info.value)
    with pytest.raises(ValueError, match=names("estimators")):
        update_moments_all([welford, welford], moments)
    with pytest.raises(TypeError, match=names("moments")) as info:
        update_moments_all([welford], np.ones(FEATURES))  # type: ignore[arg-type]
    assert "got ndarray" in str(info.value)
    assert welford.num_batches == 0
