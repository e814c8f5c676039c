"""Bad input: a clear error that names the parameter, and nothing lost."""

from __future__ import annotations

import re

import numpy as np
import pytest

import normstats as ns

from ..helpers import STRATEGIES, assert_same_state, snapshot, to_numpy

FEATURES = 3


def good_batch(seed=0, rows=5, features=FEATURES):
    return np.random.default_rng(seed).normal(2.0, 1.5, size=(rows, features))


def with_value(value, rows=5):
    x = good_batch(seed=1, rows=rows)
    x[rows // 2, 1] = value
    return x


def names(parameter):
    """Regex: the message names ``parameter`` as a word."""
    return rf"(?<![\w.]){re.escape(parameter)}(?![\w])"


def assert_state_exactly(estimator, before):
    """The state dict equals ``before``: same keys, every array equal (np.array_equal)."""
    after = estimator.state_dict()
    assert list(after) == list(before)
    for key in before:
        assert np.array_equal(to_numpy(after[key]), to_numpy(before[key])), key
    assert_same_state(after, before)


BAD_BATCHES = [
    pytest.param(with_value(np.nan), 0, ValueError, "x", id="nan"),
    pytest.param(with_value(np.inf), 0, ValueError, "x", id="inf"),
    pytest.param(with_value(-np.inf), 0, ValueError, "x", id="minus-inf"),
    pytest.param(with_value(1e200), 0, ValueError, "x", id="square-overflows"),
    pytest.param(np.zeros((0, FEATURES)), 0, ValueError, "x", id="empty"),
    pytest.param(np.zeros((0, FEATURES, 2, 2)), (0, 2, 3), ValueError, "x", id="empty-nchw"),
    pytest.param(np.arange(15).reshape(5, 3), 0, TypeError, "x", id="int64"),
    pytest.param(np.arange(15, dtype=np.int8).reshape(5, 3), 0, TypeError, "x", id="int8"),
    pytest.param(np.ones((5, 3), dtype=bool), 0, TypeError, "x", id="bool"),
    pytest.param(np.ones((5, 3), dtype=np.complex128), 0, TypeError, "x", id="complex"),
    pytest.param([[1, 2, 3], [4, 5, 6]], 0, TypeError, "x", id="int-list"),
    pytest.param([["a", "b", "c"]] * 2, 0, TypeError, "x", id="str-list"),
    pytest.param(None, 0, TypeError, "x", id="none"),
    pytest.param(
        np.ma.array(good_batch(), mask=np.eye(5, FEATURES, dtype=bool)),
        0,
        TypeError,
        "x",
        id="masked",
    ),
    pytest.param(np.ma.array(good_batch()), 0, TypeError, "x", id="masked-nothing-masked"),
    pytest.param(good_batch(), 2, ValueError, "axis", id="axis-too-large"),
    pytest.param(good_batch(), -3, ValueError, "axis", id="axis-too-negative"),
    pytest.param(good_batch(), (0, 0), ValueError, "axis", id="axis-repeated"),
    pytest.param(good_batch(), 0.5, TypeError, "axis", id="axis-float"),
    pytest.param(good_batch(), "0", TypeError, "axis", id="axis-str"),
    pytest.param(good_batch(), [0], TypeError, "axis", id="axis-list"),
    pytest.param(good_batch(), None, TypeError, "axis", id="axis-none"),
    pytest.param(good_batch(), (0, 1.0), TypeError, "axis", id="axis-tuple-float"),
]


@pytest.mark.parametrize(("x", "axis", "error", "parameter"), BAD_BATCHES)
@pytest.mark.parametrize("fed_first", [False, True], ids=["fresh", "fed"])
def test_bad_batch_raises_naming_parameter_and_leaves_state(
    estimator_factory, x, axis, error, parameter, fed_first
):
    estimator = estimator_factory()
    if fed_first:
        estimator.update(good_batch(seed=2))
    before = snapshot(estimator)
    with pytest.raises(error, match=names(parameter)) as info:
        estimator.update(x, axis=axis)
    message = str(info.value)
    assert "expected" in message
    assert "got" in message
    assert_state_exactly(estimator, before)
    # and the estimator still works
    estimator.update(good_batch(seed=3))


@pytest.mark.parametrize(
    ("x", "axis"),
    [
        (good_batch(features=FEATURES + 1), 0),
        (good_batch(features=FEATURES - 1), 0),
        (good_batch().reshape(5, FEATURES, 1), 0),
        (good_batch().T, 0),
        (np.ones((2, FEATURES, 2, 2)), (0, 2, 3)),
        (np.ones((2, FEATURES, 2, 2)), 0),
    ],
    ids=["more", "fewer", "extra-axis", "transposed", "nchw-same-channels-accepted", "nchw-axis-0"],
)
def test_feature_shape_change_raises_and_leaves_state(estimator_factory, x, axis):
    estimator = estimator_factory()
    estimator.update(good_batch(seed=2))
    before = snapshot(estimator)
    if axis == (0, 2, 3):  # same channels: a legitimate batch, not an error
        estimator.update(x, axis=axis)
        assert estimator.num_batches == 2
        return
    with pytest.raises(ValueError, match=names("x")) as info:
        estimator.update(x, axis=axis)
    assert "expected" in str(info.value)
    assert "feature shape" in str(info.value)
    assert_state_exactly(estimator, before)


def test_feature_shape_error_says_both_shapes(estimator_factory):
    estimator = estimator_factory()
    estimator.update(good_batch())
    with pytest.raises(ValueError, match=r"\(3,\)") as info:
        estimator.update(good_batch(features=4))
    assert "(4,)" in str(info.value)


def test_nan_error_says_what_arrived(estimator_factory):
    with pytest.raises(ValueError, match="NaN") as info:
        estimator_factory().update(with_value(np.nan))
    assert "finite" in str(info.value)


def test_dtype_error_names_the_dtype(estimator_factory):
    with pytest.raises(TypeError, match="int32"):
        estimator_factory().update(np.ones((4, 2), dtype=np.int32))


def test_list_of_floats_is_accepted(estimator_factory):
    rows = [[1.0, 2.0, 0.5], [3.0, 6.0, 0.25], [2.5, -1.0, 4.0]]
    from_list = estimator_factory()
    from_list.update(rows)
    from_array = estimator_factory()
    from_array.update(np.array(rows))
    assert_same_state(from_list.state_dict(), from_array.state_dict())
    np.testing.assert_array_equal(from_list.mean, from_array.mean)
    assert from_list.count == 3


def nan_batch_moments():
    """The moments of a batch with NaN, as the training forward returns them unchecked.

    A constructed ``Moments`` cannot hold NaN (its constructor refuses it); this is the one
    way non-finite moments reach ``update_moments``, which applies the ``nan_policy``.
    """
    moments = ns.functional.train_forward(with_value(np.nan), axis=1)[1]
    assert not np.isfinite(moments.m2).all()
    return moments


def test_bad_moments_leave_state(estimator_factory):
    estimator = estimator_factory()
    estimator.update(good_batch())
    before = snapshot(estimator)
    bad = [ns.Moments.from_array(good_batch(features=FEATURES + 1)), nan_batch_moments()]
    for moments in bad:
        with pytest.raises(ValueError, match=names("moments")):
            estimator.update_moments(moments)
        assert_state_exactly(estimator, before)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"mean": np.full(FEATURES, np.nan), "m2": np.ones(FEATURES)}, "mean"),
        ({"mean": np.zeros(FEATURES), "m2": np.full(FEATURES, np.inf)}, "m2"),
        ({"mean": np.zeros(FEATURES), "m2": np.full(FEATURES, -100.0)}, "m2"),
    ],
    ids=["nan-mean", "inf-m2", "negative-m2"],
)
def test_invalid_moments_cannot_reach_an_estimator(estimator_factory, fields, field):
    # A negative m2 used to be folded in and lower var (Welford: 4.0 -> -18.4).
    estimator = estimator_factory()
    estimator.update(good_batch())
    before = snapshot(estimator)
    with pytest.raises(ValueError, match=names(field)):
        estimator.update_moments(ns.Moments(count=4, **fields))
    assert_state_exactly(estimator, before)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_matrix_batches_give_the_statistics_of_the_plain_array(estimator_factory):
    # np.matrix used to raise "shapes not aligned" from inside the reduction.
    xs = [good_batch(seed=8), good_batch(seed=9, rows=7)]
    from_matrix, from_array = estimator_factory(), estimator_factory()
    for x in xs:
        from_matrix.update(np.matrix(x))
        from_array.update(x)
    assert type(from_matrix.mean) is np.ndarray
    assert_same_state(from_matrix.state_dict(), from_array.state_dict())


