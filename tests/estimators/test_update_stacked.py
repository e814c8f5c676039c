"""StackedMoments.from_batches and update_stacked_all: ``K`` stacked batches at once.

``from_batches`` must give every batch the moments that ``Moments.from_array`` gives it (NumPy
and exact rational arithmetic check both independently) and mask a batch with NaN or Inf
instead of raising. ``update_stacked_all`` must leave every estimator where
``update_moments_all`` slot by slot leaves it, up to float64 rounding, and treat a masked slot,
a fold that overflows and bad input as that loop treats the batch, except that an error
changes no estimator at all.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

import normstats as ns
from normstats.estimators import (
    NoBatchError,
    StackedMoments,
    update_moments_all,
    update_stacked_all,
)

from ..helpers import (
    assert_same_state,
    exact_cumulative,
    exact_ema,
    exact_mean_m2,
    exact_pooled,
    relative_error_to_exact,
    snapshot,
    to_numpy,
)
from ..user_strategies import LastK, WithinBatch
from .test_bad_input import names
from .test_overflow import assert_unchanged_but_skipped

FEATURES = 3
RTOL = 1e-13
"""Folding at once and slot by slot round differently: a few float64 ulps apart."""
OFFSETS = [0.0, 1e4, 1e8]


def stack(k, batch_shape, offset=0.0, dtype=np.float64, seed=0):
    """``k`` batches of ``batch_shape`` stacked on a new first axis: ``offset`` plus a spread
    that ``dtype`` still resolves at that offset."""
    rng = np.random.default_rng(seed)
    scale = max(1.0, offset * 1e-5) if dtype == np.float32 else 1.0
    return (offset + scale * rng.normal(size=(k, *batch_shape))).astype(dtype)


LAYOUTS = [
    pytest.param((8, FEATURES), 0, id="2d-int"),
    pytest.param((FEATURES, 8), -1, id="2d-negative-int"),
    pytest.param((6, FEATURES, 5), (0, 2), id="3d-tuple"),
    pytest.param((4, FEATURES, 3, 5), (0, 2, 3), id="4d-nchw"),
    pytest.param((4, 3, 5, FEATURES), (-4, -3, -2), id="4d-channels-last-negative"),
]


# -- StackedMoments.from_batches ----------------------------------------------------------


def numpy_moments(batch, axis):
    """Count, mean and M2 of one batch by NumPy in float64 (two passes), an independent
    reference."""
    x = to_numpy(batch).astype(np.float64)
    mean = x.mean(axis=axis, keepdims=True)
    m2 = ((x - mean) ** 2).sum(axis=axis)
    return x.size // m2.size, np.squeeze(mean, axis=axis), m2


def assert_slots_of(slots, x, axis, only=None):
    """Slot ``k`` holds the moments of batch ``x[k]`` (for each ``k`` of ``only``, every
    unmasked slot by default): what ``Moments.from_array`` gives (the mean with its
    residual) and what NumPy gives."""
    finite = to_numpy(slots.finite)
    only = [k for k in range(len(x)) if finite[k]] if only is None else only
    for k in only:
        assert finite[k], k
        reference = ns.Moments.from_array(x[k], axis=axis)
        count, np_mean, np_m2 = numpy_moments(x[k], axis)
        assert int(slots.counts[k]) == reference.count == count
        mean, residual, m2 = (
            to_numpy(a[k]) for a in (slots.means, slots.mean_residuals, slots.m2s)
        )
        spread = np.sqrt(np_m2 / count)
        # the mean beyond float64: compared as the sum of two differences, each exact
        beyond = (mean - to_numpy(reference.mean)) + (residual - to_numpy(reference.mean_residual))
        assert np.all(np.abs(beyond) <= 1e-15 * spread), k
        np.testing.assert_allclose(mean, np_mean, rtol=1e-15, atol=1e-15 * spread.max())
        np.testing.assert_allclose(m2, to_numpy(reference.m2), rtol=RTOL, atol=0)
        np.testing.assert_allclose(m2, np_m2, rtol=1e-12, atol=0)


def assert_float64_slots(slots, k, feature_shape, like=np.ndarray):
    assert list(slots.counts) == [slots.counts[0]] * k
    assert all(type(count) is int for count in slots.counts)
    for array in (slots.means, slots.m2s, slots.mean_residuals):
        assert type(array) is like
        assert tuple(array.shape) == (k, *feature_shape)
        assert str(array.dtype).endswith("float64")
    assert tuple(slots.finite.shape) == (k,)


@pytest.mark.parametrize(("batch_shape", "axis"), LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("offset", OFFSETS)
def test_from_batches_gives_every_batch_its_moments(batch_shape, axis, dtype, offset):
    x = stack(5, batch_shape, offset, dtype, seed=1)
    slots = StackedMoments.from_batches(x, axis=axis)
    assert_float64_slots(slots, 5, (FEATURES,))
    assert to_numpy(slots.finite).tolist() == [True] * 5
    assert_slots_of(slots, x, axis)


@pytest.mark.parametrize(("batch_shape", "axis"), LAYOUTS[::2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_from_batches_of_torch_tensors(torch, torch_device, batch_shape, axis, dtype):
    x = torch.from_numpy(stack(6, batch_shape, 1e4, np.dtype(dtype), seed=2)).to(torch_device)
    x[2, 1, 0] = float("nan")
    slots = StackedMoments.from_batches(x, axis=axis)
    assert_float64_slots(slots, 6, (FEATURES,), like=torch.Tensor)
    for array in (slots.means, slots.m2s, slots.mean_residuals, slots.finite):
        assert array.device == x.device
    assert slots.finite.tolist() == [True, True, False, True, True, True]
    assert_slots_of(slots, x, axis)


def test_from_batches_keeps_the_means_beyond_float64():
    """Exact rationals: with its residual each mean of 1e8 + N(0, 1) is exact to 1e-30
    relative, where one float64 is off by up to half an ulp (4e-17 relative)."""
    x = stack(3, (5, 2), offset=1e8, seed=3)
    slots = StackedMoments.from_batches(x)
    for k in range(3):
        means, m2s = exact_mean_m2(x[k])
        for j in range(2):
            mean = Fraction(float(slots.means[k, j])) + Fraction(float(slots.mean_residuals[k, j]))
            assert abs(mean - means[j]) / means[j] < 1e-30
            assert abs(Fraction(float(slots.m2s[k, j])) - m2s[j]) / m2s[j] < 1e-15
        assert slots.counts[k] == 5


@pytest.mark.parametrize("offset", [0.0, 1e8])
def test_a_batch_with_nan_or_inf_is_masked_and_the_others_are_kept(offset):
    x = stack(6, (5, FEATURES), offset, seed=4)
    x[1, 2, 0] = np.nan
    x[3, 0, 2] = np.inf
    x[4, 4, 1] = -np.inf
    slots = StackedMoments.from_batches(x)
    assert slots.finite.tolist() == [True, False, True, False, False, True]
    assert_slots_of(slots, x, 0)


@pytest.mark.parametrize("value", [1e200, 1.7e308], ids=["squares-overflow", "sum-overflows"])
def test_a_slot_of_huge_values_next_to_a_nan_slot_is_kept(value):
    """A NaN slot keeps the stack from being reduced again in scaled units; the finite slot
    of huge values (whose squares, or whose sum, overflow) still gets its exact moments."""
    x = stack(4, (6, FEATURES), seed=5)
    x[1] = value
    x[2, 3, 1] = np.nan
    slots = StackedMoments.from_batches(x)
    assert slots.finite.tolist() == [True, True, False, True]
    assert slots.means[1].tolist() == [value] * FEATURES
    assert slots.mean_residuals[1].tolist() == [0.0] * FEATURES
    assert slots.m2s[1].tolist() == [0.0] * FEATURES
    reference = ns.Moments.from_array(x[1])
    assert reference.mean.tolist() == [value] * FEATURES
    assert reference.m2.tolist() == [0.0] * FEATURES
    assert_slots_of(slots, x, 0, only=[0, 3])


def test_an_empty_stack_gives_no_slots():
    slots = StackedMoments.from_batches(np.zeros((0, 4, FEATURES)))
    assert list(slots.counts) == []
    assert slots.means.shape == slots.m2s.shape == slots.mean_residuals.shape == (0, FEATURES)
    assert slots.finite.shape == (0,)


@pytest.mark.parametrize(
    ("x", "axis", "error", "parameter", "says"),
    [
        pytest.param(np.arange(24).reshape(2, 4, 3), 0, TypeError, "x", "got int64", id="int"),
        pytest.param(np.ones((2, 4), dtype=bool), 0, TypeError, "x", "got bool", id="bool"),
        pytest.param(np.ones(4), 0, ValueError, "x", "shape (4,)", id="1d"),
        pytest.param(np.ones(()), 0, ValueError, "x", "shape ()", id="0d"),
        pytest.param(np.ones((2, 4, 3)), 2, ValueError, "axis", "got 2", id="axis-too-large"),
        pytest.param(np.ones((2, 4, 3)), (0, -2), ValueError, "axis", "distinct", id="repeated"),
        pytest.param(np.ones((2, 4, 3)), 0.5, TypeError, "axis", "got 0.5", id="axis-float"),
    ],
)
def test_from_batches_refuses_bad_input(x, axis, error, parameter, says):
    with pytest.raises(error, match=names(parameter)) as info:
        StackedMoments.from_batches(x, axis=axis)
    assert "expected" in str(info.value)
    assert says in str(info.value)


def test_a_one_dimensional_x_says_batches_are_stacked_on_the_first_axis():
    with pytest.raises(ValueError, match=names("x")) as info:
        StackedMoments.from_batches(np.ones(4))
    assert "stacked along the first axis (at least 2 axes)" in str(info.value)


# -- update_stacked_all: as update_moments_all slot by slot ------------------------------


def every_strategy(**kwargs):
    """The built-in strategies (EMA at PyTorch's momentum and debiased at 0.01) and the
    user strategies of docs/strategies.md, which fold by the default loop over their step."""
    return [
        ns.make_stats("cumulative", **kwargs),
        ns.make_stats("ema", momentum=0.1, **kwargs),
        ns.make_stats("ema", momentum=0.01, debias=True, **kwargs),
        ns.make_stats("welford", **kwargs),
        ns.make_stats("exact", **kwargs),
        LastK(k=3, **kwargs),
        WithinBatch(**kwargs),
    ]


def fed(batches, axis=0, estimators=None, **kwargs):
    """``estimators`` (new ones by default) fed ``batches`` by ``update_moments_all``, one
    batch at a time: the reference."""
    estimators = every_strategy(**kwargs) if estimators is None else estimators
    for batch in batches:
        update_moments_all(estimators, ns.Moments.from_array(batch, axis=axis))
    return estimators


def assert_like(actual, expected, skipped=0):
    """The same strategy, counters and state keys (``skipped`` more batches skipped), the
    state arrays and the estimates equal up to float64 rounding."""
    assert repr(actual) == repr(expected)
    assert actual.count == expected.count
    assert actual.num_batches == expected.num_batches
    assert actual.num_batches_skipped == expected.num_batches_skipped + skipped
    mine, theirs = actual.state_dict(), expected.state_dict()
    assert list(mine) == list(theirs)
    for key, value in theirs.items():
        assert type(mine[key]) is type(value), key
        if hasattr(value, "shape"):
            assert mine[key].dtype == value.dtype, key
            assert getattr(mine[key], "device", None) == getattr(value, "device", None), key
            np.testing.assert_allclose(to_numpy(mine[key]), to_numpy(value), rtol=RTOL, err_msg=key)
        elif not key.endswith("num_batches_skipped"):
            assert mine[key] == value, key
    for mine_estimate, reference in ((actual.mean, expected.mean), (actual.var, expected.var)):
        np.testing.assert_allclose(to_numpy(mine_estimate), to_numpy(reference), rtol=RTOL)


@pytest.mark.parametrize(("batch_shape", "axis"), [LAYOUTS[0], LAYOUTS[3]])
@pytest.mark.parametrize("start", ["empty", "state"])
@pytest.mark.parametrize("offset", OFFSETS)
def test_as_update_moments_all_slot_by_slot(batch_shape, axis, start, offset):
    history = stack(2 if start == "state" else 0, batch_shape, offset, seed=6)
    x = stack(12, batch_shape, offset, seed=7)
    together = fed(history, axis)
    update_stacked_all(together, StackedMoments.from_batches(x, axis=axis))
    for actual, expected in zip(together, fed([*history, *x], axis), strict=True):
        assert_like(actual, expected)
        assert actual.num_batches == len(history) + 12


def exact_estimates(estimator, batches):
    """What ``estimator`` estimates from 2-d ``batches``, in exact rational arithmetic."""
    if isinstance(estimator, ns.Welford | ns.ExactFullPass):
        return exact_pooled(batches)
    if isinstance(estimator, ns.CumulativeAverage):
        return exact_cumulative(batches)
    if isinstance(estimator, ns.EMA):
        return exact_ema(batches, estimator.momentum, debias=estimator.debias)
    if isinstance(estimator, LastK):
        return exact_pooled(batches[-estimator.k :])
    pooled_mean = exact_pooled(batches)[0]  # WithinBatch: the M2 within batches, pooled
    m2s = [exact_mean_m2(batch)[1] for batch in batches]
    within = len(np.concatenate(batches)) - len(batches)
    return pooled_mean, [sum(m2[j] for m2 in m2s) / within for j in range(FEATURES)]


@pytest.mark.parametrize("offset", OFFSETS)
def test_folded_estimates_match_exact_arithmetic(offset):
    """Far from zero (1e8 + N(0, 1)) the variances keep their digits: the pooled strategies
    take each mean's residual."""
    history, x = stack(2, (4, FEATURES), offset, seed=8), stack(10, (4, FEATURES), offset, seed=9)
    estimators = fed(history)
    update_stacked_all(estimators, StackedMoments.from_batches(x))
    for estimator in estimators:
        if isinstance(estimator, LastK) and offset > 1e4:
            continue  # its estimate pools float64 means around a float64 mean (lost digits)
        mean, var = exact_estimates(estimator, [*history, *x])
        assert relative_error_to_exact(estimator.var, var) < 1e-12, estimator
        # the mean to float64 precision of its magnitude, however near zero it lies
        for value, exact, spread in zip(estimator.mean, mean, var, strict=True):
            error = abs(Fraction(float(value)) - exact)
            assert error <= 1e-15 * abs(exact) + 1e-15 * math.sqrt(spread), estimator


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_estimators_as_update_moments_all_slot_by_slot(torch, torch_device, dtype):
    def tensor(a):
        return torch.from_numpy(a).to(torch_device)

    history = [tensor(b) for b in stack(2, (4, FEATURES, 5), 1e4, np.dtype(dtype), seed=10)]
    x = tensor(stack(9, (4, FEATURES, 5), 1e4, np.dtype(dtype), seed=11))
    together = fed(history, axis=(0, 2))
    update_stacked_all(together, StackedMoments.from_batches(x, axis=(0, 2)))
    for actual, expected in zip(together, fed([*history, *x], axis=(0, 2)), strict=True):
        assert_like(actual, expected)
        assert type(actual.state_dict()[f"{actual.name}.count"]) is int
        assert actual.mean.device == x.device


def test_the_default_fold_steps_torch_counters_in_float64(torch, torch_device):
    """A user strategy (WithinBatch) folds by stepping with its counters as float64 0-d
    tensors: as int64 ones its weight ``batch.count / count`` was a float32 division."""
    x = stack(9, (4, FEATURES), seed=23)
    estimator = WithinBatch()
    slots = StackedMoments.from_batches(torch.from_numpy(x).to(torch_device))
    update_stacked_all([estimator], slots)
    assert relative_error_to_exact(estimator.mean, exact_pooled(list(x))[0]) < 1e-14


def test_slots_built_by_hand_without_residuals():
    """Slots from precomputed moments (no ``mean_residuals``) fold as those moments do."""
    moments = [ns.Moments.from_array(b) for b in stack(7, (5, FEATURES), 3.0, seed=12)]
    slots = StackedMoments(
        [m.count for m in moments],
        np.stack([m.mean for m in moments]),
        np.stack([m.m2 for m in moments]),
        np.ones(7, dtype=bool),
    )
    together, one_by_one = every_strategy(), every_strategy()
    update_stacked_all(together, slots)
    for m in moments:
        update_moments_all(one_by_one, m)
    for actual, expected in zip(together, one_by_one, strict=True):
        assert_like(actual, expected)


def test_no_slots_change_nothing():
    estimators = [*fed(stack(2, (4, FEATURES), seed=13)), *every_strategy()]
    before = [snapshot(e) for e in estimators]
    update_stacked_all(estimators, StackedMoments.from_batches(np.zeros((0, 4, FEATURES))))
    empty = np.zeros((0, FEATURES))
    update_stacked_all(estimators, StackedMoments([], empty, empty, np.zeros(0, dtype=bool)))
    for estimator, state in zip(estimators, before, strict=True):
        assert_same_state(estimator.state_dict(), state)


def test_slots_without_samples_change_nothing_as_update_moments_all():
    # update_moments_all takes count == 0 as no batch; the stacked fold used to refuse such a
    # slot ("expected at least one sample") and change none of the others.
    x = stack(5, (4, FEATURES), seed=15)
    slots = StackedMoments.from_batches(x)
    zeros = np.zeros((1, FEATURES))
    with_empty = StackedMoments(
        [*slots.counts[:2], 0, *slots.counts[2:], 0],
        np.concatenate([slots.means[:2], zeros, slots.means[2:], zeros]),
        np.concatenate([slots.m2s[:2], zeros, slots.m2s[2:], zeros]),
        np.concatenate([slots.finite[:2], [True], slots.finite[2:], [False]]),
        np.concatenate([slots.mean_residuals[:2], zeros, slots.mean_residuals[2:], zeros]),
    )
    together = every_strategy(nan_policy="raise")
    update_stacked_all(together, with_empty)
    for actual, expected in zip(together, fed(x), strict=True):
        assert_like(actual, expected)
    only_empty = StackedMoments.from_batches(np.zeros((3, 0, FEATURES)))
    assert only_empty.counts == [0, 0, 0]
    before = [snapshot(e) for e in together]
    update_stacked_all(together, only_empty)
    for estimator, state in zip(together, before, strict=True):
        assert_same_state(estimator.state_dict(), state)


# -- masked slots ------------------------------------------------------------------------


def with_masked_slots(offset=0.0, seed=14):
    """Seven batches; those at 1, 3 and 4 hold NaN, Inf and -Inf."""
    x = stack(7, (4, FEATURES), offset, seed=seed)
    x[1, 0, 0], x[3, 2, 1], x[4, 3, 2] = np.nan, np.inf, -np.inf
    return x


MASKED = (1, 3, 4)


def one_raises():
    """Every strategy skips but the debiased EMA."""
    estimators = every_strategy(nan_policy="skip")
    estimators[2] = ns.make_stats("ema", momentum=0.01, debias=True)
    return estimators


@pytest.mark.parametrize("policies", [every_strategy, one_raises], ids=["raise", "mixed"])
@pytest.mark.parametrize("start", ["empty", "state"])
def test_masked_slots_raise_before_any_estimator_changes(policies, start):
    estimators = fed(
        stack(2 if start == "state" else 0, (4, FEATURES), seed=15), estimators=policies()
    )
    before = [snapshot(e) for e in estimators]
    with pytest.raises(ValueError, match=names("slots")) as info:
        update_stacked_all(estimators, StackedMoments.from_batches(with_masked_slots()))
    message = str(info.value)
    assert "expected finite batches" in message
    assert "3 of 7 with NaN or Inf (slot 1 first)" in message
    for estimator, state in zip(estimators, before, strict=True):
        assert_same_state(estimator.state_dict(), state)  # not even counted as skipped


@pytest.mark.parametrize("offset", [0.0, 1e8])
def test_masked_slots_are_skipped_and_counted_by_each(offset):
    history, x = stack(2, (4, FEATURES), offset, seed=16), with_masked_slots(offset)
    estimators = fed(history, nan_policy="skip")
    update_stacked_all(estimators, StackedMoments.from_batches(x))
    finite = [batch for k, batch in enumerate(x) if k not in MASKED]
    reference = fed([*history, *finite], nan_policy="skip")
    for actual, expected in zip(estimators, reference, strict=True):
        assert_like(actual, expected, skipped=len(MASKED))
        assert actual.num_batches == 2 + 4


def test_only_masked_slots_leave_new_estimators_empty():
    estimators = every_strategy(nan_policy="skip")
    x = stack(3, (4, FEATURES), seed=17)
    x[:, 1, 1] = np.nan
    update_stacked_all(estimators, StackedMoments.from_batches(x))
    for estimator, new in zip(estimators, every_strategy(nan_policy="skip"), strict=True):
        assert_unchanged_but_skipped(estimator, snapshot(new), skipped=3)
        assert estimator.count == estimator.num_batches == 0
        if isinstance(estimator, ns.EMA) and not estimator.debias:
            assert (estimator.mean, estimator.var) == (0.0, 1.0)  # PyTorch's initial values
        else:
            with pytest.raises(NoBatchError):
                _ = estimator.mean


# -- folds that overflow -----------------------------------------------------------------


def overflowing(at, k=6):
    """``k`` batches of N(0, 1) but the one at ``at``, all 1e300: finite moments whose
    distance from the others' mean, squared, overflows a pooled M2 (Welford, ExactFullPass);
    the averages of batch statistics and the user strategies take them."""
    x = stack(k, (4, FEATURES), seed=18)
    x[at] = 1e300
    return x


def pooled_raise():
    """Welford and ExactFullPass raise (and overflow on those batches); the others skip."""
    estimators = every_strategy(nan_policy="skip")
    estimators[3:5] = [ns.Welford(), ns.ExactFullPass()]
    return estimators


def pooled_skip():
    """Welford and ExactFullPass skip; the others, which take those batches, raise."""
    estimators = every_strategy()
    estimators[3:5] = [ns.Welford(nan_policy="skip"), ns.ExactFullPass(nan_policy="skip")]
    return estimators


@pytest.mark.parametrize("at", [0, 3])
@pytest.mark.parametrize("policies", [every_strategy, pooled_raise], ids=["raise", "mixed"])
def test_a_fold_that_overflows_raises_before_any_estimator_changes(at, policies):
    estimators = fed(stack(2, (4, FEATURES), seed=19), estimators=policies())
    before = [snapshot(e) for e in estimators]
    with pytest.raises(ValueError, match=names("slots")) as info:
        update_stacked_all(estimators, StackedMoments.from_batches(overflowing(at)))
    assert "overflow" in str(info.value)
    assert str(info.value).startswith(f"slots[{at}]: expected a batch whose fold")
    for estimator, state in zip(estimators, before, strict=True):
        assert_same_state(estimator.state_dict(), state)


@pytest.mark.parametrize(
    "policies", [lambda: every_strategy(nan_policy="skip"), pooled_skip], ids=["skip", "mixed"]
)
def test_a_fold_that_overflows_is_skipped_slot_by_slot(policies):
    """Each estimator meets the very batch that overflows: the pooled ones skip it (and
    count it), the others fold it, as update_moments_all slot by slot does."""
    history, x = stack(2, (4, FEATURES), seed=20), overflowing(at=1)
    estimators = fed(history, estimators=policies())
    update_stacked_all(estimators, StackedMoments.from_batches(x))
    for actual, expected in zip(
        estimators, fed([*history, *x], estimators=policies()), strict=True
    ):
        assert_like(actual, expected)
        pooled = isinstance(actual, ns.Welford | ns.ExactFullPass)
        assert actual.num_batches_skipped == int(pooled)
        assert actual.num_batches == 2 + 6 - int(pooled)


# -- bad input ---------------------------------------------------------------------------


def fed_pair():
    """A Welford and a cumulative average that have seen batches of FEATURES features."""
    return fed(stack(2, (4, FEATURES), seed=21), estimators=[ns.Welford(), ns.CumulativeAverage()])


def refused(estimators, slots, error, parameter):
    """Call update_stacked_all, expect ``error`` naming ``parameter``; return its message
    after checking that no estimator changed."""
    real = [e for e in estimators if isinstance(e, ns.Strategy)]
    before = [snapshot(e) for e in real]
    with pytest.raises(error, match=names(parameter)) as info:
        update_stacked_all(estimators, slots)
    for estimator, state in zip(real, before, strict=True):
        assert_same_state(estimator.state_dict(), state)
    assert "expected" in str(info.value)
    return str(info.value)


def good_slots(features=FEATURES, rows=4):
    return StackedMoments.from_batches(stack(3, (rows, features), seed=22))


def test_what_is_not_an_estimator_is_refused():
    welford, average = fed_pair()
    message = refused([welford, "ema", average], good_slots(), TypeError, "estimators")
    assert "normstats.Strategy instances, got str" in message
    message = refused([welford, average, welford], good_slots(), ValueError, "estimators")
    assert "distinct estimators" in message


@pytest.mark.parametrize(
    ("slots", "got"),
    [
        pytest.param(
            lambda: ns.Moments.from_array(np.ones((4, FEATURES))), "Moments", id="moments"
        ),
        pytest.param(lambda: tuple(good_slots()), "tuple", id="tuple"),
        pytest.param(lambda: np.ones((3, 4, FEATURES)), "ndarray", id="array"),
    ],
)
def test_what_is_not_stacked_moments_is_refused(slots, got):
    message = refused(fed_pair(), slots(), TypeError, "slots")
    assert f"expected StackedMoments, got {got}" in message


def test_too_few_samples_per_batch_for_one_estimator_changes_none():
    # Welford takes one sample per feature; the cumulative average needs two
    message = refused(fed_pair(), good_slots(rows=1), ValueError, "slots")
    assert "at least 2 samples per feature" in message
    assert "got 1" in message


def test_another_feature_shape_changes_none():
    estimators = [*fed_pair(), ns.EMA()]  # the new EMA would take any feature shape
    message = refused(estimators, good_slots(features=FEATURES + 1), ValueError, "slots")
    assert f"expected feature shape ({FEATURES},)" in message
    assert f"got ({FEATURES + 1},)" in message


def test_torch_slots_for_numpy_statistics_change_none(torch):
    slots = StackedMoments.from_batches(torch.ones(2, 4, FEATURES, dtype=torch.float64))
    message = refused(fed_pair(), slots, TypeError, "slots")
    assert "numpy.ndarray like the estimator's state, got torch.Tensor" in message


# -- StackedMoments.from_moments -----------------------------------------------------------


def test_from_moments_stacks_each_batchs_moments_in_order():
    x = stack(5, (4, FEATURES), offset=1e8, seed=16)
    batches = [ns.Moments.from_array(b) for b in x]
    slots = StackedMoments.from_moments(batches)
    assert slots.counts == [4] * 5
    assert slots.finite.tolist() == [True] * 5
    for k, m in enumerate(batches):
        np.testing.assert_array_equal(slots.means[k], m.mean)
        np.testing.assert_array_equal(slots.m2s[k], m.m2)
        np.testing.assert_array_equal(slots.mean_residuals[k], m.mean_residual)
    together = every_strategy()
    update_stacked_all(together, slots)
    for actual, expected in zip(together, fed(x), strict=True):
        assert_like(actual, expected)


def test_from_moments_masks_the_unchecked_moments_of_a_batch_with_nan():
    x = stack(3, (4, FEATURES), seed=17)
    x[1, 2, 0] = np.nan
    _, unchecked, _ = ns.functional.train_forward(x[1], np.ones(FEATURES), np.zeros(FEATURES))
    batches = [ns.Moments.from_array(x[0]), unchecked, ns.Moments.from_array(x[2])]
    assert StackedMoments.from_moments(batches).finite.tolist() == [True, False, True]


@pytest.mark.parametrize(
    ("moments", "error", "says"),
    [
        ([], ValueError, "at least one batch"),
        ([np.zeros(3)], TypeError, "normstats.Moments, got ndarray at index 0"),
        (
            [ns.Moments.from_array(np.ones((2, 3))), ns.Moments.from_array(np.ones((2, 4)))],
            ValueError,
            r"one feature shape \(3,\), got \(4,\) at index 1",
        ),
    ],
    ids=["none", "not-moments", "shapes"],
)
def test_from_moments_refuses_bad_input(moments, error, says):
    with pytest.raises(error, match=rf"^moments: .*{says}"):
        StackedMoments.from_moments(moments)


def test_a_fold_that_fails_leaves_every_estimator_as_it_was():
    class Failing(ns.Welford):
        def fold(self, state, slots):
            raise RuntimeError("a strategy's own fold failed")

    x = with_masked_slots()
    estimators = [
        *fed(stack(2, (4, FEATURES), seed=18), nan_policy="skip"),
        Failing(nan_policy="skip"),
    ]
    before = [snapshot(e) for e in estimators]
    with pytest.raises(RuntimeError, match="own fold failed"):
        update_stacked_all(estimators, StackedMoments.from_batches(x))
    for estimator, state in zip(estimators, before, strict=True):
        assert_same_state(estimator.state_dict(), state)  # skipped batches not counted either
