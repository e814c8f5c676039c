"""Speed of normstats' PyTorch BatchNorm and recalibration against torch's own BatchNorm.

Run with ``make bench`` (``.venv/bin/python benchmarks/torch_bn.py``); it is not a test.
``--quick`` takes fewer samples; ``--profile`` adds a torch-profiler count of the operators
that one training step of each layer runs beyond torch's.

What is measured, and why
-------------------------
``normstats.adapters.torch.BatchNorm`` is meant as a drop-in for ``nn.BatchNorm2d``: it runs
torch's fused kernel once and folds the batch moments into its strategy with a few dozen
small float64 operations on 64-element tensors. Each is cheap next to the kernel but not
free (a dispatch through torch, microseconds on CPU, a kernel launch on CUDA), so this
script measures what they cost where it matters, in a training loop and after it:

* user: in the train and network groups, also Welford's rule run as a user's strategy would
  be (a subclass that keeps the protocol's default fold, a loop of ``step`` over the 64
  pending batches, instead of the built-in closed form): what plugging in one's own strategy
  costs, next to the same rule folded the built-in way.
* train: one step, ``y = layer(x)`` then ``y.backward(dy)``, of ``BatchNorm(64, stats=s)``
  for s in "ema", "cumulative", "welford" and "exact" against ``nn.BatchNorm2d(64)`` in
  training mode, on x of shape (32, 64, 32, 32) float32 (mean 1, std 2, ``requires_grad``)
  and a fixed ``dy``; the gradients are set to None before every step.
* small-batch modes, in the train group: the same step with Batch Renormalization
  (``renorm=True``, "ema" during a warm-up of ``RENORM_WARMUP`` steps, which the timed
  steps never leave, and "welford") and Ghost BatchNorm (``virtual_batch_size=4``, 8
  virtual batches of 4 samples): what they add to a training step. Renorm scales and shifts
  the normalized batch in place (one more elementwise pass) and folds every step; ghost runs
  the kernel (and its backward) once per virtual batch, into slices of one output.
* network: one SGD step (zero_grad, forward, cross-entropy, backward, ``optimizer.step()``)
  of a small network where eager PyTorch is dispatch-bound, ``NETWORK_BLOCKS`` conv-BN-ReLU
  blocks of ``NETWORK_WIDTH`` channels on a batch of ``NETWORK_INPUT`` (4 images of 8 x 8),
  global pooling and a linear head; torch's network against the same network converted
  with ``convert(model, stats=s)``. Here the few operators a BatchNorm adds per step are a
  visible share of the step, as every operator is a kernel launch on a GPU.
* operators: top-level aten operators (those with no aten operator above them) that one
  training forward of each layer issues, counted by ``torch.profiler`` over
  ``AMORTIZED_STEPS`` consecutive forwards and divided by their number, so that work done
  once every so many steps is shared among them. ``nn.BatchNorm2d`` issues 2 (the kernel
  and the increment of ``num_batches_tracked``).
* eval: ``layer(x)`` under ``torch.no_grad()`` after ``layer.eval()``, each layer having
  first taken a few training steps ("exact", which keeps no statistics in training, is
  recalibrated on a few batches instead), against ``nn.BatchNorm2d`` the same way.
* recalibrate: a small CNN of ``BLOCKS`` conv-BN-ReLU blocks of ``WIDTH`` channels (so L =
  ``BLOCKS`` BatchNorm layers) on (16, 3, 32, 32) inputs, converted with
  ``convert(model, stats="exact")``, over a list of ``CALIBRATION_BATCHES`` batches:
  ``recalibrate(model, data)`` (one pass) and ``recalibrate(model, data, layerwise=True)``
  against the same CNN unconverted (``nn.BatchNorm2d``) in evaluation mode, one
  ``torch.no_grad()`` forward over the same batches (the plain pass). Layer by layer, pass k
  stops after the k-th BatchNorm, so the L passes cost about (L + 1) / 2 forwards. For
  reference (not a target), the unconverted CNN in training mode under ``no_grad``: torch's
  own batch-statistics forward, the least a one-pass recalibration could cost.

Every candidate of a group runs in the same process on the same tensors; a sample runs it
for about the group's sample time and at least one step (the training groups: a multiple of
``AMORTIZED_STEPS`` steps, so that every sample carries its share of what a layer does once
every so many steps), the candidates are interleaved
within each repeat (their order rotated between repeats) so that noise hits them alike, and
each ratio is the median over repeats of ``ours / torch`` taken within the same repeat. A
second ``nn.BatchNorm2d`` (the control) is timed as one more candidate in the layer groups:
its ratio to the first, 1.00 but for noise, shows how far this run's ratios can be trusted.
On CPU the clock is the process's CPU time (``time.process_time``): on a busy machine the
time this process waits for a core is not its cost. On CUDA it is wall time
(``time.perf_counter``) with every sample bracketed by ``torch.cuda.synchronize()``.

On CUDA the two training groups run three times: in float32, under ``torch.autocast``
(float16), and with channels-last activations (``--device`` picks one device).

Threads are pinned to one (OpenMP/BLAS through threadpoolctl, torch through
``set_num_threads``): the question is what the adapter costs per core, not how many idle
cores the machine had. The script ends with the targets per device (training step of the
layer <= 1.02x torch, of the small network <= 1.05x, <= 4 top-level operators per training
forward, evaluation <= 1.02x, one-pass recalibration <= 1.2x the plain pass, layer by layer
<= 0.6 (L + 1)x, a small-batch mode's training step <= 1.25x), judged on the worst strategy
(mode), and whether this run met them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from _harness import cpu_name, import_torch, pin_threads, seconds_per_step

STRATEGIES = ("ema", "cumulative", "welford", "exact")
USER = "welford as user"
"""Welford's rule as a user's strategy runs in the layer: the same step, folded by the
protocol's default loop of steps instead of the built-in closed form (reported beside the
built-in strategies, not judged against their targets)."""
RENORM_WARMUP = 100_000
"""Steps of the timed renorm layer's warm-up: its limits are computed on the device at every
step (the costlier case)."""
SMALL_BATCH = {
    "renorm ema": {"stats": "ema", "renorm": True, "renorm_warmup": RENORM_WARMUP},
    "renorm welford": {"stats": "welford", "renorm": True},
    "ghost:4 ema": {"stats": "ema", "virtual_batch_size": 4},
}
"""The small-batch training modes, by label: the layer's arguments."""
TORCH = "nn.BatchNorm2d"
"""The baseline's label in every group."""
CONTROL = "control"
"""A second ``nn.BatchNorm2d``, timed as a candidate: its ratio is the run's noise floor."""
ONE_PASS = "one pass"
LAYERWISE = "layerwise"
BATCH_STATS = "batch-stat pass"
"""The reference of the recalibration group: torch's CNN in training mode under no_grad."""

