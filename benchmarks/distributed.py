"""Training-step time of normstats' synchronized BatchNorm across processes, against baselines.

Run with ``make bench`` (``.venv/bin/python benchmarks/distributed.py``); it is not a test.
``--quick`` takes fewer samples.

What is measured, and why
-------------------------
``BatchNorm(C, stats=s, sync=True)`` merges every rank's batch moments in each training
forward (one differentiable all-gather of each rank's count, mean and M2, merged at once on
the device; the first step also compares the ranks' shapes) and normalizes with the global
statistics; its backward all-reduces the gradient of the gathered rows. It then folds the
global moments into its strategy, as SyncBatchNorm updates its running statistics. The plan
names torch's ``nn.SyncBatchNorm`` as the baseline, and this script measures it when it can
run. It cannot on CPU in the torch builds this project installs: its forward refuses tensors
that are not on a GPU (CUDA, XPU or a private-use accelerator), and the script prints the
error it got. On a CPU-only machine the baselines are then the nearest two that run, in the
same processes:

* (a) ``nn.BatchNorm2d`` without any synchronization: each rank normalizes with its own
  batch. The floor: the cost of a BatchNorm step with no cross-rank merge at all.
* (b) the same synchronization written directly with torch ops, the stand-in for
  ``nn.SyncBatchNorm``: ``torch.var_mean`` per rank, one differentiable all-gather of each
  rank's (count, mean, M2) row (its backward one all-reduce, as SyncBatchNorm's), the
  count-weighted merge of all rows at once, the affine folded into one scale and one shift
  per channel, ``y = x * scale + shift``, and the running statistics' EMA update that
  SyncBatchNorm does. Before timing, the script checks that (b) and normstats give the same
  outputs and input gradients as one process running ``nn.BatchNorm2d`` over the
  concatenated batch.

For context, not as a baseline, (c) times (b)'s two collectives alone (the all-gather of a
row and the all-reduce of its gradient): the latency every synchronized step pays, which
dominates the smaller shape; and (d) times ``BatchNorm(C, stats="batch", sync=True)``, the
same synchronization with no strategy to fold, which tells the cost of the synchronization
from that of the strategy's update.

Two ranks (``WORLD``) are started with ``torch.multiprocessing`` ("spawn"), joined through a
gloo process group over 127.0.0.1 (a ``TCPStore`` held by the parent), each pinned to one
thread (OpenMP/BLAS through threadpoolctl, torch through ``set_num_threads``). One step is
``y = layer(x)`` then ``y.backward(dy)`` with the gradients set to None first, on x of shape
(32, 64, 16, 16) float32 per rank (mean 1, std 2, ``requires_grad``; each rank its own), and
on (16, 32, 8, 8), where the collectives' latency dominates.

Every rank runs the candidates in the same order (collectives must match), interleaved
within each repeat and rotated between repeats so that noise hits them alike. A sample is a
few steps of one candidate, started on both ranks together (a barrier, outside the clock),
timed in wall time (``time.perf_counter``: waiting for the other rank inside a collective is
part of the cost), and counted as the slower of the two ranks' times. Figures are medians
over repeats; each ratio is the median over repeats of ``ours / baseline`` within the same
repeat. The process group has a timeout (``PG_TIMEOUT``) and the parent a watchdog
(``--timeout``) that ends the ranks: nothing can hang.

The script ends with the target (a synchronized training step <= 1.1x SyncBatchNorm's),
judged on the worse strategy and shape against SyncBatchNorm where it ran, else against its
stand-in (b), saying which. NCCL with ``nn.SyncBatchNorm`` on two GPUs is the comparison that
matters for GPU training; the script detects whether the machine could run it and says so,
but it measures the CPU/gloo path only.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import platform
import queue
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import threadpoolctl
from _harness import cpu_name, seconds_per_step

try:
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
except ImportError as missing:
    raise SystemExit(
        f"benchmarks/distributed.py needs torch ({missing}); run `make install`"
    ) from None

WORLD = 2
SHAPES = ((32, 64, 16, 16), (16, 32, 8, 8))
SEED = 0
STRATEGIES = ("welford", "ema")
PLAIN = "(a) nn.BatchNorm2d"
DIRECT = "(b) direct torch sync"
SYNC_BN = "nn.SyncBatchNorm"
COMM = "(c) collectives only"
"""Not a baseline: (b)'s all-gather and backward all-reduce alone, the latency in every step."""
ALONE = "(d) normstats batch"
"""Not a candidate: ``stats="batch"``, normstats' synchronization with no running statistics
to fold, which tells the cost of the synchronization from that of the strategy's fold."""

