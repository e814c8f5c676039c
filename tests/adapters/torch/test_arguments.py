"""The torch ``BatchNorm``'s constructor arguments: checked, and an
estimator instance's settings followed.

References: PyTorch's own layer for what a setting does, plain torch arithmetic for the
statistics an instance's settings give (a debiased EMA's estimate after one batch is that
batch's mean and unbiased variance), and the instance's ``state_dict`` before and after.
"""

from __future__ import annotations

import numpy as np
import pytest

import normstats as ns

from ...helpers import assert_same_state, snapshot

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from normstats.adapters.torch import BatchNorm, revert  # noqa: E402

C = 4
STRATEGIES = ["ema", "cumulative", "welford", "exact", "batch"]


def state_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def batch(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return 2.0 + 3.0 * torch.randn(n, C, 3, 3, generator=generator)


# -- an estimator instance brings its settings -------------------------------------------


def test_an_instance_with_nan_policy_raise_makes_the_layer_raise():
    layer = BatchNorm(C, stats=ns.Welford(nan_policy="raise"))
    assert layer.nan_policy == "raise"
    layer(batch())
    before = state_copy(layer)
    x = batch(seed=1)
    x[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer(x)
    assert_same_state(state_copy(layer), before)


@pytest.mark.parametrize(
    "instance",
    [
        ns.Welford(nan_policy="skip"),
        ns.CumulativeAverage(nan_policy="raise"),
        ns.ExactFullPass(nan_policy="raise"),
        ns.EMA(momentum=0.25, debias=True, nan_policy="raise"),
    ],
    ids=repr,
)
def test_the_layer_runs_with_every_setting_of_the_instance(instance):
    layer = BatchNorm(C, stats=instance)
    assert layer.strategy is not instance
    assert repr(layer.strategy) == repr(instance)
    assert layer.nan_policy == instance.nan_policy
    if isinstance(instance, ns.EMA):
        assert layer.momentum == 0.25


def test_an_ema_instance_brings_momentum_and_debias():
    """Debiased, the estimate after one batch is the batch's own statistics; PyTorch's
    initialization would give 0.25 * mean and 0.75 + 0.25 * var."""
    x = batch()
    layer = BatchNorm(C, stats=ns.EMA(momentum=0.25, debias=True), momentum=0.1)
    layer(x)
    torch.testing.assert_close(layer.running_mean, x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(layer.running_var, x.var(dim=(0, 2, 3)))
    assert layer.momentum == 0.25
    reverted = revert(layer)
    assert reverted.momentum == 0.25


def test_an_explicit_nan_policy_must_agree_with_the_instance():
    with pytest.raises(ValueError, match=r"^nan_policy: .*'raise'.*'skip'"):
        BatchNorm(C, stats=ns.Welford(nan_policy="raise"), nan_policy="skip")
    assert BatchNorm(C, stats=ns.Welford(nan_policy="raise"), nan_policy="raise").nan_policy == (
        "raise"
    )


@pytest.mark.parametrize("stats", ["ema", "cumulative", "welford", "exact"])
def test_a_strategy_name_defaults_to_skip(stats):
    assert BatchNorm(C, stats=stats).nan_policy == "skip"
    assert BatchNorm(C, stats=stats).strategy.nan_policy == "skip"
    assert BatchNorm(C, stats=stats, nan_policy="raise").strategy.nan_policy == "raise"


def test_the_instance_is_never_read_or_modified_by_the_layer():
    instance = ns.Welford()
    before = snapshot(instance)
    layer = BatchNorm(C, stats=instance)
    for seed in range(3):
        layer(batch(seed=seed))
    assert_same_state(snapshot(instance), before)
    assert instance.count == 0
    layer_state = state_copy(layer)
    instance.update(np.ones((5, C)))  # and the layer does not follow the instance
    assert_same_state(state_copy(layer), layer_state)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize(
    "build", [ns.Welford, ns.ExactFullPass, ns.CumulativeAverage, ns.EMA], ids=lambda c: c.name
)
def test_an_instance_that_has_seen_batches_brings_its_statistics(build, kind):
    rng = np.random.default_rng(3)
    instance = build()
    for n in (5, 7):
        data = rng.normal(4.0, 2.0, size=(n, C))
        instance.update(torch.from_numpy(data) if kind == "torch" else data)
    before = snapshot(instance)
    layer = BatchNorm(C, stats=instance)
    mean, var = (torch.as_tensor(np.asarray(v)) for v in (instance.mean, instance.var))
    torch.testing.assert_close(layer.running_mean, mean.float())
    torch.testing.assert_close(layer.running_var, var.float())
    torch.testing.assert_close(layer.population_statistics()[0], mean, rtol=0, atol=0)
    assert int(layer.num_batches_tracked) == instance.num_batches == 2
    layer.eval()  # an exact instance brings a calibration: it evaluates
    layer(batch())
    assert_same_state(snapshot(instance), before)


def test_an_instance_with_another_feature_count_is_refused():
    instance = ns.Welford()
    instance.update(np.ones((3, C + 1)))
    with pytest.raises(ValueError, match=rf"^stats: expected .*{C} features.*\({C + 1},\)"):
        BatchNorm(C, stats=instance)


# -- every argument is checked ------------------------------------------------------------


BAD = [
    ({"nan_policy": "bogus"}, ValueError, "nan_policy"),
    ({"nan_policy": 1}, TypeError, "nan_policy"),
    ({"momentum": -1}, ValueError, "momentum"),
    ({"momentum": 0.0}, ValueError, "momentum"),
    ({"momentum": 1.5}, ValueError, "momentum"),
    ({"momentum": float("nan")}, ValueError, "momentum"),
    ({"momentum": "x"}, TypeError, "momentum"),
    ({"momentum": True}, TypeError, "momentum"),
    ({"eps": -1e-5}, ValueError, "eps"),
    ({"eps": float("inf")}, ValueError, "eps"),
    ({"eps": float("nan")}, ValueError, "eps"),
    ({"eps": "x"}, TypeError, "eps"),
    ({"affine": "yes"}, TypeError, "affine"),
    ({"sync": 2}, TypeError, "sync"),
    ({"bias": None}, TypeError, "bias"),
]


@pytest.mark.parametrize("stats", STRATEGIES)
@pytest.mark.parametrize(("kwargs", "error", "name"), BAD, ids=lambda v: repr(v)[:30])
def test_a_bad_argument_is_refused_naming_it(stats, kwargs, error, name):
    with pytest.raises(error, match=f"^{name}: expected"):
        BatchNorm(C, stats=stats, **kwargs)


@pytest.mark.parametrize(
    ("num_features", "error"),
    [(0, ValueError), (-2, ValueError), (4.0, TypeError), ("4", TypeError), (True, TypeError)],
)
def test_num_features_must_be_a_positive_int(num_features, error):
    with pytest.raises(error, match=r"^num_features: expected a positive int"):
        BatchNorm(num_features)


def test_numpy_scalars_are_accepted_wherever_python_numbers_are():
    layer = BatchNorm(
        np.int64(C),
        eps=np.float32(1e-5),
        momentum=np.float64(0.1),
        affine=np.bool_(True),
        sync=np.bool_(False),
    )
    reference = nn.BatchNorm2d(C, eps=float(np.float32(1e-5)), momentum=0.1)
    assert type(layer.num_features) is int
    assert type(layer.eps) is float
    assert type(layer.momentum) is float
    assert layer.affine is True
    assert layer.sync is False
    x = batch()
    torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    reverted = revert(layer)
    assert (reverted.eps, reverted.momentum) == (reference.eps, reference.momentum)
