"""Conv and GlobalAveragePool of the NumPy kit against torch's conv1d/conv2d and autograd."""

from __future__ import annotations

import numpy as np
import pytest

from normstats.adapters.numpy import (
    BatchNorm,
    Conv,
    GlobalAveragePool,
    Linear,
    ReLU,
    Sequential,
    softmax_cross_entropy,
)

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(
    ("dims", "shape"), [(1, (3, 2, 9)), (2, (3, 2, 6, 5))], ids=["conv1d", "conv2d"]
)
@pytest.mark.parametrize(("kernel", "padding"), [(3, 1), (3, 0), (1, 0), (5, 2)])
def test_conv_forward_and_gradients_equal_torch(dims, shape, kernel, padding):
    rng = np.random.default_rng(0)
    conv = Conv(shape[1], 4, kernel, dims=dims, padding=padding, rng=1)
    x = rng.normal(size=shape)
    y = conv(x)
    dy = rng.normal(size=y.shape)
    dx = conv.backward(dy)

    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(conv.weight, requires_grad=True)
    bt = torch.tensor(conv.bias, requires_grad=True)
    op = torch.nn.functional.conv1d if dims == 1 else torch.nn.functional.conv2d
    yt = op(xt, wt, bt, padding=padding)
    yt.backward(torch.tensor(dy))

    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv.grad_weight, wt.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(conv.grad_bias, bt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_global_average_pool_equals_the_spatial_mean_and_its_gradient():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 5, 6))
    pool = GlobalAveragePool()
    z = pool(x)
    dz = rng.normal(size=z.shape)
    xt = torch.tensor(x, requires_grad=True)
    zt = xt.mean(dim=(2, 3))
    zt.backward(torch.tensor(dz))
    np.testing.assert_allclose(z, zt.detach().numpy(), rtol=1e-14)
    np.testing.assert_allclose(pool.backward(dz), xt.grad.numpy(), rtol=1e-14)


def test_a_small_cnn_with_batchnorm_matches_torch_end_to_end():
    """Conv -> BatchNorm(N, C, H, W) -> ReLU -> pool -> Linear: loss and every gradient."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 1, 8, 8))
    labels = rng.integers(0, 3, size=6)
    conv, norm, head = Conv(1, 4, 3, padding=1, rng=3), BatchNorm(4), Linear(4, 3, rng=4)
    model = Sequential(conv, norm, ReLU(), GlobalAveragePool(), head)
    loss, grad = softmax_cross_entropy(model(x), labels)
    model.backward(grad)

    wt = torch.tensor(conv.weight, requires_grad=True)
    bt = torch.tensor(conv.bias, requires_grad=True)
    gamma = torch.tensor(norm.gamma, requires_grad=True)
    beta = torch.tensor(norm.beta, requires_grad=True)
    lw = torch.tensor(head.weight, requires_grad=True)
    lb = torch.tensor(head.bias, requires_grad=True)
    h = torch.nn.functional.conv2d(torch.tensor(x), wt, bt, padding=1)
    h = torch.nn.functional.batch_norm(h, None, None, gamma, beta, training=True, eps=1e-5)
    logits = torch.relu(h).mean(dim=(2, 3)) @ lw + lb
    loss_t = torch.nn.functional.cross_entropy(logits, torch.tensor(labels))
    loss_t.backward()

    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    for ours, theirs in [
        (conv.grad_weight, wt),
        (conv.grad_bias, bt),
        (norm.grad_gamma, gamma),
        (norm.grad_beta, beta),
        (head.grad_weight, lw),
        (head.grad_bias, lb),
    ]:
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_conv_bad_input_and_arguments_name_the_parameter():
    conv = Conv(2, 3, 3, dims=2, rng=0)
    with pytest.raises(ValueError, match=r"x: expected shape \(N, 2"):
        conv(np.ones((4, 3, 5, 5)))
    with pytest.raises(ValueError, match="x: expected"):
        conv(np.ones((4, 2, 5)))
    with pytest.raises(ValueError, match="dy: expected a preceding forward"):
        Conv(2, 3, 3, rng=0).backward(np.ones((1, 3, 3, 3)))
    with pytest.raises(ValueError, match="dims"):
        Conv(2, 3, 3, dims=3)
    with pytest.raises(TypeError, match="kernel_size"):
        Conv(2, 3, "3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="padding"):
        Conv(2, 3, 3, padding=-1)


def test_conv_in_eval_mode_keeps_no_cache():
    conv = Conv(1, 2, 3, padding=1, rng=0).eval()
    conv(np.ones((2, 1, 4, 4)))
    with pytest.raises(ValueError, match="dy"):
        conv.backward(np.ones((2, 2, 4, 4)))
