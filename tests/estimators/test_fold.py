"""``Strategy.fold``: many stacked batches at once, with masked slots.

The reference is the strategy's own ``step`` over the unmasked slots in order (the rule the
fold must reproduce, to float64 rounding), and exact rational arithmetic over the unmasked
batches (independent of normstats). Every strategy, on NumPy and on torch (each device).
"""

from __future__ import annotations

from fractions import Fraction

import array_api_compat
import numpy as np
import pytest

import normstats as ns
from normstats.estimators import StackedMoments, Strategy
from normstats.estimators._fold import fold_by_steps

from ..helpers import STRATEGIES, StrategyConfig, exact_reference, relative_error_to_exact, to_numpy

RTOL = 1e-12
FEATURES = 3
EXTRA = (
    StrategyConfig("ema-1.0", ns.ExponentialMovingAverage, {"momentum": 1.0}, mergeable=False),
    StrategyConfig("ema-0.5", ns.ExponentialMovingAverage, {"momentum": 0.5}, mergeable=False),
)
EVERY = (*STRATEGIES, *EXTRA)


def ids(strategies):
    return [s.id for s in strategies]


def batches(count, seed, loc=2.0, scale=3.0):
    """Float64 batches of 2 to 9 rows whose location and spread drift."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 10, size=count)
    return [
        rng.normal(loc + 0.3 * i, scale * (1 + 0.1 * i), size=(n, FEATURES))
        for i, n in enumerate(sizes)
    ]


def stacked(xs, masked=(), namespace="numpy", device="cpu"):
    """The batches' moments as slots; the slots at ``masked`` hold NaN or Inf instead."""
    moments = [ns.Moments.from_array(x) for x in xs]
    means = np.stack([m.mean for m in moments])
    m2s = np.stack([m.m2 for m in moments])
    for i, k in enumerate(masked):
        (means if i % 2 else m2s)[k, k % FEATURES] = np.nan if i % 3 else np.inf
    finite = np.isfinite(means).all(axis=1) & np.isfinite(m2s).all(axis=1)
    if namespace == "torch":
        import torch

        means, m2s, finite = (torch.from_numpy(a).to(device) for a in (means, m2s, finite))
    return StackedMoments([m.count for m in moments], means, m2s, finite)


def stepped(strategy, state, xs):
    """``strategy.step`` over the batches, the reference the fold must reproduce."""
    for x in xs:
        m = ns.Moments.from_array(x)
        state = strategy.step(state, m)
    return state


def initial(strategy, namespace="numpy", device="cpu"):
    template = np.zeros(FEATURES)
    if namespace == "torch":
        import torch

        template = torch.zeros(FEATURES, dtype=torch.float64, device=device)
    return strategy.initial_state(template)


def assert_states_close(actual, expected, rtol=RTOL):
    assert set(actual) == set(expected)
    for key in ("count", "num_batches"):
        assert float(actual[key]) == float(expected[key]), key
    for key in expected:
        if key not in ("count", "num_batches"):
            np.testing.assert_allclose(
                to_numpy(actual[key]), to_numpy(expected[key]), rtol=rtol, atol=1e-14, err_msg=key
            )


def assert_estimates_close(strategy, actual, expected, rtol=RTOL):
    for a, e in zip(strategy.estimate(actual), strategy.estimate(expected), strict=True):
        np.testing.assert_allclose(to_numpy(a), to_numpy(e), rtol=rtol, atol=0)


# -- the fold is the step over the unmasked slots ----------------------------------------


@pytest.mark.parametrize(
    "masked", [(), (0,), (1, 4), (0, 1, 2)], ids=["none", "first", "two", "head"]
)
@pytest.mark.parametrize("size", [1, 2, 7, 64])
@pytest.mark.parametrize("strategy", EVERY, ids=ids(EVERY))
def test_fold_equals_steps_over_the_unmasked_slots(strategy, size, masked):
    masked = tuple(k for k in masked if k < size)
    estimator = strategy()
    history = batches(3, seed=1)
    xs = batches(size, seed=2)
    start = stepped(estimator, initial(estimator), history)
    expected = stepped(estimator, start, [x for k, x in enumerate(xs) if k not in masked])
    folded = estimator.fold(start, stacked(xs, masked))
    assert_estimates_close(estimator, folded, expected)
    assert_states_close(folded, expected)


