"""Every public entry point, fed what a user might pass by mistake.

Each probe calls one entry point with one input and asserts one of two outcomes:

- the documented result (NumPy scalars where Python numbers are expected, ``np.matrix`` and
  other plain-array inputs give exactly what the equivalent ``ndarray`` gives), or
- a ``TypeError`` / ``ValueError`` whose message names the parameter and says what was
  expected and what arrived, with the whole state (``state_dict`` or fitted attributes)
  exactly as before the call.

The torch module follows torch's convention for ``load_state_dict`` (a ``RuntimeError`` that
collects every problem); there the message must name the offending key.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import normstats as ns

from .helpers import STRATEGIES, assert_same_state, snapshot, to_numpy

FEATURES = 3
RNG = np.random.default_rng(20261130)
GOOD = RNG.normal(2.0, 1.5, size=(6, FEATURES))


def with_value(value: float) -> np.ndarray[Any, Any]:
    x = GOOD.copy()
    x[2, 1] = value
    return x


def matrix(x: np.ndarray[Any, Any]) -> Any:
    """``x`` as an ``np.matrix`` (whose construction NumPy flags as pending deprecation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.asmatrix(x)


def masked() -> np.ma.MaskedArray[Any, Any]:
    return np.ma.masked_array(GOOD, mask=np.eye(6, FEATURES, dtype=bool))


BAD_ARRAYS = {
    "nan": with_value(np.nan),
    "inf": with_value(np.inf),
    "square-overflows": with_value(1e200),
    "masked": masked(),
    "zero-d": np.float64(1.5),
    "zero-d-array": np.array(1.5),
    "empty": np.zeros((0, FEATURES)),
    "int": np.arange(18).reshape(6, FEATURES),
    "bool": np.ones((6, FEATURES), dtype=bool),
    "complex": GOOD.astype(np.complex128),
    "object": np.array([[object()] * FEATURES] * 6),
    "strings": [["a"] * FEATURES] * 6,
    "none": None,
    "other-features": RNG.normal(size=(6, FEATURES + 1)),
}


def names(parameter: str) -> str:
    """A regex matching ``parameter`` as a word (``x`` but not ``max``)."""
    return rf"(?<![\w]){re.escape(parameter)}(?![\w])"


def assert_refused(
    call: Callable[[], object], parameter: str, state: Callable[[], Any], compare: Callable
) -> None:
    """``call`` raises TypeError/ValueError naming ``parameter``; ``state()`` is unchanged."""
    before = state()
    with pytest.raises((TypeError, ValueError), match=names(parameter)) as info:
        call()
    message = str(info.value)
    assert "expected" in message, message
    assert "got" in message, message
    compare(state(), before)


# -- estimators ------------------------------------------------------------------------


@pytest.fixture(params=STRATEGIES, ids=lambda s: s.id)
def fed_estimator(request: pytest.FixtureRequest) -> Any:
    estimator = request.param()
    estimator.update(GOOD)
    return estimator


@pytest.mark.parametrize("value", list(BAD_ARRAYS), ids=list(BAD_ARRAYS))
def test_estimator_update_refuses_bad_batches(fed_estimator: Any, value: str) -> None:
    assert_refused(
        lambda: fed_estimator.update(BAD_ARRAYS[value]),
        "x",
        lambda: snapshot(fed_estimator),
        assert_same_state,
    )


FAR = np.full((6, FEATURES), 1e300)
"""A finite batch (squares overflow, but its spread is zero) far from ``GOOD``: pooling the two
makes the between-batch term (1e300 - 2)**2 * n_a * n_b / n overflow; averaging them does not."""


def test_a_fold_that_overflows_raises_or_is_exact(fed_estimator: Any) -> None:
    before = snapshot(fed_estimator)
    if fed_estimator.name in ("welford", "exact"):
        with pytest.raises(ValueError, match=names("x")):
            fed_estimator.update(FAR)
        assert_same_state(snapshot(fed_estimator), before)
    else:  # an average of the two batches' statistics is finite, and right
        fed_estimator.update(FAR)
        assert np.all(np.isfinite(fed_estimator.mean))
        assert np.all(np.isfinite(fed_estimator.var))


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s.pooled], ids=lambda s: s.id)
def test_a_fold_that_overflows_is_skipped_and_counted(strategy: Any) -> None:
    estimator = strategy(nan_policy="skip")
    estimator.update(GOOD)
    before = snapshot(estimator)
    estimator.update(FAR)
    assert estimator.num_batches_skipped == 1
    after = snapshot(estimator)
    key = f"{estimator.name}.num_batches_skipped"
    assert after.pop(key) == 1
    assert before.pop(key) == 0
    assert_same_state(after, before)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s.pooled], ids=lambda s: s.id)
