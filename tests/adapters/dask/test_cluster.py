"""The Dask adapter on a real ``distributed.LocalCluster``: two worker processes, one thread
each, started once for the module (a start takes seconds) and closed at its end.

The reductions run on the workers (their tasks show in the cluster's task stream) and give
the in-memory results; a task that fails and a worker that dies while reducing surface as
errors, with the estimator and the Standardizer exactly as they were. The worker's death is
the module's last test: the cluster is not used after it (its nanny restarts the worker).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
import dask  # noqa: E402

import normstats as ns  # noqa: E402
import normstats.adapters.dask as nsd  # noqa: E402

from ...helpers import assert_same_state, max_relative_error, snapshot  # noqa: E402
from .data import CHUNKINGS, shifted_normal  # noqa: E402
from .test_moments import assert_exact  # noqa: E402
from .test_standardizer import assert_same_fit, nan_batches  # noqa: E402

TOL = 1e-12
CLUSTER_CONFIG = {
    # a task whose worker dies fails at once, rather than after three more workers' deaths
    "distributed.scheduler.allowed-failures": 0,
    "distributed.comm.timeouts.connect": "30s",
}


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with (
        dask.config.set(CLUSTER_CONFIG),
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.CRITICAL,
        ) as cluster,
        distributed.Client(cluster, timeout="60s") as client,
    ):
        client.wait_for_workers(2, timeout=60)
        yield client


def reduced_on_the_workers(client: Any, run: Any) -> Any:
    """``run()``, checking that the reduction's tasks ran on the cluster's workers."""
    with distributed.get_task_stream(client) as stream:
        result = run()
    workers = {task["worker"] for task in stream.data if "normstats-moments" in str(task["key"])}
    assert workers
    assert workers <= set(client.scheduler_info()["workers"])
    return result


@pytest.mark.parametrize(
    "chunks",
    [CHUNKINGS["uneven rows"], CHUNKINGS["kept axis"], CHUNKINGS["both axes, uneven"]],
    ids=["rows", "kept", "both"],
)
def test_moments_on_the_cluster_are_exact(client, chunks):
    x = shifted_normal(1)
    lazy = nsd.moments(da.from_array(x, chunks=chunks))
    assert_exact(reduced_on_the_workers(client, lazy.compute), x)


def test_float32_chunks_generated_on_the_workers(client):
    # the data never exist on the client: each worker draws its chunks
    rng = da.random.default_rng(0)
    x = (1e4 + rng.standard_normal((20_000, 4), chunks=(3_001, 3))).astype(np.float32)
    moments = nsd.moments(x).compute()
    reference = ns.Moments.from_array(x.compute())
    assert max_relative_error(moments.m2, reference.m2) < TOL
    assert max_relative_error(moments.mean, reference.mean) < 1e-15


def test_every_estimator_on_the_cluster_equals_the_in_memory_one(client, estimator_factory):
    x = shifted_normal(2)
    on_dask, in_memory = estimator_factory(), estimator_factory()
    for part, chunks in ((x[:100], (13, 2)), (x[100:], ((7, 133), 3))):
        reduced_on_the_workers(client, lambda p=part, c=chunks: on_dask.update(da.from_array(p, c)))
        in_memory.update(part)
    assert (on_dask.count, on_dask.num_batches) == (240, 2)
    assert max_relative_error(on_dask.mean, in_memory.mean) < TOL
    assert max_relative_error(on_dask.var, in_memory.var) < TOL


def test_a_non_finite_chunk_on_the_cluster_follows_nan_policy(client):
    x = shifted_normal(3)
    x[201, 0] = np.nan
    stats = ns.Welford()
    stats.update(x[:100])
    before = snapshot(stats)
    with pytest.raises(ValueError, match=r"^x: expected finite values, got a batch containing NaN"):
        stats.update(da.from_array(x, chunks=50))
    assert_same_state(stats.state_dict(), before)
    skipping = ns.Welford(nan_policy="skip")
    skipping.update(da.from_array(x, chunks=50))
    assert (skipping.count, skipping.num_batches_skipped) == (0, 1)


def test_the_standardizer_on_the_cluster(client):
    on_dask, in_memory = ns.Standardizer(), ns.Standardizer()
    for batch in nan_batches():
        on_dask.partial_fit(da.from_array(batch, chunks=((4, 1, 25), (2, 1))))
        in_memory.partial_fit(batch)
    assert_same_fit(on_dask, in_memory)
    x = nan_batches()[1]
    lazy = on_dask.transform(da.from_array(x, chunks=7))
    assert isinstance(lazy, da.Array)
    assert np.array_equal(lazy.compute(), on_dask.transform(x), equal_nan=True)


def failing(block: Any, block_info: Any = None) -> Any:
    if block_info[0]["chunk-location"][0] == 2:
        raise OSError("chunk 2 could not be read")
    return block


def test_a_failing_task_on_the_cluster_changes_nothing(client):
    x = shifted_normal(4)
    stats, scaler = ns.Welford(), ns.Standardizer().fit(x)
    stats.update(x)
    state, fitted = snapshot(stats), (scaler.mean_.copy(), scaler.var_.copy())
    bad = da.from_array(x, chunks=40).map_blocks(failing, dtype=x.dtype)
    with pytest.raises(OSError, match="chunk 2 could not be read"):
        stats.update(bad)
    with pytest.raises(OSError, match="chunk 2 could not be read"):
        scaler.partial_fit(bad)
    assert_same_state(stats.state_dict(), state)
    assert np.array_equal(scaler.mean_, fitted[0])
    assert np.array_equal(scaler.var_, fitted[1])
    assert scaler.n_samples_seen_ == 240


def dying(block: Any, block_info: Any = None) -> Any:
    """Ends the worker process that reduces chunk 3 (never the test's own process)."""
    if block_info[0]["chunk-location"][0] == 3:
        distributed.get_worker()  # raises ValueError outside a worker
        os._exit(1)
    return block


def test_a_worker_that_dies_surfaces_as_an_error_and_changes_nothing(client):
    # the module's last test: the nanny restarts the worker, and nothing waits for it
    x = shifted_normal(5)
    stats, scaler = ns.Welford(), ns.Standardizer().fit(x)
    stats.update(x)
    state, fitted = snapshot(stats), (scaler.mean_.copy(), scaler.var_.copy())
    doomed = da.from_array(x, chunks=40).map_blocks(dying, dtype=x.dtype, meta=np.empty((0, 0)))
    with pytest.raises(distributed.scheduler.KilledWorker):
        stats.update(doomed)
    assert_same_state(stats.state_dict(), state)
    with pytest.raises(distributed.scheduler.KilledWorker):
        scaler.partial_fit(doomed)
    assert np.array_equal(scaler.mean_, fitted[0])
    assert np.array_equal(scaler.var_, fitted[1])
