"""Per-batch update throughput and accuracy of normstats' estimators, against baselines and peers.

Run with ``make bench`` (``.venv/bin/python benchmarks/estimators.py``); it is not a test.

What is measured
----------------
A 200,000 x 64 float32 stream (``np.random.default_rng(0)``), pre-sliced once into batches of
256 rows (the last one shorter), is fed to each candidate batch by batch. A candidate's time is
the best of ``--repeats`` passes over the stream, timed with ``time.perf_counter``; the
candidates are interleaved within every repeat (and their order rotated between repeats), so
that noise on a busy machine hits them all alike, and the best pass is the one least disturbed.
Every figure is microseconds per batch, and every ratio is between two figures of this run.

* normstats: ``make_stats(name).update(batch)`` for "exact", "cumulative", "ema" and
  "welford", a fresh estimator per pass.
* baseline (a): ``np.mean`` and ``np.var`` of the batch with ``dtype=np.float64``, NumPy's own
  float64 accumulation of one batch's statistics, with nothing kept between batches.
* baseline (b): one ``np.sum(batch, axis=0)``, a single read of the batch: the memory-bound
  floor that no estimator can beat.
* peers, each skipped with a note when it is not installed: river's ``stats.Var`` (one per
  feature, fed sample by sample, and, separately, column by column with ``update_many``), the
  ``welford`` package's ``Welford.add_all`` and scikit-learn's ``StandardScaler.partial_fit``.
  river's per-sample loop and ``welford``'s ``add_all`` (a Python loop over rows) are far too
  slow for the whole stream: they are timed on a prefix and scaled to a batch of 256 rows, and
  their lines say so.
* torch: normstats' welford and ema fed ``torch.from_numpy`` batches, against the same update
  written directly in torch here: float64 sums, Chan's merge or the EMA recurrence, and one
  host-synchronising finiteness check per batch, as the library does.
* several strategies on one stream, as the comparison tracks them on every training step: the
  four it tracks by default (cumulative, ema 0.1, ema 0.01, welford) fed each batch's
  precomputed ``Moments`` (reduced once, before timing) with one ``update_moments_all``,
  against each estimator's own ``update_moments``; and, as the comparison now feeds them, the
  same moments stacked ``STACKED_CHUNK`` batches at a time (the stacking timed too) and folded
  with one ``update_stacked_all`` per chunk.

Threads are pinned to one (BLAS through threadpoolctl, torch through ``set_num_threads``) so
that the figures measure the code rather than how many idle cores the machine had.

Accuracy is checked once, on 1e8 + N(0, 1) float64 data (100,000 x 4, batches of 256), where a
textbook one-pass ``E[x^2] - E[x]^2`` loses every digit: each estimator's variance is compared
with the exact variance of the same float64 values, computed in rational arithmetic
(``fractions.Fraction``).

The script ends with the targets (at least 2x faster than (a), at most 2x the (b) floor, torch
at most 1.2x the direct torch update) and whether this run met them.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import ModuleType
from typing import Any

import numpy as np
from _harness import pin_threads

import normstats as ns
from normstats.estimators import StackedMoments, update_moments_all, update_stacked_all

ROWS = 200_000
FEATURES = 64
BATCH = 256
SEED = 0
ESTIMATORS = ("exact", "cumulative", "ema", "welford")
EMA_MOMENTUM = 0.1

RIVER_ROWS = 2_000
"""Rows fed sample by sample to river's ``Var`` (then scaled to a batch of 256)."""
RIVER_MANY_BATCHES = 40
"""Batches fed column by column to river's ``Var.update_many``."""
WELFORD_PKG_BATCHES = 8
"""Batches fed to the ``welford`` package's ``add_all`` (a Python loop over rows)."""

ACCURACY_ROWS = 100_000
ACCURACY_FEATURES = 4
ACCURACY_OFFSET = 1e8

