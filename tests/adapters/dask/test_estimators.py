"""Every estimator's ``update`` with Dask arrays (each call one batch), on Dask's synchronous
scheduler: against exact rational references, the in-memory estimator fed the same batches,
and the bad-input contract (clear error or ``nan_policy``, state exactly unchanged)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

import normstats as ns  # noqa: E402
import normstats.adapters.dask  # noqa: E402  # registers the handler

from ...helpers import (  # noqa: E402
    assert_same_state,
    exact_reference,
    max_relative_error,
    relative_error_to_exact,
    snapshot,
)
from ...user_strategies import LastK, WithinBatch  # noqa: E402
from .data import CHUNKINGS, shifted_normal  # noqa: E402

TOL = 1e-12


@pytest.fixture(autouse=True)
def synchronous() -> Iterator[None]:
    with dask.config.set(scheduler="synchronous"):
        yield


def batches(seed: int) -> list[np.ndarray]:
    """Three batches of 1e8 + N(0, 1) of different lengths."""
    x = shifted_normal(seed)
    return [x[:100], x[100:117], x[117:]]


def dask_batches(arrays: list[np.ndarray], chunkings: list[Any]) -> list[Any]:
    return [da.from_array(a, chunks=c) for a, c in zip(arrays, chunkings, strict=True)]


def assert_same_estimate(a: Any, b: Any) -> None:
    """The same counters and, to ``TOL`` relative, the same mean and variance."""
    for counter in ("count", "num_batches", "num_batches_skipped"):
        assert getattr(a, counter) == getattr(b, counter), counter
    assert type(a.mean) is type(b.mean) is np.ndarray
    assert max_relative_error(a.mean, b.mean) < TOL
    assert max_relative_error(a.var, b.var) < TOL


CHUNKS_PER_BATCH = [
    [(100, 3), (17, 3), (123, 3)],  # one chunk each
    [(7, 1), 5, ((1, 50, 72), (2, 1))],  # every kind of split, uneven
    [((60, 0, 40), (1, 1, 1)), (1, 3), 41],
]


@pytest.mark.parametrize("chunkings", CHUNKS_PER_BATCH, ids=["whole", "mixed", "with-empty"])
def test_every_estimator_matches_exact_arithmetic_and_the_in_memory_one(
    estimator_factory, chunkings
):
    arrays = batches(1)
    on_dask, in_memory = estimator_factory(), estimator_factory()
    for batch, array in zip(dask_batches(arrays, chunkings), arrays, strict=True):
        on_dask.update(batch)
        in_memory.update(array)
    mean, var = exact_reference(estimator_factory, arrays)
    assert relative_error_to_exact(on_dask.var, var) < TOL
    assert relative_error_to_exact(on_dask.mean, mean) < TOL
    assert on_dask.count == 240
    assert on_dask.num_batches == 3
    assert_same_estimate(on_dask, in_memory)


def test_dask_and_in_memory_batches_mix_in_one_estimator(estimator_factory):
    arrays = batches(2)
    mixed, in_memory = estimator_factory(), estimator_factory()
    for k, array in enumerate(arrays):
        mixed.update(da.from_array(array, chunks=9) if k % 2 else array)
        in_memory.update(array)
    assert_same_estimate(mixed, in_memory)


def test_update_reduces_every_axis_but_the_kept_ones(estimator_factory):
    rng = np.random.default_rng(3)
    x = 1e4 + rng.standard_normal((5, 3, 4, 4))
    on_dask, in_memory = estimator_factory(), estimator_factory()
    on_dask.update(da.from_array(x, chunks=(2, 1, 3, 4)), axis=(0, 2, 3))
    in_memory.update(x, axis=(0, 2, 3))
    assert_same_estimate(on_dask, in_memory)


def test_unknown_chunk_sizes_are_found_by_the_reduction(estimator_factory):
    x = shifted_normal(4)
    dx = da.from_array(x, chunks=(50, 3))
    keep = x[:, 0] > 1e8
    stats, in_memory = estimator_factory(), estimator_factory()
    stats.update(dx[dx[:, 0] > 1e8])
    in_memory.update(x[keep])
    assert stats.count == int(keep.sum())
    assert_same_estimate(stats, in_memory)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_chunk_follows_nan_policy(estimator_factory, value):
    arrays = batches(5)
    bad = arrays[0].copy()
    bad[63, 2] = value
    raising, skipping = estimator_factory(), estimator_factory(nan_policy="skip")
    reference = estimator_factory(nan_policy="skip")
    for stats in (raising, skipping, reference):
        stats.update(arrays[1])
    before = snapshot(raising)
    with pytest.raises(ValueError, match=r"^x: ") as from_memory:
        estimator_factory().update(bad)
    with pytest.raises(ValueError, match=r"^x: ") as from_dask:
        raising.update(da.from_array(bad, chunks=(20, 2)))
    assert str(from_dask.value) == str(from_memory.value)
    assert str(from_dask.value) == "x: expected finite values, got a batch containing NaN or Inf"
    assert_same_state(raising.state_dict(), before)
    skipping.update(da.from_array(bad, chunks=(20, 2)))
    reference.update(bad)
    assert skipping.num_batches_skipped == 1
    assert_same_state(skipping.state_dict(), reference.state_dict())


def test_a_fold_that_would_overflow_follows_nan_policy():
    # chunks of equal values, each finite; together an M2 beyond float64
    x = np.repeat([[1e300], [-1e300]], 10, axis=0)
    stats = ns.Welford()
    with pytest.raises(ValueError, match="x: expected values whose sum of squared deviations"):
        stats.update(da.from_array(x, chunks=10))
    assert stats.count == 0
    skipping = ns.Welford(nan_policy="skip")
    skipping.update(da.from_array(x, chunks=10))
    assert (skipping.count, skipping.num_batches_skipped) == (0, 1)


def test_bad_batches_raise_before_any_computation(estimator_factory):
    stats = estimator_factory()
    stats.update(batches(6)[0])
    before = snapshot(stats)

    def poison(block):
        raise AssertionError("computed: the batch should have been refused on its shape")

    def poisoned(shape: tuple[int, ...], dtype: Any = np.float64) -> Any:
        return da.zeros(shape, dtype=dtype, chunks=2).map_blocks(poison, dtype=dtype)

    with pytest.raises(ValueError, match=r"x: expected feature shape \(3,\) as in earlier"):
        stats.update(poisoned((4, 2)))
    with pytest.raises(TypeError, match=r"x: expected a real floating-point dtype .* got int64"):
        stats.update(poisoned((4, 3), np.int64))
    with pytest.raises(ValueError, match=r"x: expected at least \w+ sample"):
        stats.update(poisoned((0, 3)))
    with pytest.raises(ValueError, match=r"axis: expected axes in \[-2, 2\)"):
        stats.update(poisoned((4, 3)), axis=3)
    assert_same_state(stats.state_dict(), before)


def test_a_failing_task_raises_and_leaves_the_estimator_unchanged(estimator_factory):
    stats = estimator_factory()
    stats.update(batches(7)[0])
    before = snapshot(stats)

    def unreadable(block, block_info=None):
        if block_info[0]["chunk-location"] == (2, 0):
            raise OSError("chunk (2, 0) could not be read")
        return block

    x = da.from_array(batches(7)[2], chunks=(20, 3))
    with pytest.raises(OSError, match=r"chunk \(2, 0\) could not be read"):
        stats.update(x.map_blocks(unreadable, dtype=x.dtype))
    assert_same_state(stats.state_dict(), before)


def test_an_estimator_with_torch_state_refuses_a_dask_batch(torch):
    stats = ns.Welford()
    stats.update(torch.ones(4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor like the estimator's state"):
        stats.update(da.ones((4, 3), chunks=2))
    assert stats.count == 4


@pytest.mark.parametrize("strategy", [LastK, WithinBatch], ids=["LastK", "WithinBatch"])
def test_user_strategies_take_dask_batches(strategy):
    # LastK does not merge, WithinBatch does: each batch is reduced whole, so either works
    arrays = batches(8)
    on_dask, in_memory = strategy(), strategy()
    for array in arrays:
        on_dask.update(da.from_array(array, chunks=((7, array.shape[0] - 7), (2, 1))))
        in_memory.update(array)
    assert max_relative_error(on_dask.var, in_memory.var) < TOL
    assert max_relative_error(on_dask.mean, in_memory.mean) < TOL
    assert on_dask.num_batches == in_memory.num_batches == 3


def test_merging_estimators_fed_on_dask_equals_one_stream():
    arrays = batches(9)
    first, second, whole = ns.Welford(), ns.Welford(), ns.Welford()
    first.update(da.from_array(arrays[0], chunks=13))
    second.update(da.from_array(np.concatenate(arrays[1:]), chunks=(31, 1)))
    first.merge(second)
    whole.update(arrays[0])
    whole.update(np.concatenate(arrays[1:]))
    assert_same_estimate(first, whole)


def test_every_chunking_gives_the_same_welford_state():
    x = shifted_normal(10)
    reference = ns.Welford()
    reference.update(x)
    for chunks in CHUNKINGS.values():
        stats = ns.Welford()
        stats.update(da.from_array(x, chunks=chunks))
        assert_same_estimate(stats, reference)


def test_a_batch_without_features_counts_its_samples(estimator_factory):
    on_dask, in_memory = estimator_factory(), estimator_factory()
    on_dask.update(da.zeros((5, 0), chunks=2))
    in_memory.update(np.zeros((5, 0)))
    assert on_dask.count == in_memory.count == 5
