"""Generic checks that every exported strategy passes.

Merge equals union, split invariance, state_dict round trips, validated loading, repr and
pickle, reset, ``update_moments``, bookkeeping, the protocol, ``make_stats`` and torch input.
"""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normstats as ns

from ..helpers import (
    MERGEABLE,
    POOLED,
    STRATEGIES,
    assert_same_state,
    snapshot,
    to_numpy,
)

RTOL = 1e-12
FEATURES = 3


def batches(sizes, seed=0, features=FEATURES, loc=2.0, scale=3.0):
    """Float64 batches of the given numbers of rows (distinct location per batch)."""
    rng = np.random.default_rng(seed)
    return [rng.normal(loc + 0.5 * i, scale, size=(n, features)) for i, n in enumerate(sizes)]


def fed(strategy, xs, **kwargs):
    estimator = strategy(**kwargs)
    for x in xs:
        estimator.update(x)
    return estimator


def assert_estimates_close(a, b, rtol=RTOL, mean_atol=0.0):
    np.testing.assert_allclose(to_numpy(a.mean), to_numpy(b.mean), rtol=rtol, atol=mean_atol)
    np.testing.assert_allclose(to_numpy(a.var), to_numpy(b.var), rtol=rtol, atol=0)


def assert_estimates_identical(a, b):
    for name in ("mean", "var"):
        x, y = to_numpy(getattr(a, name)), to_numpy(getattr(b, name))
        assert x.dtype == y.dtype
        assert np.array_equal(x, y), f"{name}: {x!r} != {y!r}"


def strategy_ids(strategies):
    return [s.id for s in strategies]


# -- merge ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", MERGEABLE, ids=strategy_ids(MERGEABLE))
def test_merge_equals_one_estimator_over_both_streams(strategy):
    stream_a = batches([5, 3, 8], seed=1)
    stream_b = batches([4, 9], seed=2)
    a = fed(strategy, stream_a)
    b = fed(strategy, stream_b)
    union = fed(strategy, stream_a + stream_b)
    b_before = snapshot(b)

    a.merge(b)

    assert_estimates_close(a, union)
    assert a.count == union.count == 5 + 3 + 8 + 4 + 9
    assert a.num_batches == union.num_batches == 5
    assert_same_state(b.state_dict(), b_before)  # the argument is not modified


@pytest.mark.parametrize("strategy", POOLED, ids=strategy_ids(POOLED))
def test_pooled_merge_equals_numpy_over_union(strategy):
    stream_a = batches([5, 3, 8], seed=3)
    stream_b = batches([4, 9], seed=4, loc=-10.0)
    a, b = fed(strategy, stream_a), fed(strategy, stream_b)
    a.merge(b)
    union = np.concatenate(stream_a + stream_b)
    np.testing.assert_allclose(a.mean, union.mean(axis=0), rtol=RTOL)
    np.testing.assert_allclose(a.var, union.var(axis=0, ddof=1), rtol=RTOL)


def test_cumulative_merge_weights_by_number_of_batches():
    stream_a = batches([2, 2, 2], seed=5)  # three small batches
    stream_b = batches([50], seed=6, loc=20.0)  # one large batch
    a, b = fed(ns.CumulativeAverage, stream_a), fed(ns.CumulativeAverage, stream_b)
    assert isinstance(a, ns.CumulativeAverage)
    a.merge(b)
    every = stream_a + stream_b
    np.testing.assert_allclose(a.mean, np.mean([x.mean(axis=0) for x in every], axis=0), rtol=RTOL)
    np.testing.assert_allclose(
        a.var, np.mean([x.var(axis=0, ddof=1) for x in every], axis=0), rtol=RTOL
    )


@pytest.mark.parametrize("strategy", MERGEABLE, ids=strategy_ids(MERGEABLE))
def test_merge_with_a_fresh_estimator_on_either_side(strategy):
    xs = batches([4, 6], seed=7)
    reference = fed(strategy, xs)

    a = fed(strategy, xs)
    a.merge(strategy())
    assert_same_state(a.state_dict(), reference.state_dict())

    fresh = strategy()
    fresh.merge(fed(strategy, xs))
    assert_same_state(fresh.state_dict(), reference.state_dict())