SHAPE = (32, 64, 32, 32)
SEED = 0
WARMUP_STEPS = 3
"""Training steps every layer takes before it is timed in evaluation mode."""

BLOCKS = 4
WIDTH = 32
CNN_INPUT = (16, 3, 32, 32)
CALIBRATION_BATCHES = 8

NETWORK_BLOCKS = 8
NETWORK_WIDTH = 32
NETWORK_INPUT = (4, 3, 8, 8)
NETWORK_CLASSES = 10
AMORTIZED_STEPS = 64
"""Training steps over which per-step costs are amortized (samples are multiples of it)."""

TARGET_TRAIN = 1.02
TARGET_NETWORK = 1.05
TARGET_OPERATORS = 4
TARGET_EVAL = 1.02
TARGET_ONE_PASS = 1.2
TARGET_LAYERWISE = 0.6
"""Layer by layer may take this many times (L + 1) plain passes."""
TARGET_SMALL_BATCH = 1.25

Step = Callable[[], object]
"""One step of a candidate; it returns what it computed."""
Clock = Callable[[], float]


@dataclass(frozen=True)
class Sampling:
    """How one group is sampled: repeats, the time one sample lasts (at least one step), and
    the multiple of steps a sample runs."""

    repeats: int
    seconds: float
    multiple: int = 1