def test_a_merge_that_overflows_raises_and_changes_neither(strategy: Any) -> None:
    near, far = strategy(), strategy()
    near.update(GOOD)
    far.update(FAR)
    before_near, before_far = snapshot(near), snapshot(far)
    with pytest.raises(ValueError, match=names("other")):
        near.merge(far)
    assert_same_state(snapshot(near), before_near)
    assert_same_state(snapshot(far), before_far)


@pytest.mark.parametrize(
    "x",
    [matrix(GOOD), GOOD.tolist(), GOOD.astype(np.float32)],
    ids=["matrix", "nested-list", "float32"],
)
def test_estimator_update_accepts_array_likes_with_the_ndarray_result(
    estimator_factory: Any, x: Any
) -> None:
    reference, fed = estimator_factory(), estimator_factory()
    reference.update(np.asarray(x, dtype=np.float64))
    fed.update(x)
    assert type(to_numpy(fed.mean)) is np.ndarray
    np.testing.assert_array_equal(np.asarray(fed.mean), np.asarray(reference.mean))
    np.testing.assert_array_equal(np.asarray(fed.var), np.asarray(reference.var))
    assert np.shape(fed.mean) == (FEATURES,)


def test_estimator_accepts_numpy_integer_axes(estimator_factory: Any) -> None:
    x = RNG.normal(size=(4, FEATURES, 2, 2))
    reference, fed = estimator_factory(), estimator_factory()
    reference.update(x, axis=(0, 2, 3))
    fed.update(x, axis=(np.int64(0), np.int32(2), np.int8(-1)))
    np.testing.assert_array_equal(fed.mean, reference.mean)
    np.testing.assert_array_equal(fed.var, reference.var)
    single, plain = estimator_factory(), estimator_factory()
    single.update(GOOD, axis=np.int64(0))
    plain.update(GOOD, axis=0)
    np.testing.assert_array_equal(single.var, plain.var)


NOT_MOMENTS = {
    "array": GOOD,
    "dict": {"count": 6, "mean": GOOD.mean(0), "m2": GOOD.var(0) * 6},
    "none": None,
    "tuple": (6, GOOD.mean(0), GOOD.var(0) * 6),
}


@pytest.mark.parametrize("value", list(NOT_MOMENTS), ids=list(NOT_MOMENTS))
def test_update_moments_refuses_what_is_not_moments(fed_estimator: Any, value: str) -> None:
    assert_refused(
        lambda: fed_estimator.update_moments(NOT_MOMENTS[value]),
        "moments",
        lambda: snapshot(fed_estimator),
        assert_same_state,
    )


def test_update_moments_refuses_other_features(fed_estimator: Any) -> None:
    other = ns.Moments.from_array(RNG.normal(size=(6, FEATURES + 1)))
    assert_refused(
        lambda: fed_estimator.update_moments(other),
        "moments",
        lambda: snapshot(fed_estimator),
        assert_same_state,
    )


BAD_STATE_VALUES = {
    "nan": np.nan,
    "inf": np.inf,
    "negative": -1.0,
}


@pytest.mark.parametrize("value", list(BAD_STATE_VALUES), ids=list(BAD_STATE_VALUES))
def test_load_state_dict_refuses_invalid_values(fed_estimator: Any, value: str) -> None:
    state = fed_estimator.state_dict()
    prefix = next(iter(state)).split(".")[0] + "."
    for key in [k for k in state if hasattr(state[k], "shape") and np.ndim(state[k])]:
        if value == "negative" and key.removeprefix(prefix) not in ("m2", "var"):
            continue
        corrupt = {k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}
        corrupt[key] = np.full_like(corrupt[key], BAD_STATE_VALUES[value])
        assert_refused(
            lambda corrupt=corrupt: fed_estimator.load_state_dict(corrupt),
            "state_dict",
            lambda: snapshot(fed_estimator),
            assert_same_state,
        )
    for counter in ("count", "num_batches", "num_batches_skipped"):
        corrupt = dict(state)
        corrupt[prefix + counter] = -3
        assert_refused(
            lambda corrupt=corrupt: fed_estimator.load_state_dict(corrupt),
            "state_dict",
            lambda: snapshot(fed_estimator),
            assert_same_state,
        )


