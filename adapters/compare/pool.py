"""Running the comparison's networks: in this process or in a pool of worker processes.

Each network is one task. A task that fails (it diverged) comes back as a
:class:`~normstats.adapters.compare.records.Missing` with its reason, and Ctrl-C stops every
worker at once; either way the records of every finished network are kept and
:class:`~normstats.adapters.compare.records.IncompleteError` carries them with the reasons
for the others. Every network trains on one BLAS and one torch thread, wherever it runs, so
its records do not depend on the number of workers.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from .records import IncompleteError, Missing, Record, Timings

Outcome = list[Record] | Missing
Spent = dict[tuple[str, str], float]


class Task(Protocol):
    """One network to train and evaluate (picklable, to run in a worker process)."""

    def run(self) -> tuple[Outcome, Spent]:
        """Its records, or why it has none, and the seconds spent by backend and phase."""
        ...

    def describe(self) -> str:
        """A few words naming the network, for progress lines."""
        ...

    def missing(self, reason: str) -> Missing:
        """The record of its absence."""
        ...


def run_all(
    tasks: Sequence[Task],
    workers: int,
    timings: Timings,
    progress: Callable[[str], None] | None = None,
) -> list[Record]:
    """Every task's records, in the order of ``tasks``; :class:`IncompleteError` when some
    network did not finish (a failure, or Ctrl-C), with the records of those that did."""
    found: dict[int, Outcome] = {}
    try:
        for index, outcome, spent in _outcomes(tasks, workers):
            found[index] = outcome
            for key, seconds in spent.items():
                timings.seconds[key] += seconds
            if progress is not None:
                what = outcome.reason if isinstance(outcome, Missing) else "done"
                progress(f"[{len(found)}/{len(tasks)}] {tasks[index].describe()}: {what}")
    except KeyboardInterrupt:
        _raise_incomplete(tasks, found, interrupted=True)
    if any(isinstance(outcome, Missing) for outcome in found.values()):
        _raise_incomplete(tasks, found, interrupted=False)
    return _ordered(tasks, found)


def _ordered(tasks: Sequence[Task], found: dict[int, Outcome]) -> list[Record]:
    records: list[Record] = []
    for index in range(len(tasks)):
        outcome = found.get(index)
        if isinstance(outcome, list):
            records += outcome
    return records


def _raise_incomplete(tasks: Sequence[Task], found: dict[int, Outcome], interrupted: bool) -> None:
    missing = [o for o in found.values() if isinstance(o, Missing)]
    missing += [
        task.missing("not run: the comparison was interrupted")
        for index, task in enumerate(tasks)
        if index not in found
    ]
    raise IncompleteError(_ordered(tasks, found), missing, interrupted) from None


def _outcomes(tasks: Sequence[Task], workers: int) -> Iterator[tuple[int, Outcome, Spent]]:
    """Each task's index and outcome as it finishes, here or in ``workers`` processes."""
    if workers <= 1:
        for index, task in enumerate(tasks):
            yield (index, *task.run())
        return
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers, initializer=_ignore_interrupts)
    try:
        yield from pool.imap_unordered(_run_task, enumerate(tasks))
        pool.close()
    finally:
        pool.terminate()  # at once on Ctrl-C or an error; after close, once every task is done
        pool.join()


def _ignore_interrupts() -> None:
    """In a worker: Ctrl-C is the parent's to handle (it stops the workers and reports)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_task(item: tuple[int, Task]) -> tuple[int, Outcome, Spent]:
    index, task = item
    return (index, *task.run())


@contextlib.contextmanager
def one_thread(torch_too: bool) -> Iterator[None]:
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