@dataclass(frozen=True)
class Settings:
    """The sampling of each group. A CPU training step of the layer (~7 ms) or a
    recalibration (~0.1 s) is one step per sample (the layer: ``AMORTIZED_STEPS`` of them);
    on CUDA, where steps are far shorter, samples run more."""

    train: Sampling
    network: Sampling
    eval: Sampling
    recalibrate: Sampling


DEFAULT = Settings(
    Sampling(15, 0.1, AMORTIZED_STEPS),
    Sampling(20, 0.05, AMORTIZED_STEPS),
    Sampling(150, 0.005),
    Sampling(9, 0.02),
)
QUICK = Settings(
    Sampling(5, 0.1, AMORTIZED_STEPS),
    Sampling(10, 0.05, AMORTIZED_STEPS),
    Sampling(50, 0.005),
    Sampling(3, 0.02),
)


@dataclass(frozen=True)
class Device:
    """Where the candidates run, and how they are timed there."""

    name: str
    clock: Clock
    sync: Callable[[], None]


@dataclass(frozen=True)
class Variant:
    """How the training groups run: in float32, under autocast (float16), or with
    channels-last activations. CPU runs float32 only; CUDA runs all three."""

    name: str
    autocast: bool = False
    channels_last: bool = False


FLOAT32 = Variant("fp32")
VARIANTS = {
    "cpu": (FLOAT32,),
    "cuda": (FLOAT32, Variant("amp", autocast=True), Variant("channels_last", channels_last=True)),
}


@dataclass(frozen=True)
class Candidate:
    """A step to time, under ``label`` in its group."""

    label: str
    step: Step


@dataclass(frozen=True)
class Result:
    """A group's samples (seconds per step, one per repeat) for each label."""

    samples: dict[str, list[float]]

    def median_us(self, label: str) -> float:
        return statistics.median(self.samples[label]) * 1e6

    def ratio(self, label: str, baseline: str = TORCH) -> float:
        """Median over repeats of ``label / baseline`` within the same repeat."""
        pairs = zip(self.samples[label], self.samples[baseline], strict=True)
        return statistics.median(ours / theirs for ours, theirs in pairs)


# -- set-up --------------------------------------------------------------------------------


def devices(torch: ModuleType) -> list[Device]:
    """CPU (timed in process CPU time), and CUDA (wall time, synchronized) when available."""
    found = [Device("cpu", time.process_time, lambda: None)]
    if torch.cuda.is_available():
        found.append(Device("cuda", time.perf_counter, torch.cuda.synchronize))
    return found


def describe_machine(torch: ModuleType, found: Sequence[Device], settings: Settings) -> None:
    """Print the machine, its load, the versions and the devices, to put a figure in context."""
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs, load average {load}")
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}")
    if any(device.name == "cuda" for device in found):
        print(f"cuda: {torch.cuda.get_device_name()} (timed in wall time, synchronized)")
    else:
        print("cuda: not available; CPU only")
    print(
        f"timing: interleaved repeats of samples of at least one step, "
        f"{settings.train.repeats} of ~{settings.train.seconds * 1e3:g} ms (train, "
        f"multiples of {AMORTIZED_STEPS} steps), {settings.network.repeats} of "
        f"~{settings.network.seconds * 1e3:g} ms (network, likewise), "
        f"{settings.eval.repeats} of ~{settings.eval.seconds * 1e3:g} ms (eval), "
        f"{settings.recalibrate.repeats} of ~{settings.recalibrate.seconds * 1e3:g} ms "
        "(recalibrate); CPU clock: process CPU time; figures are medians, ratios medians of "
        "per-repeat ratios"
    )


# -- timing --------------------------------------------------------------------------------


def time_sample(step: Step, loops: int, device: Device) -> float:
    """Seconds per step on ``device`` (its clock, synchronized around the loop)."""
    return seconds_per_step(step, loops, device.clock, device.sync)


def steps_per_sample(step: Step, sampling: Sampling, device: Device) -> int:
    """How many steps last about ``sampling.seconds``, a positive multiple of
    ``sampling.multiple``, after two warm-up steps."""
    step()
    elapsed = time_sample(step, 1, device)
    multiples = round(sampling.seconds / max(elapsed, 1e-7) / sampling.multiple)
    return sampling.multiple * max(1, multiples)


