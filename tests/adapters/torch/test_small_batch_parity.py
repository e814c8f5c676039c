"""The NumPy engine and the torch module train alike in both small-batch modes.

The same float64 batches go through ``ns.BatchNorm`` and the torch ``BatchNorm`` with the
same settings: every step's output, input and parameter gradients, and the strategy's
statistics afterwards agree to rounding (torch's kernels sum in another order).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import normstats as ns  # noqa: E402
from normstats.adapters.torch import BatchNorm  # noqa: E402

STEPS = 6


def batches(shape, seed=0):
    rng = np.random.default_rng(seed)
    # a drifting input, so that renorm's running estimate lags and clips some channels
    return [rng.normal(0.5 * step, 1.0 + 0.3 * step, size=shape) for step in range(STEPS)]


def train_both(settings, shape, stats="welford"):
    channels = shape[1]
    engine = ns.BatchNorm(channels, stats=stats, **settings)
    module = BatchNorm(channels, stats=stats, dtype=torch.float64, **settings)
    rng = np.random.default_rng(1)
    gamma, beta = rng.uniform(0.5, 1.5, channels), rng.normal(size=channels)
    engine.gamma, engine.beta = gamma.copy(), beta.copy()
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(gamma))
        module.bias.copy_(torch.from_numpy(beta))
    for x in batches(shape):
        dy = rng.normal(size=shape)
        y_engine = engine(x)
        dx_engine = engine.backward(dy)
        xt = torch.from_numpy(x).requires_grad_(True)
        module.weight.grad = module.bias.grad = None
        y_module = module(xt)
        y_module.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(y_module.detach().numpy(), y_engine, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(xt.grad.numpy(), dx_engine, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(module.weight.grad.numpy(), engine.grad_gamma, rtol=1e-9)
        np.testing.assert_allclose(module.bias.grad.numpy(), engine.grad_beta, rtol=1e-9)
    mean, var = module.population_statistics()
    np.testing.assert_allclose(mean.numpy(), engine.stats.mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), engine.stats.var, rtol=1e-10)
    return engine, module


@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 5), (6, 3, 4, 4)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("stats", ["welford", "ema", "cumulative"])
def test_renorm_trains_alike(shape, stats):
    settings = {"renorm": True, "r_max": 1.5, "d_max": 0.5, "renorm_warmup": 3}
    engine, _ = train_both(settings, shape, stats)
    # the correction did something: the outputs differ from plain batch normalization's
    x = batches(shape, seed=9)[-1]
    plain = ns.functional.train_forward(x, engine.gamma, engine.beta)[0]
    assert not np.allclose(engine(x), plain)


@pytest.mark.parametrize("shape", [(8, 3), (8, 3, 5), (7, 3, 4, 4)], ids=["2d", "3d", "4d"])
def test_ghost_trains_alike(shape):
    # 8 and 7 samples in virtual batches of 3: two full ones and a remainder
    train_both({"virtual_batch_size": 3}, shape)