PG_TIMEOUT = 30.0
"""Seconds any collective (and the rendezvous) may wait before the process group fails."""
WATCHDOG = 100.0
"""Seconds the parent waits for the ranks before it ends them (``--timeout``)."""

TARGET = 1.1
"""A synchronized training step may take this many times SyncBatchNorm's (or its stand-in)."""


@dataclass(frozen=True)
class Sampling:
    """Repeats per shape, and the time one sample lasts (at least one step)."""

    repeats: int
    seconds: float


DEFAULT = Sampling(repeats=60, seconds=0.02)
QUICK = Sampling(repeats=15, seconds=0.01)

Step = Callable[[], object]


# -- the parent: set-up, ranks, report -------------------------------------------------------


def describe_machine(sampling: Sampling) -> None:
    """Print the machine, its load, the versions and what could run the GPU comparison."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load average {load}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nccl = dist.is_available() and dist.is_nccl_available()
    if gpus >= WORLD and nccl:
        print(
            f"nccl: {gpus} CUDA GPUs and NCCL are available, but this script measures the "
            "CPU/gloo path only; the NCCL comparison with nn.SyncBatchNorm is not run"
        )
    else:
        print(
            f"nccl: not available here ({gpus} CUDA GPU(s), NCCL "
            f"{'built' if nccl else 'not built'}); the GPU comparison (NCCL, nn.SyncBatchNorm, "
            f"{WORLD} GPUs) is not run"
        )
    print(
        f"ranks: {WORLD} processes (torch.multiprocessing, spawn), gloo over 127.0.0.1, "
        f"process-group timeout {PG_TIMEOUT:g} s"
    )
    print(
        f"timing: {sampling.repeats} interleaved repeats per shape of ~{sampling.seconds * 1e3:g}"
        " ms samples, wall clock, each sample the slower rank's; us per step are medians, "
        "ratios medians of per-repeat ratios"
    )


def start_store() -> Any:
    """The rendezvous store, served by the parent on a free port of 127.0.0.1."""
    return dist.TCPStore(
        "127.0.0.1",
        0,
        is_master=True,
        timeout=datetime.timedelta(seconds=PG_TIMEOUT),
        wait_for_workers=False,
    )


def stop(context: Any) -> None:
    """End the ranks this script started, each by its own process handle."""
    for process in context.processes:
        if process.is_alive():
            process.terminate()
    for process in context.processes:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)


def run_ranks(sampling: Sampling, timeout: float) -> dict[int, dict[str, Any]]:
    """Start the ranks, collect each one's report, join them; end them all on any failure."""
    store = start_store()
    spawn = mp.get_context("spawn")
    reports: Any = spawn.Queue()
    context = mp.start_processes(
        rank_main,
        args=(WORLD, store.port, sampling, reports),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    received: dict[int, dict[str, Any]] = {}
    try:
        while len(received) < WORLD:
            try:
                rank, report = reports.get(timeout=0.5)
                received[rank] = report
            except queue.Empty:
                context.join(timeout=0)  # raises at once if a rank failed
            if len(received) < WORLD and time.monotonic() > deadline:
                raise TimeoutError(f"the ranks did not report within {timeout:g} s")
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ranks did not exit within {timeout:g} s")
    except BaseException:
        stop(context)
        raise
    del store
    return received


def per_sample_max(
    reports: dict[int, dict[str, Any]], shape: tuple[int, ...]
) -> dict[str, list[float]]:
    """Each candidate's samples of ``shape``, each the slower of the ranks' times."""
    key = str(shape)
    labels = reports[0]["samples"][key]
    return {
        label: [
            max(times)
            for times in zip(*(reports[r]["samples"][key][label] for r in reports), strict=True)
        ]
        for label in labels
    }


def median_ratio(samples: dict[str, list[float]], label: str, baseline: str) -> float:
    """Median over repeats of ``label / baseline`` within the same repeat."""
    pairs = zip(samples[label], samples[baseline], strict=True)
    return statistics.median(ours / theirs for ours, theirs in pairs)


def print_shape(shape: tuple[int, ...], samples: dict[str, list[float]], reference: str) -> None:
    print()
    print(f"train step (forward + backward), x {shape} float32 per rank, {WORLD} ranks")
    baselines = [label for label in (SYNC_BN, DIRECT, PLAIN) if label in samples]
    for label in baselines:
        print(f"  {label:<24} {statistics.median(samples[label]) * 1e6:9.1f} us")
    print(
        f"  {COMM:<24} {statistics.median(samples[COMM]) * 1e6:9.1f} us   "
        "(not a baseline: the latency of (b)'s all-gather and all-reduce alone)"
    )
    print(
        f"  {ALONE:<24} {statistics.median(samples[ALONE]) * 1e6:9.1f} us   "
        f"/ (b) = {median_ratio(samples, ALONE, DIRECT):5.3f}   (the synchronization without "
        "a strategy's fold)"
    )
    for name in STRATEGIES:
        label = f"normstats {name}"
        ratios = "   ".join(
            f"/ {base.split()[0] if base != SYNC_BN else base} = "
            f"{median_ratio(samples, label, base):5.3f}"
            for base in baselines
        )
        print(f"  {label:<24} {statistics.median(samples[label]) * 1e6:9.1f} us   {ratios}")
    print(f"  (target <= {TARGET:g}x {reference})")


def print_checks(reports: dict[int, dict[str, Any]]) -> None:
    """The largest differences each rank found, before timing, and the running statistics."""
    worst: dict[str, float] = {}
    for report in reports.values():
        for key, value in report["checks"].items():
            worst[key] = max(worst.get(key, 0.0), value)
    print()
    print(
        "check: largest |difference| from one process running nn.BatchNorm2d over the "
        "concatenated batch (output, input gradient), over ranks and shapes:"
    )
    for label in (*(f"normstats {name}" for name in STRATEGIES), ALONE, DIRECT):
        print(
            f"  {label:<24} output {worst[label + ' output']:.1e}   "
            f"input gradient {worst[label + ' grad']:.1e}"
        )
    print(
        "check: after timing, running statistics differ across ranks by at most "
        f"{worst['running statistics across ranks']:.1e}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sampling = QUICK if args.quick else DEFAULT
    if args.repeats is not None:
        sampling = Sampling(args.repeats, sampling.seconds)
    describe_machine(sampling)
    if not dist.is_available() or not dist.is_gloo_available():
        print("\ntorch.distributed with gloo is not available in this torch build: nothing to do")
        return 0

    started = time.perf_counter()
    try:
        reports = run_ranks(sampling, args.timeout)
    except TimeoutError as error:
        print(f"\nerror: {error}; the ranks were ended")
        return 1
    first = reports[0]
    print(f"pinned: {first['threads']}")
    if first["sync_bn_error"] is None:
        reference = SYNC_BN
        print(f"\n{SYNC_BN}: runs on CPU with gloo here; it is the baseline of the target")
    else:
        reference = f"{DIRECT}, the stand-in for {SYNC_BN}"
        print(f"\n{SYNC_BN}: cannot run here: {first['sync_bn_error']}")
        print(f"  the target is judged against {DIRECT}; {PLAIN} is the unsynchronized floor")
    baseline = SYNC_BN if first["sync_bn_error"] is None else DIRECT

    worst: tuple[float, str] = (-math.inf, "")
    for shape in SHAPES:
        samples = per_sample_max(reports, shape)
        print_shape(shape, samples, reference)
        for name in STRATEGIES:
            ratio = median_ratio(samples, f"normstats {name}", baseline)
            worst = max(worst, (ratio, f"{name}, x {shape}"))
    print_checks(reports)
    print(f"\ntiming took {time.perf_counter() - started:.1f} s (wall, with start-up)")

    ratio, where = worst
    print()
    print(
        f"targets: sync train step <= {TARGET:g}x {SYNC_BN}: "
        f"{ratio:.3f}x {'MET' if ratio <= TARGET else 'NOT MET'} against {reference} "
        f"(worst: {where})"
    )
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per shape")
    parser.add_argument(
        "--timeout", type=float, default=WATCHDOG, help="seconds before the ranks are ended"
    )
    return parser.parse_args(argv)


# -- the ranks -----------------------------------------------------------------------------------


def rank_main(rank: int, world: int, port: int, sampling: Sampling, reports: Any) -> None:
    """One rank: join the group, check the candidates, time them, report to the parent."""
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # talk over 127.0.0.1
    with threadpoolctl.threadpool_limits(limits=1):
        torch.set_num_threads(1)
        timeout = datetime.timedelta(seconds=PG_TIMEOUT)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
        try:
            reports.put((rank, measure(sampling)))
        finally:
            dist.destroy_process_group()


def measure(sampling: Sampling) -> dict[str, Any]:
    """This rank's report: the probe of SyncBatchNorm, the checks, the samples, the threads."""
    rank = dist.get_rank()
    sync_bn_error = probe_sync_batchnorm()
    checks: dict[str, float] = {}
    samples: dict[str, dict[str, list[float]]] = {}
    spread = "running statistics across ranks"
    for shape in SHAPES:
        x, dy = make_input(shape, rank)
        for key, value in check_candidates(x, dy).items():
            checks[key] = max(checks.get(key, 0.0), value)
        candidates, ours = make_candidates(x, dy, sync_bn_error is None)
        samples[str(shape)] = time_candidates(candidates, sampling)
        checks[spread] = max(checks.get(spread, 0.0), running_spread(ours))
    pools = {pool["internal_api"]: pool["num_threads"] for pool in threadpoolctl.threadpool_info()}
    threads = f"torch.get_num_threads() = {torch.get_num_threads()} in each rank" + "".join(
        f", {api} {n}" for api, n in sorted(pools.items())
    )
    return {
        "sync_bn_error": sync_bn_error,
        "checks": checks,
        "samples": samples,
        "threads": threads,
    }


def probe_sync_batchnorm() -> str | None:
    """``None`` if ``nn.SyncBatchNorm`` takes a CPU training step here, else its error.

    Every rank gets the same answer (the refusal comes before any collective), so the
    candidates, and with them the collectives, stay the same on every rank.
    """
    layer = torch.nn.SyncBatchNorm(4)
    x = torch.randn(8, 4, 3, 3, requires_grad=True)
    try:
        layer(x).sum().backward()
    except (ValueError, RuntimeError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def make_input(shape: tuple[int, ...], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``x`` (mean 1, std 2, its own values) and ``dy``."""
    generator = torch.Generator().manual_seed(SEED + 1000 * rank + sum(shape))
    x = 1.0 + 2.0 * torch.randn(shape, generator=generator)
    dy = torch.randn(shape, generator=generator)
    return x, dy


def make_layer(label: str, channels: int) -> torch.nn.Module:
    from normstats.adapters.torch import BatchNorm

    if label == PLAIN:
        return torch.nn.BatchNorm2d(channels)
    if label == DIRECT:
        return DirectSyncBatchNorm(channels)
    if label == SYNC_BN:
        return torch.nn.SyncBatchNorm(channels)
    return BatchNorm(channels, stats=label.split()[-1], sync=True)


def training_step(layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Step:
    """``layer(x).backward(dy)``, the gradients of the input and parameters reset first."""

    def step() -> object:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(dy)
        return x.grad

    return step


def collectives_step(channels: int) -> Step:
    """(b)'s communication alone: the all-gather of a (count, mean, M2) row, and the
    all-reduce of its gradient."""
    row = torch.ones(1 + 2 * channels, requires_grad=True)

    def step() -> object:
        row.grad = None
        GatherRows.apply(row).sum().backward()
        return row.grad

    return step


def make_candidates(
    x: torch.Tensor, dy: torch.Tensor, with_sync_bn: bool
) -> tuple[list[tuple[str, Step]], list[torch.nn.Module]]:
    """The steps to time (the same list on every rank) and normstats' layers."""
    x = x.clone().requires_grad_(True)
    labels = [*(f"normstats {name}" for name in STRATEGIES), ALONE, DIRECT, PLAIN]
    if with_sync_bn:
        labels.append(SYNC_BN)
    layers = {label: make_layer(label, x.shape[1]) for label in labels}
    steps = [(label, training_step(layer, x, dy)) for label, layer in layers.items()]
    steps.append((COMM, collectives_step(x.shape[1])))
    ours = [layers[f"normstats {name}"] for name in STRATEGIES]
    return steps, ours


def check_candidates(x: torch.Tensor, dy: torch.Tensor) -> dict[str, float]:
    """Largest differences of each synchronized candidate's output and input gradient from
    one process running ``nn.BatchNorm2d`` over every rank's batch (``dy`` likewise)."""
    every_x, every_dy = torch.cat(gather(x)), torch.cat(gather(dy))
    rank, n = dist.get_rank(), x.shape[0]
    whole = every_x.clone().requires_grad_(True)
    reference = torch.nn.BatchNorm2d(x.shape[1])(whole)
    reference.backward(every_dy)
    mine = slice(rank * n, (rank + 1) * n)  # every rank has the same batch size here
    expected_y, expected_grad = reference[mine].detach(), whole.grad[mine]
    found: dict[str, float] = {}
    for label in (*(f"normstats {name}" for name in STRATEGIES), ALONE, DIRECT):
        layer = make_layer(label, x.shape[1])
        local = x.clone().requires_grad_(True)
        y = layer(local)
        y.backward(dy)
        found[label + " output"] = float((y.detach() - expected_y).abs().max())
        found[label + " grad"] = float((local.grad - expected_grad).abs().max())
    return found


def running_spread(layers: Sequence[torch.nn.Module]) -> float:
    """Largest difference of the layers' running statistics between ranks."""
    spread = 0.0
    for layer in layers:
        for buffer in (layer.running_mean, layer.running_var):
            rows = torch.stack(gather(buffer))
            spread = max(spread, float((rows - rows[0]).abs().max()))
    return spread


def gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape on all ranks), in rank order (no gradient)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return parts


def time_sample(step: Step, loops: int) -> float:
    """Seconds per step over ``loops`` steps, started on every rank together."""
    dist.barrier()
    return seconds_per_step(step, loops)


def steps_per_sample(step: Step, seconds: float) -> int:
    """Steps that last about ``seconds`` (at least one), the same number on every rank."""
    step()
    step()
    elapsed = time_sample(step, 2)
    loops = torch.tensor([max(1, round(seconds / max(elapsed, 1e-7)))])
    dist.all_reduce(loops, op=dist.ReduceOp.MAX)
    return int(loops)


def time_candidates(
    candidates: Sequence[tuple[str, Step]], sampling: Sampling
) -> dict[str, list[float]]:
    """One sample per candidate per repeat, interleaved, rotated the same way on every rank."""
    gc.collect()
    gc.freeze()
    try:
        loops = [steps_per_sample(step, sampling.seconds) for _, step in candidates]
        samples: list[list[float]] = [[] for _ in candidates]
        order = list(range(len(candidates)))
        for repeat in range(sampling.repeats):
            shift = repeat % len(order)
            for i in order[shift:] + order[:shift]:
                samples[i].append(time_sample(candidates[i][1], loops[i]))
    finally:
        gc.unfreeze()
    return {label: s for (label, _), s in zip(candidates, samples, strict=True)}


# -- baseline (b): the synchronization written directly ----------------------------------------


class GatherRows(torch.autograd.Function):
    """All-gather of one row per rank; its backward all-reduces the gathered rows' gradient
    and hands each rank its own row's part (as SyncBatchNorm's backward all-reduces)."""

    @staticmethod
    def forward(ctx: Any, row: torch.Tensor) -> torch.Tensor:
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(row) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, row.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total[ctx.rank]


class DirectSyncBatchNorm(torch.nn.Module):
    """SyncBatchNorm's training step with torch ops: per-rank ``var_mean``, one all-gather of
    (count, mean, M2), the count-weighted merge, ``x * scale + shift``, and the EMA of the
    running statistics. Training mode only; every rank must have a non-empty batch."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = torch.nn.Parameter(torch.ones(channels))
        self.bias = torch.nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        count = x.numel() // channels
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        row = torch.cat([mean.new_full((1,), float(count)), mean, var * count])
        rows = GatherRows.apply(row)
        counts, means, m2s = rows[:, :1], rows[:, 1 : 1 + channels], rows[:, 1 + channels :]
        total = counts.sum()
        global_mean = (counts * means).sum(0) / total
        m2 = m2s.sum(0) + (counts * (means - global_mean) ** 2).sum(0)
        scale = self.weight * torch.rsqrt(m2 / total + self.eps)
        shift = self.bias - global_mean * scale
        shape = [1, channels] + [1] * (x.dim() - 2)
        with torch.no_grad():
            self.running_mean.lerp_(global_mean, self.momentum)
            self.running_var.lerp_(m2 / (total - 1), self.momentum)
        return x * scale.view(shape) + shift.view(shape)


if __name__ == "__main__":
    sys.exit(main())