def time_candidates(candidates: Sequence[Candidate], sampling: Sampling, device: Device) -> Result:
    """One sample per candidate per repeat, interleaved and rotated between repeats."""
    gc.collect()
    gc.freeze()  # the set-up's objects stay; later collections skip them
    try:
        loops = [steps_per_sample(c.step, sampling, device) for c in candidates]
        samples: list[list[float]] = [[] for _ in candidates]
        order = list(range(len(candidates)))
        for repeat in range(sampling.repeats):
            shift = repeat % len(order)
            for i in order[shift:] + order[:shift]:
                samples[i].append(time_sample(candidates[i].step, loops[i], device))
    finally:
        gc.unfreeze()
    return Result({c.label: s for c, s in zip(candidates, samples, strict=True)})


# -- one layer: training and evaluation ------------------------------------------------------


def make_input(torch: ModuleType, device: str, variant: Variant = FLOAT32) -> tuple[Any, Any]:
    """``x`` (mean 1, std 2, so that normalizing does something) and ``dy``."""
    generator = torch.Generator().manual_seed(SEED)
    x = 1.0 + 2.0 * torch.randn(SHAPE, generator=generator)
    dy = torch.randn(SHAPE, generator=generator)
    layout = torch.channels_last if variant.channels_last else torch.contiguous_format
    return x.to(device, memory_format=layout), dy.to(device, memory_format=layout)


def autocast(torch: ModuleType, device: str, variant: Variant) -> Any:
    """The variant's autocast context (float16 where it is on; a no-op elsewhere)."""
    return torch.autocast(device, dtype=torch.float16, enabled=variant.autocast)


def user_welford() -> type:
    """:data:`USER`'s strategy class: Welford with the protocol's default fold."""
    import normstats as ns

    class UserWelford(ns.Welford):
        name = "user_welford"
        fold = ns.Strategy.fold

    return UserWelford


def stats_of(label: str) -> Any:
    """The ``stats`` argument that a candidate's label stands for."""
    return user_welford() if label == USER else label


def make_layer(torch: ModuleType, label: str, device: str) -> Any:
    """``BatchNorm(64, stats=label)``, or ``nn.BatchNorm2d(64)`` for the baseline and the
    control, in training mode."""
    from normstats.adapters.torch import BatchNorm

    channels = SHAPE[1]
    if label in (TORCH, CONTROL):
        layer = torch.nn.BatchNorm2d(channels)
    elif label in SMALL_BATCH:
        layer = BatchNorm(channels, **SMALL_BATCH[label])
    else:
        layer = BatchNorm(channels, stats=stats_of(label))
    return layer.to(device).train()


def training_step(torch: ModuleType, layer: Any, x: Any, dy: Any, variant: Variant) -> Step:
    """``layer(x).backward(dy)``, the gradients of the input and parameters reset first."""
    device = x.device.type

    def step() -> object:
        x.grad = layer.weight.grad = layer.bias.grad = None
        with autocast(torch, device, variant):
            y = layer(x)
        y.backward(dy.to(y.dtype))
        return x.grad

    return step


def eval_step(torch: ModuleType, layer: Any, x: Any) -> Step:
    """``layer(x)`` under ``no_grad`` (the layer in evaluation mode)."""

    def step() -> object:
        with torch.no_grad():
            return layer(x)

    return step


def train_candidates(torch: ModuleType, device: str, variant: Variant = FLOAT32) -> list[Candidate]:
    """Each strategy and torch's layer, sharing one input (with ``requires_grad``) and ``dy``."""
    x, dy = make_input(torch, device, variant)
    x.requires_grad_(True)
    return [
        Candidate(label, training_step(torch, make_layer(torch, label, device), x, dy, variant))
        for label in (*STRATEGIES, USER, *SMALL_BATCH, TORCH, CONTROL)
    ]


