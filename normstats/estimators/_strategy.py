"""The strategy protocol: an update rule over a state of arrays, under a stateful shell.

A strategy subclasses :class:`Strategy` and gives its update rule as pure functions of an
explicit state (``initial_state``, ``step``, ``estimate``, and optionally ``merge_states``,
``calibrated_state``, ``resumed_state``, ``fold``), which the class shell here holds,
validates and serializes. Validation happens before any state changes, so a rejected batch or
state dict leaves the estimator exactly as it was. The same pure functions run on a layer's
device buffers: the torch adapter keeps the state in float64 tensors and calls them itself.
docs/strategies.md walks through writing one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar, cast

import array_api_compat
import attrs
import numpy as np

from .._arrays import (
    accumulation_copy,
    all_finite,
    as_array,
    check_floating,
    describe,
    quiet_overflow,
    sample_axes,
    split_shape,
)
from ..deferred import DeferredArrays, ReducedBatch, handler_for
from ..moments import (
    Moments,
    moments_of_batch,
    non_finite_batch_error,
    reduce_batch,
)
from ..typing import Array, Axis, Namespace
from ..validation import as_count, as_flag, as_real, check_nan_policy
from ._fold import StackedMoments, fold_by_steps
from ._protocol import RunningStats, StateValue

E = TypeVar("E", bound="Strategy")

State = dict[str, Any]
"""An estimator's state: ``count`` and ``num_batches`` (ints, or 0-d arrays in a layer's
device buffers) and the strategy's arrays."""


class NoBatchError(ValueError, AttributeError):
    """Statistics were read before any batch was seen.

    A ``ValueError``; also an ``AttributeError``, so that ``hasattr(stats, "mean")`` is False
    before the first batch (as scikit-learn's ``NotFittedError``).
    """