@pytest.mark.parametrize("strategy", MERGEABLE, ids=strategy_ids(MERGEABLE))
def test_merge_refuses_another_strategy_or_shape(strategy):
    a = fed(strategy, batches([4], seed=8))
    before = snapshot(a)
    other_type = ns.Welford if not isinstance(a, ns.Welford) else ns.ExactFullPass
    with pytest.raises(TypeError, match="other"):
        a.merge(fed(other_type, batches([4], seed=9)))
    with pytest.raises(ValueError, match="other"):
        a.merge(fed(strategy, batches([4], seed=9, features=FEATURES + 1)))
    assert_same_state(a.state_dict(), before)


@pytest.mark.parametrize("debias", [False, True])
def test_ema_merge_raises_type_error(debias):
    a = fed(ns.ExponentialMovingAverage, batches([4, 5], seed=10), debias=debias)
    b = fed(ns.ExponentialMovingAverage, batches([4], seed=11), debias=debias)
    before = snapshot(a)
    with pytest.raises(TypeError, match="merge") as info:
        a.merge(b)
    assert "order" in str(info.value)  # it says why
    assert_same_state(a.state_dict(), before)


# -- split invariance ----------------------------------------------------------------


@pytest.mark.parametrize("strategy", POOLED, ids=strategy_ids(POOLED))
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 60),
    cuts=st.lists(st.floats(0.0, 1.0), max_size=8),
    loc=st.sampled_from([0.0, 5.0, -300.0, 1e4]),
)
def test_split_invariance(strategy, seed, n, cuts, loc):
    x = np.random.default_rng(seed).normal(loc, 1.5, size=(n, FEATURES))
    points = sorted({min(int(c * (n - 1)), n - 2) + 1 for c in cuts})  # cuts in [1, n - 1]
    split = fed(strategy, np.split(x, points))
    whole = fed(strategy, [x])
    assert split.num_batches == len(points) + 1
    assert split.count == n
    # A mean near 0 (loc 0) has no relative precision of its own: its rounding error, in
    # any summation order, is relative to the data's magnitude, |loc| plus the spread.
    scale = abs(loc) + 1.5
    assert_estimates_close(split, whole, mean_atol=RTOL * scale)
    np.testing.assert_allclose(split.mean, x.mean(axis=0), rtol=RTOL, atol=RTOL * scale)
    np.testing.assert_allclose(split.var, x.var(axis=0, ddof=1), rtol=RTOL)


@pytest.mark.parametrize("strategy", POOLED, ids=strategy_ids(POOLED))
def test_split_invariance_fvcore_sizes(strategy):
    # fvcore's PreciseBN test re-splits the same data into uneven batches.
    x = np.random.default_rng(12).normal(1.0, 2.0, size=(128, 2, 3))
    points = np.cumsum([2, 2, 4, 8, 16, 32])
    split = fed(strategy, np.split(x, points))
    assert split.num_batches == 7
    np.testing.assert_allclose(split.mean, x.mean(axis=0), rtol=RTOL)
    np.testing.assert_allclose(split.var, x.var(axis=0, ddof=1), rtol=RTOL)


# -- state dicts ---------------------------------------------------------------------