def eval_candidates(torch: ModuleType, device: str) -> list[Candidate]:
    """Each layer after ``WARMUP_STEPS`` training steps ("exact": recalibrated), in eval mode."""
    from normstats.adapters.torch import recalibrate

    x, dy = make_input(torch, device)
    generator = torch.Generator().manual_seed(SEED + 1)
    candidates = []
    for label in (*STRATEGIES, TORCH, CONTROL):
        layer = make_layer(torch, label, device)
        for _ in range(WARMUP_STEPS):
            noise = 0.1 * torch.randn(SHAPE, generator=generator).to(device)
            layer(x + noise).backward(dy)
        if label == "exact":
            recalibrate(layer, [x + 0.1 * k for k in range(WARMUP_STEPS)])
        candidates.append(Candidate(label, eval_step(torch, layer.eval(), x)))
    return candidates


# -- a small dispatch-bound network: training ----------------------------------------------------


def conv_blocks(torch: ModuleType, channels: int, width: int, blocks: int) -> list[Any]:
    """``blocks`` conv-BN-ReLU blocks of ``width`` channels (torch's BatchNorm2d), seeded."""
    nn = torch.nn
    torch.manual_seed(SEED)
    layers: list[Any] = []
    for _ in range(blocks):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
        layers.append(nn.ReLU())
        channels = width
    return layers


def make_network(torch: ModuleType, device: str) -> Any:
    """``NETWORK_BLOCKS`` conv-BN-ReLU blocks of ``NETWORK_WIDTH`` channels, global pooling
    and a linear head, with torch's BatchNorm2d, in training mode."""
    nn = torch.nn
    layers = conv_blocks(torch, NETWORK_INPUT[1], NETWORK_WIDTH, NETWORK_BLOCKS)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(NETWORK_WIDTH, NETWORK_CLASSES)]
    return nn.Sequential(*layers).to(device).train()


def sgd_step(torch: ModuleType, model: Any, x: Any, labels: Any, variant: Variant) -> Step:
    """One SGD step (momentum 0.9) of ``model`` on ``(x, labels)``: zero_grad, forward,
    cross-entropy, backward, ``optimizer.step()``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    device = x.device.type

    def step() -> object:
        optimizer.zero_grad(set_to_none=True)
        with autocast(torch, device, variant):
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def network_candidates(
    torch: ModuleType, device: str, variant: Variant = FLOAT32
) -> list[Candidate]:
    """torch's network, a copy of it (the control) and a copy converted to each strategy."""
    from normstats.adapters.torch import convert

    layout = torch.channels_last if variant.channels_last else torch.contiguous_format
    plain = make_network(torch, device).to(memory_format=layout)
    generator = torch.Generator().manual_seed(SEED + 3)
    x = torch.randn(NETWORK_INPUT, generator=generator).to(device, memory_format=layout)
    labels = torch.randint(0, NETWORK_CLASSES, (NETWORK_INPUT[0],), generator=generator)
    labels = labels.to(device)
    models = {TORCH: plain, CONTROL: copy.deepcopy(plain)}
    for label in (*STRATEGIES, USER):
        models[label] = convert(copy.deepcopy(plain), stats=stats_of(label))
    return [
        Candidate(label, sgd_step(torch, model, x, labels, variant))
        for label, model in models.items()
    ]


# -- operators per training forward ----------------------------------------------------------