# Not slotted: a user may subclass it as a plain class with attributes of its own, which
# pickling and copying then keep (a slotted base would drop them).
@attrs.define(eq=False, repr=False, on_setattr=attrs.setters.NO_OP, slots=False)
class Strategy:
    r"""A population-statistics strategy: a pure update rule under a stateful shell.

    Subclass it to write a strategy of your own; the four built-in ones are subclasses too,
    and a subclass runs wherever they do (:func:`~normstats.make_stats`, the
    :class:`~normstats.Standardizer`, :class:`~normstats.BatchNorm`, the torch layer and
    ``recalibrate``, distributed training, state dicts and the comparison).

    **What a strategy provides.** Class attributes ``name`` (an identifier: the
    ``state_dict`` key prefix and the name of the torch layer's buffer module) and
    ``array_keys`` (the names of its state arrays), and three pure functions of an explicit
    *state*, a dict holding ``count`` and ``num_batches`` (numbers, or 0-d arrays) and one
    array per name in ``array_keys``:

    * :meth:`initial_state` ``(template)``: the state before any batch, its arrays allocated
      like ``template``, an array of the feature shape (namespace, device, dtype float64);
    * :meth:`step` ``(state, batch)``: the state after one batch, whose ``count``, ``mean``
      and ``m2`` (sum of squared deviations) come as a :class:`~normstats.Moments`;
    * :meth:`estimate` ``(state)``: the ``(mean, unbiased variance)`` of a state.

    Optionally: :meth:`merge_states` with ``mergeable = True`` (an exact merge of two
    streams), :meth:`calibrated_state` (how a calibration pass is written in),
    :meth:`resumed_state` (how training resumes from a framework layer's running
    statistics), :meth:`fold` (many batches at once; the default loops over :meth:`step`),
    :meth:`hyperparameters` (the settings a state dict carries) and ``min_batch_count``.

    **What a strategy may do.** The functions receive and return arrays of one namespace,
    NumPy's or torch's, on any device: write them with the array-API operations of that
    namespace (``array_api_compat.array_namespace(x)``; arithmetic operators, ``where``,
    ``sum``, ``concat``, ``reshape``, ``@``...) so that one definition runs on both. They
    must not validate, branch on the data or read values to the host (``float(x)``,
    ``bool(x)``): a layer keeps the state in device buffers, where the counters are 0-d
    tensors, and calls them on every training step, and a skipped batch is masked out of
    their result rather than tested for.

    **What the shell guarantees.** Batches reach :meth:`step` validated: of a floating
    dtype, finite, of the feature shape of earlier batches, with at least
    ``min_batch_count`` samples per feature, on the state's device, and in float64 (or
    float32 where the device has no float64). Before any batch the shell holds no state
    (reading ``mean`` raises :class:`NoBatchError`). A step whose result is not finite in
    the arrays of ``overflow_keys`` is refused like a batch with NaN. State arrays have
    shape ``(*leading, *feature_shape)``, where the ``leading`` axes of each key are
    what :meth:`initial_state` gives for a 0-d ``template`` (none, for the built-ins).

    Subclasses are declared with ``@attrs.define(eq=False, repr=False,
    on_setattr=attrs.setters.NO_OP)`` or as plain classes: hyperparameters are validated
    when the estimator is built and read-only afterwards, and the state, which changes on
    every batch, is set without attrs' per-assignment hooks.

    Parameters
    ----------
    nan_policy : {"raise", "skip"}
        What a batch with NaN or Inf does: raise ``ValueError``, or get skipped and counted
        in ``num_batches_skipped``.
    """

    name: ClassVar[str]
    """Strategy name, an identifier: the ``state_dict`` key prefix."""
    array_keys: ClassVar[tuple[str, ...]]
    """Names of the state arrays, in ``state_dict`` order."""
    min_batch_count: ClassVar[int] = 1
    """Fewest samples per feature a batch may have (2 where the unbiased batch variance is used)."""
    mergeable: ClassVar[bool] = False
    """Whether :meth:`merge_states` is an exact merge of two streams (``merge``,
    ``all_reduce_stats`` and merged checkpoints need one)."""
    non_negative_keys: ClassVar[tuple[str, ...]] = ()
    """State arrays that hold spreads: a loaded state with negative values there is refused."""
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
    _leading: dict[str, tuple[int, ...]] | None = attrs.field(default=None, init=False, repr=False)
    """The leading axes of each state array (what :meth:`initial_state` gives for a 0-d
    template), found once."""

    # -- the functional core a strategy provides ---------------------------------------
    #
    # Pure functions of an explicit state: no validation, no branches on the data and no
    # host synchronisation, so that a layer keeping the state in device buffers (where
    # counters are 0-d tensors) runs the very same update rule.

    def initial_state(self, template: Array) -> State:
        """The state before any batch, allocated like ``template`` (shape, namespace, device)."""
        raise NotImplementedError(f"{type(self).__name__} does not define initial_state")

    def step(self, state: State, batch: Moments) -> State:
        """The state after folding in ``batch`` (``count`` and ``num_batches`` included).

        ``batch.mean + batch.mean_residual`` is the batch mean to more than float64
        precision (``mean_residual`` is zero or tiny; a strategy may ignore it).
        """
        raise NotImplementedError(f"{type(self).__name__} does not define step")

    def estimate(self, state: State) -> tuple[Array, Array]:
        """``(mean, unbiased var)`` of a state that has seen a batch."""
        raise NotImplementedError(f"{type(self).__name__} does not define estimate")

    def merge_states(self, mine: State, theirs: State) -> State:
        """The state of both streams together (``count`` and ``num_batches`` included), for
        a strategy with ``mergeable = True``."""
        raise TypeError(f"merge: strategy {self.name!r} ({type(self).__name__}) has no merge")

    def hyperparameters(self) -> dict[str, int | float | bool]:
        """The settings a state must agree with to be loaded (and ``repr`` shows)."""
        return {}

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
        strategies (and, by default, any strategy) start empty.
        """
        return self.initial_state(template)

    def state_shapes(self, feature_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """The shape of each state array for statistics of ``feature_shape``: its leading
        axes (those :meth:`initial_state` gives a 0-d template), then ``feature_shape``."""
        if self._leading is None:
            scalar = self.initial_state(np.zeros((), dtype=np.float64))
            self._leading = {key: tuple(np.shape(scalar[key])) for key in self.array_keys}
        return {key: leading + tuple(feature_shape) for key, leading in self._leading.items()}

    def calibrated_state(self, batch: Moments) -> State:
        """A state whose estimate is exactly ``batch``'s mean and unbiased variance.

        Pure like :meth:`step`: how a calibration pass is written into any strategy. The
        default steps the initial state once with ``batch``.
        """
        return self.step(self._first_state(batch), batch)

    def _first_state(self, batch: Moments) -> State:
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

    # -- the RunningStats protocol ------------------------------------------------------

    @property
    def nan_policy(self) -> str:
        """``"raise"``: a batch with NaN or Inf raises; ``"skip"``: it is skipped and counted."""
        return self._nan_policy

    def __repr__(self) -> str:
        settings = {**self.hyperparameters(), "nan_policy": self._nan_policy}
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
        ``nan_policy="skip"``); the estimator is unchanged when it raises. A Dask array (with
        ``normstats.adapters.dask`` imported) is one batch, reduced on its cluster.
        """
        xp, x = as_array(x, "x")
        check_floating(xp, x, "x")
        axes = sample_axes(x, axis)
        feature_shape, count = split_shape(tuple(x.shape), axes)
        deferred = handler_for(x)
        if deferred is not None:
            self._update_deferred(deferred, x, axes, feature_shape, count)
            return
        self._check_batch(x, feature_shape, count, "x")
        with quiet_overflow(x):  # finiteness is checked, once for the batch and once folded
            batch = reduce_batch(xp, x, axes)
            if batch.finite:
                self._fold(xp, moments_of_batch(xp, batch), "x")
                return
        self._skip_or_raise(non_finite_batch_error(xp, x, "x"))

    def _update_deferred(
        self,
        deferred: DeferredArrays,
        x: Array,
        axes: tuple[int, ...],
        feature_shape: tuple[int, ...],
        count: int,
    ) -> None:
        """Fold in a batch whose data live elsewhere (a Dask array, see
        :mod:`normstats.deferred`): checked on its shape first where its sizes are known,
        reduced where its data are, in one pass, then folded as an in-memory batch."""
        template = self._state_template()
        if template is not None and type(template) is not np.ndarray:
            raise TypeError(
                f"x: expected a {type(template).__module__}.{type(template).__name__} like the "
                f"estimator's state, got {type(x).__module__}.{type(x).__name__}, whose "
                "statistics arrive as NumPy arrays"
            )
        if not math.isnan(sum(x.shape)):  # a Dask array's sizes may be unknown until computed
            self._check_sizes(x, feature_shape, count, "x")
        self._update_reduced(deferred.reduce(x, axes, ignore_nan=False), x)

    def _update_reduced(self, batch: ReducedBatch, x: Array) -> None:
        """Fold in the statistics of the batch ``x``, reduced where its data live."""
        self._check_sizes(x, batch.feature_shape, batch.moments().count, "x")
        if not batch.finite:
            self._skip_or_raise(batch.error("x"))
            return
        with quiet_overflow(batch.m2):  # the fold is checked
            self._fold(np, batch.moments(), "x")

    def update_moments(self, moments: Moments) -> None:
        """Fold in precomputed batch :class:`~normstats.Moments`; ``count == 0`` changes nothing.

        As exact as :meth:`update` with the batch itself: the moments' ``mean_residual``
        carries the digits of the mean beyond float64. A fold whose result overflows
        float64 raises ``ValueError`` (or is skipped under ``nan_policy="skip"``).
        """
        _update_moments_of((self,), moments)

    def load_moments(self, moments: Moments, *, num_batches_skipped: int = 0) -> None:
        """Replace the estimate by population statistics measured elsewhere (a calibration).

        Afterwards ``mean`` is ``moments.mean`` and ``var`` is ``moments.var(ddof=1)``
        whatever the strategy; ``count`` is ``moments.count`` and ``num_batches`` is 1. This is
        how an exact full pass is written into a layer's statistics, and
        ``num_batches_skipped`` the batches it left out (non-finite ones). Invalid moments
        raise and change nothing.
        """
        skipped = as_count("num_batches_skipped", num_batches_skipped)
        given = self._as_batch(moments, min_count=2)
        if given is None or not given[2]:
            raise ValueError(
                "moments: expected the finite moments of at least 2 samples, got "
                f"count={moments.count}" + ("" if given is None else " with NaN or Inf")
            )
        xp, batch, _ = given
        with quiet_overflow(batch.m2):  # overflow is checked below
            state = self.calibrated_state(batch)
        if not self._finite(xp, state):
            raise ValueError(
                "moments: expected moments whose statistics fit in float64, got ones whose "
                "estimate overflows"
            )
        self._state = state
        self._num_batches_skipped = skipped

    def _as_batch(self, moments: Moments, min_count: int) -> tuple[Namespace, Moments, bool] | None:
        """Validated ``moments`` in float64 (their namespace, the batch and whether it is
        finite), or None when ``count`` is 0."""
        if not _given_moments(moments):
            return None
        self._check_moments(moments, min_count)
        return _in_float64(moments)

    def _check_moments(self, moments: Moments, min_count: int) -> None:
        """What a batch's moments must be for this estimator: ``min_count`` samples or more,
        and the feature shape, array type and device of its state."""
        if moments.count < min_count:
            raise ValueError(
                f"moments: expected at least {min_count} samples, got count={moments.count}"
            )
        self._check_batch(moments.mean, moments.feature_shape, moments.count, "moments")

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
        state: dict[str, StateValue] = {prefix + k: v for k, v in self.hyperparameters().items()}
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
        for key, setting in self.hyperparameters().items():
            parse: Callable[[str, object], float] = (
                as_flag if isinstance(setting, bool) else as_real
            )
            value = parse(f"state_dict[{prefix + key!r}]", state_dict[prefix + key])
            if type(setting) is int and float(value).is_integer():
                value = int(value)
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
            arrays = _load_arrays(self, values, prefix)
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

    def _fold(self, xp: Namespace, batch: Moments, name: str) -> None:
        """Fold a finite batch in, unless the result overflows float64: that batch is then
        bad input like a non-finite one (raised, or skipped and counted). Run under
        :func:`quiet_overflow`."""
        new = self._folded(xp, batch)
        if new is None:
            self._skip_or_raise(_overflow_error(name))
        else:
            self._state = new

    def _folded(self, xp: Namespace, batch: Moments) -> State | None:
        """The state with a finite batch folded in, or None when it overflows float64."""
        state = self._state if self._state is not None else self._first_state(batch)
        new = self.step(state, batch)
        return new if self._finite(xp, new) else None

    def _skip_or_raise(self, error: ValueError) -> None:
        """A bad batch: counted in ``num_batches_skipped`` under ``nan_policy="skip"``."""
        if self._nan_policy != "skip":
            raise error
        self._num_batches_skipped += 1

    def _finite(self, xp: Namespace, state: State) -> bool:
        """Whether the arrays of ``state`` that could overflow are finite."""
        return all_finite(xp, *map(state.__getitem__, self.overflow_keys or self.array_keys))

    def _state_template(self) -> Array | None:
        """A state array (its namespace and device), or None before any batch."""
        return None if self._state is None else self._state[self.array_keys[-1]]

    def _feature_shape(self) -> tuple[int, ...] | None:
        """The feature shape of the statistics, or None before any batch."""
        template = self._state_template()
        if template is None:
            return None
        if self._leading is None:
            self.state_shapes(())  # finds the leading axes once
        assert self._leading is not None
        return tuple(template.shape)[len(self._leading[self.array_keys[-1]]) :]

    def _check_batch(self, x: Array, feature_shape: tuple[int, ...], count: int, name: str) -> None:
        """Sample count, feature shape, array type and device of a batch (or its ``mean``)."""
        self._check_sizes(x, feature_shape, count, name)
        template = self._state_template()
        if template is None:
            return
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

    def _check_sizes(self, x: Array, feature_shape: tuple[int, ...], count: int, name: str) -> None:
        """Sample count and feature shape of a batch (or its ``mean``)."""
        if count < self.min_batch_count:
            needed = (
                "at least one sample"
                if self.min_batch_count == 1
                else f"at least {self.min_batch_count} samples per feature (the unbiased batch "
                f"variance of {self.name!r} needs them)"
            )
            raise ValueError(f"{name}: expected {needed}, got {count} ({describe(x)})")
        expected_shape = self._feature_shape()
        if expected_shape is not None and expected_shape != feature_shape:
            raise ValueError(
                f"{name}: expected feature shape {expected_shape} as in earlier "
                f"batches, got {feature_shape} ({describe(x)})"
            )

    def _check_mergeable(self: E, other: object) -> E:
        if type(other) is not type(self):
            raise TypeError(
                f"other: expected a {type(self).__name__} to merge, got {type(other).__name__}"
            )
        other = cast(E, other)  # type: ignore[redundant-cast]  # exact type checked above
        mine, theirs = self._feature_shape(), other._feature_shape()
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(f"other: expected feature shape {mine}, got {theirs}")
        return other

    def merge(self, other: RunningStats) -> None:
        """Fold in another estimator's stream, for a strategy with ``mergeable = True``
        (one without raises ``TypeError``).

        Raises ``ValueError`` when the merged statistics overflow float64; both estimators
        are then unchanged.
        """
        if not self.mergeable:
            raise TypeError(
                f"merge: strategy {self.name!r} ({type(self).__name__}) has no exact merge "
                f"(its mergeable is False)"
            )
        theirs = self._check_mergeable(other)
        mine = self._state
        if theirs._state is not None and mine is not None:
            with quiet_overflow(mine[self.array_keys[0]]):  # overflow is checked below
                merged = self.merge_states(mine, theirs._state)
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