def roundtrip_npz(state, path):
    np.savez(path, **state)
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def roundtrip_torch(torch, state, path):
    torch.save(state, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("updates", [0, 3])
def test_state_dict_roundtrip_npz(estimator_factory, tmp_path, updates):
    original = fed(estimator_factory, batches([4, 7, 5][:updates], seed=13))
    loaded = roundtrip_npz(original.state_dict(), tmp_path / "state.npz")
    restored = estimator_factory()
    restored.load_state_dict(loaded)
    assert_same_state(restored.state_dict(), original.state_dict())

    (nxt,) = batches([6], seed=14)
    original.update(nxt)
    restored.update(nxt)
    assert_estimates_identical(restored, original)
    assert_same_state(restored.state_dict(), original.state_dict())


@pytest.mark.parametrize("updates", [0, 3])
def test_state_dict_roundtrip_torch_save(estimator_factory, torch, tmp_path, updates):
    xs = [torch.from_numpy(x) for x in batches([4, 7, 5][:updates], seed=15)]
    original = fed(estimator_factory, xs)
    loaded = roundtrip_torch(torch, original.state_dict(), tmp_path / "state.pt")
    restored = estimator_factory()
    restored.load_state_dict(loaded)
    assert_same_state(restored.state_dict(), original.state_dict())

    nxt = torch.from_numpy(batches([6], seed=16)[0])
    original.update(nxt)
    restored.update(nxt)
    assert_estimates_identical(restored, original)
    assert_same_state(restored.state_dict(), original.state_dict())


def test_state_dict_is_flat_numbers_and_arrays(estimator_factory):
    estimator = fed(estimator_factory, batches([4, 5], seed=17))
    state = estimator.state_dict()
    prefixes = {key.split(".")[0] for key in state}
    assert len(prefixes) == 1
    for key, value in state.items():
        assert isinstance(value, int | float | bool | np.ndarray), (key, type(value))
    assert state[f"{prefixes.pop()}.count"] == 9


def test_state_dict_loads_into_an_estimator_that_has_state(estimator_factory):
    source = fed(estimator_factory, batches([4, 5], seed=18))
    target = fed(estimator_factory, batches([3, 3, 3], seed=19))
    target.load_state_dict(source.state_dict())
    assert_same_state(target.state_dict(), source.state_dict())


def other_configurations(strategy):
    """Estimators whose state dicts ``strategy`` must refuse."""
    others = [s() for s in STRATEGIES if s.id != strategy.id]
    if isinstance(strategy(), ns.ExponentialMovingAverage):
        others.append(strategy(momentum=0.01))
    return others


def test_loading_another_strategy_or_setting_raises(estimator_factory):
    target = fed(estimator_factory, batches([4, 5], seed=20))
    before = snapshot(target)
    for other in other_configurations(estimator_factory):
        other.update(batches([6], seed=21)[0])
        with pytest.raises(ValueError, match="state_dict"):
            target.load_state_dict(other.state_dict())
        assert_same_state(target.state_dict(), before)


def test_loading_another_momentum_names_the_setting():
    target = ns.EMA(momentum=0.1)
    other = ns.EMA(momentum=0.01)
    other.update(batches([4], seed=22)[0])
    with pytest.raises(ValueError, match="momentum"):
        target.load_state_dict(other.state_dict())
    assert target.num_batches == 0


def array_keys(state):
    """The keys of a fed estimator's state dict that hold arrays."""
    return [key for key, value in state.items() if isinstance(value, np.ndarray)]


def malformed(state):
    """``(description, exception, bad state dict)`` for every way a state dict can be wrong."""
    prefix = next(iter(state)).split(".")[0] + "."
    key = array_keys(state)[0]
    array = state[key]
    nan_array = array.copy()
    nan_array[0] = np.nan
    cases = [
        ("missing key", ValueError, {k: v for k, v in state.items() if k != prefix + "count"}),
        ("missing array", ValueError, {k: v for k, v in state.items() if k != key}),
        ("extra key", ValueError, {**state, prefix + "bogus": 1.0}),
        ("wrong shape", ValueError, {**state, key: np.zeros(len(array) + 1)}),
        ("2-d shape", ValueError, {**state, key: array.reshape(1, -1)}),
        ("negative count", ValueError, {**state, prefix + "count": -1}),
        ("negative num_batches", ValueError, {**state, prefix + "num_batches": -2}),
        ("count without batches", ValueError, {**state, prefix + "num_batches": 0}),
        ("string count", TypeError, {**state, prefix + "count": "9"}),
        ("float count", TypeError, {**state, prefix + "count": 9.5}),
        ("string array", TypeError, {**state, key: "abc"}),
        ("integer array", TypeError, {**state, key: np.arange(len(array))}),
        ("nan in array", ValueError, {**state, key: nan_array}),
        ("inf in array", ValueError, {**state, key: array + np.inf}),
        ("not a mapping", TypeError, list(state.items())),
    ]
    for spread_key in (prefix + "var", prefix + "m2"):
        if spread_key in state:
            cases.append(("negative spread", ValueError, {**state, spread_key: -state[spread_key]}))
    return cases


@pytest.mark.parametrize("fresh_target", [False, True], ids=["fed-target", "fresh-target"])
def test_malformed_state_dict_raises_and_leaves_state_unchanged(estimator_factory, fresh_target):
    source = fed(estimator_factory, batches([4, 5], seed=23))
    target = estimator_factory() if fresh_target else fed(estimator_factory, [batches([6])[0]])
    before = snapshot(target)
    cases = malformed(source.state_dict())
    assert len(cases) >= 15
    for description, error, bad in cases:
        try:
            with pytest.raises(error):
                target.load_state_dict(bad)
            assert_same_state(target.state_dict(), before)
        except BaseException as failure:  # pytest's Failed is a BaseException
            failure.add_note(f"malformed state dict: {description}")
            raise


def test_malformed_empty_state_dict_raises(estimator_factory):
    # A state of no batches still has typed values: a string is no number and no array.
    keys = array_keys(fed(estimator_factory, batches([4], seed=24)).state_dict())
    state = estimator_factory().state_dict()
    target = fed(estimator_factory, batches([4], seed=25))
    before = snapshot(target)
    with pytest.raises(TypeError, match=re.escape(keys[0])):
        target.load_state_dict({**state, keys[0]: "abc"})
    assert_same_state(target.state_dict(), before)


# -- repr, pickle, reset -------------------------------------------------------------


@pytest.mark.parametrize("updates", [0, 2])
def test_repr_names_class_and_settings(estimator_factory, updates):
    estimator = fed(estimator_factory, batches([4, 4][:updates]))
    text = repr(estimator)
    assert text.startswith(type(estimator).__name__ + "(")
    assert "nan_policy='raise'" in text
    rebuilt = eval(text, {type(estimator).__name__: type(estimator)})
    assert_same_state(rebuilt.state_dict(), estimator_factory().state_dict())


@pytest.mark.parametrize("updates", [0, 2])
def test_pickle_roundtrip(estimator_factory, updates):
    original = fed(estimator_factory, batches([4, 6][:updates], seed=25))
    restored = pickle.loads(pickle.dumps(original))
    assert type(restored) is type(original)
    assert repr(restored) == repr(original)
    assert_same_state(restored.state_dict(), original.state_dict())
    (nxt,) = batches([5], seed=26)
    original.update(nxt)
    restored.update(nxt)
    assert_estimates_identical(restored, original)


def test_reset_returns_to_fresh_state(estimator_factory):
    estimator = fed(estimator_factory, batches([4, 5], seed=27), nan_policy="skip")
    estimator.update(np.full((3, FEATURES), np.nan))
    assert estimator.num_batches_skipped == 1
    estimator.reset()
    fresh = estimator_factory(nan_policy="skip")
    assert_same_state(estimator.state_dict(), fresh.state_dict())
    assert estimator.nan_policy == "skip"
    assert (estimator.count, estimator.num_batches, estimator.num_batches_skipped) == (0, 0, 0)
    # after a reset a batch of another feature shape is welcome
    other = batches([4], seed=28, features=FEATURES + 2)[0]
    estimator.update(other)
    fresh.update(other)
    assert_estimates_identical(estimator, fresh)


# -- update_moments, bookkeeping, protocol ------------------------------------------------


def test_update_moments_equals_update(estimator_factory):
    xs = batches([4, 9, 2, 6], seed=29, loc=40.0)
    by_update = fed(estimator_factory, xs)
    by_moments = estimator_factory()
    for x in xs:
        by_moments.update_moments(ns.Moments.from_array(x))
    assert by_moments.count == by_update.count
    assert by_moments.num_batches == by_update.num_batches
    assert_estimates_close(by_moments, by_update, rtol=1e-13)


def test_update_moments_nchw_equals_update(estimator_factory):
    xs = [np.random.default_rng(30 + i).normal(size=(n, 2, 3, 3)) for i, n in enumerate([2, 5])]
    by_update = estimator_factory()
    by_moments = estimator_factory()
    for x in xs:
        by_update.update(x, axis=(0, 2, 3))
        by_moments.update_moments(ns.Moments.from_array(x, axis=(0, 2, 3)))
    assert by_moments.count == by_update.count == 7 * 9
    assert_estimates_close(by_moments, by_update, rtol=1e-13)


def test_update_moments_of_count_zero_changes_nothing(estimator_factory):
    estimator = fed(estimator_factory, batches([4], seed=31))
    before = snapshot(estimator)
    estimator.update_moments(ns.Moments(count=0, mean=np.zeros(FEATURES), m2=np.zeros(FEATURES)))
    assert_same_state(estimator.state_dict(), before)


def test_update_moments_refuses_non_moments(estimator_factory):
    estimator = estimator_factory()
    with pytest.raises(TypeError, match="moments"):
        estimator.update_moments(np.zeros((4, FEATURES)))


def test_count_and_num_batches(estimator_factory):
    estimator = estimator_factory()
    assert (estimator.count, estimator.num_batches, estimator.num_batches_skipped) == (0, 0, 0)
    rng = np.random.default_rng(32)
    total = 0
    for i, n in enumerate([2, 5, 3], start=1):
        estimator.update(rng.normal(size=(n, 4, 2, 3)), axis=(0, 2, 3))
        total += n * 2 * 3
        assert estimator.count == total
        assert estimator.num_batches == i
    estimator.update(rng.normal(size=(4, 4)).T, axis=1)  # 4 features, 4 samples, axis 1
    assert estimator.count == total + 4
    assert estimator.num_batches == 4
    assert estimator.num_batches_skipped == 0


def test_is_running_stats(estimator_factory):
    estimator = estimator_factory()
    assert isinstance(estimator, ns.RunningStats)
    assert estimator.nan_policy == "raise"


def test_before_first_update(estimator_factory):
    estimator = estimator_factory()
    if estimator_factory.reports_before_first:
        assert estimator.mean == 0
        assert estimator.var == 1
        # scalars that broadcast against any feature shape
        np.testing.assert_array_equal(np.zeros(FEATURES) + estimator.mean, np.zeros(FEATURES))
    else:
        for name in ("mean", "var"):
            with pytest.raises(ValueError, match="batch"):
                getattr(estimator, name)


@pytest.mark.parametrize(
    ("name", "kwargs", "cls"),
    [
        ("exact", {}, ns.ExactFullPass),
        ("cumulative", {}, ns.CumulativeAverage),
        ("ema", {}, ns.ExponentialMovingAverage),
        ("ema", {"momentum": 0.01, "debias": True}, ns.ExponentialMovingAverage),
        ("welford", {"nan_policy": "skip"}, ns.Welford),
    ],
)
def test_make_stats(name, kwargs, cls):
    estimator = ns.make_stats(name, **kwargs)
    assert type(estimator) is cls
    for key, value in kwargs.items():
        assert getattr(estimator, key) == value


def test_make_stats_ema_defaults_are_pytorch():
    estimator = ns.make_stats("ema")
    assert estimator.momentum == 0.1
    assert estimator.debias is False
    assert ns.EMA is ns.ExponentialMovingAverage


@pytest.mark.parametrize("name", ["Welford", "batch", "", "moving"])
def test_make_stats_unknown_name_raises(name):
    with pytest.raises(ValueError, match="name") as info:
        ns.make_stats(name)
    assert repr(name) in str(info.value)
    assert "welford" in str(info.value)  # says what was expected


# -- torch ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ["float32", "float64", "bfloat16"])
def test_torch_state_stays_float64_on_device_and_matches_numpy(
    estimator_factory, torch, torch_device, dtype_name
):
    dtype = getattr(torch, dtype_name)
    xs = [torch.from_numpy(x).to(dtype=dtype, device=torch_device) for x in batches([4, 7, 3])]
    with_torch = fed(estimator_factory, xs)
    with_numpy = fed(estimator_factory, [to_numpy(x.to(torch.float64)) for x in xs])
    for value in (with_torch.mean, with_torch.var):
        assert isinstance(value, torch.Tensor)
        assert value.dtype == torch.float64
        assert value.device == xs[0].device
    for key, value in with_torch.state_dict().items():
        if not isinstance(value, int | float | bool):
            assert isinstance(value, torch.Tensor), key
            assert value.dtype == torch.float64, key
            assert value.device == xs[0].device, key
    assert_estimates_close(with_torch, with_numpy)
    assert with_torch.count == with_numpy.count == 14


def test_torch_nchw_matches_numpy(estimator_factory, torch, torch_device):
    rng = np.random.default_rng(33)
    xs = [rng.normal(1.0, 2.0, size=(n, 3, 2, 4)) for n in (2, 5)]
    with_torch = estimator_factory()
    with_numpy = estimator_factory()
    for x in xs:
        with_torch.update(torch.from_numpy(x).to(torch_device), axis=(0, 2, 3))
        with_numpy.update(x, axis=(0, 2, 3))
    assert_estimates_close(with_torch, with_numpy)


# -- scalar features (1-d batches) ---------------------------------------------------------


def assert_same_values(a, b):
    """Same keys and equal float64 values, whether stored as 0-d arrays or NumPy scalars."""
    assert list(a) == list(b)
    for key in a:
        assert np.array_equal(to_numpy(a[key]), to_numpy(b[key])), key


SCALAR_STREAM = [np.array([1.0, 2.0, 4.0]), np.array([3.0, 5.0, 0.5, 7.0])]


def test_one_dimensional_batches_have_scalar_statistics(estimator_factory):
    estimator = fed(estimator_factory, SCALAR_STREAM)
    assert estimator.count == 7
    assert np.shape(estimator.mean) == ()
    assert np.shape(estimator.var) == ()
    assert to_numpy(estimator.var).dtype == np.float64
    if estimator_factory.pooled:
        union = np.concatenate(SCALAR_STREAM)
        assert float(estimator.mean) == pytest.approx(union.mean(), rel=RTOL)
        assert float(estimator.var) == pytest.approx(union.var(ddof=1), rel=RTOL)


def test_one_dimensional_state_dict_loads_back(estimator_factory):
    original = fed(estimator_factory, SCALAR_STREAM)
    restored = estimator_factory()
    restored.load_state_dict(original.state_dict())
    assert_same_values(restored.state_dict(), original.state_dict())
    original.update(np.array([2.0, -1.0]))
    restored.update(np.array([2.0, -1.0]))
    assert_same_values(restored.state_dict(), original.state_dict())


def test_one_dimensional_state_dict_roundtrip_npz(estimator_factory, tmp_path):
    original = fed(estimator_factory, SCALAR_STREAM)
    restored = estimator_factory()
    restored.load_state_dict(roundtrip_npz(original.state_dict(), tmp_path / "state.npz"))
    assert_same_values(restored.state_dict(), original.state_dict())
    original.update(np.array([2.0, -1.0]))
    restored.update(np.array([2.0, -1.0]))
    assert_same_values(restored.state_dict(), original.state_dict())


# -- load_moments: a calibration written into any strategy ------------------------------------


def test_load_moments_gives_the_moments_statistics_and_the_skipped_count(estimator_factory):
    x = batches([40], seed=31)[0]
    stats = fed(estimator_factory, batches([5, 7], seed=32))
    stats.load_moments(ns.Moments.from_array(x), num_batches_skipped=np.int64(2))
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.var, x.var(axis=0, ddof=1), rtol=1e-12)
    assert (stats.count, stats.num_batches, stats.num_batches_skipped) == (40, 1, 2)


@pytest.mark.parametrize(("skipped", "error"), [(-1, ValueError), (1.5, TypeError)])
def test_load_moments_refuses_a_bad_skipped_count_and_changes_nothing(
    estimator_factory, skipped, error
):
    stats = fed(estimator_factory, batches([5, 7], seed=33))
    before = snapshot(stats)
    moments = ns.Moments.from_array(batches([9], seed=34)[0])
    with pytest.raises(error, match=r"^num_batches_skipped: "):
        stats.load_moments(moments, num_batches_skipped=skipped)
    assert_same_state(stats.state_dict(), before)
