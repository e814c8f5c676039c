"""``at_test_time`` for NumPy models, against references computed here with NumPy.

Inside the block the model's leaves are run one by one, so that each BatchNorm's input and
output are seen; the output is checked against the strategy's definition computed from that
input with ``np.mean`` / ``np.var``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import normstats as ns
from normstats.adapters import numpy as nsnp

from ...helpers import assert_same_state

RTOL = {"rtol": 1e-10, "atol": 1e-10}


def trained_model(stats=("ema", "welford")):
    """Linear-BN-ReLU, Linear-BN-ReLU (nested), Linear, trained on a few batches."""
    rng = np.random.default_rng(0)
    first = nsnp.Sequential(
        nsnp.Linear(5, 8, rng=1), nsnp.BatchNorm(8, stats=stats[0]), nsnp.ReLU()
    )
    model = nsnp.Sequential(
        first, nsnp.Linear(8, 6, rng=2), nsnp.BatchNorm(6, stats=stats[1]), nsnp.ReLU()
    )
    model.layers.append(nsnp.Linear(6, 3, rng=3))
    for layer in nsnp.flatten(model):
        if isinstance(layer, ns.BatchNorm):
            layer.gamma[...] = rng.uniform(0.5, 2.0, size=layer.num_features)
            layer.beta[...] = rng.normal(size=layer.num_features)
    model.train()
    for _ in range(4):
        model.forward(rng.normal(size=(16, 5)))
    return model.eval()


def shifted_batches(sizes=(6, 9, 4)):
    rng = np.random.default_rng(1)
    return [0.5 * rng.normal(size=(n, 5)) + 0.8 for n in sizes]


def leaf_by_leaf(model, batches):
    """Model outputs, and every BatchNorm's (input, output) per batch, running the leaves."""
    records: dict[ns.BatchNorm, list[tuple[np.ndarray, np.ndarray]]] = {}
    outputs = []
    for x in batches:
        h = x
        for leaf in nsnp.flatten(model):
            out = leaf.forward(h)
            if isinstance(leaf, ns.BatchNorm):
                records.setdefault(leaf, []).append((h, out))
            h = out
        outputs.append(h)
    return outputs, records


def normalized(layer, x, mean, var):
    return layer.gamma * (x - mean) / np.sqrt(var + layer.eps) + layer.beta


def sources(model):
    return {
        layer: tuple(np.asarray(s, dtype=np.float64) for s in layer.population_statistics())
        for layer in nsnp.flatten(model)
        if isinstance(layer, ns.BatchNorm)
    }


@pytest.mark.parametrize("prior", [0, 3, 16.5])
def test_prior_is_the_formula_on_each_layers_input(prior):
    model = trained_model()
    source = sources(model)
    batches = shifted_batches()
    with nsnp.at_test_time(model, f"prior:{prior}"):
        outputs, records = leaf_by_leaf(model, batches)
        direct = [model(x) for x in batches]
    for got, want in zip(direct, outputs, strict=True):
        np.testing.assert_allclose(got, want, **RTOL)
    for layer, seen in records.items():
        mu_s, var_s = source[layer]
        for x, y in seen:
            n = len(x)
            mean = prior / (prior + n) * mu_s + n / (prior + n) * x.mean(axis=0)
            var = prior / (prior + n) * var_s + n / (prior + n) * x.var(axis=0)
            np.testing.assert_allclose(y, normalized(layer, x, mean, var), **RTOL)


def test_batch_normalizes_with_the_batch_and_updates_nothing():
    model = trained_model()
    before = [copy.deepcopy(layer.stats.state_dict()) for layer in sources(model)]
    with nsnp.at_test_time(model, "batch"):
        _, records = leaf_by_leaf(model, shifted_batches())
    for layer, seen in records.items():
        for x, y in seen:
            np.testing.assert_allclose(y, normalized(layer, x, x.mean(0), x.var(0)), **RTOL)
    for layer, state in zip(sources(model), before, strict=True):
        assert_same_state(layer.stats.state_dict(), state)


