"""The torch ``BatchNorm`` as a drop-in: torch's own BatchNorm tests, torch's tools, torch's
runtime semantics and torch's cost per step.

The first section ports the checks of PyTorch's test suite (``test/test_nn.py``,
``test/nn/test_batchnorm.py``: ``test_batchnorm_update_stats``,
``..._buffer_update_when_stats_are_not_tracked``, ``..._simple_average``,
``..._load_state_dict``, ``..._nhwc_cpu``, ``..._non_contig_cpu``,
``..._raises_error_if_less_than_one_value_per_channel``, ``test_BatchNorm_empty``), rewritten
for this layer and run for every strategy they apply to. References are torch's own layers
and tools driven the same way. Tolerances: float32 ``rtol=1e-5``, float64 ``rtol=1e-10``.
"""

from __future__ import annotations

import copy

import pytest

from ...helpers import assert_same_state

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

from normstats.adapters.torch import BatchNorm, convert, recalibrate, revert  # noqa: E402

C = 3
STRATEGIES = ["ema", "cumulative", "welford", "exact"]
TRAINED = ["ema", "cumulative", "welford"]
"""The strategies that training batches feed (``"exact"`` only under ``momentum=None``)."""
FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}
FLOAT64 = {"rtol": 1e-10, "atol": 1e-12}
AMORTIZED_STEPS = 64


