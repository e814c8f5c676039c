"""The user strategies of docs/strategies.md (``LastK``, ``WithinBatch``) in the core.

The classes are the page's own (:mod:`tests.user_strategies` executes its definitions). They
run through the estimator shell on NumPy arrays and torch tensors, ``ns.make_stats`` (class
and ``"module:Class"``), state dicts, pickling, ``merge``, the NumPy ``ns.BatchNorm`` and the
``ns.Standardizer``. References are independent of normstats: NumPy over the concatenated
window (or the union of streams) and exact rationals. The generic contract checks of
``test_contract.py`` that hold for any strategy run over both, imported below.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normstats as ns

from ..helpers import (
    StrategyConfig,
    assert_same_state,
    exact_pooled,
    relative_error_to_exact,
    snapshot,
    to_numpy,
)
from ..user_strategies import LastK, WithinBatch

# The generic contract checks: collected here again, with ``estimator_factory`` (below) giving
# the user strategies instead of the built-in ones. The others (split invariance, exact
# references, the built-in names) assume properties or names of a built-in strategy.
from .test_contract import (  # noqa: F401
    test_before_first_update,
    test_count_and_num_batches,
    test_is_running_stats,
    test_loading_another_strategy_or_setting_raises,
    test_malformed_empty_state_dict_raises,
    test_malformed_state_dict_raises_and_leaves_state_unchanged,
    test_one_dimensional_state_dict_loads_back,
    test_one_dimensional_state_dict_roundtrip_npz,
    test_pickle_roundtrip,
    test_repr_names_class_and_settings,
    test_reset_returns_to_fresh_state,
    test_state_dict_is_flat_numbers_and_arrays,
    test_state_dict_loads_into_an_estimator_that_has_state,
    test_state_dict_roundtrip_npz,
    test_state_dict_roundtrip_torch_save,
    test_torch_nchw_matches_numpy,
    test_torch_state_stays_float64_on_device_and_matches_numpy,
    test_update_moments_equals_update,
    test_update_moments_nchw_equals_update,
    test_update_moments_of_count_zero_changes_nothing,
    test_update_moments_refuses_non_moments,
)

RTOL = 1e-12
FEATURES = 3
PATH = "tests.user_strategies:LastK"
USER_STRATEGIES = (
    # k=2: the contract's streams of three batches overflow the window
    StrategyConfig("last_k", LastK, {"k": 2}, mergeable=False),
    StrategyConfig("within_batch", WithinBatch),
)


@pytest.fixture(params=USER_STRATEGIES, ids=lambda s: s.id)
def estimator_factory(request: pytest.FixtureRequest) -> StrategyConfig:
    """The user strategies, for the contract checks imported above."""
    return request.param


def stream(sizes, seed=0, features=FEATURES):
    """Float64 batches of the given numbers of rows, each at its own location and scale."""
    rng = np.random.default_rng(seed)
    return [
        rng.normal(3.0 * i - 4.0, 1.0 + 0.5 * i, size=(n, features)) for i, n in enumerate(sizes)
    ]


def window(batches, k):
    """NumPy's mean and unbiased variance of the samples of the last ``k`` batches."""
    union = np.concatenate([to_numpy(b) for b in batches[-k:]])
    return union.mean(axis=0), union.var(axis=0, ddof=1)


def within(batches):
    """NumPy's count-weighted mean and pooled within-batch variance of ``batches``."""
    union = np.concatenate(batches)
    m2 = sum(((b - b.mean(axis=0)) ** 2).sum(axis=0) for b in batches)
    return union.mean(axis=0), m2 / (len(union) - len(batches))


def assert_estimate(stats, mean, var, rtol=RTOL):
    np.testing.assert_allclose(to_numpy(stats.mean), mean, rtol=rtol, atol=0)
    np.testing.assert_allclose(to_numpy(stats.var), var, rtol=rtol, atol=0)


SIZES = [5, 2, 9, 3, 7, 4, 6]
"""Uneven batches; batch 2 has the fewest samples ``LastK`` takes."""


