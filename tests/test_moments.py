"""ns.Moments: reduction against NumPy, Chan's merge, exactness with a large offset."""

from __future__ import annotations

import math
from fractions import Fraction

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normstats as ns

from .helpers import exact_mean_m2, max_relative_error, relative_error_to_exact, to_numpy

RTOL = 1e-12


def normal(shape: tuple[int, ...], seed: int = 0, loc: float = 3.0, scale: float = 2.0):
    return np.random.default_rng(seed).normal(loc, scale, size=shape)


# -- reduction ---------------------------------------------------------------------------


def test_from_array_axis0_matches_numpy():
    x = normal((50, 4))
    m = ns.Moments.from_array(x)
    assert m.count == 50
    assert m.feature_shape == (4,)
    np.testing.assert_allclose(m.mean, np.mean(x, axis=0), rtol=RTOL)
    np.testing.assert_allclose(m.var(), np.var(x, axis=0), rtol=RTOL)
    np.testing.assert_allclose(m.var(ddof=1), np.var(x, axis=0, ddof=1), rtol=RTOL)
    np.testing.assert_allclose(m.m2, np.var(x, axis=0) * 50, rtol=RTOL)


def test_default_axis_is_zero():
    x = normal((6, 3))
    assert ns.Moments.from_array(x) == ns.Moments.from_array(x, axis=0)


@pytest.mark.parametrize(
    "axis",
    [0, 1, -1, -2, (0,), (0, 2, 3), (0, -2, -1), (3, 0, 2), (1, 3), (0, 1, 2, 3)],
)
def test_from_array_axes_match_numpy(axis):
    x = normal((4, 3, 5, 6), seed=1)
    m = ns.Moments.from_array(x, axis=axis)
    axes = axis if isinstance(axis, tuple) else (axis,)
    expected_count = math.prod(x.shape[a] for a in axes)
    assert m.count == expected_count
    assert m.feature_shape == np.mean(x, axis=axis).shape
    np.testing.assert_allclose(m.mean, np.mean(x, axis=axis), rtol=RTOL)
    np.testing.assert_allclose(m.var(ddof=1), np.var(x, axis=axis, ddof=1), rtol=RTOL)


def test_nchw_reduction_gives_per_channel_statistics():
    x = normal((8, 3, 4, 5), seed=2)
    per_channel = x.transpose(1, 0, 2, 3).reshape(3, -1)
    m = ns.Moments.from_array(x, axis=(0, 2, 3))
    assert m.count == 8 * 4 * 5
    np.testing.assert_allclose(m.mean, per_channel.mean(axis=1), rtol=RTOL)
    np.testing.assert_allclose(m.var(), per_channel.var(axis=1), rtol=RTOL)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_low_precision_input_gives_float64_statistics(dtype):
    x = normal((64, 3), seed=3).astype(dtype)
    m = ns.Moments.from_array(x)
    assert m.mean.dtype == np.float64
    assert m.m2.dtype == np.float64
    exact = x.astype(np.float64)  # the float16/float32 values, exactly
    np.testing.assert_allclose(m.mean, exact.mean(axis=0), rtol=RTOL)
    np.testing.assert_allclose(m.var(ddof=1), exact.var(axis=0, ddof=1), rtol=RTOL)


# -- merge ---------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**16),
    sizes=st.lists(st.integers(1, 20), min_size=2, max_size=5),
    offset=st.sampled_from([0.0, -7.5, 1e3]),
)
def test_merge_equals_moments_of_concatenation(seed, sizes, offset):
    parts = [normal((n, 3), seed=seed + i, loc=offset + i) for i, n in enumerate(sizes)]
    union = np.concatenate(parts)
    merged = ns.Moments.from_array(parts[0])
    for part in parts[1:]:
        merged = merged.merge(ns.Moments.from_array(part))
    assert merged.count == len(union)
    np.testing.assert_allclose(merged.mean, union.mean(axis=0), rtol=RTOL)
    np.testing.assert_allclose(merged.var(ddof=1), union.var(axis=0, ddof=1), rtol=RTOL)
    direct = ns.Moments.from_array(union)
    np.testing.assert_allclose(merged.m2, direct.m2, rtol=RTOL)