def state_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def torch_twin(stats, rank=4, **kwargs):
    """torch's layer that ours with ``stats`` should behave like in training."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    if stats == "cumulative":
        kwargs["momentum"] = None
    return cls(C, **kwargs)


def batches(count=4, shape=(6, C, 4, 5), dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    offsets = 3.0 * torch.randn(1, C, *([1] * (len(shape) - 2)), generator=generator)
    return [
        (offsets + (1.0 + 0.3 * k) * torch.randn(shape, generator=generator)).to(device, dtype)
        for k in range(count)
    ]


# -- PyTorch's own BatchNorm tests -----------------------------------------------------------


@pytest.mark.parametrize("stats", STRATEGIES)
def test_batchnorm_update_stats(stats, torch_device):
    """A training forward updates the statistics and counts the batch; eval changes nothing."""
    module = BatchNorm(C, stats=stats, device=torch_device)
    data = torch.rand(4, C, device=torch_device)
    old = state_copy(module)
    module(data)
    if stats == "exact":  # filled by calibration only: training leaves it alone
        assert_same_state(state_copy(module), old)
    else:
        assert not torch.equal(old["running_mean"], module.running_mean)
        assert not torch.equal(old["running_var"], module.running_var)
        assert int(module.num_batches_tracked) == int(old["num_batches_tracked"]) + 1
    if stats == "exact":
        recalibrate(module, [data])
    module.eval()
    old = state_copy(module)
    module(data)
    assert_same_state(state_copy(module), old)


@pytest.mark.parametrize("stats", STRATEGIES)
def test_batchnorm_buffer_update_when_stats_are_not_tracked(stats, torch_device):
    """``track_running_stats = False`` at runtime: buffers are used but never updated."""
    module = BatchNorm(C, stats=stats, device=torch_device)
    reference = nn.BatchNorm1d(C).to(torch_device)
    module.track_running_stats = False
    reference.track_running_stats = False
    before = state_copy(module)
    x = torch.rand(32, C, device=torch_device)
    torch.testing.assert_close(module(x), reference(x), **FLOAT32)
    assert_same_state(state_copy(module), before)
    if stats == "exact":
        return  # an uncalibrated exact layer cannot evaluate
    module.eval()
    reference.eval()
    torch.testing.assert_close(module(x), reference(x), **FLOAT32)  # the buffers are used


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("how", ["cumulative", "ema-momentum-none"])
def test_batchnorm_simple_average(how, dtype, torch_device):
    """``momentum=None`` (or a cumulative layer) averages batch statistics with equal weight;
    ``reset_running_stats`` starts the average again."""
    if how == "cumulative":
        module = BatchNorm(C, stats="cumulative", dtype=dtype, device=torch_device)
    else:
        module = BatchNorm(C, stats="ema", dtype=dtype, device=torch_device)
        module.momentum = None
    zeros = torch.zeros(C, dtype=dtype, device=torch_device)
    ones = torch.ones(C, dtype=dtype, device=torch_device)
    data1 = torch.rand(4, C, dtype=dtype, device=torch_device)
    data2 = torch.rand(4, C, dtype=dtype, device=torch_device)

    res1 = module(data1)
    running_mean1, running_var1 = module.running_mean.clone(), module.running_var.clone()
    assert not torch.equal(running_mean1, zeros)
    assert not torch.equal(running_var1, ones)
    module.reset_running_stats()
    assert torch.equal(module.running_mean, zeros)
    assert torch.equal(module.running_var, ones)
    assert int(module.num_batches_tracked) == 0

    res2 = module(data2)
    running_mean2, running_var2 = module.running_mean.clone(), module.running_var.clone()
    module.reset_running_stats()

    res3 = module(data1)
    res4 = module(data2)
    torch.testing.assert_close(res3, res1)
    torch.testing.assert_close(res4, res2)
    torch.testing.assert_close(module.running_mean, (running_mean1 + running_mean2) / 2)
    torch.testing.assert_close(module.running_var, (running_var1 + running_var2) / 2)
    assert int(module.num_batches_tracked) == 2


@pytest.mark.parametrize("stats", STRATEGIES)
def test_batchnorm_load_state_dict(stats):
    """``num_batches_tracked`` is a plain buffer: assignable, kept by a non-strict load of an
    empty dict, and a meta module loaded with ``assign=True`` gets a real 0 for it."""
    module = BatchNorm(C, stats=stats)
    assert torch.equal(module.state_dict()["num_batches_tracked"], torch.tensor(0))
    module.num_batches_tracked = torch.tensor(10)
    assert torch.equal(module.state_dict()["num_batches_tracked"], torch.tensor(10))
    module.load_state_dict({}, strict=False)
    assert torch.equal(module.state_dict()["num_batches_tracked"], torch.tensor(10))

    with torch.device("meta"):
        meta = BatchNorm(C, stats=stats)
    assert meta.num_batches_tracked.device == torch.device("meta")
    meta.load_state_dict({}, assign=True, strict=False)
    assert torch.equal(meta.state_dict()["num_batches_tracked"], torch.tensor(0))


@pytest.mark.parametrize(
    ("dtype", "module_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
    ids=["float32", "bfloat16", "mixed"],
)
@pytest.mark.parametrize("shape", [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)], ids=str)
@pytest.mark.parametrize("stats", STRATEGIES)
def test_batchnorm_nhwc_cpu(stats, shape, dtype, module_dtype):
    """Channels-last input gives channels-last output, equal to torch's on contiguous input."""
    torch.manual_seed(0)
    channels = shape[1]
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    grad = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    ours = BatchNorm(channels, stats=stats).to(module_dtype)
    reference = nn.BatchNorm2d(channels).to(module_dtype)
    with torch.no_grad():
        reference.weight.uniform_()
        reference.bias.uniform_()
    ours.load_state_dict(reference.state_dict(), strict=stats != "exact")
    ref_x = x.detach().clone().contiguous().requires_grad_(True)
    out = ours(x)
    out.backward(grad)
    ref_out = reference(ref_x)
    ref_out.backward(grad.contiguous())
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad)
    torch.testing.assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize("stats", STRATEGIES)
def test_batchnorm_non_contig_cpu(stats):
    """A permuted (channels-last strided) input in evaluation: torch's layout and values."""
    torch.manual_seed(1)
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    reference = nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        reference.weight.uniform_()
        reference.bias.uniform_()
    ours = BatchNorm(2, stats=stats)
    if stats == "exact":
        recalibrate(ours, [torch.randn(8, 2, 3, 3)])
        with torch.no_grad():
            reference.running_mean.copy_(ours.running_mean)
            reference.running_var.copy_(ours.running_var)
            ours.weight.copy_(reference.weight)
            ours.bias.copy_(reference.bias)
    else:
        ours.load_state_dict(reference.state_dict())
    ours.eval()
    out = ours(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, reference(x.contiguous()))


