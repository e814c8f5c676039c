"""Batch Renormalization in the engine against independent references.

The correction ``(r, d)`` and the warm-up limits against the formulas written out with
NumPy and exact fractions; ``renorm_forward`` / ``backward`` against torch autograd in
float64 (``r`` and ``d`` computed from detached tensors, so constants of the backward pass)
and against central finite differences; the layer ``ns.BatchNorm(renorm=True)`` against
the NumPy formula with a second strategy, fed the same batches, as the reference
statistics, for every kind of strategy.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import normstats as ns
from normstats import functional

from . import user_strategies
from .helpers import assert_same_state, finite_difference, snapshot
from .test_functional import (
    SHAPE_IDS,
    SHAPES,
    assert_close,
    assert_gradients_close,
    channels_last,
    make_case,
    reduced,
)

EPS = 1e-5
TORCH_RTOL = 1e-7
FD_RTOL = 1e-5
R_MAX, D_MAX = 2.0, 1.5
C = 3

REGIMES = {
    # (running variance / batch variance, d before clipping) per channel; with r_max = 2 and
    # d_max = 1.5: r about (4.5, 0.82, 0.18) and d (3, -0.4, -2.5), so that channels 0 and 2
    # are clipped above and below and channel 1 is not.
    "mixed": ((0.05, 1.5, 30.0), (3.0, -0.4, -2.5)),
    # every r and d clipped with a margin: r and d are locally constant, so finite
    # differences of the forward itself give the gradient with r, d constants.
    "clipped": ((0.05, 30.0, 0.05), (3.0, -3.0, 2.5)),
    # nothing clipped
    "free": ((1.3, 0.7, 1.1), (0.4, -0.9, 0.2)),
}


def running_statistics(x, axis, regime):
    """A running mean and variance per channel that put ``r`` and ``d`` where ``regime`` says."""
    factors, targets = (np.array(v) for v in REGIMES[regime])
    axes = reduced(x.shape, axis)
    var = x.var(axis=axes) * factors
    mean = x.mean(axis=axes) - np.array(targets) * np.sqrt(var + EPS)
    return mean, var


def numpy_renorm(x, gamma, beta, mean, var, axis, r_max=R_MAX, d_max=D_MAX, eps=EPS):
    """``gamma * (x_hat * r + d) + beta`` written out in NumPy, and its r and d."""
    axes = reduced(x.shape, axis)
    along = [x.shape[i] if i == axis % x.ndim else 1 for i in range(x.ndim)]
    batch_mean, batch_var = x.mean(axis=axes), x.var(axis=axes)
    r = np.clip(np.sqrt((batch_var + eps) / (var + eps)), 1 / r_max, r_max)
    d = np.clip((batch_mean - mean) / np.sqrt(var + eps), -d_max, d_max)
    x_hat = (x - batch_mean.reshape(along)) / np.sqrt(batch_var.reshape(along) + eps)
    z = x_hat * r.reshape(along) + d.reshape(along)
    y = z if gamma is None else gamma.reshape(along) * z + beta.reshape(along)
    return y, r, d


def torch_renorm(torch, x, gamma, beta, mean, var, w, axis, r_max=R_MAX, d_max=D_MAX, eps=EPS):
    """y, dx, dgamma, dbeta of ``sum(w * renorm(x))`` with torch autograd in float64, with
    ``r`` and ``d`` detached (constants of the backward pass, as the paper defines them)."""
    xt = torch.tensor(x, requires_grad=True)
    gt = None if gamma is None else torch.tensor(gamma, requires_grad=True)
    bt = None if beta is None else torch.tensor(beta, requires_grad=True)
    channels_last_view = xt.movedim(axis, -1)
    dims = tuple(range(x.ndim - 1))
    batch_mean = channels_last_view.mean(dim=dims)
    batch_var = channels_last_view.var(dim=dims, correction=0)
    batch_std = torch.sqrt(batch_var + eps)
    running_std = torch.sqrt(torch.tensor(var) + eps)
    r = (batch_std / running_std).clamp(1 / r_max, r_max).detach()
    d = ((batch_mean - torch.tensor(mean)) / running_std).clamp(-d_max, d_max).detach()
    z = (channels_last_view - batch_mean) / batch_std * r + d
    y = z if gt is None else z * gt + bt
    y = y.movedim(-1, axis)
    (y * torch.tensor(w)).sum().backward()
    grads = [None if t is None else t.grad.numpy() for t in (gt, bt)]
    return y.detach().numpy(), xt.grad.numpy(), *grads


# -- the warm-up limits -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("r_max", "d_max", "warmup"), [(3.0, 5.0, 8), (1.1, 0.3, 7), (2.5, 0.0, 1)]
)
def test_renorm_limits_grow_linearly_over_the_warmup(r_max, d_max, warmup):
    for step in range(warmup + 3):
        progress = min(Fraction(step, warmup), Fraction(1))
        expected_r = 1 + (Fraction(r_max) - 1) * progress
        expected_d = Fraction(d_max) * progress
        r, d = functional.renorm_limits(step, warmup, r_max, d_max)
        assert r == pytest.approx(float(expected_r), rel=1e-15, abs=0)
        assert d == pytest.approx(float(expected_d), rel=1e-15, abs=0)
    assert functional.renorm_limits(0, warmup, r_max, d_max) == (1.0, 0.0)


def test_renorm_limits_without_warmup_are_the_given_ones():
    for step in (0, 1, 1000):
        assert functional.renorm_limits(step, 0, 3.0, 5.0) == (3.0, 5.0)
    # the boundaries of the valid values are valid
    assert functional.renorm_limits(0, 0, 1.0, 0.0) == (1.0, 0.0)


def test_renorm_limits_accept_numpy_scalars():
    limits = functional.renorm_limits(np.int64(2), np.int32(4), np.float32(3.0), np.float64(5.0))
    assert limits == (2.0, 2.5)
    assert functional.renorm_limits(np.array(4), np.array(4), np.array(3.0), 5) == (3.0, 5.0)


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ((0, 0, 0.5, 5.0), ValueError, r"^r_max: expected .*at least 1, got 0.5"),
        ((0, 0, np.nan, 5.0), ValueError, r"^r_max: "),
        ((0, 0, np.inf, 5.0), ValueError, r"^r_max: "),
        ((0, 0, 3.0, -1.0), ValueError, r"^d_max: expected .*non-negative.*got -1.0"),
        ((0, 0, 3.0, np.inf), ValueError, r"^d_max: "),
        ((-1, 10, 3.0, 5.0), ValueError, r"^step: expected a non-negative integer, got -1"),
        ((0, -3, 3.0, 5.0), ValueError, r"^renorm_warmup: expected .*got -3"),
        ((1.5, 10, 3.0, 5.0), TypeError, r"^step: "),
        ((0, 2.0, 3.0, 5.0), TypeError, r"^renorm_warmup: "),
        ((0, True, 3.0, 5.0), TypeError, r"^renorm_warmup: "),
        ((0, 0, "3", 5.0), TypeError, r"^r_max: "),
        ((0, 0, 3.0, None), TypeError, r"^d_max: "),
    ],
    ids=[
        "r_max<1",
        "r_max-nan",
        "r_max-inf",
        "d_max<0",
        "d_max-inf",
        "negative-step",
        "negative-warmup",
        "float-step",
        "float-warmup",
        "bool-warmup",
        "str-r_max",
        "none-d_max",
    ],
)
def test_renorm_limits_refuse_bad_values(arguments, error, match):
    with pytest.raises(error, match=match):
        functional.renorm_limits(*arguments)


# -- the correction (r, d) --------------------------------------------------------------


def test_renorm_correction_is_the_formula():
    rng = np.random.default_rng(0)
    batch_mean, mean = rng.normal(0.0, 2.0, size=(2, 50))
    batch_var, var = rng.uniform(0.01, 9.0, size=(2, 50))
    r, d = functional.renorm_correction(
        batch_mean, batch_var, mean, var, r_max=R_MAX, d_max=D_MAX, eps=EPS
    )
    expected_r = np.clip(np.sqrt((batch_var + EPS) / (var + EPS)), 1 / R_MAX, R_MAX)
    expected_d = np.clip((batch_mean - mean) / np.sqrt(var + EPS), -D_MAX, D_MAX)
    np.testing.assert_allclose(r, expected_r, rtol=1e-15)
    np.testing.assert_allclose(d, expected_d, rtol=1e-15, atol=1e-15)
    # the data reach every side of both clips
    assert {True} == {bool((r == R_MAX).any()), bool((r == 1 / R_MAX).any())}
    assert {True} == {bool((d == D_MAX).any()), bool((d == -D_MAX).any())}
    assert bool(((r > 1 / R_MAX) & (r < R_MAX)).any())


def test_renorm_correction_at_the_clipping_boundaries():
    # eps = 0 and squares: every value is exact. r = sigma_B / sigma, d = (mu_B - mu) / sigma.
    batch_mean = np.array([5.0, 3.0, 1.0, -5.0, -3.0])
    batch_var = np.array([36.0, 16.0, 4.0, 1.0, 0.25])
    mean = np.zeros(5)
    var = np.full(5, 4.0)  # sigma = 2: r = (3, 2, 1, 0.5, 0.25), d = (2.5, 1.5, 0.5, -2.5, -1.5)
    r, d = functional.renorm_correction(
        batch_mean, batch_var, mean, var, r_max=2.0, d_max=1.5, eps=0.0
    )
    assert r.tolist() == [2.0, 2.0, 1.0, 0.5, 0.5]
    assert d.tolist() == [1.5, 1.5, 0.5, -1.5, -1.5]
    # r_max = 1, d_max = 0: plain batch normalization
    r, d = functional.renorm_correction(
        batch_mean, batch_var, mean, var, r_max=1.0, d_max=0.0, eps=0.0
    )
    assert r.tolist() == [1.0] * 5
    assert d.tolist() == [0.0] * 5


def test_renorm_correction_stays_in_torch(torch):
    args = [torch.tensor([1.0, 2.0]), torch.tensor([4.0, 1.0]), torch.zeros(2), torch.ones(2)]
    r, d = functional.renorm_correction(*args, r_max=3.0, d_max=5.0, eps=0.0)
    assert isinstance(r, torch.Tensor)
    assert isinstance(d, torch.Tensor)
    assert r.tolist() == [2.0, 1.0]
    assert d.tolist() == [1.0, 2.0]


# -- renorm_forward and backward against torch autograd and finite differences ------------


@pytest.mark.parametrize("regime", ["mixed", "free"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("layout", ["channels-first", "channels-last"])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_renorm_forward_and_backward_match_torch(torch, shape, layout, affine, regime):
    axis = 1 if layout == "channels-first" else -1
    if axis == -1:
        shape = channels_last(shape)
    x, gamma, beta, w = make_case(shape, axis, affine, seed=20)
    mean, var = running_statistics(x, axis, regime)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = torch_renorm(torch, x, gamma, beta, mean, var, w, axis)

    y, moments, cache = functional.renorm_forward(
        x, gamma, beta, mean, var, r_max=R_MAX, d_max=D_MAX, axis=axis, eps=EPS
    )
    dx, dgamma, dbeta = functional.backward(w, cache)

    assert_gradients_close((y, dx, dgamma, dbeta), (y_ref, dx_ref, dgamma_ref, dbeta_ref), affine)
    # the moments are the batch's own, for the strategy
    axes = reduced(shape, axis)
    np.testing.assert_allclose(moments.mean, x.mean(axis=axes), rtol=1e-12)
    np.testing.assert_allclose(moments.var(ddof=1), x.var(axis=axes, ddof=1), rtol=1e-12)
    # ... and the output is the NumPy formula, with r and d where the regime puts them
    y_np, r, d = numpy_renorm(x, gamma, beta, mean, var, axis)
    assert_close(y, y_np, 1e-12)
    if regime == "mixed":
        assert (r[0], r[2], d[0], d[2]) == (R_MAX, 1 / R_MAX, D_MAX, -D_MAX)
        assert 1 / R_MAX < r[1] < R_MAX
        assert -D_MAX < d[1] < D_MAX


@pytest.mark.parametrize(
    ("shape", "axis"), [((6, C), 1), ((4, C, 3), 1), ((3, 2, 2, C), -1)], ids=str
)
def test_renorm_backward_matches_finite_differences(shape, axis):
    # Every r and d clipped with a margin: the forward itself has r and d constant nearby.
    x, gamma, beta, w = make_case(shape, axis, affine=True, seed=21)
    mean, var = running_statistics(x, axis, "clipped")

    def loss():
        y, _, _ = functional.renorm_forward(
            x, gamma, beta, mean, var, r_max=R_MAX, d_max=D_MAX, axis=axis, eps=EPS
        )
        return float(np.sum(w * y))

    _, _, cache = functional.renorm_forward(
        x, gamma, beta, mean, var, r_max=R_MAX, d_max=D_MAX, axis=axis, eps=EPS
    )
    dx, dgamma, dbeta = functional.backward(w, cache)
    assert_close(dx, finite_difference(loss, x), FD_RTOL)
    assert_close(dgamma, finite_difference(loss, gamma), FD_RTOL)
    assert_close(dbeta, finite_difference(loss, beta), FD_RTOL)


def test_renorm_backward_matches_finite_differences_with_r_and_d_held():
    # Unclipped r and d depend on x; the gradient holds them constant: differentiate the
    # NumPy formula with r and d fixed at their values for the unperturbed batch.
    shape, axis = (5, C, 2), 1
    x, gamma, beta, w = make_case(shape, axis, affine=True, seed=22)
    mean, var = running_statistics(x, axis, "mixed")
    _, r, d = numpy_renorm(x, gamma, beta, mean, var, axis)
    along = (1, C, 1)

    def loss():
        axes = (0, 2)
        x_hat = (x - x.mean(axis=axes).reshape(along)) / np.sqrt(
            x.var(axis=axes).reshape(along) + EPS
        )
        z = x_hat * r.reshape(along) + d.reshape(along)
        return float(np.sum(w * (gamma.reshape(along) * z + beta.reshape(along))))

    _, _, cache = functional.renorm_forward(
        x, gamma, beta, mean, var, r_max=R_MAX, d_max=D_MAX, axis=axis, eps=EPS
    )
    dx, dgamma, dbeta = functional.backward(w, cache)
    assert_close(dx, finite_difference(loss, x), FD_RTOL)
    assert_close(dgamma, finite_difference(loss, gamma), FD_RTOL)
    assert_close(dbeta, finite_difference(loss, beta), FD_RTOL)


@pytest.mark.parametrize(("shape", "axis"), [((16, C), 1), ((4, C, 5, 6), 1), ((4, 5, C), -1)])
def test_unclipped_renorm_is_normalization_with_the_running_statistics(shape, axis):
    x, gamma, beta, _ = make_case(shape, axis, affine=True, seed=23)
    mean, var = running_statistics(x, axis, "mixed")
    y, _, _ = functional.renorm_forward(
        x, gamma, beta, mean, var, r_max=1e9, d_max=1e9, axis=axis, eps=EPS
    )
    expected = functional.eval_forward(x, mean, var, gamma, beta, axis=axis, eps=EPS)
    assert_close(y, expected, 1e-12)


@pytest.mark.parametrize("regime", ["mixed", "free"])
@pytest.mark.parametrize(("shape", "axis"), [((16, C), 1), ((4, C, 5, 6), 1), ((4, 5, C), -1)])
def test_renorm_with_r_max_1_and_d_max_0_is_batch_normalization(shape, axis, regime):
    x, gamma, beta, w = make_case(shape, axis, affine=True, seed=24)
    mean, var = running_statistics(x, axis, regime)
    y, moments, cache = functional.renorm_forward(
        x, gamma, beta, mean, var, r_max=1.0, d_max=0.0, axis=axis, eps=EPS
    )
    y_bn, moments_bn, cache_bn = functional.train_forward(x, gamma, beta, axis=axis, eps=EPS)
    # r = 1 and d = 0 exactly: the very same arithmetic
    np.testing.assert_array_equal(y, y_bn)
    assert moments == moments_bn
    for got, expected in zip(
        functional.backward(w, cache), functional.backward(w, cache_bn), strict=True
    ):
        np.testing.assert_array_equal(got, expected)


def test_renorm_without_running_statistics_is_batch_normalization():
    x, gamma, beta, w = make_case((8, C, 4), 1, affine=True, seed=25)
    y, moments, cache = functional.renorm_forward(
        x, gamma, beta, None, None, r_max=R_MAX, d_max=D_MAX
    )
    y_bn, moments_bn, cache_bn = functional.train_forward(x, gamma, beta)
    np.testing.assert_array_equal(y, y_bn)
    assert moments == moments_bn
    for got, expected in zip(
        functional.backward(w, cache), functional.backward(w, cache_bn), strict=True
    ):
        np.testing.assert_array_equal(got, expected)


def test_renorm_accepts_scalar_running_statistics():
    x, gamma, beta, _ = make_case((8, C), 1, affine=True, seed=26)
    y, _, _ = functional.renorm_forward(x, gamma, beta, 0.0, 1.0, r_max=R_MAX, d_max=D_MAX)
    expected, _, _ = numpy_renorm(x, gamma, beta, np.zeros(C), np.ones(C), 1)
    assert_close(y, expected, 1e-12)


def test_renorm_float32_input_gives_float32_output():
    x64, gamma, beta, w = make_case((16, C, 4), 1, affine=True, seed=27)
    mean, var = running_statistics(x64, 1, "mixed")
    x, g32, b32 = x64.astype(np.float32), gamma.astype(np.float32), beta.astype(np.float32)
    y, moments, cache = functional.renorm_forward(x, g32, b32, mean, var, r_max=R_MAX, d_max=D_MAX)
    dx, _, _ = functional.backward(w.astype(np.float32), cache)
    assert y.dtype == np.float32
    assert dx.dtype == np.float32
    assert moments.mean.dtype == np.float64
    y64, _, cache64 = functional.renorm_forward(
        x64, gamma, beta, mean, var, r_max=R_MAX, d_max=D_MAX
    )
    assert_close(y, y64, 1e-5)
    assert_close(dx, functional.backward(w, cache64)[0], 1e-4)


def test_renorm_of_a_non_finite_batch_gives_non_finite_moments():
    x, gamma, beta, _ = make_case((8, C), 1, affine=True, seed=28)
    x[2, 1] = np.nan
    y, moments, _ = functional.renorm_forward(
        x, gamma, beta, np.zeros(C), np.ones(C), r_max=R_MAX, d_max=D_MAX
    )
    assert not np.isfinite(moments.m2[1])
    assert np.isfinite(moments.m2[[0, 2]]).all()
    assert np.isnan(y[:, 1]).all()


@pytest.mark.parametrize(
    ("mean", "var", "limits", "match"),
    [
        (np.zeros(C), None, (R_MAX, D_MAX), r"^mean, var: expected both"),
        (None, np.ones(C), (R_MAX, D_MAX), r"^mean, var: expected both"),
        (np.zeros(C + 1), np.ones(C), (R_MAX, D_MAX), r"^mean: expected .*\(3,\).*shape \(4,\)"),
        (np.zeros(C), np.ones((1, C)), (R_MAX, D_MAX), r"^var: expected .*\(3,\)"),
        (np.zeros(C), np.ones(C), (0.9, D_MAX), r"^r_max: "),
        (np.zeros(C), np.ones(C), (R_MAX, -0.1), r"^d_max: "),
        (None, None, (0.9, D_MAX), r"^r_max: "),
    ],
    ids=["no-var", "no-mean", "mean-shape", "var-shape", "r_max", "d_max", "r_max-no-stats"],
)
def test_renorm_forward_refuses_bad_input(mean, var, limits, match):
    x = make_case((8, C), 1, affine=False, seed=29)[0]
    with pytest.raises(ValueError, match=match):
        functional.renorm_forward(x, None, None, mean, var, r_max=limits[0], d_max=limits[1])


def test_renorm_forward_refuses_one_value_per_feature():
    with pytest.raises(ValueError, match=r"^x: .*1 value per feature"):
        functional.renorm_forward(np.ones((1, C)), None, None, 0.0, 1.0, r_max=2.0, d_max=1.0)


# -- the layer ---------------------------------------------------------------------------


def batches(count=6, shape=(4, C, 3), seed=30):
    """Small (N, C, L) batches with per-channel offsets that drift, so that the running
    statistics and each batch's differ (r and d far from 1 and 0)."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0.0, 3.0, size=(1, C, 1))
    return [offsets + (1.0 + 0.3 * k) * rng.normal(0.4 * k, 1.5, size=shape) for k in range(count)]