@pytest.mark.parametrize("masked", [(), (0, 3)], ids=["none", "two"])
@pytest.mark.parametrize("strategy", EVERY, ids=ids(EVERY))
def test_fold_of_a_fresh_state_matches_exact_arithmetic(strategy, masked):
    """From the initial state, the fold estimates what exact arithmetic over the unmasked
    batches gives (an independent reference: rationals, not normstats)."""
    estimator = strategy()
    xs = batches(9, seed=3)
    folded = estimator.fold(initial(estimator), stacked(xs, masked))
    kept = [x for k, x in enumerate(xs) if k not in masked]
    exact_mean, exact_var = exact_reference(strategy, kept)
    mean, var = estimator.estimate(folded)
    assert relative_error_to_exact(mean, exact_mean) < 1e-13
    assert relative_error_to_exact(var, exact_var) < 1e-13


@pytest.mark.parametrize("strategy", EVERY, ids=ids(EVERY))
def test_folding_in_parts_equals_folding_at_once(strategy):
    estimator = strategy()
    xs = batches(20, seed=4)
    slots = stacked(xs, masked=(5, 6, 13))
    at_once = estimator.fold(initial(estimator), slots)
    state = initial(estimator)
    for part in (slice(0, 1), slice(1, 6), slice(6, 7), slice(7, 20)):
        state = estimator.fold(
            state,
            StackedMoments(
                slots.counts[part], slots.means[part], slots.m2s[part], slots.finite[part]
            ),
        )
    assert_estimates_close(estimator, state, at_once)
    assert float(state["count"]) == float(at_once["count"])
    assert float(state["num_batches"]) == float(at_once["num_batches"]) == 17


@pytest.mark.parametrize("strategy", EVERY, ids=ids(EVERY))
def test_counts_given_as_an_array_fold_as_host_counts(strategy):
    estimator = strategy()
    start = stepped(estimator, initial(estimator), batches(2, seed=13))
    slots = stacked(batches(9, seed=14), masked=(4,))
    as_array = slots._replace(counts=np.asarray(slots.counts))
    for key, value in estimator.fold(start, as_array).items():
        assert np.array_equal(to_numpy(value), to_numpy(estimator.fold(start, slots)[key]))


@pytest.mark.parametrize("strategy", EVERY, ids=ids(EVERY))
def test_every_slot_masked_leaves_the_state_as_it_was(strategy):
    estimator = strategy()
    for start in (initial(estimator), stepped(estimator, initial(estimator), batches(2, 5))):
        folded = estimator.fold(start, stacked(batches(3, seed=6), masked=(0, 1, 2)))
        for key, value in start.items():
            assert np.array_equal(to_numpy(folded[key]), to_numpy(value)), key


@pytest.mark.parametrize("strategy", EVERY, ids=ids(EVERY))
def test_the_closed_form_equals_the_default_loop(strategy):
    """The built-in overrides agree with the loop every user strategy gets."""
    estimator = strategy()
    start = stepped(estimator, initial(estimator), batches(2, seed=7))
    slots = stacked(batches(11, seed=8), masked=(2, 9))
    assert_estimates_close(
        estimator, estimator.fold(start, slots), fold_by_steps(estimator, start, slots)
    )


POOLED_EVERY = [s for s in EVERY if s.pooled]


def exact_pool(counts, means, m2s):
    """Exact mean and unbiased variance of batches given by their moments (rationals)."""
    total = sum(counts)
    mean = sum(n * Fraction(float(m)) for n, m in zip(counts, means, strict=True)) / total
    m2 = sum(
        Fraction(float(q)) + n * (Fraction(float(m)) - mean) ** 2
        for n, m, q in zip(counts, means, m2s, strict=True)
    )
    return mean, m2 / (total - 1)


