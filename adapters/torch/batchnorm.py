"""A drop-in ``nn.Module`` BatchNorm whose population statistics are a pluggable strategy.

Training runs torch's fused kernel (``F.batch_norm``) once: given scratch running buffers and
``momentum=1.0`` it leaves exactly the batch mean and unbiased variance in them, so the batch
moments cost no second pass over the activations (a float16 or bfloat16 module, whose kernel
would round them to its dtype, reduces the batch once more in float32). They are folded into
the strategy's state with the strategy's own update rule (:meth:`normstats.RunningStats.step`)
on the device, in float64, and ``running_mean`` / ``running_var`` are then set to the
strategy's estimate, so evaluation is torch's kernel on torch's buffers. A batch with NaN or
Inf is masked out of every statistic on the device, without a host synchronisation, and
counted in ``num_batches_skipped`` (``nan_policy="skip"``, the default) or raises
(``nan_policy="raise"``, one host synchronisation per step).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import array_api_compat
import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import Tensor, nn

from normstats import ExactFullPass, RunningStats
from normstats.estimators._base import Estimator, State
from normstats.functional import reduced_axes
from normstats.moments import ShiftedMoments, reduce_batch

from . import distributed
from .arguments import (
    build_strategy,
    flag,
    layer_momentum,
    non_negative_real,
    positive_int,
)
from .loading import plan_load, requested_strict
from .state import BATCH_MOMENTS_DTYPE, STATS_DTYPE, StrategyState, brought_state

torch_namespace = array_api_compat.array_namespace(torch.empty(0))
"""The array namespace the core's reductions use for tensors."""

POOL = ExactFullPass()
"""The update rule that pools a calibration pass (its pure functions only; it holds no state)."""


class NonFiniteCalibrationError(ValueError):
    """A calibration batch held NaN or Inf at the input of a layer with ``nan_policy="raise"``.

    :func:`~normstats.adapters.torch.recalibrate` turns it into an error that names the batch.
    """

    def __init__(self, layer: BatchNorm) -> None:
        super().__init__(
            "x: expected finite values, got a calibration batch with NaN or Inf "
            "(nan_policy='raise')"
        )
        self.layer = layer
        self.batch: int | None = None
        """The index of the batch in the calibration data (set by ``recalibrate``)."""


