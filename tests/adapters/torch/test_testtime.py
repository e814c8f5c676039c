"""``at_test_time``: test-time statistics for torch models, against references built here.

Each BatchNorm layer's input and output under a strategy are captured with plain torch
forward hooks, and the output is checked against the strategy's definition computed from
that input with torch's own reductions (``mean``, ``var(unbiased=False)``): the prior
formula, the batch's own statistics, and EMA / pooled statistics written out by hand.
Models are float64, so the tolerances are those of float64 rounding.
"""

from __future__ import annotations

import copy

import pytest

from ...helpers import assert_same_state

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from normstats.adapters.torch import at_test_time, convert, recalibrate  # noqa: E402

TorchBatchNorm = nn.modules.batchnorm._BatchNorm
FLOAT64 = {"rtol": 1e-10, "atol": 1e-10}
EPS = 1e-5


def trained_net(stats: str | None = "ema") -> nn.Module:
    """Conv-BN2d-ReLU-Dropout-Linear-BN1d, trained a few steps (float64); ``stats`` None keeps
    torch's own layers."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 5),
        nn.BatchNorm1d(5),
    ).double()
    if stats is not None:
        model = convert(model, stats=stats)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 2, 4, 4, dtype=torch.float64))
    return model.eval()


def shifted_batches(sizes=(6, 9, 4)) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        0.5 * torch.randn(n, 2, 4, 4, generator=generator, dtype=torch.float64) + 0.8 for n in sizes
    ]


def capture(model: nn.Module):
    """Run hooks that record every BatchNorm's (input, output) per forward; returns the
    records and the hook handles."""
    records: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    handles = []
    for module in model.modules():
        if isinstance(module, TorchBatchNorm):

            def hook(m, args, output):
                records.setdefault(m, []).append((args[0].detach(), output.detach()))

            handles.append(module.register_forward_hook(hook))
    return records, handles


def normalized(layer, x, mean, var):
    """``weight * (x - mean) / sqrt(var + eps) + bias`` per channel (dimension 1)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + layer.eps)
    return y * layer.weight.reshape(shape) + layer.bias.reshape(shape)


def channel_stats(x):
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False), x.var(dim=dims, unbiased=True)


def run(model, strategy, batches, data=None):
    """Outputs of ``model`` and each BatchNorm's (input, output) under ``strategy``."""
    records, handles = capture(model)
    try:
        with torch.no_grad(), at_test_time(model, strategy, data):
            outputs = [model(x) for x in batches]
    finally:
        for handle in handles:
            handle.remove()
    return outputs, records


def source(layer):
    return layer.running_mean.clone(), layer.running_var.clone()


@pytest.mark.parametrize("stats", ["ema", "welford", None])
@pytest.mark.parametrize("prior", [0, 3, 16.5])
def test_prior_is_the_formula_on_each_layers_input(stats, prior):
    model = trained_net(stats)
    sources = {m: source(m) for m in model.modules() if isinstance(m, TorchBatchNorm)}
    _, records = run(model, f"prior:{prior}", shifted_batches())
    for layer, seen in records.items():
        mu_s, var_s = sources[layer]
        for x, y in seen:
            n = x.shape[0]
            mu_b, var_b, _ = channel_stats(x)
            mean = prior / (prior + n) * mu_s + n / (prior + n) * mu_b
            var = prior / (prior + n) * var_s + n / (prior + n) * var_b
            torch.testing.assert_close(y, normalized(layer, x, mean, var), **FLOAT64)


def test_batch_equals_batchnorm_in_train_mode_without_updates():
    model = trained_net("ema")
    reference = copy.deepcopy(model).eval()
    for module in reference.modules():
        if isinstance(module, TorchBatchNorm):
            module.train()
            module.track_running_stats = False
    before = copy.deepcopy(reference.state_dict())
    batches = shifted_batches()
    outputs, records = run(model, "batch", batches)
    with torch.no_grad():
        expected = [reference(x) for x in batches]
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, **FLOAT64)
    assert_same_state(reference.state_dict(), before)  # the reference updated nothing either
    for layer, seen in records.items():
        for x, y in seen:
            mean, var, _ = channel_stats(x)
            torch.testing.assert_close(y, normalized(layer, x, mean, var), **FLOAT64)


@pytest.mark.parametrize("stats", ["ema", None])
def test_prior_zero_is_batch_and_a_huge_prior_is_the_source(stats):
    model = trained_net(stats)
    batches = shifted_batches()
    batch, _ = run(model, "batch", batches)
    zero, _ = run(model, "prior:0", batches)
    huge, _ = run(model, "prior:1e15", batches)
    with torch.no_grad():
        evaluation = [model(x) for x in batches]
    for a, b, c, d in zip(batch, zero, huge, evaluation, strict=True):
        torch.testing.assert_close(b, a, **FLOAT64)
        torch.testing.assert_close(c, d, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(batch[0], evaluation[0], atol=1e-3)  # the shift shows


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0])
def test_stream_ema_is_the_moving_average_of_each_layers_inputs(momentum):
    model = trained_net("ema")
    sources = {m: source(m) for m in model.modules() if isinstance(m, TorchBatchNorm)}
    _, records = run(model, f"stream:ema:{momentum}", shifted_batches())
    for layer, seen in records.items():
        mean, var = sources[layer]
        for x, y in seen:  # updated by the batch, then normalizing it
            mu_b, _, var_unbiased = channel_stats(x)
            mean = (1 - momentum) * mean + momentum * mu_b
            var = (1 - momentum) * var + momentum * var_unbiased
            torch.testing.assert_close(y, normalized(layer, x, mean, var), **FLOAT64)


