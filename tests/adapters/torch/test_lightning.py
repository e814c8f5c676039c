"""``BatchNormStatistics``: the Lightning callback, run by a real ``Trainer`` on the CPU.

The references are those of the ``recalibrate`` tests, built on plain torch: after fit, a
deep copy of the trained network is reverted to torch's BatchNorm classes, and each layer's
input over the training batches is collected with forward pre-hooks and reduced with NumPy
(one pass: every BN normalizing with batch statistics, dropout off; layer by layer: in
execution order, with the layers upstream already holding their reference statistics).
"""

from __future__ import annotations

import copy
import functools
import importlib
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
lightning = pytest.importorskip("normstats.adapters.torch.lightning", exc_type=ImportError)

from torch import nn  # noqa: E402

from normstats.adapters.torch import BatchNorm, revert  # noqa: E402

from .test_recalibrate import (  # noqa: E402
    FLOAT64,
    assert_statistics,
    conv_net,
    layerwise_reference,
    make_batches,
    one_pass_reference,
    randomized,
    reduce,
)

BatchNormStatistics = lightning.BatchNormStatistics
LightningModule = lightning.LightningModule
Trainer = lightning.Trainer

# Lightning's advice for real training runs, which these few CPU batches do not need (more
# dataloader workers), and the deprecation of a torch pytree API that Lightning 2.6 calls
# whenever it sets up its dataloaders (torch 2.13 deprecates ``isinstance(x, LeafSpec)``).
pytestmark = [
    pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers"),
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated"),
]


class Classifier(LightningModule):
    """``conv_net`` (three BatchNorm layers, dropout) trained with SGD on (x, y) batches, or
    on dict batches ``{"x": ..., "y": ...}``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(callback, **kwargs):
    settings = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return Trainer(callbacks=[callback], **{**settings, **kwargs})


def training_data(dicts=False):
    """Uneven (x, y) batches of float64 images, as a DataLoader that yields them as they are."""
    batches = make_batches()
    labels = [torch.randint(0, 3, (len(x),)) for x in batches]
    items = [{"x": x, "y": y} if dicts else (x, y) for x, y in zip(batches, labels, strict=True)]
    return batches, torch.utils.data.DataLoader(items, batch_size=None)


def batchnorm_weights(module):
    return {
        name: (m.weight.detach().clone(), m.bias.detach().clone())
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


@pytest.mark.parametrize(
    ("stats", "layerwise"),
    [("welford", False), ("welford", True), ("exact", False)],
    ids=["welford-one-pass", "welford-layerwise", "exact-one-pass"],
)
def test_fit_converts_trains_and_recalibrates_on_the_training_data(stats, layerwise):
    torch.manual_seed(0)
    module = Classifier(randomized(conv_net()))
    before = batchnorm_weights(module.net)
    batches, loader = training_data()
    fit = trainer(BatchNormStatistics(stats, layerwise=layerwise))
    fit.fit(module, loader)

    layers = {name: m for name, m in module.net.named_modules() if isinstance(m, BatchNorm)}
    assert set(layers) == set(before) == {"1", "6", "10"}
    assert all(layer.stats_name == stats for layer in layers.values())
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    for name, layer in layers.items():
        # the optimizer holds the converted layers' parameters, and trained them
        assert {id(layer.weight), id(layer.bias)} <= optimized
        assert not torch.equal(layer.weight, before[name][0]), name
        assert not torch.equal(layer.bias, before[name][1]), name

    plain = revert(copy.deepcopy(module.net))  # the trained network, in plain torch
    reference = (layerwise_reference if layerwise else one_pass_reference)(plain, batches)
    assert_statistics(module.net, reference, **FLOAT64)


def test_dict_batches_reach_the_model_through_batch_to_input_and_max_batches_applies():
    torch.manual_seed(1)
    module = Classifier(randomized(conv_net()))
    batches, loader = training_data(dicts=True)
    callback = BatchNormStatistics(
        "ema", momentum=0.3, max_batches=2, batch_to_input=lambda batch: batch["x"]
    )
    trainer(callback).fit(module, loader)
    assert all(m.momentum == 0.3 for m in module.net.modules() if isinstance(m, BatchNorm))
    plain = revert(copy.deepcopy(module.net))
    assert_statistics(module.net, one_pass_reference(plain, batches[:2]), **FLOAT64)


class TrainingInputs(lightning.Callback):
    """Records the input of every BatchNorm layer of ``module.net`` at each training step."""

    def on_fit_start(self, trainer, pl_module):
        net = pl_module.net
        self.inputs = {n: [] for n, m in net.named_modules() if isinstance(m, BatchNorm)}
        for name in self.inputs:
            net.get_submodule(name).register_forward_pre_hook(functools.partial(self.record, name))

    def record(self, name, module, args):
        self.inputs[name].append(args[0].detach().clone())


def test_without_recalibration_the_layers_keep_their_training_statistics():
    torch.manual_seed(2)
    module = Classifier(randomized(conv_net()))
    batches, loader = training_data()
    recorder = TrainingInputs()
    fit = trainer(BatchNormStatistics("welford", recalibrate=False))
    fit.callbacks.append(recorder)
    fit.fit(module, loader)
    # welford pools every training batch: the inputs the layers saw while the weights moved
    assert all(len(inputs) == len(batches) for inputs in recorder.inputs.values())
    pooled = {name: reduce(inputs) for name, inputs in recorder.inputs.items()}
    assert_statistics(module.net, pooled, **FLOAT64)


class Validated(Classifier):
    def validation_step(self, batch, batch_idx):
        return self.training_step(batch, batch_idx)


def test_exact_layers_refuse_validation_during_fit_saying_what_to_do():
    torch.manual_seed(3)
    module = Validated(randomized(conv_net()))
    _, loader = training_data()
    fit = trainer(BatchNormStatistics("exact"), num_sanity_val_steps=1)
    with pytest.raises(ValueError, match="validation during fit cannot evaluate"):
        fit.fit(module, loader, loader)


class LateLayers(Classifier):
    """Builds its network in ``configure_model``, after the callback's ``setup``."""

    def __init__(self):
        super().__init__(None)

    def configure_model(self):
        if self.net is None:
            self.net = randomized(conv_net())