TRACKED = (
    ("cumulative", {}),
    ("ema", {"momentum": 0.1}),
    ("ema", {"momentum": 0.01}),
    ("welford", {}),
)
"""The strategies the comparison tracks during training by default, as make_stats arguments."""

TARGET_VS_A = 2.0
"""normstats must be at least this many times faster than baseline (a)."""
TARGET_VS_B = 2.0
"""normstats must take at most this many times the (b) floor."""
TARGET_TORCH = 1.2
"""normstats on torch tensors must take at most this many times the direct torch update."""

TRACKED_EACH = f"{len(TRACKED)} tracked, update_moments each"
TRACKED_TOGETHER = f"{len(TRACKED)} tracked, update_moments_all"
TRACKED_STACKED = f"{len(TRACKED)} tracked, update_stacked_all"
STACKED_CHUNK = 256
"""Batches folded together by ``update_stacked_all`` (what the comparison holds back)."""

Pass = Callable[[], object]
"""One timed pass over a candidate's batches; it returns what it computed (kept alive)."""


@dataclass(frozen=True)
class Candidate:
    """Something to time: ``prepare`` builds fresh state and returns the pass to time."""

    label: str
    prepare: Callable[[], Pass]
    batches: float
    """How many 256-row batches one pass amounts to (the divisor of its time)."""
    note: str = ""


@dataclass(frozen=True)
class Peers:
    """The optional packages found (``None`` where the import failed)."""

    torch: ModuleType | None
    river_stats: ModuleType | None
    welford: ModuleType | None
    sklearn_preprocessing: ModuleType | None


# -- set-up --------------------------------------------------------------------------------


def optional_import(name: str) -> ModuleType | None:
    """Import ``name``, or print why it is skipped and return ``None``."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        print(f"note: {name} is not installed ({error}); its lines are skipped")
        return None


def import_peers() -> Peers:
    """Import every optional package before pinning threads.

    threadpoolctl only limits the thread pools of libraries already loaded, and torch and
    scikit-learn (through SciPy) bring their own OpenMP and OpenBLAS.
    """
    return Peers(
        torch=optional_import("torch"),
        river_stats=optional_import("river.stats"),
        welford=optional_import("welford"),
        sklearn_preprocessing=optional_import("sklearn.preprocessing"),
    )


def describe_machine(peers: Peers, repeats: int) -> None:
    """Print versions and the machine's load, so that a figure can be put in context."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    versions = [f"python {platform.python_version()}", f"numpy {np.__version__}"]
    if peers.torch is not None:
        versions.append(f"torch {peers.torch.__version__}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load}")
    print("versions: " + ", ".join(versions))
    print(
        f"stream: {ROWS:,} x {FEATURES} float32 (seed {SEED}) in batches of {BATCH} rows "
        f"({math.ceil(ROWS / BATCH)} batches, the last of {ROWS % BATCH or BATCH} rows); "
        f"best of {repeats} interleaved repeats"
    )


def make_batches(
    rows: int, features: int, batch: int, dtype: type[np.floating[Any]] = np.float32
) -> list[np.ndarray]:
    """The benchmark stream, pre-sliced into views of ``batch`` rows (the last one shorter)."""
    data = np.random.default_rng(SEED).standard_normal((rows, features), dtype=dtype)
    return [data[start : start + batch] for start in range(0, rows, batch)]


# -- timing --------------------------------------------------------------------------------


def time_pass(candidate: Candidate) -> float:
    """Seconds for one pass of ``candidate`` on fresh state, with the collector paused.

    The collection before it is cheap once ``time_candidates`` has frozen the set-up's objects
    (torch and scikit-learn alone leave ~0.1 s of work for every full collection).
    """
    run = candidate.prepare()
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    finally:
        gc.enable()


