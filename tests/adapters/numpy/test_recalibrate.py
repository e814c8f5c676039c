"""``recalibrate``: the exact full pass for NumPy models.

The references are computed here, independently of the library: each layer's input is
collected by a NumPy forward written out in the test (Linear ``h @ W + b``, ReLU
``max(h, 0)``, BatchNorm with the biased batch statistics in training mode or with
``stats.mean`` / ``stats.var`` in evaluation mode), concatenated over the batches and reduced
with ``np.mean`` / ``np.var(ddof=1)``.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

import normstats as ns
from normstats.adapters import numpy as nsnp

from ...helpers import assert_same_state, snapshot

RTOL = 1e-10
STRATEGIES = ["ema", "cumulative", "welford", "exact"]
WIDTHS = (5, 8, 6, 4)


def make_model(stats=("welford",) * 3, seed=0):
    """Linear -> BN -> ReLU, three times, then Linear: L = 3 BatchNorm layers."""
    rng = np.random.default_rng(seed)
    layers = []
    for k, kind in enumerate(stats):
        linear = nsnp.Linear(WIDTHS[k], WIDTHS[k + 1], rng=seed + k)
        linear.bias[...] = rng.normal(size=WIDTHS[k + 1])
        bn = nsnp.BatchNorm(WIDTHS[k + 1], stats=kind)
        bn.gamma[...] = rng.uniform(0.5, 2.0, size=WIDTHS[k + 1])
        bn.beta[...] = rng.normal(size=WIDTHS[k + 1])
        layers += [linear, bn, nsnp.ReLU()]
    layers.append(nsnp.Linear(WIDTHS[len(stats)], 3, rng=seed + 10))
    return nsnp.Sequential(*layers)


def make_batches(sizes, seed=1):
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0.0, 2.0, size=WIDTHS[0])
    return [offsets + rng.normal(0.0, 1.5, size=(n, WIDTHS[0])) for n in sizes]


def train_some(model, seed=2):
    """A few training batches so that every strategy holds something before recalibration."""
    model.train()
    for x in make_batches([16, 16, 16], seed=seed):
        model.forward(3.0 * x + 1.0)
    return model


def batchnorms(model):
    return [layer for layer in nsnp.flatten(model) if isinstance(layer, ns.BatchNorm)]


def reference_inputs(model, batches, mode):
    """The concatenated input of every BatchNorm layer, by a NumPy forward written out here.

    ``mode="train"``: BatchNorm layers normalize with their batch mean and biased variance;
    ``mode="eval"``: with ``stats.mean`` / ``stats.var`` (batch statistics for "batch").
    """
    inputs = {}
    for x in batches:
        h = x
        for index, layer in enumerate(nsnp.flatten(model)):
            if isinstance(layer, nsnp.Linear):
                h = h @ layer.weight + layer.bias
            elif isinstance(layer, nsnp.ReLU):
                h = np.maximum(h, 0.0)
            else:
                inputs.setdefault(index, []).append(h)
                if mode == "train" or layer.stats is None:
                    mean, var = h.mean(axis=0), h.var(axis=0)
                else:
                    mean, var = np.asarray(layer.stats.mean), np.asarray(layer.stats.var)
                h = (h - mean) / np.sqrt(var + layer.eps) * layer.gamma + layer.beta
    return [np.concatenate(parts) for _, parts in sorted(inputs.items())]


def assert_pooled(layer, inputs, rtol=RTOL):
    np.testing.assert_allclose(layer.stats.mean, inputs.mean(axis=0), rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(layer.stats.var, inputs.var(axis=0, ddof=1), rtol=rtol)
    assert layer.stats.count == len(inputs)


UNEVEN = [2, 3, 7, 16, 32, 60]


# -- what the statistics are -------------------------------------------------------------


@pytest.mark.parametrize("stats", STRATEGIES)
def test_one_pass_pools_the_inputs_seen_in_training_mode(stats):
    model = train_some(make_model((stats,) * 3))
    batches = make_batches(UNEVEN)
    expected = reference_inputs(model, batches, mode="train")
    assert nsnp.recalibrate(model, batches) is model
    for layer, inputs in zip(batchnorms(model), expected, strict=True):
        assert_pooled(layer, inputs)


def test_one_pass_equals_the_model_run_in_training_mode_on_a_copy():
    # The same reference collected by running a deep copy of the model in training mode
    # (which feeds the copy's strategies, so the original must not be used).
    model = train_some(make_model())
    batches = make_batches(UNEVEN)
    replica = copy.deepcopy(model).train()
    collected = {id(layer): [] for layer in batchnorms(replica)}
    for x in batches:
        h = x
        for layer in nsnp.flatten(replica):
            if id(layer) in collected:
                collected[id(layer)].append(h)
            h = layer.forward(h)
    nsnp.recalibrate(model, batches)
    for layer, replica_layer in zip(batchnorms(model), batchnorms(replica), strict=True):
        assert_pooled(layer, np.concatenate(collected[id(replica_layer)]))


@pytest.mark.parametrize("stats", STRATEGIES)
def test_layerwise_pools_the_inputs_seen_in_evaluation_mode(stats):
    model = train_some(make_model((stats,) * 3))
    batches = make_batches(UNEVEN)
    nsnp.recalibrate(model, batches, layerwise=True)
    # Each layer's input in evaluation mode, upstream layers already recalibrated.
    expected = reference_inputs(model, batches, mode="eval")
    for layer, inputs in zip(batchnorms(model), expected, strict=True):
        assert_pooled(layer, inputs)


@pytest.mark.parametrize("layerwise", [False, True], ids=["one-pass", "layerwise"])
def test_statistics_do_not_depend_on_the_training_history(layerwise):
    batches = make_batches(UNEVEN)
    trained = train_some(make_model(("ema", "cumulative", "welford")))
    fresh = make_model(("ema", "cumulative", "welford"))
    nsnp.recalibrate(trained, batches, layerwise=layerwise)
    nsnp.recalibrate(fresh, batches, layerwise=layerwise)
    nsnp.recalibrate(fresh, batches, layerwise=layerwise)  # twice: replaced, not accumulated
    for a, b in zip(batchnorms(trained), batchnorms(fresh), strict=True):
        np.testing.assert_allclose(a.stats.mean, b.stats.mean, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(a.stats.var, b.stats.var, rtol=1e-13)
        assert b.stats.count == sum(UNEVEN)


def test_evaluation_after_recalibration_uses_the_pooled_statistics():
    model = train_some(make_model(("exact",) * 3))
    batches = make_batches(UNEVEN)
    nsnp.recalibrate(model, batches, layerwise=True)
    first, bn = model.layers[0], model.layers[1]
    test = make_batches([9], seed=5)[0]
    model.eval()
    inputs = reference_inputs(model, batches, mode="eval")[0]
    h = test @ first.weight + first.bias
    expected = (h - inputs.mean(axis=0)) / np.sqrt(inputs.var(axis=0, ddof=1) + bn.eps)
    np.testing.assert_allclose(bn.forward(h), expected * bn.gamma + bn.beta, rtol=1e-10, atol=1e-12)


def test_one_pass_and_layerwise_differ_for_small_batches_and_agree_for_one_big_batch():
    data = make_batches([2000], seed=3)[0]
    small = np.split(data, 500)  # batches of 4
    stats = {}
    for name, batches in (("small", small), ("big", [data])):
        for layerwise in (False, True):
            model = make_model()
            nsnp.recalibrate(model, batches, layerwise=layerwise)
            stats[name, layerwise] = [(bn.stats.mean, bn.stats.var) for bn in batchnorms(model)]

    def relative_difference(name, k, which):
        a, b = stats[name, False][k][which], stats[name, True][k][which]
        return float(np.max(np.abs(a - b) / np.abs(b)))

    # The first BatchNorm layer has no BatchNorm upstream: the same in both modes.
    for name in ("small", "big"):
        for which in (0, 1):
            assert relative_difference(name, 0, which) < 1e-12
    # Downstream, batch statistics of 4 samples are far from the population ones ...
    assert max(relative_difference("small", k, 1) for k in (1, 2)) > 0.05
    # ... and with one batch of 2000 they differ by ~ 1 / 2000 (biased vs unbiased variance).
    for k in (1, 2):
        for which in (0, 1):
            assert relative_difference("big", k, which) < 5e-3


def test_single_batchnorm_layer_on_image_batches():
    layer = nsnp.BatchNorm(3, stats="ema")
    rng = np.random.default_rng(4)
    batches = [rng.normal(2.0, 3.0, size=(n, 3, 4, 5)) for n in (1, 2, 5)]
    assert nsnp.recalibrate(layer, batches) is layer
    pooled = np.concatenate([np.moveaxis(b, 1, -1).reshape(-1, 3) for b in batches])
    assert_pooled(layer, pooled)


def test_tuples_of_input_and_label_are_accepted():
    batches = make_batches(UNEVEN)
    labels = [np.zeros(len(x), dtype=int) for x in batches]
    for layerwise in (False, True):
        plain, with_labels = make_model(), make_model()
        nsnp.recalibrate(plain, batches, layerwise=layerwise)
        nsnp.recalibrate(with_labels, list(zip(batches, labels, strict=True)), layerwise=layerwise)
        for a, b in zip(batchnorms(plain), batchnorms(with_labels), strict=True):
            assert_same_state(a.stats.state_dict(), b.stats.state_dict())


def test_generator_is_accepted_in_one_pass_mode():
    batches = make_batches(UNEVEN)
    model = make_model()
    nsnp.recalibrate(model, (x for x in batches))
    expected = reference_inputs(make_model(), batches, mode="train")
    for layer, inputs in zip(batchnorms(model), expected, strict=True):
        assert_pooled(layer, inputs)


# -- "batch" layers and modes --------------------------------------------------------------


@pytest.mark.parametrize("layerwise", [False, True], ids=["one-pass", "layerwise"])
def test_batch_layers_are_skipped(layerwise):
    model = train_some(make_model(("welford", "batch", "ema")))
    batches = make_batches(UNEVEN)
    nsnp.recalibrate(model, batches, layerwise=layerwise)
    first, middle, last = batchnorms(model)
    assert middle.stats is None
    expected = reference_inputs(model, batches, mode="eval" if layerwise else "train")
    assert_pooled(first, expected[0])
    assert_pooled(last, expected[2])


MODES = {
    "train": lambda layers: [True] * len(layers),
    "eval": lambda layers: [False] * len(layers),
    "mixed": lambda layers: [i % 2 == 0 for i in range(len(layers))],
}


@pytest.mark.parametrize("layerwise", [False, True], ids=["one-pass", "layerwise"])
@pytest.mark.parametrize("modes", list(MODES))
def test_modes_are_restored(modes, layerwise):
    model = train_some(make_model())
    model.train(modes == "train")
    layers = nsnp.flatten(model)
    for layer, mode in zip(layers, MODES[modes](layers), strict=True):
        layer.train(mode)
    nsnp.recalibrate(model, make_batches(UNEVEN), layerwise=layerwise)
    assert model.training is (modes == "train")
    assert [layer.training for layer in layers] == MODES[modes](layers)


# -- failures leave everything as it was ---------------------------------------------------


def states(model):
    return [None if layer.stats is None else snapshot(layer.stats) for layer in batchnorms(model)]


def assert_states(model, before):
    for layer, state in zip(batchnorms(model), before, strict=True):
        if state is None:
            assert layer.stats is None
        else:
            assert_same_state(layer.stats.state_dict(), state)


MIXED = ("ema", "welford", "exact")


def test_generator_with_layerwise_raises_and_changes_nothing():
    model = train_some(make_model(MIXED))
    before = states(model)
    batches = make_batches(UNEVEN)
    for one_shot in ((x for x in batches), iter(batches)):
        with pytest.raises(TypeError, match=r"batches: .*re-iterable"):
            nsnp.recalibrate(model, one_shot, layerwise=True)
        assert_states(model, before)
        assert all(layer.training for layer in nsnp.flatten(model))


def failing_source(batches, after):
    yield from batches[:after]
    raise RuntimeError("data source failed")


@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
def test_data_source_failing_midway_changes_nothing(mode):
    model = train_some(make_model(MIXED))
    model.train(mode)
    before = states(model)
    with pytest.raises(RuntimeError, match="data source failed"):
        nsnp.recalibrate(model, failing_source(make_batches(UNEVEN), after=2))
    assert_states(model, before)
    assert all(layer.training is mode for layer in nsnp.flatten(model))


class FailsAfter:
    """Re-iterable data that raises once ``limit`` batches were read (over all passes)."""

    def __init__(self, batches, limit):
        self.batches, self.limit, self.read = batches, limit, 0

    def __iter__(self):
        for batch in self.batches:
            if self.read == self.limit:
                raise RuntimeError("data source failed")
            self.read += 1
            yield batch


@pytest.mark.parametrize("failing_pass", [1, 2, 3])
def test_layerwise_failure_after_some_layers_restores_every_layer(failing_pass):
    # Layers calibrated by the passes before the failure are rolled back too.
    model = train_some(make_model(MIXED))
    before = states(model)
    data = FailsAfter(make_batches(UNEVEN), limit=(failing_pass - 1) * len(UNEVEN) + 1)
    with pytest.raises(RuntimeError, match="data source failed"):
        nsnp.recalibrate(model, data, layerwise=True)
    assert_states(model, before)
    assert all(layer.training for layer in nsnp.flatten(model))


@pytest.mark.parametrize("layerwise", [False, True], ids=["one-pass", "layerwise"])
def test_bad_batch_midway_changes_nothing(layerwise):
    model = train_some(make_model(MIXED))
    before = states(model)
    batches = [*make_batches([8, 8]), np.ones((8, WIDTHS[0] + 1)), *make_batches([8])]
    with pytest.raises(ValueError, match="x"):
        nsnp.recalibrate(model, batches, layerwise=layerwise)
    assert_states(model, before)


def test_non_finite_batch_changes_nothing():
    model = train_some(make_model(MIXED))
    before = states(model)
    batches = make_batches([8, 8, 8])
    batches[1][2, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        nsnp.recalibrate(model, batches)
    assert_states(model, before)


# -- layerwise early exit ---------------------------------------------------------------------


def count_forward_calls(monkeypatch, model):
    """Wrap every leaf layer's ``forward``; return the list of call counters."""
    counts = []
    for layer in nsnp.flatten(model):
        counter = [0]
        original = layer.forward

        def forward(x, original=original, counter=counter):
            counter[0] += 1
            return original(x)

        monkeypatch.setattr(layer, "forward", forward)
        counts.append(counter)
    return counts