def test_plus_operator_is_merge():
    a = ns.Moments.from_array(normal((5, 2), seed=4))
    b = ns.Moments.from_array(normal((9, 2), seed=5, loc=-1.0))
    assert a + b == a.merge(b)
    union = np.concatenate([normal((5, 2), seed=4), normal((9, 2), seed=5, loc=-1.0)])
    np.testing.assert_allclose((a + b).var(ddof=1), union.var(axis=0, ddof=1), rtol=RTOL)


def test_merge_with_exact_values():
    # [1, 2] and [4, 5, 6]: union mean 3.6, M2 = 6.64 + 1.6... computed by hand in fractions
    a = ns.Moments.from_array(np.array([[1.0], [2.0]]))
    b = ns.Moments.from_array(np.array([[4.0], [5.0], [6.0]]))
    values = [Fraction(v) for v in (1, 2, 4, 5, 6)]
    mean = sum(values) / 5
    m2 = sum((v - mean) ** 2 for v in values)
    merged = a + b
    assert merged.count == 5
    assert merged.mean[0] == pytest.approx(float(mean), rel=1e-15)
    assert merged.m2[0] == pytest.approx(float(m2), rel=1e-15)


def test_count_zero_is_identity_on_either_side():
    m = ns.Moments.from_array(normal((7, 3), seed=6))
    zero = ns.Moments(count=0, mean=np.zeros(3), m2=np.zeros(3))
    assert m + zero == m
    assert zero + m == m
    assert m.merge(zero) == m
    assert zero.merge(m) == m
    assert (zero + zero).count == 0


def test_merge_refuses_other_feature_shape():
    a = ns.Moments.from_array(normal((4, 3)))
    b = ns.Moments.from_array(normal((4, 2)))
    with pytest.raises(ValueError, match="other"):
        a.merge(b)


def test_merge_refuses_non_moments():
    a = ns.Moments.from_array(normal((4, 3)))
    with pytest.raises(TypeError, match="other"):
        a.merge(np.zeros(3))
    with pytest.raises(TypeError):
        _ = a + 1.0


# -- var(ddof) ----------------------------------------------------------------------


@pytest.mark.parametrize("ddof", [0, 1, 2])
def test_var_ddof_matches_numpy(ddof):
    x = normal((11, 4), seed=7)
    m = ns.Moments.from_array(x)
    np.testing.assert_allclose(m.var(ddof=ddof), np.var(x, axis=0, ddof=ddof), rtol=RTOL)


@pytest.mark.parametrize(("rows", "ddof"), [(1, 1), (2, 2), (3, 5)])
def test_var_with_count_at_most_ddof_raises(rows, ddof):
    m = ns.Moments.from_array(normal((rows, 2)))
    with pytest.raises(ValueError, match="ddof"):
        m.var(ddof=ddof)


def test_var_of_empty_moments_raises():
    zero = ns.Moments(count=0, mean=np.zeros(2), m2=np.zeros(2))
    with pytest.raises(ValueError, match="ddof"):
        zero.var()


def test_single_sample_has_zero_biased_variance():
    m = ns.Moments.from_array(np.array([[1.5, -2.0]]))
    assert m.count == 1
    assert m.mean.tolist() == [1.5, -2.0]
    assert m.var(ddof=0).tolist() == [0.0, 0.0]


