"""Statistics of a Dask array on a cluster: normstats against Dask's own mean and variance and
dask-ml's StandardScaler, side by side on the same cluster, in wall time and accuracy.

Run with ``make bench`` (``.venv/bin/python benchmarks/dask.py``); it is not a test.
``--quick`` takes a smaller array and fewer repeats.

What is measured
----------------
A ``distributed.LocalCluster`` of two worker processes with one thread each (the nanny starts
them with one BLAS/OpenMP thread) holds a ``ROWS x FEATURES`` float64 array, drawn on the
workers by ``da.random.default_rng(SEED)`` in chunks of ``CHUNK_ROWS`` rows and persisted in
their memory, so that every candidate reads the same chunks from memory and the figures
measure the reductions, not the data's generation. The array is ``offset + N(0, 1)`` for the
offsets 0 and 1e8 (where normstats reduces each chunk twice, the second pass around the
chunk's own mean). Every candidate returns per-feature statistics to the client:

* normstats: ``normstats.adapters.dask.moments(x).compute()``, the exact tree reduction of
  per-chunk moments; ``ns.Welford().update(x)`` and ``ns.Standardizer().fit(x)``, the same
  reduction behind an estimator and a Standardizer (which also finds each feature's NaN);
* baseline (a): ``dask.compute(x.mean(axis=0), x.var(axis=0))``, Dask's own mean and
  variance computed together (one graph, each chunk read once by both);
* peer: dask-ml's ``StandardScaler().fit(x)``, when dask-ml imports (the ``bench`` extra
  installs it).

A sample is the wall time (``time.perf_counter``) of one call, from building the graph to
the statistics on the client. The candidates are interleaved within every repeat and their
order rotated between repeats; each figure is the median over repeats, and each ratio is the
median over repeats of ``candidate / (a)`` within the same repeat.

Accuracy: a smaller array (``ACCURACY_ROWS x 4``, NumPy's ``default_rng(SEED)``, chunks of
``ACCURACY_CHUNK`` rows, the last one shorter) at offsets 0, 1e4 and 1e8, reduced by every
candidate on the same cluster; each one's variance (ddof=0) is compared with the exact
variance of the same float64 values in rational arithmetic (``fractions.Fraction``), and its
mean error is given in units of the standard deviation.

The script ends with the target (normstats' moments at most 1.0x Dask's own mean+var, on
the worse offset) and whether this run met it.
"""

from __future__ import annotations

import os
import sys

# This file is named dask.py: its folder, first on sys.path when it runs as a script, would
# shadow the dask package. It goes last instead (for _harness).
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE] + [HERE]

import argparse  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from fractions import Fraction  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from _harness import cpu_name  # noqa: E402

try:
    import dask
    import dask.array as da
    import distributed
except ImportError as error:
    raise SystemExit(
        f"benchmarks/dask.py needs the dask extra ({error}); run `make install`"
    ) from None

import normstats as ns  # noqa: E402
import normstats.adapters.dask as nsd  # noqa: E402

ROWS = 2_000_000
FEATURES = 16
CHUNK_ROWS = 250_000
QUICK_ROWS = 500_000
SEED = 0
TIMED_OFFSETS = (0.0, 1e8)
ACCURACY_OFFSETS = (0.0, 1e4, 1e8)
ACCURACY_ROWS = 40_000
ACCURACY_FEATURES = 4
ACCURACY_CHUNK = 3_000
TARGET = 1.0
"""normstats' moments must take at most this many times Dask's own mean+var."""

BASELINE = "(a) dask mean+var"
Statistics = tuple[np.ndarray, np.ndarray]
"""Per-feature mean and variance (ddof=0) on the client."""


def candidates(dask_ml: ModuleType | None) -> dict[str, Callable[[Any], Statistics]]:
    """Each candidate: a function of a Dask array that returns its mean and variance."""

    def moments(x: Any) -> Statistics:
        m = nsd.moments(x).compute()
        return m.mean, m.var(ddof=0)

    def welford(x: Any) -> Statistics:
        stats = ns.Welford()
        stats.update(x)
        return stats.mean, stats.moments.var(ddof=0)

    def standardizer(x: Any) -> Statistics:
        scaler = ns.Standardizer().fit(x)
        return scaler.mean_, scaler.var_

    def dask_mean_var(x: Any) -> Statistics:
        mean, var = dask.compute(x.mean(axis=0), x.var(axis=0))
        return mean, var

    found = {
        "normstats moments": moments,
        "normstats Welford.update": welford,
        "normstats Standardizer.fit": standardizer,
        BASELINE: dask_mean_var,
    }
    if dask_ml is not None:

        def scaler(x: Any) -> Statistics:
            fitted = dask_ml.StandardScaler().fit(x)
            return np.asarray(fitted.mean_), np.asarray(fitted.var_)

        found["dask-ml StandardScaler.fit"] = scaler
    return found


