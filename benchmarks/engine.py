"""Speed of normstats' NumPy BatchNorm engine against torch's native CPU BatchNorm.

Run with ``make bench`` (``.venv/bin/python benchmarks/engine.py``); it is not a test.

What is measured
----------------
Four batches, drawn once from ``np.random.default_rng(0)``: a dense (256, 512), an image
(32, 64, 16, 16) NCHW and a sequence (64, 32, 128) (N, C, L) batch in float32, and the image
batch again in float64. Every layer has float32 (float64) ``gamma`` and ``beta``, so nothing
is promoted. For each batch:

* train, normstats: one training step of ``ns.BatchNorm(C, stats="ema")``,
  ``layer.forward(x)`` then ``layer.backward(dy)``: batch statistics, the EMA update of the
  running statistics, and the exact gradient ``(dx, dgamma, dbeta)``.
* train, functional: ``functional.train_forward(x, gamma, beta)`` then
  ``functional.backward(dy, cache)``, the same arithmetic without the layer, so that the
  difference is the layer's overhead: input checks, the finiteness check, the EMA update,
  and keeping the step's cache (``x_hat``, the input's size) alive until the next step,
  which on large batches costs more in memory traffic than the Python does.
* train, torch: ``nn.BatchNorm1d/2d`` in training mode on the same data as tensors (the
  input with ``requires_grad``), ``y = bn(x)`` then ``y.backward(dy)``, the gradients of the
  input and the parameters set to None before each step so that nothing accumulates.
* eval: ``layer.forward(x)`` after ``layer.eval()`` (the EMA statistics of one training
  step) against ``bn(x)`` after ``bn.eval()`` under ``torch.no_grad()``.

Each figure is microseconds per step: a sample runs a candidate enough steps to last about
``SAMPLE_SECONDS``, all twenty candidates are interleaved within each repeat (and their
order rotated between repeats) so that noise on a busy machine hits them all alike,
and the best and the median sample are kept. Ratios are ``normstats / torch`` of the best
samples of this run: 1.00 is parity, 2.00 twice torch's time.

Threads are pinned to one (BLAS through threadpoolctl, torch through ``set_num_threads``):
torch parallelises BatchNorm over channels, NumPy's element-wise kernels never do, and the
question is what each engine costs per core, not how many idle cores the machine had.

Before timing, the outputs are checked against torch (largest absolute difference of
``y``, ``dx``, ``dgamma``, ``dbeta`` and the eval output), so that both sides compute the
same thing. The script ends with the target, "NumPy forward+backward within 2x of torch's
native CPU BatchNorm", judged per batch on the training-step ratio.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from _harness import import_torch, pin_threads, seconds_per_step

import normstats as ns
from normstats import functional

SEED = 0
SAMPLE_SECONDS = 0.03
"""Each timed sample runs one candidate for about this long (a whole number of steps)."""
TARGET_TRAIN = 2.0
"""normstats' training step must take at most this many times torch's."""


@dataclass(frozen=True)
class Case:
    """One benchmark input: its label, shape and dtype (the feature axis is 1)."""

    label: str
    shape: tuple[int, ...]
    dtype: type[np.floating[Any]]

    @property
    def channels(self) -> int:
        return self.shape[1]


CASES = (
    Case("dense (256, 512) f32", (256, 512), np.float32),
    Case("conv2d (32, 64, 16, 16) f32", (32, 64, 16, 16), np.float32),
    Case("conv1d (64, 32, 128) f32", (64, 32, 128), np.float32),
    Case("conv2d (32, 64, 16, 16) f64", (32, 64, 16, 16), np.float64),
)

KINDS = ("train normstats", "train functional", "train torch", "eval normstats", "eval torch")
"""The candidates timed for every case, in the order printed."""

Step = Callable[[], object]
"""One step of a candidate; it returns what it computed."""


@dataclass(frozen=True)
class Candidate:
    """A step to time: ``kind`` (one of ``KINDS``) on ``case``."""

    case: Case
    kind: str
    step: Step


@dataclass(frozen=True)
class Timing:
    """Microseconds per step: the best and the median sample."""

    best: float
    median: float


# -- set-up --------------------------------------------------------------------------------


def describe_machine(torch: ModuleType, repeats: int) -> None:
    """Print versions and the machine's load, so that a figure can be put in context."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load}")
    print(
        f"versions: python {platform.python_version()}, numpy {np.__version__}, "
        f"torch {torch.__version__}"
    )
    print(
        f"timing: {repeats} interleaved repeats of ~{SAMPLE_SECONDS * 1e3:g} ms samples per "
        "candidate; us per step, best (median)"
    )


