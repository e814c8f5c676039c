"""``normstats.adapters.dask.moments`` and ``Moments.from_array`` of Dask arrays, on Dask's
synchronous scheduler, against exact rational arithmetic and the in-memory reduction."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

import normstats as ns  # noqa: E402
import normstats.adapters.dask as nsd  # noqa: E402
from normstats.adapters.dask.reduction import statistics  # noqa: E402

from ...helpers import exact_mean_m2, max_relative_error  # noqa: E402
from .data import CHUNKINGS, shifted_normal  # noqa: E402

TOL = 1e-12
"""Relative precision promised for any chunking (DESIGN: as exact as the in-memory path)."""


@pytest.fixture(autouse=True)
def synchronous() -> Iterator[None]:
    with dask.config.set(scheduler="synchronous"):
        yield


def assert_exact(moments: ns.Moments, x: np.ndarray) -> None:
    """``moments`` are those of the float64 values of ``x`` (2-d, over rows): M2 to ``TOL``
    relative, the mean (with its residual) to ``TOL`` of the standard deviation, whatever
    the offset."""
    means, m2s = exact_mean_m2(x)
    assert moments.count == len(x)
    for j, (mean, m2) in enumerate(zip(means, m2s, strict=True)):
        high, low = Fraction(float(moments.mean[j])), Fraction(float(moments.mean_residual[j]))
        assert float(abs(high + low - mean)) < TOL * float(m2 / len(x)) ** 0.5, j
        assert abs(Fraction(float(moments.m2[j])) - m2) / m2 < TOL, j


@pytest.mark.parametrize("chunks", CHUNKINGS.values(), ids=CHUNKINGS.keys())
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e8])
def test_moments_are_exact_for_every_chunking(chunks, offset):
    x = shifted_normal(1, offset=offset)
    moments = nsd.moments(da.from_array(x, chunks=chunks)).compute()
    assert_exact(moments, x)
    in_memory = ns.Moments.from_array(x)
    assert max_relative_error(moments.var(ddof=1), in_memory.var(ddof=1)) < TOL


def test_float32_chunks_are_accumulated_in_float64():
    x = shifted_normal(2, offset=1e4).astype(np.float32)
    moments = nsd.moments(da.from_array(x, chunks=((50, 3, 187), (2, 1)))).compute()
    assert moments.mean.dtype == np.float64
    assert_exact(moments, x)  # the float32 values, exactly: no float32 sum anywhere


def test_several_reduced_axes_and_a_kept_one_in_the_middle():
    rng = np.random.default_rng(3)
    x = 1e8 + rng.standard_normal((6, 4, 5, 7))  # reduce N, H, W of an NCHW batch
    dx = da.from_array(x, chunks=((1, 5), (3, 1), (2, 3), (4, 3)))
    moments = nsd.moments(dx, axis=(0, 2, -1)).compute()
    reference = ns.Moments.from_array(x, axis=(0, 2, 3))
    assert moments.count == 6 * 5 * 7
    assert moments.feature_shape == (4,)
    assert max_relative_error(moments.mean, reference.mean) < 1e-15
    assert max_relative_error(moments.m2, reference.m2) < TOL
    flat = np.moveaxis(x, 1, -1).reshape(-1, 4)  # the samples of each channel as rows
    assert_exact(moments, flat)


def test_moments_compute_together_with_other_results():
    x = shifted_normal(4)
    dx = da.from_array(x, chunks=(70, 2))
    moments, mean = dask.compute(nsd.moments(dx), dx.mean(axis=0))
    assert isinstance(moments, ns.Moments)
    assert max_relative_error(moments.mean, mean) < 1e-15


def test_moments_of_a_one_dimensional_array_and_of_unknown_chunk_sizes():
    x = shifted_normal(5)[:, 0]
    moments = nsd.moments(da.from_array(x, chunks=37)).compute()
    assert moments.feature_shape == ()
    assert_exact_1d = ns.Moments.from_array(x)
    assert moments.count == 240
    assert max_relative_error(moments.m2, assert_exact_1d.m2) < TOL
    dx = da.from_array(x, chunks=37)
    kept = dx[dx > 1e8]  # chunk sizes unknown until computed
    assert np.isnan(kept.shape[0])
    selected = nsd.moments(kept).compute()
    assert selected.count == int(np.sum(x > 1e8))
    assert max_relative_error(selected.m2, ns.Moments.from_array(x[x > 1e8]).m2) < TOL


def test_only_per_feature_statistics_are_computed_on_the_client():
    # what a compute brings back: one record per feature, whatever the number of rows
    dx = da.from_array(shifted_normal(6), chunks=((100, 140), (1, 2)))
    reduced = statistics(dx, (0,), ignore_nan=False)
    assert reduced.shape == (3,)
    assert reduced.chunks == ((1, 2),)
    assert reduced.compute().nbytes == 3 * reduced.dtype.itemsize


def test_from_array_of_a_dask_array_reduces_it_on_its_scheduler():
    x = shifted_normal(7)
    moments = ns.Moments.from_array(da.from_array(x, chunks=((33, 207), (1, 2))))
    assert type(moments.mean) is np.ndarray
    assert_exact(moments, x)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.nan, "x: expected finite values, got a batch containing NaN or Inf"),
        (np.inf, "x: expected finite values, got a batch containing NaN or Inf"),
    ],
)
def test_non_finite_values_raise_when_computed(value, message):
    x = shifted_normal(8)
    x[150, 1] = value
    lazy = nsd.moments(da.from_array(x, chunks=40))
    with pytest.raises(ValueError, match=r"^" + message + "$"):
        lazy.compute()
    with pytest.raises(ValueError, match=r"^" + message + "$"):
        ns.Moments.from_array(x)  # the same error as in memory
    with pytest.raises(ValueError, match=r"^" + message + "$"):
        ns.Moments.from_array(da.from_array(x, chunks=40))


def test_a_merge_that_overflows_raises_as_in_memory():
    # every chunk finite on its own (M2 = 0); their merge's M2 is beyond float64
    x = np.repeat([[1e300], [-1e300]], 10, axis=0)
    message = "x: expected values whose sum of squared deviations fits in float64, got values"
    with pytest.raises(ValueError, match=message):
        ns.Moments.from_array(x)
    with pytest.raises(ValueError, match=message):
        nsd.moments(da.from_array(x, chunks=10)).compute()


def test_bad_arguments_raise_at_once():
    with pytest.raises(TypeError, match=r"^x: expected a dask.array.Array, got ndarray$"):
        nsd.moments(np.zeros((3, 2)))
    with pytest.raises(TypeError, match=r"x: expected a real floating-point dtype .* got int64"):
        nsd.moments(da.zeros((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"axis: expected axes in \[-2, 2\)"):
        nsd.moments(da.zeros((3, 2)), axis=2)
    with pytest.raises(ValueError, match="x: expected an array with at least one axis"):
        nsd.moments(da.zeros(()))


def test_without_the_adapter_a_dask_array_is_refused_in_one_line(tmp_path):
    # a fresh process: dask installed, the adapter not imported
    code = (
        "import dask.array as da, normstats as ns\n"
        "try:\n"
        "    ns.Welford().update(da.ones((4, 2), chunks=2))\n"
        "except TypeError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "x: expected an array in memory, got a Dask array (float64 array of shape (4, 2)); its "
        "statistics are computed on its cluster by normstats' Dask adapter: run pip install "
        "'normstats[dask]' and import normstats.adapters.dask\n"
    )


def test_the_adapter_without_dask_names_its_extra(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['dask'] = None\n")
    done = subprocess.run(
        [sys.executable, "-c", "import normstats.adapters.dask"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(blocker)},
    )
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("ModuleNotFoundError: normstats.adapters.dask")
    assert done.stderr.splitlines()[-1].endswith("run: pip install 'normstats[dask]'")
    assert Path(blocker / "sitecustomize.py").exists()