def time_candidates(candidates: Sequence[Candidate], repeats: int) -> dict[str, float]:
    """Best microseconds per batch of each candidate, interleaved and rotated per repeat."""
    gc.collect()
    gc.freeze()  # the imports and the data stay; later collections skip them
    for candidate in candidates:  # warm-up: first-call caches, lazy imports, page faults
        time_pass(candidate)
    best = dict.fromkeys((c.label for c in candidates), math.inf)
    for repeat in range(repeats):
        shift = repeat % len(candidates)
        for candidate in [*candidates[shift:], *candidates[:shift]]:
            best[candidate.label] = min(best[candidate.label], time_pass(candidate))
    gc.unfreeze()
    return {c.label: best[c.label] / c.batches * 1e6 for c in candidates}


# -- candidates: normstats and the NumPy baselines ----------------------------------------


def feeding(
    make: Callable[[], Any], feed: Callable[[Any, Any], object], batches: Sequence[Any]
) -> Callable[[], Pass]:
    """A fresh ``make()`` per pass, given every batch with ``feed(state, batch)``."""

    def prepare() -> Pass:
        state = make()

        def run() -> object:
            for b in batches:
                feed(state, b)
            return state

        return run

    return prepare


def estimator_pass(name: str, batches: Sequence[Any]) -> Callable[[], Pass]:
    """``make_stats(name)`` fed every batch; a fresh estimator per pass."""
    return feeding(lambda: ns.make_stats(name), lambda stats, b: stats.update(b), batches)


def tracked_pass(moments: Sequence[ns.Moments], together: bool) -> Callable[[], Pass]:
    """The comparison's tracked strategies fed every batch's moments, with one
    ``update_moments_all`` or each estimator's ``update_moments``; fresh estimators per pass."""

    def make() -> list[Any]:
        return [ns.make_stats(name, **kwargs) for name, kwargs in TRACKED]

    def feed(estimators: list[Any], m: ns.Moments) -> None:
        if together:
            update_moments_all(estimators, m)
            return
        for stats in estimators:
            stats.update_moments(m)

    return feeding(make, feed, moments)


def stacked_pass(moments: Sequence[ns.Moments]) -> Callable[[], Pass]:
    """The comparison's tracked strategies fed the same moments ``STACKED_CHUNK`` batches at a
    time: each chunk stacked into ``StackedMoments`` and folded with ``update_stacked_all``."""
    chunks = [moments[i : i + STACKED_CHUNK] for i in range(0, len(moments), STACKED_CHUNK)]

    def make() -> list[Any]:
        return [ns.make_stats(name, **kwargs) for name, kwargs in TRACKED]

    def feed(estimators: list[Any], chunk: Sequence[ns.Moments]) -> None:
        update_stacked_all(estimators, StackedMoments.from_moments(chunk))

    return feeding(make, feed, chunks)


def check_stacked(moments: Sequence[ns.Moments]) -> float:
    """Largest relative difference between the stacked and the batch-by-batch estimates."""
    one_by_one = tracked_pass(moments, together=True)()()
    stacked = stacked_pass(moments)()()
    assert isinstance(one_by_one, list)
    assert isinstance(stacked, list)
    return max(
        float(np.max(np.abs(getattr(a, key) - getattr(b, key)) / np.abs(getattr(b, key))))
        for a, b in zip(stacked, one_by_one, strict=True)
        for key in ("mean", "var")
    )


def baseline_mean_var(batches: Sequence[np.ndarray]) -> Callable[[], Pass]:
    """Baseline (a): ``np.mean`` and ``np.var`` of each batch, accumulated in float64."""

    def run() -> object:
        out = None
        for b in batches:
            out = np.mean(b, axis=0, dtype=np.float64), np.var(b, axis=0, dtype=np.float64)
        return out

    return lambda: run


def baseline_sum(batches: Sequence[np.ndarray]) -> Callable[[], Pass]:
    """Baseline (b): one ``np.sum`` per batch, the memory-bound floor."""

    def run() -> object:
        out = None
        for b in batches:
            out = np.sum(b, axis=0)
        return out

    return lambda: run


