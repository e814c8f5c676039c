r"""Small-batch training modes of the torch layer: Batch Renormalization and Ghost BatchNorm.

**Batch Renormalization** (Ioffe, 2017) trains with
:math:`y = \gamma (\hat x r + d) + \beta`, where :math:`\hat x` is normalized with the batch
mean and biased variance and :math:`(r, d)` corrects it towards the layer's running estimate
(:func:`normstats.functional.renorm_correction`), constants of the backward pass.

**Ghost BatchNorm** (Hoffer et al., 2017) splits a training batch along dimension 0 into
consecutive virtual batches of ``virtual_batch_size`` samples (the last one holds the
remainder) and normalizes each with its own mean and biased variance. The running strategy
is fed the moments of the whole batch, pooled exactly from the virtual batches' moments
(:func:`pooled`): the population statistics estimate the distribution of the layer's input,
and the whole batch is the larger sample of it; a strategy fed each virtual batch as a batch
would count one training step as several (an EMA would move several times per step).

Both run torch's own batch-norm kernels (``aten::native_batch_norm`` and its backward) in a
``torch.autograd.Function`` whose backward is the exact gradient of the definition:

* renorm: the kernel normalizes without affine parameters and writes the batch moments
  (into running buffers, with momentum 1); ``r`` and ``d`` follow from them, and the
  normalized batch is scaled by :math:`\gamma r` and shifted by :math:`\gamma d + \beta` in
  place. As ``r`` and ``d`` are constants, the gradient is the kernel's backward with the
  weight :math:`\gamma r`, whose weight and bias gradients give those of :math:`\gamma`
  (:math:`r \sum g \hat x + d \sum g`) and :math:`\beta` (:math:`\sum g`). The step costs
  one elementwise pass more than torch's; reducing the batch before the kernel (to know
  ``r`` and ``d`` first) costs more (two passes, and a temporary).
* ghost: the kernel runs on each virtual batch, writing into its slice of one output (and
  its backward into its slice of one input gradient), so that no concatenation copies the
  activations; the weight and bias gradients are summed over the virtual batches.

The kernels get their parameters and running buffers in float32 or wider (torch's mixed
precision path for float16 and bfloat16 input), so the moments fed to the strategy are
float32 or better whatever the module's dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from normstats.functional import renorm_correction, renorm_limits

from .distributed import merge_rows
from .state import BATCH_MOMENTS_DTYPE, STATS_DTYPE

aten = torch.ops.aten

# The correction finds the array namespace of tensors once and remembers it. Found here, at
# import, it is not found during a torch.compile trace, which would go through
# array_api_compat's functools cache (dynamo warns that it skips such caches).
renorm_correction(torch.ones(1), torch.ones(1), torch.zeros(1), torch.ones(1), r_max=1.0, d_max=0.0)


class RenormLimits:
    """Batch Renormalization's clipping limits ``(r_max, d_max)`` at a training step given
    as a tensor on the device (``num_batches_tracked``), so that the warm-up is read without
    a host synchronisation and traces under ``torch.compile``.

    :func:`~normstats.functional.renorm_limits` grows the limits linearly from ``(1, 0)`` to
    ``(r_max, d_max)`` over ``warmup`` steps; its two ends come from it, and the steps in
    between are the same straight line evaluated on the device.
    """

    def __init__(self, warmup: int, r_max: float, d_max: float) -> None:
        self.warmup = warmup
        self.start = renorm_limits(0, warmup, r_max, d_max)
        self.end = renorm_limits(warmup, warmup, r_max, d_max)

    def at(self, step: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """``(r_max, d_max)`` at training step ``step`` (a 0-d integer tensor)."""
        if self.warmup == 0:
            return self.end
        progress = step.clamp(max=self.warmup).to(STATS_DTYPE) / self.warmup
        r_start, d_start = self.start
        r_end, d_end = self.end
        return r_start + (r_end - r_start) * progress, d_start + (d_end - d_start) * progress


def correction(
    mean: Tensor,
    var: Tensor,
    estimate: tuple[Tensor, Tensor],
    limits: tuple[Tensor | float, Tensor | float],
    seen: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """``(r, d)`` of a batch of float64 ``mean`` and biased ``var`` against ``estimate``,
    clipped with ``limits``; ``r = 1``, ``d = 0`` where ``seen`` is False (no estimate yet)."""
    r_max, d_max = limits
    r, d = renorm_correction(
        mean,
        var,
        *estimate,
        # during the warm-up, 0-d tensors on the device: the clip takes arrays as bounds
        r_max=r_max,  # type: ignore[arg-type]
        d_max=d_max,  # type: ignore[arg-type]
        eps=eps,
    )
    # One tensor, made by an operation that torch.compile's partitioner does not recompute
    # in the backward pass: it could recompute r and d there from the strategy's buffers,
    # which the fold of this batch has changed by then (r and d would be the next step's).
    corrected = torch.stack((torch.where(seen, r, 1.0), torch.where(seen, d, 0.0)))
    r, d = corrected.unbind(0)
    return r, d


def corrected_affine(
    weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor
) -> tuple[Tensor, Tensor]:
    r"""The weight and bias that turn the normalized batch :math:`\hat x` into
    :math:`\gamma (\hat x r + d) + \beta`: :math:`\gamma r` and :math:`\gamma d + \beta`
    (``r`` and ``d`` alone without ``weight``). Gradients reach ``weight`` and ``bias``
    through them; ``r`` and ``d``, computed from detached statistics, carry none."""
    if weight is None:
        return r, d if bias is None else d + bias
    return weight * r, weight * d if bias is None else torch.addcmul(bias, weight, d)


def check_batch(x: Tensor, virtual_batch_size: int | None = None) -> None:
    """Refuse a batch (or a virtual batch) with one value per channel, as torch does: its
    variance is zero, so its output would carry no information."""
    size = x.shape[0] if virtual_batch_size is None else x.shape[0] % virtual_batch_size
    if size == 1 and math.prod(x.shape[2:]) == 1:
        where = "" if virtual_batch_size is None else " in every virtual batch"
        last = (
            ""
            if virtual_batch_size is None
            else f" whose last virtual batch holds 1 sample (virtual_batch_size="
            f"{virtual_batch_size})"
        )
        raise ValueError(
            f"Expected more than 1 value per channel{where} when training, got input size "
            f"{tuple(x.shape)}{last}"
        )


def _channel_view(values: Tensor, x: Tensor) -> Tensor:
    """Per-channel ``values`` shaped to broadcast against ``x`` (N, C, ...), in its dtype."""
    return values.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))


def _kernel_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the kernel's parameters and statistics: float32 or wider."""
    return torch.promote_types(x.dtype, BATCH_MOMENTS_DTYPE)


