"""Loss, optimizer and training loops of the NumPy adapter.

``softmax_cross_entropy`` and ``SGD`` against torch in float64; an MLP with BatchNorm trained
with ``fit`` on scikit-learn's digits reaches >= 95% test accuracy under the EMA, Welford and
(after ``recalibrate``) exact strategies.
"""

from __future__ import annotations

import numpy as np
import pytest

import normstats as ns
from normstats.adapters import numpy as nsnp

from ...helpers import assert_same_state, snapshot

# -- softmax cross-entropy -----------------------------------------------------------------


def torch_cross_entropy(torch, logits, labels):
    zt = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(zt, torch.from_numpy(labels))
    loss.backward()
    return float(loss.detach()), zt.grad.numpy()


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4], ids=["unit", "30", "1e4"])
def test_softmax_cross_entropy_matches_torch(torch, scale):
    rng = np.random.default_rng(0)
    logits = scale * rng.normal(size=(9, 5))
    labels = rng.integers(0, 5, size=9)
    loss, grad = nsnp.softmax_cross_entropy(logits, labels)
    loss_ref, grad_ref = torch_cross_entropy(torch, logits, labels)
    assert isinstance(loss, float)
    assert np.isfinite(loss)
    assert np.all(np.isfinite(grad))
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-12, atol=1e-15)


def test_softmax_cross_entropy_is_shift_invariant_and_stable():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(6, 4))
    labels = rng.integers(0, 4, size=6)
    loss, grad = nsnp.softmax_cross_entropy(logits, labels)
    for shift in (1e4, -1e4, 700.0):
        shifted_loss, shifted_grad = nsnp.softmax_cross_entropy(logits + shift, labels)
        assert shifted_loss == pytest.approx(loss, rel=1e-9)
        np.testing.assert_allclose(shifted_grad, grad, atol=1e-10)


def test_softmax_cross_entropy_of_confident_predictions():
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 0.0]])
    loss, grad = nsnp.softmax_cross_entropy(logits, np.array([0, 0]))
    # Row 0 is right with certainty (loss 0), row 1 wrong by 1e4: mean loss 5e3.
    assert loss == pytest.approx(5e3, rel=1e-12)
    np.testing.assert_allclose(grad, [[0.0, 0.0, 0.0], [-0.5, 0.5, 0.0]], atol=1e-15)


def test_softmax_cross_entropy_gradient_matches_finite_differences():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 3))
    labels = np.array([0, 2, 1, 2])
    _, grad = nsnp.softmax_cross_entropy(logits, labels)
    h = 1e-6
    numeric = np.empty_like(logits)
    for index in np.ndindex(logits.shape):
        plus, minus = logits.copy(), logits.copy()
        plus[index] += h
        minus[index] -= h
        numeric[index] = (
            nsnp.softmax_cross_entropy(plus, labels)[0]
            - nsnp.softmax_cross_entropy(minus, labels)[0]
        ) / (2 * h)
    np.testing.assert_allclose(grad, numeric, atol=1e-8)


@pytest.mark.parametrize(
    ("logits", "labels", "name"),
    [
        (np.zeros(4), np.zeros(4, dtype=int), "logits"),
        (np.zeros((4, 3)), np.zeros(3, dtype=int), "labels"),
        (np.zeros((4, 3)), np.zeros((4, 1), dtype=int), "labels"),
    ],
    ids=["1-d-logits", "short-labels", "2-d-labels"],
)
def test_softmax_cross_entropy_shape_errors(logits, labels, name):
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        nsnp.softmax_cross_entropy(logits, labels)


