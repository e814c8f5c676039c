"""ns.Moments: reduction against NumPy, Chan's merge, exactness with a large offset."""

from __future__ import annotations

import math
import pickle
from fractions import Fraction

import attrs
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import normstats as ns
from normstats.moments import two_sum

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
    # A wrong value (a negative int) is a ValueError, a wrong type a TypeError.
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


@pytest.mark.parametrize("field", ["count", "mean", "m2", "mean_residual"])
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


# -- validated values ------------------------------------------------------------------


def valid_fields():
    return {"count": 4, "mean": np.array([1.0, 2.0]), "m2": np.array([0.5, 0.0])}


INVALID_FIELDS = [
    pytest.param({"count": -1}, ValueError, "count", id="negative-count"),
    pytest.param({"count": True}, TypeError, "count", id="bool-count"),
    pytest.param({"count": 2.0}, TypeError, "count", id="float-count"),
    pytest.param({"count": "4"}, TypeError, "count", id="str-count"),
    pytest.param({"mean": np.array([np.nan, 2.0])}, ValueError, "mean", id="nan-mean"),
    pytest.param({"mean": np.array([np.inf, 2.0])}, ValueError, "mean", id="inf-mean"),
    pytest.param({"m2": np.array([-1.0, 0.0])}, ValueError, "m2", id="negative-m2"),
    pytest.param({"m2": np.array([np.nan, 0.0])}, ValueError, "m2", id="nan-m2"),
    pytest.param({"m2": np.array([np.inf, 0.0])}, ValueError, "m2", id="inf-m2"),
    pytest.param({"m2": np.zeros(3)}, ValueError, "m2", id="m2-shape"),
    pytest.param({"mean": np.array([1, 2])}, TypeError, "mean", id="int-mean"),
    pytest.param({"m2": np.zeros(2, dtype=bool)}, TypeError, "m2", id="bool-m2"),
    pytest.param({"m2": np.zeros(2, dtype=complex)}, TypeError, "m2", id="complex-m2"),
    pytest.param({"mean": "ab"}, TypeError, "mean", id="str-mean"),
    pytest.param({"mean": None}, TypeError, "mean", id="none-mean"),
    pytest.param({"mean_residual": np.zeros(3)}, ValueError, "mean_residual", id="residual-shape"),
    pytest.param(
        {"mean_residual": np.array([np.nan, 0.0])}, ValueError, "mean_residual", id="nan-residual"
    ),
    pytest.param(
        {"mean": np.ma.array([1.0, 2.0], mask=[True, False])}, TypeError, "mean", id="masked-mean"
    ),
]


@pytest.mark.parametrize(("change", "error", "name"), INVALID_FIELDS)
def test_constructor_refuses_invalid_values_naming_the_field(change, error, name):
    # Each of these used to be accepted (a negative m2 then lowered a Welford's var).
    with pytest.raises(error, match=rf"^{name}\b") as info:
        ns.Moments(**{**valid_fields(), **change})
    assert "expected" in str(info.value)
    assert "got" in str(info.value)


@pytest.mark.parametrize(
    "count",
    [np.int64(4), np.int32(4), np.uint8(4), np.array(4)],
    ids=["int64", "int32", "uint8", "0-d"],
)
def test_numpy_integer_count_is_accepted(count):
    m = ns.Moments(count, np.zeros(2), np.ones(2))
    assert m.count == 4
    assert type(m.count) is int


def test_numbers_and_lists_become_arrays():
    m = ns.Moments(3, 1.5, 0.5)
    assert isinstance(m.mean, np.ndarray)
    assert m.mean.shape == ()
    assert m.var(ddof=1) == 0.25
    listed = ns.Moments(2, [1.0, 2.0], [0.5, 0.0])
    assert listed == ns.Moments(2, np.array([1.0, 2.0]), np.array([0.5, 0.0]))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_floating_dtypes_are_accepted(dtype):
    m = ns.Moments(2, np.ones(2, dtype=dtype), np.zeros(2, dtype=dtype))
    assert m.mean.dtype == dtype
    assert m.mean_residual.dtype == dtype


def test_mean_residual_defaults_to_zeros():
    m = ns.Moments(**valid_fields())
    assert m.mean_residual.tolist() == [0.0, 0.0]
    assert m == ns.Moments(**valid_fields(), mean_residual=np.zeros(2))
    assert m != ns.Moments(**valid_fields(), mean_residual=np.array([1e-17, 0.0]))


