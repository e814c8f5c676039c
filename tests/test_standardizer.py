"""Standardizer (DESIGN 3.4) against scikit-learn's StandardScaler and exact references.

The pooled strategies fed the same ``partial_fit`` batches as ``StandardScaler`` give its
``mean_``, ``var_``, ``scale_`` and ``n_samples_seen_`` to 1e-12 relative. On data with a
large offset (1e8 + N(0, 1)) the reference is exact rational arithmetic over the float
values (``helpers.exact_mean_m2``), not scikit-learn.
"""

from __future__ import annotations

import numpy as np
import pytest

import normstats as ns

from .helpers import exact_mean_m2, relative_error_to_exact

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.pipeline import Pipeline, make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

RTOL = 1e-12
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
    with pytest.raises(ValueError, match=r"X: expected 4 features"):
        getattr(scaler, method)(data(rows=10, features=3))
    np.testing.assert_array_equal(scaler.mean_, before[0])
    np.testing.assert_array_equal(scaler.var_, before[1])
    assert scaler.n_samples_seen_ == before[2]


@pytest.mark.parametrize("method", ["fit", "partial_fit", "transform", "inverse_transform"])
def test_one_dimensional_input_raises(method):
    scaler = ns.Standardizer().fit(data(features=1)) if "transform" in method else ns.Standardizer()
    with pytest.raises(ValueError, match=r"X: expected a 2-D array"):
        getattr(scaler, method)(np.arange(10.0))


def test_nan_raises():
    x = data(rows=20)
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"^[xX]: "):
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
    assert pipeline.named_steps["standardizer"].get_params() == {"stats": "exact", "eps": 1e-3}
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
    assert scaler.get_params() == {"stats": "welford", "eps": 0.0}
    assert scaler.get_params(deep=False) == {"stats": "welford", "eps": 0.0}
    assert scaler.set_params(stats="ema", momentum=0.3, eps=1e-4) is scaler
    assert scaler.get_params() == {"stats": "ema", "eps": 1e-4, "momentum": 0.3}
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
