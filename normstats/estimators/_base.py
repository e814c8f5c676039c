"""What every strategy shares: batch validation, the NaN policy, counters and state dicts.

A strategy subclasses :class:`Estimator` and gives its update rule as pure functions of an
explicit state (``initial_state``, ``step``, ``estimate``), which the class shell here holds,
validates and serializes. Validation happens before any state changes, so a rejected batch or
state dict leaves the estimator exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar, cast

import array_api_compat
import attrs

from .._arrays import (
    accumulation_copy,
    accumulation_dtype,
    all_finite,
    as_array,
    check_floating,
    describe,
    quiet_overflow,
    sample_axes,
    split_shape,
)
from .._typing import Array, Axis, Namespace
from .._validation import as_count, as_flag, as_real, check_nan_policy
from ..moments import Moments, ShiftedMoments, non_finite_batch_error, reduce_batch
from ._fold import StackedMoments, fold_by_steps
from ._protocol import RunningStats, StateValue

E = TypeVar("E", bound="Estimator")

State = dict[str, Any]
"""An estimator's state: ``count`` and ``num_batches`` (ints, or 0-d arrays in a layer's
device buffers) and the strategy's arrays."""


class NoBatchError(ValueError, AttributeError):
    """Statistics were read before any batch was seen.

    A ``ValueError``; also an ``AttributeError``, so that ``hasattr(stats, "mean")`` is False
    before the first batch (as scikit-learn's ``NotFittedError``).
    """