# -- LastK: the window -----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5, 10])
def test_last_k_pools_the_last_k_batches(k):
    xs = stream(SIZES, seed=k)
    stats = LastK(k=k)
    for seen in range(1, len(xs) + 1):  # before and after the window fills
        stats.update(xs[seen - 1])
        assert_estimate(stats, *window(xs[:seen], k))
        assert stats.count == sum(SIZES[:seen])  # every sample seen, not only the window's
        assert stats.num_batches == seen
    exact_mean, exact_var = exact_pooled(xs[-k:])
    assert relative_error_to_exact(stats.mean, exact_mean) < 1e-14
    assert relative_error_to_exact(stats.var, exact_var) < 1e-13


@pytest.mark.parametrize("k", [1, 3, 10])
def test_last_k_on_torch_float64_tensors(torch, k):
    xs = stream(SIZES, seed=20 + k)
    stats = LastK(k=k)
    for seen in range(1, len(xs) + 1):
        stats.update(torch.from_numpy(xs[seen - 1]))
        for value in (stats.mean, stats.var):
            assert isinstance(value, torch.Tensor)
            assert value.dtype == torch.float64
        assert_estimate(stats, *window(xs[:seen], k))
    for key in ("counts", "means", "m2s"):
        assert tuple(stats.state_dict()[f"last_k.{key}"].shape) == (k, FEATURES)


def test_last_k_nchw_pools_over_samples_and_positions():
    rng = np.random.default_rng(3)
    xs = [rng.normal(i, 1.0, size=(n, 2, 3, 4)) for i, n in enumerate([3, 2, 5])]
    stats = LastK(k=2)
    for x in xs:
        stats.update(x, axis=(0, 2, 3))
    union = np.concatenate(xs[-2:]).transpose(1, 0, 2, 3).reshape(2, -1)
    assert_estimate(stats, union.mean(axis=1), union.var(axis=1, ddof=1))


def test_last_k_before_any_batch_has_no_statistics():
    stats = LastK(k=3)
    with pytest.raises(ValueError, match="no batch"):
        _ = stats.mean
    assert not hasattr(stats, "var")


@pytest.mark.parametrize(
    ("k", "error"),
    [
        (0, ValueError),
        (-2, ValueError),
        (2.0, TypeError),
        (True, TypeError),
        ("3", TypeError),
    ],
)
def test_last_k_refuses_a_bad_k(k, error):
    with pytest.raises(error, match=r"^k: expected a positive int, got "):
        LastK(k=k)


def test_last_k_takes_a_numpy_integer_k():
    assert LastK(k=np.int64(4)).k == 4
    assert type(LastK(k=np.int64(4)).k) is int


def test_last_k_refuses_a_batch_of_one_sample_unchanged():
    stats = LastK(k=2)
    stats.update(stream([4])[0])
    before = snapshot(stats)
    with pytest.raises(ValueError, match="x"):
        stats.update(np.ones((1, FEATURES)))
    assert_same_state(stats.state_dict(), before)


# -- make_stats and import paths ---------------------------------------------------------


@pytest.mark.parametrize("name", [LastK, PATH], ids=["class", "path"])
def test_make_stats_builds_last_k(name):
    stats = ns.make_stats(name, k=4, nan_policy="skip")
    assert type(stats) is LastK
    assert stats.k == 4
    assert stats.nan_policy == "skip"
    assert ns.make_stats(name).k == 8  # the class's default


def test_make_stats_names_an_unknown_argument():
    with pytest.raises(TypeError, match=r"make_stats\('tests.user_strategies:LastK'\).*window"):
        ns.make_stats(PATH, window=3)
    with pytest.raises(ValueError, match=r"^k: "):
        ns.make_stats(LastK, k=0)


BAD_PATHS = {
    "missing-module": ("tests.no_such_module:LastK", ValueError, "cannot import module"),
    "missing-attribute": ("tests.user_strategies:LastQ", ValueError, "has no attribute 'LastQ'"),
    "not-a-strategy": ("tests.helpers:StrategyConfig", TypeError, "subclass of normstats.Strategy"),
    "not-a-class": ("tests.user_strategies:CLASSES", TypeError, "subclass of normstats.Strategy"),
}


