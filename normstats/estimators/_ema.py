r"""The exponential moving average: PyTorch's and Keras/Flax's running statistics."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import attrs

from .._arrays import all_finite, as_array, quiet_overflow
from ..moments import Moments
from ..typing import Array
from ..validation import check_unit_interval
from ._batch_average import BatchAverage
from ._protocol import RunningStats
from ._strategy import State


def _check_momentum(instance: object, attribute: Any, value: object) -> None:
    check_unit_interval("momentum", value)


def _check_debias(instance: object, attribute: Any, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"debias: expected a bool, got {type(value).__name__} {value!r}")


@attrs.define(eq=False, repr=False, on_setattr=attrs.setters.NO_OP)
class ExponentialMovingAverage(BatchAverage):
    r"""Exponential moving average of batch means and unbiased batch variances.

    With ``momentum`` :math:`m` (the weight of the new batch, PyTorch's convention; Keras and
    Flax call :math:`d = 1 - m` the decay, see :meth:`from_decay`):

    .. math::

        \mu \leftarrow (1 - m)\,\mu + m\,\bar x_b,\qquad
        \sigma^2 \leftarrow (1 - m)\,\sigma^2 + m\,s_b^2

    where :math:`s_b^2` is the unbiased batch variance. Batches are weighted geometrically by
    age, not by size. Initialized as PyTorch does (mean 0, variance 1, reported as scalars
    that broadcast before the first batch), the estimate equals ``torch.nn.BatchNorm*d``'s
    ``running_mean`` and ``running_var`` fed the same batches.

    With ``debias=True`` the averages start at zero and are divided by
    :math:`1 - (1 - m)^t` after :math:`t` batches (Adam's bias correction, computed as
    :math:`-\operatorname{expm1}(t \log(1 - m))` so that a small momentum keeps its
    digits), so the estimate after the first batch is that batch's statistics; reading it
    earlier raises ``ValueError``. An EMA has no exact merge (it depends on the order of the
    batches): ``merge`` raises ``TypeError``.

    Parameters
    ----------
    momentum : float
        Weight of the newest batch, in (0, 1]. Default 0.1, PyTorch's default.
    debias : bool
        Zero initialization with bias correction instead of PyTorch's 0/1 initialization.
    nan_policy : {"raise", "skip"}
        What to do with a batch containing NaN or Inf.

    Examples
    --------
    >>> import numpy as np
    >>> import normstats as ns
    >>> stats = ns.EMA(momentum=0.5)
    >>> stats.update(np.array([[2.0], [4.0]]))
    >>> stats.mean.tolist(), stats.var.tolist()
    ([1.5], [1.5])
    """

    name: ClassVar[str] = "ema"

    _momentum: float = attrs.field(default=0.1, validator=_check_momentum, alias="momentum")
    _debias: bool = attrs.field(default=False, validator=_check_debias, alias="debias")
    _mean: Array = attrs.field(default=None, init=False, repr=False)
    _var: Array = attrs.field(default=None, init=False, repr=False)

    @classmethod
    def from_decay(cls, decay: float, **kwargs: Any) -> ExponentialMovingAverage:
        """Build from a Keras/Flax decay ``d`` in [0, 1): ``momentum = 1 - d``.

        >>> ExponentialMovingAverage.from_decay(0.75).momentum
        0.25
        """
        momentum = 1.0 - check_unit_interval("decay", decay, include_zero=True)
        # 1 - 0.99 is 0.010000000000000009 in binary; the decimal the user meant is 0.01.
        return cls(momentum=float(f"{momentum:.15g}"), **kwargs)

    @property
    def momentum(self) -> float:
        """Weight of the newest batch, in (0, 1]."""
        return self._momentum

    @property
    def debias(self) -> bool:
        """Whether the averages start at zero and are bias-corrected."""
        return self._debias

    @property
    def mean(self) -> Array | float:
        """Moving average of batch means (0.0 before the first batch unless debiased)."""
        if self._state is None and not self._debias:
            return 0.0
        return self.estimate(self._filled_state("mean"))[0]

    @property
    def var(self) -> Array | float:
        """Moving average of unbiased batch variances (1.0 before the first batch)."""
        if self._state is None and not self._debias:
            return 1.0
        return self.estimate(self._filled_state("var"))[1]

    def merge(self, other: RunningStats) -> None:
        """Not available: refuses with ``TypeError``.

        An exponential moving average weights batches by their position in one stream; two
        averages of separate streams do not determine the average of any single stream.
        """
        raise TypeError(
            "merge: an exponential moving average has no exact merge (it depends on the order "
            "of the batches); merge Welford, ExactFullPass or CumulativeAverage instead"
        )

    def hyperparameters(self) -> dict[str, int | float | bool]:
        return {"momentum": self.momentum, "debias": self.debias}

    def _unfilled_hint(self) -> str:
        return "a debiased EMA needs one first"

    # -- functional core ---------------------------------------------------------------

    def initial_state(self, template: Array) -> State:
        # PyTorch starts at mean 0, variance 1; the debiased average starts at zero.
        return {
            "count": 0,
            "num_batches": 0,
            "mean": template * 0.0,
            "var": template * 0.0 + (0.0 if self._debias else 1.0),
        }

    def resumed_state(self, template: Array, mean: Array, var: Array, num_batches: Any) -> State:
        zeros = template * 0.0
        scale = self._bias_correction(num_batches) if self._debias else 1.0
        return {
            "count": 0,
            "num_batches": num_batches,
            "mean": zeros + mean * scale,
            "var": zeros + var * scale,
        }

    def batch_weight(self, state: State) -> Any:
        return self._momentum

    def estimate(self, state: State) -> tuple[Array, Array]:
        if not self._debias:
            return state["mean"], state["var"]
        correction = self._bias_correction(state["num_batches"])
        return state["mean"] / correction, state["var"] / correction

    def _bias_correction(self, num_batches: Any) -> Any:
        """``1 - (1 - m)**t`` after ``t`` batches, as ``-expm1(t * log1p(-m))``.

        The direct formula cancels when ``(1 - m)**t`` is near 1: it loses digits for a
        small momentum (8e-8 relative at m = 1e-10) and gives 0, so an infinite estimate,
        once ``1 - m`` rounds to 1 (m < 1.1e-16). ``t`` is an int or a 0-d array.
        """
        if self._momentum == 1.0:  # log1p(-1) is -inf, and 0 * -inf would be NaN
            return 1.0 - 0.0**num_batches
        exponent = num_batches * math.log1p(-self._momentum)
        if isinstance(exponent, float):
            return -math.expm1(exponent)
        xp, exponent = as_array(exponent, "num_batches")
        return -xp.expm1(exponent)

    def _check_state(self, state: State, prefix: str) -> None:
        # A debiased state is divided by the bias correction, which is below 1: a finite
        # state whose estimate overflows is not one that updates could have produced.
        if not self._debias:
            return
        with quiet_overflow(state["mean"]):
            mean, var = self.estimate(state)
        if not all_finite(as_array(mean, "mean")[0], mean, var):
            raise ValueError(
                f"state_dict: expected a state whose bias-corrected estimate is finite, got "
                f"{prefix}mean and {prefix}var that overflow when divided by the correction "
                f"for {prefix}num_batches={state['num_batches']}"
            )

    def calibrated_state(self, batch: Moments) -> State:
        # The estimate after one batch must be the batch itself: the state of an average
        # whose only batch it was (scaled by the bias correction for t = 1).
        scale = self._momentum if self._debias else 1.0
        return {
            "count": batch.count,
            "num_batches": 1,
            "mean": batch.mean * scale,
            "var": batch.m2 / (batch.count - 1) * scale,
        }

    def _placeholders(self) -> dict[str, float]:
        return {"mean": 0.0, "var": 0.0 if self._debias else 1.0}


EMA = ExponentialMovingAverage
"""Short alias of :class:`ExponentialMovingAverage`."""
