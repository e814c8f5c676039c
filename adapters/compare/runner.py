"""The comparison: train, then evaluate every strategy on the same network, over a grid.

For each backend, batch size and seed one network is trained (a learning rate scaled
linearly with the batch size: ``lr * batch_size / 64``); after each training length in
``epochs`` every strategy is evaluated on the test set, and the distance of its statistics
from the exact full-pass statistics is measured per layer.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import numpy as np

from . import strategies as strategy_names
from .backends import NumpyRun, Run, Statistics, TorchRun
from .data import Dataset, load

BACKENDS = ("torch", "numpy")
REFERENCE_BATCH_SIZE = 64
"""The learning rate given is the one for this batch size; others scale linearly."""


@attrs.frozen
class Record:
    """One evaluation: a strategy's test accuracy on one trained network."""

    backend: str
    model: str
    dataset: str
    batch_size: int
    seed: int
    epochs: int
    strategy: str
    accuracy: float
    calibration_batch_size: int
    stats_distance: list[float | None]
    """Per BatchNorm layer: mean over channels of |mu - mu_exact| / sigma_exact +
    |sigma / sigma_exact - 1| (0 for the exact statistics; empty for "batch"). Channels whose
    exact variance is 0 have no such distance and are left out; a layer with no channel left
    (or with non-finite statistics) gets None, and ``stats_distance_note`` says why."""
    stats_distance_note: str = ""
    """Why a layer's distance is None or leaves channels out; empty when every channel counts."""

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class Timings:
    """Seconds spent, by backend and phase."""

    seconds: dict[tuple[str, str], float] = attrs.field(factory=lambda: defaultdict(float))

    def add(self, backend: str, phase: str, started: float) -> None:
        self.seconds[(backend, phase)] += time.perf_counter() - started


def compare(
    dataset: str = "digits",
    *,
    backends: Sequence[str] = BACKENDS,
    model: str = "mlp",
    batch_sizes: Sequence[int] = (2, 4, 8, 16, 32, 64, 128, 256),
    seeds: int = 5,
    epochs: Sequence[int] = (5,),
    lr: float = 0.1,
    strategies: str | list[str] | tuple[str, ...] = strategy_names.DEFAULT,
    calibration_batch_size: int | None = None,
    workers: int = 1,
    progress: Any = None,
    timings: Timings | None = None,
) -> list[Record]:
    """Train BatchNorm networks and evaluate every strategy; return one record per
    backend, batch size, seed, training length and strategy.

    ``workers`` > 1 trains in that many processes (one task per backend and batch size);
    the records do not depend on it. ``progress`` (a tqdm bar) is advanced per network.
    """
    names = strategy_names.parse(strategies)
    for option, values, least in (
        ("--batch-sizes", batch_sizes, 2),
        ("--epochs", epochs, 1),
        ("--seeds", [seeds], 1),
        ("--calibration-batch-size", [calibration_batch_size or 2], 2),
    ):
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < least]
        if bad or not values:
            raise ValueError(f"{option}: expected integers >= {least}, got {list(values)}")
    batch_sizes = sorted(set(batch_sizes))
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"--backend: expected torch, numpy or both, got {backend!r}")
    if model not in ("mlp", "cnn"):
        raise ValueError(f"--model: expected 'mlp' or 'cnn', got {model!r}")
    load(dataset)  # fail early, in this process, on a bad dataset
    timings = timings if timings is not None else Timings()
    tasks = [
        _Task(
            dataset,
            backend,
            model,
            batch_size,
            seeds,
            tuple(sorted(set(epochs))),
            lr,
            names,
            calibration_batch_size,
        )
        for backend in backends
        for batch_size in batch_sizes
    ]
    tasks.sort(key=lambda task: task.batch_size)  # the slowest (smallest batches) first
    records: list[Record] = []
    if workers <= 1:
        for task in tasks:
            found, spent = task.run(progress)
            records += found
            _add(timings, spent)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(task.run) for task in tasks]
            for future in as_completed(futures):
                found, spent = future.result()
                records += found
                _add(timings, spent)
                if progress is not None:
                    progress.update(seeds)
    order = {(b, n): i for i, (b, n) in enumerate((t.backend, t.batch_size) for t in tasks)}
    records.sort(key=lambda r: (order[(r.backend, r.batch_size)], r.seed, r.epochs))
    return records