def test_load_state_dict_accepts_numpy_scalars(fed_estimator: Any) -> None:
    state = fed_estimator.state_dict()
    converted = {
        k: np.int64(v) if type(v) is int else np.float64(v) if type(v) is float else v
        for k, v in state.items()
        if not isinstance(v, bool)
    } | {k: np.bool_(v) for k, v in state.items() if isinstance(v, bool)}
    fresh = type(fed_estimator)(**_settings(fed_estimator))
    fresh.load_state_dict(converted)
    assert_same_state(fresh.state_dict(), state)


def _settings(estimator: Any) -> dict[str, Any]:
    settings = {"nan_policy": estimator.nan_policy}
    for name in ("momentum", "debias"):
        if hasattr(estimator, name):
            settings[name] = getattr(estimator, name)
    return settings


# -- Moments -------------------------------------------------------------------------------

MEAN = np.array([1.0, 2.0, 3.0])
M2 = np.array([4.0, 5.0, 6.0])

BAD_MOMENTS = [
    pytest.param({"count": -1}, "count", id="count-negative"),
    pytest.param({"count": 2.5}, "count", id="count-float"),
    pytest.param({"count": True}, "count", id="count-bool"),
    pytest.param({"count": "3"}, "count", id="count-str"),
    pytest.param({"mean": np.array([1.0, np.nan, 3.0])}, "mean", id="mean-nan"),
    pytest.param({"mean": np.array([1.0, np.inf, 3.0])}, "mean", id="mean-inf"),
    pytest.param({"mean": np.array(["a", "b", "c"])}, "mean", id="mean-str"),
    pytest.param({"m2": np.array([4.0, -5.0, 6.0])}, "m2", id="m2-negative"),
    pytest.param({"m2": np.array([4.0, np.nan, 6.0])}, "m2", id="m2-nan"),
    pytest.param({"m2": np.array([4.0, 5.0])}, "m2", id="m2-shape"),
]


@pytest.mark.parametrize(("change", "parameter"), BAD_MOMENTS)
def test_moments_constructor_validates_values(change: dict[str, Any], parameter: str) -> None:
    arguments = {"count": 3, "mean": MEAN, "m2": M2, **change}
    with pytest.raises((TypeError, ValueError), match=names(parameter)) as info:
        ns.Moments(**arguments)
    assert "expected" in str(info.value)


def test_moments_accept_numpy_integer_counts() -> None:
    moments = ns.Moments(np.int64(3), MEAN, M2)
    assert moments.count == 3
    assert type(moments.count) is int
    np.testing.assert_array_equal(moments.var(ddof=np.int64(1)), M2 / 2)


@pytest.mark.parametrize(
    "value", ["nan", "inf", "masked", "zero-d", "complex", "strings", "none", "int"]
)
def test_moments_from_array_refuses_bad_input(value: str) -> None:
    with pytest.raises((TypeError, ValueError), match=names("x")) as info:
        ns.Moments.from_array(BAD_ARRAYS[value])
    assert "expected" in str(info.value)


def test_moments_from_array_accepts_matrix_and_numpy_axes() -> None:
    reference = ns.Moments.from_array(GOOD)
    for moments in (
        ns.Moments.from_array(matrix(GOOD)),
        ns.Moments.from_array(GOOD, axis=np.int64(0)),
        ns.Moments.from_array(GOOD, axis=(np.int32(0),)),
    ):
        assert moments == reference
        assert type(moments.mean) is np.ndarray
        assert moments.mean.shape == (FEATURES,)


def test_moments_merge_refuses_a_result_that_overflows() -> None:
    a = ns.Moments(2, np.array([-1e300]), np.array([0.0]))
    b = ns.Moments(2, np.array([1e300]), np.array([0.0]))
    with pytest.raises(ValueError, match=names("other")):
        a.merge(b)
    with pytest.raises(ValueError, match=names("other")):
        _ = a + b