# -- torch ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ["float64", "float32", "float16", "bfloat16"])
def test_torch_input_stays_torch_float64(torch, torch_device, dtype_name):
    dtype = getattr(torch, dtype_name)
    x = torch.randn(16, 3, 2, 2, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = x.to(torch_device)
    m = ns.Moments.from_array(x, axis=(0, 2, 3))
    for value in (m.mean, m.m2, m.var(ddof=1)):
        assert isinstance(value, torch.Tensor)
        assert value.dtype == torch.float64
        assert value.device == x.device
    exact = to_numpy(x.to(torch.float64))  # the low-precision values, exactly
    np.testing.assert_allclose(to_numpy(m.mean), exact.mean(axis=(0, 2, 3)), rtol=RTOL)
    np.testing.assert_allclose(
        to_numpy(m.var(ddof=1)), exact.var(axis=(0, 2, 3), ddof=1), rtol=RTOL
    )


def test_torch_merge_matches_numpy(torch):
    x = normal((30, 4), seed=8)
    parts = np.split(x, [7, 19])
    merged = ns.Moments.from_array(torch.from_numpy(parts[0]))
    for part in parts[1:]:
        merged = merged + ns.Moments.from_array(torch.from_numpy(part))
    assert isinstance(merged.mean, torch.Tensor)
    np.testing.assert_allclose(to_numpy(merged.mean), x.mean(axis=0), rtol=RTOL)
    np.testing.assert_allclose(to_numpy(merged.var(ddof=1)), x.var(axis=0, ddof=1), rtol=RTOL)


# -- a large offset ------------------------------------------------------------------


def test_large_offset_float64_is_exact_where_naive_formula_fails():
    x = 1e8 + np.random.default_rng(9).normal(size=(1000, 3))
    exact_means, exact_m2s = exact_mean_m2(x)
    exact_var = [m2 / (len(x) - 1) for m2 in exact_m2s]

    m = ns.Moments.from_array(x)
    assert relative_error_to_exact(m.var(ddof=1), exact_var) <= 1e-12
    assert relative_error_to_exact(m.mean, exact_means) <= 1e-15

    # The textbook one-pass formula loses every digit on these data: the test is meaningful.
    n = len(x)
    naive = (np.sum(x * x, axis=0) - np.sum(x, axis=0) ** 2 / n) / (n - 1)
    assert relative_error_to_exact(naive, exact_var) > 1e-3


def test_large_offset_float32_input_against_exact_reference():
    x = (1e4 + np.random.default_rng(10).normal(size=(500, 3))).astype(np.float32)
    exact_means, exact_m2s = exact_mean_m2(x)  # of the float32 values themselves
    m = ns.Moments.from_array(x)
    assert m.m2.dtype == np.float64
    assert relative_error_to_exact(m.var(ddof=1), [v / 499 for v in exact_m2s]) <= 1e-12
    assert relative_error_to_exact(m.mean, exact_means) <= 1e-15


def test_large_offset_torch_float64(torch):
    x = 1e8 + np.random.default_rng(11).normal(size=(400, 2))
    _, exact_m2s = exact_mean_m2(x)
    m = ns.Moments.from_array(torch.from_numpy(x))
    assert relative_error_to_exact(m.var(ddof=1), [v / 399 for v in exact_m2s]) <= 1e-12


# -- the value type ------------------------------------------------------------------


def test_equality():
    x = normal((6, 2), seed=12)
    a = ns.Moments.from_array(x)
    b = ns.Moments.from_array(x.copy())
    assert a == b
    assert (a != b) is False
    assert a != ns.Moments(count=a.count + 1, mean=a.mean, m2=a.m2)
    assert a != ns.Moments(count=a.count, mean=a.mean + 1.0, m2=a.m2)
    assert a != ns.Moments(count=a.count, mean=a.mean, m2=a.m2 * 2.0)
    assert a != ns.Moments.from_array(x[:, :1])  # another feature shape


def test_equality_of_torch_moments(torch):
    x = normal((6, 2), seed=13)
    assert ns.Moments.from_array(torch.from_numpy(x)) == ns.Moments.from_array(
        torch.from_numpy(x.copy())
    )


def test_constructor_records_fields():
    m = ns.Moments(count=3, mean=np.array([1.0, 2.0]), m2=np.array([0.5, 0.0]))
    assert m.count == 3
    assert m.feature_shape == (2,)
    np.testing.assert_array_equal(m.var(ddof=1), [0.25, 0.0])


def test_constructor_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="m2"):
        ns.Moments(count=3, mean=np.zeros(2), m2=np.zeros(3))


def test_constructor_refuses_negative_count():
    # DESIGN 3.3: a wrong value (a negative int) is a ValueError, a wrong type a TypeError.
    with pytest.raises(ValueError, match="count"):
        ns.Moments(count=-1, mean=np.zeros(2), m2=np.zeros(2))


