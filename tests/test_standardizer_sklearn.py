"""Standardizer as scikit-learn sees it: its estimator checks, StandardScaler's parameters
and NaN handling, feature names and pandas output, and the Standardizer without scikit-learn.

References are scikit-learn's own ``StandardScaler`` (fed the same batches) and, for the
strategies StandardScaler does not have, each feature's non-NaN values fed to its own
strategy through ``ns.make_stats``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import normstats as ns

from .test_standardizer import data, fed, fitted_state, split

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils import estimator_checks  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from . import user_strategies  # noqa: E402

ALL = ["welford", "exact", "cumulative", "ema"]
POOLED = ["welford", "exact"]


# -- every check of check_estimator ------------------------------------------------------------
# Before: 9 of 47 checks failed for "welford" and "exact", 10 for "cumulative" and "ema".


# copy=False is left out: it writes transform's result into X, which checks that transform
# the same X twice rightly see as a change (StandardScaler(copy=False) does the same).
CHECKED = [ns.Standardizer(stats=stats) for stats in ALL] + [
    ns.Standardizer(stats="ema", momentum=0.2, debias=True, with_mean=False),
    # a user's strategies (docs/strategies.md): an instance, and a class with an argument
    ns.Standardizer(stats=user_strategies.LastK(k=3)),
    ns.Standardizer(stats=user_strategies.WithinBatch),
]

# scikit-learn warns that the Standardizer does not inherit from its BaseEstimator. It does
# not, on purpose: importing sklearn.base imports SciPy, which would add about two seconds
# to every `import normstats` (test_importing_normstats_does_not_import_scikit_learn). It
# implements the protocol instead, and every check below passes.
# Older scikit-learn (1.7, the newest for NumPy 1.24) hands pytest a generator of checks,
# which pytest 9 deprecates: the checks are listed first.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Estimator Standardizer does not inherit", UserWarning)
    _mark = parametrize_with_checks(CHECKED).mark
    checked = pytest.mark.parametrize(
        _mark.args[0], list(_mark.args[1]), *_mark.args[2:], **_mark.kwargs
    )


@checked
def test_check_estimator(estimator, check):
    check(estimator)


FEATURE_NAME_AND_OUTPUT_CHECKS = [
    "check_dataframe_column_names_consistency",
    "check_transformer_get_feature_names_out",
    "check_transformer_get_feature_names_out_pandas",
    "check_set_output_transform",
    "check_set_output_transform_pandas",
    "check_global_output_transform_pandas",
]


# The set_output checks fit a DataFrame and transform an array, and the other way round, on
# purpose: the Standardizer then warns as scikit-learn's transformers do.
@pytest.mark.filterwarnings("ignore:X does not have valid feature names:UserWarning")
@pytest.mark.filterwarnings("ignore:X has feature names, but Standardizer:UserWarning")
@pytest.mark.parametrize("name", FEATURE_NAME_AND_OUTPUT_CHECKS)
@pytest.mark.parametrize("stats", ALL)
def test_feature_name_and_output_checks(stats, name):
    # scikit-learn runs these on its own transformers only (not in check_estimator).
    if "pandas" in name or "dataframe" in name:
        pytest.importorskip("pandas")
    getattr(estimator_checks, name)("Standardizer", ns.Standardizer(stats=stats))


# -- NaN: left out per feature in fit, kept in transform -----------------------------------------


def with_nan(x, fraction=0.2, seed=0):
    x = x.copy()
    x[np.random.default_rng(seed).random(x.shape) < fraction] = np.nan
    return x


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("sizes", [[300], [100, 100, 100], [3, 97, 200]], ids=str)
@pytest.mark.parametrize("stats", POOLED)
def test_nan_matches_standard_scaler(stats, sizes, dtype):
    x = with_nan(data(), seed=len(sizes)).astype(dtype)
    x[:150, 3] = np.nan  # half a feature missing, all of it in the first batches
    ours = fed(ns.Standardizer(stats=stats), split(x, sizes))
    # StandardScaler fitted at once: its partial_fit gives a feature whose first batch is all
    # NaN a NaN mean for good (0 / 0), so the batches' reference is NumPy's nanmean/nanvar.
    theirs = StandardScaler().fit(x)
    as64 = x.astype(np.float64)
    np.testing.assert_allclose(ours.mean_, np.nanmean(as64, axis=0), rtol=1e-13)
    np.testing.assert_allclose(ours.var_, np.nanvar(as64, axis=0), rtol=1e-12)
    for name in ("mean_", "var_", "scale_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-12)
    np.testing.assert_array_equal(ours.n_samples_seen_, theirs.n_samples_seen_)
    assert ours.n_samples_seen_.dtype == np.int64
    test = with_nan(data(rows=40, seed=1), seed=9).astype(dtype)
    for method in ("transform", "inverse_transform"):
        got, expected = getattr(ours, method)(test), getattr(theirs, method)(test)
        assert got.dtype == expected.dtype == dtype
        np.testing.assert_array_equal(np.isnan(got), np.isnan(test))  # NaN kept, nowhere else
        tolerance = 1e-6 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("stats", POOLED)
def test_nan_arriving_after_clean_batches_splits_the_statistics_exactly(stats):
    # The first batches hold no NaN (one strategy for every feature); a later one does, and
    # each feature carries on from its slice of the shared statistics.
    x = data(rows=400, seed=3)
    late = with_nan(x[300:], fraction=0.3, seed=4)
    parts = [x[:100], x[100:300], late[:50], late[50:]]
    ours = fed(ns.Standardizer(stats=stats), parts)
    theirs = fed(StandardScaler(), parts)
    assert ours._statistics.shared is None  # split: one stream per feature
    np.testing.assert_allclose(ours.mean_, theirs.mean_, rtol=1e-12)
    np.testing.assert_allclose(ours.var_, theirs.var_, rtol=1e-12)
    np.testing.assert_array_equal(ours.n_samples_seen_, theirs.n_samples_seen_)
    np.testing.assert_allclose(ours.transform(late), theirs.transform(late), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("stats", "kwargs"), [("cumulative", {}), ("ema", {"momentum": 0.3})])
def test_nan_with_batch_averages_feeds_each_feature_its_own_values(stats, kwargs):
    # Each feature's estimate is that of its non-NaN values fed batch by batch; a batch with
    # no value of a feature leaves its estimate (the EMA does not decay it).
    x = data(rows=240, seed=5)
    parts = [x[:60].copy(), x[60:120].copy(), with_nan(x[120:], fraction=0.25, seed=6)]
    parts[1][:, 2] = np.nan  # feature 2 has no value in the second batch
    ours = fed(ns.Standardizer(stats=stats, **kwargs), parts)
    for j in range(x.shape[1]):
        reference = ns.make_stats(stats, **kwargs)
        for part in parts:
            column = part[:, j][~np.isnan(part[:, j])]
            if column.size:
                reference.update(column[:, None])
        np.testing.assert_allclose(ours.mean_[j], reference.mean[0], rtol=1e-13)
        np.testing.assert_allclose(ours.var_[j], reference.var[0], rtol=1e-13)
        assert ours.n_samples_seen_[j] == reference.count


def test_equal_nan_counts_keep_one_strategy_for_all_features():
    # One NaN in every column: each feature still has as many values as the others.
    x = data(rows=50, features=3, seed=7)
    x[[1, 5, 9], [0, 1, 2]] = np.nan
    ours = ns.Standardizer().fit(x)
    assert ours._statistics.shared is not None
    assert ours.n_samples_seen_ == 49
    np.testing.assert_allclose(ours.mean_, np.nanmean(x, axis=0), rtol=1e-13)
    np.testing.assert_allclose(ours.var_, np.nanvar(x, axis=0), rtol=1e-12)


def test_a_feature_without_values_has_nan_statistics_as_in_standard_scaler():
    x = data(rows=30, features=3, seed=8)
    x[:, 1] = np.nan
    ours = ns.Standardizer().fit(x)
    with np.errstate(invalid="ignore"):  # StandardScaler divides 0 by 0 for feature 1
        theirs = StandardScaler().fit(x)
    np.testing.assert_array_equal(ours.n_samples_seen_, [30, 0, 30])
    np.testing.assert_array_equal(ours.n_samples_seen_, theirs.n_samples_seen_)
    assert np.isnan(ours.mean_[1])
    assert np.isnan(ours.var_[1])
    assert np.isnan(ours.scale_[1])
    np.testing.assert_allclose(ours.transform(x), theirs.transform(x), rtol=1e-12)
    everything_missing = ns.Standardizer().fit(np.full((4, 2), np.nan))
    assert not everything_missing.__sklearn_is_fitted__()


@pytest.mark.parametrize("stats", ["ema", "cumulative"])
def test_a_single_value_of_a_feature_is_refused_by_batch_averages(stats):
    x = data(rows=40, seed=10)
    scaler = ns.Standardizer(stats=stats).fit(x)
    before = fitted_state(scaler)
    batch = x[:5].copy()
    batch[1:, 2] = np.nan  # one value of feature 2
    with pytest.raises(
        ValueError, match=r"^X: expected at least 2 .* got 1 sample\(s\) in feature 2"
    ):
        scaler.partial_fit(batch)
    after = fitted_state(scaler)
    assert after.keys() == before.keys()
    np.testing.assert_array_equal(after["mean_"], before["mean_"])
    # The pooled strategies take it.
    assert ns.Standardizer().fit(x).partial_fit(batch).n_samples_seen_.tolist() == [45, 45, 41, 45]


@pytest.mark.parametrize("stats", ALL)
def test_inf_is_refused_or_skipped_and_nothing_changes(stats):
    x = with_nan(data(seed=11), seed=12)
    scaler = ns.Standardizer(stats=stats).fit(x)
    before_mean, before_seen = scaler.mean_.copy(), np.copy(scaler.n_samples_seen_)
    bad = x[:10].copy()
    bad[3, 0] = -np.inf
    for method in ("partial_fit", "transform", "inverse_transform"):
        with pytest.raises(ValueError, match=r"^X: expected finite values or NaN"):
            getattr(scaler, method)(bad)
    np.testing.assert_array_equal(scaler.mean_, before_mean)
    np.testing.assert_array_equal(scaler.n_samples_seen_, before_seen)
    skipping = ns.Standardizer(stats=stats, nan_policy="skip").fit(x)
    skipping.partial_fit(bad)
    np.testing.assert_array_equal(skipping.mean_, before_mean)
    np.testing.assert_array_equal(skipping.n_samples_seen_, before_seen)


def test_an_error_in_one_feature_leaves_every_feature_as_it_was():
    # Per-feature streams are updated as a whole or not at all: feature 3 overflows after
    # features 0-2 have taken the batch.
    x = with_nan(data(rows=60, seed=13), seed=14)
    scaler = ns.Standardizer(stats="ema").fit(x)
    assert scaler._statistics.shared is None
    before = fitted_state(scaler)
    bad = x[:10].copy()
    bad[:, 3] = [1e308, -1e308] * 5
    with pytest.raises(ValueError, match=r"^X: "):
        scaler.partial_fit(bad)
    after = fitted_state(scaler)
    for key, value in before["statistics"].items():
        np.testing.assert_array_equal(after["statistics"][key], value)


# -- with_mean, with_std, copy -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("with_mean", "with_std"), [(True, False), (False, True), (False, False)])
def test_with_mean_and_with_std_match_standard_scaler(with_mean, with_std, dtype):
    x = with_nan(data(seed=15), fraction=0.1).astype(dtype)
    flags = {"with_mean": with_mean, "with_std": with_std}
    ours, theirs = ns.Standardizer(**flags).fit(x), StandardScaler(**flags).fit(x)
    tolerance = 1e-6 if dtype == np.float32 else 1e-12
    for method in ("transform", "inverse_transform"):
        got, expected = getattr(ours, method)(x), getattr(theirs, method)(x)
        assert got.dtype == dtype
        assert got is not x
        np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance)
    # The statistics are estimated whatever transform applies (StandardScaler drops some).
    np.testing.assert_allclose(ours.var_, np.nanvar(x.astype(np.float64), axis=0), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_copy_false_writes_into_x(dtype):
    x = data(seed=16).astype(dtype)
    scaler = ns.Standardizer(copy=False).fit(x)
    expected = ns.Standardizer().fit(x).transform(x)
    given = x.copy()
    out = scaler.transform(given)
    assert out is given
    np.testing.assert_array_equal(given, expected)
    back = scaler.inverse_transform(given, copy=True)  # the call's copy overrides
    assert back is not given
    untouched = x.copy()
    assert ns.Standardizer().fit(x).transform(untouched, copy=False) is untouched
    # A read-only array or another dtype cannot take the result: a new array comes back.
    readonly = x.copy()
    readonly.flags.writeable = False
    assert scaler.transform(readonly) is not readonly
    integers = np.arange(12).reshape(6, 2)
    assert ns.Standardizer(copy=False).fit(integers).transform(integers).dtype == np.float64


def test_copy_true_never_returns_x_even_without_centring_or_scaling():
    x = data(seed=17)
    scaler = ns.Standardizer(with_mean=False, with_std=False).fit(x)
    out = scaler.transform(x)
    assert out is not x
    np.testing.assert_array_equal(out, x)
    out[0, 0] = 123.0
    assert x[0, 0] != 123.0


@pytest.mark.parametrize("name", ["with_mean", "with_std", "copy"])
def test_flags_are_checked_at_fit(name):
    scaler = ns.Standardizer(**{name: "yes"})
    with pytest.raises(TypeError, match=rf"^{name}: expected a bool"):
        scaler.fit(data(rows=10))
    assert not scaler.__sklearn_is_fitted__()


# -- feature names and pandas output --------------------------------------------------------------


def test_feature_names_without_pandas():
    scaler = ns.Standardizer().fit(data(features=3))
    assert scaler.get_feature_names_out().tolist() == ["x0", "x1", "x2"]
    assert scaler.get_feature_names_out(["a", "b", "c"]).tolist() == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"^input_features should have length equal"):
        scaler.get_feature_names_out(["a", "b"])
    assert not hasattr(scaler, "feature_names_in_")


def test_dataframe_names_and_pandas_output():
    pd = pytest.importorskip("pandas")
    x = with_nan(data(rows=50, features=3, seed=18))
    frame = pd.DataFrame(x, columns=["age", "height", "weight"], index=np.arange(100, 150))
    scaler = ns.Standardizer().fit(frame)
    assert scaler.feature_names_in_.tolist() == ["age", "height", "weight"]
    assert scaler.get_feature_names_out().tolist() == ["age", "height", "weight"]
    np.testing.assert_allclose(scaler.transform(frame), StandardScaler().fit(x).transform(x))
    out = scaler.set_output(transform="pandas").transform(frame)
    assert isinstance(out, pd.DataFrame)
    assert out.columns.tolist() == ["age", "height", "weight"]
    assert out.index.tolist() == list(range(100, 150))
    pipeline = make_pipeline(ns.Standardizer()).set_output(transform="pandas")
    assert isinstance(pipeline.fit_transform(frame), pd.DataFrame)
    assert clone(scaler)._sklearn_output_config == {"transform": "pandas"}
    with pytest.raises(ValueError, match=r"Feature names must be in the same order"):
        scaler.transform(frame[["height", "age", "weight"]])
    with pytest.warns(UserWarning, match="X does not have valid feature names"):
        scaler.transform(x)
    with pytest.raises(ValueError, match=r"^transform: expected one of \['default', 'pandas'\]"):
        scaler.set_output(transform="polars")


# -- without scikit-learn -------------------------------------------------------------------------

WITHOUT_SKLEARN = """
import sys