def affine_layer(stats, **kwargs):
    layer = ns.BatchNorm(C, stats=stats, eps=EPS, **kwargs)
    rng = np.random.default_rng(31)
    layer.gamma[...] = rng.uniform(0.5, 2.0, size=C)
    layer.beta[...] = rng.normal(size=C)
    return layer


REFERENCES = {
    "ema": lambda: ns.ExponentialMovingAverage(momentum=0.3),
    "ema-debias": lambda: ns.ExponentialMovingAverage(momentum=0.3, debias=True),
    "cumulative": ns.CumulativeAverage,
    "welford": ns.Welford,
    "user-LastK": lambda: user_strategies.LastK(k=2),
    "user-WithinBatch": lambda: user_strategies.WithinBatch(),
}
"""Every kind of running estimate as renorm's reference, a user's strategies included."""


@pytest.mark.parametrize("kind", list(REFERENCES))
def test_layer_renormalizes_towards_its_strategy(kind):
    layer = affine_layer(REFERENCES[kind](), renorm=True, r_max=1.5, d_max=1.0)
    reference = REFERENCES[kind]()  # fed the same batches, on its own
    rng = np.random.default_rng(32)
    clipped = free = 0
    for k, x in enumerate(batches()):
        if k == 0:  # no running estimate yet: plain batch normalization
            expected, _, _ = functional.train_forward(x, layer.gamma, layer.beta, eps=EPS)
        else:
            mean, var = reference.mean, reference.var
            expected, r, d = numpy_renorm(x, layer.gamma, layer.beta, mean, var, 1, 1.5, 1.0)
            clipped += int(np.sum((r == 1.5) | (r == 1 / 1.5)) + np.sum(np.abs(d) == 1.0))
            free += int(np.sum((r < 1.5) & (r > 1 / 1.5)) + np.sum(np.abs(d) < 1.0))
        y = layer(x)
        np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
        # its backward is the functional one of this step (checked against torch above)
        dy = rng.normal(size=x.shape)
        mean_var = (None, None) if k == 0 else (reference.mean, reference.var)
        _, _, cache = functional.renorm_forward(
            x, layer.gamma, layer.beta, *mean_var, r_max=1.5, d_max=1.0, eps=EPS
        )
        dx_ref, dgamma_ref, dbeta_ref = functional.backward(dy, cache)
        np.testing.assert_allclose(layer.backward(dy), dx_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.grad_gamma, dgamma_ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(layer.grad_beta, dbeta_ref, rtol=1e-12, atol=1e-12)
        reference.update(x, axis=(0, 2))
    # the batches exercise the clipping and the free correction
    assert clipped > 0
    assert free > 0
    # the strategy is fed the batch moments as in plain training; evaluation is unchanged
    assert_same_state(layer.stats.state_dict(), reference.state_dict())
    layer.eval()
    test = batches(count=1, seed=33)[0]
    expected = functional.eval_forward(
        test, reference.mean, reference.var, layer.gamma, layer.beta, eps=EPS
    )
    np.testing.assert_allclose(layer(test), expected, rtol=1e-14, atol=1e-14)


def test_ema_layer_starts_as_batch_normalization():
    # An EMA reports mean 0 and var 1 before any batch; that is no estimate to correct to.
    layer = affine_layer("ema", renorm=True)
    x = batches(count=1)[0] + 10.0
    expected, _, _ = functional.train_forward(x, layer.gamma, layer.beta, eps=EPS)
    np.testing.assert_array_equal(layer(x), expected)


def test_unclipped_layer_trains_with_its_running_statistics():
    layer = affine_layer("welford", renorm=True, r_max=1e9, d_max=1e9)
    xs = batches()
    layer(xs[0])
    for x in xs[1:]:
        expected = functional.eval_forward(
            x, layer.stats.mean, layer.stats.var, layer.gamma, layer.beta, eps=EPS
        )
        np.testing.assert_allclose(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_layer_warmup_follows_the_batches_its_strategy_tracked():
    warmup = 4
    layer = affine_layer("cumulative", renorm=True, r_max=3.0, d_max=0.8, renorm_warmup=warmup)
    reference = ns.CumulativeAverage()
    for k, x in enumerate(batches(count=7)):
        progress = min(k / warmup, 1.0)
        r_max, d_max = 1.0 + 2.0 * progress, 0.8 * progress
        if k == 0:
            expected, _, _ = functional.train_forward(x, layer.gamma, layer.beta, eps=EPS)
        else:
            expected, _, d = numpy_renorm(
                x, layer.gamma, layer.beta, reference.mean, reference.var, 1, r_max, d_max
            )
            assert (np.abs(d) == d_max).any()  # the limit at this step is what binds
        np.testing.assert_allclose(layer(x), expected, rtol=1e-12, atol=1e-12)
        reference.update(x, axis=(0, 2))
        assert layer.stats.num_batches == k + 1


def test_layer_warmup_resumes_with_the_strategy_state():
    xs = batches(count=5)
    trained = affine_layer("ema", renorm=True, d_max=0.5, renorm_warmup=6)
    for x in xs[:3]:
        trained(x)
    resumed = affine_layer("ema", renorm=True, d_max=0.5, renorm_warmup=6)
    resumed.stats.load_state_dict(trained.stats.state_dict())
    for x in xs[3:]:
        np.testing.assert_array_equal(resumed(x), trained(x))
    # a fresh layer at step 0 would not renormalize at all: the state is what differs
    fresh = affine_layer("ema", renorm=True, d_max=0.5, renorm_warmup=6)
    assert not np.allclose(fresh(xs[4]), trained(xs[4]))


def test_skipped_batch_does_not_advance_the_warmup():
    layer = affine_layer("ema", renorm=True, renorm_warmup=3, nan_policy="skip")
    reference = affine_layer("ema", renorm=True, renorm_warmup=3, nan_policy="skip")
    xs = batches(count=4)
    for x in xs[:2]:
        layer(x)
        reference(x)
    bad = xs[2].copy()
    bad[0, 1, 0] = np.inf
    before = snapshot(layer.stats)
    layer(bad)
    assert layer.stats.num_batches_skipped == 1
    assert layer.stats.num_batches == 2
    after = layer.stats.state_dict()
    assert after.pop("ema.num_batches_skipped") == 1
    assert before.pop("ema.num_batches_skipped") == 0
    assert_same_state(after, before)
    np.testing.assert_array_equal(layer(xs[3]), reference(xs[3]))


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_batch_raises_and_keeps_state(bad):
    layer = affine_layer("welford", renorm=True)
    for x in batches(count=2):
        layer(x)
    before = snapshot(layer.stats)
    x = batches(count=1, seed=34)[0]
    x[1, 2, 1] = bad
    with pytest.raises(ValueError, match=r"^x: expected finite"):
        layer(x)
    assert_same_state(layer.stats.state_dict(), before)


@pytest.mark.parametrize(
    "stats",
    ["exact", "batch", ns.ExactFullPass()],
    ids=["exact", "batch", "exact-instance"],
)
def test_renorm_needs_a_running_estimate(stats):
    with pytest.raises(ValueError, match=r"^renorm: expected a strategy with a running estimate"):
        ns.BatchNorm(C, stats=stats, renorm=True)
    # without renorm the same strategies are fine
    ns.BatchNorm(C, stats=stats)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"renorm": True, "r_max": 0.5}, ValueError, r"^r_max: "),
        ({"renorm": True, "d_max": -1.0}, ValueError, r"^d_max: "),
        ({"renorm": True, "renorm_warmup": -1}, ValueError, r"^renorm_warmup: "),
        ({"renorm": True, "renorm_warmup": 2.5}, TypeError, r"^renorm_warmup: "),
        ({"renorm": True, "renorm_warmup": True}, TypeError, r"^renorm_warmup: "),
        ({"renorm": "yes"}, TypeError, r"^renorm: expected a bool"),
        ({"renorm": 2}, TypeError, r"^renorm: expected a bool"),
        ({"renorm": True, "virtual_batch_size": 4}, ValueError, r"^renorm, virtual_batch_size"),
        ({"virtual_batch_size": 0}, ValueError, r"^virtual_batch_size: .*positive"),
        ({"virtual_batch_size": -2}, ValueError, r"^virtual_batch_size: "),
        ({"virtual_batch_size": 2.0}, TypeError, r"^virtual_batch_size: "),
        ({"virtual_batch_size": True}, TypeError, r"^virtual_batch_size: "),
    ],
    ids=[
        "r_max<1",
        "d_max<0",
        "negative-warmup",
        "float-warmup",
        "bool-warmup",
        "str-renorm",
        "int-renorm",
        "renorm-and-ghost",
        "zero-virtual",
        "negative-virtual",
        "float-virtual",
        "bool-virtual",
    ],
)
def test_bad_small_batch_settings_raise_and_change_nothing(kwargs, error, match):
    stats = ns.Welford()
    for x in batches(count=2):
        stats.update(x, axis=(0, 2))
    before = snapshot(stats)
    with pytest.raises(error, match=match):
        ns.BatchNorm(C, stats=stats, **kwargs)
    assert_same_state(stats.state_dict(), before)