def update_moments_all(estimators: Iterable[Strategy], moments: Moments) -> None:
    """Fold the same batch :class:`~normstats.Moments` into every estimator of ``estimators``.

    What ``stats.update_moments(moments)`` does for each of them, with the moments checked and
    converted to float64 once rather than once per estimator: the way to track several
    strategies on one stream of batches (the comparison does so on every training step of
    every layer). Each estimator still checks what depends on it (its fewest samples per
    batch, the feature shape, array type and device of its state) and applies its own
    ``nan_policy`` to a batch with NaN or Inf and to a fold that overflows float64. A batch
    that one of them refuses raises before any of them changes; ``count == 0`` changes
    nothing.

    >>> import numpy as np
    >>> import normstats as ns
    >>> from normstats.estimators import update_moments_all
    >>> welford, ema = ns.Welford(), ns.EMA(momentum=0.5)
    >>> update_moments_all([welford, ema], ns.Moments.from_array(np.array([[1.0], [3.0]])))
    >>> update_moments_all([welford, ema], ns.Moments.from_array(np.array([[5.0], [7.0]])))
    >>> welford.mean.tolist(), ema.mean.tolist()
    ([4.0], [3.5])
    """
    _update_moments_of(_distinct(estimators), moments)


def _update_moments_of(
    estimators: Sequence[Strategy], moments: Moments, name: str = "moments"
) -> None:
    """:func:`update_moments_all` for distinct strategies; a non-finite or overflowing batch
    is reported as the parameter ``name``."""
    if not _given_moments(moments):
        return
    for stats in estimators:
        stats._check_moments(moments, stats.min_batch_count)
    xp, batch, finite = _in_float64(moments)
    if not finite:
        _skip_or_raise_all(
            estimators, ValueError(f"{name}: expected finite mean and m2, got NaN or Inf")
        )
        return
    with quiet_overflow(batch.m2):  # every fold is checked
        folded = [stats._folded(xp, batch) for stats in estimators]
    _skip_or_raise_all(
        [stats for stats, new in zip(estimators, folded, strict=True) if new is None],
        _overflow_error(name),
    )
    for stats, new in zip(estimators, folded, strict=True):
        if new is not None:
            stats._state = new