@pytest.mark.parametrize("stats", [*STRATEGIES, "batch"])
def test_batchnorm_raises_error_if_less_than_one_value_per_channel(stats, torch_device):
    x = torch.rand(10, device=torch_device)[None, :, None]
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchNorm(10, stats=stats, device=torch_device)(x)


@pytest.mark.parametrize("stats", [*STRATEGIES, "batch"])
def test_batchnorm_empty(stats, torch_device):
    """An empty batch: empty output, zero gradients, statistics untouched (as torch's)."""
    ours = BatchNorm(C, stats=stats, device=torch_device)
    reference = nn.BatchNorm2d(C).to(torch_device)
    x = torch.randn(0, C, 2, 2, device=torch_device, requires_grad=True)
    y = ours(x)
    assert y.shape == x.shape
    y.backward(torch.ones_like(y))
    assert x.grad.shape == x.shape
    reference(torch.randn(0, C, 2, 2, device=torch_device)).sum().backward()
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad)
    assert torch.equal(ours.weight.grad, torch.zeros(C, device=torch_device))
    if stats != "batch":
        assert torch.equal(ours.running_mean, torch.zeros(C, device=torch_device))
        assert torch.equal(ours.running_var, torch.ones(C, device=torch_device))
        assert int(ours.num_batches_tracked) == 0


# -- what torch's tools see ------------------------------------------------------------------


@pytest.mark.parametrize("stats", [*STRATEGIES, "batch"])
def test_the_layer_is_a_torch_batchnorm(stats):
    module = BatchNorm(C, stats=stats)
    assert isinstance(module, _BatchNorm)
    assert module.track_running_stats == (stats != "batch")


def network(**bn_kwargs):
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, C, 3, padding=1, bias=False),
        nn.BatchNorm2d(C, **bn_kwargs),
        nn.ReLU(),
        nn.Conv2d(C, C, 3, padding=1),
        nn.BatchNorm2d(C, **bn_kwargs),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(C, 4),
        nn.BatchNorm1d(4, **bn_kwargs),
    )


def loader(count=5, seed=4):
    generator = torch.Generator().manual_seed(seed)
    return [
        (1.0 + torch.randn(8, 2, 5, 5, generator=generator), torch.zeros(8)) for _ in range(count)
    ]


def train_a_little(model, steps=3):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, _ in loader(steps, seed=5):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("stats", ["ema", "cumulative"])
def test_swa_update_bn_gives_torch_statistics(stats):
    """``swa_utils.update_bn`` resets and recomputes an equal-weight average of batch
    statistics, exactly as on the native model; momentum and mode are restored."""
    native = train_a_little(network(momentum=None if stats == "cumulative" else 0.1))
    ours = convert(copy.deepcopy(native), stats=stats)
    ours.eval()
    native.eval()
    torch.optim.swa_utils.update_bn(loader(), native)
    torch.optim.swa_utils.update_bn(loader(), ours)
    assert not ours.training
    for mine, theirs in zip(
        (m for m in ours.modules() if isinstance(m, BatchNorm)),
        (m for m in native.modules() if isinstance(m, _BatchNorm)),
        strict=True,
    ):
        assert mine.momentum == theirs.momentum
        torch.testing.assert_close(mine.running_mean, theirs.running_mean, **FLOAT32)
        torch.testing.assert_close(mine.running_var, theirs.running_var, **FLOAT32)
        assert int(mine.num_batches_tracked) == int(theirs.num_batches_tracked) == 5


@pytest.mark.parametrize("stats", ["welford", "exact"])
def test_swa_update_bn_pools_every_input_for_pooled_layers(stats):
    """A Welford layer pools what update_bn shows it; an exact layer is calibrated by it
    (update_bn sets ``momentum=None``, which makes an exact layer pool its training input)."""
    model = convert(train_a_little(network()), stats=stats)
    data = loader()
    torch.optim.swa_utils.update_bn(data, model)
    first = model[1]
    with torch.no_grad():
        inputs = torch.cat([model[0](x) for x, _ in data])
    torch.testing.assert_close(first.running_mean, inputs.mean(dim=(0, 2, 3)), **FLOAT32)
    torch.testing.assert_close(first.running_var, inputs.var(dim=(0, 2, 3)), **FLOAT32)
    assert first.momentum == 0.1
    model.eval()
    assert model(data[0][0]).shape == (8, 4)  # every layer, exact ones too, evaluates
    # afterwards training no longer feeds an exact layer
    if stats == "exact":
        before = state_copy(first)
        model.train()
        model(data[0][0])
        assert_same_state(state_copy(first), before)


