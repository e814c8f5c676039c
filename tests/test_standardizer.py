"""Standardizer against scikit-learn's StandardScaler and exact references.

The pooled strategies fed the same ``partial_fit`` batches as ``StandardScaler`` give its
``mean_``, ``var_``, ``scale_`` and ``n_samples_seen_`` to 1e-12 relative. On data with a
large offset (1e8 + N(0, 1)) the reference is exact rational arithmetic over the float
values (``helpers.exact_mean_m2``), not scikit-learn.
"""

from __future__ import annotations

import numpy as np
import pytest

import normstats as ns

from .helpers import exact_mean_m2, relative_error_to_exact, snapshot

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.pipeline import Pipeline, make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

RTOL = 1e-12
FLAGS = {"with_mean": True, "with_std": True, "copy": True}
POOLED = ["welford", "exact"]


def data(rows=300, features=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(
        rng.normal(0.0, 5.0, size=features), rng.uniform(0.5, 3.0, features), (rows, features)
    )


def split(x, sizes):
    return np.split(x, np.cumsum(sizes)[:-1])


def fed(estimator, parts):
    for part in parts:
        estimator.partial_fit(part)
    return estimator


def assert_same_fit(ours, theirs, rtol=RTOL):
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=rtol)
    np.testing.assert_allclose(ours.var_, theirs.var_, rtol=rtol)
    np.testing.assert_allclose(ours.scale_, theirs.scale_, rtol=rtol)
    assert int(ours.n_samples_seen_) == int(np.max(theirs.n_samples_seen_))
    assert ours.n_features_in_ == theirs.n_features_in_


# -- pooled strategies against StandardScaler -----------------------------------------


@pytest.mark.parametrize(
    "sizes", [[300], [1, 299], [100, 100, 100], [2, 2, 4, 8, 16, 32, 64, 172]], ids=str
)
@pytest.mark.parametrize("stats", POOLED)
def test_partial_fit_matches_standard_scaler(stats, sizes):
    x = data()
    ours = fed(ns.Standardizer(stats=stats), split(x, sizes))
    theirs = fed(StandardScaler(), split(x, sizes))
    assert_same_fit(ours, theirs)
    test = data(rows=50, seed=1)
    np.testing.assert_allclose(ours.transform(test), theirs.transform(test), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        ours.inverse_transform(test), theirs.inverse_transform(test), rtol=1e-12
    )
    np.testing.assert_allclose(ours.inverse_transform(ours.transform(test)), test, rtol=1e-12)


@pytest.mark.parametrize("stats", POOLED)
def test_fit_and_fit_transform_match_standard_scaler(stats):
    x = data(seed=2)
    assert_same_fit(ns.Standardizer(stats=stats).fit(x), StandardScaler().fit(x))
    np.testing.assert_allclose(
        ns.Standardizer(stats=stats).fit_transform(x),
        StandardScaler().fit_transform(x),
        rtol=1e-10,
        atol=1e-12,
    )


@pytest.mark.parametrize("stats", POOLED)
def test_large_offset_is_exact(stats):
    # 1e8 + N(0, 1): sum / sum-of-squares formulas lose every digit here. The reference is
    # exact rational arithmetic over the float64 values of the concatenation.
    rng = np.random.default_rng(3)
    x = 1e8 + rng.normal(size=(400, 3))
    ours = fed(ns.Standardizer(stats=stats), split(x, [7, 93, 100, 200]))
    means, m2s = exact_mean_m2(x)
    assert relative_error_to_exact(ours.mean_, means) < 1e-15
    assert relative_error_to_exact(ours.var_, [m2 / len(x) for m2 in m2s]) < 1e-10
    assert ours.n_samples_seen_ == 400
    # Against the exact statistics rounded to float64 (np.mean of 1e8-sized values is itself
    # off by several ulps of 1e8, which would show as ~1e-7 in the transformed values).
    exact_mean = np.array([float(m) for m in means])
    exact_std = np.sqrt([float(m2 / len(x)) for m2 in m2s])
    np.testing.assert_allclose(ours.transform(x), (x - exact_mean) / exact_std, atol=2e-8)
    np.testing.assert_allclose(ours.inverse_transform(ours.transform(x)), x, rtol=1e-15)