def test_repr_shows_every_field():
    m = ns.Moments(3, np.array([1e8]), np.array([2.0]), mean_residual=np.array([-3e-9]))
    assert repr(m) == (
        "Moments(count=3, mean=array([1.e+08]), m2=array([2.]), mean_residual=array([-3.e-09]))"
    )


def test_pickle_roundtrip_keeps_the_residual():
    m = ns.Moments.from_array(1e8 + normal((9, 2), seed=21))
    assert pickle.loads(pickle.dumps(m)) == m


def test_constructor_refuses_mixed_namespaces(torch):
    with pytest.raises(TypeError, match=r"^m2\b"):
        ns.Moments(2, torch.zeros(2, dtype=torch.float64), np.zeros(2))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_from_array_refuses_non_finite_input(value):
    # It used to return a Moments holding NaN, which then merged into everything.
    x = normal((5, 3), seed=22)
    x[2, 1] = value
    with pytest.raises(ValueError, match=r"^x\b") as info:
        ns.Moments.from_array(x)
    assert "NaN or Inf" in str(info.value)


def test_from_array_refuses_values_whose_squares_overflow():
    x = normal((5, 3), seed=23)
    x[2, 1] = 1e200
    with pytest.raises(ValueError, match=r"^x\b.*overflow"):
        ns.Moments.from_array(x)


@pytest.mark.parametrize(
    "x",
    [np.full((6, 2), 8.26583571e199), np.full((4, 2), 1.7e308), np.array([[1e308], [-1e308]] * 3)],
    ids=["squares-overflow", "sum-overflows", "opposite-extremes"],
)
@pytest.mark.parametrize("namespace", ["numpy", "torch"])
def test_values_whose_sums_or_squares_overflow_are_reduced_exactly(x, namespace):
    # The spread of the first two fits in float64, so their statistics do; such batches
    # used to be refused ("squares overflow"). The third's M2 really overflows.
    data = x if namespace == "numpy" else pytest.importorskip("torch").from_numpy(x)
    exact_means, exact_m2s = exact_mean_m2(x)
    if max(exact_m2s) > 1.7e308:
        with pytest.raises(ValueError, match=r"^x\b.*overflow"):
            ns.Moments.from_array(data)
        return
    m = ns.Moments.from_array(data)
    assert to_numpy(m.mean).tolist() == [float(e) for e in exact_means]
    assert to_numpy(m.m2).tolist() == [float(e) for e in exact_m2s]


@pytest.mark.parametrize("huge", [1.7e308, 1e200, -8.3e199])
@pytest.mark.parametrize("namespace", ["numpy", "torch"])
def test_ordinary_features_beside_huge_ones_keep_their_statistics(huge, namespace):
    # One unit for the whole batch, chosen from its largest value, made the ordinary
    # features' squares underflow: their M2 came out 0.0 (true 0.82), without an error.
    ordinary = normal((6, 3), seed=31)
    x = np.concatenate(
        [np.full((6, 1), huge), ordinary, ordinary * 1e-300, ordinary * 1e153], axis=1
    )
    data = x if namespace == "numpy" else pytest.importorskip("torch").from_numpy(x)
    m = ns.Moments.from_array(data)
    exact_means, exact_m2s = exact_mean_m2(x)
    np.testing.assert_allclose(to_numpy(m.m2), [float(e) for e in exact_m2s], rtol=1e-14)
    np.testing.assert_allclose(to_numpy(m.mean), [float(e) for e in exact_means], rtol=1e-14)
    assert to_numpy(m.m2)[1] > 0.1


def test_merge_that_overflows_raises_naming_other():
    # Two finite samples whose merged M2 exceeds float64: it used to return NaN.
    a = ns.Moments.from_array(np.full((4, 2), -1e300))
    b = ns.Moments.from_array(np.full((4, 2), 1e300))
    with pytest.raises(ValueError, match=r"^other\b.*overflow"):
        a.merge(b)
    with pytest.raises(ValueError, match=r"^other\b"):
        _ = b + a


# -- the mean's residual: merges as exact as one reduction ------------------------------


@given(
    a=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300),
    b=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300),
)
def test_two_sum_is_exact(a, b):
    s, e = two_sum(np.float64(a), np.float64(b))
    assert s == np.float64(a) + np.float64(b)
    assert Fraction(float(s)) + Fraction(float(e)) == Fraction(a) + Fraction(b)


