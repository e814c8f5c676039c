"""The user strategies of docs/strategies.md in the PyTorch adapter.

``LastK`` (the pooled statistics of the last ``k`` batches, :mod:`tests.user_strategies`)
runs in the layer, through ``convert`` by its import path, ``recalibrate``, module state
dicts, ``revert`` and synchronized training on 2 gloo ranks; ``WithinBatch`` (mergeable)
through ``all_reduce_stats``. References are plain torch: ``nn.BatchNorm*d`` with the same
weights for the training output, and each layer's input collected with hooks on the model
as it was before ``convert``, reduced per channel with NumPy (the window of the last ``k``
batches, or the whole pass for ``recalibrate``; ``test_recalibrate.py``'s helpers). The
ranks are spawned by ``test_distributed.py``'s machinery.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from normstats.adapters.torch import BatchNorm, convert, recalibrate, revert  # noqa: E402
from normstats.adapters.torch.ring import SLOTS  # noqa: E402

from ...helpers import assert_same_state  # noqa: E402
from ...user_strategies import LastK, WithinBatch  # noqa: E402
from .test_distributed import part, spawn  # noqa: E402
from .test_recalibrate import (  # noqa: E402
    assert_statistics,
    collect,
    conv_net,
    layerwise_reference,
    make_batches,
    one_pass_reference,
    our_layers,
    randomized,
    reduce,
)

PATH = "tests.user_strategies:LastK"
F64 = torch.float64
FLOAT64 = {"rtol": 1e-10, "atol": 1e-12}
C = 3


def layer_inputs(sizes, seed, dtype=F64):
    """(N, C, 2, 2) batches of the given sizes, each at its own per-channel location."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        offset = torch.tensor([2.0, -1.0, 0.5], dtype=F64).reshape(1, C, 1, 1) * (1 + i % 4)
        out.append((offset + torch.randn(n, C, 2, 2, generator=generator, dtype=F64)).to(dtype))
    return out


def window(inputs, k):
    """NumPy's per-channel mean and unbiased variance over the last ``k`` inputs."""
    return reduce(inputs[-k:])


def assert_running(layer, mean, var, **tolerance):
    np.testing.assert_allclose(layer.running_mean.double().numpy(), mean, **(tolerance or FLOAT64))
    np.testing.assert_allclose(layer.running_var.double().numpy(), var, **(tolerance or FLOAT64))


def with_parameters(layer, seed):
    """``layer`` with a non-trivial weight and bias."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(C, generator=generator, dtype=F64) + 0.5)
        layer.bias.copy_(torch.randn(C, generator=generator, dtype=F64))
    return layer


def torch_twin(layer):
    """``nn.BatchNorm2d`` with the weight and bias of ``layer``."""
    twin = nn.BatchNorm2d(C, dtype=F64)
    with torch.no_grad():
        twin.weight.copy_(layer.weight)
        twin.bias.copy_(layer.bias)
    return twin


def small_net():
    """Conv, BN2d, ReLU, linear, BN1d (float64, no dropout): converted and trained here."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, C, 3, padding=1),
        nn.BatchNorm2d(C),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(C * 16, 5),
        nn.BatchNorm1d(5),
    )
    return randomized(model)


def net_inputs(sizes, seed):
    generator = torch.Generator().manual_seed(seed)
    return [1.0 + 2.0 * torch.randn(n, 2, 4, 4, generator=generator, dtype=F64) for n in sizes]


# -- the layer -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_layer_trains_like_torch_and_keeps_the_window(k):
    bn = with_parameters(BatchNorm(C, stats=LastK(k=k), dtype=F64), seed=k)
    twin = torch_twin(bn)
    xs = layer_inputs([4, 2, 7, 3, 5], seed=k)
    for seen, x in enumerate(xs, start=1):
        torch.testing.assert_close(bn(x), twin(x), rtol=0, atol=0)
        assert_running(bn, *window(xs[:seen], k))
        assert int(bn.num_batches_tracked) == seen
    bn.eval()
    twin.eval()
    mean, var = window(xs, k)
    with torch.no_grad():
        twin.running_mean.copy_(torch.from_numpy(mean))
        twin.running_var.copy_(torch.from_numpy(var))
    probe = layer_inputs([6], seed=9)[0]
    torch.testing.assert_close(bn(probe), twin(probe), **FLOAT64)