@pytest.mark.parametrize("other", [GOOD, None, 3, "moments"], ids=["array", "none", "int", "str"])
def test_moments_merge_refuses_what_is_not_moments(other: Any) -> None:
    with pytest.raises(TypeError, match=names("other")):
        ns.Moments.from_array(GOOD).merge(other)


# -- Standardizer ----------------------------------------------------------------------------


def fitted_attributes(scaler: ns.Standardizer) -> dict[str, Any]:
    names_ = ("mean_", "var_", "scale_", "n_samples_seen_", "n_features_in_")
    return {name: copy.deepcopy(getattr(scaler, name, None)) for name in names_} | {
        "params": dict(scaler.get_params())
    }


def assert_same_attributes(after: dict[str, Any], before: dict[str, Any]) -> None:
    assert after.keys() == before.keys()
    for key in before:
        if isinstance(before[key], np.ndarray):
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
        else:
            assert after[key] == before[key], key


@pytest.fixture(params=["welford", "exact", "cumulative", "ema"])
def fitted_scaler(request: pytest.FixtureRequest) -> ns.Standardizer:
    return ns.Standardizer(stats=request.param).fit(GOOD)


# NaN are missing values to the Standardizer, as to scikit-learn (test_standardizer_sklearn.py)
STANDARDIZER_BAD_X = [
    "inf",
    "masked",
    "zero-d",
    "empty",
    "complex",
    "object",
    "strings",
    "none",
    "other-features",
]


@pytest.mark.parametrize("value", STANDARDIZER_BAD_X)
@pytest.mark.parametrize("method", ["partial_fit", "transform", "inverse_transform"])
def test_standardizer_refuses_bad_x(
    fitted_scaler: ns.Standardizer, method: str, value: str
) -> None:
    if value == "empty" and method != "partial_fit":  # no samples in, no samples out
        assert getattr(fitted_scaler, method)(BAD_ARRAYS[value]).shape == (0, FEATURES)
        return
    assert_refused(
        lambda: getattr(fitted_scaler, method)(BAD_ARRAYS[value]),
        "X",
        lambda: fitted_attributes(fitted_scaler),
        assert_same_attributes,
    )


@pytest.mark.parametrize("eps", [np.inf, -1.0, np.nan, "1e-5", None], ids=str)
def test_standardizer_refuses_bad_eps(fitted_scaler: ns.Standardizer, eps: Any) -> None:
    def call() -> None:
        fitted_scaler.set_params(eps=eps)
        fitted_scaler.partial_fit(GOOD)

    before = fitted_attributes(fitted_scaler)
    with pytest.raises((TypeError, ValueError), match=names("eps")):
        call()
    after = fitted_attributes(fitted_scaler)
    # the parameter the user set is theirs to see; the fitted statistics are untouched
    after.pop("params")
    before.pop("params")
    assert_same_attributes(after, before)


def test_standardizer_refuses_unknown_parameters(fitted_scaler: ns.Standardizer) -> None:
    assert_refused(
        lambda: fitted_scaler.set_params(bogus=1),
        "bogus",
        lambda: fitted_attributes(fitted_scaler),
        assert_same_attributes,
    )


def test_standardizer_accepts_numpy_scalars() -> None:
    reference = ns.Standardizer(stats="ema", eps=1e-5, momentum=0.25).fit(GOOD)
    scaler = ns.Standardizer(stats="ema", eps=np.float32(1e-5), momentum=np.float64(0.25))
    scaler.fit(GOOD)
    np.testing.assert_allclose(scaler.scale_, reference.scale_, rtol=1e-7)
    np.testing.assert_array_equal(scaler.mean_, reference.mean_)


@pytest.mark.parametrize("method", ["partial_fit", "transform", "inverse_transform"])
def test_standardizer_refuses_a_matrix(fitted_scaler: ns.Standardizer, method: str) -> None:
    # np.matrix turns * into a matrix product: refused rather than computed with
    assert_refused(
        lambda: getattr(fitted_scaler, method)(matrix(GOOD)),
        "X",
        lambda: fitted_attributes(fitted_scaler),
        assert_same_attributes,
    )


# -- the NumPy BatchNorm layer ----------------------------------------------------------------