def test_two_sum_is_exact_on_arrays(torch):
    a = np.array([1e8, 1.0, -3.0, 1e16])
    b = np.array([1e-9, 1e-17, 3.0, 1.0])
    for xp_a, xp_b in ((a, b), (torch.from_numpy(a), torch.from_numpy(b))):
        s, e = two_sum(xp_a, xp_b)
        for si, ei, ai, bi in zip(to_numpy(s), to_numpy(e), a, b, strict=True):
            assert Fraction(float(si)) + Fraction(float(ei)) == Fraction(ai) + Fraction(bi)


@pytest.mark.parametrize("offset", [1e8, 1e12, 1e15])
def test_from_array_keeps_the_digits_of_the_mean(offset):
    x = offset + np.random.default_rng(24).normal(size=(1000, 3))
    exact_means, _ = exact_mean_m2(x)
    m = ns.Moments.from_array(x)
    for mean, residual, exact in zip(m.mean, m.mean_residual, exact_means, strict=True):
        assert mean == float(exact)  # the mean rounded to float64 ...
        # ... and the residual holds what rounding left out, to far below one ulp
        assert abs(Fraction(float(mean)) + Fraction(float(residual)) - exact) < 1e-12 * np.spacing(
            offset
        )


def exact_var(x):
    _, m2s = exact_mean_m2(x)
    return [m2 / (len(x) - 1) for m2 in m2s]


@pytest.mark.parametrize("offset", [1e8, 1e9, 1e12, 1e15])
def test_chain_of_moments_is_as_exact_as_one_reduction(offset):
    # Before the residual: 1.1e-9 at 1e8, 2.0e-6 at 1e12, 5.1e-3 at 1e15 (7 batches).
    x = offset + np.random.default_rng(25).normal(size=(1000, 2))
    merged = ns.Moments(0, np.zeros(2), np.zeros(2))
    for batch in np.array_split(x, 7):
        merged = merged + ns.Moments.from_array(batch)
    assert merged.count == 1000
    assert relative_error_to_exact(merged.var(ddof=1), exact_var(x)) <= 1e-14


@given(
    seed=st.integers(0, 2**16),
    cuts=st.lists(st.integers(1, 199), max_size=12),
    offset=st.sampled_from([1e8, 1e12, -1e15]),
    left_to_right=st.booleans(),
)
def test_merges_of_any_split_are_exact(seed, cuts, offset, left_to_right):
    # The issue's bound: <= 1e-12 relative on 1e8 + N(0, 1) however split (here also at
    # 1e12 and 1e15, and merged in either order).
    x = offset + np.random.default_rng(seed).normal(size=(200, 1))
    parts = [ns.Moments.from_array(b) for b in np.split(x, sorted(set(cuts)))]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged + part if left_to_right else part + merged
    assert relative_error_to_exact(merged.var(ddof=1), exact_var(x)) <= 1e-12


def test_river_issue_732_data_is_exact():
    # river's regression data (weighted values near 100, variance 4.6e-15): a chain of
    # Moments of each weighted value gave 5.7e-8 relative error before the residual.
    data = [
        (99.99999978143265, 6),
        (99.99999989071631, 8),
        (99.99999994535816, 6),
        (99.99999997267908, 9),
        (99.99999998633952, 10),
        (99.99999999316977, 3),
        (99.99999999829245, 5),
        (99.99999999957309, 9),
    ]
    merged = ns.Moments(0, np.zeros(1), np.zeros(1))
    for value, weight in data:
        merged = merged + ns.Moments.from_array(np.full((weight, 1), value))
    union = np.concatenate([np.full((weight, 1), value) for value, weight in data])
    assert relative_error_to_exact(merged.var(ddof=1), exact_var(union)) <= 1e-15


def test_torch_chain_of_moments_is_exact(torch):
    x = 1e12 + np.random.default_rng(26).normal(size=(300, 2))
    merged = ns.Moments(0, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    for batch in np.array_split(x, 5):
        merged = merged + ns.Moments.from_array(torch.from_numpy(batch))
    assert isinstance(merged.mean_residual, torch.Tensor)
    assert relative_error_to_exact(merged.var(ddof=1), exact_var(x)) <= 1e-14
