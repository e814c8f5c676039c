"""Loading a torch BatchNorm's state dict: everything is checked before anything is copied.

A layer's part of a state dict is its parameters and buffers under torch's names (``weight``,
``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), ``num_batches_skipped``
and the strategy's buffers (``welford.count``, ...). :func:`plan_load` checks all of it, keys,
shapes and values, and either returns what to copy or says what is wrong; the layer copies
nothing in the second case, so a load that fails leaves it exactly as it was.

Values are checked as the core's ``load_state_dict`` checks an estimator's: counters are
non-negative integers, statistics are finite, spreads (``m2``, ``var``, ``running_var``) are
not negative, and a state that has seen samples has seen batches (at most one per sample).
A dict of torch's own layer (no strategy keys) makes the strategy resume from its running
statistics, which must then be finite; a dict of another strategy is refused with an error
that says how to convert it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from normstats.estimators import Strategy

from .state import STATS_DTYPE

if TYPE_CHECKING:
    from .batchnorm import BatchNorm

TORCH_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
"""What torch's own BatchNorm layers keep."""
LAYER_COUNTERS = ("num_batches_tracked", "num_batches_skipped")
STATE_COUNTERS = ("count", "num_batches")


@dataclass
class LoadPlan:
    """What a layer copies from its part of a state dict (names relative to its prefix)."""

    own: dict[str, Tensor] = field(default_factory=dict)
    """The layer's parameters and buffers."""
    strategy: dict[str, Tensor] = field(default_factory=dict)
    """The strategy's buffers, float64."""
    problems: list[str] = field(default_factory=list)
    """What is wrong with the part's values, shapes or strategy."""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def refused(self, strict: bool) -> bool:
        """Whether nothing may be copied: a problem, or a strict load whose keys differ."""
        return bool(self.problems or (strict and (self.missing or self.unexpected)))

    @property
    def count(self) -> float | None:
        """The strategy's loaded sample count, when it is loaded and readable."""
        value = self.strategy.get("count")
        return None if value is None or value.is_meta else float(value)


def requested_strict() -> bool:
    """The ``strict`` of the ``load_state_dict`` call this load is part of (True if unknown).

    torch passes ``strict=True`` to every module's ``_load_from_state_dict`` so that missing
    and unexpected keys are listed, and applies the caller's ``strict`` only after every
    module has copied what it could. A layer that must copy nothing when a strict load is
    going to fail reads the caller's flag from that call.
    """
    code = nn.Module.load_state_dict.__code__
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return bool(frame.f_locals.get("strict", True))
        frame = frame.f_back
    return True


def plan_load(layer: BatchNorm, given: Mapping[str, Any], prefix: str, strict: bool) -> LoadPlan:
    """Check the layer's part ``given`` (keys without ``prefix``) and plan the copy."""
    plan = LoadPlan()
    strategy, state = layer.strategy, layer.strategy_state
    own_local = _own_tensors(layer)
    inner_local = state.state() if state is not None else {}
    inner_prefix = "" if strategy is None else strategy.name + "."
    foreign: set[str] = set()
    for key, value in given.items():
        if key in own_local:
            plan.own[key] = value
        elif (
            inner_prefix
            and key.startswith(inner_prefix)
            and key[len(inner_prefix) :] in inner_local
        ):
            plan.strategy[key[len(inner_prefix) :]] = value
        else:
            plan.unexpected.append(key)
            head = key.split(".", 1)[0]
            if "." in key and {f"{head}.count", f"{head}.num_batches"} <= set(given):
                foreign.add(head)
    resume = (
        strategy is not None
        and not plan.strategy
        and {"running_mean", "running_var"} <= set(plan.own)
    )
    if resume:  # a dict of torch's layer (old ones lack num_batches_tracked): counters from 0
        for name in LAYER_COUNTERS:
            plan.own.setdefault(name, torch.tensor(0, dtype=torch.long))
    plan.missing = [k for k in own_local if k not in plan.own]
    if not resume:
        plan.missing += [inner_prefix + k for k in inner_local if k not in plan.strategy]
    if strict and foreign:
        plan.problems.append(_foreign_message(sorted(foreign), layer, prefix))
    for key, value in list(plan.own.items()):
        plan.own[key] = _shaped(prefix + key, value, own_local[key], plan.problems)
    for key, value in list(plan.strategy.items()):
        local = inner_local[key]
        plan.strategy[key] = _shaped(prefix + inner_prefix + key, value, local, plan.problems)
    if plan.problems:
        return plan
    _check_own_values(plan, prefix, resume)
    if plan.problems:
        return plan
    if resume:
        assert strategy is not None
        plan.strategy = _resumed(strategy, plan.own, layer.num_features)
    else:
        plan.strategy = {k: v.to(STATS_DTYPE) for k, v in plan.strategy.items()}
    if strategy is not None and plan.strategy:
        candidate = {**inner_local, **plan.strategy}
        _check_state_values(strategy, candidate, prefix + inner_prefix, plan.problems)
    return plan


def _own_tensors(layer: nn.Module) -> dict[str, Tensor]:
    persistent = {
        k: v for k, v in layer._buffers.items() if k not in layer._non_persistent_buffers_set
    }
    return {k: v for k, v in {**layer._parameters, **persistent}.items() if v is not None}


