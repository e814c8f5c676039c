"""Every strategy against an independent reference.

Welford and ExactFullPass against NumPy over the concatenated stream; EMA and
CumulativeAverage against ``torch.nn.BatchNorm2d`` in training mode; every strategy against
exact rational arithmetic on data with a large offset.
"""

from __future__ import annotations

import numpy as np
import pytest

import normstats as ns

from ..helpers import (
    POOLED,
    STRATEGIES,
    exact_reference,
    relative_error_to_exact,
    to_numpy,
)

RTOL = 1e-12
TORCH_RTOL = 1e-10


def ids(strategies):
    return [s.id for s in strategies]


# -- pooled strategies against NumPy ---------------------------------------------------


@pytest.mark.parametrize("strategy", POOLED, ids=ids(POOLED))
@pytest.mark.parametrize(
    "sizes",
    [[97], [1, 96], [50, 47], [2, 2, 4, 8, 16, 32, 33], [1] * 97, [96, 1]],
    ids=["whole", "one-then-rest", "halves", "doubling", "singles", "rest-then-one"],
)
def test_pooled_matches_numpy_over_concatenation(strategy, sizes):
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(97, 5))
    estimator = strategy()
    for batch in np.split(x, np.cumsum(sizes)[:-1]):
        estimator.update(batch)
    assert estimator.count == 97
    assert estimator.num_batches == len(sizes)
    np.testing.assert_allclose(estimator.mean, np.mean(x, axis=0), rtol=RTOL, atol=0)
    np.testing.assert_allclose(estimator.var, np.var(x, axis=0, ddof=1), rtol=RTOL, atol=0)


@pytest.mark.parametrize("strategy", POOLED, ids=ids(POOLED))
def test_pooled_includes_spread_between_batch_means(strategy):
    # Two batches far apart: the pooled variance is dominated by the spread between them,
    # which an average of per-batch variances would miss.
    rng = np.random.default_rng(1)
    a, b = rng.normal(-10.0, 1.0, size=(40, 2)), rng.normal(10.0, 1.0, size=(60, 2))
    estimator = strategy()
    estimator.update(a)
    estimator.update(b)
    union = np.concatenate([a, b])
    np.testing.assert_allclose(estimator.var, union.var(axis=0, ddof=1), rtol=RTOL)
    assert np.all(estimator.var > 50)


@pytest.mark.parametrize("strategy", POOLED, ids=ids(POOLED))
def test_pooled_nchw_matches_numpy(strategy):
    rng = np.random.default_rng(2)
    xs = [rng.normal(1.0, 0.5, size=(n, 3, 4, 5)) for n in (2, 7, 1, 4)]
    estimator = strategy()
    for x in xs:
        estimator.update(x, axis=(0, 2, 3))
    union = np.concatenate(xs)
    assert estimator.count == 14 * 20
    np.testing.assert_allclose(estimator.mean, union.mean(axis=(0, 2, 3)), rtol=RTOL)
    np.testing.assert_allclose(estimator.var, union.var(axis=(0, 2, 3), ddof=1), rtol=RTOL)


# -- EMA and cumulative average against torch.nn.BatchNorm2d ------------------------------


BATCH_SIZES = [2, 5, 3, 8, 4, 6]


def nchw_batches(seed=3, channels=3):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(np.arange(channels)[None, :, None, None] - 1.0, 2.0, size=(n, channels, 4, 5))
        for n in BATCH_SIZES
    ]


