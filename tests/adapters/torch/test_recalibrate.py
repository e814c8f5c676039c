"""``recalibrate``: the exact full pass for PyTorch models.

The references are built here from the torch model as it was before ``convert`` (a deep
copy, never touched by normstats): each BatchNorm's input is collected with forward
pre-hooks, concatenated and reduced per channel in float64 with NumPy (mean and
``var(ddof=1)``).

- one pass: every torch BN in train mode (it normalizes with batch statistics), dropout off;
- layer by layer: in execution order, layer k's input is collected with the whole model in
  eval mode and layers 1..k-1 already holding their reference statistics.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from ...helpers import assert_same_state

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from normstats.adapters.torch import BatchNorm, convert, recalibrate  # noqa: E402

TorchBatchNorm = nn.modules.batchnorm._BatchNorm
STRATEGIES = ["exact", "ema", "welford", "cumulative"]
SIZES = [3, 7, 16, 5, 9]
FLOAT64 = {"rtol": 1e-10, "atol": 1e-12}
IN_CHANNELS, SIDE = 2, 4


def conv_net():
    """Conv-BN2d-ReLU-Dropout, then two dense BN1d layers: L = 3, in registration order."""
    return nn.Sequential(
        nn.Conv2d(IN_CHANNELS, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(4 * SIDE * SIDE, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(8, 6),
        nn.BatchNorm1d(6, momentum=None),
        nn.Linear(6, 3),
    )


class ShortcutFirst(nn.Module):
    """A residual net whose shortcut BN is registered before, but runs after, the main path."""

    def __init__(self):
        super().__init__()
        self.shortcut_bn = nn.BatchNorm1d(6)
        self.shortcut = nn.Linear(6, 6)
        self.fc_in = nn.Linear(IN_CHANNELS * SIDE * SIDE, 6)
        self.bn_in = nn.BatchNorm1d(6)
        self.fc1 = nn.Linear(6, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 6)
        self.bn2 = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.bn_in(self.fc_in(x.flatten(1))))
        main = self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(h)))))
        return self.head(torch.relu(main + self.shortcut_bn(self.shortcut(h))))


def randomized(model, dtype=torch.float64):
    """Non-trivial BN weights and biases, and biases that shift every BN input."""
    model = model.to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TorchBatchNorm):
                module.weight.uniform_(0.5, 2.0)
                module.bias.normal_()
            elif isinstance(module, nn.Linear | nn.Conv2d):
                module.bias.normal_(0.0, 2.0)
    return model


def make_batches(sizes=SIZES, dtype=torch.float64):
    offsets = 2.0 * torch.randn(1, IN_CHANNELS, 1, 1, dtype=dtype)
    return [offsets + 1.5 * torch.randn(n, IN_CHANNELS, SIDE, SIDE, dtype=dtype) for n in sizes]


def converted(torch_model, stats, train_steps=2):
    """A converted deep copy, trained a little so that its strategies hold something."""
    model = convert(copy.deepcopy(torch_model), stats=stats).train()
    for x in make_batches([8] * train_steps, dtype=next(model.parameters()).dtype):
        model(x)
    return model


def our_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, BatchNorm)}


def state_copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def modes(model):
    return {name: m.training for name, m in model.named_modules()}


def assert_no_hooks(model):
    for name, module in model.named_modules():
        assert not module._forward_hooks, name
        assert not module._forward_pre_hooks, name


def reduce(inputs):
    """Per-channel mean and unbiased variance of the concatenated inputs (float64 NumPy)."""
    x = torch.cat(inputs).to(torch.float64)
    values = x.movedim(1, -1).reshape(-1, x.shape[1]).numpy()
    return np.mean(values, axis=0), np.var(values, axis=0, ddof=1)


def collect(model, names, batches):
    """The input of each named module over ``batches``, with ``model`` in its current modes."""
    inputs = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: inputs[name].append(args[0].detach().clone())
        )
        for name in names
    ]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def torch_batchnorm_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, TorchBatchNorm)]


def one_pass_reference(torch_model, batches):
    """Every BN normalizes with batch statistics (torch train mode), dropout off."""
    model = copy.deepcopy(torch_model).eval()
    names = torch_batchnorm_names(model)
    for name in names:
        model.get_submodule(name).train()
    return {name: reduce(inputs) for name, inputs in collect(model, names, batches).items()}


def execution_order(model, x):
    order = []
    names = torch_batchnorm_names(model)
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda module, args, name=name: order.append(name)
        )
        for name in names
    ]
    with torch.no_grad():
        model(x[:2])
    for handle in handles:
        handle.remove()
    return order


def layerwise_reference(torch_model, batches):
    """In execution order: collect layer k's inference input, then give it those statistics."""
    model = copy.deepcopy(torch_model).eval()
    reference = {}
    for name in execution_order(model, batches[0]):
        reference[name] = reduce(collect(model, [name], batches)[name])
        layer = model.get_submodule(name)
        with torch.no_grad():
            layer.running_mean.copy_(torch.from_numpy(reference[name][0]))
            layer.running_var.copy_(torch.from_numpy(reference[name][1]))
    return reference