def test_masked_error_says_what_to_pass_instead(estimator_factory):
    x = np.ma.masked_invalid(with_value(np.nan))
    with pytest.raises(TypeError, match="masked") as info:
        estimator_factory().update(x)
    assert "compress_rows" in str(info.value)


# -- nan_policy="skip" ---------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [with_value(np.nan), with_value(np.inf), with_value(1e200)],
    ids=["nan", "inf", "square-overflows"],
)
def test_skip_policy_skips_and_counts(estimator_factory, bad):
    first, later = good_batch(seed=4), good_batch(seed=5, rows=7)
    skipping = estimator_factory(nan_policy="skip")
    skipping.update(first)
    before = snapshot(skipping)

    skipping.update(bad)

    assert skipping.num_batches_skipped == 1
    assert skipping.num_batches == 1
    assert skipping.count == 5
    after = skipping.state_dict()
    for key in before:
        if not key.endswith(".num_batches_skipped"):
            assert np.array_equal(to_numpy(after[key]), to_numpy(before[key])), key

    skipping.update(later)
    never_saw_it = estimator_factory(nan_policy="skip")
    never_saw_it.update(first)
    never_saw_it.update(later)
    expected = never_saw_it.state_dict()
    for key, value in skipping.state_dict().items():
        if key.endswith(".num_batches_skipped"):
            assert value == 1
        else:
            assert np.array_equal(to_numpy(value), to_numpy(expected[key])), key