# -- candidates: peers ----------------------------------------------------------------------


def river_per_sample(river_stats: ModuleType, data: np.ndarray) -> Callable[[], Pass]:
    """river's idiom: one ``Var`` per feature, each fed one Python float per sample."""

    def feed(variances: list[Any], row: np.ndarray) -> None:
        for var, value in zip(variances, row.tolist(), strict=True):
            var.update(value)

    return feeding(lambda: [river_stats.Var() for _ in range(data.shape[1])], feed, list(data))


def river_update_many(river_stats: ModuleType, batches: Sequence[np.ndarray]) -> Callable[[], Pass]:
    """river's batch API: one ``Var`` per feature, ``update_many`` with the batch's column."""

    def feed(variances: list[Any], b: np.ndarray) -> None:
        for j, var in enumerate(variances):
            var.update_many(b[:, j])

    return feeding(lambda: [river_stats.Var() for _ in range(batches[0].shape[1])], feed, batches)


def welford_package(welford: ModuleType, batches: Sequence[np.ndarray]) -> Callable[[], Pass]:
    """The ``welford`` package: ``Welford().add_all(batch)`` (a Python loop over the rows)."""
    return feeding(welford.Welford, lambda accumulator, b: accumulator.add_all(b), batches)


def sklearn_scaler(preprocessing: ModuleType, batches: Sequence[np.ndarray]) -> Callable[[], Pass]:
    """scikit-learn: ``StandardScaler().partial_fit(batch)``."""
    return feeding(preprocessing.StandardScaler, lambda scaler, b: scaler.partial_fit(b), batches)


def peer_candidates(peers: Peers, batches: Sequence[np.ndarray]) -> list[Candidate]:
    """The installed peers; river and the welford package on a prefix, scaled to 256 rows."""
    candidates: list[Candidate] = []
    if peers.river_stats is not None:
        prefix = np.concatenate(batches)[:RIVER_ROWS]
        candidates.append(
            Candidate(
                "river.stats.Var (per sample)",
                river_per_sample(peers.river_stats, prefix),
                RIVER_ROWS / BATCH,
                f"extrapolated: {RIVER_ROWS:,} rows fed sample by sample, time per row x {BATCH}",
            )
        )
        many = batches[:RIVER_MANY_BATCHES]
        candidates.append(
            Candidate(
                "river.stats.Var.update_many",
                river_update_many(peers.river_stats, many),
                len(many),
                f"extrapolated: first {len(many)} batches, one update_many per column",
            )
        )
    if peers.welford is not None:
        first = batches[:WELFORD_PKG_BATCHES]
        candidates.append(
            Candidate(
                "welford.Welford.add_all",
                welford_package(peers.welford, first),
                len(first),
                f"extrapolated: first {len(first)} batches; add_all loops over rows in Python",
            )
        )
    if peers.sklearn_preprocessing is not None:
        candidates.append(
            Candidate(
                "sklearn StandardScaler.partial_fit",
                sklearn_scaler(peers.sklearn_preprocessing, batches),
                len(batches),
            )
        )
    return candidates


# -- candidates: torch ----------------------------------------------------------------------


class TorchWelford:
    """Chan's merge written directly in torch: what normstats' welford does for a tensor."""

    def __init__(self, torch: ModuleType) -> None:
        self.torch = torch
        self.count = 0
        self.mean: Any = None
        self.m2: Any = None

    def update(self, b: Any) -> None:
        torch = self.torch
        d = b.to(torch.float64)
        n = d.shape[0]
        s1 = d.sum(dim=0)
        s2 = d.mul_(d).sum(dim=0)
        m2_b = s2 - s1 * (s1 / n)
        if not bool(torch.isfinite(m2_b).all()):
            raise ValueError("batch: expected finite values")
        mean_b = s1 / n
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean_b, m2_b
            return
        total = self.count + n
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2_b + delta * delta * (self.count * n / total)
        self.count = total

    @property
    def var(self) -> Any:
        return self.m2 / (self.count - 1)