def assert_statistics(model, reference, **tolerance):
    layers = our_layers(model)
    assert set(layers) == set(reference)
    for name, (mean, var) in reference.items():
        layer = layers[name]
        np.testing.assert_allclose(layer.running_mean.double().numpy(), mean, **tolerance)
        np.testing.assert_allclose(layer.running_var.double().numpy(), var, **tolerance)


# -- the statistics ------------------------------------------------------------------------


@pytest.mark.parametrize("tuples", [False, True], ids=["tensors", "tuples"])
@pytest.mark.parametrize("stats", STRATEGIES)
def test_one_pass_pools_each_layer_input_under_batch_statistics(stats, tuples):
    torch.manual_seed(0)
    torch_model = randomized(conv_net())
    model = converted(torch_model, stats)
    batches = make_batches()
    data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches] if tuples else batches
    assert recalibrate(model, data) is model
    assert_statistics(model, one_pass_reference(torch_model, batches), **FLOAT64)


@pytest.mark.parametrize("tuples", [False, True], ids=["tensors", "tuples"])
@pytest.mark.parametrize("stats", STRATEGIES)
def test_layerwise_pools_each_layer_input_at_inference(stats, tuples):
    torch.manual_seed(1)
    torch_model = randomized(conv_net())
    model = converted(torch_model, stats)
    batches = make_batches()
    data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches] if tuples else batches
    recalibrate(model, data, layerwise=True)
    assert_statistics(model, layerwise_reference(torch_model, batches), **FLOAT64)
    # the same, collected from the recalibrated model itself in eval mode
    model.eval()
    inputs = collect(model, list(our_layers(model)), batches)
    assert_statistics(model, {k: reduce(v) for k, v in inputs.items()}, **FLOAT64)


@pytest.mark.parametrize("layerwise", [False, True], ids=["one-pass", "layerwise"])
def test_a_float32_model_is_calibrated_to_float32_precision(layerwise):
    torch.manual_seed(2)
    torch_model = randomized(conv_net(), dtype=torch.float32)
    model = converted(torch_model, "welford")
    batches = make_batches(dtype=torch.float32)
    recalibrate(model, batches, layerwise=layerwise)
    reference = (layerwise_reference if layerwise else one_pass_reference)(torch_model, batches)
    assert_statistics(model, reference, rtol=1e-5, atol=1e-6)


def test_one_pass_and_layerwise_part_for_small_batches_only():
    torch.manual_seed(3)
    torch_model = randomized(conv_net())
    first, last = "1", "10"

    def both(batches):
        one_pass = recalibrate(converted(torch_model, "exact"), batches)
        layerwise = recalibrate(converted(torch_model, "exact"), batches, layerwise=True)
        return our_layers(one_pass), our_layers(layerwise)

    def relative_difference(a, b):
        return float(((a.running_var - b.running_var).abs() / b.running_var).max())

    one_pass, layerwise = both(make_batches([3] * 8))
    # the first layer's input does not depend on any BN; downstream ones do
    torch.testing.assert_close(one_pass[first].running_var, layerwise[first].running_var)
    assert relative_difference(one_pass[last], layerwise[last]) > 1e-2

    one_pass, layerwise = both(make_batches([2000]))
    torch.testing.assert_close(one_pass[first].running_var, layerwise[first].running_var)
    assert relative_difference(one_pass[last], layerwise[last]) < 1e-2


def test_registration_order_that_differs_from_execution_order():
    torch.manual_seed(4)
    torch_model = randomized(ShortcutFirst())
    model = converted(torch_model, "ema")
    assert list(our_layers(model)) == ["shortcut_bn", "bn_in", "bn1", "bn2"]
    batches = make_batches()
    assert execution_order(torch_model, batches[0]) == ["bn_in", "bn1", "bn2", "shortcut_bn"]
    recalibrate(model, batches, layerwise=True)
    assert_statistics(model, layerwise_reference(torch_model, batches), **FLOAT64)
    model.eval()
    inputs = collect(model, list(our_layers(model)), batches)
    assert_statistics(model, {k: reduce(v) for k, v in inputs.items()}, **FLOAT64)


@pytest.mark.parametrize("layerwise", [False, True], ids=["one-pass", "layerwise"])
def test_max_batches_limits_the_batches_used(layerwise):
    torch.manual_seed(5)
    torch_model = randomized(conv_net())
    model = converted(torch_model, "welford")
    batches = make_batches()
    recalibrate(model, batches, layerwise=layerwise, max_batches=2)
    reference = (layerwise_reference if layerwise else one_pass_reference)(torch_model, batches[:2])
    assert_statistics(model, reference, **FLOAT64)


