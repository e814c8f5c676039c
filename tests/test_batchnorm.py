"""The stateful BatchNorm layer against functional, NumPy and torch.nn.BatchNorm2d.

Every strategy: training output is ``functional.train_forward``'s and the strategy is fed
the batch moments (EMA equals torch's ``momentum=0.1`` running statistics, cumulative its
``momentum=None``, the pooled ones NumPy over the concatenation, ``"exact"`` nothing);
evaluation uses ``stats.mean`` / ``stats.var`` (unbiased); bad input leaves the statistics
exactly as they were.
"""

from __future__ import annotations

import numpy as np
import pytest

import normstats as ns
from normstats import functional

from .helpers import assert_same_state, snapshot

C = 3
EPS = 1e-5
TORCH_RTOL = 1e-10

STATS = {
    "ema": lambda: "ema",
    "cumulative": lambda: "cumulative",
    "welford": lambda: "welford",
    "exact": lambda: "exact",
    "batch": lambda: "batch",
    "instance": lambda: ns.ExponentialMovingAverage(momentum=0.3),
}
"""Every way to choose the strategy; the instance is an EMA with a non-default momentum."""

WITH_STATE = ["ema", "cumulative", "welford", "exact", "instance"]
FED_BY_TRAINING = ["ema", "cumulative", "welford", "instance"]


def batches(count=4, shape=(8, C, 4, 5), seed=0):
    """NCHW float64 batches with per-channel offsets and scales that drift between batches."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0.0, 3.0, size=(1, C, 1, 1))
    return [offsets + (1.0 + 0.2 * k) * rng.normal(0.5 * k, 1.5, size=shape) for k in range(count)]


def affine_layer(stats, num_features=C, seed=1, **kwargs):
    """A layer with non-trivial gamma and beta (so that they matter in every comparison)."""
    layer = ns.BatchNorm(num_features, stats=stats, eps=EPS, **kwargs)
    rng = np.random.default_rng(seed)
    layer.gamma[...] = rng.uniform(0.5, 2.0, size=num_features)
    layer.beta[...] = rng.normal(size=num_features)
    return layer


def torch_layer(torch, layer, momentum=0.1):
    """``torch.nn.BatchNorm2d`` in float64 with the layer's gamma and beta."""
    module = torch.nn.BatchNorm2d(C, eps=EPS, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(layer.gamma))
        module.bias.copy_(torch.from_numpy(layer.beta))
    return module


def expected_statistics(kind, xs, axes=(0, 2, 3)):
    """What each strategy estimates from training batches ``xs``, computed with NumPy."""
    means = [x.mean(axis=axes) for x in xs]
    variances = [x.var(axis=axes, ddof=1) for x in xs]
    if kind in ("ema", "instance"):
        m = 0.1 if kind == "ema" else 0.3
        mean, var = np.zeros(C), np.ones(C)
        for batch_mean, batch_var in zip(means, variances, strict=True):
            mean = (1 - m) * mean + m * batch_mean
            var = (1 - m) * var + m * batch_var
        return mean, var
    if kind == "cumulative":
        return np.mean(means, axis=0), np.mean(variances, axis=0)
    union = np.concatenate([np.moveaxis(x, 1, -1).reshape(-1, C) for x in xs])
    return union.mean(axis=0), union.var(axis=0, ddof=1)


def eval_formula(layer, x, mean, var):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + EPS) * layer.gamma.reshape(
        shape
    ) + layer.beta.reshape(shape)


def state_of(layer):
    return None if layer.stats is None else snapshot(layer.stats)


def assert_state_unchanged(layer, before):
    if before is None:
        assert layer.stats is None
    else:
        assert_same_state(layer.stats.state_dict(), before)


