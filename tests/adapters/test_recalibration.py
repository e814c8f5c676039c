"""One recalibration algorithm for both adapters: the NumPy and the torch adapter, given the
same network (the same weights, layer for layer) and the same data, give the same statistics,
skip the same batches with the same warning, raise the same error and stop their forwards at
the same layers.

The statistics are also checked against a reference written out here in NumPy: each
BatchNorm layer's input collected by a plain forward (Linear ``h @ W + b``, ReLU, BatchNorm
with batch statistics in one pass or with the layer's population statistics layer by
layer), concatenated over the finite batches and reduced with ``np.mean`` /
``np.var(ddof=1)``.
"""

from __future__ import annotations

import itertools
import re
import sys
import warnings

import numpy as np
import pytest

import normstats as ns
from normstats.adapters import numpy as nsnp
from normstats.adapters import recalibration

from ..helpers import assert_same_state

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from normstats.adapters import torch as nstorch  # noqa: E402

WIDTHS = (3, 5, 4, 2)
SIZES = (5, 16, 7, 9)
SPOILED = 16
"""The size of the batch that the Poison layers spoil (batch 1 of SIZES)."""
RTOL = 1e-12


class NumpyPoison(nsnp.layers.Module):
    """Puts NaN into the batches of ``SPOILED`` samples, in whatever pass."""

    def forward(self, x):
        if len(x) != SPOILED:
            return x
        x = x.copy()
        x[0, 0] = np.nan
        return x


class TorchPoison(nn.Module):
    def forward(self, x):
        if len(x) != SPOILED:
            return x
        x = x.clone()
        x[0, 0] = float("nan")
        return x


def weights(seed=0):
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(m, n)), rng.normal(size=n), rng.uniform(0.5, 2, n), rng.normal(size=n))
        for m, n in itertools.pairwise(WIDTHS)
    ]


def numpy_net(policy, poison=False):
    """Linear, BatchNorm, (Poison,) ReLU per block: the first BatchNorm's input is always
    finite, the later ones' are not in the spoiled batch when ``poison``."""
    layers = []
    for w, b, gamma, beta in weights():
        linear = nsnp.Linear(*w.shape)
        linear.weight[...], linear.bias[...] = w, b
        bn = nsnp.BatchNorm(len(b), stats="exact", nan_policy=policy)
        bn.gamma[...], bn.beta[...] = gamma, beta
        layers += [linear, bn, *([NumpyPoison()] if poison else []), nsnp.ReLU()]
    return nsnp.Sequential(*layers)


def torch_net(policy, poison=False):
    """The same network in torch: a Sequential whose modules are named like the NumPy
    leaves' positions."""
    layers = []
    for w, b, gamma, beta in weights():
        linear = nn.Linear(*w.shape, dtype=torch.float64)
        bn = nstorch.BatchNorm(len(b), stats="exact", nan_policy=policy, dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(w.T))
            linear.bias.copy_(torch.from_numpy(b))
            bn.weight.copy_(torch.from_numpy(gamma))
            bn.bias.copy_(torch.from_numpy(beta))
        layers += [linear, bn, *([TorchPoison()] if poison else []), nn.ReLU()]
    return nn.Sequential(*layers)


def batches():
    rng = np.random.default_rng(1)
    offset = rng.normal(0.0, 2.0, size=WIDTHS[0])
    return [offset + rng.normal(0.0, 1.5, size=(n, WIDTHS[0])) for n in SIZES]


def run_numpy(model, data, **kwargs):
    return nsnp.recalibrate(model, [x.copy() for x in data], **kwargs)


def run_torch(model, data, **kwargs):
    return nstorch.recalibrate(model, [torch.from_numpy(x) for x in data], **kwargs)


def numpy_layers(model):
    return [m for m in nsnp.flatten(model) if isinstance(m, ns.BatchNorm)]


def torch_layers(model):
    return [m for m in model if isinstance(m, nstorch.BatchNorm)]


def numpy_statistics(model):
    return [
        (np.asarray(m.stats.mean), np.asarray(m.stats.var), m.stats.num_batches_skipped)
        for m in numpy_layers(model)
    ]


def torch_statistics(model):
    return [
        (m.running_mean.numpy(), m.running_var.numpy(), int(m.num_batches_skipped))
        for m in torch_layers(model)
    ]


