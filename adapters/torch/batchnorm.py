"""A drop-in ``nn.Module`` BatchNorm whose population statistics are a pluggable strategy.

Training runs torch's fused kernel (``F.batch_norm``) once: given scratch running buffers and
``momentum=1.0`` it leaves exactly the batch mean and unbiased variance in them, so the batch
moments cost no second pass over the activations. They are folded into the strategy's state
with the strategy's own update rule (:meth:`normstats.RunningStats.step`) on the device, in
float64, and ``running_mean`` / ``running_var`` are then set to the strategy's estimate, so
evaluation is torch's kernel on torch's buffers. A batch with NaN or Inf is masked out of
every statistic on the device, without a host synchronisation, and counted in
``num_batches_skipped`` (``nan_policy="skip"``, the default) or raises
(``nan_policy="raise"``, one host synchronisation per step).
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import Tensor, nn

from normstats import ExactFullPass, ExponentialMovingAverage, RunningStats
from normstats.estimators import resolve_stats
from normstats.estimators._base import Estimator, State
from normstats.functional import reduced_axes
from normstats.moments import ShiftedMoments, reduce_batch

from . import distributed
from .state import STATS_DTYPE, StrategyState

torch_namespace = array_api_compat.array_namespace(torch.empty(0))
"""The array namespace the core's reductions use for tensors."""