@pytest.mark.parametrize("stats", STRATEGIES)
def test_fuse_conv_bn_eval(stats):
    model = convert(train_a_little(network()), stats=stats)
    if stats == "exact":
        recalibrate(model, [x for x, _ in loader()])
    model.eval()
    conv, bn = model[0], model[1]
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    x = loader(1, seed=6)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(fused(x), bn(conv(x)), **FLOAT32)


@pytest.mark.parametrize("stats", TRAINED)
def test_quantization_fuse_modules_after_revert(stats):
    """``torch.ao.quantization.fuse_modules`` matches torch's exact classes: revert first."""
    model = convert(train_a_little(network()), stats=stats)
    model.eval()
    x = loader(1, seed=7)[0][0]
    with torch.no_grad():
        expected = model(x)
    plain = revert(model)
    fused = torch.ao.quantization.fuse_modules(plain, [["0", "1", "2"], ["3", "4"]])
    assert isinstance(fused[1], nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), expected, **FLOAT32)


@pytest.mark.parametrize("stats", STRATEGIES)
def test_a_norm_layer_parameter_filter_selects_the_same_parameters(stats):
    """The usual "no weight decay on BatchNorm" filter finds our layers as torch's."""

    def no_decay(model):
        return [
            name
            for module_name, module in model.named_modules()
            if isinstance(module, _BatchNorm)
            for name in (f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False))
        ]

    native = network()
    expected = no_decay(native)
    assert len(expected) == 6
    assert no_decay(convert(native, stats=stats)) == expected


def test_convert_sync_batchnorm_replaces_the_layer_with_torch_s():
    """torch's converter sees a ``_BatchNorm`` and swaps in its own class (the documented
    reason to use ``sync=True`` instead), carrying the statistics it reads."""
    model = convert(train_a_little(network()), stats="welford")
    mean = model[1].running_mean.clone()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(synced[1]) is nn.SyncBatchNorm
    assert torch.equal(synced[1].running_mean, mean)


def test_convert_to_exact_does_not_carry_momentum_none():
    """``momentum=None`` would make an exact layer pool training batches: a converted exact
    layer waits for recalibrate whatever torch's layer averaged."""
    model = convert(network(momentum=None), stats="exact")
    layers = [m for m in model.modules() if isinstance(m, BatchNorm)]
    assert [m.momentum for m in layers] == [0.1, 0.1, 0.1]
    before = [state_copy(m) for m in layers]
    model(loader(1)[0][0])
    for layer, state in zip(layers, before, strict=True):
        assert_same_state(state_copy(layer), state)
    assert convert(network(momentum=None), stats="exact", momentum=None)[1].momentum is None


# -- torch's runtime semantics ----------------------------------------------------------------


def run_both(ours, theirs, schedule):
    """Train both layers on the same batches, applying each step's settings to both."""
    for x, settings in zip(batches(len(schedule)), schedule, strict=True):
        for module in (ours, theirs):
            for name, value in settings.items():
                setattr(module, name, value)
        torch.testing.assert_close(ours(x), theirs(x), **FLOAT32)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **FLOAT32)
        torch.testing.assert_close(ours.running_var, theirs.running_var, **FLOAT32)
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


def test_momentum_is_read_at_every_forward():
    schedule = [{}] * 2 + [{"momentum": 1.0}] + [{"momentum": 0.5}] * 2 + [{"momentum": None}] * 3
    schedule += [{"momentum": 0.01}] * 2
    run_both(BatchNorm(C, stats="ema"), nn.BatchNorm2d(C), schedule)