def test_skip_policy_on_the_first_batch(estimator_factory):
    skipping = estimator_factory(nan_policy="skip")
    fresh = snapshot(skipping)
    skipping.update(with_value(np.nan))
    assert skipping.num_batches_skipped == 1
    assert (skipping.count, skipping.num_batches) == (0, 0)
    for key, value in skipping.state_dict().items():
        if not key.endswith(".num_batches_skipped"):
            assert np.array_equal(to_numpy(value), to_numpy(fresh[key])), key


def test_skip_policy_skips_non_finite_moments(estimator_factory):
    skipping = estimator_factory(nan_policy="skip")
    skipping.update(good_batch())
    skipping.update_moments(nan_batch_moments())
    assert skipping.num_batches_skipped == 1
    assert skipping.num_batches == 1


@pytest.mark.parametrize(
    ("x", "error"),
    [
        (np.zeros((0, FEATURES)), ValueError),
        (good_batch(features=FEATURES + 1), ValueError),
        (np.ones((4, FEATURES), dtype=np.int64), TypeError),
    ],
    ids=["empty", "other-features", "int64"],
)
def test_skip_policy_still_raises_for_other_bad_input(estimator_factory, x, error):
    # "skip" is for non-finite batches; a wrong shape or dtype is a bug in the caller.
    skipping = estimator_factory(nan_policy="skip")
    skipping.update(good_batch())
    before = snapshot(skipping)
    with pytest.raises(error, match=names("x")):
        skipping.update(x)
    assert_state_exactly(skipping, before)


# -- constructors and hyperparameters ------------------------------------------------


@pytest.mark.parametrize("momentum", [0, 0.0, -0.1, 1.5, 1.0000001, float("nan"), float("inf")])
def test_momentum_outside_unit_interval_raises_value_error(momentum):
    with pytest.raises(ValueError, match=names("momentum")) as info:
        ns.ExponentialMovingAverage(momentum=momentum)
    assert "expected" in str(info.value)
    with pytest.raises(ValueError, match=names("momentum")):
        ns.make_stats("ema", momentum=momentum)