BATCHNORM_BAD_ARGUMENTS = [
    pytest.param({"num_features": 0}, "num_features", id="num-features-zero"),
    pytest.param({"num_features": 2.0}, "num_features", id="num-features-float"),
    pytest.param({"num_features": "3"}, "num_features", id="num-features-str"),
    pytest.param({"eps": -1.0}, "eps", id="eps-negative"),
    pytest.param({"eps": np.nan}, "eps", id="eps-nan"),
    pytest.param({"eps": "1e-5"}, "eps", id="eps-str"),
    pytest.param({"axis": 1.5}, "axis", id="axis-float"),
    pytest.param({"stats": "bogus"}, "stats", id="stats-unknown"),
    pytest.param({"stats": 3}, "stats", id="stats-int"),
    pytest.param({"momentum": 2.0}, "momentum", id="momentum-above-one"),
    pytest.param({"momentum": "x"}, "momentum", id="momentum-str"),
    pytest.param({"nan_policy": "bogus"}, "nan_policy", id="nan-policy"),
]


@pytest.mark.parametrize(("change", "parameter"), BATCHNORM_BAD_ARGUMENTS)
def test_numpy_batchnorm_validates_arguments(change: dict[str, Any], parameter: str) -> None:
    arguments = {"num_features": FEATURES, "stats": "ema", **change}
    with pytest.raises((TypeError, ValueError), match=names(parameter)):
        ns.BatchNorm(**arguments)


def test_numpy_batchnorm_accepts_numpy_scalars() -> None:
    reference = ns.BatchNorm(FEATURES, eps=1e-5, momentum=0.25)
    layer = ns.BatchNorm(np.int64(FEATURES), eps=np.float32(1e-5), momentum=np.float64(0.25))
    np.testing.assert_allclose(layer(GOOD), reference(GOOD), rtol=1e-6)
    np.testing.assert_array_equal(layer.stats.mean, reference.stats.mean)


def batchnorm_state(layer: ns.BatchNorm) -> dict[str, Any]:
    stats = {} if layer.stats is None else snapshot(layer.stats)
    return {**stats, "gamma": np.copy(layer.gamma), "beta": np.copy(layer.beta)}


@pytest.mark.parametrize(
    "value", ["nan", "inf", "masked", "zero-d", "empty", "int", "strings", "none", "other-features"]
)
def test_numpy_batchnorm_forward_refuses_bad_input(value: str) -> None:
    layer = ns.BatchNorm(FEATURES, stats="welford")
    layer(GOOD)
    assert_refused(
        lambda: layer(BAD_ARRAYS[value]), "x", lambda: batchnorm_state(layer), assert_same_state
    )


# -- the torch layer --------------------------------------------------------------------------


@pytest.fixture
def torch_layer(torch: Any) -> Any:
    from normstats.adapters.torch import BatchNorm

    layer = BatchNorm(FEATURES, stats="welford")
    layer(torch.randn(8, FEATURES, 2, 2))
    return layer


def torch_state(layer: Any) -> dict[str, Any]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


TORCH_BAD_ARGUMENTS = [
    pytest.param({"num_features": 0}, "num_features", id="num-features-zero"),
    pytest.param({"num_features": "3"}, "num_features", id="num-features-str"),
    pytest.param({"eps": -1.0}, "eps", id="eps-negative"),
    pytest.param({"eps": "1e-5"}, "eps", id="eps-str"),
    pytest.param({"stats": "bogus"}, "stats", id="stats-unknown"),
    pytest.param({"stats": "welford", "momentum": -1.0}, "momentum", id="momentum-negative"),
    pytest.param({"stats": "welford", "momentum": "x"}, "momentum", id="momentum-str"),
    pytest.param({"stats": "ema", "momentum": 1.5}, "momentum", id="momentum-above-one"),
    pytest.param({"nan_policy": "bogus"}, "nan_policy", id="nan-policy"),
]


@pytest.mark.parametrize(("change", "parameter"), TORCH_BAD_ARGUMENTS)
def test_torch_batchnorm_validates_arguments(
    torch: Any, change: dict[str, Any], parameter: str
) -> None:
    from normstats.adapters.torch import BatchNorm

    with pytest.raises((TypeError, ValueError), match=names(parameter)):
        BatchNorm(**{"num_features": FEATURES, **change})