@pytest.mark.parametrize("nan_step", [None, 30, SLOTS + 2], ids=["finite", "nan-30", "nan-66"])
def test_layer_window_after_the_ring_folds_and_a_nan_batch(nan_step):
    # More steps than the ring holds, no read in between: the ring folds by itself once, with
    # Strategy.fold's default loop of step; a NaN batch is masked out of that fold.
    steps = SLOTS + 6
    bn = BatchNorm(C, stats=PATH, k=3, dtype=F64)  # a class by path: nan_policy "skip"
    assert bn.nan_policy == "skip"
    sizes = [2 + (3 * i) % 5 for i in range(steps)]
    xs = layer_inputs(sizes, seed=11)
    if nan_step is not None:
        xs[nan_step][1, 2, 0, 1] = float("nan")
    for x in xs:
        bn(x)
    finite = [x for i, x in enumerate(xs) if i != nan_step]
    assert int(bn.num_batches_skipped) == (nan_step is not None)
    assert int(bn.num_batches_tracked) == len(finite)
    assert_running(bn, *window(finite, 3))
    counts = bn.strategy_state.counts[:, 0].tolist()
    assert counts == [4.0 * len(x) for x in finite[-3:]]  # N x 2 x 2 values per channel


def test_layer_with_nan_policy_raise_refuses_a_nan_batch_unchanged():
    bn = BatchNorm(C, stats=LastK(k=2), dtype=F64)  # an instance brings its policy
    assert bn.nan_policy == "raise"
    xs = layer_inputs([4, 5, 3, 6], seed=12)
    for x in xs[:2]:
        bn(x)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    spoiled = xs[2].clone()
    spoiled[0, 1, 1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"^x: expected finite values"):
        bn(spoiled)
    assert_same_state(bn.state_dict(), before)
    for x in xs[2:]:
        bn(x)
    assert_running(bn, *window(xs, 2))
    assert int(bn.num_batches_skipped) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_layer_keeps_a_float64_window(dtype):
    model = convert(nn.Sequential(nn.BatchNorm2d(C)).to(dtype), stats=PATH, k=2)
    bn = model[0]
    xs = layer_inputs([6, 4, 5], seed=13, dtype=dtype)
    for x in xs:
        assert model(x).dtype == dtype
    for key, buffer in bn.strategy_state.state().items():
        assert buffer.dtype == F64, key
    assert bn.running_mean.dtype == dtype
    mean, var = bn.population_statistics()
    assert mean.dtype == var.dtype == F64
    # the batch moments arrive at float32 precision at least (the values are exact in float64)
    reference = window([x.double() for x in xs], 2)
    np.testing.assert_allclose(mean.numpy(), reference[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var.numpy(), reference[1], rtol=1e-6)
    model.to(F64)  # a cast of the module keeps the float64 window as it is
    torch.testing.assert_close(bn.population_statistics()[1], var, rtol=0, atol=0)


def test_layer_refuses_an_instance_of_other_features_naming_its_feature_shape():
    stats = LastK(k=3)
    stats.update(np.random.default_rng(0).normal(size=(5, 4)))
    with pytest.raises(ValueError, match=r"5 features .* feature shape \(4,\)$"):
        BatchNorm(5, stats=stats)


def test_layer_starts_from_the_window_of_an_instance():
    xs = layer_inputs([4, 5, 3], seed=14)
    stats = LastK(k=2)
    for x in xs[:2]:
        stats.update(x, axis=(0, 2, 3))
    bn = BatchNorm(C, stats=stats, dtype=F64)
    bn(xs[2])
    assert_running(bn, *window(xs, 2))
    assert stats.num_batches == 2  # the instance is copied, never written


@pytest.mark.parametrize(
    ("path", "error", "needle"),
    [
        ("tests.no_such_module:LastK", ValueError, "cannot import module"),
        ("tests.user_strategies:LastQ", ValueError, "has no attribute 'LastQ'"),
        ("tests.helpers:StrategyConfig", TypeError, "subclass of normstats.Strategy"),
    ],
)
def test_bad_paths_name_stats_and_leave_the_model_unconverted(path, error, needle):
    with pytest.raises(error) as info:
        BatchNorm(C, stats=path)
    assert str(info.value).startswith("stats: "), str(info.value)
    assert needle in str(info.value)
    model = small_net()
    with pytest.raises(error, match=r"^stats: "):
        convert(model, stats=path, k=3)
    assert type(model[1]) is nn.BatchNorm2d
    assert type(model[5]) is nn.BatchNorm1d


# -- convert ---------------------------------------------------------------------------------


def test_convert_by_path_trains_like_torch_and_keeps_each_layers_window():
    plain = small_net().train()
    model = convert(copy.deepcopy(plain), stats=PATH, k=3)
    layers = our_layers(model)
    assert set(layers) == {"1", "5"}
    for layer in layers.values():
        assert type(layer.strategy) is LastK
        assert layer.strategy.k == 3
    xs = net_inputs([5, 3, 8, 4, 6], seed=15)
    for x in xs:
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    inputs = collect(plain, list(layers), xs)  # train mode: each BN uses batch statistics
    for name, layer in layers.items():
        assert_running(layer, *window(inputs[name], 3))


@pytest.mark.parametrize("layerwise", [False, True], ids=["one-pass", "layerwise"])
def test_recalibrate_writes_the_exact_pass_into_the_window(layerwise):
    torch.manual_seed(16)
    torch_model = randomized(conv_net())
    model = convert(copy.deepcopy(torch_model), stats=PATH, k=3).train()
    for x in make_batches([6] * 4):  # something in the window first
        model(x)
    batches = make_batches()
    assert recalibrate(model, batches, layerwise=layerwise) is model
    reference = (layerwise_reference if layerwise else one_pass_reference)(torch_model, batches)
    assert_statistics(model, reference, **FLOAT64)
    # the pass is one slot of the window, the newest (calibrated_state's default: one step
    # from the initial state); the older slots are empty
    inputs = collect(copy.deepcopy(torch_model).eval(), list(reference), batches)
    for name, layer in our_layers(model).items():
        per_channel = sum(x.numel() // x.shape[1] for x in inputs[name])
        assert layer.strategy_state.counts[:, 0].tolist() == [0.0, 0.0, per_channel], name


# -- state dicts and revert -------------------------------------------------------------------


def trained(k=3, steps=5, seed=17):
    plain = small_net().train()
    model = convert(copy.deepcopy(plain), stats=PATH, k=k)
    for x in net_inputs([4 + i % 3 for i in range(steps)], seed=seed):
        model(x)
    return plain, model


def test_module_state_dict_round_trips_into_a_fresh_converted_model():
    plain, model = trained()
    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)
    saved.seek(0)
    fresh = convert(copy.deepcopy(plain), stats=PATH, k=3)
    fresh.load_state_dict(torch.load(saved, weights_only=True))
    assert_same_state(fresh.state_dict(), model.state_dict())
    assert "1.last_k.counts" in model.state_dict()
    (x,) = net_inputs([7], seed=18)
    model(x)  # training continues from the same window
    fresh(x)
    assert_same_state(fresh.state_dict(), model.state_dict())
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_state_dict_of_another_k_is_refused_like_a_size_mismatch():
    _, source = trained(k=3)
    _, target = trained(k=4, seed=19)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"size mismatch for 1\.last_k\.counts") as info:
        target.load_state_dict(source.state_dict())
    assert "(4, 3)" in str(info.value)
    assert "(3, 3)" in str(info.value)
    assert_same_state(target.state_dict(), before)
    layer = BatchNorm(C, stats=PATH, k=4)
    layer(layer_inputs([4], seed=20)[0].float())
    layer_before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"size mismatch for last_k\.means"):
        layer.load_state_dict(BatchNorm(C, stats=PATH, k=3).state_dict())
    assert_same_state(layer.state_dict(), layer_before)