def test_layers_built_after_the_conversion_are_refused_at_fit_start():
    torch.manual_seed(4)
    _, loader = training_data()
    with pytest.raises(ValueError, match=r"torch ones at \['net.1', 'net.6', 'net.10'\]"):
        trainer(BatchNormStatistics()).fit(LateLayers(), loader)


class TwoLoaders(Classifier):
    """Trains on a list of two dataloaders: each batch is a list of two (x, y) batches."""

    def training_step(self, batch, batch_idx):
        return sum(super(TwoLoaders, self).training_step(b, batch_idx) for b in batch)


def test_several_training_dataloaders_are_refused_for_recalibration():
    torch.manual_seed(5)
    _, loader = training_data()
    module = TwoLoaders(randomized(conv_net()))
    with pytest.raises(ValueError, match="expected one training dataloader"):
        trainer(BatchNormStatistics()).fit(module, [loader, loader])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"stats": "median"}, ValueError, "stats"),
        ({"stats": "exact", "recalibrate": False}, ValueError, "recalibrate: expected True"),
        ({"layerwise": "yes"}, TypeError, "layerwise"),
        ({"max_batches": 0}, ValueError, "max_batches: expected a positive int, got 0"),
        ({"max_batches": 2.0}, TypeError, "max_batches: expected a positive int, got float"),
        ({"batch_to_input": "x"}, TypeError, "batch_to_input: expected a callable"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"no_such_argument": 1}, TypeError, "no_such_argument"),
    ],
)
def test_bad_arguments_fail_when_the_callback_is_built(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchNormStatistics(**kwargs)


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    assert BatchNormStatistics(max_batches=np.int64(3)).max_batches == 3


def test_without_lightning_the_import_says_which_extra_to_install(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: not importable
    monkeypatch.delitem(sys.modules, "normstats.adapters.torch.lightning")
    with pytest.raises(ModuleNotFoundError) as info:
        importlib.import_module("normstats.adapters.torch.lightning")
    message = str(info.value)
    assert "\n" not in message
    assert message.endswith("pip install 'normstats[lightning]'")
    assert info.value.name == "pytorch_lightning"


def test_the_torch_adapter_does_not_import_lightning():
    script = (
        "import sys, normstats.adapters.torch; "
        "print(sorted(m for m in sys.modules if 'lightning' in m))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
