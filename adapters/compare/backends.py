"""One training run per backend: the NumPy adapter or the torch adapter, same protocol.

A run trains one network (batch statistics in training, as BatchNorm always does) while
every tracked strategy follows the same batch moments of every layer; it can then evaluate
the test set with any strategy's statistics and recalibrate (the exact full pass). No
BatchNorm is implemented here: the NumPy backend uses :class:`normstats.BatchNorm`, the torch
backend :class:`normstats.adapters.torch.BatchNorm`.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

import normstats as ns
from normstats.estimators import StackedMoments, Strategy, update_moments_all, update_stacked_all

from ..numpy import (
    Conv,
    GlobalAveragePool,
    Linear,
    ReLU,
    Sequential,
    at_test_time,
    recalibrate,
    softmax_cross_entropy,
)
from ..numpy.training import SGD
from . import strategies
from .data import Dataset
from .train_modes import PLAIN, TrainMode

HIDDEN = (128, 64)
"""Widths of the MLP's hidden layers (each Linear -> BatchNorm -> ReLU)."""
CHANNELS = (16, 32, 32)
"""Channels of the CNN's blocks (each 3-wide Conv -> BatchNorm -> ReLU), then global
average pooling and a Linear classifier."""

Statistics = list[tuple[Any, Any]]
"""(mean, unbiased var) per BatchNorm layer, float64."""


class Run(Protocol):
    """A network being trained, its tracked strategies, and how to evaluate them."""

    def train_epochs(self, epochs: int, batch_size: int, lr: float) -> float:
        """Train on; return the mean training loss of the last epoch."""
        ...

    def statistics(self, strategy: str, calibration: list[Any]) -> Statistics | None: ...

    def use(self, found: Statistics) -> None:
        """Make ``found`` every layer's statistics (the source of a test-time strategy)."""
        ...

    def accuracy(self, strategy: str, X: np.ndarray[Any, Any], batch_size: int) -> float:
        """Accuracy on the test labels of the test inputs ``X`` (flat rows, maybe shifted)."""
        ...

    def calibration_batches(
        self, batch_size: int, rows: np.ndarray[Any, Any] | None = None
    ) -> list[Any]:
        """The training inputs (those at ``rows``, else all), in consecutive batches."""
        ...

    def restore_training_statistics(self) -> None: ...


def batches(
    n: int, batch_size: int, rng: np.random.Generator | None = None, *, drop_last: bool = False
) -> Iterator[Any]:
    """Index arrays of consecutive batches; a last batch of one sample joins the one before
    (BatchNorm needs two values per channel).

    Training uses ``drop_last``: only full batches, as ``DataLoader(drop_last=True)``, so
    that no step takes the full learning rate on a remainder of a few samples (the data are
    reshuffled every epoch, so every sample is still seen).
    """
    order = rng.permutation(n) if rng is not None else np.arange(n)
    starts = list(range(0, n, batch_size))
    if drop_last and n >= batch_size:
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
        return
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        yield order[start:end]


class FanOut(ns.Welford):
    """Training-time statistics of one layer: every tracked strategy is fed each batch.

    It stands in the NumPy layer's ``stats`` during training (a strategy itself, so the
    layer sees a regular one, and refuses a non-finite batch as its ``nan_policy`` says) and
    hands every batch's moments to the tracked estimators. It keeps no statistics of its
    own: those of each tracked strategy are its estimator's, read with :meth:`estimator`.

    The batches are held back and folded :data:`PENDING` at a time
    (:func:`~normstats.estimators.update_stacked_all`, one check and a few dozen operations
    per strategy for all of them), since per-batch updates of four strategies cost the
    small networks' training steps a fifth of their time. Only under Batch
    Renormalization, whose layer reads its reference strategy on every step, is each batch
    folded at once.
    """

    PENDING = 256
    """Training batches held back before they are folded."""

    def __init__(self, names: tuple[str, ...], reference: str | None = None) -> None:
        super().__init__()
        every = names if reference is None or reference in names else (*names, reference)
        self.estimators = {name: strategies.estimator(name) for name in every}
        self._tracked = tuple(self.estimators.values())
        self._pending: list[ns.Moments] = []
        self.reference = reference
        """The tracked strategy whose estimate the layer reads in training (Batch
        Renormalization's running statistics), or None."""

    def estimator(self, name: str) -> Strategy:
        """The tracked strategy ``name``, every batch seen so far folded in."""
        self.fold_pending()
        return self.estimators[name]

    @property
    def mean(self) -> Any:
        return super().mean if self.reference is None else self.estimators[self.reference].mean

    @property
    def var(self) -> Any:
        return super().var if self.reference is None else self.estimators[self.reference].var

    @property
    def num_batches(self) -> int:
        if self.reference is None:
            return super().num_batches
        return self.estimators[self.reference].num_batches

    def update_moments(self, moments: ns.Moments) -> None:
        if self.reference is not None:
            update_moments_all(self._tracked, moments)
            return
        self._pending.append(moments)
        if len(self._pending) == self.PENDING:
            self.fold_pending()

    def update_stacked(self, slots: StackedMoments) -> None:
        """Fold ``K`` stacked batches into every tracked strategy, after those held back."""
        self.fold_pending()
        update_stacked_all(self._tracked, slots)

    def fold_pending(self) -> None:
        """Fold the batches held back into every tracked strategy."""
        if self._pending:
            update_stacked_all(self._tracked, StackedMoments.from_moments(self._pending))
            self._pending = []


