"""Ghost BatchNorm in the engine against independent references.

``ghost_forward`` / ``backward`` against torch autograd in float64 over separately
normalized chunks (``torch.split`` and ``torch.nn.functional.batch_norm``) and against
central finite differences; the pooled moments against NumPy over the whole batch; the
layer ``ns.BatchNorm(virtual_batch_size=...)``'s strategy against the same strategy fed
the whole batches.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import normstats as ns
from normstats import functional

from .helpers import assert_same_state, finite_difference, snapshot
from .test_functional import assert_close, assert_gradients_close, channels_last, make_case, reduced

EPS = 1e-5
TORCH_RTOL = 1e-7
FD_RTOL = 1e-5
C = 3

CASES = [
    # (shape channels-first, virtual batch size): multiples, remainders, one virtual batch
    ((16, C), 4),
    ((16, C), 6),  # 6 + 6 + 4
    ((16, C), 16),
    ((7, C, 5), 2),  # 2 + 2 + 2 + 1: the last virtual batch has one sample, 5 values
    ((6, C, 5), 4),  # 4 + 2
    ((5, C, 4, 3), 2),  # 2 + 2 + 1
    ((4, C, 4, 3), 1),  # every sample on its own (instance-like statistics over H, W)
]


def case_id(case):
    shape, size = case
    return f"{'x'.join(map(str, shape))}/v{size}"


def torch_ghost(torch, x, gamma, beta, w, axis, size, eps=EPS):
    """y, dx, dgamma, dbeta of ``sum(w * y)``, with y each chunk of ``size`` samples along
    axis 0 normalized on its own by torch's batch_norm (autograd in float64)."""
    xt = torch.tensor(x, requires_grad=True)
    gt = None if gamma is None else torch.tensor(gamma, requires_grad=True)
    bt = None if beta is None else torch.tensor(beta, requires_grad=True)
    chunks = []
    for chunk in torch.split(xt, size, dim=0):
        chunk = chunk.movedim(axis, 1)
        y = torch.nn.functional.batch_norm(chunk, None, None, gt, bt, training=True, eps=eps)
        chunks.append(y.movedim(1, axis))
    y = torch.cat(chunks, dim=0)
    (y * torch.tensor(w)).sum().backward()
    grads = [None if t is None else t.grad.numpy() for t in (gt, bt)]
    return y.detach().numpy(), xt.grad.numpy(), *grads