def test_revert_gives_torch_batchnorm_with_the_window_statistics():
    _, model = trained()
    statistics = {name: layer.population_statistics() for name, layer in our_layers(model).items()}
    model.eval()
    (x,) = net_inputs([6], seed=21)
    with torch.no_grad():
        expected = model(x)
    reverted = revert(model)
    assert type(reverted[1]) is nn.BatchNorm2d
    assert type(reverted[5]) is nn.BatchNorm1d
    for name, (mean, var) in statistics.items():
        layer = reverted.get_submodule(name)
        torch.testing.assert_close(layer.running_mean, mean, rtol=0, atol=0)
        torch.testing.assert_close(layer.running_var, var, rtol=0, atol=0)
    assert not any(k.split(".")[1] == "last_k" for k in reverted.state_dict() if "." in k)
    with torch.no_grad():
        torch.testing.assert_close(reverted(x), expected, rtol=0, atol=0)


# -- distributed: 2 gloo ranks ------------------------------------------------------------

SYNC_SIZES = [[5, 2], [1, 6], [3, 3]]
"""Each rank's batch size at each of 3 synchronized steps (uneven)."""


def sync_steps():
    rng = np.random.default_rng(23)
    offset = np.array([3.0, -2.0, 0.5]).reshape(1, C, 1, 1)
    return [
        [rng.normal(i, 1.5, size=(n, C, 2, 2)) + offset for n in row]
        for i, row in enumerate(SYNC_SIZES)
    ]


