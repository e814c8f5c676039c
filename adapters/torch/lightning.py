"""A PyTorch Lightning callback: normstats BatchNorm statistics for a LightningModule.

:class:`BatchNormStatistics` converts every torch BatchNorm of the module to a normstats
strategy when ``trainer.fit`` sets up, and replaces the statistics by the exact ones over
the training dataloader when training ends, as Lightning's ``StochasticWeightAveraging``
refreshes them with ``torch.optim.swa_utils.update_bn``, but with a dedicated pass
(:func:`~normstats.adapters.torch.recalibrate`, one pass or layer by layer) under the
trained weights.

The conversion happens in the callback's ``setup``: Lightning calls it before it moves the
model to its device, wraps it for distributed training and calls ``configure_optimizers``,
so the optimizer, and DistributedDataParallel, hold the converted layers' parameters.

Needs the ``lightning`` extra (``pip install 'normstats[lightning]'``). Works with either
package name of Lightning, ``lightning.pytorch`` or ``pytorch_lightning``; this module is not
imported by ``normstats.adapters.torch``, so torch users without Lightning never load it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

from torch import nn

from .arguments import flag, positive_int
from .batchnorm import BatchNorm
from .convert import TORCH_BATCHNORMS, convert
from .recalibrate import recalibrate

LIGHTNING_PACKAGES = ("lightning.pytorch", "pytorch_lightning")
"""Where Lightning's classes are found, in order: the unified ``lightning`` package, then the
standalone ``pytorch-lightning`` (the ``lightning`` extra's). Lightning calls a callback's hooks
by name, so a callback of either package serves a Trainer of the other."""


def _lightning() -> ModuleType:
    """The first Lightning package that imports, or a one-line error saying what to install."""
    for name in LIGHTNING_PACKAGES:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name not in (name, name.partition(".")[0]):  # a broken install: show it
                raise
    raise ModuleNotFoundError(
        "normstats.adapters.torch.lightning needs PyTorch Lightning, which is not installed: "
        "pip install 'normstats[lightning]'",
        name="pytorch_lightning",
    )


if TYPE_CHECKING:
    from pytorch_lightning import Callback, LightningModule, Trainer
else:
    _package = _lightning()
    Callback, LightningModule, Trainer = (
        _package.Callback,
        _package.LightningModule,
        _package.Trainer,
    )


def first_element(batch: Any) -> Any:
    """The model input of a batch: the first element of a tuple or list (``(x, y)``
    batches), else the batch itself."""
    return batch[0] if isinstance(batch, tuple | list) else batch


class BatchNormStatistics(Callback):
    """Convert a LightningModule's BatchNorm layers at fit start; recalibrate them at the end.

    When ``trainer.fit`` sets up, every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` of
    the module becomes a normstats :class:`~normstats.adapters.torch.BatchNorm` with the
    strategy ``stats`` (``convert(module, stats, **convert_kwargs)``), before the optimizer
    is built. When training ends (``on_train_end``, with the model still on its device),
    ``recalibrate`` replaces every layer's statistics by the pooled mean and unbiased
    variance of its input over the training dataloader, with the trained weights:
    ``layerwise=False`` pools every layer in one pass while the layers upstream normalize
    with batch statistics (PreciseBN's pass); ``layerwise=True`` calibrates layer by layer
    on the inputs each layer sees at inference, at the cost of about (L + 1) / 2 passes for
    L layers (each pass iterates the dataloader again, so a shuffling or augmenting loader
    gives each layer its own draw of the same samples).

    Parameters
    ----------
    stats : str
        The strategy of the layers during training: ``"welford"`` (the default: pooled
        statistics of every training batch, so validation during fit has statistics),
        ``"ema"``, ``"cumulative"``, ``"exact"`` (none until the pass at the end: validation
        during fit cannot evaluate, see below) or ``"batch"``.
    recalibrate : bool
        Run the exact pass when training ends (default). ``False`` only converts; it is
        refused with ``"exact"``, whose layers would never hold statistics.
    layerwise : bool
        Calibrate layer by layer instead of in one pass.
    max_batches : int or None
        Read at most this many batches per pass; None reads the whole training dataloader
        (``limit_train_batches`` does not apply).
    batch_to_input : callable
        Maps a training batch, as ``training_step`` receives it (converted by the precision
        plugin, through the batch-transfer hooks, on the module's device), to the argument
        of the module's ``forward``. The default takes the first element of a tuple or list,
        else the batch; a dict batch needs one, for example ``lambda batch: batch["image"]``.
    **convert_kwargs
        Passed to :func:`~normstats.adapters.torch.convert`: ``eps``, ``momentum``,
        ``nan_policy``, ``sync``, ``process_group`` and the strategy's own arguments.

    Every argument is checked when the callback is built (``convert_kwargs`` by building one
    layer with them), so a wrong one fails before ``trainer.fit`` starts.

    Notes
    -----
    Layers must exist when the callback's ``setup`` runs (before the module's own ``setup``
    and ``configure_model``), and ``Trainer(sync_batchnorm=True)`` would replace the
    converted layers by ``nn.SyncBatchNorm``: for synchronized statistics pass ``sync=True``
    here instead. Either case is detected when fit starts and raises an error.

    Under distributed data parallel training each rank reads its shard of the training
    data (Lightning's ``DistributedSampler``) and ``recalibrate`` merges every layer's pool
    across the ranks, so each rank ends with the statistics of the whole dataset (the
    sampler repeats a few samples to give the ranks equal shares, unless it drops them).

    The pass runs in the precision plugin's forward context, as validation and prediction
    do (autocast under mixed precision), so the statistics are those of the inputs the
    layers see at inference.
    """

    def __init__(
        self,
        stats: str = "welford",
        *,
        recalibrate: bool = True,
        layerwise: bool = False,
        max_batches: int | None = None,
        batch_to_input: Callable[[Any], Any] = first_element,
        **convert_kwargs: Any,
    ) -> None:
        super().__init__()
        BatchNorm(1, stats, **convert_kwargs)  # a wrong strategy or setting fails here
        self.stats = stats
        self.recalibrate = flag("recalibrate", recalibrate)
        self.layerwise = flag("layerwise", layerwise)
        self.max_batches = None if max_batches is None else positive_int("max_batches", max_batches)
        if not callable(batch_to_input):
            raise TypeError(
                "batch_to_input: expected a callable that maps a batch to the model input, "
                f"got {type(batch_to_input).__name__}"
            )
        self.batch_to_input = batch_to_input
        self.convert_kwargs = convert_kwargs
        if stats == "exact" and not self.recalibrate:
            raise ValueError(
                "recalibrate: expected True with stats='exact', whose layers hold statistics "
                "only after a calibration pass, got False"
            )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Convert the module's BatchNorm layers, before the optimizer is configured."""
        if stage == "fit":
            convert(pl_module, self.stats, **self.convert_kwargs)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check that no torch BatchNorm came in after the conversion."""
        left = [name for name, m in pl_module.named_modules() if isinstance(m, TORCH_BATCHNORMS)]
        if left:
            raise ValueError(
                f"model: expected only normstats BatchNorm layers at fit start, got torch ones "
                f"at {left}: build them in the module's __init__ (BatchNormStatistics converts "
                f"in its setup, before the module's setup and configure_model), and for "
                f"synchronized statistics pass sync=True to BatchNormStatistics instead of "
                f"Trainer(sync_batchnorm=True), which replaces the converted layers"
            )

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse to validate ``"exact"`` layers that have no statistics yet, saying why."""
        for layer in _layers(pl_module):
            try:
                layer.check_calibrated()
            except ValueError as error:
                raise ValueError(
                    "stats: the 'exact' layers of BatchNormStatistics hold statistics only "
                    "after the pass at the end of training, so validation during fit cannot "
                    "evaluate them; use stats='welford' (pooled statistics during training, "
                    "exact ones at the end) or turn validation off "
                    "(Trainer(limit_val_batches=0, num_sanity_val_steps=0))"
                ) from error

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The exact pass over the training dataloader, with the trained weights."""
        if not self.recalibrate:
            return
        loader = trainer.train_dataloader
        if loader is None or isinstance(loader, Mapping | list | tuple):
            raise ValueError(
                "trainer.train_dataloader: expected one training dataloader to calibrate on, "
                f"got {type(loader).__name__}; with several, use "
                "BatchNormStatistics(recalibrate=False) and call "
                "normstats.adapters.torch.recalibrate(model, data) on the data you choose"
            )
        inputs = _ModelInputs(loader, trainer, self.batch_to_input)
        with trainer.precision_plugin.forward_context():
            recalibrate(pl_module, inputs, layerwise=self.layerwise, max_batches=self.max_batches)


class _ModelInputs:
    """The batches of a dataloader as model inputs on the module's device; re-iterable, as
    a layer-by-layer calibration needs."""

    def __init__(
        self, loader: Iterable[Any], trainer: Trainer, batch_to_input: Callable[[Any], Any]
    ) -> None:
        self.loader, self.trainer, self.batch_to_input = loader, trainer, batch_to_input

    def __iter__(self) -> Iterator[tuple[Any]]:
        trainer = self.trainer
        for batch in self.loader:
            # what Lightning's training loop does to a batch before training_step (the
            # precision's input conversion, then the module's or datamodule's transfer hooks)
            batch = trainer.precision_plugin.convert_input(batch)
            batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
            batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
            # a 1-tuple: recalibrate takes the first element of a tuple, so an input that is
            # itself a tuple or list reaches the model whole
            yield (self.batch_to_input(batch),)


def _layers(model: nn.Module) -> list[BatchNorm]:
    return [m for m in model.modules() if isinstance(m, BatchNorm)]


__all__ = ["BatchNormStatistics", "first_element"]