def _foreign_message(heads: list[str], layer: BatchNorm, prefix: str) -> str:
    names = ", ".join(repr(h) for h in heads)
    keys = ", ".join(f"{prefix}{h}.*" for h in heads)
    mine = (
        "this layer keeps no statistics (stats='batch')"
        if layer.strategy is None
        else f"this layer's strategy is {layer.stats_name!r}"
    )
    return (
        f"{keys}: got the state of strategy {names}, but {mine}; to convert, load it into a "
        f"BatchNorm built with stats={heads[0]!r} (and the same settings), or load only "
        f"torch's keys ({', '.join(TORCH_KEYS)}) to resume from its running statistics"
    )


def _shaped(key: str, given: object, local: Tensor, problems: list[str]) -> Tensor:
    """``given`` as a tensor of ``local``'s shape, or a problem noted (torch's checks)."""
    if not isinstance(given, Tensor):
        problems.append(f"{key}: expected a torch.Tensor, got {type(given).__name__}")
        return local
    value: Tensor = given
    if local.dim() == 0 and value.dim() == 1 and value.shape[0] == 1:
        value = value[0]  # torch accepts a 1-element vector for a 0-d buffer (0.3 dicts)
    if value.shape != local.shape:
        problems.append(
            f"size mismatch for {key}: expected shape {tuple(local.shape)}, the shape in "
            f"current model, got {tuple(value.shape)}"
        )
    elif value.is_complex() or value.dtype == torch.bool:
        problems.append(f"{key}: expected a real-valued tensor, got dtype {value.dtype}")
    return value


def _readable(value: Tensor) -> bool:
    return not value.is_meta


def _check_counter(key: str, value: Tensor, problems: list[str]) -> None:
    if not _readable(value):
        return
    number = float(value)
    if not (math.isfinite(number) and number >= 0 and number == math.floor(number)):
        problems.append(f"{key}: expected a non-negative integer, got {value.item()!r}")


def _check_finite(key: str, value: Tensor, problems: list[str], *, spread: bool) -> None:
    """Finite values (``spread``: not negative either)."""
    if not _readable(value):
        return
    if not bool(torch.isfinite(value).all()):
        problems.append(f"{key}: expected finite values, got NaN or Inf")
    elif spread and bool((value < 0).any()):
        problems.append(f"{key}: expected non-negative values, got negative ones")


def _check_own_values(plan: LoadPlan, prefix: str, resume: bool) -> None:
    """Counters; running statistics (finite when the strategy resumes from them, else as
    rounded into the module's dtype: never NaN, ``running_var`` never negative)."""
    for name in LAYER_COUNTERS:
        if name in plan.own:
            _check_counter(prefix + name, plan.own[name], plan.problems)
    for name in ("running_mean", "running_var"):
        value = plan.own.get(name)
        if value is None or not _readable(value):
            continue
        if resume:
            _check_finite(prefix + name, value, plan.problems, spread=name == "running_var")
        elif bool(torch.isnan(value).any()):
            plan.problems.append(f"{prefix}{name}: expected numbers, got NaN")
        elif name == "running_var" and bool((value < 0).any()):
            plan.problems.append(f"{prefix}{name}: expected non-negative values, got negative ones")


def _check_state_values(
    strategy: Strategy, state: dict[str, Tensor], prefix: str, problems: list[str]
) -> None:
    """The strategy's state after the load: finite, non-negative spreads, coherent counters."""
    for name in STATE_COUNTERS:
        _check_counter(prefix + name, state[name], problems)
    for name in strategy.array_keys:
        _check_finite(
            prefix + name, state[name], problems, spread=name in strategy.non_negative_keys
        )
    if problems or not all(_readable(state[n]) for n in STATE_COUNTERS):
        return
    count, batches = float(state["count"]), float(state["num_batches"])
    resumes = _resumes(strategy)
    if count > 0 and not (batches >= 1 and (resumes or batches <= count)):
        most = "" if resumes else f" and at most one per sample ({count:g})"
        problems.append(
            f"{prefix}num_batches: expected at least one batch{most} for {prefix}count="
            f"{count:g}, got {batches:g}"
        )
    elif count == 0 and batches > 0 and not resumes:
        problems.append(
            f"{prefix}count: expected {prefix}count and {prefix}num_batches both zero or both "
            f"positive for strategy {strategy.name!r}, got 0 and {batches:g}"
        )


def _resumes(strategy: Strategy) -> bool:
    """Whether the strategy continues from running statistics (a state with batches but no
    sample count), as the averages of batch statistics do."""
    template = torch.zeros(1, dtype=STATS_DTYPE)
    resumed = strategy.resumed_state(template, template, template + 1.0, 1)
    return bool(resumed["num_batches"] == 1)


def _resumed(strategy: Strategy, own: dict[str, Tensor], num_features: int) -> dict[str, Tensor]:
    """The strategy's state continuing from torch's running statistics."""
    mean = own["running_mean"].detach().to(STATS_DTYPE)
    template = torch.zeros(num_features, dtype=STATS_DTYPE, device=mean.device)
    resumed = strategy.resumed_state(
        template,
        mean,
        own["running_var"].detach().to(template),
        own["num_batches_tracked"].detach().to(template),
    )
    return {
        k: torch.as_tensor(v, dtype=STATS_DTYPE, device=mean.device) for k, v in resumed.items()
    }


__all__ = ["TORCH_KEYS", "LoadPlan", "plan_load", "requested_strict"]