# -- training ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(16, C), (6, C, 7), (4, C, 5, 6), (3, C, 2, 4, 3)], ids=["2d", "3d", "4d", "5d"]
)
@pytest.mark.parametrize("kind", list(STATS))
def test_training_output_is_functional(kind, shape):
    layer = affine_layer(STATS[kind]())
    x = np.random.default_rng(2).normal(3.0, 2.0, size=shape)
    expected, _, _ = functional.train_forward(x, layer.gamma.copy(), layer.beta.copy(), eps=EPS)
    y = layer(x)
    np.testing.assert_allclose(y, expected, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kind", list(STATS))
def test_training_feeds_the_strategy(kind):
    layer = affine_layer(STATS[kind]())
    xs = batches()
    for x in xs:
        layer(x)
    if kind == "batch":
        assert layer.stats is None
        return
    if kind == "exact":
        assert layer.stats.count == 0
        assert layer.stats.num_batches == 0
        return
    mean, var = expected_statistics(kind, xs)
    np.testing.assert_allclose(layer.stats.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(layer.stats.var, var, rtol=1e-12)
    assert layer.stats.num_batches == len(xs)
    assert layer.stats.count == sum(x.size // C for x in xs)


def test_the_estimator_instance_is_used_not_copied():
    stats = ns.Welford()
    layer = ns.BatchNorm(C, stats=stats)
    assert layer.stats is stats
    layer(batches(count=1)[0])
    assert stats.num_batches == 1


def test_stats_kwargs_reach_the_strategy():
    layer = ns.BatchNorm(C, stats="ema", momentum=0.25)
    assert layer.stats.momentum == 0.25
    x = batches(count=1)[0]
    layer(x)
    np.testing.assert_allclose(layer.stats.mean, 0.25 * x.mean(axis=(0, 2, 3)), rtol=1e-12)


@pytest.mark.parametrize(("kind", "momentum"), [("ema", 0.1), ("cumulative", None)])
def test_running_statistics_match_torch(torch, kind, momentum):
    layer = affine_layer(kind)
    module = torch_layer(torch, layer, momentum=momentum).train()
    xs = batches(count=5)
    for x in xs:
        y = layer(x)
        y_ref = module(torch.from_numpy(x))
        np.testing.assert_allclose(y, y_ref.detach().numpy(), rtol=TORCH_RTOL, atol=TORCH_RTOL)
    np.testing.assert_allclose(layer.stats.mean, module.running_mean.numpy(), rtol=TORCH_RTOL)
    np.testing.assert_allclose(layer.stats.var, module.running_var.numpy(), rtol=TORCH_RTOL)

    test = batches(count=1, seed=3)[0]
    layer.eval()
    module.eval()
    with torch.no_grad():
        expected = module(torch.from_numpy(test)).numpy()
    np.testing.assert_allclose(layer(test), expected, rtol=TORCH_RTOL, atol=TORCH_RTOL)


# -- evaluation --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FED_BY_TRAINING)
def test_eval_uses_the_strategy_statistics(kind):
    layer = affine_layer(STATS[kind]())
    xs = batches()
    for x in xs:
        layer(x)
    layer.eval()
    test = batches(count=1, seed=4)[0]
    mean, var = np.asarray(layer.stats.mean), np.asarray(layer.stats.var)
    np.testing.assert_allclose(layer(test), eval_formula(layer, test, mean, var), rtol=1e-12)
    # ... and those are the strategy's estimate (for the pooled one, the unbiased variance).
    ref_mean, ref_var = expected_statistics(kind, xs)
    np.testing.assert_allclose(
        layer(test), eval_formula(layer, test, ref_mean, ref_var), rtol=1e-10, atol=1e-12
    )


def test_eval_does_not_feed_the_strategy():
    layer = affine_layer("welford")
    layer(batches(count=1)[0])
    before = state_of(layer)
    layer.eval()
    layer(batches(count=1, seed=5)[0])
    assert_state_unchanged(layer, before)


def test_eval_welford_uses_the_unbiased_variance():
    layer = ns.BatchNorm(2, stats="welford", eps=0.0)
    x = np.array([[0.0, 1.0], [2.0, 5.0]])
    layer(x)
    layer.eval()
    # mean (1, 3), deviations (-1, 1) and (-2, 2), unbiased variance (2, 8), biased (1, 4):
    # (x - mean) / sqrt(var) is -1/sqrt(2), 1/sqrt(2); the biased variance would give -1, 1.
    r = 1 / np.sqrt(2)
    np.testing.assert_allclose(layer(x), [[-r, -r], [r, r]], rtol=1e-15)


def test_eval_of_an_untrained_ema_layer_uses_torch_initialization():
    layer = affine_layer("ema")
    layer.eval()
    x = batches(count=1)[0]
    np.testing.assert_allclose(layer(x), eval_formula(layer, x, np.zeros(C), np.ones(C)))


def test_eval_of_an_untrained_welford_layer_raises():
    layer = ns.BatchNorm(C, stats="welford").eval()
    with pytest.raises(ValueError, match="train"):
        layer(batches(count=1)[0])


def test_exact_is_not_fed_and_needs_calibration():
    layer = affine_layer("exact")
    for x in batches():
        layer(x)
    assert layer.stats.count == 0
    layer.eval()
    with pytest.raises(ValueError, match="recalibrate"):
        layer(batches(count=1)[0])

    # Once a calibration fills it, evaluation uses its pooled statistics.
    calibration = batches(count=3, seed=6)
    for x in calibration:
        layer.stats.update(x, axis=(0, 2, 3))
    mean, var = expected_statistics("exact", calibration)
    test = batches(count=1, seed=7)[0]
    np.testing.assert_allclose(layer(test), eval_formula(layer, test, mean, var), rtol=1e-10)


def test_batch_layer_uses_batch_statistics_in_eval():
    layer = affine_layer("batch")
    assert layer.stats is None
    for x in batches():
        layer(x)
    layer.eval()
    test = batches(count=1, seed=8)[0]
    expected, _, _ = functional.train_forward(test, layer.gamma, layer.beta, eps=EPS)
    np.testing.assert_allclose(layer(test), expected, rtol=1e-14, atol=1e-14)
    batch_mean = test.mean(axis=(0, 2, 3))
    batch_var = test.var(axis=(0, 2, 3))  # normalized with the biased batch variance
    np.testing.assert_allclose(
        layer(test), eval_formula(layer, test, batch_mean, batch_var), rtol=1e-12, atol=1e-12
    )


# -- backward ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ema", "welford", "batch"])
def test_backward_matches_torch(torch, kind):
    layer = affine_layer(kind)
    module = torch_layer(torch, layer).train()
    x = batches(count=1)[0]
    dy = np.random.default_rng(9).normal(size=x.shape)

    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    (module(xt) * torch.from_numpy(dy)).sum().backward()

    layer(x)
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-7, atol=1e-7 * np.abs(dx).max())
    np.testing.assert_allclose(layer.grad_gamma, module.weight.grad.numpy(), rtol=1e-7)
    np.testing.assert_allclose(layer.grad_beta, module.bias.grad.numpy(), rtol=1e-7)


def test_backward_without_affine(torch):
    layer = ns.BatchNorm(C, affine=False, eps=EPS)
    module = torch.nn.BatchNorm2d(C, eps=EPS, affine=False, dtype=torch.float64)
    x = batches(count=1)[0]
    dy = np.random.default_rng(10).normal(size=x.shape)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    (module(xt) * torch.from_numpy(dy)).sum().backward()
    layer(x)
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-7, atol=1e-7 * np.abs(dx).max())
    assert layer.parameters() == []


def test_backward_uses_the_last_training_forward():
    layer = affine_layer("ema")
    first, second = batches(count=2)
    dy = np.random.default_rng(11).normal(size=first.shape)
    layer(first)
    layer(second)
    _, _, cache = functional.train_forward(second, layer.gamma, layer.beta, eps=EPS)
    expected, dgamma, dbeta = functional.backward(dy, cache)
    np.testing.assert_allclose(layer.backward(dy), expected, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(layer.grad_gamma, dgamma, rtol=1e-14)
    np.testing.assert_allclose(layer.grad_beta, dbeta, rtol=1e-14)


def test_backward_without_training_forward_raises():
    layer = ns.BatchNorm(C)
    with pytest.raises(ValueError, match="forward"):
        layer.backward(np.ones((4, C)))


@pytest.mark.parametrize("kind", ["ema", "batch"])
def test_backward_after_eval_forward_raises(kind):
    layer = ns.BatchNorm(C, stats=kind)
    x = batches(count=1)[0]
    layer(x)  # a training forward first: its cache must not survive an eval forward
    layer.eval()
    layer(x)
    with pytest.raises(ValueError, match="forward"):
        layer.backward(np.ones_like(x))


def test_backward_with_dy_of_another_shape_raises():
    layer = ns.BatchNorm(C)
    layer(batches(count=1)[0])
    with pytest.raises(ValueError, match=r"dy"):
        layer.backward(np.ones((8, C, 4)))


# -- bad input leaves everything unchanged -----------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", list(STATS))
def test_wrong_number_of_features_raises_and_keeps_state(kind, training):
    layer = affine_layer(STATS[kind]())
    for x in batches(count=2):
        layer(x)
    if kind == "exact":
        layer.stats.update(batches(count=1)[0], axis=(0, 2, 3))
    layer.train(training)
    before = state_of(layer)
    with pytest.raises(ValueError, match=r"expected 3 .*got 4"):
        layer(np.ones((8, 4, 4, 5)))
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind", list(STATS))
def test_non_finite_training_batch_raises_and_keeps_state(kind, bad):
    layer = affine_layer(STATS[kind]())
    for x in batches(count=2):
        layer(x)
    before = state_of(layer)
    x = batches(count=1, seed=12)[0]
    x[3, 1, 2, 2] = bad
    with pytest.raises(ValueError, match="x"):
        layer(x)
    assert_state_unchanged(layer, before)


@pytest.mark.parametrize(
    "make_layer",
    [
        lambda: ns.BatchNorm(C, stats=ns.Welford(nan_policy="skip")),
        lambda: ns.BatchNorm(C, stats="ema", nan_policy="skip"),
        lambda: ns.BatchNorm(C, stats=ns.CumulativeAverage(nan_policy="skip")),
    ],
    ids=["welford-instance", "ema-kwargs", "cumulative-instance"],
)
def test_nan_policy_skip_skips_the_batch(make_layer):
    layer = make_layer()
    for x in batches(count=2):
        layer(x)
    before = state_of(layer)
    x = batches(count=1, seed=13)[0]
    x[0, 0, 0, 0] = np.nan
    layer(x)
    assert layer.stats.num_batches_skipped == 1
    after = layer.stats.state_dict()
    skipped = [key for key in after if key.endswith("num_batches_skipped")]
    assert len(skipped) == 1
    assert after.pop(skipped[0]) == 1
    assert before.pop(skipped[0]) == 0
    assert_same_state(after, before)
    # Training goes on afterwards.
    layer(batches(count=1, seed=14)[0])
    assert layer.stats.num_batches == 3


# -- channels-last -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ema", "welford", "batch"])
def test_channels_last_equals_channels_first_on_transposed_data(kind):
    first = affine_layer(kind)
    last = affine_layer(kind, axis=-1)
    rng = np.random.default_rng(15)
    for x in batches():
        dy = rng.normal(size=x.shape)
        y_first = first(x)
        y_last = last(np.moveaxis(x, 1, -1).copy())
        np.testing.assert_allclose(y_last, np.moveaxis(y_first, 1, -1), rtol=1e-12, atol=1e-12)
        dx_first = first.backward(dy)
        dx_last = last.backward(np.moveaxis(dy, 1, -1).copy())
        np.testing.assert_allclose(dx_last, np.moveaxis(dx_first, 1, -1), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(last.grad_gamma, first.grad_gamma, rtol=1e-10)
        np.testing.assert_allclose(last.grad_beta, first.grad_beta, rtol=1e-10)
    if kind != "batch":
        np.testing.assert_allclose(last.stats.mean, first.stats.mean, rtol=1e-12)
        np.testing.assert_allclose(last.stats.var, first.stats.var, rtol=1e-12)
    test = batches(count=1, seed=16)[0]
    first.eval()
    last.eval()
    np.testing.assert_allclose(
        last(np.moveaxis(test, 1, -1)), np.moveaxis(first(test), 1, -1), rtol=1e-12, atol=1e-12
    )


def test_channels_last_checks_the_last_axis():
    layer = ns.BatchNorm(C, axis=-1)
    with pytest.raises(ValueError, match=r"expected 3 .*got 5"):
        layer(np.ones((4, C, 5)))


@pytest.mark.parametrize("ndim", [1, 6])
def test_input_rank_outside_2_to_5_raises(ndim):
    layer = ns.BatchNorm(C)
    with pytest.raises(ValueError, match=r"^x: "):
        layer(np.ones((2, C) + (2,) * (ndim - 2) if ndim >= 2 else (C,)))


# -- construction and the small API ------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "error", "parameter"),
    [
        ({"num_features": 0}, ValueError, "num_features"),
        ({"num_features": -2}, ValueError, "num_features"),
        ({"num_features": "3"}, TypeError, "num_features"),
        ({"num_features": 3.0}, TypeError, "num_features"),
        ({"num_features": True}, TypeError, "num_features"),
        ({"num_features": 3, "eps": -1}, ValueError, "eps"),
        ({"num_features": 3, "stats": "median"}, ValueError, "stats"),
        ({"num_features": 3, "stats": 42}, TypeError, "stats"),
        ({"num_features": 3, "stats": ns.Welford(), "momentum": 0.2}, TypeError, "stats"),
        ({"num_features": 3, "stats": "batch", "momentum": 0.2}, TypeError, "batch"),
        ({"num_features": 3, "stats": "ema", "momentum": 2.0}, ValueError, "momentum"),
    ],
    ids=[
        "zero-features",
        "negative-features",
        "str-features",
        "float-features",
        "bool-features",
        "negative-eps",
        "unknown-stats",
        "int-stats",
        "kwargs-with-instance",
        "kwargs-with-batch",
        "bad-momentum",
    ],
)
def test_constructor_errors_name_the_parameter(arguments, error, parameter):
    with pytest.raises(error, match=parameter):
        ns.BatchNorm(**arguments)


def test_unknown_stats_lists_the_choices():
    with pytest.raises(ValueError, match=r"'welford'.*got 'median'"):
        ns.BatchNorm(C, stats="median")


def test_parameters_are_value_gradient_pairs():
    layer = affine_layer("ema")
    pairs = layer.parameters()
    assert len(pairs) == 2
    assert pairs[0][0] is layer.gamma
    assert pairs[1][0] is layer.beta
    assert layer.gamma.dtype == np.float64
    assert layer.gamma.shape == (C,)
    x = batches(count=1)[0]
    layer(x)
    layer.backward(np.ones_like(x) * np.arange(C).reshape(1, C, 1, 1))
    (_, grad_gamma), (_, grad_beta) = layer.parameters()
    assert grad_gamma is layer.grad_gamma
    assert grad_beta is layer.grad_beta
    np.testing.assert_allclose(grad_beta, np.arange(C) * (x.size // C))
    assert ns.BatchNorm(C, affine=False).parameters() == []


def test_parameters_are_updated_in_place_by_an_optimizer():
    layer = affine_layer("ema")
    x = batches(count=1)[0]
    for value, _ in layer.parameters():
        value -= 0.5
    expected, _, _ = functional.train_forward(x, layer.gamma.copy(), layer.beta.copy(), eps=EPS)
    np.testing.assert_allclose(layer(x), expected)


def test_dtype_of_the_parameters():
    layer = ns.BatchNorm(C, dtype=np.float32)
    assert layer.gamma.dtype == np.float32
    assert layer.beta.dtype == np.float32
    y = layer(batches(count=1)[0].astype(np.float32))
    assert y.dtype == np.float32


def test_train_and_eval_return_the_layer():
    layer = ns.BatchNorm(C)
    assert layer.training is True
    assert layer.eval() is layer
    assert layer.training is False
    assert layer.train() is layer
    assert layer.training is True
    assert layer.train(False) is layer
    assert layer.training is False