def test_torch_batchnorm_accepts_numpy_scalars(torch: Any) -> None:
    from normstats.adapters.torch import BatchNorm

    layer = BatchNorm(np.int64(FEATURES), eps=np.float32(1e-5), momentum=np.float64(0.25))
    reference = torch.nn.BatchNorm2d(FEATURES, eps=1e-5, momentum=0.25)
    x = torch.randn(8, FEATURES, 2, 2)
    torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer.running_var, reference.running_var)


@pytest.mark.parametrize(
    "shape", [(8,), (8, FEATURES + 1), (8, FEATURES, 1, 1, 1, 1)], ids=["1d", "channels", "6d"]
)
def test_torch_forward_refuses_bad_shapes(torch: Any, torch_layer: Any, shape: Any) -> None:
    assert_refused(
        lambda: torch_layer(torch.randn(*shape)),
        "x",
        lambda: torch_state(torch_layer),
        assert_same_state,
    )


def test_torch_nan_batch_with_raise_policy_leaves_the_layer(torch: Any) -> None:
    from normstats.adapters.torch import BatchNorm

    layer = BatchNorm(FEATURES, stats="welford", nan_policy="raise")
    layer(torch.randn(8, FEATURES))
    x = torch.randn(8, FEATURES)
    x[3, 1] = float("nan")
    assert_refused(lambda: layer(x), "x", lambda: torch_state(layer), assert_same_state)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("welford.m2", float("nan")),
        ("welford.m2", -1.0),
        ("welford.mean_offset", float("inf")),
        ("welford.count", -4.0),
        ("num_batches_tracked", -1),
        ("running_var", -1.0),
        ("running_mean", float("nan")),
    ],
)
def test_torch_load_state_dict_refuses_invalid_values(
    torch: Any, torch_layer: Any, key: str, value: float
) -> None:
    state = torch_state(torch_layer)
    state[key] = torch.full_like(state[key], value)
    before = torch_state(torch_layer)
    with pytest.raises(RuntimeError, match=re.escape(key)):
        torch_layer.load_state_dict(state)
    assert_same_state(torch_state(torch_layer), before)


def test_torch_recalibrate_validates_its_arguments(torch: Any) -> None:
    from normstats.adapters.torch import convert, recalibrate

    model = convert(torch.nn.Sequential(torch.nn.Linear(4, FEATURES), torch.nn.BatchNorm1d(3)))
    data = [torch.randn(8, 4) for _ in range(3)]
    recalibrate(model, data)
    state = lambda: torch_state(model)  # noqa: E731
    assert_refused(
        lambda: recalibrate(model, data, max_batches=0), "max_batches", state, assert_same_state
    )
    assert_refused(
        lambda: recalibrate(model, iter(data), layerwise=True), "data", state, assert_same_state
    )
    bad = [*data[:1], data[1].clone().fill_(float("nan")), data[2]]
    model[1].nan_policy = "raise"
    # a calibration batch with NaN under nan_policy="raise" refuses the whole pass
    assert_refused(lambda: recalibrate(model, bad), "data", state, assert_same_state)
    recalibrate(model, data, max_batches=np.int64(2))


# -- the comparison's .npz loader -----------------------------------------------------------


@dataclass
class NpzCase:
    id: str
    arrays: dict[str, Any]


NPZ_CASES = [
    NpzCase("missing-y", {"X": GOOD}),
    NpzCase("lengths", {"X": GOOD, "y": np.array([0, 1, 0])}),
    NpzCase("nan", {"X": with_value(np.nan), "y": np.array([0, 1] * 3)}),
    NpzCase("zero-d", {"X": np.array(1.0), "y": np.array(0)}),
    NpzCase("float-labels", {"X": GOOD, "y": np.array([0.5, 1.0] * 3)}),
    NpzCase("string-x", {"X": np.array([["a"] * 3] * 6), "y": np.array([0, 1] * 3)}),
    NpzCase("negative-labels", {"X": GOOD, "y": np.array([-1, 1] * 3)}),
]


@pytest.mark.parametrize("case", NPZ_CASES, ids=lambda c: c.id)
def test_npz_loader_refuses_malformed_files(tmp_path: Any, case: NpzCase) -> None:
    pytest.importorskip("sklearn")
    from normstats.adapters.compare.data import load

    path = tmp_path / f"{case.id}.npz"
    np.savez(path, **case.arrays)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load(str(path))