@pytest.mark.parametrize("value", [5.0, 0.1, -3e7])
@pytest.mark.parametrize("stats", POOLED)
def test_constant_feature_gets_scale_one(stats, value):
    x = data(rows=100, features=3, seed=4)
    x[:, 1] = value
    ours = fed(ns.Standardizer(stats=stats), split(x, [30, 70]))
    theirs = fed(StandardScaler(), split(x, [30, 70]))
    assert ours.scale_[1] == 1.0
    assert theirs.scale_[1] == 1.0
    assert ours.var_[1] == pytest.approx(0.0, abs=1e-20 * max(1.0, value**2))
    np.testing.assert_allclose(ours.scale_, theirs.scale_, rtol=RTOL)
    transformed = ours.transform(x)
    assert np.all(np.isfinite(transformed))
    np.testing.assert_allclose(transformed[:, 1], 0.0, atol=1e-9 * abs(value))


def test_eps_is_added_to_the_variance():
    x = data(seed=5)
    ours = ns.Standardizer(eps=0.5).fit(x)
    np.testing.assert_allclose(ours.scale_, np.sqrt(x.var(axis=0) + 0.5), rtol=1e-12)


# -- fitting semantics -----------------------------------------------------------------


@pytest.mark.parametrize("stats", ["welford", "exact", "ema", "cumulative"])
def test_fit_forgets_earlier_partial_fits(stats):
    x, y = data(seed=6), data(seed=7) + 10.0
    scaler = ns.Standardizer(stats=stats)
    scaler.partial_fit(x[:100])
    scaler.partial_fit(x[100:])
    scaler.fit(y)
    fresh = ns.Standardizer(stats=stats).fit(y)
    np.testing.assert_allclose(scaler.mean_, fresh.mean_, rtol=1e-15)
    np.testing.assert_allclose(scaler.var_, fresh.var_, rtol=1e-15)
    assert scaler.n_samples_seen_ == len(y)


@pytest.mark.parametrize(
    ("stats", "kwargs"),
    [("ema", {}), ("ema", {"momentum": 0.2}), ("cumulative", {})],
    ids=["ema", "ema-0.2", "cumulative"],
)
def test_running_strategies_report_their_own_estimate(stats, kwargs):
    parts = split(data(seed=8), [50, 50, 100, 100])
    scaler = fed(ns.Standardizer(stats=stats, **kwargs), parts)
    estimator = ns.make_stats(stats, **kwargs)
    for part in parts:
        estimator.update(part)
    np.testing.assert_allclose(scaler.mean_, estimator.mean, rtol=1e-15)
    np.testing.assert_allclose(scaler.var_, estimator.var, rtol=1e-15)
    np.testing.assert_allclose(scaler.scale_, np.sqrt(estimator.var), rtol=1e-15)
    assert scaler.n_samples_seen_ == 300
    # ... which is not the pooled population variance.
    pooled = np.concatenate(parts).var(axis=0)
    assert not np.allclose(scaler.var_, pooled, rtol=1e-3)
    test = data(rows=20, seed=9)
    np.testing.assert_allclose(
        scaler.transform(test), (test - estimator.mean) / np.sqrt(estimator.var), rtol=1e-12
    )


def test_cumulative_is_the_average_of_batch_statistics():
    parts = split(data(seed=10), [50, 150, 100])
    scaler = fed(ns.Standardizer(stats="cumulative"), parts)
    np.testing.assert_allclose(scaler.mean_, np.mean([p.mean(axis=0) for p in parts], axis=0))
    np.testing.assert_allclose(scaler.var_, np.mean([p.var(axis=0, ddof=1) for p in parts], axis=0))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, bool])
def test_integer_input_is_accepted_and_converted(dtype):
    x = np.random.default_rng(11).integers(0, 2 if dtype is bool else 16, size=(200, 5))
    x = x.astype(dtype)
    ours = ns.Standardizer().fit(x)
    as_float = x.astype(np.float64)
    np.testing.assert_allclose(ours.mean_, as_float.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(ours.var_, as_float.var(axis=0), rtol=1e-12)
    transformed = ours.transform(x)
    assert transformed.dtype == np.float64
    np.testing.assert_allclose(transformed, StandardScaler().fit_transform(as_float), rtol=1e-10)


def test_float32_input_keeps_its_precision_in_the_statistics():
    x = data(seed=12).astype(np.float32)
    ours = ns.Standardizer().fit(x)
    np.testing.assert_allclose(ours.mean_, x.astype(np.float64).mean(axis=0), rtol=1e-12)


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["transform", "inverse_transform"])
def test_transform_before_fit_raises_not_fitted(method):
    with pytest.raises(NotFittedError, match="fit"):
        getattr(ns.Standardizer(), method)(data(rows=5))