def test_layerwise_stops_each_pass_at_its_layer(monkeypatch):
    model = train_some(make_model())
    layers = nsnp.flatten(model)
    positions = [i for i, layer in enumerate(layers) if isinstance(layer, ns.BatchNorm)]
    n_bn, n_batches = len(positions), len(UNEVEN)
    counts = count_forward_calls(monkeypatch, model)
    nsnp.recalibrate(model, make_batches(UNEVEN), layerwise=True)
    calls = [c[0] for c in counts]
    # Pass k runs the layers before the k-th BatchNorm layer, and no further.
    expected = [n_batches * sum(p > i for p in positions) for i in range(len(layers))]
    assert calls == expected
    assert calls[0] == n_bn * n_batches  # the first Linear: once per pass
    assert calls[-1] == 0  # the last Linear: never
    # About (L + 1) / 2 full passes, not L.
    assert sum(calls) <= (n_bn + 1) / 2 * len(layers) * n_batches


def test_one_pass_runs_the_model_once_and_stops_at_the_last_batchnorm(monkeypatch):
    model = train_some(make_model())
    layers = nsnp.flatten(model)
    counts = count_forward_calls(monkeypatch, model)
    nsnp.recalibrate(model, make_batches(UNEVEN))
    calls = [c[0] for c in counts]
    last_bn = max(i for i, layer in enumerate(layers) if isinstance(layer, ns.BatchNorm))
    for i, layer in enumerate(layers):
        if i >= last_bn:
            assert calls[i] == 0, i
        elif not isinstance(layer, ns.BatchNorm):
            assert calls[i] == len(UNEVEN), i