class NumpyRun:
    """An MLP or a CNN of the NumPy adapter, the same architectures as the torch backend's."""

    def __init__(
        self,
        data: Dataset,
        model: str,
        seed: int,
        tracked: tuple[str, ...],
        mode: TrainMode = PLAIN,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.mode = mode
        layers: list[Any] = []
        self.norms: list[ns.BatchNorm] = []
        if model == "mlp":
            widths: tuple[int, ...] = (data.X_train.shape[1], *HIDDEN)
            self.sample_shape: tuple[int, ...] = (data.X_train.shape[1],)
            for fan_in, fan_out in itertools.pairwise(widths):
                layers += [Linear(fan_in, fan_out, rng=rng), self._norm(fan_out, tracked), ReLU()]
        elif model == "cnn":
            widths = (data.image_shape[0], *CHANNELS)
            self.sample_shape = data.image_shape
            dims = len(data.image_shape) - 1
            for fan_in, fan_out in itertools.pairwise(widths):
                conv = Conv(fan_in, fan_out, 3, dims=dims, padding=1, rng=rng)
                layers += [conv, self._norm(fan_out, tracked), ReLU()]
            layers.append(GlobalAveragePool())
        else:
            raise ValueError(f"--model: expected 'mlp' or 'cnn', got {model!r}")
        layers.append(Linear(widths[-1], data.num_classes, rng=rng))
        self.model = Sequential(*layers)
        self.data, self.rng = data, rng
        self.X_train = data.X_train.reshape(-1, *self.sample_shape)
        self.fanouts = [norm.stats for norm in self.norms]
        self.optimizer: SGD | None = None

    def _norm(self, features: int, tracked: tuple[str, ...]) -> ns.BatchNorm:
        mode = self.mode
        norm = ns.BatchNorm(
            features,
            stats="welford",
            renorm=mode.reference is not None,
            virtual_batch_size=mode.virtual_batch_size,
        )
        norm.stats = FanOut(tracked, mode.reference)
        self.norms.append(norm)
        return norm

    def train_epochs(self, epochs: int, batch_size: int, lr: float) -> float:
        if self.optimizer is None:
            self.optimizer = SGD(self.model, lr=lr, momentum=0.9)
        X, y = self.X_train, self.data.y_train
        self.model.train()
        losses: list[float] = []
        for _ in range(epochs):
            losses = []
            for index in batches(len(X), batch_size, self.rng, drop_last=True):
                loss, grad = softmax_cross_entropy(self.model.forward(X[index]), y[index])
                losses.append(loss)
                self.model.backward(grad)
                self.optimizer.step()
        return float(np.mean(losses)) if losses else math.nan

    def statistics(self, strategy: str, calibration: list[Any]) -> Statistics | None:
        if strategy == "batch":
            return None
        if strategy in strategies.CALIBRATED:
            for norm in self.norms:
                norm.stats = ns.ExactFullPass()
            recalibrate(self.model, calibration, layerwise=strategy == "exact-layerwise")
            found = [(norm.stats.mean, norm.stats.var) for norm in self.norms if norm.stats]
            self._use(strategy, found)
            return found
        found = []
        for fanout in self.fanouts:
            assert isinstance(fanout, FanOut)
            estimator = fanout.estimator(strategy)
            found.append((np.asarray(estimator.mean), np.asarray(estimator.var)))
        self._use(strategy, found)
        return found

    def _use(self, strategy: str, found: Statistics) -> None:
        self.use(found)

    def use(self, found: Statistics) -> None:
        for norm, (mean, var) in zip(self.norms, found, strict=True):
            norm.stats = _Fixed(mean, var)

    def accuracy(self, strategy: str, X: np.ndarray[Any, Any], batch_size: int) -> float:
        X, y = X.reshape(-1, *self.sample_shape), self.data.y_test
        if strategies.is_test_time(strategy):
            test_batches = [(X[i], y[i]) for i in batches(len(X), batch_size)]
            adapting = strategy == "adapt"
            if adapting:  # recalibrated on the test inputs, into layers that can take it
                for norm in self.norms:
                    norm.stats = ns.ExactFullPass()
            data = [x for x, _ in test_batches] if adapting else None
            with at_test_time(self.model, strategy, data):
                correct = sum(
                    int((self.model.forward(x).argmax(1) == labels).sum())
                    for x, labels in test_batches
                )
            return correct / len(X)
        if strategy == "batch":
            saved = [norm.stats for norm in self.norms]
            for norm in self.norms:
                norm.stats = None
            try:
                self.model.eval()
                correct = sum(
                    int((self.model.forward(X[i]).argmax(1) == y[i]).sum())
                    for i in batches(len(X), batch_size)
                )
            finally:
                for norm, stats in zip(self.norms, saved, strict=True):
                    norm.stats = stats
            return correct / len(X)
        self.model.eval()
        return int((self.model.forward(X).argmax(1) == y).sum()) / len(y)

    def calibration_batches(
        self, batch_size: int, rows: np.ndarray[Any, Any] | None = None
    ) -> list[Any]:
        X = self.X_train if rows is None else self.X_train[rows]
        return [X[i] for i in batches(len(X), batch_size)]

    def restore_training_statistics(self) -> None:
        for norm, fanout in zip(self.norms, self.fanouts, strict=True):
            norm.stats = fanout


class _Fixed(ns.Welford):
    """Given statistics, for evaluation: its ``mean`` and ``var`` are what it was built with."""

    def __init__(self, mean: np.ndarray[Any, Any], var: np.ndarray[Any, Any]) -> None:
        super().__init__()
        self._fixed = (mean, var)

    @property
    def mean(self) -> Any:
        return self._fixed[0]

    @property
    def var(self) -> Any:
        return self._fixed[1]


class TorchRun:
    """An MLP or a CNN of the torch adapter.

    Its BatchNorm layers are ``"exact"`` ones, which train with batch statistics and keep
    nothing; a forward pre-hook keeps every training batch's input, and every
    :data:`FanOut.PENDING` steps (or :data:`PENDING_VALUES` values) and at the end of
    training the held inputs are reduced at once (the core's float64 reduction, one per
    layer for all of them) and folded into the tracked strategies on the host, where the
    small per-channel updates are cheapest. Evaluating a strategy writes its statistics into
    the layers as a calibration.
    """

    PENDING_VALUES = 1 << 22
    """Most input values a layer's hook holds back (32 MiB of float64 when reduced)."""

    def __init__(
        self,
        data: Dataset,
        model: str,
        seed: int,
        tracked: tuple[str, ...],
        mode: TrainMode = PLAIN,
    ) -> None:
        import torch

        from ..torch import BatchNorm

        torch.manual_seed(seed)
        self.torch = torch
        self.model = _torch_model(data, model, mode)
        self.trained: list[dict[str, Any]] = []
        """The layers' state dicts at the end of training (a renorm layer's strategy is its
        training state, which evaluating other strategies overwrites)."""
        self.norms = [m for m in self.model.modules() if isinstance(m, BatchNorm)]
        self.data = data
        self.generator = torch.Generator().manual_seed(seed)
        shape = data.image_shape if model == "cnn" else (data.X_train.shape[1],)
        self.sample_shape = shape
        self.X_train = torch.as_tensor(data.X_train, dtype=torch.float32).reshape(-1, *shape)
        self.y_train = torch.as_tensor(data.y_train)
        self.y_test = torch.as_tensor(data.y_test)
        self.fanouts = [FanOut(tracked) for _ in self.norms]
        self.inputs: list[list[Any]] = [[] for _ in self.norms]
        """Each layer's training inputs not folded into its tracked strategies yet."""
        self.tracking = True
        for layer, norm in enumerate(self.norms):
            norm.register_forward_pre_hook(self._tracker(layer))
        self.optimizer: TorchSGD | None = None

    def _tracker(self, layer: int) -> Any:
        def track(module: Any, args: Any) -> None:
            if self.tracking and module.training and not module.calibrating:
                x, held = args[0].detach(), self.inputs[layer]
                if held and held[0].shape != x.shape:  # batches stack only if equal
                    self._fold_inputs(layer)
                held.append(x)
                if len(held) == FanOut.PENDING or len(held) * x.numel() >= self.PENDING_VALUES:
                    self._fold_inputs(layer)

        return track

    def _fold_inputs(self, layer: int) -> None:
        """Reduce the inputs ``layer`` holds, all at once, into its tracked strategies."""
        held = self.inputs[layer]
        if not held:
            return
        x = self.torch.stack(held).cpu().numpy()
        axes = tuple(d for d in range(x.ndim - 1) if d != 1)  # each batch's, but channels
        self.fanouts[layer].update_stacked(StackedMoments.from_batches(x, axis=axes))
        held.clear()

    def train_epochs(self, epochs: int, batch_size: int, lr: float) -> float:
        torch = self.torch
        if self.optimizer is None:
            self.optimizer = TorchSGD(list(self.model.parameters()), lr=lr, momentum=0.9)
        self.model.train()
        n = len(self.X_train)
        losses: list[Any] = []
        for _ in range(epochs):
            losses = []
            order = torch.randperm(n, generator=self.generator).numpy()
            for index in batches(n, batch_size, None, drop_last=True):
                rows = torch.as_tensor(order[index])
                loss = torch.nn.functional.cross_entropy(
                    self.model(self.X_train[rows]), self.y_train[rows]
                )
                losses.append(loss.detach())
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
        for layer in range(len(self.norms)):
            self._fold_inputs(layer)
        self.trained = [copy.deepcopy(norm.state_dict()) for norm in self.norms]
        return float(torch.stack(losses).double().mean()) if losses else math.nan

    def statistics(self, strategy: str, calibration: list[Any]) -> Statistics | None:
        if strategy == "batch":
            return None
        if strategy in strategies.CALIBRATED:
            from ..torch import recalibrate as recalibrate_torch

            recalibrate_torch(self.model, calibration, layerwise=strategy == "exact-layerwise")
            return [
                tuple(t.cpu().numpy() for t in norm.population_statistics())  # type: ignore[misc]
                for norm in self.norms
            ]
        found: Statistics = []
        for fanout in self.fanouts:
            estimator = fanout.estimator(strategy)
            found.append((np.asarray(estimator.mean), np.asarray(estimator.var)))
        self.use(found)
        return found

    def use(self, found: Statistics) -> None:
        for norm, (mean, var) in zip(self.norms, found, strict=True):
            count = 2  # any count: the layer's estimate is the mean and var given
            norm.load_calibration(ns.Moments(count, mean, var * (count - 1)))

    def accuracy(self, strategy: str, X: np.ndarray[Any, Any], batch_size: int) -> float:
        torch = self.torch
        X = torch.as_tensor(X, dtype=torch.float32).reshape(-1, *self.sample_shape)
        y = self.y_test
        with torch.no_grad():
            if strategies.is_test_time(strategy):
                from ..torch import at_test_time as at_test_time_torch

                test_batches = [(X[i], y[i]) for i in batches(len(X), batch_size)]
                data = [x for x, _ in test_batches] if strategy == "adapt" else None
                self.tracking = False
                try:
                    with at_test_time_torch(self.model, strategy, data):
                        correct = sum(
                            int((self.model(x).argmax(1) == labels).sum())
                            for x, labels in test_batches
                        )
                finally:
                    self.tracking = True
                return correct / len(X)
            if strategy == "batch":  # test batches normalized with their own statistics
                self.model.eval()
                self.tracking = False
                # plain batch statistics, whatever the training mode, and nothing tracked
                modes = [
                    (n.renorm, n.virtual_batch_size, n.track_running_stats) for n in self.norms
                ]
                for norm in self.norms:
                    norm.train()
                    norm.renorm, norm.virtual_batch_size, norm.track_running_stats = (
                        False,
                        None,
                        False,
                    )
                try:
                    correct = sum(
                        int((self.model(X[i]).argmax(1) == y[i]).sum())
                        for i in batches(len(X), batch_size)
                    )
                finally:
                    self.tracking = True
                    for norm, (renorm, virtual, track) in zip(self.norms, modes, strict=True):
                        norm.renorm, norm.virtual_batch_size, norm.track_running_stats = (
                            renorm,
                            virtual,
                            track,
                        )
                return correct / len(X)
            self.model.eval()
            return int((self.model(X).argmax(1) == y).sum()) / len(y)

    def calibration_batches(
        self, batch_size: int, rows: np.ndarray[Any, Any] | None = None
    ) -> list[Any]:
        X = self.X_train if rows is None else self.X_train[rows]
        return [X[i] for i in batches(len(X), batch_size)]

    def restore_training_statistics(self) -> None:
        """The layers' state at the end of training (the tracked strategies live beside
        them; a renorm layer's own running estimate is restored for training on)."""
        for norm, state in zip(self.norms, self.trained, strict=True):
            norm.load_state_dict(state)


class TorchSGD:
    """``torch.optim.SGD(parameters, lr, momentum)``'s update on CPU, written out with the
    same in-place operations, so that it takes bitwise the same steps.

    The optimizer's wrapper around them (a profiler record, grad-mode switches, hooks and,
    at its first construction in a process, the import of ``torch._dynamo``, about 1.3 s)
    costs these small networks more than the update itself: a quarter of a step at batch
    size 2.
    """

    def __init__(self, parameters: list[Any], lr: float, momentum: float) -> None:
        self.parameters, self.lr, self.momentum = parameters, lr, momentum
        self.velocity: list[Any] = [None] * len(parameters)

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    def step(self) -> None:
        import torch

        with torch.no_grad():
            for i, parameter in enumerate(self.parameters):
                grad = parameter.grad
                if grad is None:
                    continue
                velocity = self.velocity[i]
                if velocity is None:
                    velocity = self.velocity[i] = grad.detach().clone()
                else:
                    velocity.mul_(self.momentum).add_(grad, alpha=1)
                parameter.add_(velocity, alpha=-self.lr)


def _torch_model(data: Dataset, model: str, mode: TrainMode) -> Any:
    from torch import nn

    from ..torch import BatchNorm

    def norm(features: int) -> nn.Module:
        """An "exact" layer, which keeps nothing in training (the strategies are tracked
        beside it); under renorm one that keeps the running estimate it corrects towards."""
        if mode.reference is not None:
            reference = strategies.estimator(mode.reference)
            return BatchNorm(features, stats=reference, renorm=True)
        return BatchNorm(features, stats="exact", virtual_batch_size=mode.virtual_batch_size)

    if model == "mlp":
        widths = (data.X_train.shape[1], *HIDDEN)
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(widths):
            layers += [nn.Linear(fan_in, fan_out), norm(fan_out), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(widths[-1], data.num_classes))
    if model != "cnn":
        raise ValueError(f"--model: expected 'mlp' or 'cnn', got {model!r}")
    channels, *spatial = data.image_shape
    conv = nn.Conv1d if len(spatial) == 1 else nn.Conv2d
    pool = nn.AdaptiveAvgPool1d if len(spatial) == 1 else nn.AdaptiveAvgPool2d
    channel_widths = (channels, *CHANNELS)
    layers = []
    for fan_in, fan_out in itertools.pairwise(channel_widths):
        layers += [
            conv(fan_in, fan_out, 3, padding=1),
            norm(fan_out),
            nn.ReLU(),
        ]
    return nn.Sequential(
        *layers, pool(1), nn.Flatten(), nn.Linear(channel_widths[-1], data.num_classes)
    )