@attrs.define(eq=False, repr=False, on_setattr=attrs.setters.NO_OP)
class Estimator:
    """Base of the four strategies; not part of the public API.

    Strategies are declared with ``@attrs.define(eq=False, repr=False,
    on_setattr=attrs.setters.NO_OP)``: hyperparameters are validated when the estimator is
    built and read-only afterwards (private fields behind properties), and the state, which
    changes on every batch, is set without attrs' per-assignment hooks (they cost more than
    the arithmetic of a small batch).
    """

    name: ClassVar[str]
    """Strategy name, used by ``make_stats`` and as the ``state_dict`` key prefix."""
    min_batch_count: ClassVar[int] = 1
    """Fewest samples per feature a batch may have (2 where the unbiased batch variance is used)."""
    array_keys: ClassVar[tuple[str, ...]]
    """Names of the state arrays, in ``state_dict`` order."""
    overflow_keys: ClassVar[tuple[str, ...] | None] = None
    """The state arrays in which any overflow of a fold of finite values shows (checked
    after every fold: a host synchronisation each on an accelerator); None for all of
    ``array_keys``."""

    _nan_policy: str = attrs.field(
        default="raise", kw_only=True, validator=check_nan_policy, alias="nan_policy"
    )
    _state: State | None = attrs.field(default=None, init=False, repr=False)
    """``count``, ``num_batches`` and the arrays of ``array_keys``; None before any batch."""
    _num_batches_skipped: int = attrs.field(default=0, init=False, repr=False)

    # -- the functional core a strategy provides ---------------------------------------
    #
    # Pure functions of an explicit state: no validation, no branches on the data and no
    # host synchronisation, so that a layer keeping the state in device buffers (where
    # counters are 0-d tensors) runs the very same update rule.

    def initial_state(self, template: Array) -> State:
        """The state before any batch, allocated like ``template`` (shape, namespace, device)."""
        raise NotImplementedError

    def step(self, state: State, batch: ShiftedMoments) -> State:
        """The state after folding in ``batch`` (``count`` and ``num_batches`` included)."""
        raise NotImplementedError

    def estimate(self, state: State) -> tuple[Array, Array]:
        """``(mean, unbiased var)`` of a state that has seen a batch."""
        raise NotImplementedError

    def fold(self, state: State, slots: StackedMoments) -> State:
        """The state after folding in ``K`` stacked batches, skipping the masked ones.

        Equal to :meth:`step` over the unmasked slots in order, up to float64 rounding
        (this default is that loop; the built-in strategies use closed forms whose number
        of operations does not grow with ``K``). Counters come back as 0-d arrays.
        """
        return fold_by_steps(self, state, slots)

    def resumed_state(self, template: Array, mean: Array, var: Array, num_batches: Any) -> State:
        """The state that continues from a framework layer's running statistics.

        ``mean``, ``var`` and ``num_batches`` are what ``torch.nn.BatchNorm*d`` keeps
        (``running_mean``, ``running_var``, ``num_batches_tracked``). Strategies that are an
        average of batch statistics (EMA, cumulative) carry on from them exactly as PyTorch
        would; a pool of samples cannot be resumed without its sample count, so the pooled
        strategies start empty.
        """
        return self.initial_state(template)

    def _first_state(self, batch: ShiftedMoments) -> State:
        """The state a first batch is folded into (a strategy may pick an origin from it)."""
        return self.initial_state(batch.m2)

    @property
    def mean(self) -> Array | float:
        """Current estimate of the population mean (each strategy says how)."""
        return self.estimate(self._filled_state("mean"))[0]

    @property
    def var(self) -> Array | float:
        """Current estimate of the population variance, unbiased (each strategy says how)."""
        return self.estimate(self._filled_state("var"))[1]

    def _filled_state(self, name: str) -> State:
        if self._state is None:
            raise NoBatchError(f"{name}: no batch seen yet; {self._unfilled_hint()}")
        return self._state

    def _unfilled_hint(self) -> str:
        return "call update() first"

    def _hyperparameters(self) -> dict[str, int | float | bool]:
        """Settings that a loaded state must agree with."""
        return {}

    # -- the RunningStats protocol ------------------------------------------------------

    @property
    def nan_policy(self) -> str:
        """``"raise"``: a batch with NaN or Inf raises; ``"skip"``: it is skipped and counted."""
        return self._nan_policy

    def __repr__(self) -> str:
        settings = {**self._hyperparameters(), "nan_policy": self._nan_policy}
        arguments = ", ".join(f"{key}={value!r}" for key, value in settings.items())
        return f"{type(self).__name__}({arguments})"

    @property
    def count(self) -> int:
        """Samples folded in (per feature)."""
        return 0 if self._state is None else int(self._state["count"])

    @property
    def num_batches(self) -> int:
        """Batches folded in."""
        return 0 if self._state is None else int(self._state["num_batches"])

    @property
    def num_batches_skipped(self) -> int:
        """Non-finite batches skipped under ``nan_policy="skip"``."""
        return self._num_batches_skipped

    def update(self, x: Array, axis: Axis = 0) -> None:
        """Fold in the batch ``x``, reduced over ``axis`` (``(0, 2, 3)`` for NCHW).

        Raises ``TypeError`` for a non-floating dtype or a masked array and ``ValueError``
        for a batch with too few samples, a feature shape other than earlier batches', or
        NaN/Inf values or a fold whose result overflows float64 (unless
        ``nan_policy="skip"``); the estimator is unchanged when it raises.
        """
        xp, x = as_array(x, "x")
        check_floating(xp, x, "x")
        axes = sample_axes(x, axis)
        feature_shape, count = split_shape(tuple(x.shape), axes)
        self._check_batch(x, feature_shape, count, "x")
        with quiet_overflow(x):  # finiteness is checked, once for the batch and once folded
            batch = reduce_batch(xp, x, axes)
            if batch.finite:
                self._fold(xp, batch, "x")
                return
        self._skip_or_raise(non_finite_batch_error(xp, x, "x"))

    def update_moments(self, moments: Moments) -> None:
        """Fold in precomputed batch :class:`~normstats.Moments`; ``count == 0`` changes nothing.

        As exact as :meth:`update` with the batch itself: the moments' ``mean_residual``
        carries the digits of the mean beyond float64. A fold whose result overflows
        float64 raises ``ValueError`` (or is skipped under ``nan_policy="skip"``).
        """
        given = self._as_batch(moments, min_count=self.min_batch_count)
        if given is None:
            return
        xp, batch = given
        if batch.finite:
            with quiet_overflow(batch.m2):  # the fold is checked
                self._fold(xp, batch, "moments")
        else:
            self._skip_or_raise(ValueError("moments: expected finite mean and m2, got NaN or Inf"))

    def load_moments(self, moments: Moments) -> None:
        """Replace the estimate by population statistics measured elsewhere (a calibration).

        Afterwards ``mean`` is ``moments.mean`` and ``var`` is ``moments.var(ddof=1)``
        whatever the strategy; ``count`` is ``moments.count`` and ``num_batches`` is 1. This is
        how an exact full pass is written into a layer's statistics. Invalid moments raise and
        change nothing.
        """
        given = self._as_batch(moments, min_count=2)
        if given is None or not given[1].finite:
            raise ValueError(
                "moments: expected the finite moments of at least 2 samples, got "
                f"count={moments.count}" + ("" if given is None else " with NaN or Inf")
            )
        xp, batch = given
        with quiet_overflow(batch.m2):  # overflow is checked below
            state = self.calibrated_state(batch)
        if not self._finite(xp, state):
            raise ValueError(
                "moments: expected moments whose statistics fit in float64, got ones whose "
                "estimate overflows"
            )
        self._state = state
        self._num_batches_skipped = 0

    def calibrated_state(self, batch: ShiftedMoments) -> State:
        """A state whose estimate is exactly ``batch``'s mean and unbiased variance.

        Pure like :meth:`step`: how a calibration pass is written into any strategy.
        """
        return self.step(self._first_state(batch), batch)

    def _as_batch(
        self, moments: Moments, min_count: int
    ) -> tuple[Namespace, ShiftedMoments] | None:
        """Validated float64 ``moments`` as a batch (and its namespace), or None when
        ``count`` is 0.

        The batch is the mean's two parts, ``shift = mean`` and ``delta = mean_residual``,
        so that a strategy that keeps its mean to more than float64 precision keeps every
        digit of it. ``finite`` is known from ``m2`` alone: a constructed ``Moments`` is
        finite, and the library's unchecked ones (a NaN training batch's) are finite only
        if their ``m2`` is.
        """
        if not isinstance(moments, Moments):
            raise TypeError(f"moments: expected normstats.Moments, got {type(moments).__name__}")
        if moments.count == 0:
            return None
        if moments.count < min_count:
            raise ValueError(
                f"moments: expected at least {min_count} samples, got count={moments.count}"
            )
        xp = array_api_compat.array_namespace(moments.mean, moments.m2)
        self._check_batch(moments.mean, moments.feature_shape, moments.count, "moments")
        dtype = accumulation_dtype(xp, moments.mean)
        mean = xp.astype(moments.mean, dtype)
        residual = xp.astype(moments.mean_residual, dtype)
        m2 = xp.astype(moments.m2, dtype)
        return xp, ShiftedMoments(moments.count, mean, residual, m2, finite=all_finite(xp, m2))

    def reset(self) -> None:
        """Forget every batch; hyperparameters and ``nan_policy`` stay."""
        self._state = None
        self._num_batches_skipped = 0

    def state_dict(self) -> dict[str, StateValue]:
        """A flat dict of numbers and arrays, keys prefixed by the strategy name.

        It round-trips through ``np.savez`` / ``np.load(allow_pickle=False)`` and
        ``torch.save`` / ``torch.load(weights_only=True)``.
        """
        prefix = self.name + "."
        state: dict[str, StateValue] = {prefix + k: v for k, v in self._hyperparameters().items()}
        state[prefix + "count"] = self.count
        state[prefix + "num_batches"] = self.num_batches
        state[prefix + "num_batches_skipped"] = self._num_batches_skipped
        if self._state is None:
            state.update({prefix + k: v for k, v in self._placeholders().items()})
        else:
            state.update({prefix + k: self._state[k] for k in self.array_keys})
        return state

    def _placeholders(self) -> dict[str, float]:
        """What ``state_dict`` holds for the arrays before the first batch."""
        return dict.fromkeys(self.array_keys, 0.0)

    def load_state_dict(self, state_dict: Mapping[str, object]) -> None:
        """Restore a :meth:`state_dict` of the same strategy and settings.

        Keys, kinds, shapes and hyperparameters are all checked before anything changes: on
        any error the estimator is left exactly as it was.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict: expected a mapping, got {type(state_dict).__name__}")
        prefix = self.name + "."
        expected = set(self.state_dict())
        given = set(state_dict)
        if given != expected:
            strategies = sorted({str(k).split(".")[0] for k in given} - {self.name})
            hint = f" (a state of strategy {strategies[0]!r})" if strategies else ""
            raise ValueError(
                f"state_dict: expected the keys of a {self.name!r} state {sorted(expected)}, "
                f"got {sorted(map(str, given))}{hint}"
            )
        for key, setting in self._hyperparameters().items():
            parse: Callable[[str, object], float] = (
                as_flag if isinstance(setting, bool) else as_real
            )
            value = parse(f"state_dict[{prefix + key!r}]", state_dict[prefix + key])
            if value != setting:
                raise ValueError(
                    f"state_dict[{prefix + key!r}]: expected {setting!r}, this estimator's "
                    f"setting, got {value!r}"
                )
        counters = {
            k: as_count(f"state_dict[{prefix + k!r}]", state_dict[prefix + k])
            for k in ("count", "num_batches", "num_batches_skipped")
        }
        if (counters["count"] == 0) != (counters["num_batches"] == 0):
            raise ValueError(
                f"state_dict: expected {prefix}count and {prefix}num_batches both zero or both "
                f"positive, got {counters['count']} and {counters['num_batches']}"
            )
        values = {k: state_dict[prefix + k] for k in self.array_keys}
        state: State | None = None
        if counters["count"] > 0:
            arrays = _load_arrays(values, prefix)
            state = {"count": counters["count"], "num_batches": counters["num_batches"], **arrays}
            self._check_state(state, prefix)
        else:  # before the first batch the arrays are placeholder numbers
            for key, placeholder in values.items():
                as_real(f"state_dict[{prefix + key!r}]", placeholder)
        self._state = state
        self._num_batches_skipped = counters["num_batches_skipped"]

    def _check_state(self, state: State, prefix: str) -> None:
        """Raise ``ValueError`` for a loaded state that no stream of batches could produce
        (beyond what every state is checked for: finite arrays, non-negative spreads)."""

    # -- shared machinery -----------------------------------------------------------

    def _fold(self, xp: Namespace, batch: ShiftedMoments, name: str) -> None:
        """Fold a finite batch in, unless the result overflows float64: that batch is then
        bad input like a non-finite one (raised, or skipped and counted). Run under
        :func:`quiet_overflow`."""
        state = self._state if self._state is not None else self._first_state(batch)
        new = self.step(state, batch)
        if self._finite(xp, new):
            self._state = new
        else:
            self._skip_or_raise(
                ValueError(
                    f"{name}: expected a batch whose fold into the running statistics fits in "
                    "float64, got one that makes them overflow"
                )
            )

    def _skip_or_raise(self, error: ValueError) -> None:
        """A bad batch: counted in ``num_batches_skipped`` under ``nan_policy="skip"``."""
        if self._nan_policy != "skip":
            raise error
        self._num_batches_skipped += 1

    def _finite(self, xp: Namespace, state: State) -> bool:
        """Whether the arrays of ``state`` that could overflow are finite."""
        return all_finite(xp, *map(state.__getitem__, self.overflow_keys or self.array_keys))

    def _state_template(self) -> Array | None:
        """A state array (its feature shape, namespace and device), or None before any batch."""
        return None if self._state is None else self._state[self.array_keys[-1]]

    def _check_batch(self, x: Array, feature_shape: tuple[int, ...], count: int, name: str) -> None:
        """Sample count, feature shape, array type and device of a batch (or its ``mean``)."""
        if count < self.min_batch_count:
            needed = (
                "at least one sample"
                if self.min_batch_count == 1
                else f"at least {self.min_batch_count} samples per feature (the unbiased batch "
                f"variance of {self.name!r} needs them)"
            )
            raise ValueError(f"{name}: expected {needed}, got {count} ({describe(x)})")
        template = self._state_template()
        if template is None:
            return
        if template.shape != feature_shape:
            raise ValueError(
                f"{name}: expected feature shape {tuple(template.shape)} as in earlier "
                f"batches, got {feature_shape} ({describe(x)})"
            )
        if type(x) is not type(template) and (
            array_api_compat.array_namespace(x) is not array_api_compat.array_namespace(template)
        ):
            raise TypeError(
                f"{name}: expected a {type(template).__module__}.{type(template).__name__} "
                f"like the estimator's state, got {type(x).__module__}.{type(x).__name__}"
            )
        # NumPy arrays have no ``device`` before NumPy 2.0 (and are all on the CPU).
        device, expected = getattr(x, "device", None), getattr(template, "device", None)
        if device != expected:
            raise ValueError(
                f"{name}: expected an array on {expected}, where the statistics are, "
                f"got one on {device}"
            )

    def _check_mergeable(self: E, other: object) -> E:
        if type(other) is not type(self):
            raise TypeError(
                f"other: expected a {type(self).__name__} to merge, got {type(other).__name__}"
            )
        other = cast(E, other)  # type: ignore[redundant-cast]  # exact type checked above
        mine, theirs = self._state_template(), other._state_template()
        if mine is not None and theirs is not None and mine.shape != theirs.shape:
            raise ValueError(
                f"other: expected feature shape {tuple(mine.shape)}, got {tuple(theirs.shape)}"
            )
        return other

    def merge(self, other: RunningStats) -> None:
        """Fold in another estimator's stream (each strategy says whether it can).

        Raises ``ValueError`` when the merged statistics overflow float64; both estimators
        are then unchanged.
        """
        theirs = self._check_mergeable(other)
        mine = self._state
        if theirs._state is not None and mine is not None:
            with quiet_overflow(mine[self.array_keys[0]]):  # overflow is checked below
                merged = {
                    "count": mine["count"] + theirs._state["count"],
                    "num_batches": mine["num_batches"] + theirs._state["num_batches"],
                    **self._merge_arrays(mine, theirs._state),
                }
            xp = array_api_compat.array_namespace(merged[self.array_keys[0]])
            if not self._finite(xp, merged):
                raise ValueError(
                    "other: expected an estimator whose merge with this one fits in float64, "
                    "got one whose merged statistics overflow"
                )
            self._state = merged
        elif theirs._state is not None:
            self._state = dict(theirs._state)
        self._num_batches_skipped += theirs._num_batches_skipped

    def _merge_arrays(self, mine: State, theirs: State) -> dict[str, Array]:
        """The arrays of the union of two filled states."""
        raise NotImplementedError


NON_NEGATIVE = frozenset({"m2", "var"})
"""State arrays that hold spreads, which a valid state never has negative."""


def _load_arrays(values: dict[str, object], prefix: str) -> dict[str, Array]:
    """Validate state arrays (floating, finite, one shape) and convert them to float64."""
    arrays: dict[str, Array] = {}
    shape: tuple[int, ...] | None = None
    for key, value in values.items():
        name = f"state_dict[{prefix + key!r}]"
        if type(value) in (int, float):  # a placeholder; NumPy scalars are 0-d statistics
            raise ValueError(f"{name}: expected an array of statistics, got the number {value!r}")
        xp, array = as_array(value, name)
        check_floating(xp, array, name)
        if shape is not None and tuple(array.shape) != shape:
            raise ValueError(
                f"{name}: expected shape {shape} like the others, got {describe(array)}"
            )
        shape = tuple(array.shape)
        array = accumulation_copy(xp, array)
        if not all_finite(xp, array):
            raise ValueError(f"{name}: expected finite values, got NaN or Inf")
        if key in NON_NEGATIVE and not bool(xp.all(array >= 0)):
            raise ValueError(f"{name}: expected non-negative values, got negative ones")
        arrays[key] = array
    return arrays


# Every strategy implements the protocol; registering makes isinstance() true even before
# the first batch, when reading ``mean`` raises NoBatchError (Python < 3.12 reads it).
RunningStats.register(Estimator)
