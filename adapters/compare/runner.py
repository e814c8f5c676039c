"""The comparison: train, then evaluate every strategy on the same network, over a grid.

For each backend, batch size and seed one network is trained (a learning rate scaled
linearly with the batch size: ``lr * batch_size / 64``); after each training length in
``epochs`` every strategy is evaluated on the test set, as it is and under each covariate
shift, and the distance of its statistics from the exact full-pass statistics is measured
per layer. A network that diverges is left out with the reason; the others still count.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import numpy as np

import normstats as ns

from . import shifts as shift_names
from . import strategies as strategy_names
from . import train_modes as train_mode_names
from .backends import NumpyRun, Run, Statistics, TorchRun
from .data import Dataset, load
from .pool import one_thread, run_all
from .records import ALL, DivergedError, Missing, Record, Timings

BACKENDS = ("torch", "numpy")
REFERENCE_BATCH_SIZE = 64
"""The learning rate given is the one for this batch size; others scale linearly."""


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """``seeds`` as the seeds to run: a count N means 0..N-1, a sequence exactly its values."""
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"--seeds: expected a count >= 1 or a list of seeds, got {seeds}")
        return list(range(int(seeds)))
    values = list(seeds)  # type: ignore[arg-type]
    _check_integers("--seeds", values, 0)
    return values


def _check_integers(option: str, values: Sequence[Any], least: int) -> None:
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer))]
    if bad or not values or min(values) < least:
        raise ValueError(f"{option}: expected integers >= {least}, got {list(values)}")
    repeated = sorted({int(v) for v in values if list(values).count(v) > 1})
    if repeated:
        raise ValueError(f"{option}: expected each value once, got {repeated} more than once")


def calibration_sample_list(values: str | Sequence[int | str]) -> tuple[int | str, ...]:
    """``values`` (a comma-separated string or a sequence) as calibration sample counts, each
    an integer >= 2 or ``"all"``, exactly as given."""
    items = [v.strip() for v in values.split(",")] if isinstance(values, str) else list(values)
    parsed: list[int | str] = []
    for item in items:
        if item == "":
            continue
        if item == ALL:
            parsed.append(ALL)
            continue
        try:
            number = int(item) if isinstance(item, str) else item
        except ValueError:
            number = None
        if isinstance(number, bool) or not isinstance(number, (int, np.integer)) or number < 2:
            parsed = []
            break
        parsed.append(int(number))
    if not parsed:
        raise ValueError(f"--calibration-samples: expected integers >= 2 or 'all', got {values!r}")
    repeated = [v for v in dict.fromkeys(parsed) if parsed.count(v) > 1]
    if repeated:
        raise ValueError(
            f"--calibration-samples: expected each value once, got {repeated} more than once"
        )
    return tuple(parsed)


def compare(
    dataset: str = "digits",
    *,
    backends: Sequence[str] = BACKENDS,
    model: str = "mlp",
    batch_sizes: Sequence[int] = (2, 4, 8, 16, 32, 64, 128, 256),
    seeds: int | Sequence[int] = 5,
    epochs: Sequence[int] = (5,),
    lr: float = 0.1,
    strategies: str | list[str] | tuple[str, ...] = strategy_names.DEFAULT,
    shifts: str | list[str] | tuple[str, ...] = (shift_names.NONE,),
    calibration_batch_size: int | None = None,
    calibration_samples: str | Sequence[int | str] = (ALL,),
    train_modes: str | Sequence[str] = (train_mode_names.BATCHNORM,),
    test_batch_size: int | None = None,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
    timings: Timings | None = None,
) -> list[Record]:
    """Train BatchNorm networks and evaluate every strategy; return one record per
    backend, training mode, batch size, seed, training length, shift and strategy.

    ``seeds`` is a count (0..N-1) or the seeds themselves. ``shifts`` lists covariate shifts
    of the test set (``"none"``, the unshifted reference, is always evaluated first).
    ``test_batch_size`` is the batch size of ``batch`` at test time (default: the training
    batch size). ``calibration_samples`` lists how many training samples the exact pass
    takes (a random subset per network, drawn with ``numpy.random.default_rng(seed)``; the
    smaller subsets inside the larger ones), ``"all"`` the whole training set; each value
    gives its own records of every strategy. ``train_modes`` lists how networks train:
    ``"batchnorm"``, ``"renorm"`` / ``"renorm:<strategy>"`` (Batch Renormalization towards
    that running estimate) and ``"ghost:V"`` (Ghost BatchNorm), one network each.
    ``workers`` > 1 trains in that many processes (one task per network); the records do
    not depend on it. ``progress`` is called with a
    description of each finished network. A network that diverges, or Ctrl-C, raises
    :class:`IncompleteError` carrying the records of every network that finished and the
    reason for the others.
    """
    names = strategy_names.parse(strategies)
    sample_counts = calibration_sample_list(calibration_samples)
    shift_list = shift_names.parse(shifts)
    mode_list = train_mode_names.parse(train_modes)
    seed_values = seed_list(seeds)
    _check_integers("--batch-sizes", list(batch_sizes), 2)
    _check_integers("--epochs", list(epochs), 1)
    for option, value in (
        ("--calibration-batch-size", calibration_batch_size),
        ("--test-batch-size", test_batch_size),
    ):
        if value is not None:
            _check_integers(option, [value], 2)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"--lr: expected a positive finite learning rate, got {lr!r}")
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"--backend: expected torch, numpy or both, got {backend!r}")
    if model not in ("mlp", "cnn"):
        raise ValueError(f"--model: expected 'mlp' or 'cnn', got {model!r}")
    data = loaded(dataset)  # fail early, in this process, on a bad dataset
    shift_names.check(shift_list, data.image_shape, data.spatial, data.name)
    too_large = [b for b in batch_sizes if b > len(data.X_train)]
    if too_large:
        raise ValueError(
            f"--batch-sizes: expected at most the training set's {len(data.X_train)} samples "
            f"({data.name}), got {too_large}"
        )
    too_many = [c for c in sample_counts if c != ALL and int(c) > len(data.X_train)]
    if too_many:
        raise ValueError(
            f"--calibration-samples: expected at most the training set's {len(data.X_train)} "
            f"samples ({data.name}) or 'all', got {too_many}"
        )
    timings = timings if timings is not None else Timings()
    tasks = [
        _Network(
            dataset,
            backend,
            model,
            batch_size,
            seed,
            tuple(sorted(set(epochs))),
            float(lr),
            names,
            shift_list,
            calibration_batch_size or batch_size,
            sample_counts,
            test_batch_size or batch_size,
            mode,
        )
        for backend in backends
        for mode in mode_list
        for batch_size in sorted(batch_sizes)
        for seed in seed_values
    ]
    tasks.sort(key=lambda task: task.batch_size)  # the slowest (smallest batches) first
    return run_all(tasks, workers, timings, progress)


@attrs.frozen
class _Network:
    """One network of one backend, batch size and seed, and what to evaluate on it."""

    dataset: str
    backend: str
    model: str
    batch_size: int
    seed: int
    epochs: tuple[int, ...]
    lr: float
    names: tuple[str, ...]
    shifts: tuple[str, ...]
    calibration_batch_size: int
    calibration_samples: tuple[int | str, ...]
    test_batch_size: int
    train_mode: str

    def describe(self) -> str:
        trained = "" if self.train_mode == train_mode_names.BATCHNORM else f" {self.train_mode}"
        return f"{self.backend}{trained} b={self.batch_size} seed {self.seed}"

    def missing(self, reason: str) -> Missing:
        return Missing(self.backend, self.batch_size, self.seed, reason, self.train_mode)

    def run(self) -> tuple[list[Record] | Missing, dict[tuple[str, str], float]]:
        """The network's records, or why it has none."""
        timings = Timings()
        with one_thread(torch_too=self.backend == "torch"):
            try:
                return _one_network(self, loaded(self.dataset), timings), dict(timings.seconds)
            except DivergedError as error:
                reason = f"diverged: {error}"
            except (ValueError, FloatingPointError, OverflowError) as error:
                # what the engine raises on non-finite values, as training blows up
                reason = f"failed: {error}"
            return self.missing(reason), dict(timings.seconds)