@pytest.mark.parametrize("momentum", ["0.1", None, [0.1]])
def test_momentum_of_wrong_type_raises_type_error(momentum):
    with pytest.raises(TypeError, match=names("momentum")):
        ns.ExponentialMovingAverage(momentum=momentum)


@pytest.mark.parametrize("momentum", [1, 1.0, 0.5, np.float32(0.25), 1e-6])
def test_momentum_inside_unit_interval_is_accepted(momentum):
    assert ns.ExponentialMovingAverage(momentum=momentum).momentum == pytest.approx(momentum)


@pytest.mark.parametrize("decay", [1.0, 1.5, -0.01, float("nan")])
def test_from_decay_outside_range_raises_naming_decay(decay):
    with pytest.raises(ValueError, match=names("decay")):
        ns.ExponentialMovingAverage.from_decay(decay)


def test_from_decay_of_wrong_type_raises_type_error():
    with pytest.raises(TypeError, match=names("decay")):
        ns.ExponentialMovingAverage.from_decay("0.99")


@pytest.mark.parametrize("policy", ["ignore", "RAISE", "", None])
def test_unknown_nan_policy_raises(estimator_factory, policy):
    with pytest.raises(ValueError, match=names("nan_policy")) as info:
        estimator_factory(nan_policy=policy)
    assert "skip" in str(info.value)


def test_nan_policy_default_is_raise(estimator_factory):
    assert estimator_factory().nan_policy == "raise"
    assert estimator_factory(nan_policy="skip").nan_policy == "skip"


def test_hyperparameters_are_read_only(estimator_factory):
    estimator = estimator_factory()
    with pytest.raises(AttributeError):
        estimator.nan_policy = "skip"
    assert estimator.nan_policy == "raise"
    if isinstance(estimator, ns.ExponentialMovingAverage):
        with pytest.raises(AttributeError):
            estimator.momentum = 0.5
        with pytest.raises(AttributeError):
            estimator.debias = not estimator.debias
        assert estimator.momentum == 0.1


def test_counters_are_read_only(estimator_factory):
    estimator = estimator_factory()
    for name in ("count", "num_batches", "num_batches_skipped"):
        with pytest.raises(AttributeError):
            setattr(estimator, name, 5)


@pytest.mark.parametrize("debias", ["yes", 1.0, None])
def test_debias_of_wrong_type_raises_type_error(debias):
    with pytest.raises(TypeError, match=names("debias")):
        ns.ExponentialMovingAverage(debias=debias)


# -- namespaces ----------------------------------------------------------------------


def test_numpy_batch_into_torch_state_raises(estimator_factory, torch):
    estimator = estimator_factory()
    estimator.update(torch.from_numpy(good_batch()))
    before = snapshot(estimator)
    with pytest.raises(TypeError, match=names("x")) as info:
        estimator.update(good_batch(seed=6))
    assert "torch" in str(info.value)
    assert_same_state(estimator.state_dict(), before)


def test_torch_batch_into_numpy_state_raises(estimator_factory, torch):
    estimator = estimator_factory()
    estimator.update(good_batch())
    before = snapshot(estimator)
    with pytest.raises(TypeError, match=names("x")):
        estimator.update(torch.from_numpy(good_batch(seed=7)))
    assert_same_state(estimator.state_dict(), before)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_torch_batch_raises_and_leaves_state(estimator_factory, torch, value):
    estimator = estimator_factory()
    estimator.update(torch.from_numpy(good_batch()))
    before = snapshot(estimator)
    with pytest.raises(ValueError, match=names("x")):
        estimator.update(torch.from_numpy(with_value(value)))
    assert_same_state(estimator.state_dict(), before)


def test_integer_torch_batch_raises_type_error(estimator_factory, torch):
    with pytest.raises(TypeError, match=names("x")):
        estimator_factory().update(torch.ones(4, 3, dtype=torch.int64))


def test_every_strategy_is_covered():
    assert {s.build for s in STRATEGIES} == {
        ns.ExactFullPass,
        ns.CumulativeAverage,
        ns.ExponentialMovingAverage,
        ns.Welford,
    }
