"""A strategy's state as module buffers: float64, on the module's device, whatever its dtype."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normstats.estimators import State, Strategy

STATS_DTYPE = torch.float64
"""The strategy's accumulators, whatever the module's dtype."""
BATCH_MOMENTS_DTYPE = torch.float32
"""The least precision of the batch moments a strategy receives, whatever the module's dtype
(float16 and bfloat16 round a mean of 100 to within 0.5, and float16 overflows at 65504)."""


class StrategyState(nn.Module):
    """The strategy's state as float64 buffers (counters as 0-d tensors).

    Buffers follow the module's device but keep float64 through ``.half()`` or
    ``.to(torch.bfloat16)``: precision of the statistics does not depend on the precision
    the network computes in.

    A :class:`~normstats.adapters.torch.BatchNorm` that holds one loads its buffers itself,
    together with its own and only after checking all of them, so that a state dict that
    fails to load changes nothing (:meth:`claim_next_load`).
    """

    def __init__(self, strategy: Strategy, num_features: int, device: Any = None) -> None:
        super().__init__()
        template = torch.zeros(num_features, dtype=STATS_DTYPE, device=device)
        for key, value in strategy.initial_state(template).items():
            tensor = torch.as_tensor(value, dtype=STATS_DTYPE, device=device)
            self.register_buffer(key, tensor.clone())  # one storage each
        self._claimed = False

    def state(self) -> State:
        """The buffers by name."""
        return dict(self._buffers)

    def assign(self, new: Mapping[str, Any], keep: Tensor | None = None) -> None:
        """Copy ``new`` into the buffers in place; where ``keep`` is False, leave them."""
        for key, buffer in self._buffers.items():
            assert buffer is not None  # registered as tensors above
            value = new[key]
            # under torch.compile a 0-d float64 buffer is written through a view: the compiled
            # graph drops in-place writes to it (it is traced like a Python float)
            compiling = buffer.dim() == 0 and torch.compiler.is_compiling()
            target = buffer.view(1) if compiling else buffer
            target.copy_(value if keep is None else torch.where(keep, value, buffer))

    def claim_next_load(self) -> None:
        """The owning layer has loaded (or refused) this state's part of the state dict:
        the next ``_load_from_state_dict`` call, part of the same load, does nothing."""
        self._claimed = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        if self._claimed:
            self._claimed = False
            return
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> StrategyState:
        """``fn`` applied to every buffer (a move, ``share_memory_``, ...), except that a cast
        of the module to another dtype moves the buffers and keeps them float64."""
        for key, buffer in self._buffers.items():
            if buffer is not None:
                moved = fn(buffer)
                if moved.dtype != buffer.dtype:
                    moved = buffer.to(device=moved.device)
                self._buffers[key] = moved
        return self


def brought_state(instance: Strategy, num_features: int) -> State | None:
    """The state of an estimator that has seen batches, as float64 tensors on the CPU
    (None if it has seen none); its statistics must have ``num_features`` features."""
    if instance.num_batches == 0:
        return None
    prefix = instance.name + "."
    saved = instance.state_dict()
    shapes = instance.state_shapes((num_features,))
    state: State = {}
    for key in ("count", "num_batches", *instance.array_keys):
        value = saved[prefix + key]
        tensor = (
            value.detach().to("cpu", STATS_DTYPE)
            if isinstance(value, Tensor)
            else torch.as_tensor(np.asarray(value, dtype=np.float64))
        )
        if key in instance.array_keys and tuple(tensor.shape) != shapes[key]:
            leading = len(shapes[key]) - 1  # the strategy's own axes before the features
            raise ValueError(
                f"stats: expected an estimator whose statistics have {num_features} features "
                f"(num_features), got one that has seen batches of feature shape "
                f"{tuple(tensor.shape)[leading:]}"
            )
        state[key] = tensor
    return state