@attrs.frozen
class _Task:
    """Every seed of one backend and batch size (what one worker process runs)."""

    dataset: str
    backend: str
    model: str
    batch_size: int
    seeds: int
    epochs: tuple[int, ...]
    lr: float
    names: tuple[str, ...]
    calibration_batch_size: int | None

    def run(self, progress: Any = None) -> tuple[list[Record], dict[tuple[str, str], float]]:
        data = load(self.dataset)
        timings = Timings()
        records: list[Record] = []
        with _one_thread(torch_too=self.backend == "torch"):
            for seed in range(self.seeds):
                records += _one_network(
                    data,
                    self.backend,
                    self.model,
                    self.batch_size,
                    seed,
                    list(self.epochs),
                    self.lr,
                    self.names,
                    self.calibration_batch_size or self.batch_size,
                    timings,
                )
                if progress is not None:
                    progress.update(1)
        return records, dict(timings.seconds)


@contextlib.contextmanager
def _one_thread(torch_too: bool) -> Iterator[None]:
    """One BLAS and one torch thread (the fastest here on small networks); restored after.

    The same thread counts wherever a network trains (in this process or a worker), so
    its records do not depend on ``workers``.
    """
    from threadpoolctl import threadpool_limits

    if torch_too:
        import torch as _torch  # noqa: F401 - loaded before the limits, so they apply to it
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(1):
        if torch is not None:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if torch is not None and threads is not None:
                torch.set_num_threads(threads)


def _add(timings: Timings, spent: dict[tuple[str, str], float]) -> None:
    for key, seconds in spent.items():
        timings.seconds[key] += seconds


def _one_network(
    data: Dataset,
    backend: str,
    model: str,
    batch_size: int,
    seed: int,
    epochs: list[int],
    lr: float,
    names: tuple[str, ...],
    calibration_batch_size: int,
    timings: Timings,
) -> list[Record]:
    started = time.perf_counter()
    tracked = strategy_names.tracked(names)
    run: Run = (NumpyRun if backend == "numpy" else TorchRun)(data, model, seed, tracked)
    calibration = run.calibration_batches(calibration_batch_size)
    timings.add(backend, "set-up", started)
    records: list[Record] = []
    done = 0
    for total in epochs:
        started = time.perf_counter()
        run.train_epochs(total - done, batch_size, lr * batch_size / REFERENCE_BATCH_SIZE)
        done = total
        timings.add(backend, "training", started)
        started = time.perf_counter()
        reference = run.statistics("exact", calibration)
        found: dict[str, Statistics | None] = {}
        accuracy: dict[str, float] = {}
        for name in names:
            found[name] = reference if name == "exact" else run.statistics(name, calibration)
            accuracy[name] = run.accuracy(name, batch_size)
        run.restore_training_statistics()
        timings.add(backend, "evaluation", started)
        for name in names:
            records.append(
                Record(
                    backend,
                    model,
                    data.name,
                    batch_size,
                    seed,
                    total,
                    name,
                    accuracy[name],
                    calibration_batch_size,
                    *_distance(found[name], reference),
                )
            )
    return records


def _distance(
    stats: Statistics | None, reference: Statistics | None
) -> tuple[list[float | None], str]:
    """The per-layer distances of ``stats`` from ``reference`` and a note on what is missing.

    The distance is relative to the exact standard deviation. Where the exact variance is 0
    (a unit that is constant over the training set, as after a constant input) it is 0 for
    the same statistics and undefined for others: such channels are left out of their
    layer's mean, and a layer with no channel left gets None.
    """
    if stats is None or reference is None:
        return [], ""
    distances: list[float | None] = []
    notes = []
    for layer, ((mean, var), (mean_ref, var_ref)) in enumerate(zip(stats, reference, strict=True)):
        where = f"stats_distance[{layer}]"
        same = (mean == mean_ref) & (var == var_ref)
        defined = (var_ref > 0) | same
        if not defined.any():
            distances.append(None)
            notes.append(
                f"{where} is null: the exact variance is 0 in all {defined.size} channels and "
                "these statistics differ from the exact ones, so no distance relative to it "
                "is defined"
            )
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            sigma_ref = np.sqrt(var_ref)
            distance = np.abs(mean - mean_ref) / sigma_ref + np.abs(np.sqrt(var / var_ref) - 1)
        value = float(np.mean(np.where(same, 0.0, distance)[defined]))
        if not math.isfinite(value):
            distances.append(None)
            notes.append(f"{where} is null: the statistics are not finite (training diverged?)")
            continue
        distances.append(value)
        if not defined.all():
            notes.append(
                f"{where} is the mean over {int(defined.sum())} of {defined.size} channels: in "
                f"the other {int((~defined).sum())} the exact variance is 0 and these "
                "statistics differ from the exact ones, so no distance relative to it is defined"
            )
    return distances, "; ".join(notes)