def test_momentum_changes_between_unread_steps_take_effect_in_order():
    """Steps under different momenta fold with their own momentum, read or not."""
    ours, theirs = BatchNorm(C, stats="ema"), nn.BatchNorm2d(C)
    data = batches(6)
    for x, momentum in zip(data, [0.1, 0.1, 0.9, None, None, 0.3], strict=True):
        ours.momentum = theirs.momentum = momentum
        ours(x)
        theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **FLOAT32)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **FLOAT32)


def test_a_cumulative_layer_ignores_momentum():
    schedule = [{}] * 2 + [{"momentum": 0.5}] * 2 + [{"momentum": None}] * 2
    ours = BatchNorm(C, stats="cumulative")
    theirs = nn.BatchNorm2d(C, momentum=None)
    for x, settings in zip(batches(len(schedule)), schedule, strict=True):
        if "momentum" in settings:
            ours.momentum = settings["momentum"]
        ours(x)
        theirs(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, **FLOAT32)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **FLOAT32)


def test_a_debiased_ema_refuses_another_momentum_at_runtime():
    module = BatchNorm(C, stats="ema", debias=True)
    x = batches(1)[0]
    module(x)
    before = state_copy(module)
    module.momentum = 0.5
    with pytest.raises(ValueError, match="momentum") as error:
        module(x)
    assert "0.5" in str(error.value)
    assert "0.1" in str(error.value)
    assert_same_state(state_copy(module), before)


def test_track_running_stats_is_read_at_every_forward():
    schedule = [{}] * 2 + [{"track_running_stats": False}] * 2 + [{"track_running_stats": True}]
    for stats in ("ema", "cumulative"):
        theirs = nn.BatchNorm2d(C, momentum=None if stats == "cumulative" else 0.1)
        run_both(BatchNorm(C, stats=stats), theirs, schedule)


@pytest.mark.parametrize("stats", STRATEGIES)
def test_reset_running_stats_resets_the_strategy_and_pending_batches(stats):
    data = batches(5)
    module, fresh = BatchNorm(C, stats=stats), BatchNorm(C, stats=stats)
    for x in data[:3]:
        module(x)  # pending, unread
    if stats == "exact":
        recalibrate(module, data[:2])
    module.reset_running_stats()
    assert_same_state(state_copy(module), state_copy(fresh))
    for x in data[3:]:
        module(x)
        fresh(x)
    assert_same_state(state_copy(module), state_copy(fresh))
    if stats == "exact":
        module.eval()
        with pytest.raises(ValueError, match="recalibrate"):
            module(data[0])


@pytest.mark.parametrize("stats", [*STRATEGIES, "batch"])
def test_reset_parameters_resets_weights_and_statistics(stats):
    module = BatchNorm(C, stats=stats)
    with torch.no_grad():
        module.weight.uniform_(2.0, 3.0)
        module.bias.uniform_(2.0, 3.0)
    module(batches(1)[0])
    module.reset_parameters()
    assert_same_state(state_copy(module), state_copy(BatchNorm(C, stats=stats)))


@pytest.mark.parametrize("stats", STRATEGIES)
def test_a_meta_module_loads_with_assign(stats, torch_device):
    """Built on meta, loaded with ``assign=True``: every parameter and buffer is real, on the
    state dict's device, and the layer evaluates as the one saved."""
    source = BatchNorm(C, stats=stats, device=torch_device)
    data = [x.to(torch_device) for x in batches(3)]
    for x in data:
        source(x)
    if stats == "exact":
        recalibrate(source, data)
    with torch.device("meta"):
        meta = BatchNorm(C, stats=stats)
    saved = state_copy(source)  # as from torch.load: assign=True takes these very tensors
    meta.load_state_dict(saved, assign=True)
    for name, tensor in [*meta.named_parameters(), *meta.named_buffers()]:
        assert tensor.device.type == torch_device, name
    assert_same_state(state_copy(meta), state_copy(source))
    meta.eval()
    source.eval()
    with torch.no_grad():
        torch.testing.assert_close(meta(data[0]), source(data[0]))
    meta.train()
    source.train()
    meta(data[1])
    source(data[1])
    assert_same_state(state_copy(meta), state_copy(source))