def test_not_fitted_is_a_value_error_too():
    with pytest.raises(ValueError, match="fit"):
        ns.Standardizer().transform(data(rows=5))


@pytest.mark.parametrize("method", ["transform", "inverse_transform", "partial_fit"])
def test_wrong_feature_count_raises(method):
    scaler = ns.Standardizer().fit(data(features=4))
    before = scaler.mean_.copy(), scaler.var_.copy(), scaler.n_samples_seen_
    with pytest.raises(ValueError, match=r"X has 3 features, but Standardizer is expecting 4"):
        getattr(scaler, method)(data(rows=10, features=3))
    np.testing.assert_array_equal(scaler.mean_, before[0])
    np.testing.assert_array_equal(scaler.var_, before[1])
    assert scaler.n_samples_seen_ == before[2]


@pytest.mark.parametrize("method", ["fit", "partial_fit", "transform", "inverse_transform"])
def test_one_dimensional_input_raises(method):
    scaler = ns.Standardizer().fit(data(features=1)) if "transform" in method else ns.Standardizer()
    with pytest.raises(ValueError, match=r"X: expected a 2-D array"):
        getattr(scaler, method)(np.arange(10.0))


def test_inf_raises():
    x = data(rows=20)
    x[3, 2] = np.inf
    with pytest.raises(ValueError, match=r"^X: expected finite values or NaN"):
        ns.Standardizer().fit(x)


@pytest.mark.parametrize(
    ("params", "error", "name"),
    [({"stats": "median"}, ValueError, "stats"), ({"eps": -1.0}, ValueError, "eps")],
)
def test_bad_parameters_raise_at_fit(params, error, name):
    with pytest.raises(error, match=name):
        ns.Standardizer(**params).fit(data(rows=10))


# -- scikit-learn's estimator API ------------------------------------------------------


def digits_split():
    x, y = load_digits(return_X_y=True)
    return train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)


@pytest.mark.parametrize("stats", ["welford", "exact"])
def test_pipeline_with_logistic_regression(stats):
    x_train, x_test, y_train, y_test = digits_split()
    pipeline = Pipeline(
        [("scale", ns.Standardizer(stats=stats)), ("clf", LogisticRegression(max_iter=2000))]
    )
    pipeline.fit(x_train, y_train)
    assert pipeline.score(x_test, y_test) > 0.9
    # The fitted standardizer is the one scikit-learn's own scaler would have given.
    scaler = pipeline.named_steps["scale"]
    assert_same_fit(scaler, StandardScaler().fit(x_train))


def test_make_pipeline_and_nested_set_params():
    x_train, x_test, y_train, y_test = digits_split()
    pipeline = make_pipeline(ns.Standardizer(), LogisticRegression(max_iter=2000))
    pipeline.set_params(standardizer__stats="exact", standardizer__eps=1e-3)
    assert (
        pipeline.named_steps["standardizer"].get_params() == {"stats": "exact", "eps": 1e-3} | FLAGS
    )
    pipeline.fit(x_train, y_train)
    assert pipeline.score(x_test, y_test) > 0.9


@pytest.mark.parametrize(
    "params",
    [{}, {"stats": "exact", "eps": 1e-6}, {"stats": "ema", "momentum": 0.2}],
    ids=["default", "exact", "ema-momentum"],
)
def test_clone_gives_an_unfitted_copy_with_the_same_params(params):
    original = ns.Standardizer(**params).fit(data(seed=13))
    copy = clone(original)
    assert copy is not original
    assert copy.get_params() == original.get_params()
    for key, value in params.items():
        assert copy.get_params()[key] == value
    with pytest.raises(NotFittedError):
        copy.transform(data(rows=5))
    # The copy's strategy is built from the same arguments.
    x = data(seed=14)
    np.testing.assert_array_equal(copy.fit(x).var_, ns.Standardizer(**params).fit(x).var_)


def test_clone_does_not_share_strategy_arguments():
    original = ns.Standardizer(stats="ema", momentum=0.2)
    copy = clone(original)
    copy.set_params(momentum=0.5)
    assert original.get_params()["momentum"] == 0.2