@pytest.mark.parametrize("case", list(BAD_PATHS))
def test_make_stats_refuses_a_bad_path(case):
    path, error, needle = BAD_PATHS[case]
    with pytest.raises(error) as info:
        ns.make_stats(path)
    message = str(info.value)
    assert message.startswith("name: "), message
    assert needle in message
    assert repr(path.partition(":")[0]) in message or repr(path) in message


@pytest.mark.parametrize("case", list(BAD_PATHS))
def test_numpy_batchnorm_names_stats_for_a_bad_path(case):
    path, error, needle = BAD_PATHS[case]
    with pytest.raises(error) as info:
        ns.BatchNorm(FEATURES, stats=path)
    assert str(info.value).startswith("stats: "), str(info.value)
    assert needle in str(info.value)


def test_make_stats_refuses_the_protocol_itself():
    with pytest.raises(TypeError, match=r"^name: expected a subclass of normstats\.Strategy"):
        ns.make_stats(ns.Strategy)


# -- bad batches ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_last_k_non_finite_batch_raises_unchanged(bad):
    stats = LastK(k=2)
    for x in stream([4, 5, 3], seed=4):
        stats.update(x)
    before = snapshot(stats)
    spoiled = stream([6], seed=5)[0]
    spoiled[2, 1] = bad
    with pytest.raises(ValueError, match=r"^x: "):
        stats.update(spoiled)
    assert_same_state(stats.state_dict(), before)


def test_last_k_skips_a_non_finite_batch_outside_the_window():
    xs = stream([4, 5, 3, 6], seed=6)
    stats = LastK(k=2, nan_policy="skip")
    for x in xs[:3]:
        stats.update(x)
    before = snapshot(stats)
    stats.update(np.full((5, FEATURES), np.nan))
    after = stats.state_dict()
    assert after.pop("last_k.num_batches_skipped") == 1
    assert_same_state(after, {k: v for k, v in before.items() if k != "last_k.num_batches_skipped"})
    stats.update(xs[3])  # the window is the last two batches that were not skipped
    assert_estimate(stats, *window(xs, 2))
    assert (stats.num_batches, stats.num_batches_skipped) == (4, 1)


@pytest.mark.parametrize("nan_policy", ["raise", "skip"])
def test_within_batch_fold_that_overflows_is_refused(nan_policy):
    huge = 1.7e308  # the difference of two means of opposite sign overflows float64
    stats = WithinBatch(nan_policy=nan_policy)
    stats.update(np.full((2, FEATURES), -huge))
    before = snapshot(stats)
    if nan_policy == "raise":
        with pytest.raises(ValueError, match=r"^x: .*overflow"):
            stats.update(np.full((2, FEATURES), huge))
        assert_same_state(stats.state_dict(), before)
    else:
        stats.update(np.full((2, FEATURES), huge))
        assert stats.num_batches_skipped == 1
        assert stats.num_batches == 1
        np.testing.assert_array_equal(stats.mean, np.full(FEATURES, -huge))


def test_within_batch_fold_of_moments_that_overflows_is_refused():
    big = ns.Moments(3, np.zeros(FEATURES), np.full(FEATURES, 1.5e308))
    stats = WithinBatch()
    stats.update_moments(big)
    before = snapshot(stats)
    with pytest.raises(ValueError, match=r"^moments: .*overflow"):
        stats.update_moments(big)  # the sum of the two M2 overflows
    assert_same_state(stats.state_dict(), before)


# -- state dicts ------------------------------------------------------------------------------


def fed_last_k(k, sizes=(4, 6, 3, 5), seed=7):
    stats = LastK(k=k)
    for x in stream(list(sizes), seed=seed):
        stats.update(x)
    return stats


def test_last_k_state_dict_round_trips_through_npz_and_continues():
    original = fed_last_k(3)
    saved = io.BytesIO()
    np.savez(saved, **original.state_dict())
    saved.seek(0)
    restored = LastK(k=3)
    with np.load(saved, allow_pickle=False) as data:
        restored.load_state_dict({key: data[key] for key in data.files})
    assert_same_state(restored.state_dict(), original.state_dict())
    xs = stream([4, 6, 3, 5, 8], seed=7)
    restored.update(xs[4])
    assert_estimate(restored, *window(xs, 3))