def import_dask_ml() -> ModuleType | None:
    try:
        return importlib.import_module("dask_ml.preprocessing")
    except ImportError as error:
        print(f"note: dask-ml is not installed ({error}); its lines are skipped")
        return None


def time_candidates(
    runs: dict[str, Callable[[Any], Statistics]], x: Any, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call of each candidate, and median ratios to the baseline."""
    for run in runs.values():  # warm-up: the workers import and cache what they need
        run(x)
    seconds: dict[str, list[float]] = {label: [] for label in runs}
    ratios: dict[str, list[float]] = {label: [] for label in runs}
    labels = list(runs)
    for repeat in range(repeats):
        shift = repeat % len(labels)
        this_repeat = {}
        for label in labels[shift:] + labels[:shift]:
            start = time.perf_counter()
            runs[label](x)
            this_repeat[label] = time.perf_counter() - start
        for label, t in this_repeat.items():
            seconds[label].append(t)
            ratios[label].append(t / this_repeat[BASELINE])
    return (
        {label: statistics.median(s) for label, s in seconds.items()},
        {label: statistics.median(r) for label, r in ratios.items()},
    )


def exact_variance(column: np.ndarray) -> tuple[Fraction, Fraction]:
    values = [Fraction(float(v)) for v in column]
    mean = sum(values, Fraction(0)) / len(values)
    return mean, sum(((v - mean) ** 2 for v in values), Fraction(0)) / len(values)


def report_accuracy(runs: dict[str, Callable[[Any], Statistics]]) -> None:
    print()
    print(
        f"accuracy: {ACCURACY_ROWS:,} x {ACCURACY_FEATURES} float64 values offset + N(0, 1) in "
        f"chunks of {ACCURACY_CHUNK:,} rows; reference: the exact mean and variance (ddof=0) of "
        "the same values in rational arithmetic"
    )
    header = f"{'max rel. variance error':>24}  {'mean error/std':>15}"
    print(f"  {'candidate':<30} {'offset':>6}  {header}")
    for offset in ACCURACY_OFFSETS:
        rng = np.random.default_rng(SEED)
        data = offset + rng.standard_normal((ACCURACY_ROWS, ACCURACY_FEATURES))
        exact = [exact_variance(column) for column in data.T]
        x = da.from_array(data, chunks=(ACCURACY_CHUNK, ACCURACY_FEATURES)).persist()
        distributed.wait(x)
        for label, run in runs.items():
            mean, var = run(x)
            var_error = max(
                float(abs(Fraction(float(v)) - e[1]) / e[1])
                for v, e in zip(var, exact, strict=True)
            )
            mean_error = max(
                float(abs(Fraction(float(m)) - e[0])) / float(e[1]) ** 0.5
                for m, e in zip(mean, exact, strict=True)
            )
            print(f"  {label:<30} {offset:>6.0e}  {var_error:>24.2e}  {mean_error:>15.2e}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per candidate")
    parser.add_argument("--quick", action="store_true", help="a smaller array, 3 repeats")
    args = parser.parse_args(argv)
    rows, repeats = (QUICK_ROWS, 3) if args.quick else (ROWS, args.repeats)
    dask_ml = import_dask_ml()
    runs = candidates(dask_ml)
    versions = [
        f"python {platform.python_version()}",
        f"numpy {np.__version__}",
        f"dask {dask.__version__}",
        f"distributed {distributed.__version__}",
    ]
    if dask_ml is not None:
        versions.append(f"dask-ml {importlib.import_module('dask_ml').__version__}")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load average {load}")
    print("versions: " + ", ".join(versions))
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        environ = client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
        print(
            f"cluster: LocalCluster, 2 worker processes x 1 thread (OMP_NUM_THREADS="
            f"{sorted(set(environ.values()))}); array: {rows:,} x {FEATURES} float64 "
            f"({rows * FEATURES * 8 / 2**20:,.0f} MiB) in chunks of {CHUNK_ROWS:,} rows, held "
            f"in the workers' memory; median of {repeats} interleaved repeats"
        )
        started = time.perf_counter()
        worst = 0.0
        for offset in TIMED_OFFSETS:
            rng = da.random.default_rng(SEED)
            x = (
                offset + rng.standard_normal((rows, FEATURES), chunks=(CHUNK_ROWS, FEATURES))
            ).persist()
            distributed.wait(x)
            seconds, ratios = time_candidates(runs, x, repeats)
            print()
            print(f"offset {offset:g}:")
            for label in runs:
                ms, ratio = seconds[label] * 1e3, ratios[label]
                print(f"  {label:<30} {ms:8.1f} ms   {ratio:5.2f}x {BASELINE}")
            worst = max(worst, ratios["normstats moments"])
            del x
        print(f"timing took {time.perf_counter() - started:.1f} s")
        report_accuracy(runs)
    met = "MET" if worst <= TARGET else "NOT MET"
    print()
    print(
        f"target: normstats moments <= {TARGET:g}x {BASELINE}: {worst:.2f}x (the worse offset) "
        f"{met}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
