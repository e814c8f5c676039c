"""A drop-in ``nn.BatchNorm*d`` whose population statistics are a pluggable strategy.

The layer is a ``torch.nn.modules.batchnorm._BatchNorm``, so torch's tools and the
ecosystem's find it, and it reads ``momentum`` and ``track_running_stats`` at every forward as
torch's layer does.

A training step costs what torch's own step costs: torch's fused kernel (``F.batch_norm``),
given the rows of a slot of a preallocated ring as running buffers and ``momentum=1.0``,
leaves exactly the batch mean and unbiased variance there (a float16 or bfloat16 module, whose
kernel would round them to its dtype, reduces the batch once more in float32). The pending
slots are folded into the strategy's float64 state all at once, with the strategy's own
vectorized fold (:meth:`normstats.estimators._strategy.Strategy.fold`), when the ring is full and
whenever the statistics are read: an evaluation forward, ``running_mean``, ``running_var``,
``num_batches_tracked`` or ``num_batches_skipped``, ``state_dict``, ``load_state_dict``,
``.to()`` and the like, copying or pickling, calibration, and :meth:`BatchNorm.fold_pending`.
``running_mean`` / ``running_var`` are then set to the strategy's estimate, so evaluation is
torch's kernel on torch's buffers. A batch with NaN or Inf is masked out of every statistic by
that fold, on the device, without a host synchronisation, and counted in
``num_batches_skipped`` (``nan_policy="skip"``, the default), or raises at once
(``nan_policy="raise"``, one host synchronisation per step). Under ``torch.compile`` every step
folds directly, so that the traced graph does not depend on the ring's position.

The small-batch training modes (:mod:`.small_batch`) keep this shape: Ghost BatchNorm writes
the whole batch's pooled moments into the ring; Batch Renormalization folds every step at
once, as the next step corrects towards an estimate that includes this one.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normstats import (
    CumulativeAverage,
    ExactFullPass,
    ExponentialMovingAverage,
    Moments,
    RunningStats,
)
from normstats.estimators import StackedMoments, State, Strategy
from normstats.functional import reduced_axes
from normstats.moments import ShiftedMoments, moments_of_batch

from . import distributed, small_batch
from .arguments import (
    build_strategy,
    flag,
    layer_momentum,
    non_negative_real,
    positive_int,
    small_batch_mode,
)
from .loading import plan_load, requested_strict
from .ring import MomentRing
from .state import BATCH_MOMENTS_DTYPE, STATS_DTYPE, StrategyState, brought_state

torch_namespace = array_api_compat.array_namespace(torch.empty(0))
"""The array namespace of tensors, for the core's functions that take one."""

FOLDED_ON_READ = frozenset(
    {"running_mean", "running_var", "num_batches_tracked", "num_batches_skipped"}
)
"""Buffers whose reading as an attribute folds the pending training batches first."""