def test_get_params_and_set_params():
    scaler = ns.Standardizer()
    assert scaler.get_params() == {"stats": "welford", "eps": 0.0} | FLAGS
    assert scaler.get_params(deep=False) == {"stats": "welford", "eps": 0.0} | FLAGS
    assert scaler.set_params(stats="ema", momentum=0.3, eps=1e-4) is scaler
    assert scaler.get_params() == {"stats": "ema", "eps": 1e-4} | FLAGS | {"momentum": 0.3}
    parts = split(data(seed=15), [100, 200])
    fed(scaler, parts)
    estimator = ns.make_stats("ema", momentum=0.3)
    for part in parts:
        estimator.update(part)
    np.testing.assert_allclose(scaler.var_, estimator.var, rtol=1e-15)
    np.testing.assert_allclose(scaler.scale_, np.sqrt(estimator.var + 1e-4), rtol=1e-15)


def test_fitted_attributes_follow_sklearn_conventions():
    scaler = ns.Standardizer()
    assert not hasattr(scaler, "mean_")
    scaler.fit(data(features=4))
    for name in ("mean_", "var_", "scale_"):
        assert getattr(scaler, name).shape == (4,)
    assert scaler.n_features_in_ == 4
    assert scaler.__sklearn_is_fitted__()
    assert not ns.Standardizer().__sklearn_is_fitted__()


# -- fitted state, dtypes, parameters and refused input ----------------------------------

ALL = ["welford", "exact", "cumulative", "ema"]


def fitted_state(scaler):
    """Copies of the parameters and fitted attributes, to compare before and after a call."""
    state = {"params": dict(scaler.get_params())}
    for name in ("mean_", "var_", "scale_", "n_samples_seen_", "n_features_in_"):
        if hasattr(scaler, name):
            value = getattr(scaler, name)
            state[name] = np.copy(value) if isinstance(value, np.ndarray) else value
    statistics = scaler._statistics
    state["statistics"] = None if statistics is None else streams_snapshot(statistics)
    return state


def streams_snapshot(statistics):
    """Every strategy's state, flattened into one dict (shared, or one per feature)."""
    streams = [statistics.shared] if statistics.shared is not None else statistics.per_feature
    return {f"{i}.{k}": v for i, s in enumerate(streams) for k, v in snapshot(s).items()}


def assert_same_fitted_state(scaler, before):
    after = fitted_state(scaler)
    assert list(after) == list(before)
    assert after["params"] == before["params"]
    for name in ("mean_", "var_", "scale_"):
        if name in before:
            np.testing.assert_array_equal(after[name], before[name])
    for name in ("n_samples_seen_", "n_features_in_"):
        assert after.get(name) == before.get(name)
    if before["statistics"] is None:
        assert after["statistics"] is None
    else:
        assert list(after["statistics"]) == list(before["statistics"])
        for key, value in before["statistics"].items():
            np.testing.assert_array_equal(after["statistics"][key], value)


@pytest.mark.parametrize("stats", ALL)
def test_fit_with_another_feature_count_starts_afresh(stats):
    # Before the fix the second fit raised "X: expected 3 features, got ... (50, 5)".
    three, five = data(rows=50, features=3, seed=20), data(rows=60, features=5, seed=21)
    scaler = ns.Standardizer(stats=stats).fit(three)
    scaler.fit(five)
    fresh = ns.Standardizer(stats=stats).fit(five)
    assert scaler.n_features_in_ == 5
    assert scaler.n_samples_seen_ == 60
    np.testing.assert_array_equal(scaler.mean_, fresh.mean_)
    np.testing.assert_array_equal(scaler.var_, fresh.var_)
    np.testing.assert_array_equal(scaler.transform(five), fresh.transform(five))
    with pytest.raises(ValueError, match=r"X has 3 features, but Standardizer is expecting 5"):
        scaler.partial_fit(three)
    np.testing.assert_array_equal(
        scaler.fit_transform(three), ns.Standardizer(stats=stats).fit_transform(three)
    )
    assert scaler.n_features_in_ == 3


