"""The training steps a layer has not folded into its strategy yet: a ring of batch moments.

A training forward writes its batch's mean and unbiased variance into the next slot of a
preallocated ring: torch's fused kernel, given the slot's rows as running buffers and
``momentum=1.0``, leaves exactly those moments in them, so a step costs the kernel alone.
The slots are folded into the strategy all at once (the strategy's ``fold``, vectorized
over the slots) when the ring is full and whenever the statistics are read, so
the strategy's update costs a few dozen operations every :data:`SLOTS` steps instead of
every step. A slot whose variance is not finite (NaN or Inf anywhere in its batch) is
masked out by that fold, on the device, without a host synchronisation.

A synchronized step (whose moments are merged across processes in float64) writes its global
mean and sum of squared deviations into a float64 ring instead, and keeps its total count, a
tensor on the device, so that it reads nothing on the host either.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normstats.estimators import StackedMoments

SLOTS = 64
"""Training steps a ring holds before it folds by itself."""


class MomentRing:
    """Preallocated rows of batch means (the first :data:`SLOTS`) and unbiased variances
    (the next :data:`SLOTS`), ``(2 * SLOTS, C)``, and the sample counts of the pending slots
    (host ints: they are shapes). The pending slots of synchronized steps hold sums of
    squared deviations in place of variances, and their counts are 0-d tensors on the
    device; a ring holds one kind of slot at a time.

    The buffer is allocated at the first step, on the input's device and in the dtype the
    kernel wants for running buffers, and again when either changes (the ring is empty
    then: a change of device or dtype folds it first). It is scratch space, not state: it
    is not a buffer of the module, so it is neither saved nor broadcast.

    The rows are never written again once the kernel has written them: autograd keeps them
    for the step's backward (torch's batch-norm backward takes the running buffers), which
    may come after the ring has been folded, so a folded ring is replaced by a fresh one.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self._means: list[Tensor] = []
        self._variances: list[Tensor] = []
        self.counts: list[int] = []
        """Samples per channel of each pending slot written by the kernel, oldest first."""
        self.totals: list[Tensor] = []
        """Samples per channel of each pending slot written by a synchronized step, oldest
        first: 0-d tensors on the device, never read on the host."""

    @property
    def pending(self) -> int:
        """Slots written and not folded yet."""
        return len(self.counts) + len(self.totals)

    @property
    def full(self) -> bool:
        return self.pending == SLOTS

    def next_slot(
        self, num_features: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        """The ``(mean, var)`` rows the next step's kernel writes into.

        They hold zeros, which the kernel's ``(1 - momentum) * old`` term needs to be finite
        to vanish exactly.
        """
        buffer = self._buffer
        if (
            buffer is None
            or buffer.dtype != dtype
            or buffer.device != device
            or buffer.shape[1] != num_features
        ):
            if self.pending:
                raise RuntimeError("the ring must be folded before it is reallocated")
            self._allocate(num_features, dtype, device)
        k = self.pending
        return self._means[k], self._variances[k]

    def _allocate(self, num_features: int, dtype: torch.dtype, device: torch.device) -> None:
        buffer = torch.zeros(2 * SLOTS, num_features, dtype=dtype, device=device)
        self._buffer = buffer
        rows = buffer.unbind(0)  # one operation: the views of every row
        self._means, self._variances = list(rows[:SLOTS]), list(rows[SLOTS:])

    def push(self, count: int) -> None:
        """Record that the next slot now holds the mean and unbiased variance of a batch of
        ``count`` samples."""
        assert not self.totals, "a ring holds one kind of slot at a time: fold it first"
        self.counts.append(count)

    def push_total(self, total: Tensor) -> None:
        """Record that the next slot now holds the mean and sum of squared deviations of a
        synchronized batch of ``total`` samples (a 0-d tensor on the ring's device)."""
        assert not self.counts, "a ring holds one kind of slot at a time: fold it first"
        self.totals.append(total)

    def discard_next(self) -> None:
        """Zero the next slot again after a step that wrote it and was refused (its graph
        is gone with the exception)."""
        if self._buffer is not None:
            k = self.pending
            self._means[k].zero_()
            self._variances[k].zero_()

    def stacked(self, dtype: torch.dtype) -> StackedMoments:
        """The pending slots as :class:`~normstats.estimators.StackedMoments` in ``dtype``:
        sums of squared deviations (``(n - 1) * var`` of a kernel's slot), and ``finite``
        from the second rows (NaN or Inf anywhere in a batch makes its variance and its sum
        of squared deviations NaN or Inf)."""
        assert self._buffer is not None
        size = self.pending
        moments = self._buffer.to(dtype)
        means, seconds = moments[:size], moments[SLOTS : SLOTS + size]
        finite = torch.isfinite(seconds).all(dim=1)
        if self.totals:
            return StackedMoments(torch.stack(self.totals).to(dtype), means, seconds, finite)
        counts = _on_device(self.counts, dtype, moments.device)
        return StackedMoments(counts, means, seconds * (counts - 1.0)[:, None], finite)

    def clear(self) -> None:
        """Forget the pending slots (after a fold, a reset or a load): a fresh buffer takes
        the place of one that holds any."""
        if self.pending:
            assert self._buffer is not None
            self._allocate(self._buffer.shape[1], self._buffer.dtype, self._buffer.device)
        self.counts, self.totals = [], []

    def release(self) -> None:
        """Drop the buffer (the next step allocates one where the input is); empty only."""
        self.counts, self.totals = [], []
        self._buffer = None
        self._means, self._variances = [], []


def _on_device(numbers: list[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host numbers as a tensor on ``device``, without waiting for the device: a copy from
    pinned memory is asynchronous, where one from ordinary memory synchronises the stream."""
    host = torch.tensor(numbers, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