def user_streams():
    """Two ranks' streams of (n, C) batches, of different lengths."""
    rng = np.random.default_rng(24)
    return [
        [rng.normal(5.0, 2.0, size=(n, C)) for n in (4, 7, 2)],
        [rng.normal(-1.0, 0.5, size=(n, C)) for n in (9, 3)],
    ]


@pytest.fixture(scope="module")
def on_2_ranks():
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    return spawn("user_strategies", 2, sync_steps(), user_streams())


def test_sync_last_k_is_one_process_over_the_global_batches(on_2_ranks):
    ranks = part(on_2_ranks, "sync")
    steps = [torch.from_numpy(np.concatenate(row)) for row in sync_steps()]
    one_process = BatchNorm(C, stats=PATH, k=2, dtype=F64)
    for x in steps:
        one_process(x)
    mean, var = window(steps, 2)
    for rank, r in enumerate(ranks):
        assert r["tracked"] == len(steps), rank
        np.testing.assert_array_equal(r["running_mean"], ranks[0]["running_mean"])
        np.testing.assert_array_equal(r["running_var"], ranks[0]["running_var"])
        np.testing.assert_allclose(r["running_mean"], mean, **FLOAT64)
        np.testing.assert_allclose(r["running_var"], var, **FLOAT64)
        np.testing.assert_allclose(r["running_mean"], one_process.running_mean.numpy(), **FLOAT64)
        np.testing.assert_allclose(r["running_var"], one_process.running_var.numpy(), **FLOAT64)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_all_reduce_within_batch_is_one_estimator_over_every_stream(on_2_ranks, kind):
    ranks = [r[kind] for r in part(on_2_ranks, "all_reduce_stats")]
    batches = [b for stream in user_streams() for b in stream]
    one = WithinBatch()
    for batch in batches:
        one.update(batch)
    union = np.concatenate(batches)
    m2 = sum(((b - b.mean(axis=0)) ** 2).sum(axis=0) for b in batches)
    for rank, r in enumerate(ranks):
        assert r["same_object"], rank
        assert r["kind"] == ("ndarray" if kind == "numpy" else "Tensor")
        assert (r["count"], r["num_batches"]) == (len(union), len(batches))
        np.testing.assert_allclose(r["mean"], one.mean, rtol=1e-12, atol=0)
        np.testing.assert_allclose(r["var"], one.var, rtol=1e-12, atol=0)
        np.testing.assert_allclose(r["mean"], union.mean(axis=0), rtol=1e-12, atol=0)
        np.testing.assert_allclose(r["var"], m2 / (len(union) - len(batches)), rtol=1e-12)
        np.testing.assert_array_equal(r["var"], ranks[0]["var"])


def test_all_reduce_refuses_last_k_before_any_communication(on_2_ranks):
    for r in part(on_2_ranks, "all_reduce_stats"):
        assert r["last_k"].startswith("TypeError: stats: expected a strategy with an exact merge")
        assert "LastK" in r["last_k"]
        assert r["last_k_untouched"]
        assert r["in_sync"]