@pytest.mark.parametrize("stats", TRAINED)
def test_a_meta_module_loads_a_torch_state_dict_with_assign(stats):
    reference = torch_twin(stats)
    for x in batches(3):
        reference(x)
    with torch.device("meta"):
        meta = BatchNorm(C, stats=stats)
    meta.load_state_dict(reference.state_dict(), assign=True)
    for name, tensor in [*meta.named_parameters(), *meta.named_buffers()]:
        assert tensor.device.type == "cpu", name
    assert int(meta.num_batches_tracked) == 3
    torch.testing.assert_close(meta.running_mean, reference.running_mean)


@pytest.mark.parametrize("stats", STRATEGIES)
def test_share_memory_reaches_every_buffer(stats):
    module = BatchNorm(C, stats=stats)
    for x in batches(2):
        module(x)
    module.share_memory()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        assert tensor.is_shared(), name
    for name, tensor in module.named_buffers():
        if name.startswith(f"{stats}."):
            assert tensor.dtype == torch.float64, name


@pytest.mark.parametrize("stats", TRAINED)
def test_to_reaches_every_buffer_and_keeps_float64(stats, torch_device):
    module = BatchNorm(C, stats=stats)
    module(batches(1)[0])
    module = module.to(torch_device).half()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        assert tensor.device.type == torch_device, name
        if name.startswith(f"{stats}."):
            assert tensor.dtype == torch.float64, name
    module.float()
    x = batches(1, device=torch_device)[0]
    cpu = BatchNorm(C, stats=stats)
    cpu(batches(1)[0])
    cpu(x.cpu())
    module(x)
    torch.testing.assert_close(module.running_mean.cpu(), cpu.running_mean, **FLOAT32)


# -- the ring: pending batches are folded whenever the statistics are read --------------------


@pytest.mark.parametrize("read", ["attribute", "state_dict", "eval", "deepcopy", "to"])
@pytest.mark.parametrize("stats", TRAINED)
def test_every_read_sees_every_batch(stats, read):
    ours, theirs = BatchNorm(C, stats=stats), torch_twin(stats)
    data = batches(5)
    for x in data:
        ours(x)
        theirs(x)
    if read == "state_dict":
        state = ours.state_dict()
        mean, count = state["running_mean"], state["num_batches_tracked"]
    elif read == "eval":
        ours.eval()
        theirs.eval()
        with torch.no_grad():
            y, y_ref = ours(data[0]), theirs(data[0])
        if stats != "welford":
            torch.testing.assert_close(y, y_ref, **FLOAT32)
        mean, count = ours._buffers["running_mean"], ours._buffers["num_batches_tracked"]
    elif read == "deepcopy":
        clone = copy.deepcopy(ours)
        mean, count = clone._buffers["running_mean"], clone._buffers["num_batches_tracked"]
    elif read == "to":
        moved = ours.to(torch.float64)
        mean, count = moved._buffers["running_mean"], moved._buffers["num_batches_tracked"]
    else:
        mean, count = ours.running_mean, ours.num_batches_tracked
    if stats != "welford":
        torch.testing.assert_close(mean.float(), theirs.running_mean, **FLOAT32)
    assert int(count) == 5


@pytest.mark.parametrize("stats", TRAINED)
def test_a_full_ring_folds_by_itself(stats):
    """Past a full ring the statistics are those of every batch, however many."""
    ours, theirs = BatchNorm(C, stats=stats), torch_twin(stats, rank=2)
    for x in batches(AMORTIZED_STEPS * 2 + 3, shape=(4, C), seed=8):
        ours(x)
        theirs(x)
    assert int(ours.num_batches_tracked) == AMORTIZED_STEPS * 2 + 3
    if stats != "welford":
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **FLOAT32)
        torch.testing.assert_close(ours.running_var, theirs.running_var, **FLOAT32)


