"""The pure BatchNorm functions against independent references.

``train_forward`` / ``backward`` against ``torch.nn.functional.batch_norm(training=True)``
and autograd in float64, and against central finite differences; the batch moments against
NumPy; ``eval_forward`` against the formula written out in NumPy.

Tolerances are relative to the largest magnitude of the reference array (an elementwise
relative error would divide by outputs and gradients that are close to zero).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from normstats import functional

from .helpers import finite_difference

EPS = 1e-5
TORCH_RTOL = 1e-7
FD_RTOL = 1e-5

SHAPES = [(16, 3), (6, 3, 5), (4, 3, 5, 6), (3, 3, 4, 5, 2)]
SHAPE_IDS = ["N,C", "N,C,L", "N,C,H,W", "N,C,D,H,W"]


def assert_close(actual, reference, rtol):
    """``|actual - reference| <= rtol * max|reference|`` elementwise, and the same shape."""
    actual, reference = np.asarray(actual), np.asarray(reference)
    assert actual.shape == reference.shape
    scale = float(np.max(np.abs(reference)))
    np.testing.assert_allclose(actual, reference, rtol=rtol, atol=rtol * scale)


def assert_gradients_close(found, reference, affine, rtol=TORCH_RTOL):
    """``(y, dx, dgamma, dbeta)`` against the autograd reference; no parameter gradients
    without ``affine``."""
    y, dx, dgamma, dbeta = found
    y_ref, dx_ref, dgamma_ref, dbeta_ref = reference
    assert_close(y, y_ref, rtol)
    assert_close(dx, dx_ref, rtol)
    if affine:
        assert_close(dgamma, dgamma_ref, rtol)
        assert_close(dbeta, dbeta_ref, rtol)
    else:
        assert dgamma is None
        assert dbeta is None


def channels_last(shape):
    """The same sizes with the channel axis (1) moved to the end."""
    return (shape[0], *shape[2:], shape[1])


def make_case(shape, axis, affine, seed=0):
    """Input (channels on ``axis``), per-channel gamma/beta (or None) and a loss weight."""
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    x = rng.normal(1.5, 2.0, size=shape) + rng.normal(0.0, 3.0, size=channels).reshape(
        [channels if i == axis % len(shape) else 1 for i in range(len(shape))]
    )
    gamma = rng.uniform(0.5, 2.0, size=channels) if affine else None
    beta = rng.normal(0.0, 1.0, size=channels) if affine else None
    w = rng.normal(size=shape)
    return x, gamma, beta, w


def torch_reference(torch, x, gamma, beta, w, axis, eps=EPS):
    """y, dx, dgamma, dbeta of ``sum(w * batch_norm(x))`` with torch autograd in float64."""
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    gt = None if gamma is None else torch.tensor(gamma, requires_grad=True)
    bt = None if beta is None else torch.tensor(beta, requires_grad=True)
    channels_first = xt if axis == 1 else xt.movedim(axis, 1)
    y = torch.nn.functional.batch_norm(channels_first, None, None, gt, bt, training=True, eps=eps)
    y = y if axis == 1 else y.movedim(1, axis)
    (y * torch.tensor(w)).sum().backward()
    grads = [None if t is None else t.grad.numpy() for t in (gt, bt)]
    return y.detach().numpy(), xt.grad.numpy(), *grads


def reduced(shape, axis):
    ndim = len(shape)
    return tuple(i for i in range(ndim) if i != axis % ndim)


# -- training forward and backward against torch ---------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", ["channels-first", "channels-last"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_train_forward_and_backward_match_torch(torch, shape, layout, affine):
    axis = 1 if layout == "channels-first" else -1
    if axis == -1:
        shape = channels_last(shape)
    x, gamma, beta, w = make_case(shape, axis, affine)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = torch_reference(torch, x, gamma, beta, w, axis)

    y, _, cache = functional.train_forward(x, gamma, beta, axis=axis, eps=EPS)
    dx, dgamma, dbeta = functional.backward(w, cache)

    assert y.dtype == np.float64
    assert_gradients_close((y, dx, dgamma, dbeta), (y_ref, dx_ref, dgamma_ref, dbeta_ref), affine)


@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_train_forward_returns_batch_moments(shape, axis):
    if axis == -1:
        shape = channels_last(shape)
    x, gamma, beta, _ = make_case(shape, axis, affine=True, seed=1)
    _, moments, _ = functional.train_forward(x, gamma, beta, axis=axis)
    axes = reduced(shape, axis)
    count = math.prod(shape[i] for i in axes)
    assert moments.count == count
    np.testing.assert_allclose(moments.mean, np.mean(x, axis=axes), rtol=1e-12, atol=0)
    np.testing.assert_allclose(moments.m2, np.var(x, axis=axes, ddof=0) * count, rtol=1e-12)
    np.testing.assert_allclose(moments.var(ddof=1), np.var(x, axis=axes, ddof=1), rtol=1e-12)


def test_train_forward_normalizes_each_channel():
    x, _, _, _ = make_case((32, 4, 3, 3), 1, affine=False, seed=2)
    y, _, _ = functional.train_forward(x, eps=0.0)
    axes = (0, 2, 3)
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=axes), 1.0, rtol=1e-12)


# -- backward against central finite differences ---------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis"), [((5, 3), 1), ((4, 2, 3), 1), ((3, 2, 2, 2), -1)], ids=str
)
def test_backward_matches_finite_differences(shape, axis):
    x, gamma, beta, w = make_case(shape, axis, affine=True, seed=3)

    def loss():
        return float(np.sum(w * functional.train_forward(x, gamma, beta, axis=axis, eps=EPS)[0]))

    _, _, cache = functional.train_forward(x, gamma, beta, axis=axis, eps=EPS)
    dx, dgamma, dbeta = functional.backward(w, cache)
    assert_close(dx, finite_difference(loss, x), FD_RTOL)
    assert_close(dgamma, finite_difference(loss, gamma), FD_RTOL)
    assert_close(dbeta, finite_difference(loss, beta), FD_RTOL)


def test_backward_without_affine_matches_finite_differences():
    x, _, _, w = make_case((6, 2, 3), 1, affine=False, seed=4)

    def loss():
        return float(np.sum(w * functional.train_forward(x, axis=1, eps=EPS)[0]))

    dx, _, _ = functional.backward(w, functional.train_forward(x, axis=1, eps=EPS)[2])
    assert_close(dx, finite_difference(loss, x), FD_RTOL)


def test_gradient_of_the_sum_of_outputs_is_zero():
    # sum(y) = sum(beta) whatever x is: the input gradient of that loss vanishes exactly.
    x, gamma, beta, _ = make_case((8, 3, 2), 1, affine=True, seed=5)
    _, _, cache = functional.train_forward(x, gamma, beta)
    dx, dgamma, dbeta = functional.backward(np.ones_like(x), cache)
    np.testing.assert_allclose(dx, 0.0, atol=1e-12)
    np.testing.assert_allclose(dgamma, 0.0, atol=1e-12)
    np.testing.assert_allclose(dbeta, np.full(3, 16.0), rtol=1e-15)


# -- inference forward -------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [((7, 3), 1), ((5, 3, 4), 1), ((4, 3, 2, 5), 1), ((4, 2, 5, 3), -1), ((2, 3, 2, 2, 2), 1)],
    ids=str,
)
def test_eval_forward_is_the_formula(shape, axis, affine):
    x, gamma, beta, _ = make_case(shape, axis, affine=affine, seed=6)
    rng = np.random.default_rng(7)
    channels = shape[axis]
    mean = rng.normal(size=channels)
    var = rng.uniform(0.1, 4.0, size=channels)
    y = functional.eval_forward(x, mean, var, gamma, beta, axis=axis, eps=EPS)

    # Per-channel vectors broadcast against x when put on the channel axis.
    along = [channels if i == axis % len(shape) else 1 for i in range(len(shape))]
    expected = (x - mean.reshape(along)) / np.sqrt(var.reshape(along) + EPS)
    if affine:
        expected = gamma.reshape(along) * expected + beta.reshape(along)
    np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-13)


def test_eval_forward_accepts_scalar_statistics():
    x = np.random.default_rng(8).normal(size=(4, 3))
    y = functional.eval_forward(x, 0.5, 2.0, eps=0.0)
    np.testing.assert_allclose(y, (x - 0.5) / np.sqrt(2.0), rtol=1e-15)


def test_eval_forward_accepts_one_value_per_feature():
    # Only training needs more than one value per feature.
    x = np.array([[1.0, 2.0]])
    y = functional.eval_forward(x, np.array([0.0, 1.0]), np.array([4.0, 1.0]), eps=0.0)
    np.testing.assert_allclose(y, [[0.5, 1.0]])


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1), (1, 3, 1, 1, 1)], ids=str)
def test_one_value_per_feature_raises(shape):
    x = np.random.default_rng(9).normal(size=shape)
    with pytest.raises(ValueError, match=r"^x: .*1 value per feature"):
        functional.train_forward(x)


def test_one_value_per_feature_channels_last_raises():
    with pytest.raises(ValueError, match=r"^x: "):
        functional.train_forward(np.ones((1, 1, 1, 3)), axis=-1)


@pytest.mark.parametrize(
    "function",
    [functional.train_forward, lambda x: functional.eval_forward(x, 0.0, 1.0)],
    ids=["train", "eval"],
)
@pytest.mark.parametrize("x", [np.arange(4.0), np.float64(1.0)], ids=["1-d", "0-d"])
def test_input_without_feature_axis_raises(function, x):
    with pytest.raises(ValueError, match=r"^x: expected .*got [01] dimension"):
        function(x)


@pytest.mark.parametrize(
    "dy_shape", [(8, 3, 3), (8, 3), (3, 8, 2), (9, 3, 2)], ids=["extra-axis", "2-d", "T", "N+1"]
)
def test_dy_of_another_shape_raises(dy_shape):
    x = np.random.default_rng(10).normal(size=(8, 3, 2))
    _, _, cache = functional.train_forward(x, np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"^dy: expected .*\(8, 3, 2\).*got"):
        functional.backward(np.ones(dy_shape), cache)


def test_integer_input_raises_type_error():
    with pytest.raises(TypeError, match=r"x"):
        functional.train_forward(np.arange(12).reshape(4, 3))


# -- dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["float32-affine", "plain"])
@pytest.mark.parametrize("axis", [1, -1])
def test_float32_input_gives_float32_output(affine, axis):
    x64, gamma, beta, w = make_case((16, 3, 4), axis, affine=affine, seed=11)
    x = x64.astype(np.float32)
    gamma32 = None if gamma is None else gamma.astype(np.float32)
    beta32 = None if beta is None else beta.astype(np.float32)

    y, moments, cache = functional.train_forward(x, gamma32, beta32, axis=axis)
    dx, _, _ = functional.backward(w.astype(np.float32), cache)
    assert y.dtype == np.float32
    assert dx.dtype == np.float32
    # Statistics are accumulated in float64, whatever the input.
    assert moments.mean.dtype == np.float64

    y64, _, cache64 = functional.train_forward(x.astype(np.float64), gamma, beta, axis=axis)
    dx64, _, _ = functional.backward(w, cache64)
    assert_close(y, y64, 1e-5)
    assert_close(dx, dx64, 1e-4)

    mean, var = moments.mean, moments.var(ddof=1)
    y_eval = functional.eval_forward(x, mean, var, gamma32, beta32, axis=axis)
    assert y_eval.dtype == np.float32


def test_float32_input_with_float64_parameters_promotes():
    x = np.random.default_rng(12).normal(size=(8, 2)).astype(np.float32)
    y, _, _ = functional.train_forward(x, np.ones(2), np.zeros(2))
    assert y.dtype == np.float64
