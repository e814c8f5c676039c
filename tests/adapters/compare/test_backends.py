"""The NumPy backend's training-time statistics: one FanOut per layer feeds every tracked
strategy the layer's batch moments, as each strategy's own estimator fed them would be."""

from __future__ import annotations

import numpy as np
import pytest

import normstats as ns
from normstats.adapters.compare import strategies
from normstats.adapters.compare.backends import FanOut

from ...helpers import assert_same_state, snapshot

TRACKED = ("cumulative", "ema:0.1", "ema:0.01:debias", "welford", "tests.user_strategies:LastK")


def batches(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(3.0, 2.0, size=(rows, 5)) for rows in (2, 2, 9, 4)]


def test_each_tracked_strategy_as_its_own_estimator_fed_the_layer():
    layer = ns.BatchNorm(5, stats="welford")
    fanout = FanOut(TRACKED)
    layer.stats = fanout
    alone = {name: strategies.estimator(name) for name in TRACKED}
    for x in batches():
        _, moments, _ = ns.functional.train_forward(x, layer.gamma, layer.beta)
        layer.forward(x)
        for estimator in alone.values():
            estimator.update_moments(moments)
    for name, estimator in alone.items():
        assert_same_state(fanout.estimators[name].state_dict(), estimator.state_dict())
        assert fanout.estimators[name].num_batches == 4


def test_a_non_finite_training_batch_is_refused_and_tracked_nowhere():
    layer = ns.BatchNorm(5, stats="welford")
    fanout = FanOut(TRACKED)
    layer.stats = fanout
    layer.forward(batches()[2])
    before = {name: snapshot(e) for name, e in fanout.estimators.items()}
    x = batches(seed=1)[2]
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.forward(x)
    for name, estimator in fanout.estimators.items():
        assert_same_state(estimator.state_dict(), before[name])