@functools.lru_cache(maxsize=4)
def loaded(dataset: str) -> Dataset:
    """The dataset, loaded once per process for all its networks (none changes it: the
    records do not depend on how the networks are spread over processes, which
    tests/adapters/compare checks)."""
    return load(dataset)


def _one_network(task: _Network, data: Dataset, timings: Timings) -> list[Record]:
    started = time.perf_counter()
    backend, batch_size = task.backend, task.batch_size
    tracked = strategy_names.tracked(task.names)
    mode = train_mode_names.mode(task.train_mode)
    kind = NumpyRun if backend == "numpy" else TorchRun
    run: Run = kind(data, task.model, task.seed, tracked, mode)
    calibration = run.calibration_batches(task.calibration_batch_size)
    subsets = {
        samples: calibration_subset(len(data.X_train), samples, task.seed)
        for samples in task.calibration_samples
    }
    test_sets = {
        shift: shift_names.apply(shift, data.X_test, data.image_shape, task.seed)
        for shift in task.shifts
    }
    lr = task.lr * batch_size / REFERENCE_BATCH_SIZE
    timings.add(backend, "set-up", started)
    records: list[Record] = []
    done = 0
    for total in task.epochs:
        started = time.perf_counter()
        loss = run.train_epochs(total - done, batch_size, lr)
        done = total
        timings.add(backend, "training", started)
        _check_loss(loss, total, lr, data.num_classes)
        started = time.perf_counter()
        # Every distance is from the exact statistics of the whole training set.
        reference = run.statistics("exact", calibration)
        found: dict[tuple[str, int | str], Statistics | None] = {}
        accuracy: dict[tuple[str, int | str, str], float] = {}
        first = task.calibration_samples[0]
        for samples, rows in subsets.items():
            batches_used = calibration
            source = reference
            if rows is not None:
                batches_used = run.calibration_batches(task.calibration_batch_size, rows)
                source = run.statistics("exact", batches_used)
            for name in task.names:
                calibrated = name in strategy_names.CALIBRATED or strategy_names.is_test_time(name)
                if samples != first and not calibrated:  # the same statistics as for the first
                    found[(name, samples)] = found[(name, first)]
                    for shift in task.shifts:
                        accuracy[(name, samples, shift)] = accuracy[(name, first, shift)]
                    continue
                found[(name, samples)] = _evaluated(run, name, source, batches_used)
                for shift, X in test_sets.items():
                    if strategy_names.is_test_time(name) and source is not None:
                        run.use(source)  # each shift's adaptation starts from the source
                    accuracy[(name, samples, shift)] = run.accuracy(name, X, task.test_batch_size)
        run.restore_training_statistics()
        timings.add(backend, "evaluation", started)
        for samples in task.calibration_samples:
            for shift in task.shifts:
                for name in task.names:
                    records.append(
                        Record(
                            backend,
                            task.model,
                            data.name,
                            batch_size,
                            task.seed,
                            total,
                            task.train_mode,
                            name,
                            shift,
                            accuracy[(name, samples, shift)],
                            lr,
                            task.calibration_batch_size,
                            samples,
                            task.test_batch_size,
                            len(data.y_test),
                            ns.__version__,
                            *_distance(found[(name, samples)], reference),
                        )
                    )
    return records