def reference_statistics(layerwise, data, spoiled_from=None):
    """Per BatchNorm layer: (mean, var, batches left out) of its input over the batches
    it keeps, by a NumPy forward written out here.

    One pass: upstream layers normalize with batch mean and biased variance, and a batch
    that spoils any layer's input is left out of every pool. Layer by layer: upstream
    layers normalize with the statistics found for them, and a batch is left out of the
    pools of the layers whose input it spoils (those from index ``spoiled_from`` on; None:
    no batch is spoiled).
    """
    params = weights()
    found = []
    for k in range(len(params)):
        keep_all = spoiled_from is None or (layerwise and k < spoiled_from)
        pool = [x for x in data if keep_all or len(x) != SPOILED]
        inputs = []
        for x in pool:
            h = x
            for j, (w, b, gamma, beta) in enumerate(params[: k + 1]):
                h = h @ w + b
                if j == k:
                    break
                mean, var = found[j][:2] if layerwise else (h.mean(axis=0), h.var(axis=0))
                h = np.maximum((h - mean) / np.sqrt(var + 1e-5) * gamma + beta, 0.0)
            inputs.append(h)
        h = np.concatenate(inputs)
        found.append((h.mean(axis=0), h.var(axis=0, ddof=1), len(data) - len(pool)))
    return found


def assert_statistics(actual, expected):
    assert len(actual) == len(expected)
    for (mean, var, skipped), (ref_mean, ref_var, ref_skipped) in zip(
        actual, expected, strict=True
    ):
        np.testing.assert_allclose(mean, ref_mean, rtol=RTOL, atol=1e-14)
        np.testing.assert_allclose(var, ref_var, rtol=RTOL)
        assert skipped == ref_skipped


def recorded(run):
    """``run()``'s RuntimeWarning messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


# -- the NaN policy is the same in both adapters --------------------------------------------


@pytest.mark.parametrize("poison", [False, True], ids=["nan-input", "nan-downstream"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["one-pass", "layerwise"])
def test_skip_gives_the_same_statistics_counts_and_warning_in_both_adapters(layerwise, poison):
    data = batches()
    if not poison:  # the NaN is in the data: every layer's input is not finite
        data[1][2, 0] = np.nan
    np_model, torch_model = numpy_net("skip", poison), torch_net("skip", poison)
    np_warnings = recorded(lambda: run_numpy(np_model, data, layerwise=layerwise))
    torch_warnings = recorded(lambda: run_torch(torch_model, data, layerwise=layerwise))
    expected = reference_statistics(layerwise, data, spoiled_from=1 if poison else 0)
    assert_statistics(numpy_statistics(np_model), expected)
    assert_statistics(torch_statistics(torch_model), expected)
    assert len(np_warnings) == 1
    assert np_warnings == torch_warnings
    if layerwise and poison:  # the first layer's input is finite: it keeps every batch
        assert "1 for layer '5', 1 for layer '9'" in np_warnings[0]
        assert "layer '1'" not in np_warnings[0]


@pytest.mark.parametrize("poison", [False, True], ids=["nan-input", "nan-downstream"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["one-pass", "layerwise"])
def test_raise_gives_the_same_error_in_both_adapters_and_changes_nothing(layerwise, poison):
    data = batches()
    if not poison:
        data[1][2, 0] = np.nan
    np_model, torch_model = numpy_net("raise", poison), torch_net("raise", poison)
    np_before = [m.stats.state_dict() for m in numpy_layers(np_model)]
    torch_before = {k: v.clone() for k, v in torch_model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or Inf in batch 1") as np_error:
        run_numpy(np_model, data, layerwise=layerwise)
    with pytest.raises(ValueError, match="NaN or Inf in batch 1") as torch_error:
        run_torch(torch_model, data, layerwise=layerwise)
    # the same message, but for the parameter each adapter's recalibrate names
    np_message = str(np_error.value)
    assert np_message.startswith("batches: ")
    assert str(torch_error.value) == "data: " + np_message.removeprefix("batches: ")
    assert f"at the input of layer '{5 if poison else 1}'" in np_message
    for layer, state in zip(numpy_layers(np_model), np_before, strict=True):
        assert_same_state(layer.stats.state_dict(), state)
    assert_same_state(torch_model.state_dict(), torch_before)


# -- both adapters run the one algorithm ------------------------------------------------------


def test_both_adapters_run_the_shared_algorithm(monkeypatch):
    calls = []
    algorithm = recalibration.recalibrate

    def spy(network, data, **kwargs):
        calls.append(network)
        return algorithm(network, data, **kwargs)

    monkeypatch.setattr(recalibration, "recalibrate", spy)
    data = batches()
    np_model, torch_model = numpy_net("skip"), torch_net("skip")
    run_numpy(np_model, data, layerwise=True, max_batches=3)
    run_torch(torch_model, data, layerwise=True, max_batches=3)
    assert len(calls) == 2
    assert all(isinstance(network, recalibration.Network) for network in calls)
    assert type(calls[0]).__module__ == "normstats.adapters.numpy.recalibrate"
    assert type(calls[1]).__module__ == "normstats.adapters.torch.recalibrate"
    expected = reference_statistics(True, data[:3])
    assert_statistics(numpy_statistics(np_model), expected)
    assert_statistics(torch_statistics(torch_model), expected)


# -- early exit: the same forwards in both adapters -------------------------------------------


def numpy_calls(monkeypatch, model):
    counts = []
    for layer in nsnp.flatten(model):
        counter = [0]

        def forward(x, original=layer.forward, counter=counter):
            counter[0] += 1
            return original(x)

        monkeypatch.setattr(layer, "forward", forward)
        counts.append(counter)
    return counts


def torch_calls(model):
    counts = []
    for module in model:
        counter = [0]

        def hook(module, args, output, counter=counter):
            counter[0] += 1

        module.register_forward_hook(hook)
        counts.append(counter)
    return counts


def test_layerwise_stops_each_pass_at_its_layer_in_both_adapters(monkeypatch):
    """L = 3 BatchNorm layers at positions 1, 4, 7: pass k runs the layers before the k-th
    BatchNorm layer and stops at its input, so the modules before BatchNorm k run in passes
    k..L, a BatchNorm layer in the passes after its own, the last ReLU never; in all
    (L + 1) / 2 forward passes' worth of Linear layers."""
    data = batches()
    np_model, torch_model = numpy_net("skip"), torch_net("skip")
    np_counts = numpy_calls(monkeypatch, np_model)
    torch_counts = torch_calls(torch_model)
    run_numpy(np_model, data, layerwise=True)
    run_torch(torch_model, data, layerwise=True)
    np_calls = [c[0] for c in np_counts]
    torch_calls_ = [c[0] for c in torch_counts]
    n, depth = len(data), len(WIDTHS) - 1
    positions = [1, 4, 7]
    expected = [n * sum(p > i for p in positions) for i in range(3 * depth)]
    assert expected == [3 * n, 2 * n, 2 * n, 2 * n, n, n, n, 0, 0]
    assert np_calls == torch_calls_ == expected
    linears = [np_calls[p - 1] for p in positions]
    assert sum(linears) / (n * depth) == (depth + 1) / 2


