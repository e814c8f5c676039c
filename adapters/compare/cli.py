"""The ``normstats`` command line: ``normstats compare [options]``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import strategies, train_modes
from .data import DatasetError


def _int_list(text: str, least: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < least:
        raise argparse.ArgumentTypeError(f"expected integers >= {least}, got {text!r}")
    if len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"expected each value once, got {text!r}")
    return values


def _one_int(text: str, least: int = 1) -> int:
    """One integer: a list is refused rather than cut to its first value."""
    if "," in text:
        raise argparse.ArgumentTypeError(f"expected one integer >= {least}, got a list {text!r}")
    return _int_list(text, least)[0]


def _positive(text: str) -> int:
    return _one_int(text)


def _batch_sizes(text: str) -> list[int]:
    """Batch sizes: BatchNorm needs two samples per batch to train."""
    return _int_list(text, least=2)


def _batch_size(text: str) -> int:
    return _one_int(text, least=2)


def _seeds(text: str) -> int | list[int]:
    """A count N (the seeds 0..N-1) or, with a comma, exactly the seeds listed (``7,`` is
    seed 7 alone)."""
    if "," in text:
        return _int_list(text, least=0)
    return _one_int(text)


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


EXTRAS = {
    "sklearn": ("scikit-learn", "compare"),
    "matplotlib": ("matplotlib", "compare"),
    "threadpoolctl": ("threadpoolctl", "compare"),
    "tqdm": ("tqdm", "compare"),
    "mnist1d": ("mnist1d", "compare"),
    "torch": ("torch", "torch"),
}
"""Module imported by a comparison: (the distribution that provides it, the extra that
installs it). The comparison imports them only once it runs, so ``normstats --help`` works
without them."""


def missing_extras(arguments: argparse.Namespace) -> str | None:
    """One line naming what the comparison asked for needs and lacks, and the install
    command; None when everything is installed."""
    modules = ["sklearn", "matplotlib", "threadpoolctl", "tqdm"]
    if arguments.dataset == "mnist1d":
        modules.append("mnist1d")
    if arguments.backend != "numpy":
        modules.append("torch")
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    names = ", ".join(EXTRAS[m][0] for m in missing)
    extras = ",".join(sorted({EXTRAS[m][1] for m in missing}))
    return f"normstats compare: {names} not installed; run: pip install 'normstats[{extras}]'"


def parser() -> argparse.ArgumentParser:
    import normstats

    top = argparse.ArgumentParser(
        prog="normstats",
        description="Streaming statistics and BatchNorm with pluggable population statistics.",
    )
    top.add_argument("--version", action="version", version=f"normstats {normstats.__version__}")
    commands = top.add_subparsers(dest="command", metavar="command")
    compare = commands.add_parser(
        "compare",
        help="train BatchNorm networks on real data and compare inference accuracy under "
        "every statistics strategy",
        description="Train BatchNorm networks and evaluate test accuracy with each strategy's "
        "population statistics, over batch sizes, seeds, training lengths, test-set shifts "
        "and backends.",
        epilog="strategies: exact, exact-layerwise (recalibration after training); cumulative, "
        "ema:<momentum> (as ema:0.1; ema:0.1:debias with bias correction), welford (tracked "
        "in training); batch (test batches' own statistics); adapt, prior:<N>, "
        "stream:<strategy> (test-time statistics from the exact ones, docs/test-time.md); a "
        "strategy class as module:Class. shifts: none, noise:<sigma>, contrast:<s> "
        "(x*(1-s)), offset:<s> (x+s), translate:<positions> (images and signals), applied to "
        "the standardized test set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    compare.add_argument(
        "--dataset", default="digits", help="'digits' (scikit-learn), 'mnist1d', or a .npz of X, y"
    )
    compare.add_argument(
        "--backend", default="both", choices=["torch", "numpy", "both"], help="what trains"
    )
    compare.add_argument(
        "--model", default="mlp", choices=["mlp", "cnn"], help="the network with BatchNorm"
    )
    compare.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=[2, 4, 8, 16, 32, 64, 128, 256],
        help="training batch sizes, comma-separated, each >= 2 and at most the training set",
    )
    compare.add_argument(
        "--seeds",
        type=_seeds,
        default=5,
        help="a count N (seeds 0..N-1) or, with commas, exactly the seeds listed (5,6,7; "
        "7, for seed 7 alone)",
    )
    compare.add_argument(
        "--epochs", type=_int_list, default=[5], help="training length; a list (5,20) sweeps it"
    )
    compare.add_argument(
        "--lr",
        type=_learning_rate,
        default=0.1,
        help="SGD learning rate at batch size 64; batch size b trains at lr*b/64",
    )
    compare.add_argument(
        "--strategies",
        default=",".join(strategies.DEFAULT),
        help="comma-separated strategy names (listed below), in table order",
    )
    compare.add_argument(
        "--shift",
        default="none",
        help="comma-separated covariate shifts NAME:SEVERITY of the test set (listed below); "
        "none, the unshifted reference, is always evaluated",
    )
    compare.add_argument(
        "--train-mode",
        default="batchnorm",
        help="comma-separated training modes, one network each: batchnorm, renorm (Batch "
        "Renormalization towards the EMA ema:0.1), renorm:<strategy> (towards that tracked "
        "strategy), ghost:<V> (Ghost BatchNorm, virtual batches of V samples)",
    )
    compare.add_argument(
        "--calibration-batch-size",
        type=_batch_size,
        default=None,
        help="batch size of the exact full pass (None: the training batch size)",
    )
    compare.add_argument(
        "--calibration-samples",
        default="all",
        help="training samples of the exact pass, comma-separated: integers >= 2 (a seeded "
        "random subset per network) or all (the whole training set); each value is evaluated",
    )
    compare.add_argument(
        "--test-batch-size",
        type=_batch_size,
        default=None,
        help="test batch size of the strategies that use test batches' statistics (batch) "
        "(None: the training batch size)",
    )
    compare.add_argument(
        "--out",
        type=Path,
        default=Path("results"),
        help="directory for results.json, results.csv and the plots (checked before training)",
    )
    compare.add_argument(
        "--workers",
        type=_positive,
        default=os.cpu_count() or 1,
        help="processes training in parallel (the default is this machine's CPU count)",
    )
    compare.add_argument(
        "--quiet", action="store_true", help="no progress, no files list, no timings: the table"
    )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    if arguments.command != "compare":
        parser().print_help()
        return 0 if arguments.command is None else 2
    missing = missing_extras(arguments)
    if missing is not None:
        print(missing, file=sys.stderr)
        return 2
    problem = unwritable(arguments.out)
    if problem is not None:
        print(f"normstats compare: --out: {problem}", file=sys.stderr)
        return 2
    try:
        return _compare(arguments)
    except (DatasetError, strategies.StrategyError, ValueError) as error:
        print(f"normstats compare: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("normstats compare: interrupted", file=sys.stderr)
        return 130


def unwritable(out: Path) -> str | None:
    """Why results could not be written to the directory ``out`` (None when they can), found
    without creating anything: ``out`` or its nearest existing parent must be a writable
    directory."""
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing == out and not out.is_dir():
        return f"expected a directory, got the existing file {out}"
    if not existing.is_dir():
        return f"cannot create {out}: {existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write to {out}: {existing} is not writable"
    return None


def _compare(arguments: argparse.Namespace) -> int:
    from . import report
    from .records import IncompleteError, Timings
    from .runner import compare, seed_list

    started = time.perf_counter()
    backends = ["torch", "numpy"] if arguments.backend == "both" else [arguments.backend]
    names = strategies.parse(arguments.strategies)
    timings = Timings()
    bar: Any = None
    progress: Callable[[str], None] | None = None
    if arguments.quiet:
        pass
    elif sys.stderr.isatty() and not os.environ.get("CI"):
        from tqdm import tqdm

        modes = len(train_modes.parse(arguments.train_mode))
        total = len(backends) * modes * len(arguments.batch_sizes) * len(seed_list(arguments.seeds))
        bar = tqdm(total=total, desc="networks", unit="net")

        def progress(_: str) -> None:
            bar.update(1)

    else:  # a log, as under make or CI: one line per finished network

        def progress(line: str) -> None:
            print(f"normstats compare: {line}", file=sys.stderr, flush=True)

    incomplete = None
    try:
        records = compare(
            arguments.dataset,
            backends=backends,
            model=arguments.model,
            batch_sizes=arguments.batch_sizes,
            seeds=arguments.seeds,
            epochs=arguments.epochs,
            lr=arguments.lr,
            strategies=names,
            shifts=arguments.shift,
            calibration_batch_size=arguments.calibration_batch_size,
            calibration_samples=arguments.calibration_samples,
            train_modes=arguments.train_mode,
            test_batch_size=arguments.test_batch_size,
            workers=arguments.workers,
            progress=progress,
            timings=timings,
        )
    except IncompleteError as stopped:
        incomplete, records = stopped, stopped.records
    finally:
        if bar is not None:
            bar.close()
    written_started = time.perf_counter()
    missing = incomplete.missing if incomplete is not None else []
    paths = report.write(records, arguments.out, missing)
    if incomplete is not None:
        print(
            f"normstats compare: {incomplete}; wrote the {len(records)} finished records and "
            f"the reason for each missing network to {paths[0]}",
            file=sys.stderr,
        )
        return 130 if incomplete.interrupted else 1
    print(report.table(records))
    if not arguments.quiet:
        print("wrote " + ", ".join(str(p) for p in paths))
        spent = ", ".join(
            f"{b} {phase} {s:.1f} s" for (b, phase), s in sorted(timings.seconds.items())
        )
        print(
            f"time (summed over {arguments.workers} worker processes): {spent}; reports "
            f"{time.perf_counter() - written_started:.1f} s; wall clock "
            f"{time.perf_counter() - started:.1f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