class BatchNorm(_BatchNorm):
    r"""BatchNorm for (N, C), (N, C, L), (N, C, H, W) and (N, C, D, H, W) input.

    Normalizes with batch statistics in training, as ``nn.BatchNorm*d`` does, and with the
    strategy's population statistics (``running_mean``, ``running_var``) in evaluation. A
    ``torch.nn.modules.batchnorm._BatchNorm``, with torch's runtime semantics:

    - ``momentum`` is read at every training forward. It is the weight of the newest batch of
      an ``"ema"`` layer, and ``None`` makes the step a cumulative average's, ``1 /
      num_batches_tracked``, as in torch (a debiased EMA refuses another momentum: its bias
      correction assumes its own). ``"cumulative"`` and ``"welford"`` layers ignore it. An
      ``"exact"`` layer pools its training input while it is ``None`` (what
      ``torch.optim.swa_utils.update_bn`` sets, so that it calibrates the layer) and is left
      to :func:`~normstats.adapters.torch.recalibrate` otherwise.
    - ``track_running_stats`` is read at every forward: while False, training uses batch
      statistics and updates nothing, and evaluation still uses the running statistics.
    - ``reset_running_stats()`` and ``reset_parameters()`` reset the strategy too.

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
    renorm : bool
        Batch Renormalization (Ioffe, 2017) in training: the output is
        ``weight * (x_hat * r + d) + bias``, ``x_hat`` normalized with the batch mean and
        biased variance, and ``r``, ``d`` (constants of the backward pass) the clipped
        correction towards the strategy's estimate before the batch
        (:func:`normstats.functional.renorm_correction`); before the first tracked batch
        ``r = 1``, ``d = 0``. With ``sync``, the batch statistics (and so ``r`` and ``d``)
        are those of every rank's batch together. Evaluation is unchanged. Needs a running
        estimate in training: refused with ``"exact"`` and ``"batch"``.
    r_max, d_max : float
        The clipping limits of ``r`` (at least 1) and ``d`` (non-negative).
    renorm_warmup : int
        Training steps over which the limits grow linearly from 1 and 0 to ``r_max`` and
        ``d_max`` (:func:`normstats.functional.renorm_limits`); the step is
        ``num_batches_tracked``, so training resumed from a state dict resumes the
        warm-up. 0: the given limits from the start.
    virtual_batch_size : int or None
        Ghost BatchNorm (Hoffer et al., 2017) in training: the batch is split along
        dimension 0 into consecutive virtual batches of this many samples (the last one
        holds the remainder), each normalized with its own statistics; the strategy is fed
        the moments of the whole batch (pooled exactly), once per step. With ``sync``, the
        virtual batches stay on their rank and the strategy is fed every rank's batch
        together. Not together with ``renorm``. (The backward pass of either mode is torch's
        batch-norm backward on statistics saved by the forward, not itself differentiable: a
        second derivative is refused.)
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

    # None without affine (or bias), in torch's layers too, whose inferred type omits it
    weight: nn.Parameter | None  # type: ignore[assignment]
    bias: nn.Parameter | None  # type: ignore[assignment]
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    num_batches_skipped: Tensor | None

    def __init__(
        self,
        num_features: int,
        stats: str | type[Strategy] | RunningStats = "ema",
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        sync: bool = False,
        process_group: Any = None,
        *,
        bias: bool = True,
        nan_policy: str | None = None,
        renorm: bool = False,
        r_max: float = 3.0,
        d_max: float = 5.0,
        renorm_warmup: int = 0,
        virtual_batch_size: int | None = None,
        device: Any = None,
        dtype: Any = None,
        **stats_kwargs: Any,
    ) -> None:
        # torch's _NormBase.__init__ registers its buffers its own way and resets them before
        # the strategy exists: the layer builds itself, as a Module
        nn.Module.__init__(self)
        self._ring = MomentRing()
        self._ring_rule: Strategy | None = None
        """The update rule the pending slots fold with (each momentum has its own)."""
        self._runtime_rule: tuple[float | None, Strategy] | None = None
        """An EMA layer's rule for the momentum last set at runtime, with that momentum."""
        self._calibrating = False
        self._calibration_moments: Moments | None = None
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
        mode = small_batch_mode(
            self.strategy, renorm, r_max, d_max, renorm_warmup, virtual_batch_size
        )
        self.renorm, self.r_max, self.d_max, self.renorm_warmup, self.virtual_batch_size = mode
        self._renorm_limits = small_batch.RenormLimits(self.renorm_warmup, self.r_max, self.d_max)
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.weight = nn.Parameter(torch.ones(self.num_features, **factory))
            if with_bias:
                self.bias = nn.Parameter(torch.zeros(self.num_features, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.strategy is None:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                self.register_buffer(name, None)
            self.register_buffer("num_batches_skipped", None)
            return
        instance = stats if isinstance(stats, Strategy) else None
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

    def _start_from(self, state: State, instance: Strategy) -> None:
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
        self.fold_pending()
        mean, var = self.strategy.estimate(self.strategy_state.state())
        return mean, var

    @property
    def strategy_state(self) -> StrategyState | None:
        """The strategy's float64 buffers, every batch trained on folded in (None for
        ``"batch"``)."""
        self.fold_pending()
        return self._strategy_buffers()

    def _strategy_buffers(self) -> StrategyState | None:
        if self.strategy is None:
            return None
        state = getattr(self, self.strategy.name)
        assert isinstance(state, StrategyState)  # registered under this name in __init__
        return state

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, stats={self.stats_name!r}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, bias={self.bias is not None}"
        )
        if self.renorm:
            text += (
                f", renorm=True, r_max={self.r_max}, d_max={self.d_max}, "
                f"renorm_warmup={self.renorm_warmup}"
            )
        if self.virtual_batch_size is not None:
            text += f", virtual_batch_size={self.virtual_batch_size}"
        return text

    def __getattr__(self, name: str) -> Any:
        # torch keeps buffers outside __dict__, so reading one comes here: the statistics
        # read are those of every batch seen
        if name in FOLDED_ON_READ:
            ring = self.__dict__.get("_ring")
            if ring is not None and ring.pending:
                self.fold_pending()
        return super().__getattr__(name)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, input: Tensor) -> Tensor:
        x = input
        if self.training and self.sync and not self._calibrating:
            group = self.process_group if self.process_group is not None else _world()
            if distributed.active(group):
                return self._forward_synchronized(x, group)
        self._check_input_dim(x)
        if self._calibrating:
            return self._calibrate(x)
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        if not self.training:
            running_mean, running_var = self._buffers["running_mean"], self._buffers["running_var"]
            if running_mean is None or running_var is None:  # as torch: batch statistics
                return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
            self.fold_pending()
            self.check_calibrated()
            return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, self.eps)
        rule = self._training_rule()
        if x.shape[0] == 0:  # as torch: an empty output, and nothing changes
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        if self.renorm:
            return self._train_renormalized(x, rule)
        virtual = self.virtual_batch_size
        if virtual is not None and x.shape[0] > virtual:
            return self._train_ghost(x, virtual, rule)
        if rule is None:  # batch statistics only: nothing is tracked
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        if torch.compiler.is_compiling():
            return self._train_folding_now(x, rule)
        return self._train_into_ring(x, rule)

    def _training_rule(self) -> Strategy | None:
        """The update rule this training step's batch folds with, from ``momentum`` and
        ``track_running_stats`` as they are now; None: the batch is not tracked."""
        strategy = self.strategy
        if strategy is None or not self.track_running_stats:
            return None
        momentum = self.momentum
        if isinstance(strategy, ExactFullPass):
            return strategy if momentum is None else None
        if not isinstance(strategy, ExponentialMovingAverage) or momentum == strategy.momentum:
            return strategy
        if self._runtime_rule is not None and self._runtime_rule[0] == momentum:
            return self._runtime_rule[1]
        if strategy.debias:
            raise ValueError(
                f"momentum: a debiased EMA corrects its bias for its own momentum "
                f"{strategy.momentum}, got {momentum!r}; set it back, or build the layer "
                f"with debias=False to change momentum during training"
            )
        # torch's momentum=None: the cumulative average, weight 1 / num_batches_tracked
        rule: Strategy = (
            CumulativeAverage() if momentum is None else ExponentialMovingAverage(momentum=momentum)
        )
        self._runtime_rule = (momentum, rule)
        return rule

    def _train_into_ring(self, x: Tensor, rule: Strategy) -> Tensor:
        """Normalize with batch statistics; the kernel writes the batch's moments into the
        ring's next slot (momentum=1.0 leaves exactly the batch mean and unbiased variance)."""
        ring = self._ring
        # (nn.Module's attribute setting costs a few us: only when something changes)
        if rule is not self._ring_rule or ring.totals:
            # the steps so far fold with the momentum they ran under, and synchronized
            # steps' slots hold other moments
            self.fold_pending()
            self._ring_rule = rule
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        # the kernel wants running buffers of the module's dtype (float32 under autocast)
        scratch = self._moments_dtype(x)
        if torch.finfo(scratch).bits < torch.finfo(BATCH_MOMENTS_DTYPE).bits:
            y = F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
            mean, var = ring.next_slot(self.num_features, BATCH_MOMENTS_DTYPE, x.device)
            _write_batch_moments(x, mean, var)
        else:
            mean, var = ring.next_slot(self.num_features, scratch, x.device)
            y = F.batch_norm(x, mean, var, weight, bias, True, 1.0, self.eps)
        # NaN or Inf anywhere in the batch makes a variance, and so their float64 sum, not finite
        if self.nan_policy == "raise" and not math.isfinite(var.sum(dtype=STATS_DTYPE)):
            ring.discard_next()
            raise ValueError("x: expected finite values, got a training batch with NaN or Inf")
        ring.push(x.numel() // self.num_features)
        if ring.full:
            self.fold_pending()
        return y

    def _train_folding_now(self, x: Tensor, rule: Strategy) -> Tensor:
        """Normalize with batch statistics and fold the batch at once (under torch.compile,
        whose graph must not depend on the ring's position)."""
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        scratch = self._moments_dtype(x)
        if torch.finfo(scratch).bits < torch.finfo(BATCH_MOMENTS_DTYPE).bits:
            scratch = BATCH_MOMENTS_DTYPE
            y = F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
            moments = torch.zeros(2, self.num_features, dtype=scratch, device=x.device)
            _write_batch_moments(x, moments[0], moments[1])
        else:
            moments = torch.zeros(2, self.num_features, dtype=scratch, device=x.device)
            y = F.batch_norm(x, moments[0], moments[1], weight, bias, True, 1.0, self.eps)
        count = x.numel() // self.num_features
        mean, var = moments.to(STATS_DTYPE)
        self._fold_now(rule, count, mean, var * (count - 1))
        return y

    # -- small batches: Batch Renormalization and Ghost BatchNorm -----------------------------

    def _train_renormalized(self, x: Tensor, rule: Strategy | None) -> Tensor:
        """Batch Renormalization, corrected towards the strategy's estimate before this
        batch, which is then folded at once (the next step corrects towards an estimate
        that includes it)."""
        small_batch.check_batch(x)
        tracked = self._buffers["num_batches_tracked"]
        assert tracked is not None  # renorm is refused without a strategy
        y, moments = small_batch.renormalized(
            x,
            self._parameters["weight"],
            self._parameters["bias"],
            self.population_statistics(),
            self._renorm_limits.at(tracked),
            tracked > 0,
            self.eps,
        )
        if rule is not None:
            count = x.numel() // self.num_features
            mean, var = moments.unbind(0)
            self._fold_now(rule, count, mean, var * (count - 1))
        return y

    def _train_ghost(self, x: Tensor, virtual: int, rule: Strategy | None) -> Tensor:
        """Ghost BatchNorm: each virtual batch normalized with its own statistics; the
        strategy is fed the moments of the whole batch, pooled from theirs."""
        y, moments = self._ghost_normalized(x, virtual)
        if rule is not None:
            mean, m2 = small_batch.pooled(small_batch.virtual_batch_counts(x, virtual), moments)
            count = x.numel() // self.num_features
            if torch.compiler.is_compiling():
                self._fold_now(rule, count, mean, m2)
            else:
                self._into_ring(rule, count, mean, m2)
        return y

    def _ghost_normalized(self, x: Tensor, virtual: int) -> tuple[Tensor, Tensor]:
        """The ghost-normalized output and the virtual batches' moments (float32 or wider)."""
        small_batch.check_batch(x, virtual)
        return small_batch.ghost_normalized(
            x, self._parameters["weight"], self._parameters["bias"], virtual, self.eps
        )

    def _into_ring(self, rule: Strategy, count: int, mean: Tensor, m2: Tensor) -> None:
        """Write a batch's float64 mean and M2 into the ring's next slot (as the mean and
        unbiased variance the kernel writes there)."""
        ring = self._ring
        if rule is not self._ring_rule or ring.totals:
            self.fold_pending()
            self._ring_rule = rule
        # the dtype the kernel's slots have (float32 at least), so that both kinds share it
        scratch = torch.promote_types(self._moments_dtype(mean), BATCH_MOMENTS_DTYPE)
        var = m2 / (count - 1)
        if self.nan_policy == "raise" and not math.isfinite(var.sum()):
            raise ValueError("x: expected finite values, got a training batch with NaN or Inf")
        mean_row, var_row = ring.next_slot(self.num_features, scratch, mean.device)
        mean_row.copy_(mean)
        var_row.copy_(var)
        ring.push(count)
        if ring.full:
            self.fold_pending()

    def _forward_synchronized(self, x: Tensor, group: Any) -> Tensor:
        """Training with the batch statistics of every rank together (as SyncBatchNorm);
        Ghost BatchNorm normalizes this rank's virtual batches and feeds the strategy the
        moments of every rank's batch together."""
        virtual = self.virtual_batch_size
        if virtual is not None:
            return self._ghost_synchronized(x, virtual, group)
        total, mean, m2 = distributed.synchronized_moments(x, self.num_features, group)
        self._check_input_dim(x)
        var = m2 / total
        weight: Tensor | None = self.weight
        bias: Tensor | None = self.bias
        if self.renorm:
            tracked = self._buffers["num_batches_tracked"]
            assert tracked is not None  # renorm is refused without a strategy
            r, d = small_batch.correction(
                mean.detach(),
                var.detach(),
                self.population_statistics(),
                self._renorm_limits.at(tracked),
                tracked > 0,
                self.eps,
            )
            weight, bias = small_batch.corrected_affine(weight, bias, r, d)
        y = distributed.normalized(x, mean, var, weight, bias, self.eps)
        rule = self._training_rule()
        if rule is None:
            return y
        mean, m2 = mean.detach(), m2.detach()
        if torch.compiler.is_compiling() or self.renorm:
            # (renorm corrects the next step towards an estimate that includes this one)
            self._fold_now(rule, total, mean, m2)
        else:
            self._synchronized_into_ring(rule, total.detach(), mean, m2)
        return y

    def _ghost_synchronized(self, x: Tensor, virtual: int, group: Any) -> Tensor:
        """Ghost BatchNorm under ``sync``: the virtual batches are this rank's (nothing
        crosses ranks in the normalization), and one all-gather merges every rank's pooled
        moments for the strategy."""
        rule = self._training_rule()
        if rule is None:  # nothing to merge
            self._check_input_dim(x)
            if x.shape[0] == 0:
                return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            return self._ghost_normalized(x, virtual)[0]
        distributed.check_shape(x, self.num_features, group)
        self._check_input_dim(x)
        try:
            small_batch.check_batch(x, virtual)
        except ValueError as error:
            distributed.take_part_and_raise(x, self.num_features, group, error)
        count = x.numel() // self.num_features
        if count == 0:
            y = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            zeros = torch.zeros(self.num_features, dtype=STATS_DTYPE, device=x.device)
            mean, m2 = zeros, zeros
        else:
            y, moments = self._ghost_normalized(x, virtual)
            mean, m2 = small_batch.pooled(small_batch.virtual_batch_counts(x, virtual), moments)
        total, mean, m2 = distributed.merged_moments(count, mean, m2, self.num_features, group)
        if torch.compiler.is_compiling():
            self._fold_now(rule, total, mean, m2)
        else:
            self._synchronized_into_ring(rule, total, mean, m2)
        return y

    def _synchronized_into_ring(
        self, rule: Strategy, total: Tensor, mean: Tensor, m2: Tensor
    ) -> None:
        """Write a synchronized step's global moments into the ring's next slot: a float64
        ring, as the merge is float64, holding the sum of squared deviations and the total
        count as they come (a 0-d tensor on the device, not read on the host)."""
        ring = self._ring
        if rule is not self._ring_rule or ring.counts:
            # the steps so far fold with the momentum they ran under, and the kernel's slots
            # hold other moments (in the module's dtype)
            self.fold_pending()
            self._ring_rule = rule
        if self.nan_policy == "raise" and not bool(torch.isfinite(m2).all()):
            raise ValueError("x: expected finite values, got a training batch with NaN or Inf")
        mean_row, m2_row = ring.next_slot(self.num_features, STATS_DTYPE, mean.device)
        mean_row.copy_(mean)
        m2_row.copy_(m2)
        ring.push_total(total)
        if ring.full:
            self.fold_pending()

    def _moments_dtype(self, x: Tensor) -> torch.dtype:
        running_mean = self._buffers["running_mean"]
        return running_mean.dtype if running_mean is not None else x.dtype

    # -- folding -----------------------------------------------------------------------------

    def fold_pending(self) -> None:
        """Fold the training batches the ring holds into the strategy and the running
        buffers now (every read of the statistics does; ``module.buffers()`` does not)."""
        ring = self._ring
        if not ring.pending:  # (checked before entering no_grad, which costs a few us)
            return
        assert self._ring_rule is not None  # set with the first pending slot
        with torch.no_grad():
            self._commit(self._ring_rule, ring.stacked(STATS_DTYPE))
        ring.clear()

    @torch.no_grad()
    def _fold_now(self, rule: Strategy, count: int, mean: Tensor, m2: Tensor) -> None:
        """Fold one batch's float64 moments at once with the rule's step, masked when not
        finite (under torch.compile: one batch needs no ring, and a step traces as plain
        tensor arithmetic)."""
        self.fold_pending()
        finite = torch.isfinite(m2).all()
        if self.nan_policy == "raise" and not bool(finite):
            raise ValueError("x: expected finite values, got a training batch with NaN or Inf")
        state = self._state()
        batch = moments_of_batch(torch_namespace, ShiftedMoments(count, None, mean, m2, True))
        new = rule.step(state.state(), batch)
        state.assign(new, finite)
        self._set_running(new, finite)
        self._count(finite, ~finite, new)

    def _commit(self, rule: Strategy, slots: StackedMoments) -> None:
        """Fold ``slots`` with ``rule`` into the strategy, the running buffers and the
        counters (masked slots count as skipped)."""
        state = self._state()
        new = rule.fold(state.state(), slots)
        state.assign(new)
        self._set_running(new)
        folded = slots.finite.sum()
        self._count(folded, len(slots.counts) - folded, new)

    def _state(self) -> StrategyState:
        state = self._strategy_buffers()
        if state is None:
            raise ValueError("stats: a 'batch' BatchNorm keeps no statistics to fold into")
        return state

    def _count(self, folded: Tensor, skipped: Tensor, state: State) -> None:
        """Add to the batch counters; an exact layer (fed by training only under
        ``momentum=None``) is calibrated once it holds samples."""
        for name, number in (("num_batches_tracked", folded), ("num_batches_skipped", skipped)):
            counter = self._buffers[name]
            if counter is not None:
                counter.add_(number)
        if isinstance(self.strategy, ExactFullPass):
            self._calibrated = bool(state["count"] > 0)

    def _set_running(self, state: State, keep: Tensor | None = None) -> None:
        """``running_mean``/``running_var`` := the strategy's estimate of ``state`` (left as
        they are where ``keep`` is False)."""
        assert self.strategy is not None
        buffers = (self._buffers["running_mean"], self._buffers["running_var"])
        for buffer, value in zip(buffers, self.strategy.estimate(state), strict=True):
            if buffer is not None:
                buffer.copy_(value if keep is None else torch.where(keep, value, buffer))

    # -- calibration (recalibrate's one pass) ---------------------------------------------

    def start_calibration(self) -> None:
        """From now on, forward normalizes with batch statistics and changes nothing (the
        upstream layers of :func:`~normstats.adapters.torch.recalibrate`'s one pass, which
        observes every layer's input itself), in either mode and without synchronizing."""
        self.fold_pending()
        self._calibrating = True
        self._calibration_moments = None

    def stop_calibration(self) -> None:
        """End :meth:`start_calibration`: forward is the module's own again."""
        self._calibrating = False
        self._calibration_moments = None

    def set_calibration_moments(self, moments: Moments | None) -> None:
        """The moments of the next calibration input, measured by whoever observed it (the
        pass pools them), so that forward normalizes with them instead of reducing the batch
        again (on CPU the evaluation kernel with them costs a third of the training one)."""
        self._calibration_moments = moments

    @property
    def calibrating(self) -> bool:
        """Whether a calibration pass runs (:meth:`start_calibration`)."""
        return self._calibrating

    def load_calibration(self, moments: Moments, num_batches_skipped: int = 0) -> None:
        """Make ``moments`` (a calibration's pooled count, mean and M2) the strategy's
        statistics: its estimate becomes their mean and unbiased variance, whatever the
        strategy; ``num_batches_skipped`` is how many batches the calibration left out."""
        strategy, state = self.strategy, self.strategy_state
        if strategy is None or state is None:
            return
        assert self.num_batches_skipped is not None
        device = self._device()

        def statistic(value: Any) -> Tensor:
            return torch.as_tensor(value, dtype=STATS_DTYPE, device=device)

        # the mean's two parts, as Strategy.load_moments passes them: no digit is lost
        batch = Moments(
            int(moments.count),
            statistic(moments.mean),
            statistic(moments.m2),
            mean_residual=statistic(moments.mean_residual),
        )
        with torch.no_grad():
            calibrated = strategy.calibrated_state(batch)
            state.assign(calibrated)
            self._set_running(calibrated)
            self.num_batches_skipped.fill_(num_batches_skipped)
        self._calibrated = True

    def _calibrate(self, x: Tensor) -> Tensor:
        """Normalize with batch statistics, tracking nothing (during a calibration pass):
        the moments :meth:`set_calibration_moments` gave for this input if any, else the
        training kernel's (which refuses one value per channel, as in training)."""
        moments, self._calibration_moments = self._calibration_moments, None
        count = x.numel() // self.num_features
        if moments is None or moments.count != count or count <= 1:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        mean = torch.as_tensor(moments.mean).to(x.dtype)
        var = torch.as_tensor(moments.m2 / count).to(x.dtype)  # biased, as training normalizes
        return F.batch_norm(x, mean, var, self.weight, self.bias, False, 0.0, self.eps)

    def _device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def _check_input_dim(self, x: Tensor) -> None:
        if not 2 <= x.dim() <= 5:
            raise ValueError(f"x: expected 2D to 5D input (N, C, ...), got {x.dim()}D input")
        # set when it changes (nn.Module's attribute setting costs a few us), except while
        # torch.compile traces, where reading it would guard the graph on its first value
        if torch.compiler.is_compiling() or self.input_rank != x.dim():
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
        """Forget every batch, the pending ones too: the strategy's initial state,
        ``running_mean`` 0, ``running_var`` 1 and the counters 0 (as torch's
        ``reset_running_stats``)."""
        self._ring.clear()
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

    # -- state dicts, copies and moves: every batch seen is in what they see -----------------

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self.fold_pending()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _apply(self, fn: Any, recurse: bool = True) -> BatchNorm:
        self.fold_pending()
        self._ring.release()  # the next step allocates it where the input is, in its dtype
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch leaves it untyped
        return self

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and ``copy.deepcopy``: the statistics of every batch, no pending slot."""
        self.fold_pending()
        state = self.__dict__.copy()
        state["_ring"] = MomentRing()
        return state

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
        self.fold_pending()  # a refused load leaves the statistics of every batch seen
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


def _write_batch_moments(x: Tensor, mean: Tensor, var: Tensor) -> None:
    """The batch mean and unbiased variance of ``x`` per channel, reduced in float32, into
    ``mean`` and ``var`` (for modules whose own dtype would round them)."""
    with torch.no_grad():
        batch_var, batch_mean = torch.var_mean(
            x.detach().to(BATCH_MOMENTS_DTYPE), reduced_axes(x.dim(), 1), correction=1
        )
        mean.copy_(batch_mean)
        var.copy_(batch_var)


__all__ = ["BatchNorm"]