def test_stream_ema_is_the_moving_average_of_each_layers_inputs():
    model = trained_model()
    source = sources(model)
    with nsnp.at_test_time(model, "stream:ema:0.25:debias"):
        _, records = leaf_by_leaf(model, shifted_batches())
    for layer, seen in records.items():
        # debiased: the source counts as the first batch, so the estimate is the average of
        # the source and the batches, the k-th newest weighted m (1 - m)^k
        weights, means, variances = [0.25], [source[layer][0]], [source[layer][1]]
        for x, y in seen:
            weights = [w * 0.75 for w in weights] + [0.25]
            means.append(x.mean(0))
            variances.append(x.var(0, ddof=1))
            total = sum(weights)
            mean = sum(w * m for w, m in zip(weights, means, strict=True)) / total
            var = sum(w * v for w, v in zip(weights, variances, strict=True)) / total
            np.testing.assert_allclose(y, normalized(layer, x, mean, var), **RTOL)


def test_stream_welford_equals_the_estimator_fed_the_same_batches():
    model = trained_model()
    source = sources(model)
    with nsnp.at_test_time(model, "stream:welford") as adapted:
        _, records = leaf_by_leaf(model, shifted_batches())
        adapted.reset()
        _, again = leaf_by_leaf(model, shifted_batches())
    for layer, seen in records.items():
        mu_s, var_s = source[layer]
        first = len(seen[0][0])
        union = [np.broadcast_to(mu_s, (first, layer.num_features))]  # mean of the source
        spread = var_s * (first - 1)
        for step, (x, y) in enumerate(seen):
            union.append(x)
            values = np.concatenate(union)
            mean = values.mean(0)
            m2 = spread + ((values - mean) ** 2).sum(0)
            # the source's first batch: its values sit at its mean; its M2 added as given
            np.testing.assert_allclose(
                y, normalized(layer, x, mean, m2 / (len(values) - 1)), **RTOL
            )
            np.testing.assert_allclose(again[layer][step][1], y, rtol=0, atol=0)


def test_adapt_equals_recalibrate_and_rolls_back():
    model = trained_model()
    batches = shifted_batches()
    reference = nsnp.recalibrate(copy.deepcopy(model), batches).eval()
    before = [copy.deepcopy(layer.stats.state_dict()) for layer in sources(model)]
    modes = [leaf.training for leaf in nsnp.flatten(model)]
    with nsnp.at_test_time(model, "adapt", batches):
        outputs = [model(x) for x in batches]
    for got, x in zip(outputs, batches, strict=True):
        np.testing.assert_array_equal(got, reference(x))
    for layer, state in zip(sources(model), before, strict=True):
        assert_same_state(layer.stats.state_dict(), state)
    assert [leaf.training for leaf in nsnp.flatten(model)] == modes


@pytest.mark.parametrize("strategy", ["adapt", "batch", "prior:4", "stream:ema:0.1"])
def test_the_model_is_restored_when_the_body_raises(strategy):
    model = trained_model()
    model.layers[0].train()  # a nested Sequential in training mode, the rest in evaluation
    before = [copy.deepcopy(layer.stats.state_dict()) for layer in sources(model)]
    modules = [model, model.layers[0], *nsnp.flatten(model)]
    modes = [m.training for m in modules]
    batches = shifted_batches()

    def fail_inside():
        with nsnp.at_test_time(model, strategy, batches if strategy == "adapt" else None):
            assert not any(m.training for m in modules)
            model(batches[0])
            raise RuntimeError("the body failed")

    with pytest.raises(RuntimeError, match="body"):
        fail_inside()
    for layer, state in zip(sources(model), before, strict=True):
        assert_same_state(layer.stats.state_dict(), state)
        assert "forward" not in vars(layer)
    assert [m.training for m in modules] == modes


def test_bad_names_and_data_are_refused_naming_the_parameter():
    model = trained_model()
    with (
        pytest.raises(ValueError, match=r"^strategy: .*got 'prior:-2'"),
        nsnp.at_test_time(model, "prior:-2"),
    ):
        pass
    with pytest.raises(ValueError, match=r"^batches: 'adapt'"), nsnp.at_test_time(model, "adapt"):
        pass
    with (
        pytest.raises(ValueError, match=r"^batches: only 'adapt'"),
        nsnp.at_test_time(model, "prior:1", shifted_batches()),
    ):
        pass
    uncalibrated = nsnp.Sequential(nsnp.Linear(5, 4, rng=0), nsnp.BatchNorm(4, stats="exact"))
    with (
        pytest.raises(ValueError, match=r"^stats: .*recalibrate"),
        nsnp.at_test_time(uncalibrated.eval(), "prior:1"),
    ):
        pass
    assert uncalibrated.training is False
