"""The ``normstats`` command line: ``normstats compare [options]``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import strategies
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
    return values


def _positive(text: str) -> int:
    return _int_list(text)[0]


def _batch_sizes(text: str) -> list[int]:
    """Batch sizes: BatchNorm needs two samples per batch to train."""
    return _int_list(text, least=2)


def _batch_size(text: str) -> int:
    return _batch_sizes(text)[0]


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
    top = argparse.ArgumentParser(
        prog="normstats",
        description="Streaming statistics and BatchNorm with pluggable population statistics.",
    )
    commands = top.add_subparsers(dest="command", metavar="command")
    compare = commands.add_parser(
        "compare",
        help="train BatchNorm networks on real data and compare inference accuracy under "
        "every statistics strategy",
        description="Train BatchNorm networks and evaluate test accuracy with each strategy's "
        "population statistics, over batch sizes, seeds, training lengths and backends.",
    )
    compare.add_argument(
        "--dataset",
        default="digits",
        help="'digits' (scikit-learn, default), 'mnist1d', or a .npz with X and y",
    )
    compare.add_argument("--backend", default="both", choices=["torch", "numpy", "both"])
    compare.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    compare.add_argument(
        "--batch-sizes", type=_batch_sizes, default=[2, 4, 8, 16, 32, 64, 128, 256]
    )
    compare.add_argument("--seeds", type=_positive, default=5, help="seeds per configuration")
    compare.add_argument(
        "--epochs", type=_int_list, default=[5], help="training length; a list (5,20) sweeps it"
    )
    compare.add_argument(
        "--lr",
        type=float,
        default=0.1,
        help="SGD learning rate at batch size 64; scaled linearly with batch size",
    )
    compare.add_argument("--strategies", default=",".join(strategies.DEFAULT))
    compare.add_argument(
        "--calibration-batch-size",
        type=_batch_size,
        default=None,
        help="batch size of the exact full pass (default: the training batch size)",
    )
    compare.add_argument("--out", type=Path, default=Path("results"))
    compare.add_argument(
        "--workers",
        type=_positive,
        default=os.cpu_count() or 1,
        help="processes training in parallel (default: the CPU count)",
    )
    compare.add_argument("--quiet", action="store_true", help="no progress bars, table only")
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
    try:
        return _compare(arguments)
    except (DatasetError, strategies.StrategyError, ValueError) as error:
        print(f"normstats compare: {error}", file=sys.stderr)
        return 2


def _compare(arguments: argparse.Namespace) -> int:
    from . import report
    from .runner import Timings, compare

    started = time.perf_counter()
    backends = ["torch", "numpy"] if arguments.backend == "both" else [arguments.backend]
    names = strategies.parse(arguments.strategies)
    total = len(backends) * len(arguments.batch_sizes) * arguments.seeds
    show = not arguments.quiet and sys.stderr.isatty() and not os.environ.get("CI")
    progress = None
    if show:
        from tqdm import tqdm

        progress = tqdm(total=total, desc="networks", unit="net")
    timings = Timings()
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
            calibration_batch_size=arguments.calibration_batch_size,
            workers=arguments.workers,
            progress=progress,
            timings=timings,
        )
    finally:
        if progress is not None:
            progress.close()
    written_started = time.perf_counter()
    paths = report.write(records, arguments.out)
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