def update_stacked_all(estimators: Iterable[Strategy], slots: StackedMoments) -> None:
    """Fold ``K`` stacked batches into every estimator of ``estimators`` at once.

    What :func:`update_moments_all` does for each slot in order, up to float64 rounding, with
    each estimator's :meth:`Strategy.fold`: the built-in strategies fold all ``K`` batches in a
    number of operations that does not grow with ``K``. This is the way to track strategies
    on a stream of small batches, whose per-batch updates cost more than the batches (the
    comparison folds its training steps so). ``slots`` come from
    :meth:`StackedMoments.from_batches` or are built by hand (host-int counts).

    A slot of ``count == 0`` changes nothing, as in :func:`update_moments_all`. A masked slot
    (a batch with NaN or Inf) is a bad batch: it raises ``ValueError`` before
    any estimator changes if one of them has ``nan_policy="raise"``, else each skips and
    counts it. A fold that overflows float64 is retried slot by slot, so that each estimator
    applies its ``nan_policy`` to the very batch that overflows; the error (naming the slot,
    as ``slots[3]``) leaves every estimator as it was before the call.

    >>> import numpy as np
    >>> import normstats as ns
    >>> from normstats.estimators import StackedMoments, update_stacked_all
    >>> welford, ema = ns.Welford(), ns.EMA(momentum=0.5)
    >>> batches = np.array([[[1.0], [3.0]], [[5.0], [7.0]]])  # two batches of two samples
    >>> update_stacked_all([welford, ema], StackedMoments.from_batches(batches))
    >>> welford.mean.tolist(), ema.mean.tolist(), ema.num_batches
    ([4.0], [3.5], 2)
    """
    estimators = _distinct(estimators)
    if not isinstance(slots, StackedMoments):
        raise TypeError(f"slots: expected StackedMoments, got {type(slots).__name__}")
    xp, slots = _stacked_in_float64(slots)
    counts = [int(count) for count in slots.counts]
    sizes = [count for count in counts if count]  # a slot without samples changes nothing
    if not sizes:
        return
    feature_shape = tuple(slots.means.shape[1:])
    for stats in estimators:
        stats._check_batch(slots.means[0], feature_shape, min(sizes), "slots")
    finite = [bool(keep) for keep in slots.finite]
    bad = [
        k for k, (keep, count) in enumerate(zip(finite, counts, strict=True)) if count and not keep
    ]
    kept = [keep and count > 0 for keep, count in zip(finite, counts, strict=True)]
    if len(sizes) < len(counts):  # the empty slots masked out of the fold too
        slots = slots._replace(finite=xp.asarray(kept, device=array_api_compat.device(slots.means)))
    before = [(stats._state, stats._num_batches_skipped) for stats in estimators]
    try:
        _fold_slots(xp, estimators, slots, kept, bad)
    except BaseException:  # anything that fails leaves every estimator as it was
        for stats, (state, skipped) in zip(estimators, before, strict=True):
            stats._state, stats._num_batches_skipped = state, skipped
        raise