# -- the shared algorithm -------------------------------------------------------------------


def test_the_shared_algorithm_and_the_numpy_adapter_do_not_import_torch():
    code = (
        "import sys, normstats.adapters.recalibration, normstats.adapters.numpy; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_max_batches_limits_each_pass():
    batches = make_batches(UNEVEN)
    for layerwise in (False, True):
        limited, reference = make_model(), make_model()
        nsnp.recalibrate(limited, batches, layerwise=layerwise, max_batches=3)
        nsnp.recalibrate(reference, batches[:3], layerwise=layerwise)
        for a, b in zip(batchnorms(limited), batchnorms(reference), strict=True):
            assert_same_state(a.stats.state_dict(), b.stats.state_dict())
        assert batchnorms(limited)[0].stats.count == sum(UNEVEN[:3])


@pytest.mark.parametrize(
    ("max_batches", "error"), [(0, ValueError), (True, TypeError), (2.0, TypeError)]
)
def test_max_batches_that_is_not_a_positive_int_is_refused(max_batches, error):
    model = train_some(make_model(MIXED))
    before = states(model)
    with pytest.raises(error, match="max_batches: expected a positive int"):
        nsnp.recalibrate(model, make_batches(UNEVEN), max_batches=max_batches)
    assert_states(model, before)