def test_batch_layers_are_left_alone():
    torch.manual_seed(6)
    torch_model = randomized(conv_net())
    torch_model[6] = nn.BatchNorm1d(8, track_running_stats=False, dtype=torch.float64)
    model = converted(torch_model, "welford")
    assert model[6].stats_name == "batch"
    before = {k: v.clone() for k, v in model[6].state_dict().items()}
    recalibrate(model, make_batches(), layerwise=True)
    assert_same_state(state_copy(model[6]), before)


# -- modes, hooks and failures ---------------------------------------------------------------


def mixed_modes(model):
    """Training, with one dropout and one BN in eval mode."""
    model.train()
    model[3].eval()
    model[10].eval()
    return model


@pytest.mark.parametrize("layerwise", [False, True], ids=["one-pass", "layerwise"])
def test_modes_are_restored_and_no_hook_remains(layerwise):
    torch.manual_seed(7)
    model = mixed_modes(converted(randomized(conv_net()), "exact"))
    before = modes(model)
    recalibrate(model, make_batches(), layerwise=layerwise)
    assert modes(model) == before
    assert_no_hooks(model)


def failing_generator(batches):
    yield batches[0]
    yield batches[1]
    raise RuntimeError("the data source broke")


class FailsOnSecondPass:
    """Re-iterable data whose second iteration breaks after one batch."""

    def __init__(self, batches):
        self.batches = batches
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        if self.passes >= 2:
            yield self.batches[0]
            raise RuntimeError("the data source broke")
        yield from self.batches


@pytest.mark.parametrize("layerwise", [False, True], ids=["one-pass", "layerwise"])
@pytest.mark.parametrize("stats", STRATEGIES)
def test_a_failing_data_source_leaves_everything_as_it_was(stats, layerwise):
    torch.manual_seed(8)
    model = mixed_modes(converted(randomized(conv_net()), stats))
    batches = make_batches()
    before, before_modes = state_copy(model), modes(model)
    data = FailsOnSecondPass(batches) if layerwise else failing_generator(batches)
    with pytest.raises(RuntimeError, match="broke"):
        recalibrate(model, data, layerwise=layerwise)
    if layerwise:
        assert data.passes == 2  # the first layer was calibrated before the failure
    assert_same_state(state_copy(model), before)
    assert modes(model) == before_modes
    assert_no_hooks(model)
    # and the model still calibrates afterwards
    recalibrate(model, batches, layerwise=layerwise)


def test_a_one_shot_iterator_is_refused_for_layerwise():
    torch.manual_seed(9)
    model = mixed_modes(converted(randomized(conv_net()), "welford"))
    batches = make_batches()
    before, before_modes = state_copy(model), modes(model)
    data = iter(batches)
    with pytest.raises(TypeError, match="re-iterable"):
        recalibrate(model, data, layerwise=True)
    assert_same_state(state_copy(model), before)
    assert modes(model) == before_modes
    assert_no_hooks(model)
    assert len(list(data)) == len(batches)  # nothing was consumed


def test_a_one_shot_iterator_is_fine_for_one_pass():
    torch.manual_seed(10)
    torch_model = randomized(conv_net())
    model = converted(torch_model, "welford")
    batches = make_batches()
    recalibrate(model, iter(batches))
    assert_statistics(model, one_pass_reference(torch_model, batches), **FLOAT64)


# -- cost ------------------------------------------------------------------------------------


def count_calls(model):
    counts = {name: 0 for name, _ in model.named_children()}

    def hook(module, args, output, name):
        counts[name] += 1

    for name, child in model.named_children():
        child.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
    return counts


@pytest.mark.parametrize("layerwise", [False, True], ids=["one-pass", "layerwise"])
def test_layerwise_stops_each_pass_at_its_layer(layerwise):
    """L = 4 BN layers: the layer before BN k runs in passes k..L, (L + 1) / 2 passes in all;
    BN k itself only in the passes after its own, which stops at its input (as in NumPy)."""
    torch.manual_seed(11)
    width, depth = 4, 4
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    model = convert(nn.Sequential(*layers, nn.Linear(width, 2)), stats="exact")
    batches = [torch.randn(n, width) for n in (4, 6, 5)]
    counts = count_calls(model)
    recalibrate(model, batches, layerwise=layerwise)
    linears = [str(3 * k) for k in range(depth)]
    if not layerwise:
        assert set(counts.values()) == {len(batches)}
        return
    for k, name in enumerate(linears):
        assert counts[name] == len(batches) * (depth - k), (name, counts)
        assert counts[str(3 * k + 1)] == len(batches) * (depth - k - 1)
    assert counts[str(3 * depth)] == 0  # the head never runs
    passes = sum(counts[name] for name in linears) / (len(batches) * depth)
    assert passes == (depth + 1) / 2