def _fold_slots(
    xp: Namespace,
    estimators: Sequence[Strategy],
    slots: StackedMoments,
    kept: list[bool],
    bad: list[int],
) -> None:
    """:func:`update_stacked_all` once the slots are checked: the ``bad`` ones (masked,
    with samples) skipped or raised, the ``kept`` ones folded."""
    if bad:
        _skip_or_raise_all(
            estimators,
            ValueError(
                f"slots: expected finite batches, got {len(bad)} of {len(kept)} with NaN or Inf "
                f"(slot {bad[0]} first)"
            ),
            times=len(bad),
        )
    if not any(kept):
        return
    with quiet_overflow(slots.m2s):  # every fold is checked
        folded: list[State] = []
        for stats in estimators:
            state = stats._state
            if state is None:
                state = stats.initial_state(slots.m2s[0] * 0.0)
            folded.append(stats.fold(state, slots))
    fits = [stats._finite(xp, new) for stats, new in zip(estimators, folded, strict=True)]
    if not all(fits):  # which batch overflows: one at a time
        for k, keep in enumerate(kept):
            if keep:
                _update_moments_of(estimators, _slot(slots, k), f"slots[{k}]")
        return
    for stats, new in zip(estimators, folded, strict=True):
        stats._state = {**new, "count": int(new["count"]), "num_batches": int(new["num_batches"])}