@pytest.mark.parametrize("stats", TRAINED)
def test_backward_works_across_folds(stats):
    """torch's backward reads the running buffers the kernel wrote: a fold (the ring full, or
    a read) between a forward and its backward must not have written them again."""
    ours, theirs = BatchNorm(C, stats=stats), torch_twin(stats, rank=2)
    data = batches(AMORTIZED_STEPS + 6, shape=(5, C), seed=9)
    for k, x in enumerate(data):
        outputs = []
        for layer in (ours, theirs):
            x_k = x.clone().requires_grad_(True)
            y = layer(x_k)
            if k % 3 == 0:  # two forwards, then one backward (shared layer, as a siamese net)
                y = y + layer(x_k * 2.0)
            if k % 5 == 0:
                layer.running_mean  # noqa: B018 - a read folds the ring before the backward
            (y * torch.arange(1.0, 6.0)[:, None]).sum().backward()
            outputs.append((x_k.grad, layer.weight.grad.clone()))
            layer.weight.grad = None
        for mine, reference in zip(*outputs, strict=True):
            torch.testing.assert_close(mine, reference, **FLOAT32)
    if stats != "welford":
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, **FLOAT32)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


@pytest.mark.parametrize("stats", TRAINED)
def test_non_finite_batches_are_counted_once_read(stats):
    module = BatchNorm(C, stats=stats)
    data = batches(4)
    data[1][0, 0, 0, 0] = float("nan")
    data[2][0, 1, 0, 0] = float("inf")
    for x in data:
        module(x)
    assert int(module.num_batches_tracked) == 2
    assert int(module.num_batches_skipped) == 2
    reference = BatchNorm(C, stats=stats)
    for x in (data[0], data[3]):
        reference(x)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(module, name), getattr(reference, name), **FLOAT64)


# -- cost per step ------------------------------------------------------------------------------


def top_level_operators(step, steps=AMORTIZED_STEPS):
    """Top-level aten operators per call of ``step`` over ``steps`` calls (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    def under_aten(event):
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    for _ in range(steps):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    events = profiler.events()
    return sum(e.name.startswith("aten::") and not under_aten(e) for e in events) / steps


@pytest.mark.parametrize("stats", STRATEGIES)
def test_a_training_forward_costs_at_most_four_operators(stats):
    x = batches(1)[0]
    native = nn.BatchNorm2d(C)
    assert top_level_operators(lambda: native(x)) == 2
    module = BatchNorm(C, stats=stats)
    assert top_level_operators(lambda: module(x)) <= 4


# -- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("stats", TRAINED)
def test_compile_traces_without_graph_breaks_or_recompiles(stats):
    """One graph for every step (``fullgraph=True``; a recompile per ring slot would fail
    ``error_on_recompile``), and the statistics of eager training."""
    torch._dynamo.reset()
    eager, compiled_module = BatchNorm(C, stats=stats), BatchNorm(C, stats=stats)
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    data = batches(4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x in data:
            torch.testing.assert_close(compiled(x), eager(x), **FLOAT32)
    torch.testing.assert_close(compiled_module.running_mean, eager.running_mean, **FLOAT64)
    torch.testing.assert_close(compiled_module.running_var, eager.running_var, **FLOAT64)
    assert int(compiled_module.num_batches_tracked) == 4


# -- CUDA: fp32, autocast, channels-last (skipped without CUDA) ----------------------------------


@pytest.mark.parametrize("stats", TRAINED)
def test_cuda_training_matches_torch_in_float32_autocast_and_channels_last(stats, torch_device):
    if torch_device != "cuda":
        pytest.skip("CUDA variant")
    for mode in ("float32", "autocast", "channels_last"):
        ours = BatchNorm(C, stats=stats).cuda()
        theirs = torch_twin(stats).cuda()
        for x in batches(3, shape=(8, C, 6, 6), device="cuda"):
            if mode == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", enabled=mode == "autocast"):
                y, y_ref = ours(x), theirs(x)
            torch.testing.assert_close(y, y_ref, **FLOAT32)
        if stats != "welford":
            torch.testing.assert_close(ours.running_mean, theirs.running_mean, **FLOAT32)
            torch.testing.assert_close(ours.running_var, theirs.running_var, **FLOAT32)
        for name, tensor in ours.named_buffers():
            assert tensor.is_cuda, name
