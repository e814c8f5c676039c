"""A strategy's state as module buffers: float64, on the module's device, whatever its dtype."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from normstats.estimators._base import Estimator, State

STATS_DTYPE = torch.float64
"""The strategy's accumulators, whatever the module's dtype."""


class StrategyState(nn.Module):
    """The strategy's state as float64 buffers (counters as 0-d tensors).

    Buffers follow the module's device but keep float64 through ``.half()`` or
    ``.to(torch.bfloat16)``: precision of the statistics does not depend on the precision
    the network computes in.
    """

    def __init__(self, strategy: Estimator, num_features: int, device: Any = None) -> None:
        super().__init__()
        template = torch.zeros(num_features, dtype=STATS_DTYPE, device=device)
        for key, value in strategy.initial_state(template).items():
            tensor = torch.as_tensor(value, dtype=STATS_DTYPE, device=device)
            self.register_buffer(key, tensor.clone())  # one storage each

    def state(self) -> State:
        """The buffers by name."""
        return dict(self._buffers)

    def assign(self, new: Mapping[str, Tensor], keep: Tensor | None = None) -> None:
        """Copy ``new`` into the buffers in place; where ``keep`` is False, leave them."""
        for key, buffer in self._buffers.items():
            assert buffer is not None  # registered as tensors above
            value = new[key]
            buffer.copy_(value if keep is None else torch.where(keep, value, buffer))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> StrategyState:
        for key, buffer in self._buffers.items():
            if buffer is not None:
                target = fn(torch.empty((), dtype=buffer.dtype, device=buffer.device))
                self._buffers[key] = buffer.to(device=target.device)
        return self