def _distinct(estimators: Iterable[Strategy]) -> tuple[Strategy, ...]:
    """``estimators`` as a tuple of distinct strategies (``TypeError``, ``ValueError``)."""
    estimators = tuple(estimators)
    for stats in estimators:
        if not isinstance(stats, Strategy):
            raise TypeError(
                f"estimators: expected normstats.Strategy instances, got {type(stats).__name__}"
            )
    if len({id(stats) for stats in estimators}) < len(estimators):
        raise ValueError("estimators: expected distinct estimators, got one more than once")
    return estimators


def _stacked_in_float64(slots: StackedMoments) -> tuple[Namespace, StackedMoments]:
    """``slots`` with their statistics copied into float64 (float32 where the device has
    none), and their namespace."""
    xp = as_array(slots.means, "slots")[0]
    copied = [
        None if a is None else accumulation_copy(xp, a)
        for a in (slots.means, slots.m2s, slots.mean_residuals)
    ]
    return xp, StackedMoments(slots.counts, copied[0], copied[1], slots.finite, copied[2])


def _slot(slots: StackedMoments, k: int) -> Moments:
    """Slot ``k`` of finite ``slots`` as the batch's :class:`Moments`."""
    mean = slots.means[k]
    residual = mean * 0.0 if slots.mean_residuals is None else slots.mean_residuals[k]
    return Moments._trusted(int(slots.counts[k]), mean, slots.m2s[k], residual)


