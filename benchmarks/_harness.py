"""What the benchmarks share: thread pinning (one BLAS/OpenMP thread and one torch thread, so
that figures hold on a busy 2-core machine), the machine's name, and timing a step. Import
torch before pinning: threadpoolctl only limits pools that are already loaded."""

from __future__ import annotations

import gc
import os
import platform
import time
from collections.abc import Callable
from types import ModuleType

import threadpoolctl


def import_torch(script: str) -> ModuleType:
    """torch, or a clear exit saying how to install it."""
    try:
        import torch
    except ImportError as error:
        raise SystemExit(f"{script} needs torch ({error}); run `make install`") from None
    return torch


def pin_threads(torch: ModuleType | None) -> threadpoolctl.threadpool_limits:
    """Limit BLAS/OpenMP pools and torch to one thread; print what was pinned.

    The returned limiter must stay alive for the limits to hold.
    """
    limiter = threadpoolctl.threadpool_limits(limits=1)
    for pool in threadpoolctl.threadpool_info():
        library = os.path.basename(pool["filepath"])
        print(
            f"pinned: {pool['user_api']:<6} {pool['internal_api']:<8} {library:<44} "
            f"num_threads={pool['num_threads']}"
        )
    if torch is not None:
        torch.set_num_threads(1)
        print(
            f"pinned: torch.set_num_threads(1), torch.get_num_threads() = {torch.get_num_threads()}"
        )
    return limiter


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def seconds_per_step(
    step: Callable[[], object],
    loops: int,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], object] = lambda: None,
) -> float:
    """Seconds per call of ``step`` over ``loops`` calls, with the garbage collector paused;
    ``sync`` waits for queued work (an accelerator) before each reading of ``clock``."""
    gc.disable()
    try:
        sync()
        start = clock()
        for _ in range(loops):
            step()
        sync()
        return (clock() - start) / loops
    finally:
        gc.enable()