@pytest.mark.parametrize("stats", ALL)
def test_float32_input_stays_float32(stats):
    # Before the fix transform, inverse_transform and fit_transform returned float64 for
    # float32 input, although the tags say float32 is preserved.
    x = data(seed=22).astype(np.float32)
    scaler = ns.Standardizer(stats=stats).fit(x)
    as64 = ns.Standardizer(stats=stats).fit(x.astype(np.float64))
    # The statistics are those of the float32 values, computed in float64.
    assert scaler.mean_.dtype == np.float64
    assert scaler.scale_.dtype == np.float64
    np.testing.assert_array_equal(scaler.mean_, as64.mean_)
    np.testing.assert_array_equal(scaler.scale_, as64.scale_)
    # Each result is the float64 computation rounded once to float32.
    transformed = scaler.transform(x)
    assert transformed.dtype == np.float32
    np.testing.assert_array_equal(
        transformed, as64.transform(x.astype(np.float64)).astype(np.float32)
    )
    back = scaler.inverse_transform(transformed)
    assert back.dtype == np.float32
    expected = as64.inverse_transform(transformed.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(back, expected)
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)
    fit_transformed = ns.Standardizer(stats=stats).fit_transform(x)
    assert fit_transformed.dtype == np.float32
    np.testing.assert_array_equal(fit_transformed, transformed)


def test_float32_output_agrees_with_standard_scaler():
    x = data(seed=23).astype(np.float32)
    theirs = StandardScaler().fit(x)
    ours = ns.Standardizer().fit(x)
    assert theirs.transform(x).dtype == ours.transform(x).dtype == np.float32
    np.testing.assert_allclose(ours.transform(x), theirs.transform(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.int64, bool])
def test_float64_integer_and_bool_input_give_float64(dtype):
    x = (data(seed=24) > 0).astype(dtype) if dtype is bool else data(seed=24).astype(dtype)
    scaler = ns.Standardizer().fit(x)
    assert scaler.transform(x).dtype == np.float64
    assert scaler.inverse_transform(x).dtype == np.float64


@pytest.mark.parametrize(
    ("stats", "params", "name"),
    [
        ("welford", {"unknown": 1}, "unknown"),
        ("welford", {"momentum": 0.2}, "momentum"),  # an argument of another strategy
        ("ema", {"momentum": 0.2, "decay": 0.9}, "decay"),
        ("ema", {"stats": "welford"}, "momentum"),  # the EMA's momentum would be left over
        ("welford", {"standardizer__eps": 0.1}, "standardizer__eps"),
    ],
)
def test_set_params_refuses_unknown_names(stats, params, name):
    # Before the fix every name was accepted and the next fit raised a TypeError (or, for a
    # strategy without arguments, silently kept them in get_params).
    scaler = ns.Standardizer(stats=stats, **({"momentum": 0.1} if stats == "ema" else {}))
    scaler.fit(data(seed=25))
    before = fitted_state(scaler)
    with pytest.raises(ValueError, match=rf"invalid parameter {name!r}") as caught:
        scaler.set_params(**params)
    assert "expected one of ['stats', 'eps', 'with_mean', 'with_std', 'copy'" in str(caught.value)
    assert_same_fitted_state(scaler, before)


def test_set_params_accepts_every_argument_of_the_chosen_strategy():
    scaler = ns.Standardizer()
    scaler.set_params(stats="ema", momentum=0.2, debias=True, nan_policy="skip", eps=1e-3)
    assert scaler.get_params() == FLAGS | {
        "stats": "ema",
        "eps": 1e-3,
        "momentum": 0.2,
        "debias": True,
        "nan_policy": "skip",
    }
    assert ns.Standardizer().set_params(nan_policy="skip").get_params()["nan_policy"] == "skip"


def test_constructor_refuses_unknown_names():
    with pytest.raises(TypeError, match=r"invalid parameter 'momentum'.*stats='welford'"):
        ns.Standardizer(momentum=0.1)
    with pytest.raises(TypeError, match=r"invalid parameter 'bogus'"):
        ns.Standardizer(stats="ema", bogus=1)


@pytest.mark.parametrize("value", [-1, 3.0, "helloworld", np.array([1.0, 4.0]), [1], {}, []])
def test_values_are_checked_at_fit_not_at_construction_or_set_params(value):
    # scikit-learn's convention (its search tools set any value, and fit reports it).
    scaler = ns.Standardizer(stats=value, eps=value)
    scaler.set_params(stats=value, eps=value)
    with pytest.raises((TypeError, ValueError), match=r"^(stats|eps): "):
        scaler.fit(data(rows=10))
    assert not scaler.__sklearn_is_fitted__()