class BatchNorm(nn.Module):
    r"""BatchNorm for (N, C), (N, C, L), (N, C, H, W) and (N, C, D, H, W) input.

    Normalizes with batch statistics in training, as ``nn.BatchNorm*d`` does, and with the
    strategy's population statistics (``running_mean``, ``running_var``) in evaluation.

    Parameters
    ----------
    num_features : int
        Channels C.
    stats : str or RunningStats
        ``"ema"`` (default; PyTorch's running statistics), ``"cumulative"`` (PyTorch's
        ``momentum=None``), ``"welford"``, ``"exact"`` (filled only by
        :func:`~normstats.adapters.torch.recalibrate`), an estimator, or ``"batch"``
        (no running statistics: PyTorch's ``track_running_stats=False``). An estimator
        instance brings its settings (``nan_policy``, ``momentum``, ``debias``) and, if it
        has seen batches, its statistics, which are copied into the layer's buffers: the
        layer never reads or modifies the instance afterwards.
    eps : float
        Added to the variance before the square root (finite, non-negative).
    momentum : float or None
        Weight of the newest batch for ``stats="ema"``, in (0, 1] (an EMA instance brings
        its own). ``None`` means a cumulative average in PyTorch: ask for
        ``stats="cumulative"`` instead.
    affine : bool
        Learn ``weight`` (and ``bias``) per channel.
    sync : bool
        Merge batch statistics across processes (without an initialized process group this
        is world size 1).
    process_group : optional
        The group ``sync`` merges over (default: the whole world).
    bias : bool
        With ``affine``, also learn ``bias`` (PyTorch's ``bias=False``).
    nan_policy : {"skip", "raise"} or None
        A training or calibration batch with NaN or Inf: left out of the statistics and
        counted in ``num_batches_skipped`` (``"skip"``), or an error (``"raise"``). None
        (default) means ``"skip"`` for a strategy name and the instance's own policy for an
        estimator instance; a policy that contradicts the instance's is refused.
    device, dtype :
        Of the parameters and ``running_*`` buffers; the strategy keeps float64, and it
        receives every batch's moments at float32 precision or better whatever ``dtype``.
    **stats_kwargs :
        Passed to the strategy.

    Examples
    --------
    >>> import torch
    >>> from normstats.adapters.torch import BatchNorm
    >>> bn = BatchNorm(3, stats="welford")
    >>> y = bn(torch.randn(8, 3, 4, 4))
    >>> sorted(bn.state_dict())[:3]
    ['bias', 'num_batches_skipped', 'num_batches_tracked']
    """

    _version = 2

    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    num_batches_skipped: Tensor | None

    def __init__(
        self,
        num_features: int,
        stats: str | RunningStats = "ema",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        sync: bool = False,
        process_group: Any = None,
        *,
        bias: bool = True,
        nan_policy: str | None = None,
        device: Any = None,
        dtype: Any = None,
        **stats_kwargs: Any,
    ) -> None:
        super().__init__()
        self._calibration: State | None = None
        self._pending: State | None = None  # the current calibration batch, not yet pooled
        self._pending_finite = True
        self._calibrated = False
        """Whether the strategy holds samples: an "exact" layer evaluates only then. Kept on
        the host (never read from the device), so evaluation does not synchronise and
        torch.export and torch.compile see a constant."""
        self.source_class: type[nn.Module] | None = None
        """The torch class this layer replaced (set by ``convert``; ``revert`` goes back to it)."""
        self.input_rank: int | None = None
        """Dimensions of the last input (``revert`` picks the torch class from it)."""
        self.num_features = positive_int("num_features", num_features)
        self.eps = non_negative_real("eps", eps)
        self.affine = flag("affine", affine)
        self.sync = flag("sync", sync)
        with_bias = flag("bias", bias)
        self.process_group = process_group
        self.strategy, self.nan_policy = build_strategy(stats, momentum, nan_policy, stats_kwargs)
        self.momentum = layer_momentum(self.strategy, momentum)
        self.track_running_stats = self.strategy is not None
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.ones(self.num_features, **factory))
            self.bias = (
                nn.Parameter(torch.zeros(self.num_features, **factory)) if with_bias else None
            )
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.strategy is None:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
            self.register_buffer("num_batches_skipped", None)
            return
        instance = stats if isinstance(stats, Estimator) else None
        brought = None if instance is None else brought_state(instance, self.num_features)
        self.register_buffer("running_mean", torch.zeros(self.num_features, **factory))
        self.register_buffer("running_var", torch.ones(self.num_features, **factory))
        counter = {"dtype": torch.long, "device": device}
        self.register_buffer("num_batches_tracked", torch.tensor(0, **counter))
        self.register_buffer("num_batches_skipped", torch.tensor(0, **counter))
        state = StrategyState(self.strategy, self.num_features, device)
        self.add_module(self.strategy.name, state)
        if brought is not None:
            assert instance is not None
            self._start_from(brought, instance)

    def _start_from(self, state: State, instance: Estimator) -> None:
        """Begin with the statistics an estimator instance brought (copied, not shared)."""
        assert self.strategy_state is not None
        assert self.num_batches_tracked is not None
        assert self.num_batches_skipped is not None
        with torch.no_grad():
            self.strategy_state.assign(state)
            self._set_running(self.strategy_state.state())
            self.num_batches_tracked.fill_(instance.num_batches)
            self.num_batches_skipped.fill_(instance.num_batches_skipped)
        self._calibrated = True

    # -- what the module is ----------------------------------------------------------------

    @property
    def stats_name(self) -> str:
        """The strategy's name, or ``"batch"``."""
        return "batch" if self.strategy is None else self.strategy.name

    def population_statistics(self) -> tuple[Tensor, Tensor]:
        """The strategy's current ``(mean, unbiased var)`` in float64 (what ``running_mean``
        and ``running_var`` hold in the module's dtype)."""
        if self.strategy is None or self.strategy_state is None:
            raise ValueError("stats: a 'batch' BatchNorm keeps no population statistics")
        mean, var = self.strategy.estimate(self.strategy_state.state())
        return mean, var

    @property
    def strategy_state(self) -> StrategyState | None:
        """The strategy's float64 buffers (None for ``"batch"``)."""
        if self.strategy is None:
            return None
        state = getattr(self, self.strategy.name)
        assert isinstance(state, StrategyState)  # registered under this name in __init__
        return state

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, stats={self.stats_name!r}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, bias={self.bias is not None}"
        )

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.sync and self._calibration is None:
            group = self.process_group if self.process_group is not None else _world()
            if distributed.active(group):
                return self._forward_synchronized(x, group)
        self._check_input(x)
        if self._calibration is not None:
            return self._calibrate(x)
        if not self.training and self.strategy is not None:
            self.check_calibrated()
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        if self.strategy is None or isinstance(self.strategy, ExactFullPass) or x.shape[0] == 0:
            # batch statistics only: nothing is tracked (an empty batch changes nothing)
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        y, batch = self._normalize_with_batch_statistics(x)
        self.fold_batch(batch)
        return y

    def _forward_synchronized(self, x: Tensor, group: Any) -> Tensor:
        """Training with the batch statistics of every rank together (as SyncBatchNorm)."""
        y, total, mean, m2 = distributed.synchronized_batch_norm(
            x, self.weight, self.bias, self.eps, self.num_features, group
        )
        self._check_input(x)
        if self.strategy is not None and not isinstance(self.strategy, ExactFullPass):
            moments = (mean.detach().to(STATS_DTYPE), m2.detach().to(STATS_DTYPE))
            self.fold_batch(ShiftedMoments(total, None, *moments, finite=True))
        return y

    def _normalize_with_batch_statistics(self, x: Tensor) -> tuple[Tensor, ShiftedMoments]:
        """Training-mode output and the batch's float64 moments.

        At float32 or wider, one fused kernel call gives both. A float16 or bfloat16 module's
        kernel would round the moments to its dtype (a mean of 100 to within 0.5, a variance
        above 65504 to Inf), so the moments come from a float32 reduction of the batch
        instead; the output is the same kernel's either way.
        """
        count = x.numel() // self.num_features
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{list(x.shape)}"
            )
        # the kernel wants running buffers of the module's dtype (float32 under autocast)
        scratch = self.running_mean.dtype if self.running_mean is not None else x.dtype
        if torch.finfo(scratch).bits < torch.finfo(BATCH_MOMENTS_DTYPE).bits:
            y = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            axes = reduced_axes(x.dim(), 1)
            var, mean = torch.var_mean(x.detach().to(BATCH_MOMENTS_DTYPE), axes, correction=0)
            m2 = var.to(STATS_DTYPE) * count
            return y, ShiftedMoments(count, None, mean.to(STATS_DTYPE), m2, finite=True)
        moments = torch.zeros(2, self.num_features, dtype=scratch, device=x.device)
        # momentum=1.0: the kernel writes the batch mean and unbiased variance into them
        y = F.batch_norm(x, moments[0], moments[1], self.weight, self.bias, True, 1.0, self.eps)
        mean, var = moments.to(STATS_DTYPE)
        return y, ShiftedMoments(count, None, mean, var * (count - 1), finite=True)

    @torch.no_grad()
    def fold_batch(self, batch: ShiftedMoments) -> None:
        """Fold a batch's float64 moments into the strategy and the running buffers, masked
        on the device when not finite."""
        strategy, state = self.strategy, self.strategy_state
        running_mean, running_var = self.running_mean, self.running_var
        tracked, skipped = self.num_batches_tracked, self.num_batches_skipped
        if strategy is None or state is None:
            raise ValueError("stats: a 'batch' BatchNorm keeps no statistics to fold into")
        # registered together with the strategy in __init__
        assert running_mean is not None
        assert running_var is not None
        assert tracked is not None
        assert skipped is not None
        # NaN or Inf anywhere in the batch makes its variance NaN or Inf: one check covers both
        finite = torch.isfinite(batch.m2).all()
        if self.nan_policy == "raise" and not bool(finite):
            raise ValueError("x: expected finite values, got a training batch with NaN or Inf")
        new = strategy.step(state.state(), batch)
        state.assign(new, finite)
        self._set_running(new, finite)
        tracked.add_(finite)
        skipped.add_(~finite)

    def _set_running(self, state: State, keep: Tensor | None = None) -> None:
        """``running_mean``/``running_var`` := the strategy's estimate of ``state``."""
        assert self.strategy is not None
        assert self.running_mean is not None
        assert self.running_var is not None
        for buffer, value in zip(
            (self.running_mean, self.running_var), self.strategy.estimate(state), strict=True
        ):
            value = value.to(buffer.dtype)
            buffer.copy_(value if keep is None else torch.where(keep, value, buffer))

    # -- calibration (the exact full pass of recalibrate) -------------------------------

    def start_calibration(self) -> None:
        """From now on, forward normalizes with batch statistics and pools every input's
        moments (in float64, on the device) instead of updating the strategy.

        What a batch brings is held back until :meth:`end_calibration_batch` says whether to
        pool it: a batch is left out of every layer's pool when any layer saw NaN or Inf in
        it (``nan_policy="skip"``), and a layer with ``nan_policy="raise"`` raises
        :class:`NonFiniteCalibrationError` at once.
        """
        template = torch.zeros(self.num_features, dtype=STATS_DTYPE, device=self._device())
        self._calibration = POOL.initial_state(template)
        self._pending, self._pending_finite = None, True

    @property
    def calibration_batch_finite(self) -> bool:
        """Whether every input this layer saw in the current calibration batch was finite."""
        return self._pending_finite

    def end_calibration_batch(self, keep: bool) -> None:
        """Pool what the current calibration batch brought (``keep``) or leave it out."""
        if keep and self._pending_finite and self._pending is not None:
            self._calibration = self._pending
        self._pending, self._pending_finite = None, True

    def stop_calibration(self) -> State | None:
        """End calibration; return the pooled state (None if nothing was pooled)."""
        pooled, self._calibration = self._calibration, None
        self._pending, self._pending_finite = None, True
        return pooled if pooled is not None and pooled["num_batches"] else None

    def load_calibration(self, pooled: Mapping[str, Any], num_batches_skipped: int = 0) -> None:
        """Make ``pooled`` (from :meth:`stop_calibration`) the strategy's statistics;
        ``num_batches_skipped`` is how many batches the calibration left out."""
        strategy, state = self.strategy, self.strategy_state
        if strategy is None or state is None:
            return
        assert self.num_batches_skipped is not None
        batch = ShiftedMoments(
            pooled["count"], None, POOL.estimate(dict(pooled))[0], pooled["m2"], finite=True
        )
        with torch.no_grad():
            calibrated = strategy.calibrated_state(batch)
            state.assign(calibrated)
            self._set_running(calibrated)
            self.num_batches_skipped.fill_(num_batches_skipped)
        self._calibrated = True

    def _calibrate(self, x: Tensor) -> Tensor:
        """Normalize with batch statistics and hold back their moments; no gradient is
        needed here, so the moments come from the core's float64 reduction (exact for data
        far from zero too, and it tells whether the batch is finite) and the output from the
        evaluation kernel (on CPU both together cost less than the training kernel)."""
        if x.shape[0] == 0:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        count = x.numel() // self.num_features
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{list(x.shape)}"
            )
        reduced = reduce_batch(torch_namespace, x.detach(), reduced_axes(x.dim(), 1))
        if not reduced.finite:
            if self.nan_policy == "raise":
                raise NonFiniteCalibrationError(self)
            self._pending_finite = False
        elif self._pending_finite:
            assert self._calibration is not None
            pooled = self._pending if self._pending is not None else self._calibration
            self._pending = POOL.step(pooled, reduced)  # a layer may run twice in a forward
        mean = reduced.mean
        var = (reduced.m2 / count).to(x.dtype)
        return F.batch_norm(x, mean.to(x.dtype), var, self.weight, self.bias, False, 0.0, self.eps)

    def _device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def _check_input(self, x: Tensor) -> None:
        if not 2 <= x.dim() <= 5:
            raise ValueError(f"x: expected 2D to 5D input (N, C, ...), got {x.dim()}D input")
        self.input_rank = x.dim()
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"x: expected {self.num_features} channels (dimension 1), got {x.shape[1]} in "
                f"input of shape {tuple(x.shape)}"
            )

    def check_calibrated(self) -> None:
        """Raise unless the layer has statistics to evaluate with: an ``"exact"`` layer has
        none until recalibrated (a host-side flag: evaluation reads nothing from the device
        for it, so torch.export and torch.compile raise this error too)."""
        if isinstance(self.strategy, ExactFullPass) and not self._calibrated:
            raise ValueError(
                "stats: this 'exact' BatchNorm is not calibrated: run "
                "normstats.adapters.torch.recalibrate(model, data) after training"
            )

    # -- resetting ---------------------------------------------------------------------------

    def reset_running_stats(self) -> None:
        """Forget every batch: the strategy's initial state, ``running_mean`` 0,
        ``running_var`` 1 and the counters 0 (as torch's ``reset_running_stats``)."""
        state = self.strategy_state
        if self.strategy is None or state is None:
            return
        assert self.num_batches_tracked is not None
        assert self.num_batches_skipped is not None
        assert self.running_mean is not None
        assert self.running_var is not None
        template = torch.zeros(self.num_features, dtype=STATS_DTYPE)
        with torch.no_grad():
            state.assign(self.strategy.initial_state(template))
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()
            self.num_batches_skipped.zero_()
        self._calibrated = False

    def reset_parameters(self) -> None:
        """:meth:`reset_running_stats`, and ``weight`` 1, ``bias`` 0 (as torch's)."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # -- state dicts -------------------------------------------------------------------------

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Check this layer's part of ``state_dict`` (keys, shapes, values, strategy) and copy
        it only if nothing is wrong; a dict of torch's layer makes the strategy resume from
        its running statistics. ``state_dict`` is not written to."""
        strict = strict and requested_strict()
        part = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        plan = plan_load(self, part, prefix, strict)
        state = self.strategy_state
        if state is not None:
            state.claim_next_load()  # its buffers are part of this plan
        missing_keys.extend(prefix + k for k in plan.missing)
        unexpected_keys.extend(prefix + k for k in plan.unexpected)
        error_msgs.extend(plan.problems)
        if plan.refused(strict):
            return
        assign = {"assign_to_params_buffers": local_metadata.get("assign_to_params_buffers")}
        own = {prefix + k: v for k, v in plan.own.items()}
        super()._load_from_state_dict(own, prefix, local_metadata, False, [], [], error_msgs)
        if state is not None and plan.strategy:
            inner = f"{prefix}{self.stats_name}."
            loaded = {inner + k: v for k, v in plan.strategy.items()}
            nn.Module._load_from_state_dict(state, loaded, inner, assign, False, [], [], error_msgs)
        if plan.count is not None:
            self._calibrated = plan.count > 0


def _world() -> Any:
    return torch.distributed.group.WORLD if torch.distributed.is_available() else None


__all__ = ["BatchNorm", "NonFiniteCalibrationError"]