# -- progress bars without tqdm ------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["numpy", "torch"])
def test_progress_without_tqdm_says_what_to_install_and_changes_nothing(monkeypatch, adapter):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    data = batches()
    if adapter == "numpy":
        model = numpy_net("skip")
        run_numpy(model, data)
        before = numpy_statistics(model)
        with pytest.raises(ImportError, match=re.escape("install tqdm (pip install tqdm)")):
            run_numpy(model, data[:2], progress=True)
        assert_statistics(numpy_statistics(model), before)
    else:
        model = torch_net("skip")
        run_torch(model, data)
        before = torch_statistics(model)
        with pytest.raises(ImportError, match=re.escape("install tqdm (pip install tqdm)")):
            run_torch(model, data[:2], progress=True)
        assert_statistics(torch_statistics(model), before)


def test_a_single_sample_in_all_is_refused_by_both_adapters():
    """Layer by layer, the first pass stops before any BatchNorm layer runs, so one sample
    reaches the first layer's pool: too few for an unbiased variance."""
    data = [batches()[0][:1]]
    np_model, torch_model = numpy_net("skip"), torch_net("skip")
    np_before = [m.stats.state_dict() for m in numpy_layers(np_model)]
    torch_before = {k: v.clone() for k, v in torch_model.state_dict().items()}
    message = "layer '1' saw 1 value per feature in all; expected at least 2"
    with pytest.raises(ValueError, match=f"^batches: {message}"):
        run_numpy(np_model, data, layerwise=True)
    with pytest.raises(ValueError, match=f"^data: {message}"):
        run_torch(torch_model, data, layerwise=True)
    for layer, state in zip(numpy_layers(np_model), np_before, strict=True):
        assert_same_state(layer.stats.state_dict(), state)
    assert_same_state(torch_model.state_dict(), torch_before)