def test_constructor_refuses_non_integer_count():
    with pytest.raises(TypeError, match="count"):
        ns.Moments(count=2.5, mean=np.zeros(2), m2=np.zeros(2))


@pytest.mark.parametrize(
    "x",
    [
        np.arange(6).reshape(3, 2),
        np.ones((3, 2), dtype=bool),
        np.ones((3, 2), dtype=np.complex128),
        [[1, 2], [3, 4]],
        "abc",
    ],
    ids=["int64", "bool", "complex", "int-list", "str"],
)
def test_non_floating_input_raises_type_error_naming_x(x):
    with pytest.raises(TypeError, match=r"^x\b") as info:
        ns.Moments.from_array(x)
    assert "expected" in str(info.value)


def test_non_floating_torch_input_raises_type_error(torch):
    with pytest.raises(TypeError, match=r"^x\b"):
        ns.Moments.from_array(torch.arange(6).reshape(3, 2))


def test_list_of_floats_is_accepted():
    m = ns.Moments.from_array([[1.0, 2.0], [3.0, 6.0]])
    assert m.count == 2
    np.testing.assert_array_equal(m.mean, [2.0, 4.0])


@pytest.mark.parametrize("field", ["count", "mean", "m2"])
def test_frozen(field):
    m = ns.Moments.from_array(normal((4, 2)))
    with pytest.raises(AttributeError):
        setattr(m, field, 0)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        setattr(m, field, 0)


def test_relative_error_helper_is_sane():
    # Guard the reference helper itself: a 1-ulp perturbation is seen, an exact value is not.
    exact = [Fraction(1, 3)]
    assert relative_error_to_exact(np.array([1 / 3]), exact) < 2e-16
    assert relative_error_to_exact(np.array([1 / 3 * (1 + 1e-10)]), exact) > 9e-11
    assert max_relative_error(np.array([2.0]), np.array([1.0])) == 1.0


# -- ndarray subclasses, empty batches ------------------------------------------------


def test_masked_array_is_refused_with_what_to_pass_instead():
    # Masked entries used to be summed as 0 but counted: the mean of [1, 2, (masked 100)]
    # came out as 1.0, neither the masked mean 1.5 nor the raw one 34.3.
    x = np.ma.array([[1.0], [2.0], [100.0]], mask=[[False], [False], [True]])
    with pytest.raises(TypeError, match=r"^x\b") as info:
        ns.Moments.from_array(x)
    message = str(info.value)
    assert "masked array" in message
    assert "compress_rows" in message
    # what it suggests gives the statistics of the unmasked samples
    m = ns.Moments.from_array(np.ma.compress_rows(x))
    assert m.count == 2
    assert m.mean.tolist() == [1.5]


def test_masked_array_without_masked_entries_is_refused_too():
    with pytest.raises(TypeError, match="masked"):
        ns.Moments.from_array(np.ma.array(normal((4, 2))))


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_matrix_input_gives_numpy_statistics():
    # np.matrix used to reach a matrix product meant for plain arrays and raise.
    x = np.matrix(normal((7, 3), seed=20))
    plain = np.asarray(x)
    m = ns.Moments.from_array(x)
    assert type(m.mean) is np.ndarray
    assert m.feature_shape == (3,)
    np.testing.assert_allclose(m.mean, np.mean(plain, axis=0), rtol=RTOL)
    np.testing.assert_allclose(m.var(ddof=1), np.var(plain, axis=0, ddof=1), rtol=RTOL)
    m1 = ns.Moments.from_array(x, axis=1)
    np.testing.assert_allclose(m1.mean, np.mean(plain, axis=1), rtol=RTOL)


def test_from_array_of_empty_batch_is_the_identity():
    # It used to raise "cannot reshape array of size 0", naming no parameter.
    m = ns.Moments.from_array(np.zeros((0, 3)))
    assert m.count == 0
    a = ns.Moments.from_array(normal((4, 3)))
    assert m + a == a