@pytest.mark.parametrize(
    ("momentum", "build"),
    [
        (0.1, lambda: ns.ExponentialMovingAverage(momentum=0.1)),
        (0.01, lambda: ns.ExponentialMovingAverage(momentum=0.01)),
        (0.1, lambda: ns.EMA()),  # the default is PyTorch's
        (None, ns.CumulativeAverage),
    ],
    ids=["ema-0.1", "ema-0.01", "ema-default", "cumulative"],
)
def test_matches_torch_batchnorm2d(torch, momentum, build):
    channels = 3
    batch_norm = torch.nn.BatchNorm2d(channels, momentum=momentum, dtype=torch.float64)
    batch_norm.train()
    estimator = build()
    if momentum is not None:
        # before the first update: PyTorch's initialization, as scalars that broadcast
        running_mean = to_numpy(batch_norm.running_mean)
        running_var = to_numpy(batch_norm.running_var)
        np.testing.assert_array_equal(np.zeros(channels) + estimator.mean, running_mean)
        np.testing.assert_array_equal(np.zeros(channels) + estimator.var, running_var)
    with torch.no_grad():
        for i, x in enumerate(nchw_batches(channels=channels), start=1):
            batch_norm(torch.from_numpy(x))
            estimator.update(x, axis=(0, 2, 3))
            np.testing.assert_allclose(
                estimator.mean, to_numpy(batch_norm.running_mean), rtol=TORCH_RTOL, atol=0
            )
            np.testing.assert_allclose(
                estimator.var, to_numpy(batch_norm.running_var), rtol=TORCH_RTOL, atol=0
            )
            assert estimator.num_batches == int(batch_norm.num_batches_tracked) == i


@pytest.mark.parametrize("momentum", [0.1, 0.01, None])
def test_torch_input_matches_torch_batchnorm2d(torch, torch_device, momentum):
    batch_norm = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    batch_norm = batch_norm.to(torch_device).train()
    estimator = ns.CumulativeAverage() if momentum is None else ns.EMA(momentum=momentum)
    with torch.no_grad():
        for x in nchw_batches(seed=4):
            tensor = torch.from_numpy(x).to(torch_device)
            batch_norm(tensor)
            estimator.update(tensor, axis=(0, 2, 3))
    assert estimator.mean.device == batch_norm.running_mean.device
    torch.testing.assert_close(
        estimator.mean, batch_norm.running_mean, rtol=TORCH_RTOL, atol=1e-300
    )
    torch.testing.assert_close(estimator.var, batch_norm.running_var, rtol=TORCH_RTOL, atol=1e-300)


# -- EMA with bias correction, and the decay spelling ----------------------------------


def batch_stats(xs, axis=0):
    return [(x.mean(axis=axis), x.var(axis=axis, ddof=1)) for x in xs]


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.5, 1.0])
def test_debiased_ema_first_batch_is_that_batch(momentum):
    (x,) = nchw_batches(seed=5)[:1]
    estimator = ns.ExponentialMovingAverage(momentum=momentum, debias=True)
    estimator.update(x, axis=(0, 2, 3))
    np.testing.assert_allclose(estimator.mean, x.mean(axis=(0, 2, 3)), rtol=RTOL)
    np.testing.assert_allclose(estimator.var, x.var(axis=(0, 2, 3), ddof=1), rtol=RTOL)


@pytest.mark.parametrize("momentum", [0.1, 0.01, 0.3])
def test_debiased_ema_is_the_bias_corrected_recurrence(momentum):
    xs = nchw_batches(seed=6)
    estimator = ns.ExponentialMovingAverage(momentum=momentum, debias=True)
    mean, var = np.zeros(3), np.zeros(3)  # zero initialization, Adam-style
    for t, (x, (batch_mean, batch_var)) in enumerate(
        zip(xs, batch_stats(xs, axis=(0, 2, 3)), strict=True), start=1
    ):
        estimator.update(x, axis=(0, 2, 3))
        mean = (1 - momentum) * mean + momentum * batch_mean
        var = (1 - momentum) * var + momentum * batch_var
        correction = 1 - (1 - momentum) ** t
        np.testing.assert_allclose(estimator.mean, mean / correction, rtol=RTOL)
        np.testing.assert_allclose(estimator.var, var / correction, rtol=RTOL)


@pytest.mark.parametrize("momentum", [1e-10, 3e-16, 1e-17, 1e-300])
def test_debiased_ema_first_batch_is_that_batch_for_a_tiny_momentum(momentum):
    # 1 - (1 - m) loses digits as m shrinks: the first estimate used to be off by 8.3e-8
    # relative at m = 1e-10, by 10% at 3e-16, and inf from 1e-17 on (1 - m rounds to 1).
    x = np.random.default_rng(8).normal(5.0, 2.0, size=(6, 3))
    estimator = ns.ExponentialMovingAverage(momentum=momentum, debias=True)
    estimator.update(x)
    np.testing.assert_allclose(estimator.mean, x.mean(axis=0), rtol=RTOL)
    np.testing.assert_allclose(estimator.var, x.var(axis=0, ddof=1), rtol=RTOL)


