"""Loading the torch ``BatchNorm``'s state dicts: values are checked, and a
load that fails changes nothing.

Every failing load is compared with the layer's state dict taken before it (every key,
exactly); the errors come through torch's mechanism (``RuntimeError`` from
``load_state_dict``) and name the offending key. Loads that must still work (torch's dicts,
resumed states, float16 running variances beyond float16's range, meta-device layers) are
checked against the statistics they carry.
"""

from __future__ import annotations

import numpy as np
import pytest

from ...helpers import assert_same_state

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from normstats.adapters.torch import BatchNorm  # noqa: E402

C = 4
STRATEGIES = {
    "ema": {"stats": "ema"},
    "ema-debias": {"stats": "ema", "debias": True},
    "cumulative": {"stats": "cumulative"},
    "welford": {"stats": "welford"},
    "exact": {"stats": "exact"},
}
ARRAYS = {"ema": ("mean", "var"), "cumulative": ("mean", "var")}
POOLED_ARRAYS = ("mean_origin", "mean_offset", "m2")


def state_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def batches(count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [1.0 + 2.0 * torch.randn(6, C, 3, 3, generator=generator) for _ in range(count)]


def trained(strategy, seed=0):
    """A layer of ``strategy`` that has seen a few batches ("exact": a calibration)."""
    kwargs = STRATEGIES[strategy]
    layer = BatchNorm(C, **kwargs)
    data = batches(seed=seed)
    if kwargs["stats"] == "exact":
        from normstats.adapters.torch import recalibrate

        recalibrate(layer, data)
    else:
        for x in data:
            layer(x)
    return layer


def corrupted(state, key, value):
    """A copy of ``state`` with ``state[key]`` (or one element of it) replaced by ``value``."""
    state = {k: v.clone() for k, v in state.items()}
    if state[key].dim() == 0:
        state[key] = torch.tensor(value, dtype=state[key].dtype)
    else:
        state[key][1] = value
    return state


def assert_refused(layer, state, match, **kwargs):
    before = state_copy(layer)
    with pytest.raises(RuntimeError, match=match):
        layer.load_state_dict(state, **kwargs)
    assert_same_state(state_copy(layer), before)


# -- values are checked ----------------------------------------------------------------------


def invalid_cases():
    for strategy, kwargs in STRATEGIES.items():
        name = kwargs["stats"]
        arrays = ARRAYS.get(name, POOLED_ARRAYS)
        for array in arrays:
            yield strategy, f"{name}.{array}", float("nan"), "finite"
            yield strategy, f"{name}.{array}", float("inf"), "finite"
        spread = "var" if "var" in arrays else "m2"
        yield strategy, f"{name}.{spread}", -1.0, "non-negative values"
        yield strategy, f"{name}.count", -5.0, "non-negative integer"
        yield strategy, f"{name}.count", 2.5, "non-negative integer"
        yield strategy, f"{name}.count", float("nan"), "non-negative integer"
        yield strategy, f"{name}.num_batches", -1.0, "non-negative integer"
        yield strategy, f"{name}.num_batches", 0.0, "at least one batch"
        yield strategy, "num_batches_tracked", -3, "non-negative integer"
        yield strategy, "num_batches_skipped", -1, "non-negative integer"
        yield strategy, "running_mean", float("nan"), "NaN"
        yield strategy, "running_var", float("nan"), "NaN"
        yield strategy, "running_var", -1.0, "non-negative values"
    for name in ("welford", "exact"):  # a pool has at most one batch per sample
        yield name, f"{name}.num_batches", 1e6, "at most one per sample"


@pytest.mark.parametrize(
    ("strategy", "key", "value", "match"),
    list(invalid_cases()),
    ids=lambda v: str(v),
)
def test_a_state_dict_with_an_invalid_value_is_refused_and_changes_nothing(
    strategy, key, value, match
):
    source = trained(strategy, seed=1)
    layer = trained(strategy, seed=2)
    assert_refused(layer, corrupted(source.state_dict(), key, value), rf"{key}: .*{match}")


@pytest.mark.parametrize("stats", ["welford", "exact"])
def test_a_pool_with_batches_but_no_samples_is_refused(stats):
    state = corrupted(trained(stats).state_dict(), f"{stats}.count", 0.0)
    assert_refused(trained(stats, seed=3), state, rf"{stats}.count: expected .* both zero")


@pytest.mark.parametrize("strategy", ["ema", "ema-debias", "cumulative"])
@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("num_batches_tracked", -3, "non-negative integer"),
        ("running_mean", float("inf"), "finite"),
        ("running_var", float("nan"), "finite"),
        ("running_var", -1.0, "non-negative"),
    ],
)
def test_a_torch_state_dict_to_resume_from_is_checked_too(strategy, key, value, match):
    """Its running statistics become the strategy's state: they must be finite. (A debiased
    EMA resumed from num_batches_tracked=-3 used to report an infinite variance.)"""
    reference = nn.BatchNorm2d(C, momentum=None if strategy == "cumulative" else 0.1)
    for x in batches():
        reference(x)
    layer = trained(strategy)
    assert_refused(layer, corrupted(reference.state_dict(), key, value), rf"{key}: .*{match}")


