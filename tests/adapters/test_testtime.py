"""Test-time strategies shared by the adapters: the names, the prior formula, and the same
numbers from the NumPy kit and the torch adapter on the same network."""

from __future__ import annotations

import numpy as np
import pytest

import normstats as ns
from normstats.adapters import numpy as nsnp
from normstats.adapters.testtime import TestTimeStrategy, parse_test_time
from normstats.functional import prior_statistics


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("adapt", TestTimeStrategy("adapt")),
        ("batch", TestTimeStrategy("batch")),
        ("prior:16", TestTimeStrategy("prior", prior=16.0)),
        ("prior:0", TestTimeStrategy("prior", prior=0.0)),
        ("stream:ema:0.1", TestTimeStrategy("stream", stream="ema:0.1")),
        ("stream:ema:0.1:debias", TestTimeStrategy("stream", stream="ema:0.1:debias")),
        ("stream:welford", TestTimeStrategy("stream", stream="welford")),
        ("stream:tests.user_strategies:LastK", None),
    ],
)
def test_names_parse_and_print_back(text, parsed):
    strategy = parse_test_time(text)
    if parsed is not None:
        assert strategy == parsed
    assert str(strategy) == text
    assert parse_test_time(strategy) is strategy


def test_errors_name_the_parameter_the_caller_gives():
    with pytest.raises(ValueError, match=r"^--test-time: expected one of adapt, batch, prior:N"):
        parse_test_time("bath", parameter="--test-time")
    with pytest.raises(TypeError, match=r"^strategy: .*got float 1.5"):
        parse_test_time(1.5)


def test_prior_statistics_weights_source_and_batch_by_prior_and_size():
    source_mean, source_var = np.array([1.0, -2.0]), np.array([4.0, 0.5])
    batch_mean, batch_var = np.array([3.0, 0.0]), np.array([1.0, 2.0])
    for prior, n in [(0, 5), (16, 16), (100, 3), (np.float32(2.5), np.int64(7))]:
        mean, var = prior_statistics(source_mean, source_var, batch_mean, batch_var, prior, n)
        a, b = float(prior) / (float(prior) + n), n / (float(prior) + n)
        np.testing.assert_allclose(mean, a * source_mean + b * batch_mean, rtol=1e-15)
        np.testing.assert_allclose(var, a * source_var + b * batch_var, rtol=1e-15)
    with pytest.raises(ValueError, match=r"^prior: expected a finite non-negative"):
        prior_statistics(source_mean, source_var, batch_mean, batch_var, -1, 4)
    with pytest.raises(TypeError, match=r"^batch_size: "):
        prior_statistics(source_mean, source_var, batch_mean, batch_var, 1, 2.5)


STRATEGIES = ["adapt", "batch", "prior:0", "prior:8", "stream:ema:0.2", "stream:welford"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_numpy_and_torch_give_the_same_numbers_on_the_same_network(strategy):
    torch = pytest.importorskip("torch")
    from normstats.adapters.torch import BatchNorm, at_test_time

    rng = np.random.default_rng(0)
    dense = [nsnp.Linear(4, 6, rng=1), nsnp.Linear(6, 3, rng=2)]
    numpy_model = nsnp.Sequential(
        dense[0], nsnp.BatchNorm(6, stats="welford"), nsnp.ReLU(), dense[1]
    )
    numpy_model.layers.append(nsnp.BatchNorm(3, stats="welford"))
    torch_model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), BatchNorm(6, stats="welford"), torch.nn.ReLU()
    )
    torch_model.append(torch.nn.Linear(6, 3)).append(BatchNorm(3, stats="welford"))
    torch_model = torch_model.double()
    with torch.no_grad():
        for linear, layer in zip((torch_model[0], torch_model[3]), dense, strict=True):
            linear.weight.copy_(torch.from_numpy(layer.weight.T))
            linear.bias.copy_(torch.from_numpy(layer.bias))
    numpy_model.train()
    torch_model.train()
    for _ in range(3):  # the same source statistics in both
        x = rng.normal(size=(16, 4))
        numpy_model(x)
        torch_model(torch.from_numpy(x))
    batches = [0.5 * rng.normal(size=(n, 4)) + 0.8 for n in (5, 8, 3)]
    numpy_model.eval()
    torch_model.eval()
    data = batches if strategy == "adapt" else None
    with nsnp.at_test_time(numpy_model, strategy, data):
        expected = [numpy_model(x) for x in batches]
    torch_data = None if data is None else [torch.from_numpy(x) for x in data]
    with torch.no_grad(), at_test_time(torch_model, strategy, torch_data):
        got = [torch_model(torch.from_numpy(x)).numpy() for x in batches]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
    # and the strategy made a difference from the source statistics
    assert not np.allclose(numpy_model(batches[0]), expected[0], atol=1e-3)
    assert isinstance(numpy_model.layers[1].stats, ns.Welford)
