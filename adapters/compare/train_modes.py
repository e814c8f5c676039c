"""How the comparison's networks train: BatchNorm, Batch Renormalization or Ghost BatchNorm.

``batchnorm`` normalizes each training batch with its own statistics (the default);
``renorm`` corrects each training batch towards a running estimate (Ioffe, 2017), by default
the library's EMA, and ``renorm:<strategy>`` names the estimate (``renorm:welford``,
``renorm:cumulative``, ``renorm:ema:0.01``, a strategy class as ``renorm:module:Class``);
``ghost:V`` normalizes each training batch in virtual batches of ``V`` samples (Hoffer et
al., 2017). The training mode changes only how the network trains: every inference strategy
is evaluated on it as on any other network, and the tracked strategies are fed the same
batch moments.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from . import strategies

BATCHNORM = "batchnorm"
RENORM = "renorm"
GHOST = "ghost"
DEFAULT_REFERENCE = "ema:0.1"
"""Batch Renormalization's running estimate when ``renorm`` names none: the library's EMA
(momentum 0.1, as torch's running statistics)."""


@attrs.frozen
class TrainMode:
    """A parsed training mode."""

    name: str
    """As given (``"renorm:welford"``): what the records and the table show."""
    reference: str | None = None
    """Batch Renormalization's running estimate, a tracked strategy's name; None otherwise."""
    virtual_batch_size: int | None = None
    """Ghost BatchNorm's virtual batch size; None otherwise."""


PLAIN = TrainMode(BATCHNORM)
"""Plain BatchNorm training."""


def parse(values: str | Sequence[str]) -> tuple[str, ...]:
    """Validate training modes (a comma-separated string or a sequence), keeping their order.

    >>> parse("batchnorm,renorm:welford,ghost:4")
    ('batchnorm', 'renorm:welford', 'ghost:4')
    """
    items = [v.strip() for v in values.split(",")] if isinstance(values, str) else list(values)
    for item in items:
        mode(item)
    if not items:
        raise ValueError("--train-mode: expected at least one training mode, got none")
    repeated = sorted({v for v in items if items.count(v) > 1})
    if repeated:
        raise ValueError(f"--train-mode: expected each value once, got {repeated} more than once")
    return tuple(items)


def mode(name: str) -> TrainMode:
    """The :class:`TrainMode` of ``name``; ``ValueError`` naming ``--train-mode`` otherwise.

    >>> mode("renorm"), mode("ghost:4")
    (TrainMode(name='renorm', reference='ema:0.1', virtual_batch_size=None), \
TrainMode(name='ghost:4', reference=None, virtual_batch_size=4))
    """
    kind, _, argument = name.partition(":")
    if name == BATCHNORM:
        return TrainMode(name)
    if kind == RENORM:
        reference = argument or DEFAULT_REFERENCE
        problem = None
        if reference not in strategies.tracked((reference,)):
            problem = "not a strategy tracked in training"
        else:
            try:
                strategies.estimator(reference)
            except (TypeError, ValueError) as error:
                problem = str(error).removeprefix("--strategies: ").removeprefix("name: ")
        if problem is not None:
            raise ValueError(
                f"--train-mode: {name!r}: expected renorm or renorm:<strategy> with a strategy "
                f"tracked in training (cumulative, welford, ema:<momentum>, module:Class), "
                f"got {argument!r} ({problem})"
            )
        return TrainMode(name, reference=reference)
    if kind == GHOST:
        try:
            size = int(argument)
        except ValueError:
            size = 0
        if size < 2:
            raise ValueError(
                f"--train-mode: {name!r}: expected ghost:<virtual batch size>, an integer >= 2, "
                f"got {argument!r}"
            )
        return TrainMode(name, virtual_batch_size=size)
    raise ValueError(
        f"--train-mode: unknown training mode {name!r}; expected batchnorm, renorm, "
        f"renorm:<strategy> or ghost:<virtual batch size>"
    )
