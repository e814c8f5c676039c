"""``convert`` / ``revert``: every torch BatchNorm of a model swapped and back.

The reference is the torch model itself, trained a few steps and evaluated before the
conversion: its eval outputs must survive ``convert`` and ``revert`` unchanged, and every
layer must carry its torch settings, weights and statistics.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from normstats.adapters.torch import BatchNorm, convert, recalibrate, revert  # noqa: E402

from ...helpers import assert_same_state  # noqa: E402

TORCH_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
C = 4
CLASSES = 5
SHAPES = {2: (6, C), 3: (5, C, 7), 4: (4, C, 3, 5), 5: (3, C, 2, 3, 4)}
FLOAT32 = {"rtol": 1e-5, "atol": 1e-6}


class Block(nn.Module):
    """A residual block; with a 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, cin, cout, stride=1, **bn_kwargs):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, **bn_kwargs)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """Stem, two residual blocks, pooling and a dense head, with every kind of torch BN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.block1 = Block(8, 8, momentum=None)  # PyTorch's cumulative average
        self.block2 = Block(8, 12, stride=2, eps=1e-3, momentum=0.05)
        self.plain = nn.BatchNorm2d(12, affine=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 10)
        self.bn_fc = nn.BatchNorm1d(10)
        self.no_bias = nn.BatchNorm1d(10, bias=False)
        self.untracked = nn.BatchNorm1d(10, track_running_stats=False)
        self.head = nn.Linear(10, CLASSES)

    def forward(self, x):
        h = self.plain(self.block2(self.block1(self.stem(x))))
        h = torch.relu(self.bn_fc(self.fc(self.pool(h).flatten(1))))
        return self.head(self.untracked(self.no_bias(h)))


def trained_model(dtype=torch.float32, steps=3):
    """SmallResNet trained a few SGD steps in torch (non-trivial weights and statistics)."""
    model = SmallResNet().to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, dtype=dtype)
        y = torch.randint(0, CLASSES, (8,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def torch_batchnorms(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, TORCH_BATCHNORMS)}


def ours(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, BatchNorm)}


def expected_stats(original, stats):
    if not original.track_running_stats:
        return "batch"
    if stats == "ema" and original.momentum is None:
        return "cumulative"
    return stats


def assert_carried(original, new):
    """Weights, settings, mode, dtype and device of a torch BN carried into ``new``."""
    assert new.num_features == original.num_features
    assert new.eps == original.eps
    assert new.affine == original.affine
    assert (new.weight is None) == (original.weight is None)
    assert (new.bias is None) == (original.bias is None)
    for name in ("weight", "bias"):
        if getattr(original, name) is not None:
            assert torch.equal(getattr(new, name), getattr(original, name)), name
            assert getattr(new, name).dtype == getattr(original, name).dtype
            assert getattr(new, name).device == getattr(original, name).device
    assert new.training == original.training
    assert new.track_running_stats == original.track_running_stats


@pytest.mark.parametrize("stats", ["ema", "welford", "cumulative"])
def test_convert_then_revert_keeps_eval_outputs(stats):
    torch.manual_seed(0)
    model = trained_model()
    test = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        expected = model(test)
    originals = torch_batchnorms(model)
    assert len(originals) == 10
    converted = convert(model, stats=stats)
    assert not torch_batchnorms(converted)
    assert set(ours(converted)) == set(originals)
    for name, original in originals.items():
        new = converted.get_submodule(name)
        assert isinstance(new, BatchNorm)
        assert_carried(original, new)
        assert new.stats_name == expected_stats(original, stats), name
        if original.momentum is not None:
            assert new.momentum == original.momentum
        if original.track_running_stats:
            assert torch.equal(new.running_mean, original.running_mean), name
            assert torch.equal(new.running_var, original.running_var), name
            assert int(new.num_batches_tracked) == int(original.num_batches_tracked)
        else:
            assert new.running_mean is None
            assert new.running_var is None
    with torch.no_grad():
        torch.testing.assert_close(converted(test), expected, **FLOAT32)

    reverted = revert(converted)
    assert not ours(reverted)
    for name, original in originals.items():
        back = reverted.get_submodule(name)
        assert type(back) is type(original), name
        assert_carried(original, back)
        if stats == "ema":  # representable in torch: the settings round-trip exactly
            assert back.momentum == original.momentum, name
        if original.track_running_stats:
            assert torch.equal(back.running_mean, original.running_mean), name
            assert torch.equal(back.running_var, original.running_var), name
    assert set(reverted.state_dict()) == set(SmallResNet().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reverted(test), expected, **FLOAT32)


def test_convert_touches_nothing_but_batchnorms_and_keeps_each_mode():
    torch.manual_seed(1)
    model = trained_model()
    model.block1.bn1.train()
    model.no_bias.train()
    model.untracked.train()
    modes = {name: m.training for name, m in model.named_modules()}
    others = {
        name: m
        for name, m in model.named_modules()
        if name and not isinstance(m, TORCH_BATCHNORMS) and not list(m.children())
    }
    converted = convert(model)
    assert converted is model
    assert {name: m.training for name, m in converted.named_modules() if name in modes} == modes
    for name, module in others.items():
        assert converted.get_submodule(name) is module


def test_a_batchnorm_root_is_converted_and_reverted():
    torch.manual_seed(2)
    root = nn.BatchNorm2d(C, eps=1e-4)
    with torch.no_grad():
        root.weight.uniform_(0.5, 2.0)
        root.bias.normal_()
    for _ in range(2):
        root(torch.randn(SHAPES[4]) * 2.0 + 1.0)
    root.eval()
    test = torch.randn(SHAPES[4])
    with torch.no_grad():
        expected = root(test)
    converted = convert(root, stats="welford")
    assert isinstance(converted, BatchNorm)
    assert_carried(root, converted)
    with torch.no_grad():
        torch.testing.assert_close(converted(test), expected, **FLOAT32)
    reverted = revert(converted)
    assert type(reverted) is nn.BatchNorm2d
    assert_carried(root, reverted)
    with torch.no_grad():
        torch.testing.assert_close(reverted(test), expected, **FLOAT32)


def test_convert_to_exact_starts_uncalibrated():
    torch.manual_seed(3)
    model = trained_model()
    originals = {name: copy.deepcopy(m) for name, m in torch_batchnorms(model).items()}
    converted = convert(model, stats="exact")
    test = torch.randn(4, 3, 8, 8)
    for name, original in originals.items():
        new = converted.get_submodule(name)
        assert_carried(original, new)
        assert new.stats_name == ("exact" if original.track_running_stats else "batch")
        if original.track_running_stats:
            assert float(new.state_dict()["exact.count"]) == 0, name
    with pytest.raises(ValueError, match="recalibrate"), torch.no_grad():
        converted(test)
    data = [torch.randn(n, 3, 8, 8) for n in (8, 8, 6)]
    recalibrate(converted, data)
    with torch.no_grad():
        assert torch.isfinite(converted(test)).all()


def test_keyword_arguments_override_what_is_carried():
    torch.manual_seed(4)
    model = trained_model()
    converted = convert(model, stats="ema", eps=1e-3, momentum=0.01)
    for name, layer in ours(converted).items():
        assert layer.eps == 1e-3, name
        assert layer.momentum == 0.01, name
        if layer.track_running_stats:
            assert layer.stats_name == "ema", name


def test_overridden_momentum_drives_the_ema():
    torch.manual_seed(5)
    reference = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C))
    for _ in range(2):
        reference(torch.randn(4, 3, 6, 6))
    converted = convert(copy.deepcopy(reference), stats="ema", eps=1e-3, momentum=0.01)
    reference[1].eps, reference[1].momentum = 1e-3, 0.01
    for _ in range(2):
        x = torch.randn(4, 3, 6, 6)
        torch.testing.assert_close(converted(x), reference(x), **FLOAT32)
    torch.testing.assert_close(converted[1].running_mean, reference[1].running_mean, **FLOAT32)
    torch.testing.assert_close(converted[1].running_var, reference[1].running_var, **FLOAT32)


def test_sync_batchnorm_is_converted_with_sync_and_reverted():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, C, 3), nn.SyncBatchNorm(C, eps=1e-4, momentum=0.2))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].running_mean.normal_()
    original = copy.deepcopy(model[1])
    converted = convert(model, stats="welford")
    layer = converted[1]
    assert isinstance(layer, BatchNorm)
    assert layer.sync
    assert layer.process_group is None
    assert_carried(original, layer)
    assert torch.equal(layer.running_mean, original.running_mean)
    reverted = revert(converted)
    assert type(reverted[1]) is nn.SyncBatchNorm
    assert_carried(original, reverted[1])
    assert reverted[1].momentum == 0.2
    assert torch.equal(reverted[1].running_mean, original.running_mean)


@pytest.mark.parametrize(
    ("rank", "expected"),
    [(2, nn.BatchNorm1d), (3, nn.BatchNorm1d), (4, nn.BatchNorm2d), (5, nn.BatchNorm3d)],
)
def test_a_batchnorm_built_directly_reverts_by_input_rank(rank, expected):
    torch.manual_seed(7)
    layer = BatchNorm(C, stats="ema", eps=1e-4, momentum=0.2)
    layer(torch.randn(SHAPES[rank]) + 1.0)
    layer.eval()
    test = torch.randn(SHAPES[rank])
    with torch.no_grad():
        y = layer(test)
    reverted = revert(nn.Sequential(layer))[0]
    assert type(reverted) is expected
    assert (reverted.eps, reverted.momentum) == (1e-4, 0.2)
    assert not reverted.training
    with torch.no_grad():
        torch.testing.assert_close(reverted(test), y, **FLOAT32)


def test_reverting_a_batchnorm_that_has_seen_no_input_is_refused():
    model = nn.Sequential(nn.Linear(3, C), BatchNorm(C))
    with pytest.raises(ValueError, match="forward"):
        revert(model)
    with pytest.raises(ValueError, match="forward"):
        revert(BatchNorm(C))


def test_reverting_an_uncalibrated_exact_model_is_refused_and_changes_nothing():
    """It used to give plain BatchNorm layers with mean 0 and variance 1."""
    torch.manual_seed(9)
    model = convert(trained_model(), stats="exact")
    model.eval()
    test = torch.randn(4, 3, 8, 8)
    with pytest.raises(ValueError, match="recalibrate") as evaluation:
        model(test)
    kinds = [type(m) for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="recalibrate") as reverting:
        revert(model)
    assert str(reverting.value) == str(evaluation.value)
    assert [type(m) for m in model.modules()] == kinds  # not one layer was replaced
    assert_same_state({k: v.clone() for k, v in model.state_dict().items()}, before)
    recalibrate(model, [torch.randn(n, 3, 8, 8) for n in (8, 6)])
    with torch.no_grad():
        expected = model(test)
    reverted = revert(model)
    assert not ours(reverted)
    with torch.no_grad():
        torch.testing.assert_close(reverted(test), expected, **FLOAT32)


def test_a_float64_model_converts_to_float64_layers():
    torch.manual_seed(8)
    model = trained_model(dtype=torch.float64)
    test = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = model(test)
    converted = convert(model, stats="welford")
    for name, layer in ours(converted).items():
        reference = layer.weight if layer.weight is not None else layer.running_mean
        if reference is not None:
            assert reference.dtype == torch.float64, name
        if layer.running_mean is not None:
            assert layer.running_mean.dtype == torch.float64, name
            assert layer.running_var.dtype == torch.float64, name
    with torch.no_grad():
        torch.testing.assert_close(converted(test), expected, rtol=1e-10, atol=1e-12)