def _given_moments(moments: Moments) -> bool:
    """Whether ``moments`` hold samples (False for ``count == 0``); ``TypeError`` for
    anything but a :class:`~normstats.Moments`."""
    if not isinstance(moments, Moments):
        raise TypeError(f"moments: expected normstats.Moments, got {type(moments).__name__}")
    return moments.count > 0


def _in_float64(moments: Moments) -> tuple[Namespace, Moments, bool]:
    """``moments`` copied into float64 (float32 where the device has none), their namespace,
    and whether they are finite.

    Finiteness is known from ``m2`` alone: a constructed ``Moments`` is finite, and the
    library's unchecked ones (a NaN training batch's) are finite only if their ``m2`` is.
    """
    xp = as_array(moments.mean, "moments")[0]  # a Moments' arrays share one namespace
    mean, residual, m2 = (
        accumulation_copy(xp, a) for a in (moments.mean, moments.mean_residual, moments.m2)
    )
    return xp, Moments._trusted(moments.count, mean, m2, residual), all_finite(xp, m2)


def _skip_or_raise_all(estimators: Sequence[Strategy], error: ValueError, times: int = 1) -> None:
    """``times`` batches these estimators refuse: raised if one of them raises (before any
    of them counts them), else skipped and counted by each."""
    if any(stats.nan_policy != "skip" for stats in estimators):
        raise error
    for stats in estimators:
        for _ in range(times):
            stats._skip_or_raise(error)


def _overflow_error(name: str) -> ValueError:
    return ValueError(
        f"{name}: expected a batch whose fold into the running statistics fits in float64, "
        "got one that makes them overflow"
    )


def _load_arrays(strategy: Strategy, values: dict[str, object], prefix: str) -> dict[str, Array]:
    """Validate state arrays (floating, finite, of the shapes ``strategy.state_shapes`` gives
    for one feature shape, non-negative where they hold spreads) and convert them to float64."""
    arrays: dict[str, Array] = {}
    shapes: dict[str, tuple[int, ...]] | None = None
    for key, value in values.items():
        name = f"state_dict[{prefix + key!r}]"
        if type(value) in (int, float):  # a placeholder; NumPy scalars are 0-d statistics
            raise ValueError(f"{name}: expected an array of statistics, got the number {value!r}")
        xp, array = as_array(value, name)
        check_floating(xp, array, name)
        if shapes is None:  # the first array gives the feature shape
            leading = strategy.state_shapes(())[key]
            if tuple(array.shape)[: len(leading)] != leading:
                raise ValueError(
                    f"{name}: expected leading axes {leading} before the feature axes, got "
                    f"{describe(array)}"
                )
            shapes = strategy.state_shapes(tuple(array.shape)[len(leading) :])
        if tuple(array.shape) != shapes[key]:
            raise ValueError(
                f"{name}: expected shape {shapes[key]} like the others, got {describe(array)}"
            )
        array = accumulation_copy(xp, array)
        if not all_finite(xp, array):
            raise ValueError(f"{name}: expected finite values, got NaN or Inf")
        if key in strategy.non_negative_keys and not bool(xp.all(array >= 0)):
            raise ValueError(f"{name}: expected non-negative values, got negative ones")
        arrays[key] = array
    return arrays


# Every strategy implements the protocol; registering makes isinstance() true even before
# the first batch, when reading ``mean`` raises NoBatchError (Python < 3.12 reads it).
RunningStats.register(Strategy)