def virtual_sizes(n, size):
    """The documented rule, written out: full virtual batches, then the remainder."""
    return [size] * (n // size) + ([n % size] if n % size else [])


# -- functional ---------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", ["channels-first", "channels-last"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_ghost_forward_and_backward_match_torch(torch, case, layout, affine):
    shape, size = case
    axis = 1 if layout == "channels-first" else -1
    if axis == -1:
        shape = channels_last(shape)
    x, gamma, beta, w = make_case(shape, axis, affine, seed=40)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = torch_ghost(torch, x, gamma, beta, w, axis, size)

    y, moments, cache = functional.ghost_forward(
        x, gamma, beta, virtual_batch_size=size, axis=axis, eps=EPS
    )
    dx, dgamma, dbeta = functional.backward(w, cache)

    assert y.dtype == np.float64
    assert_gradients_close((y, dx, dgamma, dbeta), (y_ref, dx_ref, dgamma_ref, dbeta_ref), affine)
    # the moments are the whole batch's
    axes = reduced(shape, axis)
    assert moments.count == math.prod(shape[i] for i in axes)
    np.testing.assert_allclose(moments.mean, x.mean(axis=axes), rtol=1e-13)
    np.testing.assert_allclose(moments.var(ddof=1), x.var(axis=axes, ddof=1), rtol=1e-13)


@pytest.mark.parametrize("case", CASES[1::2], ids=case_id)
def test_ghost_backward_matches_finite_differences(case):
    shape, size = case
    x, gamma, beta, w = make_case(shape, 1, affine=True, seed=41)

    def loss():
        y, _, _ = functional.ghost_forward(x, gamma, beta, virtual_batch_size=size, eps=EPS)
        return float(np.sum(w * y))

    _, _, cache = functional.ghost_forward(x, gamma, beta, virtual_batch_size=size, eps=EPS)
    dx, dgamma, dbeta = functional.backward(w, cache)
    assert_close(dx, finite_difference(loss, x), FD_RTOL)
    assert_close(dgamma, finite_difference(loss, gamma), FD_RTOL)
    assert_close(dbeta, finite_difference(loss, beta), FD_RTOL)


@pytest.mark.parametrize(("n", "size"), [(10, 4), (9, 3), (7, 5), (3, 2)])
def test_the_remainder_is_the_last_virtual_batch(n, size):
    x, gamma, beta, w = make_case((n, C, 2), 1, affine=True, seed=42)
    y, _, cache = functional.ghost_forward(x, gamma, beta, virtual_batch_size=size, eps=EPS)
    dx, dgamma, dbeta = functional.backward(w, cache)
    start, dgamma_sum, dbeta_sum = 0, np.zeros(C), np.zeros(C)
    for k in virtual_sizes(n, size):
        part = slice(start, start + k)
        y_part, _, part_cache = functional.train_forward(x[part], gamma, beta, eps=EPS)
        np.testing.assert_array_equal(y[part], y_part)
        dx_part, dgamma_part, dbeta_part = functional.backward(w[part], part_cache)
        np.testing.assert_array_equal(dx[part], dx_part)
        dgamma_sum += dgamma_part
        dbeta_sum += dbeta_part
        start += k
    assert start == n
    np.testing.assert_allclose(dgamma, dgamma_sum, rtol=1e-15)
    np.testing.assert_allclose(dbeta, dbeta_sum, rtol=1e-15)


@pytest.mark.parametrize("size", [8, 9, 1000])
def test_one_virtual_batch_is_batch_normalization(size):
    x, gamma, beta, w = make_case((8, C, 3), 1, affine=True, seed=43)
    y, moments, cache = functional.ghost_forward(x, gamma, beta, virtual_batch_size=size)
    y_bn, moments_bn, cache_bn = functional.train_forward(x, gamma, beta)
    np.testing.assert_array_equal(y, y_bn)
    assert moments == moments_bn
    got, expected = functional.backward(w, cache), functional.backward(w, cache_bn)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pooled_moments_are_exact_far_from_zero():
    # Chan's merge of the virtual batches keeps the digits a sum of squares would lose.
    rng = np.random.default_rng(44)
    x = 1e8 + rng.normal(size=(12, 2))
    _, moments, _ = functional.ghost_forward(x, virtual_batch_size=5)
    reference = ns.Moments.from_array(x, axis=0)
    np.testing.assert_allclose(moments.mean + moments.mean_residual, reference.mean, rtol=1e-15)
    np.testing.assert_allclose(moments.m2, reference.m2, rtol=1e-12)


def test_float32_input_gives_float32_output():
    x64, gamma, beta, w = make_case((12, C, 4), 1, affine=True, seed=45)
    x, g32, b32 = x64.astype(np.float32), gamma.astype(np.float32), beta.astype(np.float32)
    y, moments, cache = functional.ghost_forward(x, g32, b32, virtual_batch_size=5)
    dx, _, _ = functional.backward(w.astype(np.float32), cache)
    assert y.dtype == np.float32
    assert dx.dtype == np.float32
    assert moments.mean.dtype == np.float64
    y64, _, cache64 = functional.ghost_forward(x64, gamma, beta, virtual_batch_size=5)
    assert_close(y, y64, 1e-5)
    assert_close(dx, functional.backward(w, cache64)[0], 1e-4)


def test_a_non_finite_virtual_batch_gives_non_finite_pooled_moments():
    x = make_case((8, C), 1, affine=False, seed=46)[0]
    x[6, 2] = np.inf
    y, moments, _ = functional.ghost_forward(x, virtual_batch_size=4)
    assert moments.count == 8
    assert not np.isfinite(moments.m2[2])
    assert np.isfinite(y[:4]).all()  # the other virtual batch is unaffected


@pytest.mark.parametrize(
    ("shape", "size"), [((5, C), 2), ((3, C), 2), ((4, C), 1), ((1, C), 4), ((0, C), 4)]
)
def test_a_virtual_batch_with_one_value_per_feature_raises(shape, size):
    with pytest.raises(ValueError, match=r"^x: expected more than 1 value per feature in every"):
        functional.ghost_forward(np.ones(shape), virtual_batch_size=size)


@pytest.mark.parametrize(
    ("size", "error"),
    [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError), (None, TypeError)],
)
def test_bad_virtual_batch_size_raises(size, error):
    with pytest.raises(error, match=r"^virtual_batch_size: "):
        functional.ghost_forward(np.ones((8, C)), virtual_batch_size=size)


def test_virtual_batch_size_accepts_numpy_integers():
    x = make_case((8, C), 1, affine=False, seed=47)[0]
    y, _, _ = functional.ghost_forward(x, virtual_batch_size=np.int64(4))
    np.testing.assert_array_equal(y, functional.ghost_forward(x, virtual_batch_size=4)[0])


def test_feature_axis_0_raises():
    with pytest.raises(ValueError, match=r"^axis: expected a feature axis other than 0"):
        functional.ghost_forward(np.ones((C, 8)), virtual_batch_size=4, axis=0)


def test_dy_of_another_shape_raises():
    x = make_case((8, C, 2), 1, affine=True, seed=48)[0]
    _, _, cache = functional.ghost_forward(x, np.ones(C), np.zeros(C), virtual_batch_size=3)
    with pytest.raises(ValueError, match=r"^dy: expected .*\(8, 3, 2\).*got \(9, 3, 2\)"):
        functional.backward(np.ones((9, C, 2)), cache)


# -- the layer ---------------------------------------------------------------------------


