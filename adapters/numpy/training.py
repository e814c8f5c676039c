"""Loss, optimizer and the loops that train and evaluate a NumPy model."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from normstats.typing import Array

from .layers import Layer


def softmax_cross_entropy(logits: Array, labels: Array) -> tuple[float, Array]:
    r"""Mean cross-entropy of softmax(``logits``) against integer ``labels``, and its gradient.

    .. math::

        L = -\frac{1}{N}\sum_i \log \operatorname{softmax}(z_i)_{y_i},\qquad
        \frac{\partial L}{\partial z_i} = \frac{\operatorname{softmax}(z_i) - e_{y_i}}{N}

    computed with the log-sum-exp shift, so large logits do not overflow.

    >>> import numpy as np
    >>> loss, grad = softmax_cross_entropy(np.zeros((2, 4)), np.array([0, 3]))
    >>> round(loss, 6), grad.shape
    (1.386294, (2, 4))
    """
    if logits.ndim != 2:
        raise ValueError(f"logits: expected shape (N, classes), got {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(
            f"labels: expected shape ({logits.shape[0]},) to match logits, "
            f"got {tuple(labels.shape)}"
        )
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(logits.shape[0])
    loss = -float(log_probs[rows, labels].mean())
    grad = np.exp(log_probs)
    grad[rows, labels] -= 1.0
    return loss, grad / logits.shape[0]


class SGD:
    r"""Stochastic gradient descent with momentum (PyTorch's form).

    .. math:: v \leftarrow \mu v + g + \lambda w,\qquad w \leftarrow w - \eta v

    Parameters
    ----------
    model : Layer
        Whose ``parameters()`` are updated in place by :meth:`step`.
    lr : float
        Learning rate :math:`\eta`.
    momentum : float
        :math:`\mu`, 0 for plain SGD.
    weight_decay : float
        :math:`\lambda`, L2 penalty.
    """

    def __init__(
        self, model: Layer, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"{name}: expected a non-negative number, got {value!r}")
        self.model = model
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self._velocity: list[Array] | None = None

    def step(self) -> None:
        """Move every parameter against its gradient."""
        parameters = self.model.parameters()
        if self._velocity is None:
            self._velocity = [np.zeros_like(value) for value, _ in parameters]
        for (value, grad), velocity in zip(parameters, self._velocity, strict=True):
            step = grad + self.weight_decay * value if self.weight_decay else grad
            if self.momentum:
                velocity *= self.momentum
                velocity += step
                step = velocity
            value -= self.lr * step


def minibatches(
    n: int, batch_size: int, rng: np.random.Generator | None = None, min_size: int = 1
) -> Iterator[Array]:
    """Index arrays of consecutive batches (shuffled by ``rng``); a last batch smaller than
    ``min_size`` is dropped (BatchNorm cannot train on one sample)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        indices = order[start : start + batch_size]
        if len(indices) >= min_size:
            yield indices


def fit(
    model: Layer,
    X: Array,
    y: Array,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int | None = 0,
) -> list[float]:
    """Train ``model`` with softmax cross-entropy and SGD; return the mean loss per epoch.

    Batches are reshuffled every epoch from ``seed``; a last batch of one sample is dropped.
    """
    if len(X) != len(y):
        raise ValueError(f"y: expected {len(X)} labels, one per row of X, got {len(y)}")
    rng = np.random.default_rng(seed)
    optimizer = SGD(model, lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    history = []
    for _ in range(epochs):
        losses = []
        for indices in minibatches(len(X), batch_size, rng, min_size=2):
            loss, grad = softmax_cross_entropy(model.forward(X[indices]), y[indices])
            model.backward(grad)
            optimizer.step()
            losses.append(loss)
        history.append(float(np.mean(losses)))
    return history


def evaluate(model: Layer, X: Array, y: Array, *, batch_size: int = 512) -> float:
    """Accuracy of ``model`` in evaluation mode; the model's mode is restored afterwards."""
    was_training = model.training
    model.train(False)
    try:
        correct = 0
        for indices in minibatches(len(X), batch_size):
            correct += int((model.forward(X[indices]).argmax(axis=1) == y[indices]).sum())
    finally:
        model.train(was_training)
    return correct / len(X)


__all__ = ["SGD", "evaluate", "fit", "minibatches", "softmax_cross_entropy"]