def test_settings_accept_numpy_scalars():
    layer = ns.BatchNorm(
        C,
        renorm=np.bool_(True),
        r_max=np.float32(2.0),
        d_max=np.int64(1),
        renorm_warmup=np.int64(5),
    )
    assert (layer.renorm, layer.r_max, layer.d_max, layer.renorm_warmup) == (True, 2.0, 1.0, 5)
    assert type(layer.r_max) is float
    assert type(layer.renorm_warmup) is int
    assert ns.BatchNorm(C, virtual_batch_size=np.int32(4)).virtual_batch_size == 4


def test_repr_shows_the_small_batch_settings():
    assert repr(ns.BatchNorm(C, stats="welford", renorm=True, renorm_warmup=100)) == (
        "BatchNorm(3, stats=Welford(nan_policy='raise'), eps=1e-05, affine=True, axis=1, "
        "renorm=True, r_max=3.0, d_max=5.0, renorm_warmup=100)"
    )
    assert repr(ns.BatchNorm(C, stats="welford", virtual_batch_size=8)) == (
        "BatchNorm(3, stats=Welford(nan_policy='raise'), eps=1e-05, affine=True, axis=1, "
        "virtual_batch_size=8)"
    )
    assert "renorm" not in repr(ns.BatchNorm(C))
    assert "virtual" not in repr(ns.BatchNorm(C))