def test_valid_edge_states_still_load():
    # a cumulative average resumed from 100 of torch's batches, then one batch of 54 samples:
    # fewer samples than batches, which only a resumed average may have
    reference = nn.BatchNorm2d(C, momentum=None)
    reference(batches(1)[0])
    state = reference.state_dict()
    state["num_batches_tracked"] = torch.tensor(100)
    layer = BatchNorm(C, stats="cumulative")
    layer.load_state_dict(state)
    layer(batches(1, seed=4)[0])
    assert float(layer.state_dict()["cumulative.count"]) == 54
    assert float(layer.state_dict()["cumulative.num_batches"]) == 101
    fresh = BatchNorm(C, stats="cumulative")
    fresh.load_state_dict(layer.state_dict())
    assert_same_state(state_copy(fresh), state_copy(layer))
    # a float16 layer whose variance float16 cannot hold keeps running_var = inf
    half = BatchNorm(C, stats="welford", dtype=torch.float16)
    half((316.0 * torch.randn(8, C, 4, 4)).half())
    assert torch.isinf(half.running_var).all()
    again = BatchNorm(C, stats="welford", dtype=torch.float16)
    again.load_state_dict(half.state_dict())
    assert_same_state(state_copy(again), state_copy(half))


# -- a failed load changes nothing ---------------------------------------------------------


def test_another_strategy_state_dict_is_refused_naming_both_and_how_to_convert():
    ema = trained("ema", seed=1)
    layer = trained("welford", seed=2)
    before = state_copy(layer)
    with pytest.raises(RuntimeError) as error:
        layer.load_state_dict(ema.state_dict())
    message = str(error.value)
    assert "strategy 'ema'" in message
    assert "'welford'" in message
    assert "stats='ema'" in message
    assert "weight, bias, running_mean, running_var, num_batches_tracked" in message
    assert_same_state(state_copy(layer), before)
    # converting as the message says: only torch's keys, and the pool resumes empty
    torch_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    layer.load_state_dict({k: v for k, v in ema.state_dict().items() if k in torch_keys})
    assert torch.equal(layer.running_mean, ema.running_mean)
    assert float(layer.state_dict()["welford.count"]) == 0


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_state_dict_of_another_strategy_inside_a_model_changes_nothing(strategy):
    other = "welford" if strategy != "welford" else "ema"
    model = nn.Sequential(nn.Linear(C, C), trained(strategy))
    source = nn.Sequential(nn.Linear(C, C), trained(other, seed=5))
    before = state_copy(model[1])
    with pytest.raises(RuntimeError, match=rf"1\.{other}\.\*: got the state of strategy"):
        model.load_state_dict(source.state_dict())
    assert_same_state(state_copy(model[1]), before)


@pytest.mark.parametrize("strategy", [*STRATEGIES, "batch"])
def test_a_state_dict_of_another_size_changes_nothing(strategy):
    layer = trained(strategy) if strategy != "batch" else BatchNorm(C, stats="batch")
    wide = nn.BatchNorm2d(2 * C)
    for x in batches():
        wide(torch.cat([x, x], dim=1))
    assert_refused(layer, wide.state_dict(), "size mismatch for weight")


@pytest.mark.parametrize("strategy", ["welford", "ema"])
def test_a_strict_load_with_a_missing_or_unknown_key_changes_nothing(strategy):
    layer = trained(strategy, seed=1)
    source = trained(strategy, seed=2).state_dict()
    name = STRATEGIES[strategy]["stats"]
    missing = {k: v for k, v in source.items() if k != f"{name}.count"}
    assert_refused(layer, missing, "Missing key")
    unknown = {**source, f"{name}.extra": torch.zeros(C)}
    assert_refused(layer, unknown, "Unexpected key")


def test_a_non_strict_load_copies_what_it_is_given():
    layer = trained("welford", seed=1)
    source = trained("ema", seed=2)
    result = layer.load_state_dict(source.state_dict(), strict=False)
    assert set(result.unexpected_keys) == {"ema.count", "ema.num_batches", "ema.mean", "ema.var"}
    assert torch.equal(layer.running_mean, source.running_mean)  # resumed from torch's keys
    assert float(layer.state_dict()["welford.count"]) == 0
    only_weights = BatchNorm(C, stats="exact")
    only_weights.load_state_dict({"weight": torch.full((C,), 2.0)}, strict=False)
    assert torch.equal(only_weights.weight, torch.full((C,), 2.0))


def test_the_state_dict_passed_is_not_written_to():
    reference = nn.BatchNorm2d(C)
    reference(batches(1)[0])
    given = {k: v for k, v in reference.state_dict().items() if k != "num_batches_tracked"}
    keys, values = list(given), [v.clone() for v in given.values()]
    layer = BatchNorm(C, stats="ema")
    layer._load_from_state_dict(given, "", {}, True, [], [], [])
    assert list(given) == keys
    for key, value in zip(keys, values, strict=True):
        assert torch.equal(given[key], value)
    assert torch.equal(layer.running_mean, reference.running_mean)


def test_a_meta_device_layer_loads_with_assign():
    source = trained("welford")
    layer = BatchNorm(C, stats="welford", device="meta")
    layer.load_state_dict(source.state_dict(), assign=True)
    assert_same_state(state_copy(layer), state_copy(source))
    assert layer.state_dict()["welford.m2"].dtype == torch.float64


@pytest.mark.parametrize("calibrated", [False, True])
def test_an_exact_layer_knows_from_a_loaded_dict_whether_it_is_calibrated(calibrated):
    source = trained("exact") if calibrated else BatchNorm(C, stats="exact")
    layer = trained("exact", seed=4) if not calibrated else BatchNorm(C, stats="exact")
    layer.load_state_dict(source.state_dict())
    layer.eval()
    x = batches(1, seed=6)[0]
    if calibrated:
        torch.testing.assert_close(layer(x), source.eval()(x))
    else:
        with pytest.raises(ValueError, match="recalibrate"):
            layer(x)
    layer.reset_running_stats()
    with pytest.raises(ValueError, match="recalibrate"):
        layer(x)
    assert np.all(layer.running_var.numpy() == 1.0)