def _gradient_layout(grad: Tensor, x: Tensor) -> Tensor:
    """``grad`` laid out as ``x`` (the kernel's backward wants them alike)."""
    for layout, rank in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == rank and not x.is_contiguous() and x.is_contiguous(memory_format=layout):
            return grad.contiguous(memory_format=layout)
    return grad.contiguous()


class RenormalizedBatchNorm(torch.autograd.Function):
    r"""Batch Renormalization's training step: ``(y, moments)``, with ``moments[0]`` and
    ``moments[1]`` the batch's mean and unbiased variance in float64 (no gradient).

    Forward arguments: ``x, weight, bias`` (None where absent), the strategy's float64
    ``(mean, var)`` estimate, the clipping limits, whether there is an estimate (a 0-d
    bool tensor) and ``eps``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        estimate_mean: Tensor,
        estimate_var: Tensor,
        r_max: Tensor | float,
        d_max: Tensor | float,
        seen: Tensor,
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        estimate, limits = (estimate_mean, estimate_var), (r_max, d_max)
        count = x.numel() // x.shape[1]
        kernel = torch.zeros(2, x.shape[1], dtype=_kernel_dtype(x), device=x.device)
        x_hat, save_mean, save_invstd = aten.native_batch_norm(
            x, None, None, *kernel.unbind(0), True, 1.0, eps
        )
        moments = kernel.to(STATS_DTYPE, copy=True)
        mean, var = moments.unbind(0)
        r, d = correction(mean, var * ((count - 1) / count), estimate, limits, seen, eps)
        scale, shift = corrected_affine(weight, bias, r, d)
        y = x_hat.mul_(_channel_view(scale, x_hat)).add_(_channel_view(shift, x_hat))
        ctx.save_for_backward(x, weight, r, d, save_mean, save_invstd)
        ctx.eps, ctx.bias_dtype = eps, None if bias is None else bias.dtype
        ctx.mark_non_differentiable(moments)
        return y, moments

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        x, weight, r, d, save_mean, save_invstd = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        scale = r if weight is None else weight.to(STATS_DTYPE) * r
        dx, dweight, dbias = aten.native_batch_norm_backward(
            _gradient_layout(grad, x),
            x,
            scale.to(save_mean.dtype),
            None,
            None,
            save_mean,
            save_invstd,
            True,
            ctx.eps,
            [need_x, need_weight, need_weight or need_bias],
        )
        grad_weight = (dweight * r + dbias * d).to(weight.dtype) if need_weight else None
        grad_bias = dbias.to(ctx.bias_dtype) if need_bias else None
        return dx if need_x else None, grad_weight, grad_bias, None, None, None, None, None, None


class GhostBatchNorm(torch.autograd.Function):
    """Ghost BatchNorm's training step: ``(y, moments)``, where ``moments[0, k]`` and
    ``moments[1, k]`` are the mean and unbiased variance of virtual batch k (no gradient).

    Forward arguments: ``x, weight, bias`` (None where absent), ``virtual_batch_size`` and
    ``eps``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        virtual_batch_size: int,
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        dtype = _kernel_dtype(x)
        wide_weight = None if weight is None else weight.to(dtype)
        wide_bias = None if bias is None else bias.to(dtype)
        count = -(-x.shape[0] // virtual_batch_size)
        moments = torch.zeros(2, count, x.shape[1], dtype=dtype, device=x.device)
        saved = torch.empty(2, count, x.shape[1], dtype=dtype, device=x.device)
        y = torch.empty_like(x)
        rows = [row.unbind(0) for tensor in (moments, saved) for row in tensor.unbind(0)]
        parts = (torch.split(x, virtual_batch_size), torch.split(y, virtual_batch_size))
        for part, out, mean, var, save_mean, save_invstd in zip(*parts, *rows, strict=True):
            aten.native_batch_norm.out(
                part,
                wide_weight,
                wide_bias,
                mean,
                var,
                True,
                1.0,
                eps,
                out=out,
                save_mean=save_mean,
                save_invstd=save_invstd,
            )
        ctx.save_for_backward(x, wide_weight, saved)
        ctx.virtual_batch_size, ctx.eps = virtual_batch_size, eps
        ctx.dtypes = [None if p is None else p.dtype for p in (weight, bias)]
        ctx.mark_non_differentiable(moments)
        return y, moments

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        x, wide_weight, saved = ctx.saved_tensors
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        size, grad = ctx.virtual_batch_size, _gradient_layout(grad, x)
        grad_x = torch.empty_like(x) if need_x else None
        mask = [need_x, need_weight, need_bias]
        sums: list[list[Tensor]] = [[], []]
        save_means, save_invstds = (row.unbind(0) for row in saved.unbind(0))
        parts = zip(
            torch.split(x, size), torch.split(grad, size), save_means, save_invstds, strict=True
        )
        for k, (part, part_grad, save_mean, save_invstd) in enumerate(parts):
            dx, dweight, dbias = aten.native_batch_norm_backward(
                part_grad,
                part,
                wide_weight,
                None,
                None,
                save_mean,
                save_invstd,
                True,
                ctx.eps,
                mask,
            )
            if grad_x is not None:  # (each into its slice: the slices are one gradient)
                grad_x[k * size : (k + 1) * size].copy_(dx)
            sums[0].append(dweight)
            sums[1].append(dbias)
        weight_dtype, bias_dtype = ctx.dtypes
        grad_weight = torch.stack(sums[0]).sum(0).to(weight_dtype) if need_weight else None
        grad_bias = torch.stack(sums[1]).sum(0).to(bias_dtype) if need_bias else None
        return grad_x, grad_weight, grad_bias, None, None


def renormalized(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    estimate: tuple[Tensor, Tensor],
    limits: tuple[Tensor | float, Tensor | float],
    seen: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """:class:`RenormalizedBatchNorm` applied: ``(y, moments)``."""
    y, moments = RenormalizedBatchNorm.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, *estimate, *limits, seen, eps
    )
    return y, moments


def ghost_normalized(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, virtual_batch_size: int, eps: float
) -> tuple[Tensor, Tensor]:
    """:class:`GhostBatchNorm` applied: ``(y, moments)``."""
    y, moments = GhostBatchNorm.apply(  # type: ignore[no-untyped-call]
        x, weight, bias, virtual_batch_size, eps
    )
    return y, moments


def virtual_batch_counts(x: Tensor, virtual_batch_size: int) -> list[int]:
    """Values per channel of each virtual batch of ``x``: all equal but the last."""
    per_sample = math.prod(x.shape[2:])
    full, remainder = divmod(x.shape[0], virtual_batch_size)
    return [virtual_batch_size * per_sample] * full + [remainder * per_sample] * (remainder > 0)


def pooled(counts: list[int], moments: Tensor) -> tuple[Tensor, Tensor]:
    """The float64 mean and sum of squared deviations of the union of the virtual batches
    whose counts are ``counts`` (all equal but the last) and whose means and unbiased
    variances are ``moments[0]`` and ``moments[1]`` (Chan's exact merge, on the device)."""
    wide = moments.to(STATS_DTYPE)
    # filled on the device (a copy of host numbers could wait for it)
    sizes = torch.cat(
        [
            torch.full((len(counts) - 1,), counts[0], dtype=STATS_DTYPE, device=wide.device),
            torch.full((1,), counts[-1], dtype=STATS_DTYPE, device=wide.device),
        ]
    )
    means, m2s = wide[0], wide[1] * (sizes - 1.0)[:, None]
    reference = means[0]
    _, step, m2 = merge_rows(sizes, means - reference, m2s)
    return reference + step, m2


__all__ = [
    "GhostBatchNorm",
    "RenormLimits",
    "RenormalizedBatchNorm",
    "check_batch",
    "corrected_affine",
    "correction",
    "ghost_normalized",
    "pooled",
    "renormalized",
    "virtual_batch_counts",
]