def test_last_k_state_dict_round_trips_through_torch_save(torch, tmp_path):
    original = LastK(k=2)
    xs = stream([4, 6, 3], seed=8)
    for x in xs:
        original.update(torch.from_numpy(x))
    torch.save(original.state_dict(), tmp_path / "state.pt")
    restored = LastK(k=2)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert_same_state(restored.state_dict(), original.state_dict())
    assert_estimate(restored, *window(xs, 2))


@pytest.mark.parametrize("fresh_target", [False, True], ids=["fed-target", "fresh-target"])
def test_last_k_refuses_the_state_of_another_k_unchanged(fresh_target):
    source = fed_last_k(3)
    target = LastK(k=4) if fresh_target else fed_last_k(4, sizes=(5, 2), seed=9)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"state_dict\['last_k.k'\]: expected 4, .* got 3"):
        target.load_state_dict(source.state_dict())
    assert_same_state(target.state_dict(), before)


def leading_axes_cases(state):
    """State dicts of k=4 whose window arrays have other leading axes than ``(4,)``.

    (k differs from the number of features: a ``(3,)`` array is a valid window of k=3 over
    scalar features.)
    """
    arrays = ("last_k.counts", "last_k.means", "last_k.m2s")
    return {
        "longer window": {**state, **{key: np.concatenate([state[key]] * 2) for key in arrays}},
        "shorter window": {**state, **{key: state[key][1:] for key in arrays}},
        "one array longer": {**state, "last_k.means": np.concatenate([state["last_k.means"]] * 2)},
        "no leading axis": {**state, **{key: state[key][-1] for key in arrays}},
        "extra leading axis": {**state, **{key: state[key][None] for key in arrays}},
    }


@pytest.mark.parametrize(
    "case",
    [
        "longer window",
        "shorter window",
        "one array longer",
        "no leading axis",
        "extra leading axis",
    ],
)
def test_last_k_refuses_a_state_with_other_leading_axes_unchanged(case):
    bad = leading_axes_cases(fed_last_k(4).state_dict())[case]
    target = fed_last_k(4, sizes=(7, 2), seed=10)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"state_dict\['last_k\.(counts|means|m2s)'\]"):
        target.load_state_dict(bad)
    assert_same_state(target.state_dict(), before)


def test_last_k_refuses_negative_counts_unchanged():
    state = fed_last_k(3).state_dict()
    target = fed_last_k(3, sizes=(7, 2), seed=10)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"last_k\.counts"):
        target.load_state_dict({**state, "last_k.counts": -state["last_k.counts"]})
    assert_same_state(target.state_dict(), before)


@pytest.mark.parametrize(
    "copier", [copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s))], ids=["deepcopy", "pickle"]
)
def test_last_k_copies_keep_k_and_the_window(copier):
    original = LastK(k=5, nan_policy="skip")
    xs = stream([3, 4, 2], seed=11)
    for x in xs[:2]:
        original.update(x)
    restored = copier(original)
    assert (restored.k, restored.nan_policy) == (5, "skip")
    assert_same_state(restored.state_dict(), original.state_dict())
    restored.update(xs[2])
    assert_estimate(restored, *window(xs, 5))
    assert original.num_batches == 2  # the copy is independent


# -- merge ------------------------------------------------------------------------------------


@given(
    sizes=st.lists(st.integers(2, 9), min_size=1, max_size=7),
    cut=st.integers(0, 7),
    seed=st.integers(0, 2**16),
)
def test_within_batch_merge_equals_one_estimator_over_the_union(sizes, cut, seed):
    xs = stream(sizes, seed=seed)
    cut = min(cut, len(xs))
    first, second, union = WithinBatch(), WithinBatch(), WithinBatch()
    for x in xs[:cut]:
        first.update(x)
    for x in xs[cut:]:
        second.update(x)
    for x in xs:
        union.update(x)
    second_before = snapshot(second)
    first.merge(second)
    assert_same_state(second.state_dict(), second_before)  # the argument is not modified
    assert (first.count, first.num_batches) == (sum(sizes), len(sizes))
    assert_estimate(first, to_numpy(union.mean), to_numpy(union.var))
    assert_estimate(first, *within(xs))


