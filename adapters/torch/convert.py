"""Swap every BatchNorm of a model for normstats' and back.

``convert`` is to normstats what ``SyncBatchNorm.convert_sync_batchnorm`` is to torch: it
walks the module tree (the root included) and replaces each ``nn.BatchNorm1d/2d/3d`` and
``nn.SyncBatchNorm`` with a :class:`~normstats.adapters.torch.BatchNorm` that carries its
weights, running statistics, settings, mode, device and dtype. ``revert`` goes back to
plain torch modules, for export (ONNX, TorchScript) or for code that expects them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from normstats import RunningStats, Strategy

from .batchnorm import BatchNorm

TORCH_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
"""The classes ``convert`` replaces."""

DEFAULT_MOMENTUM = 0.1
"""torch's default, which an ``"exact"`` layer converted from ``momentum=None`` gets."""

CLASS_BY_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
"""What a layer built directly reverts to, by the rank of the input it has seen."""


def convert(
    model: nn.Module, stats: str | type[Strategy] | RunningStats = "welford", **kwargs: Any
) -> nn.Module:
    """Replace every torch BatchNorm in ``model`` (recursively, the root too) with normstats'.

    Carried over: ``weight``/``bias`` (``affine``, ``bias=False``), running statistics (the
    strategy resumes from them; not into ``"exact"``, which starts uncalibrated), ``eps``,
    ``momentum``, the training flag, device and dtype. A layer built with
    ``track_running_stats=False`` becomes a ``stats="batch"`` layer whatever ``stats`` says,
    ``momentum=None`` (PyTorch's cumulative average) becomes ``"cumulative"`` when
    ``stats="ema"``, and an ``"exact"`` layer gets momentum 0.1 in its place (under ``None``
    an exact layer pools its training input, as ``swa_utils.update_bn`` asks). Keyword
    arguments override what is carried (``eps=``, ``momentum=``, ``nan_policy=``, strategy
    arguments) or add to it: the small-batch training modes (``renorm=True, r_max=,
    d_max=, renorm_warmup=`` or ``virtual_batch_size=``) apply to every converted layer;
    ``renorm=True`` is refused before anything is replaced if a layer was built with
    ``track_running_stats=False``. Returns the converted model (a new root when the
    root itself was a BatchNorm).

    >>> from torch import nn
    >>> from normstats.adapters.torch import convert
    >>> model = convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), stats="ema")
    >>> type(model[1]).__name__, model[1].stats_name
    ('BatchNorm', 'ema')
    """
    if kwargs.get("renorm"):
        _check_renormalizable(model)
    return _converted_tree(model, stats, kwargs)


def _converted_tree(
    model: nn.Module, stats: str | type[Strategy] | RunningStats, kwargs: dict[str, Any]
) -> nn.Module:
    if isinstance(model, TORCH_BATCHNORMS):
        return _converted(model, stats, kwargs)
    for name, child in model.named_children():
        replacement = _converted_tree(child, stats, kwargs)
        if replacement is not child:
            setattr(model, name, replacement)
    return model


def _check_renormalizable(model: nn.Module) -> None:
    """Refuse ``renorm=True`` before any layer is replaced if a layer keeps no running
    statistics (it would become a ``"batch"`` layer, which has no estimate to correct to)."""
    untracked = [
        name or type(model).__name__
        for name, layer in model.named_modules()
        if isinstance(layer, TORCH_BATCHNORMS) and not layer.track_running_stats
    ]
    if untracked:
        raise ValueError(
            f"renorm: Batch Renormalization corrects each training batch towards the layer's "
            f"running statistics; expected layers that track them, got "
            f"track_running_stats=False in {', '.join(untracked)}"
        )


