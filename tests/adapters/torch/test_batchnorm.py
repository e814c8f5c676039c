"""The torch ``BatchNorm`` module against ``nn.BatchNorm1d/2d/3d``.

References are torch's own layers driven with the same weights, inputs and upstream
gradients (autograd on both sides), and NumPy over the concatenated training inputs for the
pooled statistics. Tolerances: float32 ``rtol=1e-5``, float64 ``rtol=1e-10``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from ...helpers import assert_same_state, assert_same_value

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from normstats.adapters.torch import BatchNorm  # noqa: E402

C = 3
SHAPES = {2: (10, C), 3: (6, C, 5), 4: (4, C, 3, 5), 5: (3, C, 2, 3, 4)}
"""A small training batch of every supported rank."""
TORCH_CLASSES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
TOLERANCES = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
}
OPTIONS = {
    "default": ({}, {}),
    "eps": ({"eps": 1e-3}, {"eps": 1e-3}),
    "ema-0.1": ({"momentum": 0.1}, {"stats": "ema", "momentum": 0.1}),
    "ema-0.01": ({"momentum": 0.01}, {"stats": "ema", "momentum": 0.01}),
    "cumulative": ({"momentum": None}, {"stats": "cumulative"}),
    "no-affine": ({"affine": False}, {"affine": False}),
    "no-bias": ({"bias": False}, {"bias": False}),
    "batch": ({"track_running_stats": False}, {"stats": "batch"}),
}
"""Constructor options: (torch's keyword arguments, ours for the same layer)."""
TRAINED = ["ema", "cumulative", "welford"]
"""The strategies that training batches feed."""


def channel_shape(rank):
    return (1, C) + (1,) * (rank - 2)


def make_batches(rank=4, count=4, dtype=torch.float64, sizes=None):
    """Batches with per-channel offsets and scales that drift from batch to batch."""
    offsets = 3.0 * torch.randn(C, dtype=torch.float64).reshape(channel_shape(rank))
    scales = torch.empty(C, dtype=torch.float64).uniform_(0.5, 2.0).reshape(channel_shape(rank))
    shape = SHAPES[rank]
    sizes = sizes or [shape[0]] * count
    return [
        (offsets + (1.0 + 0.3 * k) * scales * torch.randn((n, *shape[1:]), dtype=torch.float64))
        .to(dtype)
        .contiguous()
        for k, n in enumerate(sizes)
    ]


def randomize_affine(reference, ours):
    """Non-trivial weight and bias in ``reference``, copied into ``ours``."""
    with torch.no_grad():
        if reference.weight is not None:
            reference.weight.uniform_(0.5, 2.0)
            ours.weight.copy_(reference.weight)
        if reference.bias is not None:
            reference.bias.normal_()
            ours.bias.copy_(reference.bias)


def state_copy(module):
    """A deep copy of a module's state dict, immune to later in-place changes."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def strategy_keys(module, stats):
    return [k for k in module.state_dict() if k.startswith(f"{stats}.")]


def train_step(module, x, upstream):
    """Forward in training mode and backward of ``sum(y * upstream)``: output and gradients."""
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    (y * upstream).sum().backward()
    grads = [x.grad] + [None if p is None else p.grad for p in (module.weight, module.bias)]
    return y.detach(), grads


def sgd(module, lr=0.1):
    with torch.no_grad():
        for p in module.parameters():
            p -= lr * p.grad
            p.grad = None


def pooled(batches):
    """NumPy mean and unbiased variance per channel of the concatenated batches."""
    union = torch.cat([b.to(torch.float64) for b in batches]).movedim(1, -1).reshape(-1, C)
    values = union.numpy()
    return np.mean(values, axis=0), np.var(values, axis=0, ddof=1)


# -- parity with nn.BatchNorm*d ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_training_and_evaluation_match_torch(rank, option, dtype):
    torch.manual_seed(0)
    torch_kwargs, our_kwargs = OPTIONS[option]
    reference = TORCH_CLASSES[rank](C, dtype=dtype, **torch_kwargs)
    ours = BatchNorm(C, dtype=dtype, **our_kwargs)
    randomize_affine(reference, ours)
    tolerance = TOLERANCES[dtype]
    for x in make_batches(rank, dtype=dtype):
        upstream = torch.randn_like(x)
        y_ref, grads_ref = train_step(reference, x, upstream)
        y, grads = train_step(ours, x, upstream)
        assert y.dtype == dtype
        torch.testing.assert_close(y, y_ref, **tolerance)
        for grad, grad_ref in zip(grads, grads_ref, strict=True):
            assert (grad is None) == (grad_ref is None)
            if grad_ref is not None:
                torch.testing.assert_close(grad, grad_ref, **tolerance)
        if ours.weight is not None:
            sgd(reference)
            sgd(ours)
        if reference.track_running_stats:
            torch.testing.assert_close(ours.running_mean, reference.running_mean, **tolerance)
            torch.testing.assert_close(ours.running_var, reference.running_var, **tolerance)
            assert int(ours.num_batches_tracked) == int(reference.num_batches_tracked)
        else:
            assert ours.running_mean is None
            assert ours.running_var is None
    reference.eval()
    ours.eval()
    test = make_batches(rank, count=1, dtype=dtype)[0]
    with torch.no_grad():
        torch.testing.assert_close(ours(test), reference(test), **tolerance)


@pytest.mark.parametrize("stats", ["welford", "exact"])
def test_training_outputs_and_gradients_of_every_strategy_match_torch(stats):
    torch.manual_seed(1)
    reference = nn.BatchNorm2d(C, dtype=torch.float64)
    ours = BatchNorm(C, stats=stats, dtype=torch.float64)
    randomize_affine(reference, ours)
    for x in make_batches(4, count=3):
        upstream = torch.randn_like(x)
        y_ref, grads_ref = train_step(reference, x, upstream)
        y, grads = train_step(ours, x, upstream)
        torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.float64])
        for grad, grad_ref in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(grad, grad_ref, **TOLERANCES[torch.float64])
        sgd(reference)
        sgd(ours)


def test_defaults_are_torch_defaults():
    reference = nn.BatchNorm2d(C)
    ours = BatchNorm(C)
    assert ours.stats_name == "ema"
    assert (ours.eps, ours.momentum, ours.affine) == (
        reference.eps,
        reference.momentum,
        reference.affine,
    )
    assert ours.training
    assert ours.weight.dtype == reference.weight.dtype == torch.float32
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("rank", [2, 4])
def test_welford_statistics_are_those_of_every_training_input(rank, dtype):
    """Welford: mean / unbiased var of all training inputs, pooled over N (and H, W)."""
    torch.manual_seed(2)
    module = BatchNorm(C, stats="welford", dtype=dtype)
    batches = make_batches(rank, dtype=dtype, sizes=[3, 7, 16, 5, 2])
    for x in batches:
        module(x)
    mean, var = pooled(batches)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(module.running_mean.double().numpy(), mean, rtol=rtol)
    np.testing.assert_allclose(module.running_var.double().numpy(), var, rtol=rtol)
    assert int(module.num_batches_tracked) == len(batches)


@pytest.mark.parametrize("stats", [*TRAINED, "exact", "batch"])
def test_an_empty_batch_passes_through_and_changes_nothing(stats):
    torch.manual_seed(3)
    module = BatchNorm(C, stats=stats)
    for x in make_batches(4, count=2, dtype=torch.float32):
        module(x)
    before = state_copy(module)
    empty = torch.randn(0, C, 4, 5)
    y = module(empty)
    assert y.shape == (0, C, 4, 5)
    assert_same_state(state_copy(module), before)
    if stats != "exact":  # an uncalibrated exact layer cannot evaluate
        module.eval()
        assert module(empty).shape == (0, C, 4, 5)
        assert_same_state(state_copy(module), before)


# -- state dicts -------------------------------------------------------------------------


@pytest.mark.parametrize("stats", [*TRAINED, "exact"])
def test_state_dict_keys_are_torch_names_plus_the_skip_counter_and_the_strategy(stats):
    ours = list(BatchNorm(C, stats=stats).state_dict())
    inner = [k for k in ours if k.startswith(f"{stats}.")]
    assert inner
    expected = {*nn.BatchNorm2d(C).state_dict(), "num_batches_skipped", *inner}
    assert set(ours) == expected
    assert len(ours) == len(expected)


def test_state_dict_of_a_batch_layer_is_torch_untracked_one():
    reference = nn.BatchNorm2d(C, track_running_stats=False)
    assert list(BatchNorm(C, stats="batch").state_dict()) == list(reference.state_dict())


def trained_torch_layer(momentum, steps=3):
    reference = nn.BatchNorm2d(C, momentum=momentum)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 2.0)
        reference.bias.normal_()
    for x in make_batches(4, count=steps, dtype=torch.float32):
        reference(x)
    return reference


@pytest.mark.parametrize("old", [False, True], ids=["current", "without-num_batches_tracked"])
@pytest.mark.parametrize("stats", TRAINED)
def test_torch_state_dict_loads_strictly(stats, old):
    torch.manual_seed(4)
    reference = trained_torch_layer(None if stats == "cumulative" else 0.1)
    state = reference.state_dict()
    if old:
        state = {k: v for k, v in state.items() if k != "num_batches_tracked"}
    ours = BatchNorm(C, stats=stats)
    ours.load_state_dict(state)  # strict
    assert int(ours.num_batches_skipped) == 0
    assert int(ours.num_batches_tracked) == (0 if old else 3)
    test = make_batches(4, count=1, dtype=torch.float32)[0]
    reference.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(test), reference(test), rtol=1e-6, atol=1e-6)
    if stats == "welford" or (old and stats == "cumulative"):
        return  # torch has no counterpart to continue with
    # the strategy resumes from torch's running statistics: training goes on as torch's
    reference.train()
    ours.train()
    for x in make_batches(4, count=2, dtype=torch.float32):
        torch.testing.assert_close(ours(x), reference(x), **TOLERANCES[torch.float32])
        torch.testing.assert_close(ours.running_mean, reference.running_mean)
        torch.testing.assert_close(ours.running_var, reference.running_var)


@pytest.mark.parametrize("stats", TRAINED)
def test_our_state_dict_loads_into_torch_non_strictly(stats):
    torch.manual_seed(5)
    ours = BatchNorm(C, stats=stats)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2.0)
        ours.bias.normal_()
    for x in make_batches(4, count=3, dtype=torch.float32):
        ours(x)
    reference = nn.BatchNorm2d(C)
    result = reference.load_state_dict(ours.state_dict(), strict=False)
    assert result.missing_keys == []
    assert set(result.unexpected_keys) == {"num_batches_skipped", *strategy_keys(ours, stats)}
    assert int(reference.num_batches_tracked) == 3
    test = make_batches(4, count=1, dtype=torch.float32)[0]
    reference.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(test), ours(test), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stats", [*TRAINED, "exact"])
def test_state_dict_round_trips_through_torch_save_and_training_continues(stats):
    torch.manual_seed(6)
    batches = make_batches(4, count=4, dtype=torch.float32)
    ours = BatchNorm(C, stats=stats)
    for x in batches[:2]:
        ours(x)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    fresh = BatchNorm(C, stats=stats)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert_same_state(state_copy(fresh), state_copy(ours))
    for x in batches[2:]:
        assert torch.equal(fresh(x), ours(x))
    assert_same_state(state_copy(fresh), state_copy(ours))


# -- non-finite batches --------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("stats", TRAINED)
def test_a_non_finite_batch_is_skipped_as_if_it_never_came(stats, value):
    torch.manual_seed(7)
    first, second = make_batches(4, count=2, dtype=torch.float32)
    bad = first.clone()
    bad[1, 0, 2, 3] = value
    fed_bad, reference = BatchNorm(C, stats=stats), BatchNorm(C, stats=stats)
    fed_bad(first)
    reference(first)
    before = state_copy(fed_bad)
    # a read folds the pending batches, and folds group their rounding: read both alike
    assert_same_state(state_copy(reference), before)
    y = fed_bad(bad)
    assert torch.isnan(y).any()
    after = state_copy(fed_bad)
    assert int(after["num_batches_skipped"]) == 1
    assert int(after["num_batches_tracked"]) == 1
    for key in before:
        if key != "num_batches_skipped":
            assert_same_value(key, after[key], before[key])
    assert torch.equal(fed_bad(second), reference(second))
    expected = state_copy(reference)
    expected["num_batches_skipped"] = torch.tensor(1)
    assert_same_state(state_copy(fed_bad), expected)


@pytest.mark.parametrize("stats", TRAINED)
def test_nan_policy_raise_refuses_a_non_finite_batch(stats):
    torch.manual_seed(8)
    first, second = make_batches(4, count=2, dtype=torch.float32)
    module = BatchNorm(C, stats=stats, nan_policy="raise")
    module(first)
    before = state_copy(module)
    second[0, 1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        module(second)
    assert_same_state(state_copy(module), before)


# -- dtypes ------------------------------------------------------------------------------


@pytest.mark.parametrize("cast", ["half", "bfloat16"])
@pytest.mark.parametrize("stats", [*TRAINED, "exact"])
def test_strategy_buffers_stay_float64_when_the_module_is_cast(stats, cast):
    module = BatchNorm(C, stats=stats)
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    module = module.half() if cast == "half" else module.to(torch.bfloat16)
    assert module.weight.dtype == dtype
    assert module.running_mean.dtype == dtype
    assert module.running_var.dtype == dtype
    assert module.num_batches_tracked.dtype == torch.long
    state = module.state_dict()
    assert strategy_keys(module, stats)
    for key in strategy_keys(module, stats):
        assert state[key].dtype == torch.float64, key
    module.double()
    assert module.running_mean.dtype == torch.float64
    module.float()
    assert module.running_mean.dtype == torch.float32
    for key in strategy_keys(module, stats):
        assert module.state_dict()[key].dtype == torch.float64, key


LOW_PRECISION = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("stats", TRAINED)
def test_a_low_precision_module_trains_exactly_as_torch_layer_of_its_dtype(stats, dtype):
    """Outputs and gradients are those of nn.BatchNorm2d in the same dtype, bit for bit."""
    torch.manual_seed(9)
    ours = BatchNorm(C, stats=stats, dtype=dtype)
    reference = nn.BatchNorm2d(C, dtype=dtype, momentum=None if stats == "cumulative" else 0.1)
    randomize_affine(reference, ours)
    for x in make_batches(4, count=3, dtype=dtype):
        upstream = torch.randn_like(x)
        y_ref, grads_ref = train_step(reference, x, upstream)
        y, grads = train_step(ours, x, upstream)
        assert y.dtype == dtype
        assert torch.equal(y, y_ref)
        for grad, grad_ref in zip(grads, grads_ref, strict=True):
            assert torch.equal(grad, grad_ref)
    assert ours.running_mean.dtype == dtype
    for key in strategy_keys(ours, stats):
        assert ours.state_dict()[key].dtype == torch.float64


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bfloat16", "float16"])
def test_a_low_precision_module_gives_its_strategy_float32_batch_moments(dtype):
    """Mean 100: bfloat16 and float16 round it to within 0.5 (the strategy used to get an
    error of 3e-2); float32 moments are within 1e-5 of the float64 ones."""
    torch.manual_seed(10)
    ours = BatchNorm(C, stats="welford", dtype=dtype)
    batches = [(100.0 + torch.randn(32, C, 8, 8, dtype=torch.float64)).to(dtype) for _ in range(3)]
    for x in batches:
        ours(x)
    mean, var = pooled(batches)  # float64, of the very values the module saw
    got_mean, got_var = (t.numpy() for t in ours.population_statistics())
    assert np.max(np.abs(got_mean - mean)) <= 1e-4  # float32's spacing at 100 is 7.6e-6
    np.testing.assert_allclose(got_var, var, rtol=1e-5)
    # only the module-dtype buffers round
    assert torch.equal(ours.running_mean, torch.from_numpy(got_mean).to(dtype))
    assert torch.equal(ours.running_var, torch.from_numpy(got_var).to(dtype))


def test_a_float16_module_folds_a_finite_batch_whose_variance_float16_cannot_hold():
    """Variance 1e5 > 65504, the largest float16: the batch used to be skipped as NaN/Inf."""
    torch.manual_seed(11)
    ours = BatchNorm(C, stats="welford", dtype=torch.float16)
    x = (316.0 * torch.randn(16, C, 6, 6)).to(torch.float16)
    assert torch.isfinite(x).all()
    y = ours(x)
    assert torch.isfinite(y).all()
    assert int(ours.num_batches_skipped) == 0
    assert int(ours.num_batches_tracked) == 1
    mean, var = pooled([x])
    got_mean, got_var = ours.population_statistics()
    np.testing.assert_allclose(got_var.numpy(), var, rtol=1e-5)
    np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-5, atol=1e-3)
    assert (var > 65504).all()
    # running_var is the estimate in float16: beyond its range, as torch's float16 layer has it
    assert torch.equal(ours.running_var, got_var.to(torch.float16))
    assert torch.isinf(ours.running_var).all()


def test_autocast_bfloat16_trains_and_keeps_float64_strategy_buffers():
    torch.manual_seed(10)
    conv = nn.Conv2d(2, C, 3)
    reference = nn.Sequential(conv, nn.BatchNorm2d(C))
    ours = nn.Sequential(nn.Conv2d(2, C, 3), BatchNorm(C, stats="ema"))
    ours.load_state_dict(reference.state_dict())
    for _ in range(3):
        x = torch.randn(4, 2, 6, 6)
        outputs = []
        for model in (reference, ours):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = model(x)
            y.float().square().mean().backward()
            outputs.append(y)
        assert outputs[1].dtype == outputs[0].dtype
        torch.testing.assert_close(outputs[1], outputs[0])
        torch.testing.assert_close(ours[0].weight.grad, reference[0].weight.grad)
        for model in (reference, ours):
            sgd(model, lr=0.01)
    bn, reference_bn = ours[1], reference[1]
    assert bn.running_mean.dtype == torch.float32
    torch.testing.assert_close(bn.running_mean, reference_bn.running_mean, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(bn.running_var, reference_bn.running_var, rtol=1e-3, atol=1e-4)
    assert int(bn.num_batches_tracked) == 3
    for key in strategy_keys(bn, "ema"):
        assert bn.state_dict()[key].dtype == torch.float64


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(C,), (2, C, 2, 2, 2, 2)], ids=["1d", "6d"])
def test_input_of_an_unsupported_rank_is_refused(shape):
    module = BatchNorm(C)
    before = state_copy(module)
    with pytest.raises(ValueError, match="expected") as error:
        module(torch.randn(shape))
    assert f"got {len(shape)}D" in str(error.value)
    assert_same_state(state_copy(module), before)


def test_a_wrong_channel_count_is_refused():
    module = BatchNorm(C)
    before = state_copy(module)
    with pytest.raises(ValueError, match=f"expected {C} channels") as error:
        module(torch.randn(4, C + 2, 5))
    assert f"got {C + 2}" in str(error.value)
    assert_same_state(state_copy(module), before)


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1, 1)], ids=["2d", "4d"])
@pytest.mark.parametrize("stats", [*TRAINED, "batch"])
def test_one_value_per_channel_in_training_is_refused_with_torch_message(stats, shape):
    torch.manual_seed(11)
    x = torch.randn(shape)
    message = "Expected more than 1 value per channel when training"
    with pytest.raises(ValueError, match=message):
        TORCH_CLASSES[len(shape)](C)(x)
    module = BatchNorm(C, stats=stats)
    before = state_copy(module)
    with pytest.raises(ValueError, match=message):
        module(x)
    assert_same_state(state_copy(module), before)


def test_one_value_per_channel_is_fine_in_evaluation():
    torch.manual_seed(12)
    x = torch.randn(1, C)
    reference = nn.BatchNorm1d(C).eval()
    module = BatchNorm(C).eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x))


# -- the exact strategy ------------------------------------------------------------------


def test_exact_is_never_fed_by_training_and_refuses_to_evaluate_uncalibrated():
    torch.manual_seed(13)
    module = BatchNorm(C, stats="exact")
    untracked = nn.BatchNorm2d(C, track_running_stats=False)
    initial = {k: v.clone() for k, v in module.state_dict().items() if k.startswith("exact.")}
    for x in make_batches(4, count=3, dtype=torch.float32):
        torch.testing.assert_close(module(x), untracked(x))
    state = module.state_dict()
    assert float(state["exact.count"]) == 0
    for key, value in initial.items():
        assert_same_value(key, state[key], value)
    module.eval()
    with pytest.raises(ValueError, match="recalibrate"):
        module(torch.randn(4, C, 2, 2))


# -- construction ------------------------------------------------------------------------


def test_momentum_none_with_ema_is_refused_pointing_to_cumulative():
    with pytest.raises(ValueError, match="cumulative"):
        BatchNorm(C, momentum=None)
    with pytest.raises(ValueError, match="cumulative"):
        BatchNorm(C, stats="ema", momentum=None)
    assert BatchNorm(C, stats="cumulative", momentum=None).stats_name == "cumulative"


def test_an_unknown_strategy_name_is_refused():
    with pytest.raises(ValueError, match=r"stats.*median"):
        BatchNorm(C, stats="median")


@pytest.mark.parametrize("num_features", [0, -2])
def test_num_features_must_be_positive(num_features):
    with pytest.raises(ValueError, match="num_features"):
        BatchNorm(num_features)


# -- torch.compile -----------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_compiled_module_trains_as_the_eager_one():
    torch.manual_seed(14)
    eager = BatchNorm(C, stats="ema")
    compiled_module = BatchNorm(C, stats="ema")
    compiled = torch.compile(compiled_module)
    for x in make_batches(4, count=3, dtype=torch.float32):
        upstream = torch.randn_like(x)
        y, grads = train_step(eager, x, upstream)
        y_compiled, grads_compiled = train_step(compiled, x, upstream)
        torch.testing.assert_close(y_compiled, y)
        for grad, grad_compiled in zip(grads, grads_compiled, strict=True):
            torch.testing.assert_close(grad_compiled, grad)
        sgd(eager)
        sgd(compiled_module)
    torch.testing.assert_close(compiled_module.running_mean, eager.running_mean)
    torch.testing.assert_close(compiled_module.running_var, eager.running_var)
    assert int(compiled_module.num_batches_tracked) == 3


# -- torch.export ------------------------------------------------------------------------


def exact_model():
    model = nn.Sequential(nn.Linear(5, C), BatchNorm(C, stats="exact"), nn.ReLU())
    return model.eval()


def test_exporting_an_uncalibrated_exact_model_raises_the_recalibrate_error():
    """It used to fail with a data-dependent-guard dump: whether the layer was calibrated
    was read from the device, and remembered only once an eager evaluation had read it."""
    with pytest.raises(ValueError, match="recalibrate") as exporting:
        torch.export.export(exact_model(), (torch.randn(3, 5),))
    with pytest.raises(ValueError, match="recalibrate") as evaluation:
        exact_model()(torch.randn(3, 5))
    assert str(exporting.value) == str(evaluation.value)


def test_a_calibrated_exact_model_exports_and_matches_eager():
    from normstats.adapters.torch import recalibrate

    torch.manual_seed(15)
    model = exact_model()
    recalibrate(model, [2.0 + torch.randn(n, 5) for n in (6, 9)])
    x = torch.randn(4, 5)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.equal(exported.module()(x), model(x))
