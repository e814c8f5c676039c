"""The torch ``BatchNorm``'s small-batch training modes: Batch Renormalization and Ghost
BatchNorm.

References are written here with torch autograd and nothing of normstats' torch adapter:
Batch Renormalization as its explicit formula (Ioffe, 2017), with ``r`` and ``d`` computed
from the detached batch statistics and the running estimate of a NumPy estimator of the same
strategy fed the same batches, clipped with the limits of
:func:`normstats.functional.renorm_limits` at the step; Ghost BatchNorm as
``torch.nn.functional.batch_norm`` on each chunk of the batch; the statistics fed to the
strategy against ``nn.BatchNorm2d`` or NumPy over the whole batch. Tolerances: float64
``rtol=1e-10``, float32 ``rtol=1e-5``.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest

import normstats as ns
from normstats.functional import renorm_limits

from ...helpers import assert_same_state
from ...user_strategies import LastK

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402, N812
from torch import nn  # noqa: E402

from normstats.adapters.torch import BatchNorm, convert, revert  # noqa: E402

from .test_batchnorm import train_step  # noqa: E402

C = 3
F64 = torch.float64
FLOAT64 = {"rtol": 1e-10, "atol": 1e-12}
FLOAT32 = {"rtol": 1e-5, "atol": 1e-5}
SHAPES = {2: (10, C), 3: (6, C, 5), 4: (5, C, 3, 4)}
R_MAX, D_MAX = 1.5, 0.5
"""Tight limits, so that the batches below are clipped in some channels and not in others."""
OPTIONS = {
    "affine": {},
    "no-affine": {"affine": False},
    "no-bias": {"bias": False},
}


def axes_of(x):
    return (0, *range(2, x.dim()))


def per_channel(values, rank):
    return torch.as_tensor(np.asarray(values), dtype=F64).reshape(1, C, *([1] * (rank - 2)))


def drifting_batches(rank=4, count=6, dtype=F64, seed=0, sizes=None):
    """Batches whose per-channel mean and scale drift from step to step, near mean 0 and
    variance 1 (an EMA's initial estimate), so that the batch statistics differ from the
    running estimate by more than the limits in some channels and by less in others."""
    generator = torch.Generator().manual_seed(seed)
    shape = SHAPES[rank]
    offsets = 0.5 * torch.randn(C, generator=generator, dtype=F64)
    scales = torch.empty(C, dtype=F64).uniform_(0.6, 1.6, generator=generator)
    batches = []
    for k, n in enumerate(sizes or [shape[0]] * count):
        drift = 1.0 + 0.3 * torch.randn(C, generator=generator, dtype=F64).abs()
        noise = torch.randn((n, *shape[1:]), generator=generator, dtype=F64)
        x = per_channel(offsets + 0.2 * k, rank) + per_channel(scales * drift, rank) * noise
        batches.append(x.to(dtype))
    return batches


def with_parameters(module, seed=1):
    """``module`` with non-trivial weight and bias (where it has them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if module.weight is not None:
            module.weight.copy_(torch.empty(C, dtype=F64).uniform_(0.5, 2.0, generator=generator))
        if module.bias is not None:
            module.bias.copy_(torch.randn(C, generator=generator, dtype=F64))
    return module


def leaf_copies(module):
    """The module's weight and bias as fresh float64 leaves for the reference (or None)."""
    return [
        None if p is None else p.detach().to(F64).clone().requires_grad_()
        for p in (module.weight, module.bias)
    ]


def affine(y, weight, bias):
    shape = (1, C) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def renorm_reference(x, weight, bias, estimate, limits, eps=1e-5):
    """Batch Renormalization's training output by its definition, and whether ``r`` / ``d``
    were clipped per channel: ``x_hat`` with the batch mean and biased variance (gradients
    through them), ``r``, ``d`` from their detached values and ``estimate`` (None: no
    estimate yet, so ``r = 1``, ``d = 0``)."""
    axes = axes_of(x)
    mean = x.mean(axes, keepdim=True)
    var = x.var(axes, correction=0, keepdim=True)
    x_hat = (x - mean) / torch.sqrt(var + eps)
    if estimate is None:
        return affine(x_hat, weight, bias), None
    r_max, d_max = limits
    running_mean, running_var = (per_channel(v, x.dim()) for v in estimate)
    sigma = torch.sqrt(running_var + eps)
    r_free = torch.sqrt(var.detach() + eps) / sigma
    d_free = (mean.detach() - running_mean) / sigma
    r, d = r_free.clamp(1 / r_max, r_max), d_free.clamp(-d_max, d_max)
    clipped = (r != r_free) | (d != d_free)
    return affine(x_hat * r + d, weight, bias), clipped.flatten()


def numpy_estimator(stats):
    """The NumPy estimator whose estimate the layer's strategy must have (same settings)."""
    if isinstance(stats, ns.Strategy):
        return copy.deepcopy(stats)
    return ns.make_stats(stats, **({"momentum": 0.1} if stats == "ema" else {}))


def reference_step(reference, x, upstream, parameters):
    x = x.detach().clone().requires_grad_(True)
    y, clipped = reference(x)
    (y * upstream).sum().backward()
    grads = [x.grad] + [None if p is None else p.grad for p in parameters]
    return y.detach(), grads, clipped


def sgd(parameters, lr=0.1):
    with torch.no_grad():
        for p in parameters:
            if p is not None:
                p -= lr * p.grad
                p.grad = None


def assert_same_step(ours, theirs, tolerance, step):
    y, grads = ours
    y_ref, grads_ref = theirs
    torch.testing.assert_close(y, y_ref, **tolerance, msg=lambda m: f"output, step {step}: {m}")
    for name, grad, grad_ref in zip(("x", "weight", "bias"), grads, grads_ref, strict=True):
        if grad_ref is None:
            assert grad is None, name
        else:
            torch.testing.assert_close(
                grad, grad_ref, **tolerance, msg=lambda m, n=name: f"{n} grad, step {step}: {m}"
            )


def state_copy(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- Batch Renormalization: forward and backward against the definition -----------------------


def run_renorm_against_reference(stats, rank, warmup, batches, dtype=F64, tolerance=FLOAT64, **kw):
    """Train a renorm layer and the reference side by side (SGD between steps); returns
    which channels were clipped at each step."""
    module = with_parameters(
        BatchNorm(C, stats=stats, renorm=True, r_max=R_MAX, d_max=D_MAX, renorm_warmup=warmup, **kw)
    ).to(dtype)
    parameters = leaf_copies(module)
    estimator = numpy_estimator(stats)
    generator = torch.Generator().manual_seed(5)
    clipped_steps = []
    for k, x in enumerate(batches):
        x = x.to(dtype)  # the values the module sees, given to the reference as well
        upstream = torch.randn(x.shape, generator=generator, dtype=F64)
        assert int(module.num_batches_tracked) == k  # the warm-up's step
        estimate = None if k == 0 else (estimator.mean, estimator.var)
        limits = renorm_limits(k, warmup, R_MAX, D_MAX)

        def reference(xr, estimate=estimate, limits=limits):
            return renorm_reference(xr, *parameters, estimate, limits)

        theirs = reference_step(reference, x.to(F64), upstream, parameters)
        y, grads = train_step(module, x, upstream.to(dtype))
        wide = [None if g is None else g.to(F64) for g in grads]
        assert_same_step((y.to(F64), wide), theirs[:2], tolerance, k)
        clipped_steps.append(theirs[2])
        estimator.update(x.to(F64).numpy(), axis=axes_of(x))
        sgd(module.parameters())
        sgd(parameters)
    return module, estimator, clipped_steps


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("stats", ["ema", "cumulative", "welford"])
def test_renorm_forward_and_backward_are_those_of_the_definition(stats, rank, option):
    batches = drifting_batches(rank, seed=rank)
    module, estimator, clipped = run_renorm_against_reference(
        stats, rank, 0, batches, **OPTIONS[option]
    )
    # the steps after the first are clipped in some channels and not in others
    seen = torch.stack(clipped[1:])
    assert seen.any()
    assert not seen.all()
    mean, var = module.population_statistics()
    np.testing.assert_allclose(mean.numpy(), estimator.mean, **FLOAT64)
    np.testing.assert_allclose(var.numpy(), estimator.var, **FLOAT64)


def test_renorm_with_a_user_strategy_corrects_towards_its_estimate():
    run_renorm_against_reference(LastK(k=2), 4, 2, drifting_batches(4, seed=9))


def test_renorm_in_float32_matches_the_float64_definition():
    run_renorm_against_reference(
        "welford", 4, 3, drifting_batches(4, seed=3), dtype=torch.float32, tolerance=FLOAT32
    )


def test_renorm_without_clipping_trains_with_the_running_statistics():
    """With limits that never clip, ``x_hat * r + d`` is ``(x - mu) / sigma``: training
    normalizes with the running estimate (the paper's identity), a check of the layer that
    shares no formula with the reference above."""
    module = BatchNorm(C, stats="welford", renorm=True, r_max=1e6, d_max=1e6, dtype=F64)
    batches = drifting_batches(4, count=4, seed=2)
    module(batches[0])
    for x in batches[1:]:
        mean, var = (per_channel(v.numpy(), 4) for v in module.population_statistics())
        expected = (x - mean) / torch.sqrt(var + module.eps)
        expected = affine(expected, module.weight.detach(), module.bias.detach())
        torch.testing.assert_close(module(x).detach(), expected, **FLOAT64)


def test_the_first_step_is_plain_batch_normalization():
    """Before the first tracked batch there is no estimate: r = 1, d = 0, whatever the
    strategy's initial state holds (an EMA's 0 / 1)."""
    x = drifting_batches(4, count=1, seed=4)[0]
    for stats in ("ema", "welford"):
        ours = with_parameters(BatchNorm(C, stats=stats, renorm=True, dtype=F64))
        torch_layer = with_parameters(nn.BatchNorm2d(C, dtype=F64))
        torch.testing.assert_close(ours(x), torch_layer(x), **FLOAT64)


def test_evaluation_is_unchanged_by_renorm_and_ghost():
    batches = drifting_batches(4, count=3, seed=6)
    plain = BatchNorm(C, stats="welford", dtype=F64)
    for x in batches:
        plain(x)
    for kwargs in ({"renorm": True}, {"virtual_batch_size": 2}):
        module = BatchNorm(C, stats="welford", dtype=F64, **kwargs)
        module.load_state_dict(plain.state_dict())
        module.eval()
        plain.eval()
        torch.testing.assert_close(module(batches[0]), plain(batches[0]), rtol=0, atol=0)


# -- the warm-up ----------------------------------------------------------------------------


def test_the_warmup_limits_at_every_step_are_renorm_limits():
    module = BatchNorm(C, renorm=True, r_max=3.0, d_max=5.0, renorm_warmup=7)
    for step in range(12):
        r_max, d_max = module._renorm_limits.at(torch.tensor(step))
        assert (float(r_max), float(d_max)) == renorm_limits(step, 7, 3.0, 5.0), step


def test_the_warmup_resumes_from_a_state_dict():
    """The warm-up's step is num_batches_tracked: a layer loaded from a state dict halfway
    through continues exactly as the one that kept training."""
    batches = drifting_batches(4, count=6, seed=7)
    settings = {"stats": "ema", "renorm": True, "r_max": 2.0, "d_max": 1.0, "renorm_warmup": 5}
    kept = with_parameters(BatchNorm(C, dtype=F64, **settings))
    for x in batches[:3]:
        kept(x)
    buffer = io.BytesIO()
    torch.save(kept.state_dict(), buffer)
    buffer.seek(0)
    resumed = BatchNorm(C, dtype=F64, **settings)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert int(resumed.num_batches_tracked) == 3
    for x in batches[3:]:
        torch.testing.assert_close(resumed(x), kept(x), rtol=0, atol=0)
    assert_same_state(resumed.state_dict(), kept.state_dict())


# -- Ghost BatchNorm ----------------------------------------------------------------------------


def ghost_reference(x, size, weight, bias, eps=1e-5):
    """Each consecutive chunk of ``size`` samples normalized with its own statistics."""
    return torch.cat(
        [F.batch_norm(c, None, None, weight, bias, True, 0.0, eps) for c in x.split(size)]
    )


GHOST_CASES = {
    "even": (4, [8, 8, 8]),
    "remainder": (3, [7, 8, 5]),
    "one-sample-last": (2, [5, 3, 7]),  # a last chunk of one sample of 12 values per channel
    "whole": (8, [8, 5, 3]),  # never more than one virtual batch
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("case", list(GHOST_CASES))
def test_ghost_forward_and_backward_are_those_of_separately_normalized_chunks(case, option):
    size, sizes = GHOST_CASES[case]
    module = with_parameters(
        BatchNorm(C, stats="ema", virtual_batch_size=size, dtype=F64, **OPTIONS[option])
    )
    parameters = leaf_copies(module)
    generator = torch.Generator().manual_seed(8)
    for k, x in enumerate(drifting_batches(4, sizes=sizes, seed=8)):
        upstream = torch.randn(x.shape, generator=generator, dtype=F64)

        def reference(xr):
            return ghost_reference(xr, size, *parameters), None

        theirs = reference_step(reference, x, upstream, parameters)
        assert_same_step(train_step(module, x, upstream), theirs[:2], FLOAT64, k)
        sgd(module.parameters())
        sgd(parameters)


@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("stats", ["ema", "cumulative", "welford"])
def test_ghost_feeds_the_strategy_the_whole_batch_once_per_step(stats, rank):
    """The running statistics are those of torch's layer (EMA, cumulative) or NumPy's pooled
    ones (Welford) fed the whole batches, and one step counts as one batch."""
    sizes = [8, 9, 6, 8, 11]
    batches = drifting_batches(rank, sizes=sizes, seed=10 + rank)
    module = BatchNorm(C, stats=stats, virtual_batch_size=3, dtype=F64)
    estimator = numpy_estimator(stats)
    for x in batches:
        module(x)
        estimator.update(x.numpy(), axis=axes_of(x))
    np.testing.assert_allclose(module.running_mean.numpy(), estimator.mean, **FLOAT64)
    np.testing.assert_allclose(module.running_var.numpy(), estimator.var, **FLOAT64)
    assert int(module.num_batches_tracked) == len(sizes)
    if stats != "welford":
        torch_layer = nn.BatchNorm1d if rank < 4 else nn.BatchNorm2d
        twin = torch_layer(C, momentum=0.1 if stats == "ema" else None, dtype=F64)
        for x in batches:
            twin(x)
        torch.testing.assert_close(module.running_mean, twin.running_mean, **FLOAT64)
        torch.testing.assert_close(module.running_var, twin.running_var, **FLOAT64)


def test_ghost_steps_fold_through_a_full_ring_with_plain_steps_between():
    """More steps than the ring holds, ghost ones (batch larger than a virtual batch) and
    plain ones (smaller) interleaved: the EMA of torch's layer over the whole batches."""
    generator = torch.Generator().manual_seed(11)
    module = BatchNorm(C, stats="ema", virtual_batch_size=4)
    twin = nn.BatchNorm2d(C)
    for k in range(70):
        x = 2.0 + torch.randn((3 if k % 5 == 0 else 10, C, 2, 2), generator=generator)
        module(x)
        twin(x)
    torch.testing.assert_close(module.running_mean, twin.running_mean, **FLOAT32)
    torch.testing.assert_close(module.running_var, twin.running_var, **FLOAT32)
    assert int(module.num_batches_tracked) == 70


@pytest.mark.parametrize("shape", [(5, C), (7, C, 1), (9, C, 1, 1)])
def test_a_virtual_batch_of_one_value_per_channel_is_refused_and_changes_nothing(shape):
    module = BatchNorm(C, stats="welford", virtual_batch_size=2)
    module(torch.randn(4, *shape[1:]))
    before = state_copy(module)
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*virtual_batch_size=2"):
        module(torch.randn(shape))
    assert_same_state(module.state_dict(), before)


def test_a_batch_of_one_virtual_batch_and_one_value_per_channel_is_refused_as_in_torch():
    module = BatchNorm(C, stats="welford", virtual_batch_size=4)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(torch.randn(1, C))


# -- non-finite batches ---------------------------------------------------------------------


SMALL_BATCH_MODES = {
    "renorm": {"renorm": True, "renorm_warmup": 2},
    "ghost": {"virtual_batch_size": 3},
}


@pytest.mark.parametrize("mode", list(SMALL_BATCH_MODES))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_batch_is_skipped_as_if_it_never_came(mode, value):
    batches = drifting_batches(4, count=4, seed=12, sizes=[7, 7, 7, 7])
    bad = batches[1].clone()
    bad[0, 1, 0, 0] = value
    settings = {"stats": "welford", "dtype": F64, **SMALL_BATCH_MODES[mode]}
    skipping, clean = BatchNorm(C, **settings), BatchNorm(C, **settings)
    skipping(batches[0])
    clean(batches[0])
    y_bad = skipping(bad)
    assert not torch.isfinite(y_bad[:, 1]).all()
    for x in batches[2:]:
        torch.testing.assert_close(skipping(x), clean(x), **FLOAT64)
    assert int(skipping.num_batches_skipped) == 1
    assert int(skipping.num_batches_tracked) == int(clean.num_batches_tracked) == 3
    theirs = clean.state_dict()
    ours = {k: v for k, v in skipping.state_dict().items() if k != "num_batches_skipped"}
    assert_same_state(ours, {k: v for k, v in theirs.items() if k != "num_batches_skipped"})


@pytest.mark.parametrize("mode", list(SMALL_BATCH_MODES))
def test_nan_policy_raise_refuses_a_non_finite_batch_and_changes_nothing(mode):
    module = BatchNorm(C, stats="ema", nan_policy="raise", **SMALL_BATCH_MODES[mode])
    module(torch.randn(7, C, 2, 2))
    before = state_copy(module)
    bad = torch.randn(7, C, 2, 2)
    bad[3, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        module(bad)
    assert_same_state(module.state_dict(), before)


# -- construction errors ----------------------------------------------------------------------


@pytest.mark.parametrize("stats", ["exact", "batch"])
def test_renorm_without_a_running_estimate_in_training_is_refused(stats):
    with pytest.raises(ValueError, match=rf"renorm.*stats='{stats}'"):
        BatchNorm(C, stats=stats, renorm=True)


def test_renorm_with_ghost_is_refused_naming_both():
    with pytest.raises(ValueError, match=r"renorm, virtual_batch_size: .*virtual_batch_size=4"):
        BatchNorm(C, renorm=True, virtual_batch_size=4)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"r_max": 0.5}, ValueError, "r_max"),
        ({"r_max": float("inf")}, ValueError, "r_max"),
        ({"d_max": -1.0}, ValueError, "d_max"),
        ({"r_max": "3"}, TypeError, "r_max"),
        ({"renorm_warmup": -1}, ValueError, "renorm_warmup"),
        ({"renorm_warmup": 2.5}, TypeError, "renorm_warmup"),
        ({"virtual_batch_size": 0}, ValueError, "virtual_batch_size"),
        ({"virtual_batch_size": 2.0}, TypeError, "virtual_batch_size"),
        ({"renorm": "yes"}, TypeError, "renorm"),
    ],
)
def test_bad_small_batch_settings_are_refused_naming_them(kwargs, error, name):
    with pytest.raises(error, match=name):
        BatchNorm(C, **kwargs)


def test_numpy_scalars_are_accepted_as_settings():
    module = BatchNorm(
        C,
        renorm=np.bool_(True),
        r_max=np.float64(2.0),
        d_max=np.float32(1.0),
        renorm_warmup=np.int64(4),
    )
    assert (module.renorm, module.r_max, module.d_max, module.renorm_warmup) == (True, 2.0, 1.0, 4)
    assert type(module.renorm_warmup) is int
    assert BatchNorm(C, virtual_batch_size=np.int32(4)).virtual_batch_size == 4


# -- state dicts, copies, repr, convert ---------------------------------------------------------


@pytest.mark.parametrize("mode", list(SMALL_BATCH_MODES))
def test_state_dicts_are_those_of_a_plain_layer_and_round_trip_with_torch(mode):
    settings = SMALL_BATCH_MODES[mode]
    module = BatchNorm(C, stats="ema", **settings)
    for x in drifting_batches(4, count=3, dtype=torch.float32, sizes=[7, 7, 7]):
        module(x)
    assert list(module.state_dict()) == list(BatchNorm(C, stats="ema").state_dict())
    torch_layer = nn.BatchNorm2d(C)
    torch_layer.load_state_dict(module.state_dict(), strict=False)
    back = BatchNorm(C, stats="ema", **settings)
    back.load_state_dict(torch_layer.state_dict())
    for key in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
        torch.testing.assert_close(back.state_dict()[key], module.state_dict()[key])
    clone = copy.deepcopy(module)
    assert {k: getattr(clone, k) for k in settings} == settings


def test_repr_shows_the_small_batch_settings():
    assert "renorm=True, r_max=2.0, d_max=5.0, renorm_warmup=10" in repr(
        BatchNorm(C, renorm=True, r_max=2.0, renorm_warmup=10)
    )
    assert "virtual_batch_size=16" in repr(BatchNorm(C, virtual_batch_size=16))
    assert "renorm" not in repr(BatchNorm(C))
    assert "virtual" not in repr(BatchNorm(C))


def small_net():
    return nn.Sequential(
        nn.Conv2d(2, C, 3),
        nn.BatchNorm2d(C),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(C * 4, C),
        nn.BatchNorm1d(C),
    )


def test_convert_passes_the_small_batch_settings_to_every_layer():
    model = convert(
        small_net(), stats="welford", renorm=True, r_max=2.0, d_max=1.0, renorm_warmup=5
    )
    layers = [m for m in model.modules() if isinstance(m, BatchNorm)]
    assert len(layers) == 2
    for layer in layers:
        assert (layer.stats_name, layer.renorm, layer.r_max, layer.d_max, layer.renorm_warmup) == (
            "welford",
            True,
            2.0,
            1.0,
            5,
        )
    model(torch.randn(6, 2, 4, 4))
    ghost = convert(small_net(), virtual_batch_size=4)
    assert [m.virtual_batch_size for m in ghost.modules() if isinstance(m, BatchNorm)] == [4, 4]
    reverted = revert(ghost)
    assert sum(isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) for m in reverted.modules()) == 2