def profiled(step: Step, device: Device, steps: int, warmup: int) -> Any:
    """A ``torch.profiler`` record (CPU side) of ``steps`` calls of ``step`` after ``warmup``."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    device.sync()
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
        device.sync()
    return profiler


def top_level_operators(step: Step, device: Device, steps: int = AMORTIZED_STEPS) -> float:
    """Top-level aten operators per call of ``step`` over ``steps`` consecutive calls.

    An operator is top-level when no aten operator encloses it (``aten::batch_norm`` counts,
    the ``aten::native_batch_norm`` it calls does not); ``steps`` calls share what a layer
    does once every so many of them. Counted with ``torch.profiler`` on the CPU side.
    """
    # warmed up by as many calls, so the layer's periodic work lands anywhere in the window
    profiler = profiled(step, device, steps, warmup=steps)
    count = sum(
        1
        for event in profiler.events()
        if event.name.startswith("aten::") and not _under_aten(event)
    )
    return count / steps


def _under_aten(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def operator_counts(torch: ModuleType, device: Device) -> dict[str, float]:
    """Top-level operators per training forward of each layer (input as in the train group)."""
    x, _ = make_input(torch, device.name)
    counts = {}
    for label in (TORCH, *STRATEGIES):
        layer = make_layer(torch, label, device.name)
        counts[label] = top_level_operators(lambda layer=layer: layer(x), device)
    return counts


def print_operators(device: str, counts: dict[str, float]) -> None:
    print()
    print(
        f"[{device}] top-level aten operators per training forward, amortized over "
        f"{AMORTIZED_STEPS} steps (torch.profiler)"
    )
    print(f"  {TORCH:<16} {counts[TORCH]:6.2f}")
    for label in STRATEGIES:
        print(f"  {label:<16} {counts[label]:6.2f}   (target <= {TARGET_OPERATORS})")


# -- a small CNN: recalibration ----------------------------------------------------------------


def make_cnn(torch: ModuleType, device: str) -> Any:
    """``BLOCKS`` conv-BN-ReLU blocks of ``WIDTH`` channels (torch's BatchNorm2d), in eval mode."""
    layers = conv_blocks(torch, CNN_INPUT[1], WIDTH, BLOCKS)
    return torch.nn.Sequential(*layers).to(device).eval()


def calibration_data(torch: ModuleType, device: str) -> list[Any]:
    generator = torch.Generator().manual_seed(SEED + 2)
    batches = [torch.randn(CNN_INPUT, generator=generator) for _ in range(CALIBRATION_BATCHES)]
    return [batch.to(device) for batch in batches]


def forward_pass(torch: ModuleType, model: Any, data: Sequence[Any]) -> Step:
    """``model(batch)`` for every batch, under ``no_grad``, in the model's mode."""

    def step() -> object:
        with torch.no_grad():
            return [model(batch) for batch in data]

    return step


def recalibrate_candidates(torch: ModuleType, device: str) -> tuple[list[Candidate], int]:
    """One-pass and layerwise ``recalibrate`` of the converted CNN, the plain pass and the
    batch-statistics pass of the unconverted one; and L, the number of BatchNorm layers."""
    from normstats.adapters.torch import BatchNorm, convert, recalibrate

    plain = make_cnn(torch, device)
    training = copy.deepcopy(plain).train()
    model = convert(copy.deepcopy(plain), stats="exact")
    layers = sum(isinstance(m, BatchNorm) for m in model.modules())
    data = calibration_data(torch, device)
    candidates = [
        Candidate(TORCH, forward_pass(torch, plain, data)),
        Candidate(BATCH_STATS, forward_pass(torch, training, data)),
        Candidate(ONE_PASS, lambda: recalibrate(model, data)),
        Candidate(LAYERWISE, lambda: recalibrate(model, data, layerwise=True)),
    ]
    return candidates, layers


# -- profile -------------------------------------------------------------------------------------


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side logs every start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w", encoding="utf-8") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def operators_per_step(step: Step, device: Device, steps: int = 5) -> dict[str, tuple[int, float]]:
    """``{operator: (calls per step, self CPU us per step)}`` of ``step`` (torch.profiler)."""
    profiler = profiled(step, device, steps, warmup=1)
    return {
        event.key: (event.count // steps, event.self_cpu_time_total / steps)
        for event in profiler.key_averages()
    }


def extra_operators(
    ours: dict[str, tuple[int, float]], theirs: dict[str, tuple[int, float]]
) -> dict[str, tuple[int, float]]:
    """The operators ``ours`` calls more often per step, with their self CPU time per step."""
    return {
        key: (calls - theirs.get(key, (0, 0.0))[0], us)
        for key, (calls, us) in ours.items()
        if calls > theirs.get(key, (0, 0.0))[0]
    }


def print_profile(torch: ModuleType, device: Device) -> None:
    """Operators per training step of each strategy beyond those of torch's layer."""
    candidates = {c.label: c for c in train_candidates(torch, device.name)}
    theirs = operators_per_step(candidates[TORCH].step, device)
    print()
    print(
        f"[{device.name}] profile: operator calls per training step beyond {TORCH}'s "
        f"({sum(n for n, _ in theirs.values())}), torch.profiler; self CPU time is inflated "
        "by the profiler"
    )
    for label in STRATEGIES:
        extra = extra_operators(operators_per_step(candidates[label].step, device), theirs)
        calls = sum(n for n, _ in extra.values())
        us = sum(t for _, t in extra.values())
        top = sorted(extra.items(), key=lambda item: -item[1][1])[:5]
        detail = ", ".join(f"{key.removeprefix('aten::')} x{n}" for key, (n, _) in top) or "-"
        print(f"  {label:<11} +{calls:3d} calls, ~{us:5.0f} us self CPU   most costly: {detail}")


# -- report --------------------------------------------------------------------------------------


def print_layer_group(device: str, title: str, result: Result, target: float) -> None:
    print()
    print(f"[{device}] {title}")
    print(f"  {TORCH:<16} {result.median_us(TORCH):9.1f} us")
    print(
        f"  {CONTROL:<16} {result.median_us(CONTROL):9.1f} us   a 2nd {TORCH} / the 1st = "
        f"{result.ratio(CONTROL):5.3f}  (this run's noise floor)"
    )
    for label in STRATEGIES:
        print(
            f"  {label:<16} {result.median_us(label):9.1f} us   ours / torch = "
            f"{result.ratio(label):5.3f}  (target <= {target:g})"
        )
    if USER in result.samples:
        print(
            f"  {USER:<16} {result.median_us(USER):9.1f} us   ours / torch = "
            f"{result.ratio(USER):5.3f}  (a user's strategy: the default fold; / welford = "
            f"{result.ratio(USER, 'welford'):5.3f})"
        )
    for label in SMALL_BATCH:
        if label in result.samples:
            print(
                f"  {label:<16} {result.median_us(label):9.1f} us   ours / torch = "
                f"{result.ratio(label):5.3f}  (small-batch mode; target <= {TARGET_SMALL_BATCH:g})"
            )


def print_recalibrate(device: str, result: Result, layers: int) -> None:
    ms = {label: result.median_us(label) / 1e3 for label in result.samples}
    print()
    print(
        f"[{device}] recalibrate: CNN of {layers} conv-BN-ReLU blocks (L = {layers}), "
        f"{CALIBRATION_BATCHES} batches of {CNN_INPUT}"
    )
    print(f"  {'plain pass':<16} {ms[TORCH]:9.1f} ms   no_grad forward, {TORCH} in eval mode")
    print(
        f"  {BATCH_STATS:<16} {ms[BATCH_STATS]:9.1f} ms   / plain = "
        f"{result.ratio(BATCH_STATS):5.2f}  (reference: {TORCH} in training mode, no_grad)"
    )
    print(
        f"  {ONE_PASS:<16} {ms[ONE_PASS]:9.1f} ms   / plain = {result.ratio(ONE_PASS):5.2f}  "
        f"(target <= {TARGET_ONE_PASS:g}; / batch-stat pass = "
        f"{result.ratio(ONE_PASS, BATCH_STATS):.2f})"
    )
    print(
        f"  {LAYERWISE:<16} {ms[LAYERWISE]:9.1f} ms   / plain = {result.ratio(LAYERWISE):5.2f}  "
        f"(target <= {TARGET_LAYERWISE * (layers + 1):g} = {TARGET_LAYERWISE:g} (L + 1); "
        f"(L + 1) / 2 = {(layers + 1) / 2:g})"
    )


def verdict(ratio: float, target: float) -> str:
    return f"{ratio:.3f}x {'MET' if ratio <= target else 'NOT MET'}"


@dataclass(frozen=True)
class Measured:
    """What one device measured, group by group (the training groups once per variant)."""

    train: dict[str, Result]
    network: dict[str, Result]
    operators: dict[str, float]
    evaluation: Result
    recalibrate: Result
    layers: int


def target_parts(device: str, measured: Measured) -> list[str]:
    """The targets of one device, each judged on the worst strategy."""
    evaluation, recal = measured.evaluation, measured.recalibrate
    layers, operators = measured.layers, measured.operators
    worst_operators = max(STRATEGIES, key=operators.__getitem__)
    worst_eval = max(STRATEGIES, key=evaluation.ratio)
    layerwise = TARGET_LAYERWISE * (layers + 1)
    most = operators[worst_operators]
    parts = []
    for variant, train in measured.train.items():
        network = measured.network[variant]
        worst_train = max(STRATEGIES, key=train.ratio)
        worst_network = max(STRATEGIES, key=network.ratio)
        worst_mode = max(SMALL_BATCH, key=train.ratio)
        parts += [
            f"[{device} {variant}] train {SHAPE} <= {TARGET_TRAIN:g}x: "
            f"{verdict(train.ratio(worst_train), TARGET_TRAIN)} (worst: {worst_train})",
            f"[{device} {variant}] small-batch modes {SHAPE} <= {TARGET_SMALL_BATCH:g}x: "
            f"{verdict(train.ratio(worst_mode), TARGET_SMALL_BATCH)} (worst: {worst_mode})",
            f"[{device} {variant}] small network <= {TARGET_NETWORK:g}x: "
            f"{verdict(network.ratio(worst_network), TARGET_NETWORK)} (worst: {worst_network})",
        ]
    return [
        *parts,
        f"[{device}] operators <= {TARGET_OPERATORS}: {most:.2f} "
        f"{'MET' if most <= TARGET_OPERATORS else 'NOT MET'} (worst: {worst_operators})",
        f"[{device}] eval <= {TARGET_EVAL:g}x: "
        f"{verdict(evaluation.ratio(worst_eval), TARGET_EVAL)} (worst: {worst_eval})",
        f"[{device}] one-pass recalibrate <= {TARGET_ONE_PASS:g}x: "
        f"{verdict(recal.ratio(ONE_PASS), TARGET_ONE_PASS)}",
        f"[{device}] layerwise <= {layerwise:g}x: {verdict(recal.ratio(LAYERWISE), layerwise)}",
    ]


# -- main -------------------------------------------------------------------------------------


def run_device(torch: ModuleType, device: Device, settings: Settings) -> list[str]:
    """Measure every group on ``device``, print them, and return its target verdicts."""
    name = device.name
    train, network = {}, {}
    for variant in VARIANTS[name]:
        label = f"{name} {variant.name}"
        train[variant.name] = time_candidates(
            train_candidates(torch, name, variant), settings.train, device
        )
        print_layer_group(
            label,
            f"train step (forward + backward), x {SHAPE}",
            train[variant.name],
            TARGET_TRAIN,
        )
        network[variant.name] = time_candidates(
            network_candidates(torch, name, variant), settings.network, device
        )
        print_layer_group(
            label,
            f"small network: SGD step of {NETWORK_BLOCKS} conv-BN-ReLU blocks of "
            f"{NETWORK_WIDTH} channels, input {NETWORK_INPUT}",
            network[variant.name],
            TARGET_NETWORK,
        )
    operators = operator_counts(torch, device)
    print_operators(name, operators)
    evaluation = time_candidates(eval_candidates(torch, name), settings.eval, device)
    print_layer_group(name, "eval forward (no_grad)", evaluation, TARGET_EVAL)
    candidates, layers = recalibrate_candidates(torch, name)
    recal = time_candidates(candidates, settings.recalibrate, device)
    print_recalibrate(name, recal, layers)
    measured = Measured(train, network, operators, evaluation, recal, layers)
    return target_parts(name, measured)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument(
        "--profile", action="store_true", help="count the operators of one training step"
    )
    parser.add_argument(
        "--device",
        choices=("all", "cpu", "cuda"),
        default="all",
        help="where to measure (default: the CPU, and CUDA when there is one)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else DEFAULT
    torch = import_torch("benchmarks/torch_bn.py")
    limiter = pin_threads(torch)
    found = [d for d in devices(torch) if args.device in ("all", d.name)]
    describe_machine(torch, found, settings)

    started = time.perf_counter()
    parts: list[str] = []
    for device in found:
        parts += run_device(torch, device, settings)
    print(f"\ntiming took {time.perf_counter() - started:.1f} s (wall)")
    if args.profile:
        for device in found:
            print_profile(torch, device)
    print()
    print("targets: " + "; ".join(parts))
    del limiter
    return 0


if __name__ == "__main__":
    sys.exit(main())