@pytest.mark.parametrize("stats", ALL)
def test_set_params_eps_between_partial_fits_keeps_the_statistics(stats):
    # Before the fix the new eps started new statistics: the 150 earlier samples were lost.
    x = data(seed=26)
    kwargs = {"momentum": 0.2} if stats == "ema" else {}
    scaler = ns.Standardizer(stats=stats, **kwargs)
    scaler.partial_fit(x[:150])
    scale_before = scaler.scale_.copy()
    scaler.set_params(eps=0.5)
    np.testing.assert_array_equal(scaler.scale_, scale_before)  # set_params fits nothing
    scaler.partial_fit(x[150:])
    reference = fed(ns.Standardizer(stats=stats, **kwargs), [x[:150], x[150:]])
    assert scaler.n_samples_seen_ == 300
    np.testing.assert_array_equal(scaler.mean_, reference.mean_)
    np.testing.assert_array_equal(scaler.var_, reference.var_)
    np.testing.assert_allclose(scaler.scale_, np.sqrt(reference.var_ + 0.5), rtol=1e-15)
    if stats in POOLED:
        np.testing.assert_allclose(scaler.var_, x.var(axis=0), rtol=1e-12)


@pytest.mark.parametrize(
    ("stats", "kwargs", "change", "name"),
    [
        ("welford", {}, {"stats": "exact"}, "stats"),
        ("ema", {"momentum": 0.1}, {"momentum": 0.2}, "momentum"),
        ("ema", {"momentum": 0.1}, {"debias": True}, "debias"),
        ("welford", {}, {"nan_policy": "skip"}, "nan_policy"),
    ],
)
def test_changing_the_strategy_between_partial_fits_raises(stats, kwargs, change, name):
    # Before the fix the next partial_fit silently started new statistics.
    x = data(seed=27)
    scaler = ns.Standardizer(stats=stats, **kwargs)
    scaler.partial_fit(x[:100])
    before = fitted_state(scaler)
    scaler.set_params(**change)
    with pytest.raises(ValueError, match=rf"partial_fit: {name} changed from .* fit\(\)"):
        scaler.partial_fit(x[100:])
    before["params"] = scaler.get_params()
    assert_same_fitted_state(scaler, before)
    # fit() starts afresh with the new setting ...
    scaler.fit(x[100:])
    fresh = ns.Standardizer(**{"stats": stats, **kwargs, **change}).fit(x[100:])
    np.testing.assert_array_equal(scaler.mean_, fresh.mean_)
    assert scaler.n_samples_seen_ == 200


def test_putting_the_old_setting_back_continues_the_statistics():
    x = data(seed=28)
    scaler = ns.Standardizer(stats="ema", momentum=0.1)
    scaler.partial_fit(x[:100])
    scaler.set_params(momentum=0.3)
    with pytest.raises(ValueError, match="momentum changed"):
        scaler.partial_fit(x[100:])
    scaler.set_params(momentum=np.float64(0.1))  # the same setting, as a NumPy scalar
    scaler.partial_fit(x[100:])
    reference = fed(ns.Standardizer(stats="ema", momentum=0.1), [x[:100], x[100:]])
    np.testing.assert_array_equal(scaler.var_, reference.var_)
    assert scaler.n_samples_seen_ == 300