# -- SGD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("momentum", "weight_decay"),
    [(0.0, 0.0), (0.9, 0.0), (0.0, 1e-2), (0.9, 5e-3)],
    ids=["plain", "momentum", "decay", "momentum-decay"],
)
def test_sgd_matches_torch(torch, momentum, weight_decay):
    layer = nsnp.Linear(4, 3, rng=0)
    layer.bias[...] = np.random.default_rng(1).normal(size=3)
    params = [torch.tensor(value.copy(), requires_grad=True) for value, _ in layer.parameters()]
    ours = nsnp.SGD(layer, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    theirs = torch.optim.SGD(params, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    rng = np.random.default_rng(2)
    for _ in range(5):
        layer.grad_weight = rng.normal(size=layer.weight.shape)
        layer.grad_bias = rng.normal(size=layer.bias.shape)
        for param, (_, grad) in zip(params, layer.parameters(), strict=True):
            param.grad = torch.tensor(grad.copy())
        ours.step()
        theirs.step()
        for param, (value, _) in zip(params, layer.parameters(), strict=True):
            np.testing.assert_allclose(value, param.detach().numpy(), rtol=1e-13, atol=1e-15)


def test_sgd_updates_parameters_in_place():
    layer = nsnp.Linear(2, 2, rng=0)
    weight = layer.weight
    layer.grad_weight = np.ones_like(weight)
    before = weight.copy()
    nsnp.SGD(layer, lr=0.5).step()
    assert layer.weight is weight
    np.testing.assert_allclose(weight, before - 0.5)


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay"])
def test_sgd_rejects_negative_settings(name):
    settings = {"lr": 0.1, name: -1.0}
    with pytest.raises(ValueError, match=name):
        nsnp.SGD(nsnp.Linear(2, 2), **settings)


# -- training on real data ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    """Digits, stratified 75/25 split (random_state=0), standardized on the training split."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=0
    )
    scaler = ns.Standardizer().fit(x_train)
    return scaler.transform(x_train), scaler.transform(x_test), y_train, y_test


def mlp(stats, seed=0):
    """64-128-BN-ReLU-64-BN-ReLU-10."""
    return nsnp.Sequential(
        nsnp.Linear(64, 128, rng=seed),
        nsnp.BatchNorm(128, stats=stats),
        nsnp.ReLU(),
        nsnp.Linear(128, 64, rng=seed + 1),
        nsnp.BatchNorm(64, stats=stats),
        nsnp.ReLU(),
        nsnp.Linear(64, 10, rng=seed + 2),
    )


def train(model, x, y, epochs=8):
    return nsnp.fit(model, x, y, epochs=epochs, batch_size=32, lr=0.02, momentum=0.9, seed=0)


@pytest.mark.parametrize("stats", ["ema", "welford"])
def test_mlp_with_batchnorm_learns_digits(digits, stats):
    x_train, x_test, y_train, y_test = digits
    model = mlp(stats)
    history = train(model, x_train, y_train)
    assert len(history) == 8
    assert history[-1] < history[0] / 5
    assert model.training is True
    assert nsnp.evaluate(model, x_test, y_test) >= 0.95
    for layer in nsnp.flatten(model):
        if isinstance(layer, ns.BatchNorm):
            # fit drops a last batch of one sample (BatchNorm cannot train on it).
            per_epoch = len(x_train) // 32 + (len(x_train) % 32 >= 2)
            assert layer.stats.num_batches == 8 * per_epoch


def test_mlp_with_exact_statistics_learns_digits_after_recalibration(digits):
    x_train, x_test, y_train, y_test = digits
    model = mlp("exact")
    train(model, x_train, y_train)
    with pytest.raises(ValueError, match="recalibrate"):
        nsnp.evaluate(model, x_test, y_test)
    assert model.training is True  # restored although evaluation failed
    nsnp.recalibrate(model, [x_train[i : i + 256] for i in range(0, len(x_train), 256)])
    for layer in nsnp.flatten(model):
        if isinstance(layer, ns.BatchNorm):
            assert layer.stats.count == len(x_train)
    assert nsnp.evaluate(model, x_test, y_test) >= 0.95


def test_fit_is_reproducible_with_a_seed(digits):
    x_train, _, y_train, _ = digits
    a, b = mlp("ema"), mlp("ema")
    subset = slice(0, 300)
    assert train(a, x_train[subset], y_train[subset], epochs=2) == train(
        b, x_train[subset], y_train[subset], epochs=2
    )
    for (va, _), (vb, _) in zip(a.parameters(), b.parameters(), strict=True):
        np.testing.assert_array_equal(va, vb)


@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
def test_evaluate_restores_the_mode_and_keeps_statistics(mode):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 64)), rng.integers(0, 10, size=40)
    model = mlp("welford")
    model.forward(x)  # one training batch fills the statistics
    model.train(mode)
    bns = [layer for layer in nsnp.flatten(model) if isinstance(layer, ns.BatchNorm)]
    before = [snapshot(layer.stats) for layer in bns]
    accuracy = nsnp.evaluate(model, x, y, batch_size=7)
    assert model.training is mode
    assert all(layer.training is mode for layer in nsnp.flatten(model))
    for layer, state in zip(bns, before, strict=True):
        assert_same_state(layer.stats.state_dict(), state)
    # Evaluation mode: the population statistics, whatever the batch size.
    model.eval()
    expected = float(np.mean(model.forward(x).argmax(axis=1) == y))
    assert accuracy == pytest.approx(expected)


def test_fit_with_mismatched_lengths_raises():
    rng = np.random.default_rng(4)
    model = mlp("ema")
    before = [value.copy() for value, _ in model.parameters()]
    with pytest.raises(ValueError, match=r"y: expected 20 labels.*got 19"):
        nsnp.fit(
            model,
            rng.normal(size=(20, 64)),
            np.zeros(19, dtype=int),
            epochs=1,
            batch_size=8,
            lr=0.1,
        )
    for (value, _), saved in zip(model.parameters(), before, strict=True):
        np.testing.assert_array_equal(value, saved)


def test_minibatches_cover_every_sample_once():
    batches = list(nsnp.minibatches(10, 4, np.random.default_rng(5)))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    assert [len(b) for b in nsnp.minibatches(9, 4, min_size=2)] == [4, 4]