class TorchEMA:
    """PyTorch BatchNorm's running-statistics EMA written directly in torch, in float64."""

    def __init__(self, torch: ModuleType, momentum: float = EMA_MOMENTUM) -> None:
        self.torch = torch
        self.momentum = momentum
        self.mean: Any = 0.0
        self.var: Any = 1.0

    def update(self, b: Any) -> None:
        torch = self.torch
        d = b.to(torch.float64)
        n = d.shape[0]
        s1 = d.sum(dim=0)
        s2 = d.mul_(d).sum(dim=0)
        batch_var = (s2 - s1 * (s1 / n)) / (n - 1)
        if not bool(torch.isfinite(batch_var).all()):
            raise ValueError("batch: expected finite values")
        m = self.momentum
        self.mean = self.mean + (s1 / n - self.mean) * m
        self.var = self.var + (batch_var - self.var) * m


def direct_pass(make: Callable[[], Any], batches: Sequence[Any]) -> Callable[[], Pass]:
    """A fresh ``make()`` object fed every batch through its ``update``."""
    return feeding(make, lambda stats, b: stats.update(b), batches)


def torch_candidates(torch: ModuleType, tensors: Sequence[Any]) -> list[Candidate]:
    """normstats welford and ema on tensors, and the same updates written directly."""
    n = len(tensors)
    return [
        Candidate("torch normstats welford", estimator_pass("welford", tensors), n),
        Candidate("torch direct welford", direct_pass(lambda: TorchWelford(torch), tensors), n),
        Candidate("torch normstats ema", estimator_pass("ema", tensors), n),
        Candidate("torch direct ema", direct_pass(lambda: TorchEMA(torch), tensors), n),
    ]


def check_torch_direct(torch: ModuleType, tensors: Sequence[Any]) -> float:
    """Largest relative difference between the direct torch updates and normstats' results."""
    worst = 0.0
    for name, direct in (("welford", TorchWelford(torch)), ("ema", TorchEMA(torch))):
        library = ns.make_stats(name)
        for t in tensors:
            library.update(t)
            direct.update(t)
        for ours, theirs in ((library.mean, direct.mean), (library.var, direct.var)):
            scale = torch.clamp(theirs.abs(), min=1e-12)
            worst = max(worst, float(((ours - theirs).abs() / scale).max()))
    return worst


# -- accuracy ---------------------------------------------------------------------------------


