"""The Standardizer with Dask arrays, on Dask's synchronous scheduler: ``fit`` and
``partial_fit`` equal the in-memory Standardizer fed the same batches (NaN left out per
feature, Inf under ``nan_policy``), and ``transform`` returns a lazy Dask array."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

import normstats as ns  # noqa: E402
import normstats.adapters.dask  # noqa: E402  # registers the handler

from ...helpers import max_relative_error  # noqa: E402
from .data import CHUNKINGS, shifted_normal  # noqa: E402

TOL = 1e-12
STATS = ("welford", "exact", "cumulative", "ema")


@pytest.fixture(autouse=True)
def synchronous() -> Iterator[None]:
    with dask.config.set(scheduler="synchronous"):
        yield


def assert_same_fit(a: ns.Standardizer, b: ns.Standardizer) -> None:
    assert a.n_features_in_ == b.n_features_in_
    assert np.array_equal(a.n_samples_seen_, b.n_samples_seen_)
    for name in ("mean_", "var_", "scale_"):
        mine, theirs = getattr(a, name), getattr(b, name)
        assert type(mine) is np.ndarray, name
        assert mine.dtype == np.float64, name
        assert np.array_equal(np.isnan(mine), np.isnan(theirs)), name
        finite = ~np.isnan(theirs)
        assert max_relative_error(mine[finite], theirs[finite]) < TOL, name


def poison(block: Any) -> Any:
    raise AssertionError("computed, where the result should have stayed lazy")


@pytest.mark.parametrize("stats", STATS)
@pytest.mark.parametrize(
    "chunks", [CHUNKINGS["uneven rows"], CHUNKINGS["both axes, uneven"]], ids=["rows", "both"]
)
def test_fit_and_partial_fit_equal_the_in_memory_standardizer(stats, chunks):
    x = shifted_normal(1)
    fitted = ns.Standardizer(stats).fit(da.from_array(x, chunks=chunks))
    assert_same_fit(fitted, ns.Standardizer(stats).fit(x))
    streamed, in_memory = ns.Standardizer(stats), ns.Standardizer(stats)
    for part in (x[:90], x[90:200], x[200:]):
        streamed.partial_fit(da.from_array(part, chunks=(25, 2)))
        in_memory.partial_fit(part)
    assert_same_fit(streamed, in_memory)


def nan_batches() -> list[np.ndarray]:
    """Batches whose NaN leave the features first with equal counts, then with unequal ones,
    then a feature without any value in a batch (each batch keeps 2+ values elsewhere)."""
    x = shifted_normal(2, rows=90)
    first, second, third = x[:30].copy(), x[30:60].copy(), x[60:].copy()
    first[[3, 4, 5], [0, 1, 2]] = np.nan  # one NaN per feature: counts stay equal
    second[[0, 1, 2, 17], [0, 0, 2, 0]] = np.nan  # counts 27, 30, 29
    third[:, 1] = np.nan  # feature 1 has no value here
    third[[5, 6], [0, 2]] = np.nan
    return [first, second, third]


@pytest.mark.parametrize("stats", STATS)
def test_nan_are_left_out_per_feature_as_in_memory(stats):
    on_dask, in_memory = ns.Standardizer(stats), ns.Standardizer(stats)
    for batch in nan_batches():
        on_dask.partial_fit(da.from_array(batch, chunks=((4, 1, 25), (2, 1))))
        in_memory.partial_fit(batch)
        assert_same_fit(on_dask, in_memory)
    assert on_dask.n_samples_seen_.tolist() == [85, 59, 87]


def test_a_feature_without_any_value_has_nan_statistics_as_in_memory():
    x = shifted_normal(3)
    x[:, 2] = np.nan
    on_dask = ns.Standardizer().fit(da.from_array(x, chunks=50))
    assert_same_fit(on_dask, ns.Standardizer().fit(x))
    assert on_dask.n_samples_seen_.tolist() == [240, 240, 0]


def test_a_batch_of_too_few_values_per_feature_is_refused_as_in_memory():
    x = shifted_normal(4, rows=10)
    x[1:, 0] = np.nan  # feature 0 has one value: no unbiased batch variance
    with pytest.raises(ValueError, match=r"^X: ") as from_memory:
        ns.Standardizer("ema").fit(x)
    with pytest.raises(ValueError, match=r"^X: ") as from_dask:
        ns.Standardizer("ema").fit(da.from_array(x, chunks=3))
    assert str(from_dask.value) == str(from_memory.value)
    assert "X: expected at least 2 non-NaN values per feature" in str(from_dask.value)


def test_inf_follows_nan_policy():
    x = shifted_normal(5)
    bad = x.copy()
    bad[200, 0] = np.inf
    scaler = ns.Standardizer().fit(x[:100])
    before = (scaler.mean_.copy(), scaler.var_.copy(), scaler.n_samples_seen_)
    with pytest.raises(ValueError, match=r"^X: ") as from_memory:
        ns.Standardizer().fit(x[:100]).partial_fit(bad)
    with pytest.raises(ValueError, match=r"^X: ") as from_dask:
        scaler.partial_fit(da.from_array(bad, chunks=40))
    assert str(from_dask.value) == str(from_memory.value)
    assert str(from_dask.value).startswith("X: expected finite values or NaN (NaN are left out)")
    assert np.array_equal(scaler.mean_, before[0])
    assert np.array_equal(scaler.var_, before[1])
    assert scaler.n_samples_seen_ == before[2]
    skipping = ns.Standardizer(nan_policy="skip").fit(x[:100])
    skipping.partial_fit(da.from_array(bad, chunks=40))
    assert_same_fit(skipping, ns.Standardizer().fit(x[:100]))


def test_integer_arrays_and_unknown_row_counts_are_fitted():
    x = np.arange(60, dtype=np.int64).reshape(20, 3) ** 2
    assert_same_fit(ns.Standardizer().fit(da.from_array(x, chunks=7)), ns.Standardizer().fit(x))
    floats = shifted_normal(6)
    dx = da.from_array(floats, chunks=30)
    selected = dx[dx[:, 1] > 1e8]
    assert_same_fit(
        ns.Standardizer().fit(selected), ns.Standardizer().fit(floats[floats[:, 1] > 1e8])
    )
    with pytest.raises(ValueError, match="X: expected at least one sample"):
        ns.Standardizer().fit(dx[dx[:, 1] > 2e8])  # nothing selected: known only when computed
    with pytest.raises(ValueError, match="X: expected an array whose number of features is"):
        ns.Standardizer().fit(dx[:, dx[0] > 1e8])


def test_a_failing_task_leaves_the_fit_unchanged():
    x = shifted_normal(7)
    scaler = ns.Standardizer().fit(x[:100])
    before = (scaler.mean_.copy(), scaler.var_.copy(), scaler.n_samples_seen_)

    def unreadable(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 3:
            raise OSError("chunk 3 could not be read")
        return block

    dx = da.from_array(x[100:], chunks=20)
    with pytest.raises(OSError, match="chunk 3 could not be read"):
        scaler.partial_fit(dx.map_blocks(unreadable, dtype=dx.dtype))
    assert np.array_equal(scaler.mean_, before[0])
    assert np.array_equal(scaler.var_, before[1])
    assert scaler.n_samples_seen_ == before[2]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("with_mean", "with_std"), [(True, True), (False, True), (True, False)])
def test_transform_is_lazy_and_equals_the_in_memory_transform(dtype, with_mean, with_std):
    x = shifted_normal(8, offset=1e4).astype(dtype)
    x[[3, 50], [1, 2]] = np.nan  # kept as NaN
    scaler = ns.Standardizer(with_mean=with_mean, with_std=with_std).fit(x)
    dx = da.from_array(x, chunks=((100, 140), (2, 1)))
    lazy = scaler.transform(dx)
    assert isinstance(lazy, da.Array)
    assert lazy.dtype == dtype
    assert lazy.chunks == dx.chunks
    expected = scaler.transform(x)
    assert np.array_equal(lazy.compute(), expected, equal_nan=True)
    back = scaler.inverse_transform(lazy)
    assert isinstance(back, da.Array)
    assert np.array_equal(back.compute(), scaler.inverse_transform(expected), equal_nan=True)
    never_computed = da.from_array(x, chunks=60).map_blocks(poison, dtype=x.dtype)
    assert isinstance(scaler.transform(never_computed), da.Array)


def test_transform_checks_the_values_when_computed():
    x = shifted_normal(9)
    scaler = ns.Standardizer().fit(x)
    bad = x.copy()
    bad[7, 1] = -np.inf
    lazy = scaler.transform(da.from_array(bad, chunks=(100, 3)))
    with pytest.raises(ValueError, match=r"^X: expected finite values or NaN, got float64 array"):
        lazy.compute()
    with pytest.raises(ValueError, match=r"^X: expected finite values or NaN, got float64 array"):
        scaler.transform(bad)
    small = ns.Standardizer(with_mean=False).fit(np.array([[1e-40], [2e-40], [3e-40]]))
    ones = np.array([[1.0], [2.0]], dtype=np.float32)  # 1 / 8e-41 is beyond float32
    message = "^X: expected values whose result fits in float32, got ones that overflow$"
    with pytest.raises(ValueError, match=message):
        small.transform(ones)
    with pytest.raises(ValueError, match=message):
        small.transform(da.from_array(ones, chunks=1)).compute()
    with pytest.raises(ValueError, match=r"X has 2 features, but Standardizer is expecting 3"):
        scaler.transform(da.zeros((4, 2)))  # the shape: at once