def test_stream_welford_pools_the_source_as_a_first_batch_with_every_test_batch():
    model = trained_net("welford")
    sources = {m: source(m) for m in model.modules() if isinstance(m, TorchBatchNorm)}
    _, records = run(model, "stream:welford", shifted_batches())
    for layer, seen in records.items():
        mu_s, var_s = sources[layer]
        # the source enters as a first batch of the first test batch's size, then Chan's
        # merge written out for every value seen so far
        count = seen[0][0].numel() // layer.num_features
        total, mean, m2 = count, mu_s, var_s * (count - 1)
        for x, y in seen:
            values = x.transpose(0, 1).reshape(layer.num_features, -1)
            n = values.shape[1]
            mu_b, m2_b = (
                values.mean(dim=1),
                ((values - values.mean(dim=1, keepdim=True)) ** 2).sum(1),
            )
            delta = mu_b - mean
            mean = mean + delta * n / (total + n)
            m2 = m2 + m2_b + delta**2 * total * n / (total + n)
            total += n
            torch.testing.assert_close(y, normalized(layer, x, mean, m2 / (total - 1)), **FLOAT64)


def test_stream_reset_starts_again_from_the_source():
    model = trained_net("ema")
    first, second = shifted_batches((5, 7))
    with torch.no_grad(), at_test_time(model, "stream:ema:0.3") as adapted:
        fresh = model(second)
        model(first)
        moved = model(second)
        adapted.reset()
        again = model(second)
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)
    assert not torch.allclose(moved, fresh, atol=1e-6)


@pytest.mark.parametrize("layerwise", [False, True])
def test_adapt_equals_recalibrate_on_the_target_data(layerwise):
    model = trained_net("ema")
    batches = shifted_batches()
    reference = recalibrate(copy.deepcopy(model), batches, layerwise=layerwise).eval()
    with torch.no_grad(), at_test_time(model, "adapt", batches, layerwise=layerwise):
        outputs = [model(x) for x in batches]
    with torch.no_grad():
        for got, x in zip(outputs, batches, strict=True):
            torch.testing.assert_close(got, reference(x), rtol=0, atol=0)


def modes(model):
    return [m.training for m in model.modules()]


@pytest.mark.parametrize(
    ("strategy", "data"),
    [("adapt", True), ("batch", False), ("prior:8", False), ("stream:welford", False)],
)
@pytest.mark.parametrize("fail", [False, True])
def test_the_model_is_restored_afterwards_also_when_the_body_raises(strategy, data, fail):
    model = trained_net("ema")
    model[3].train()  # a mixed set of modes comes back as it was
    model[1].train()
    before_state = copy.deepcopy(model.state_dict())
    before_modes = modes(model)
    batches = shifted_batches()
    try:
        with at_test_time(model, strategy, batches if data else None):
            assert not any(modes(model))  # evaluation mode inside
            for x in batches:
                model(x)
            if fail:
                raise RuntimeError("the body failed")
    except RuntimeError:
        assert fail
    assert_same_state(model.state_dict(), before_state)
    assert modes(model) == before_modes
    for module in model.modules():
        assert "forward" not in module.__dict__
        assert not module._forward_hooks
        assert not module._forward_pre_hooks


@pytest.mark.parametrize(
    ("text", "error", "words"),
    [
        ("prior:-1", ValueError, "finite non-negative"),
        ("prior:x", ValueError, "prior:N"),
        ("prior:inf", ValueError, "finite non-negative"),
        ("stream:", ValueError, "stream:welford"),
        ("stream:ema:2", ValueError, "momentum"),
        ("stream:ema:0.1:bias", ValueError, "stream:ema:<momentum>[:debias]"),
        ("stream:nonsense", ValueError, "nonsense"),
        ("adapt:3", ValueError, "prior:N"),
        ("exact", ValueError, "stream:<strategy>"),
        (16, TypeError, "int 16"),
    ],
)
def test_bad_strategy_names_are_refused_naming_the_parameter(text, error, words):
    model = trained_net("ema")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=r"^strategy: ") as info, at_test_time(model, text):
        pass
    assert words in str(info.value)
    assert_same_state(model.state_dict(), before)


def test_data_only_with_adapt_and_torch_layers_refused_by_adapt():
    model = trained_net("ema")
    with (
        pytest.raises(ValueError, match=r"^data: 'adapt' recalibrates"),
        at_test_time(model, "adapt"),
    ):
        pass
    with (
        pytest.raises(ValueError, match=r"^data: only 'adapt'"),
        at_test_time(model, "batch", shifted_batches()),
    ):
        pass
    plain = trained_net(None)
    with (
        pytest.raises(TypeError, match=r"^model: 'adapt' .* got 1, 6 \(normstats"),
        at_test_time(plain, "adapt", shifted_batches()),
    ):
        pass