def batches(count=5, shape=(10, C, 3), seed=49):
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0.0, 3.0, size=(1, C, 1))
    return [offsets + (1.0 + 0.3 * k) * rng.normal(0.4 * k, 1.5, size=shape) for k in range(count)]


STRATEGIES = {
    "ema": lambda: ns.ExponentialMovingAverage(momentum=0.3),
    "cumulative": ns.CumulativeAverage,
    "welford": ns.Welford,
}


@pytest.mark.parametrize("kind", list(STRATEGIES))
def test_strategy_after_ghost_training_is_fed_the_whole_batches(kind):
    layer = ns.BatchNorm(C, stats=STRATEGIES[kind](), virtual_batch_size=4)
    reference = STRATEGIES[kind]()
    rng = np.random.default_rng(50)
    for x in batches():
        y = layer(x)
        expected, _, cache = functional.ghost_forward(
            x, layer.gamma, layer.beta, virtual_batch_size=4, eps=layer.eps
        )
        np.testing.assert_array_equal(y, expected)
        dy = rng.normal(size=x.shape)
        dx, dgamma, dbeta = functional.backward(dy, cache)
        np.testing.assert_array_equal(layer.backward(dy), dx)
        np.testing.assert_array_equal(layer.grad_gamma, dgamma)
        np.testing.assert_array_equal(layer.grad_beta, dbeta)
        reference.update(x, axis=(0, 2))
    assert layer.stats.num_batches == reference.num_batches == 5
    assert layer.stats.count == reference.count
    np.testing.assert_allclose(layer.stats.mean, reference.mean, rtol=1e-13)
    np.testing.assert_allclose(layer.stats.var, reference.var, rtol=1e-13)
    # evaluation is unchanged: the strategy's statistics
    layer.eval()
    test = batches(count=1, seed=51)[0]
    expected = functional.eval_forward(
        test, layer.stats.mean, layer.stats.var, layer.gamma, layer.beta
    )
    np.testing.assert_array_equal(layer(test), expected)


def test_ghost_layer_with_one_virtual_batch_is_a_plain_layer():
    ghost = ns.BatchNorm(C, stats="welford", virtual_batch_size=10)
    plain = ns.BatchNorm(C, stats="welford")
    dy = np.random.default_rng(52).normal(size=(10, C, 3))
    for x in batches():
        np.testing.assert_array_equal(ghost(x), plain(x))
        np.testing.assert_array_equal(ghost.backward(dy), plain.backward(dy))
        np.testing.assert_array_equal(ghost.grad_gamma, plain.grad_gamma)
    assert_same_state(ghost.stats.state_dict(), plain.stats.state_dict())


def test_ghost_layer_channels_last_equals_channels_first():
    first = ns.BatchNorm(C, stats="ema", virtual_batch_size=3)
    last = ns.BatchNorm(C, stats="ema", virtual_batch_size=3, axis=-1)
    dy = np.random.default_rng(53).normal(size=(10, C, 3))
    for x in batches():
        y_first = first(x)
        y_last = last(np.moveaxis(x, 1, -1).copy())
        np.testing.assert_allclose(y_last, np.moveaxis(y_first, 1, -1), rtol=1e-12, atol=1e-12)
        dx_last = last.backward(np.moveaxis(dy, 1, -1).copy())
        np.testing.assert_allclose(
            dx_last, np.moveaxis(first.backward(dy), 1, -1), rtol=1e-10, atol=1e-12
        )
    np.testing.assert_allclose(last.stats.mean, first.stats.mean, rtol=1e-12)
    np.testing.assert_allclose(last.stats.var, first.stats.var, rtol=1e-12)


def test_ghost_layer_refuses_a_virtual_batch_of_one_value_and_keeps_state():
    layer = ns.BatchNorm(C, stats="welford", virtual_batch_size=4)
    layer(batches(count=1)[0])
    before = snapshot(layer.stats)
    with pytest.raises(ValueError, match=r"^x: .*every virtual batch"):
        layer(np.ones((5, C)))  # 4 + 1: the last virtual batch has one value per feature
    assert_same_state(layer.stats.state_dict(), before)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_ghost_layer_non_finite_batch_follows_nan_policy(policy):
    layer = ns.BatchNorm(C, stats="welford", virtual_batch_size=4, nan_policy=policy)
    layer(batches(count=1)[0])
    before = snapshot(layer.stats)
    x = batches(count=1, seed=54)[0]
    x[9, 0, 2] = np.nan  # in the last virtual batch only
    if policy == "raise":
        with pytest.raises(ValueError, match=r"^x: expected finite"):
            layer(x)
        assert_same_state(layer.stats.state_dict(), before)
        return
    layer(x)
    assert layer.stats.num_batches_skipped == 1
    after = layer.stats.state_dict()
    assert after.pop("welford.num_batches_skipped") == 1
    assert before.pop("welford.num_batches_skipped") == 0
    assert_same_state(after, before)