def test_last_k_merge_is_refused_unchanged():
    a, b = fed_last_k(2), fed_last_k(2, seed=12)
    a_before, b_before = snapshot(a), snapshot(b)
    with pytest.raises(TypeError, match="merge"):
        a.merge(b)
    assert_same_state(a.state_dict(), a_before)
    assert_same_state(b.state_dict(), b_before)
    assert LastK.mergeable is False
    assert WithinBatch.mergeable is True


# -- the NumPy engine and the Standardizer ----------------------------------------------------


def test_numpy_batchnorm_with_last_k_uses_the_window():
    xs = stream(SIZES, seed=13)
    layer = ns.BatchNorm(FEATURES, stats=LastK(k=3))
    for x in xs:
        y = layer(x)
        np.testing.assert_allclose(y, (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + 1e-5))
    mean, var = window(xs, 3)
    assert_estimate(layer.stats, mean, var)
    layer.eval()
    probe = stream([4], seed=14)[0]
    np.testing.assert_allclose(layer(probe), (probe - mean) / np.sqrt(var + 1e-5), rtol=1e-12)


def test_numpy_batchnorm_builds_last_k_from_its_path():
    layer = ns.BatchNorm(FEATURES, stats=PATH, k=2)
    assert type(layer.stats) is LastK
    assert layer.stats.k == 2


def test_standardizer_with_last_k_uses_the_window():
    xs = stream(SIZES, seed=15)
    scaler = ns.Standardizer(stats=LastK(k=3))
    for x in xs:
        scaler.partial_fit(x)
    mean, var = window(xs, 3)
    np.testing.assert_allclose(scaler.mean_, mean, rtol=RTOL)
    np.testing.assert_allclose(scaler.var_, var, rtol=RTOL)  # the strategy's own estimate
    union = np.concatenate(xs[-3:])
    np.testing.assert_allclose(scaler.transform(union).mean(axis=0), 0.0, atol=1e-12)


@pytest.mark.parametrize(
    "build",
    [
        lambda: ns.Standardizer(stats=LastK, k=3),
        lambda: ns.Standardizer(stats="tests.user_strategies:LastK", k=3),
        lambda: ns.Standardizer(stats=LastK(k=3)),
    ],
    ids=["class", "path", "instance"],
)
def test_standardizer_takes_a_user_strategy_as_class_path_or_instance(build):
    xs = stream(SIZES, seed=16)
    scaler = build()
    for x in xs:
        scaler.partial_fit(x)
    mean, var = window(xs, 3)
    np.testing.assert_allclose(scaler.mean_, mean, rtol=RTOL)
    np.testing.assert_allclose(scaler.var_, var, rtol=RTOL)


def test_standardizer_fits_a_fresh_copy_of_an_instance():
    given = LastK(k=2)
    scaler = ns.Standardizer(stats=given).fit(stream(SIZES, seed=17)[0])
    assert given.num_batches == 0  # the instance is a setting, not the fitted state
    assert scaler.get_params()["stats"] is given
    refit = ns.Standardizer(stats=given).fit(stream(SIZES, seed=17)[1])
    assert refit.n_samples_seen_ == SIZES[1]


def test_standardizer_refuses_wrong_user_strategy_arguments():
    with pytest.raises(TypeError, match="invalid parameter 'window'"):
        ns.Standardizer(stats=LastK, window=3)
    with pytest.raises(ValueError, match="apply to a strategy name or class"):
        ns.Standardizer(stats=LastK(k=2), k=3).fit(stream(SIZES, seed=18)[0])
    with pytest.raises(ValueError, match=r"^stats: .*cannot import module 'nope'"):
        ns.Standardizer(stats="nope:LastK").fit(stream(SIZES, seed=18)[0])
