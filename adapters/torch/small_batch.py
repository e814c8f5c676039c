r"""Small-batch training modes of the torch layer: Batch Renormalization and Ghost BatchNorm.

**Batch Renormalization** (Ioffe, 2017) trains with
:math:`y = \gamma (\hat x r + d) + \beta`, where :math:`\hat x` is normalized with the batch
mean and biased variance and :math:`(r, d)` corrects it towards the layer's running estimate
(:func:`normstats.functional.renorm_correction`), constants of the backward pass. Because
:math:`r` and :math:`d` are constants, that output is torch's training kernel with the
weight :math:`\gamma r` and the bias :math:`\gamma d + \beta` (:func:`corrected_affine`):
one kernel, whose backward is the exact gradient of the definition for the input, the
weight and the bias. The kernel needs :math:`r` first, so the batch moments are reduced once
before it (:func:`batch_moments`).

**Ghost BatchNorm** (Hoffer et al., 2017) splits a training batch along dimension 0 into
consecutive virtual batches of ``virtual_batch_size`` samples (the last one holds the
remainder) and normalizes each with its own mean and biased variance
(:func:`ghost_batch_norm`, torch's kernel once per virtual batch). The running strategy is
fed the moments of the whole batch, pooled exactly from the virtual batches' moments
(:func:`pooled`): the population statistics estimate the distribution of the layer's input,
and the whole batch is the larger sample of it; a strategy fed each virtual batch as a batch
would count one training step as several (an EMA would move several times per step).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812 - torch's convention
from torch import Tensor

from normstats.functional import renorm_limits

from .distributed import merge_rows
from .state import BATCH_MOMENTS_DTYPE, STATS_DTYPE


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


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """The mean and biased variance per channel of ``x`` (N, C, ...), reduced in float32 or
    wider whatever its dtype, without gradient.

    On the CPU two passes (the mean, then the mean of squared deviations from it) cost a
    fifth of torch's training step, where its one-pass ``var_mean`` costs about a whole one;
    elsewhere ``var_mean`` is one fused reduction.
    """
    with torch.no_grad():
        wide = x.detach().to(torch.promote_types(x.dtype, BATCH_MOMENTS_DTYPE))
        axes = (0, *range(2, x.dim()))  # (not reduced_axes: its cache warns under compile)
        if x.device.type != "cpu":
            var, mean = torch.var_mean(wide, axes, correction=0)
            return mean, var
        mean = wide.mean(axes, keepdim=True)
        var = (wide - mean).square_().mean(axes)
        return mean.view(-1), var


def corrected_affine(
    weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    r"""The kernel's weight and bias that make its output :math:`\gamma (\hat x r + d) + \beta`:
    :math:`\gamma r` and :math:`\gamma d + \beta` (``r`` and ``d`` alone without ``weight``),
    in ``dtype``. Gradients reach ``weight`` and ``bias`` through them; ``r`` and ``d`` carry
    none."""
    r, d = r.detach().to(dtype), d.detach().to(dtype)
    if weight is None:
        return r, d if bias is None else d + bias
    return weight * r, weight * d if bias is None else torch.addcmul(bias, weight, d)


def check_virtual_batches(x: Tensor, virtual_batch_size: int) -> None:
    """Refuse a batch whose last virtual batch holds one value per channel (its variance is
    zero, so its output would carry no information; torch refuses such a batch too)."""
    if x.shape[0] % virtual_batch_size == 1 and math.prod(x.shape[2:]) == 1:
        raise ValueError(
            f"x: expected more than 1 value per channel in every virtual batch when "
            f"training, got a batch of {x.shape[0]} (input size {tuple(x.shape)}) whose last "
            f"virtual batch holds 1 sample (virtual_batch_size={virtual_batch_size})"
        )


def ghost_batch_norm(
    x: Tensor,
    virtual_batch_size: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    moments: Tensor | None,
) -> Tensor:
    """Normalize each virtual batch of ``x`` (consecutive chunks of ``virtual_batch_size``
    samples along dimension 0, the last one the remainder) with its own statistics.

    ``moments``, if given, is a ``(2, K, C)`` tensor of zeros for the ``K`` virtual batches:
    the kernel writes virtual batch k's mean into ``moments[0, k]`` and its unbiased
    variance into ``moments[1, k]`` (running buffers with momentum 1). Autograd keeps it for
    the backward pass: it must not be written again.
    """
    chunks = torch.split(x, virtual_batch_size)
    if moments is None:
        rows: list[tuple[Tensor | None, Tensor | None]] = [(None, None)] * len(chunks)
    else:  # (views of every row at once)
        rows = list(zip(moments[0].unbind(0), moments[1].unbind(0), strict=True))
    outputs = [
        F.batch_norm(chunk, mean, var, weight, bias, True, 1.0, eps)
        for chunk, (mean, var) in zip(chunks, rows, strict=True)
    ]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def virtual_batch_counts(x: Tensor, virtual_batch_size: int) -> list[int]:
    """Values per channel of each virtual batch of ``x``."""
    per_sample = math.prod(x.shape[2:])
    full, remainder = divmod(x.shape[0], virtual_batch_size)
    return [virtual_batch_size * per_sample] * full + [remainder * per_sample] * (remainder > 0)


def pooled(counts: list[int], moments: Tensor) -> tuple[Tensor, Tensor]:
    """The float64 mean and sum of squared deviations of the union of the virtual batches
    whose counts are ``counts`` and whose mean and unbiased variance are ``moments[0]`` and
    ``moments[1]`` (Chan's exact merge, on the device)."""
    wide = moments.detach().to(STATS_DTYPE)
    # filled on the device (a copy of host numbers could wait for it): K - 1 equal counts
    # and the last one
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
    "RenormLimits",
    "batch_moments",
    "check_virtual_batches",
    "corrected_affine",
    "ghost_batch_norm",
    "pooled",
    "virtual_batch_counts",
]