@pytest.mark.parametrize("strategy", POOLED_EVERY, ids=ids(POOLED_EVERY))
def test_pooled_fold_keeps_every_digit_of_data_far_from_zero(strategy):
    """Batch means 1e8 + O(1) (exact in float64): the fold pools around the state's mean,
    so the spread between them keeps every digit."""
    rng = np.random.default_rng(9)
    size = 12
    counts = [int(n) for n in rng.integers(2, 50, size=size)]
    means = 1e8 + rng.integers(-16, 16, size=(size, FEATURES)) / 8.0
    m2s = rng.uniform(0.5, 2.0, size=(size, FEATURES)) * (np.array(counts)[:, None] - 1)
    finite = np.ones(size, dtype=bool)
    finite[[3, 8]] = False
    means[3, 0] = np.nan
    estimator = strategy()
    state = initial(estimator)
    for part in (slice(0, 5), slice(5, size)):
        slots = StackedMoments(counts[part], means[part], m2s[part], finite[part])
        state = estimator.fold(state, slots)
    mean, var = estimator.estimate(state)
    kept = np.flatnonzero(finite)
    for j in range(FEATURES):
        exact_mean, exact_var = exact_pool([counts[k] for k in kept], means[kept, j], m2s[kept, j])
        assert abs(Fraction(float(mean[j])) - exact_mean) / exact_mean < 1e-16
        assert abs(Fraction(float(var[j])) - exact_var) / exact_var < 1e-13


# -- a user's strategy gets the loop --------------------------------------------------------


class LargestMean(Strategy):
    """A user's strategy: the largest batch mean seen, and its batch's unbiased variance."""

    name = "largest"
    array_keys = ("mean", "var")

    def initial_state(self, template):
        return {"count": 0, "num_batches": 0, "mean": template - np.inf, "var": template + 1.0}

    def step(self, state, batch):
        xp = array_api_compat.array_namespace(batch.mean)
        larger = batch.mean > state["mean"]
        return {
            "count": state["count"] + batch.count,
            "num_batches": state["num_batches"] + 1,
            "mean": xp.where(larger, batch.mean, state["mean"]),
            "var": xp.where(larger, batch.m2 / (batch.count - 1), state["var"]),
        }

    def estimate(self, state):
        return state["mean"], state["var"]


def test_a_user_strategy_folds_with_its_own_step():
    estimator = LargestMean()
    xs = batches(6, seed=10)
    masked = (1, 4)
    folded = estimator.fold(initial(estimator), stacked(xs, masked))
    kept = [x for k, x in enumerate(xs) if k not in masked]
    means = np.stack([x.mean(axis=0) for x in kept])
    variances = np.stack([x.var(axis=0, ddof=1) for x in kept])
    best = means.argmax(axis=0)
    np.testing.assert_allclose(folded["mean"], means.max(axis=0), rtol=1e-15)
    np.testing.assert_allclose(folded["var"], variances[best, range(FEATURES)], rtol=1e-12)
    assert float(folded["count"]) == sum(len(x) for x in kept)
    assert float(folded["num_batches"]) == len(kept)


# -- torch, on every device ---------------------------------------------------------------


@pytest.mark.parametrize("strategy", EVERY, ids=ids(EVERY))
def test_fold_on_torch_tensors_matches_numpy(strategy, torch_device):
    torch = pytest.importorskip("torch")
    estimator = strategy()
    history, xs = batches(2, seed=11), batches(64, seed=12)
    masked = (0, 17, 63)
    expected = estimator.fold(stepped(estimator, initial(estimator), history), stacked(xs, masked))
    start = stepped(
        estimator,
        initial(estimator, "torch", torch_device),
        [torch.from_numpy(x).to(torch_device) for x in history],
    )
    folded = estimator.fold(start, stacked(xs, masked, "torch", torch_device))
    for key, value in folded.items():
        assert isinstance(value, torch.Tensor), key
        assert value.device.type == torch_device, key
        assert value.dtype == torch.float64, key
    assert_states_close(folded, expected)