def revert(model: nn.Module) -> nn.Module:
    """Replace every normstats BatchNorm in ``model`` (the root too) with a torch one.

    Each goes back to the class it replaced; one built directly becomes the class its input
    rank implies (2-3d: ``BatchNorm1d``, 4d: ``BatchNorm2d``, 5d: ``BatchNorm3d``), which it
    knows once it has run a forward. Weights, running statistics and settings are carried.
    An ``"exact"`` layer that was never calibrated has no statistics to carry: it raises the
    error its evaluation raises (run ``recalibrate`` first). Every layer is checked before
    any is replaced, so an error leaves the model as it was.
    """
    for layer in model.modules():
        if isinstance(layer, BatchNorm):
            _torch_class(layer)
            layer.check_calibrated()
    return _reverted_tree(model)


def _reverted_tree(model: nn.Module) -> nn.Module:
    if isinstance(model, BatchNorm):
        return _reverted(model)
    for name, child in model.named_children():
        replacement = _reverted_tree(child)
        if replacement is not child:
            setattr(model, name, replacement)
    return model


def _converted(
    layer: nn.Module, stats: str | type[Strategy] | RunningStats, kwargs: dict[str, Any]
) -> BatchNorm:
    assert isinstance(layer, nn.modules.batchnorm._BatchNorm)
    reference = layer.weight if layer.weight is not None else layer.running_mean
    settings: dict[str, Any] = {
        "stats": stats,
        "eps": layer.eps,
        "momentum": layer.momentum,
        "affine": layer.affine,
        "bias": layer.bias is not None,
        "device": None if reference is None else reference.device,
        "dtype": None if reference is None else reference.dtype,
    }
    if isinstance(layer, nn.SyncBatchNorm):
        settings.update(sync=True, process_group=layer.process_group)
    settings.update(kwargs)
    if not layer.track_running_stats:
        settings["stats"] = "batch"
    elif settings["stats"] == "ema" and settings["momentum"] is None:
        settings["stats"] = "cumulative"
    elif settings["stats"] == "exact" and "momentum" not in kwargs and layer.momentum is None:
        # momentum=None makes an exact layer pool its training input (update_bn's signal);
        # a converted layer waits for recalibrate, whatever torch's layer averaged
        settings["momentum"] = DEFAULT_MOMENTUM
    new = BatchNorm(layer.num_features, **settings)
    state = layer.state_dict()
    exact = new.stats_name == "exact"
    if exact:  # an exact full pass starts from nothing: only the parameters are carried
        state = {k: v for k, v in state.items() if k in ("weight", "bias")}
    new.load_state_dict(state, strict=not exact)
    new.source_class = type(layer)
    new.train(layer.training)
    return new


def _torch_class(layer: BatchNorm) -> type[nn.Module]:
    cls = layer.source_class or CLASS_BY_RANK.get(layer.input_rank or 0)
    if cls is None:
        raise ValueError(
            "model: a normstats BatchNorm built directly reverts to the torch class its input "
            "rank implies, but it has not seen an input yet; run one forward first"
        )
    return cls


def _reverted(layer: BatchNorm) -> nn.Module:
    cls = _torch_class(layer)
    reference = layer.weight if layer.weight is not None else layer.running_mean
    factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
    momentum = None if layer.stats_name == "cumulative" else layer.momentum
    arguments: dict[str, Any] = {
        "eps": layer.eps,
        "momentum": momentum,
        "affine": layer.affine,
        "track_running_stats": layer.track_running_stats,
        **factory,
    }
    if layer.affine and layer.bias is None:  # older torch releases take no ``bias`` argument
        arguments["bias"] = False
    if cls is nn.SyncBatchNorm:
        arguments["process_group"] = layer.process_group
    torch_layer = cls(layer.num_features, **arguments)
    names = set(torch_layer.state_dict())
    torch_layer.load_state_dict({k: v for k, v in layer.state_dict().items() if k in names})
    torch_layer.train(layer.training)
    return torch_layer


__all__ = ["CLASS_BY_RANK", "TORCH_BATCHNORMS", "convert", "revert"]