def test_debiased_ema_correction_takes_a_tensor_batch_count(torch):
    # A torch layer keeps num_batches in a 0-d float64 buffer; the estimate is the same.
    estimator = ns.ExponentialMovingAverage(momentum=0.01, debias=True)
    for x in nchw_batches(seed=9):
        estimator.update(torch.from_numpy(x), axis=(0, 2, 3))
    state = estimator._state
    as_tensor = {
        **state,
        "num_batches": torch.tensor(float(state["num_batches"]), dtype=torch.float64),
    }
    for from_int, from_tensor in zip(
        estimator.estimate(state), estimator.estimate(as_tensor), strict=True
    ):
        torch.testing.assert_close(from_tensor, from_int, rtol=1e-15, atol=0)


def test_debiased_ema_before_first_update_raises():
    estimator = ns.ExponentialMovingAverage(debias=True)
    for name in ("mean", "var"):
        with pytest.raises(ValueError, match="batch"):
            getattr(estimator, name)


@pytest.mark.parametrize(("decay", "momentum"), [(0.99, 0.01), (0.9, 0.1), (0.0, 1.0)])
def test_from_decay(decay, momentum):
    estimator = ns.ExponentialMovingAverage.from_decay(decay)
    assert estimator.momentum == pytest.approx(momentum, rel=1e-12)
    assert isinstance(ns.EMA.from_decay(decay), ns.ExponentialMovingAverage)


def test_from_decay_follows_the_keras_recurrence():
    # Keras/Flax: moving = decay * moving + (1 - decay) * batch, moving mean 0 and variance 1.
    decay = 0.99
    xs = [np.random.default_rng(7 + i).normal(5.0, 2.0, size=(n, 4)) for i, n in enumerate([8, 3])]
    estimator = ns.ExponentialMovingAverage.from_decay(decay)
    mean, var = np.zeros(4), np.ones(4)
    for x, (batch_mean, batch_var) in zip(xs, batch_stats(xs), strict=True):
        estimator.update(x)
        mean = decay * mean + (1 - decay) * batch_mean
        var = decay * var + (1 - decay) * batch_var
    np.testing.assert_allclose(estimator.mean, mean, rtol=RTOL)
    np.testing.assert_allclose(estimator.var, var, rtol=RTOL)


def test_from_decay_passes_other_arguments():
    estimator = ns.ExponentialMovingAverage.from_decay(0.9, debias=True, nan_policy="skip")
    assert estimator.debias is True
    assert estimator.nan_policy == "skip"


# -- cumulative average ------------------------------------------------------------------


def test_cumulative_is_the_plain_average_of_batch_statistics():
    rng = np.random.default_rng(8)
    xs = [rng.normal(i, 1.0 + i, size=(n, 3)) for i, n in enumerate([2, 30, 5, 11])]
    estimator = ns.CumulativeAverage()
    for x in xs:
        estimator.update(x)
    means, variances = zip(*batch_stats(xs), strict=True)
    np.testing.assert_allclose(estimator.mean, np.mean(means, axis=0), rtol=RTOL)
    np.testing.assert_allclose(estimator.var, np.mean(variances, axis=0), rtol=RTOL)
    # equal weights, not count weights: differs from the pooled mean of these batches
    assert not np.allclose(estimator.mean, np.concatenate(xs).mean(axis=0))


# -- a large offset, every strategy, exact references --------------------------------------


OFFSET_SIZES = [40, 7, 100, 23, 60]


def offset_batches(offset, dtype, seed):
    rng = np.random.default_rng(seed)
    return [(offset + rng.normal(size=(n, 3))).astype(dtype) for n in OFFSET_SIZES]