@pytest.mark.parametrize("method", ["transform", "inverse_transform"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_transform_refuses_inf(method, bad):
    # Inf is refused, as scikit-learn does (NaN passes through: test_standardizer_sklearn.py).
    scaler = ns.Standardizer().fit(data(seed=29))
    before = fitted_state(scaler)
    x = data(rows=10, seed=30)
    x[4, 2] = bad
    with pytest.raises(ValueError, match=r"^X: expected finite values or NaN, got .* with Inf"):
        getattr(scaler, method)(x)
    assert_same_fitted_state(scaler, before)
    with pytest.raises(ValueError, match=r"^X: expected finite values or NaN"):
        getattr(scaler, method)(x.astype(np.float32))


def test_inverse_transform_refuses_a_result_that_overflows_float32():
    scaler = ns.Standardizer().fit(np.array([[0.0], [2e30]]))  # scale 1e30
    with pytest.raises(ValueError, match=r"^X: .*fits in float32"):
        scaler.inverse_transform(np.array([[1e10]], dtype=np.float32))
    assert scaler.inverse_transform(np.array([[1e10]])).dtype == np.float64


@pytest.mark.parametrize("eps", [np.inf, -np.inf, np.nan, -1e-3, np.float32(np.inf)])
@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_eps_must_be_finite_and_non_negative(eps, method):
    # Before the fix eps=inf gave scale_ = inf, and transform turned every value into 0.
    x = data(seed=31)
    scaler = ns.Standardizer().fit(x)
    before = fitted_state(scaler)
    scaler.set_params(eps=eps)
    before["params"] = scaler.get_params()
    with pytest.raises(ValueError, match=r"^eps: expected a finite non-negative number"):
        getattr(scaler, method)(x)
    assert_same_fitted_state(scaler, before)
    with pytest.raises(ValueError, match=r"^eps: "):
        ns.Standardizer(eps=eps).fit(x)


@pytest.mark.parametrize("eps", ["1e-3", None, True, [1e-3]])
def test_eps_of_another_type_raises_type_error(eps):
    with pytest.raises(TypeError, match=r"^eps: expected a real number"):
        ns.Standardizer(eps=eps).fit(data(rows=10))


def test_numpy_scalar_arguments_are_accepted():
    x = data(seed=32)
    plain = ns.Standardizer(stats="ema", eps=1e-5, momentum=0.01).fit(x)
    eps, momentum = np.float32(1e-5), np.float64(0.01)
    numpy = ns.Standardizer(stats="ema", eps=eps, momentum=momentum)
    assert numpy.get_params()["eps"] is eps  # kept as given, as clone requires
    numpy.fit(x)
    np.testing.assert_array_equal(numpy.mean_, plain.mean_)
    np.testing.assert_allclose(numpy.scale_, np.sqrt(plain.var_ + float(eps)), rtol=1e-15)
    zero_d = ns.Standardizer(eps=np.array(0.5)).fit(x)
    np.testing.assert_allclose(zero_d.scale_, np.sqrt(x.var(axis=0) + 0.5), rtol=1e-12)
    copy = clone(numpy)
    assert copy.get_params() == numpy.get_params()
    np.testing.assert_array_equal(copy.fit(x).scale_, numpy.scale_)


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
@pytest.mark.parametrize(
    "bad",
    [
        lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, np.inf, x),
        lambda x: x[:, 0],
        lambda x: x.astype(str),
        lambda x: x[:1],  # one sample: too few for the EMA's unbiased batch variance
    ],
    ids=["inf", "1-d", "strings", "one-sample"],
)
def test_errors_in_fit_leave_the_fitted_state_as_it_was(method, bad):
    x = data(seed=33)
    scaler = ns.Standardizer(stats="ema").fit(x)
    before = fitted_state(scaler)
    with pytest.raises((TypeError, ValueError)):
        getattr(scaler, method)(bad(x))
    assert_same_fitted_state(scaler, before)


def test_a_skipped_batch_leaves_the_statistics_and_an_all_skipped_fit_leaves_nothing():
    x = data(seed=34)
    nan_batch = x[:20].copy()
    nan_batch[3, 1] = np.inf  # NaN are left out of the statistics; Inf skips the batch
    scaler = ns.Standardizer(nan_policy="skip").fit(x)
    before = fitted_state(scaler)
    scaler.partial_fit(nan_batch)
    after = fitted_state(scaler)
    for name in ("mean_", "var_", "scale_"):
        np.testing.assert_array_equal(after[name], before[name])
    assert after["n_samples_seen_"] == before["n_samples_seen_"] == len(x)
    scaler.fit(nan_batch)  # forgets x, then skips the only batch: nothing is fitted
    assert not hasattr(scaler, "mean_")
    assert not scaler.__sklearn_is_fitted__()
    with pytest.raises(NotFittedError):
        scaler.transform(x)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("method", ["fit", "partial_fit", "transform", "inverse_transform"])
@pytest.mark.parametrize("kind", ["matrix", "masked"])
def test_matrix_and_masked_input_are_refused(method, kind):
    # Before: np.matrix made inverse_transform a matrix product (an error here, a wrong
    # result for a square X) and transform return an np.matrix; a masked array's masked
    # values entered fit as if they were data.
    x = data(rows=20, features=3, seed=35)
    scaler = ns.Standardizer().fit(x)
    before = fitted_state(scaler)
    bad = np.asmatrix(x) if kind == "matrix" else np.ma.masked_array(x, mask=x > 1)
    with pytest.raises(TypeError, match=r"^X: expected a plain array, got a .*np\.asarray"):
        getattr(scaler, method)(bad)
    assert_same_fitted_state(scaler, before)