def make_data(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """The input ``x`` (mean 1, std 2, so that normalizing does something) and ``dy``."""
    rng = np.random.default_rng(SEED)
    x = 1.0 + 2.0 * rng.standard_normal(case.shape, dtype=case.dtype)
    dy = rng.standard_normal(case.shape, dtype=case.dtype)
    return x, dy


def torch_layer(torch: ModuleType, case: Case) -> Any:
    """``nn.BatchNorm1d`` for (N, C) and (N, C, L), ``nn.BatchNorm2d`` for NCHW, in the dtype."""
    kind = torch.nn.BatchNorm2d if len(case.shape) == 4 else torch.nn.BatchNorm1d
    dtype = torch.float64 if case.dtype == np.float64 else torch.float32
    return kind(case.channels, dtype=dtype)


# -- candidates ----------------------------------------------------------------------------


def normstats_train(case: Case, x: np.ndarray, dy: np.ndarray) -> Step:
    """``layer.forward(x)`` then ``layer.backward(dy)`` of ``BatchNorm(C, stats="ema")``."""
    layer = ns.BatchNorm(case.channels, stats="ema", dtype=case.dtype)

    def step() -> object:
        layer.forward(x)
        return layer.backward(dy)

    return step


def functional_train(case: Case, x: np.ndarray, dy: np.ndarray) -> Step:
    """``train_forward`` then ``backward``, without the layer."""
    gamma = np.ones(case.channels, dtype=case.dtype)
    beta = np.zeros(case.channels, dtype=case.dtype)

    def step() -> object:
        _, _, cache = functional.train_forward(x, gamma, beta, axis=1)
        return functional.backward(dy, cache)

    return step


def torch_train(torch: ModuleType, case: Case, x: np.ndarray, dy: np.ndarray) -> Step:
    """``y = bn(x)`` then ``y.backward(dy)`` in training mode, gradients reset per step."""
    bn = torch_layer(torch, case).train()
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    dyt = torch.from_numpy(dy.copy())

    def step() -> object:
        xt.grad = bn.weight.grad = bn.bias.grad = None
        bn(xt).backward(dyt)
        return xt.grad

    return step


def normstats_eval(case: Case, x: np.ndarray, dy: np.ndarray) -> Step:
    """``layer.forward(x)`` in evaluation mode, after one training step."""
    layer = ns.BatchNorm(case.channels, stats="ema", dtype=case.dtype)
    layer.forward(x)
    layer.backward(dy)
    layer.eval()
    return lambda: layer.forward(x)


def torch_eval(torch: ModuleType, case: Case, x: np.ndarray, dy: np.ndarray) -> Step:
    """``bn(x)`` in evaluation mode under ``no_grad``, after one training step."""
    bn = torch_layer(torch, case).train()
    xt = torch.from_numpy(x.copy())
    bn(xt.requires_grad_(True)).backward(torch.from_numpy(dy.copy()))
    bn.eval()
    xt = xt.detach()

    def step() -> object:
        with torch.no_grad():
            return bn(xt)

    return step


def candidates_for(torch: ModuleType, case: Case) -> list[Candidate]:
    """The ``KINDS`` of ``case``, each with its own layer and a copy of the data."""
    x, dy = make_data(case)
    steps = {
        "train normstats": normstats_train(case, x, dy),
        "train functional": functional_train(case, x, dy),
        "train torch": torch_train(torch, case, x, dy),
        "eval normstats": normstats_eval(case, x, dy),
        "eval torch": torch_eval(torch, case, x, dy),
    }
    return [Candidate(case, kind, steps[kind]) for kind in KINDS]


# -- agreement -----------------------------------------------------------------------------


def max_difference(ours: Any, theirs: Any) -> float:
    """Largest absolute difference between a NumPy array and a tensor."""
    return float(np.max(np.abs(np.asarray(ours, dtype=np.float64) - theirs.double().numpy())))


def check_against_torch(torch: ModuleType, case: Case) -> float:
    """Largest absolute difference of one training step and one eval forward from torch's."""
    x, dy = make_data(case)
    layer = ns.BatchNorm(case.channels, stats="ema", dtype=case.dtype)
    bn = torch_layer(torch, case).train()
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    y = layer.forward(x)
    dx = layer.backward(dy)
    yt = bn(xt)
    yt.backward(torch.from_numpy(dy.copy()))
    layer.eval()
    bn.eval()
    with torch.no_grad():
        eval_t = bn(xt.detach())
    pairs = (
        (y, yt.detach()),
        (dx, xt.grad),
        (layer.grad_gamma, bn.weight.grad),
        (layer.grad_beta, bn.bias.grad),
        (layer.forward(x), eval_t),
    )
    return max(max_difference(ours, theirs) for ours, theirs in pairs)


# -- timing --------------------------------------------------------------------------------


def steps_per_sample(step: Step) -> int:
    """How many steps last about ``SAMPLE_SECONDS`` (after a warm-up step)."""
    step()
    start = time.perf_counter()
    step()
    elapsed = time.perf_counter() - start
    return max(1, math.ceil(SAMPLE_SECONDS / max(elapsed, 1e-7)))


def time_candidates(candidates: Sequence[Candidate], repeats: int) -> dict[tuple[str, str], Timing]:
    """Best and median microseconds per step of each candidate, interleaved and rotated."""
    gc.collect()
    gc.freeze()
    loops = [steps_per_sample(c.step) for c in candidates]
    samples: list[list[float]] = [[] for _ in candidates]
    order = list(range(len(candidates)))
    for repeat in range(repeats):
        shift = repeat % len(order)
        for i in order[shift:] + order[:shift]:
            samples[i].append(seconds_per_step(candidates[i].step, loops[i]))
    gc.unfreeze()
    return {
        (c.case.label, c.kind): Timing(min(s) * 1e6, statistics.median(s) * 1e6)
        for c, s in zip(candidates, samples, strict=True)
    }


# -- report --------------------------------------------------------------------------------


def timing_text(timing: Timing) -> str:
    return f"{timing.best:9.1f} ({timing.median:9.1f}) us"


def print_case(case: Case, us: dict[tuple[str, str], Timing]) -> None:
    """The case's lines: each candidate, and the ratios of normstats to torch."""
    t = {kind: us[(case.label, kind)] for kind in KINDS}
    torch_train_us, torch_eval_us = t["train torch"].best, t["eval torch"].best
    layer_us, functional_us = t["train normstats"].best, t["train functional"].best
    print()
    print(f"{case.label}  ({math.prod(case.shape):,} values, {case.channels} channels)")
    print(f"  {'train torch (fwd+bwd)':<28} {timing_text(t['train torch'])}")
    print(
        f"  {'train normstats (fwd+bwd)':<28} {timing_text(t['train normstats'])}   "
        f"normstats numpy / torch = {layer_us / torch_train_us:5.2f}"
    )
    print(
        f"  {'train functional (fwd+bwd)':<28} {timing_text(t['train functional'])}   "
        f"functional / torch = {functional_us / torch_train_us:5.2f}   "
        f"layer overhead {layer_us - functional_us:+.1f} us "
        f"({(layer_us / functional_us - 1) * 100:+.0f}%)"
    )
    print(f"  {'eval torch':<28} {timing_text(t['eval torch'])}")
    print(
        f"  {'eval normstats':<28} {timing_text(t['eval normstats'])}   "
        f"normstats numpy / torch = {t['eval normstats'].best / torch_eval_us:5.2f}"
    )


def verdict(met: bool) -> str:
    return "MET" if met else "NOT MET"


def print_targets(us: dict[tuple[str, str], Timing]) -> None:
    """The target per case, judged on the best training-step samples of this run."""
    parts = []
    for case in CASES:
        ratio = us[(case.label, "train normstats")].best / us[(case.label, "train torch")].best
        parts.append(f"{case.label}: {ratio:.2f}x {verdict(ratio <= TARGET_TRAIN)}")
    print()
    print(
        f"targets: NumPy forward+backward within {TARGET_TRAIN:g}x of torch's native CPU "
        "BatchNorm: " + "; ".join(parts)
    )


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11, help="timed samples per candidate")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch = import_torch("benchmarks/engine.py")
    limiter = pin_threads(torch)
    describe_machine(torch, args.repeats)

    for case in CASES:
        difference = check_against_torch(torch, case)
        print(f"check: {case.label:<28} normstats matches torch to {difference:.1e} (absolute)")

    candidates = [c for case in CASES for c in candidates_for(torch, case)]
    started = time.perf_counter()
    us = time_candidates(candidates, args.repeats)
    for case in CASES:
        print_case(case, us)
    print(f"\ntiming took {time.perf_counter() - started:.1f} s")
    print_targets(us)
    del limiter
    return 0


if __name__ == "__main__":
    sys.exit(main())