# -- non-finite calibration batches ----------------------------------------------------------


POISONED_SIZE = 16
"""The calibration batch (of SIZES) that :class:`Poison` spoils, by its size."""


class Poison(nn.Module):
    """Puts ``value`` into the batches of ``POISONED_SIZE`` samples, whatever pass it is."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        if len(x) != POISONED_SIZE:
            return x
        x = x.clone()
        x[0, 0, 0, 0] = self.value
        return x


def poisoned(torch_model, stats, value, **kwargs):
    """A converted copy whose dropout after the first BN (layer "1") became a Poison: layer
    "1" sees every batch finite, layers "6" and "10" see the poisoned batch non-finite."""
    model = convert(copy.deepcopy(torch_model), stats=stats, **kwargs)
    model[3] = Poison(value)
    return model


NON_FINITE = [float("nan"), float("inf")]


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf"])
@pytest.mark.parametrize("stats", ["exact", "welford"])
def test_one_pass_leaves_a_non_finite_batch_out_of_every_layer_and_reports_it(stats, value):
    torch.manual_seed(12)
    torch_model = randomized(conv_net())
    model = poisoned(torch_model, stats, value)
    batches = make_batches()
    with pytest.warns(RuntimeWarning, match=r"left out 1 batch\(es\) with NaN or Inf"):
        recalibrate(model, batches)
    finite = [x for x in batches if len(x) != POISONED_SIZE]
    assert len(finite) == len(batches) - 1
    # every layer, the first one too (its own input was finite), has the finite batches only
    assert_statistics(model, one_pass_reference(torch_model, finite), **FLOAT64)
    for name, layer in our_layers(model).items():
        assert int(layer.num_batches_skipped) == 1, name


@pytest.mark.parametrize("value", NON_FINITE, ids=["nan", "inf"])
def test_layerwise_leaves_out_the_batches_whose_input_to_the_layer_is_not_finite(value):
    torch.manual_seed(13)
    torch_model = randomized(conv_net())
    model = poisoned(torch_model, "exact", value)
    batches = make_batches()
    with pytest.warns(RuntimeWarning, match="1 for layer '6', 1 for layer '10'"):
        recalibrate(model, batches, layerwise=True)
    layers = our_layers(model)
    assert {name: int(layer.num_batches_skipped) for name, layer in layers.items()} == {
        "1": 0,
        "6": 1,
        "10": 1,
    }
    # each layer has the inputs it sees at inference, over the batches where they are finite
    model.eval()
    finite = [x for x in batches if len(x) != POISONED_SIZE]
    first = collect(model, ["1"], batches)["1"]
    downstream = collect(model, ["6", "10"], finite)
    reference = {"1": reduce(first), **{k: reduce(v) for k, v in downstream.items()}}
    assert_statistics(model, reference, **FLOAT64)


@pytest.mark.parametrize("raising", ["all", "last"])
@pytest.mark.parametrize("layerwise", [False, True], ids=["one-pass", "layerwise"])
def test_nan_policy_raise_names_the_batch_and_leaves_the_model_as_it_was(layerwise, raising):
    torch.manual_seed(14)
    model = mixed_modes(poisoned(randomized(conv_net()), "welford", float("nan")))
    if raising == "all":
        for layer in our_layers(model).values():
            layer.nan_policy = "raise"
    else:
        model[10].nan_policy = "raise"
    before, before_modes = state_copy(model), modes(model)
    batches = make_batches()
    index = [len(x) for x in batches].index(POISONED_SIZE)
    with pytest.raises(ValueError, match=rf"^data: .*NaN or Inf in batch {index} .*'raise'"):
        recalibrate(model, batches, layerwise=layerwise)
    assert_same_state(state_copy(model), before)
    assert modes(model) == before_modes
    assert_no_hooks(model)


def test_nan_policy_raise_set_at_construction_is_followed_by_calibration():
    torch.manual_seed(15)
    model = poisoned(randomized(conv_net()), "exact", float("inf"), nan_policy="raise")
    before = state_copy(model)
    with pytest.raises(ValueError, match="batch 2 at the input of layer '6'"):
        recalibrate(model, make_batches())
    assert_same_state(state_copy(model), before)


def test_calibration_data_without_a_finite_batch_is_refused():
    torch.manual_seed(16)
    model = mixed_modes(converted(randomized(conv_net()), "exact"))
    before, before_modes = state_copy(model), modes(model)
    batches = [x.clone().fill_(float("nan")) for x in make_batches([4, 6])]
    with pytest.raises(ValueError, match=r"no finite batch reached .*\(2 left out"):
        recalibrate(model, batches)
    assert_same_state(state_copy(model), before)
    assert modes(model) == before_modes