def exact_var(column: np.ndarray, ddof: int) -> Fraction:
    """The exact variance of the float64 values in ``column``, in rational arithmetic.

    Every float is a dyadic rational ``p / 2**k``; scaled to the common denominator ``D`` they
    become integers ``q``, and ``var = (n * sum(q**2) - sum(q)**2) / (n * (n - ddof) * D**2)``.
    """
    ratios = [value.as_integer_ratio() for value in column.tolist()]
    denominator = max(d for _, d in ratios)  # powers of two: each divides the largest
    scaled = [p * (denominator // d) for p, d in ratios]
    n = len(scaled)
    s1 = sum(scaled)
    s2 = sum(q * q for q in scaled)
    return Fraction(n * s2 - s1 * s1, n * (n - ddof) * denominator**2)


def relative_error(estimate: np.ndarray, exact: Sequence[Fraction]) -> float:
    """Largest ``|estimate - exact| / exact`` over the features, computed exactly."""
    errors = [
        abs((Fraction(float(e)) - x) / x) for e, x in zip(estimate.tolist(), exact, strict=True)
    ]
    return float(max(errors))


def accuracy_estimates(peers: Peers, data: np.ndarray) -> list[tuple[str, int, np.ndarray]]:
    """``(label, ddof, variance per feature)`` of each estimator on ``data``, batch by batch."""
    batches = [data[start : start + BATCH] for start in range(0, len(data), BATCH)]
    stats = ns.make_stats("welford")
    for b in batches:
        stats.update(b)
    results: list[tuple[str, int, np.ndarray]] = [
        ("normstats welford", 1, np.asarray(stats.var)),
        ("np.var float64 two-pass, whole array", 1, np.var(data, axis=0, ddof=1)),
    ]
    if peers.river_stats is not None:
        per_sample = [peers.river_stats.Var(ddof=1) for _ in range(data.shape[1])]
        for column, var in zip(data.T, per_sample, strict=True):
            for value in column.tolist():
                var.update(value)
        results.append(("river.stats.Var (per sample)", 1, np.array([v.get() for v in per_sample])))
        many = [peers.river_stats.Var(ddof=1) for _ in range(data.shape[1])]
        for b in batches:
            for j, var in enumerate(many):
                var.update_many(b[:, j])
        results.append(("river.stats.Var.update_many", 1, np.array([v.get() for v in many])))
    if peers.welford is not None:
        accumulator = peers.welford.Welford()
        for b in batches:
            accumulator.add_all(b, backup_flg=False)
        results.append(("welford.Welford.add_all", 1, np.asarray(accumulator.var_s)))
    if peers.sklearn_preprocessing is not None:
        scaler = peers.sklearn_preprocessing.StandardScaler()
        for b in batches:
            scaler.partial_fit(b)
        results.append(("sklearn StandardScaler.partial_fit", 0, np.asarray(scaler.var_)))
    return results


def report_accuracy(peers: Peers) -> None:
    """Print each estimator's relative variance error on 1e8 + N(0, 1) float64 data."""
    rng = np.random.default_rng(SEED)
    data = ACCURACY_OFFSET + rng.standard_normal((ACCURACY_ROWS, ACCURACY_FEATURES))
    exact = {ddof: [exact_var(column, ddof) for column in data.T] for ddof in (0, 1)}
    print()
    print(
        f"accuracy: {ACCURACY_ROWS:,} x {ACCURACY_FEATURES} float64 values 1e8 + N(0, 1), batches "
        f"of {BATCH}; reference: the exact variance of the same values in rational arithmetic "
        "(fractions.Fraction, all columns)"
    )
    print(f"  {'estimator':<38} {'ddof':>4}  {'max relative variance error':>28}")
    for label, ddof, estimate in accuracy_estimates(peers, data):
        print(f"  {label:<38} {ddof:>4}  {relative_error(estimate, exact[ddof]):>28.2e}")


# -- report -----------------------------------------------------------------------------------


def print_results(us: dict[str, float], notes: dict[str, str]) -> None:
    """One line per candidate, with ratios between figures of this run."""
    a = us["(a) np.mean+np.var float64"]
    b = us["(b) np.sum floor"]
    print()
    print(f"{'(a) np.mean+np.var float64':<36} {a:9.1f} us/batch")
    print(f"{'(b) np.sum floor':<36} {b:9.1f} us/batch")
    for name in ESTIMATORS:
        t = us[name]
        print(
            f"{name:<36} {t:9.1f} us/batch   {a / t:5.2f}x faster than (a) np.mean+np.var "
            f"float64   {t / b:5.2f}x the (b) np.sum floor"
        )
    welford = us["welford"]
    peers = [label for label in us if label in notes]
    if peers:
        print()
    for label in peers:
        note = f"   ({notes[label]})" if notes[label] else ""
        print(
            f"{label:<36} {us[label]:9.1f} us/batch   normstats welford is "
            f"{us[label] / welford:,.1f}x faster{note}"
        )
    each, together, stacked = us[TRACKED_EACH], us[TRACKED_TOGETHER], us[TRACKED_STACKED]
    print()
    print(f"{TRACKED_EACH:<36} {each:9.1f} us/batch")
    print(
        f"{TRACKED_TOGETHER:<36} {together:9.1f} us/batch   {each / together:5.2f}x faster than "
        "each estimator's update_moments"
    )
    print(
        f"{TRACKED_STACKED:<36} {stacked:9.1f} us/batch   {together / stacked:5.2f}x faster than "
        f"update_moments_all ({STACKED_CHUNK} batches per fold)"
    )
    if "torch direct welford" in us:
        print()
        for name in ("welford", "ema"):
            ours, direct = us[f"torch normstats {name}"], us[f"torch direct {name}"]
            print(f"{'torch direct ' + name:<36} {direct:9.1f} us/batch")
            print(
                f"{'torch ' + name:<36} {ours:9.1f} us/batch   {ours / direct:5.2f}x the same "
                "update written directly in torch"
            )


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def print_targets(us: dict[str, float]) -> None:
    """The targets, judged on the slowest normstats estimator of this run."""
    a = us["(a) np.mean+np.var float64"]
    b = us["(b) np.sum floor"]
    slowest = max(ESTIMATORS, key=lambda name: us[name])
    speedup = a / us[slowest]
    floor = us[slowest] / b
    parts = [
        f">= {TARGET_VS_A:g}x faster than (a): {speedup:.2f}x ({slowest}, the slowest) "
        f"{verdict(speedup >= TARGET_VS_A)}",
        f"<= {TARGET_VS_B:g}x the (b) floor: {floor:.2f}x {verdict(floor <= TARGET_VS_B)}",
    ]
    if "torch direct welford" in us:
        ratio = max(
            us[f"torch normstats {n}"] / us[f"torch direct {n}"] for n in ("welford", "ema")
        )
        parts.append(
            f"torch <= {TARGET_TORCH:g}x direct: {ratio:.2f}x {verdict(ratio <= TARGET_TORCH)}"
        )
    else:
        parts.append(f"torch <= {TARGET_TORCH:g}x direct: not measured (torch not installed)")
    print()
    print("targets: " + "; ".join(parts))


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6, help="timed passes per candidate")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the accuracy table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    peers = import_peers()
    limiter = pin_threads(peers.torch)
    describe_machine(peers, args.repeats)

    batches = make_batches(ROWS, FEATURES, BATCH)
    candidates = [
        Candidate(name, estimator_pass(name, batches), len(batches)) for name in ESTIMATORS
    ]
    candidates += [
        Candidate("(a) np.mean+np.var float64", baseline_mean_var(batches), len(batches)),
        Candidate("(b) np.sum floor", baseline_sum(batches), len(batches)),
    ]
    moments = [ns.Moments.from_array(b) for b in batches]
    candidates += [
        Candidate(TRACKED_EACH, tracked_pass(moments, together=False), len(batches)),
        Candidate(TRACKED_TOGETHER, tracked_pass(moments, together=True), len(batches)),
        Candidate(TRACKED_STACKED, stacked_pass(moments), len(batches)),
    ]
    peer_list = peer_candidates(peers, batches)
    candidates += peer_list
    if peers.torch is not None:
        tensors = [peers.torch.from_numpy(b) for b in batches]
        candidates += torch_candidates(peers.torch, tensors)

    started = time.perf_counter()
    us = time_candidates(candidates, args.repeats)
    print_results(us, {c.label: c.note for c in peer_list})
    if peers.torch is not None:
        difference = check_torch_direct(peers.torch, tensors)
        print(f"check: the direct torch updates match normstats to {difference:.1e} (relative)")
    print(
        f"check: the stacked folds match update_moments_all to {check_stacked(moments):.1e} "
        "(relative)"
    )
    print(f"timing took {time.perf_counter() - started:.1f} s")

    if not args.no_accuracy:
        report_accuracy(peers)
    print_targets(us)
    del limiter
    return 0


if __name__ == "__main__":
    sys.exit(main())