@pytest.mark.parametrize("strategy", STRATEGIES, ids=ids(STRATEGIES))
@pytest.mark.parametrize(
    ("offset", "dtype"), [(1e8, np.float64), (1e4, np.float32)], ids=["1e8-float64", "1e4-float32"]
)
def test_large_offset_against_exact_reference(strategy, offset, dtype):
    xs = offset_batches(offset, dtype, seed=9)
    estimator = strategy()
    for x in xs:
        estimator.update(x)
    exact_mean, exact_var = exact_reference(strategy, xs)
    assert relative_error_to_exact(estimator.var, exact_var) <= 1e-12
    assert relative_error_to_exact(estimator.mean, exact_mean) <= 1e-14


@pytest.mark.parametrize("strategy", STRATEGIES, ids=ids(STRATEGIES))
def test_large_offset_torch_against_exact_reference(strategy, torch, torch_device):
    xs = offset_batches(1e8, np.float64, seed=10)
    estimator = strategy()
    for x in xs:
        estimator.update(torch.from_numpy(x).to(torch_device))
    exact_mean, exact_var = exact_reference(strategy, xs)
    assert relative_error_to_exact(estimator.var, exact_var) <= 1e-12
    assert relative_error_to_exact(estimator.mean, exact_mean) <= 1e-14


@pytest.mark.parametrize("strategy", POOLED, ids=ids(POOLED))
def test_large_offset_many_small_batches(strategy):
    # 1e8 + N(0, 1) in 100 batches of 3: a running mean kept to one float64 ulp of 1e8 would
    # put an error of ~1e-8 into every delta; the pooled strategies must keep every digit.
    x = 1e8 + np.random.default_rng(11).normal(size=(300, 2))
    estimator = strategy()
    for batch in np.split(x, 100):
        estimator.update(batch)
    exact_mean, exact_var = exact_reference(strategy, [x])
    assert relative_error_to_exact(estimator.var, exact_var) <= 1e-12
    assert relative_error_to_exact(estimator.mean, exact_mean) <= 1e-15


# -- one sample per feature ------------------------------------------------------------


@pytest.mark.parametrize("strategy", POOLED, ids=ids(POOLED))
def test_pooled_accept_a_one_sample_batch(strategy):
    rng = np.random.default_rng(12)
    xs = [rng.normal(size=(1, 4)), rng.normal(size=(6, 4)), rng.normal(size=(1, 4))]
    estimator = strategy()
    estimator.update(xs[0])
    assert estimator.count == 1
    np.testing.assert_array_equal(estimator.mean, xs[0][0])
    for x in xs[1:]:
        estimator.update(x)
    union = np.concatenate(xs)
    assert estimator.count == 8
    np.testing.assert_allclose(estimator.mean, union.mean(axis=0), rtol=RTOL)
    np.testing.assert_allclose(estimator.var, union.var(axis=0, ddof=1), rtol=RTOL)


@pytest.mark.parametrize("strategy", POOLED, ids=ids(POOLED))
def test_pooled_accept_a_one_sample_nchw_batch(strategy):
    x = np.random.default_rng(13).normal(size=(1, 3, 1, 1))
    estimator = strategy()
    estimator.update(x, axis=(0, 2, 3))
    assert estimator.count == 1
    np.testing.assert_array_equal(estimator.mean, x.reshape(3))


ONE_SAMPLE_REFUSERS = [s for s in STRATEGIES if not s.pooled]


@pytest.mark.parametrize("strategy", ONE_SAMPLE_REFUSERS, ids=ids(ONE_SAMPLE_REFUSERS))
@pytest.mark.parametrize("fed_first", [False, True], ids=["fresh", "fed"])
def test_per_batch_strategies_refuse_a_one_sample_batch(strategy, fed_first):
    rng = np.random.default_rng(14)
    estimator = strategy()
    if fed_first:
        estimator.update(rng.normal(size=(5, 3)))
    before = estimator.state_dict()
    for x, axis in [(rng.normal(size=(1, 3)), 0), (rng.normal(size=(1, 3, 1, 1)), (0, 2, 3))]:
        with pytest.raises(ValueError, match=r"^x\b") as info:
            estimator.update(x, axis=axis)
        assert "expected" in str(info.value)
    after = estimator.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert np.array_equal(after[key], before[key]), key