def test_convert_with_renorm_refuses_an_untracked_layer_before_replacing_any():
    model = small_net()
    model[5] = nn.BatchNorm1d(C, track_running_stats=False)
    with pytest.raises(ValueError, match=r"renorm.*track_running_stats=False in 5"):
        convert(model, renorm=True)
    assert not any(isinstance(m, BatchNorm) for m in model.modules())


def test_convert_to_exact_with_renorm_is_refused():
    with pytest.raises(ValueError, match="renorm"):
        convert(small_net(), stats="exact", renorm=True)


# -- precision: float16 / bfloat16 modules, float64 parity ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(SMALL_BATCH_MODES))
def test_a_low_precision_module_trains_as_the_float64_one_and_keeps_float64_statistics(mode, dtype):
    settings = {"stats": "welford", **SMALL_BATCH_MODES[mode]}
    low = BatchNorm(C, **settings).to(dtype)
    wide = BatchNorm(C, dtype=F64, **settings)
    tolerance = (
        {"rtol": 2e-2, "atol": 4e-2} if dtype is torch.bfloat16 else {"rtol": 4e-3, "atol": 8e-3}
    )
    for x in drifting_batches(4, count=4, sizes=[7, 7, 7, 7], seed=13):
        x = x.to(dtype)  # the values the module sees, given to the float64 one as well
        torch.testing.assert_close(low(x).to(F64), wide(x.to(F64)), **tolerance)
    assert all(b.dtype == F64 for b in low.strategy_state.buffers())
    # the strategy got float32-or-better moments of the same values: float64 digits agree
    mean, var = low.population_statistics()
    wide_mean, wide_var = wide.population_statistics()
    torch.testing.assert_close(mean, wide_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, wide_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", list(SMALL_BATCH_MODES))
def test_channels_last_input_trains_as_contiguous_input(mode):
    """The same outputs and gradients for (N, C, H, W) input laid out channels-last, whose
    gradient the kernels' backward gets in that layout too."""
    settings = {"stats": "welford", "dtype": F64, **SMALL_BATCH_MODES[mode]}
    contiguous = with_parameters(BatchNorm(C, **settings))
    channels_last = with_parameters(BatchNorm(C, **settings))
    generator = torch.Generator().manual_seed(15)
    for x in drifting_batches(4, count=3, sizes=[7, 7, 7], seed=15):
        upstream = torch.randn(x.shape, generator=generator, dtype=F64)
        layout = torch.channels_last
        # (the upstream gradient in the other layout: the backward lays it out as the input)
        ours = train_step(channels_last, x.contiguous(memory_format=layout), upstream)
        assert ours[0].is_contiguous(memory_format=layout)
        assert_same_step(ours, train_step(contiguous, x, upstream), FLOAT64, 0)


@pytest.mark.parametrize("mode", list(SMALL_BATCH_MODES))
def test_parameter_gradients_without_an_input_gradient(mode):
    """An input that needs no gradient (a network's first layer): the parameters' gradients
    alone, those of a run whose input does."""
    settings = {"stats": "ema", "dtype": F64, **SMALL_BATCH_MODES[mode]}
    with_input, without = (
        with_parameters(BatchNorm(C, **settings)),
        with_parameters(BatchNorm(C, **settings)),
    )
    x = drifting_batches(4, count=1, sizes=[7], seed=16)[0]
    upstream = torch.randn(x.shape, dtype=F64, generator=torch.Generator().manual_seed(16))
    train_step(with_input, x, upstream)
    (without(x) * upstream).sum().backward()
    torch.testing.assert_close(without.weight.grad, with_input.weight.grad, **FLOAT64)
    torch.testing.assert_close(without.bias.grad, with_input.bias.grad, **FLOAT64)


@pytest.mark.parametrize("mode", list(SMALL_BATCH_MODES))
def test_autocast_bfloat16_trains_close_to_float32(mode):
    settings = {"stats": "welford", **SMALL_BATCH_MODES[mode]}
    autocast, wide = BatchNorm(C, **settings), BatchNorm(C, **settings)
    for x in drifting_batches(4, count=3, sizes=[7, 7, 7], seed=17, dtype=torch.float32):
        x = x.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = autocast(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), wide(x.float()), rtol=2e-2, atol=4e-2)
    assert all(b.dtype == F64 for b in autocast.strategy_state.buffers())
    torch.testing.assert_close(autocast.running_var, wide.running_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", list(SMALL_BATCH_MODES))
def test_a_second_derivative_is_refused(mode):
    """The backward runs torch's kernels on statistics saved from the forward: it is not
    itself differentiable, and asking for it says so rather than giving a wrong number."""
    module = BatchNorm(C, **SMALL_BATCH_MODES[mode])
    x = torch.randn(7, C, 2, 2, requires_grad=True)
    (grad,) = torch.autograd.grad(module(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.sum().backward()


# -- torch.compile ------------------------------------------------------------------------------


COMPILED = {
    "renorm-warmup": {"stats": "welford", "renorm": True, "renorm_warmup": 3},
    "renorm": {"stats": "ema", "renorm": True},
    "ghost": {"stats": "ema", "virtual_batch_size": 3},
}


# torch.compile itself instantiates torch.autograd.Function to trace a custom one, which
# torch deprecates (torch/_dynamo/side_effects.py, torch 2.13)
@pytest.mark.filterwarnings(
    "ignore:<class 'torch.autograd.function.Function'> should not be instantiated"
    ":DeprecationWarning"
)
@pytest.mark.parametrize("mode", list(COMPILED))
def test_compile_traces_without_graph_breaks_or_recompiles(mode):
    """One graph (``fullgraph=True``; ``error_on_recompile``) for every step, including
    those of the warm-up, and the outputs, gradients and statistics of eager training."""
    torch._dynamo.reset()
    eager = BatchNorm(C, **COMPILED[mode])
    compiled_module = BatchNorm(C, **COMPILED[mode])
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    generator = torch.Generator().manual_seed(14)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x in drifting_batches(4, count=5, dtype=torch.float32, sizes=[7] * 5, seed=14):
            upstream = torch.randn(x.shape, generator=generator)
            assert_same_step(
                train_step(compiled, x, upstream), train_step(eager, x, upstream), FLOAT32, 0
            )
    torch.testing.assert_close(compiled_module.running_mean, eager.running_mean, **FLOAT32)
    torch.testing.assert_close(compiled_module.running_var, eager.running_var, **FLOAT32)
    assert int(compiled_module.num_batches_tracked) == 5