POOL = ExactFullPass()
"""The update rule that pools a calibration pass (its pure functions only; it holds no state)."""


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
        (no running statistics: PyTorch's ``track_running_stats=False``).
    eps : float
        Added to the variance before the square root.
    momentum : float
        Weight of the newest batch for ``stats="ema"``. ``None`` means a cumulative average
        in PyTorch: ask for ``stats="cumulative"`` instead.
    affine : bool
        Learn ``weight`` (and ``bias``) per channel.
    sync : bool
        Merge batch statistics across processes (without an initialized process group this
        is world size 1).
    process_group : optional
        The group ``sync`` merges over (default: the whole world).
    bias : bool
        With ``affine``, also learn ``bias`` (PyTorch's ``bias=False``).
    nan_policy : {"skip", "raise"}
        A training batch with NaN or Inf: masked out of the statistics and counted in
        ``num_batches_skipped`` (default), or an error.
    device, dtype :
        Of the parameters and ``running_*`` buffers; the strategy keeps float64.
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
        nan_policy: str = "skip",
        device: Any = None,
        dtype: Any = None,
        **stats_kwargs: Any,
    ) -> None:
        super().__init__()
        self._calibration: State | None = None
        self._calibrated: bool | None = None  # known state of an "exact" layer
        self.source_class: type[nn.Module] | None = None
        """The torch class this layer replaced (set by ``convert``; ``revert`` goes back to it)."""
        self.input_rank: int | None = None
        """Dimensions of the last input (``revert`` picks the torch class from it)."""
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features: expected a positive int, got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
            raise ValueError(f"eps: expected a non-negative number, got {eps!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.sync = bool(sync)
        self.process_group = process_group
        self.nan_policy = nan_policy
        self.strategy = _build_strategy(stats, momentum, nan_policy, stats_kwargs)
        if isinstance(self.strategy, ExponentialMovingAverage):
            self.momentum = self.strategy.momentum  # an EMA instance brings its own
        self.track_running_stats = self.strategy is not None
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.strategy is None:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
            self.register_buffer("num_batches_skipped", None)
        else:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            counter = {"dtype": torch.long, "device": device}
            self.register_buffer("num_batches_tracked", torch.tensor(0, **counter))
            self.register_buffer("num_batches_skipped", torch.tensor(0, **counter))
            self.add_module(self.strategy.name, StrategyState(self.strategy, num_features, device))

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
            self._check_calibrated()
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
        """Training-mode output and the batch's float64 moments, from one fused kernel call."""
        count = x.numel() // self.num_features
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{list(x.shape)}"
            )
        # the kernel wants running buffers of the module's dtype (float32 under autocast)
        scratch = self.running_mean.dtype if self.running_mean is not None else x.dtype
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
        moments (in float64, on the device) instead of updating the strategy."""
        template = torch.zeros(self.num_features, dtype=STATS_DTYPE, device=self._device())
        self._calibration = POOL.initial_state(template)

    def stop_calibration(self) -> State | None:
        """End calibration; return the pooled state (None if nothing was seen)."""
        pooled, self._calibration = self._calibration, None
        return pooled if pooled is not None and pooled["num_batches"] else None

    def load_calibration(self, pooled: State) -> None:
        """Make ``pooled`` (from :meth:`stop_calibration`) the strategy's statistics."""
        strategy, state = self.strategy, self.strategy_state
        if strategy is None or state is None:
            return
        batch = ShiftedMoments(
            pooled["count"], None, POOL.estimate(pooled)[0], pooled["m2"], finite=True
        )
        with torch.no_grad():
            calibrated = strategy.calibrated_state(batch)
            state.assign(calibrated)
            self._set_running(calibrated)
        self._calibrated = True

    def _calibrate(self, x: Tensor) -> Tensor:
        """Normalize with batch statistics and pool them; no gradient is needed here, so the
        moments come from the core's float64 reduction (exact for data far from zero too)
        and the output from the evaluation kernel (on CPU both together cost less than the
        training kernel)."""
        if x.shape[0] == 0:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        count = x.numel() // self.num_features
        if count <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{list(x.shape)}"
            )
        reduced = reduce_batch(torch_namespace, x.detach(), reduced_axes(x.dim(), 1))
        mean, m2 = reduced.mean, reduced.m2
        var = (m2 / count).to(x.dtype)
        y = F.batch_norm(x, mean.to(x.dtype), var, self.weight, self.bias, False, 0.0, self.eps)
        batch = ShiftedMoments(count, None, mean, m2, finite=True)
        assert self._calibration is not None
        self._calibration = POOL.step(self._calibration, batch)
        return y

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

    def _check_calibrated(self) -> None:
        """An exact layer has no statistics until recalibrated.

        Whether it has is read from the device once and remembered until the statistics are
        loaded or calibrated again, so evaluation does not synchronise with the host.
        """
        if not isinstance(self.strategy, ExactFullPass):
            return
        if self._calibrated is None:
            state = self.strategy_state
            assert state is not None
            self._calibrated = float(state.state()["count"]) > 0
        if not self._calibrated:
            raise ValueError(
                "stats: this 'exact' BatchNorm is not calibrated: run "
                "normstats.adapters.torch.recalibrate(model, data) after training"
            )

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
        if self.strategy is not None and prefix + "running_mean" in state_dict:
            # A dict of torch's BatchNorm (old ones lack num_batches_tracked): the counters
            # start at zero and the strategy resumes from the running statistics.
            for name in ("num_batches_tracked", "num_batches_skipped"):
                state_dict.setdefault(prefix + name, torch.tensor(0, dtype=torch.long))
            inner = f"{prefix}{self.strategy.name}."
            state = self.strategy_state
            assert state is not None
            if not any(key.startswith(inner) for key in state_dict):
                template = torch.zeros(self.num_features, dtype=STATS_DTYPE)
                resumed = self.strategy.resumed_state(
                    template,
                    torch.as_tensor(state_dict[prefix + "running_mean"]).to(STATS_DTYPE).cpu(),
                    torch.as_tensor(state_dict[prefix + "running_var"]).to(STATS_DTYPE).cpu(),
                    torch.as_tensor(state_dict[prefix + "num_batches_tracked"])
                    .to(STATS_DTYPE)
                    .cpu(),
                )
                for key in state.state():
                    state_dict[inner + key] = torch.as_tensor(resumed[key], dtype=STATS_DTYPE)
        self._calibrated = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def _world() -> Any:
    return torch.distributed.group.WORLD if torch.distributed.is_available() else None


def _build_strategy(
    stats: str | RunningStats, momentum: float | None, nan_policy: str, kwargs: dict[str, Any]
) -> Estimator | None:
    """The layer's strategy; ``momentum`` is the EMA's (PyTorch's ``momentum=None`` is
    the cumulative average, which is asked for by name)."""
    if stats == "ema":
        if momentum is None:
            raise ValueError(
                "momentum: None means a cumulative average in PyTorch; pass "
                "stats='cumulative' for it, or a momentum in (0, 1] for stats='ema'"
            )
        kwargs = {"momentum": momentum, **kwargs}
    if isinstance(stats, str) and stats != "batch":
        kwargs = {"nan_policy": nan_policy, **kwargs}
    strategy = resolve_stats(stats, **kwargs)
    if strategy is not None and not isinstance(strategy, Estimator):
        raise TypeError(
            f"stats: a torch layer runs a normstats strategy's update rule on the device; "
            f"expected one of normstats' estimators, got {type(strategy).__name__}"
        )
    return strategy


__all__ = ["BatchNorm"]