def _evaluated(
    run: Run, name: str, source: Statistics | None, calibration: list[Any]
) -> Statistics | None:
    """Make ``name``'s statistics the layers' (``source`` for ``exact``, calibrated on
    ``calibration``) and return them; None for the strategies whose statistics change along
    the test set."""
    if strategy_names.is_test_time(name):
        return None
    if name == "exact":
        if source is not None:
            run.use(source)  # whatever strategy the layers held before
        return source
    return run.statistics(name, calibration)


def calibration_subset(n: int, samples: int | str, seed: int) -> np.ndarray[Any, Any] | None:
    """The training rows of an exact pass on ``samples`` of the ``n`` training samples, in
    their order in the training set: a random subset drawn with
    ``numpy.random.default_rng(seed)`` (each smaller one inside the larger ones); None for
    ``"all"``.

    >>> calibration_subset(10, 4, seed=0)
    array([2, 4, 6, 7])
    >>> calibration_subset(10, "all", seed=0) is None
    True
    """
    if samples == ALL:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n)[: int(samples)])


RUNAWAY = 10.0
"""A training loss above this many times ln(classes), the loss of a uniform guess, is taken
as divergence: a network that learns anything stays below ln(classes), and a blown-up one is
far above it (at lr 1000 on digits, 1e3 to 1e80)."""


def _check_loss(loss: float, epochs: int, lr: float, classes: int) -> None:
    """Raise :class:`DivergedError` when the last epoch's mean training loss says it blew up."""
    chance = math.log(classes)
    if not math.isfinite(loss) or loss > RUNAWAY * chance:
        raise DivergedError(
            f"mean training loss {loss:.3g} in epoch {epochs} at lr {lr:g}, above "
            f"{RUNAWAY:g} x ln({classes}) = {RUNAWAY * chance:.3g}; a smaller --lr may train"
        )


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
