"""The NumPy backend's training-time statistics: one FanOut per layer feeds every tracked
strategy the layer's batch moments, as each strategy's own estimator fed them would be."""

from __future__ import annotations

import numpy as np
import pytest

import normstats as ns
from normstats.adapters.compare import strategies
from normstats.adapters.compare.backends import FanOut

from ...helpers import assert_same_state, snapshot

TRACKED = ("cumulative", "ema:0.1", "ema:0.01:debias", "welford", "tests.user_strategies:LastK")


def batches(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(3.0, 2.0, size=(rows, 5)) for rows in (2, 2, 9, 4)]


def test_each_tracked_strategy_as_its_own_estimator_fed_the_layer():
    layer = ns.BatchNorm(5, stats="welford")
    fanout = FanOut(TRACKED)
    layer.stats = fanout
    alone = {name: strategies.estimator(name) for name in TRACKED}
    for x in batches():
        _, moments, _ = ns.functional.train_forward(x, layer.gamma, layer.beta)
        layer.forward(x)
        for estimator in alone.values():
            estimator.update_moments(moments)
    for name, estimator in alone.items():
        folded = fanout.estimator(name)
        assert (folded.count, folded.num_batches) == (estimator.count, 4)
        # the held-back batches are folded at once: the same statistics up to rounding
        np.testing.assert_allclose(folded.mean, estimator.mean, rtol=1e-14, atol=0)
        np.testing.assert_allclose(folded.var, estimator.var, rtol=1e-14, atol=0)


def test_batches_are_held_back_and_folded_at_once_or_when_pending_is_full(monkeypatch):
    monkeypatch.setattr(FanOut, "PENDING", 3)
    layer = ns.BatchNorm(5, stats="welford")
    fanout = FanOut(TRACKED)
    layer.stats = fanout
    for x in batches():
        layer.forward(x)
    # three folded when the third arrived, the fourth still held
    assert [e.num_batches for e in fanout.estimators.values()] == [3] * len(TRACKED)
    assert fanout.estimator("welford").num_batches == 4
    assert fanout.estimators["cumulative"].num_batches == 4
    np.testing.assert_allclose(
        fanout.estimators["welford"].mean, np.concatenate(batches()).mean(axis=0), rtol=1e-14
    )


def test_under_batch_renormalization_every_batch_is_folded_at_once():
    layer = ns.BatchNorm(5, stats="welford", renorm=True)
    fanout = FanOut(("cumulative",), reference="ema:0.1")
    layer.stats = fanout
    reference = strategies.estimator("ema:0.1")
    for x in batches():
        mean_before = None if reference.num_batches == 0 else reference.mean
        assert fanout.num_batches == reference.num_batches
        if mean_before is not None:
            np.testing.assert_array_equal(fanout.mean, mean_before)
        _, moments, _ = ns.functional.train_forward(x, layer.gamma, layer.beta)
        layer.forward(x)
        reference.update_moments(moments)
    assert fanout.estimators["cumulative"].num_batches == 4


def test_a_non_finite_training_batch_is_refused_and_tracked_nowhere():
    layer = ns.BatchNorm(5, stats="welford")
    fanout = FanOut(TRACKED)
    layer.stats = fanout
    layer.forward(batches()[2])
    before = {name: snapshot(fanout.estimator(name)) for name in TRACKED}
    x = batches(seed=1)[2]
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        layer.forward(x)
    for name in TRACKED:
        assert_same_state(fanout.estimator(name).state_dict(), before[name])


# -- the torch backend ---------------------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("pending", [4, 256])
def test_torch_tracking_equals_each_estimator_fed_every_layer_input(monkeypatch, model, pending):
    pytest.importorskip("torch")
    from normstats.adapters.compare.backends import TorchRun
    from normstats.adapters.compare.data import load

    monkeypatch.setattr(FanOut, "PENDING", pending)
    names = ("cumulative", "ema:0.1", "welford")
    run = TorchRun(load("digits"), model, 0, names)
    seen = [[] for _ in run.norms]
    for layer, norm in enumerate(run.norms):
        norm.register_forward_pre_hook(
            lambda module, args, layer=layer: (
                seen[layer].append(args[0].detach().clone()) if module.training else None
            )
        )
    run.train_epochs(1, 128, 0.1)
    assert len(seen[0]) == len(run.X_train) // 128
    for layer, fanout in enumerate(run.fanouts):
        alone = {name: strategies.estimator(name) for name in names}
        for x in seen[layer]:
            axes = (0, *range(2, x.ndim))
            moments = ns.Moments.from_array(x.numpy(), axis=axes)
            for estimator in alone.values():
                estimator.update_moments(moments)
        for name, estimator in alone.items():
            tracked = fanout.estimator(name)
            assert (tracked.count, tracked.num_batches) == (estimator.count, len(seen[layer]))
            np.testing.assert_allclose(tracked.mean, estimator.mean, rtol=1e-13, atol=1e-15)
            np.testing.assert_allclose(tracked.var, estimator.var, rtol=1e-13, atol=0)
    assert all(not held for held in run.inputs)  # everything folded by the end of training


def test_torch_tracking_holds_back_at_most_pending_values(monkeypatch):
    pytest.importorskip("torch")
    from normstats.adapters.compare.backends import TorchRun
    from normstats.adapters.compare.data import load

    monkeypatch.setattr(TorchRun, "PENDING_VALUES", 64 * 128 * 3)
    run = TorchRun(load("digits"), "mlp", 0, ("welford",))
    held = []
    original = run._fold_inputs

    def fold(layer):
        held.append(len(run.inputs[layer]))
        original(layer)

    monkeypatch.setattr(run, "_fold_inputs", fold)
    run.train_epochs(1, 64, 0.1)
    # the first layer (128 channels) folds every 3 batches, the second (64) every 6
    assert max(held) == 6
    assert 3 in held
    assert run.fanouts[0].estimator("welford").num_batches == len(run.X_train) // 64


def test_torch_sgd_takes_torch_optim_sgds_steps_bitwise():
    torch = pytest.importorskip("torch")
    from normstats.adapters.compare.backends import TorchSGD

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    twin.load_state_dict(model.state_dict())
    reference = torch.optim.SGD(model.parameters(), lr=0.0371, momentum=0.9)
    written_out = TorchSGD(list(twin.parameters()), lr=0.0371, momentum=0.9)
    for _ in range(30):
        x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
        for net, optimizer in ((model, reference), (twin, written_out)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
        assert bool(torch.isfinite(a).all())
    assert all(p.grad is not None for p in twin.parameters())
    written_out.zero_grad()
    assert all(p.grad is None for p in twin.parameters())