class NoSklearn:
    def find_spec(self, name, path=None, target=None):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError(f"{name} is blocked for this test")

sys.meta_path.insert(0, NoSklearn())

import numpy as np
import normstats as ns

x = np.random.default_rng(0).normal(3.0, 2.0, size=(200, 3))
x[::7, 1] = np.nan
scaler = ns.Standardizer(stats="welford", with_mean=True)
for batch in np.array_split(x, 4):
    scaler.partial_fit(batch)
assert np.allclose(scaler.mean_, np.nanmean(x, axis=0), rtol=1e-13, atol=0)
assert np.allclose(scaler.var_, np.nanvar(x, axis=0), rtol=1e-12, atol=0)
z = scaler.transform(x)
assert np.array_equal(np.isnan(z), np.isnan(x)) and z.dtype == np.float64
assert scaler.transform(x.astype(np.float32)).dtype == np.float32
assert scaler.get_feature_names_out().tolist() == ["x0", "x1", "x2"]
try:
    ns.Standardizer().transform(x)
except ValueError as error:
    assert type(error) is ValueError and "fit" in str(error), error
else:
    raise AssertionError("an unfitted standardizer transformed data")
assert not any(name.split(".")[0] == "sklearn" for name in sys.modules)
print("ok")
"""


def test_the_standardizer_works_without_scikit_learn():
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WITHOUT_SKLEARN)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_importing_normstats_does_not_import_scikit_learn():
    # scikit-learn's import takes seconds (SciPy): the Standardizer must not impose it.
    code = "import sys, normstats; print(any(m.split('.')[0] == 'sklearn' for m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "False"
