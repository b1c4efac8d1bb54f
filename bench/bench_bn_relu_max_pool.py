"""Batch norm + ReLU + 3x3/2 max pool (the ResNet stem after conv1): ops.batch_norm_relu_max_pool against the
three torch ops torchvision's ResNet runs there (nn.BatchNorm2d, ReLU, MaxPool2d), channels-last.

Cases: the small_cpu training batch (4x64x128x128, training-mode batch norm, forward + backward) and an
800x1344 batch of 2 at inference (2x64x400x672, running statistics, forward only).
MRCNN_BENCH_DEVICE containing "cuda" runs on the GPU (timings include a synchronize)."""
import os

import pytest
import torch
import torch.nn.functional as F

from mrcnn_fast import ops

DEVICE = torch.device("cuda" if "cuda" in os.environ.get("MRCNN_BENCH_DEVICE", "").lower() else "cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(c, generator=g).to(DEVICE) + 0.5, torch.randn(c, generator=g).to(DEVICE)
    return x, w, b, torch.randn(c, generator=g).to(DEVICE), torch.rand(c, generator=g).to(DEVICE) + 0.5


TRAIN = _inputs((4, 64, 128, 128), 0)
INFER = _inputs((2, 64, 400, 672), 1)


def fused(x, w, b, rm, rv, training):
    return ops.batch_norm_relu_max_pool(x, w, b, rm, rv, training=training)


def torch_ops(x, w, b, rm, rv, training):
    return F.relu(F.max_pool2d(F.batch_norm(x, rm, rv, w, b, training), 3, 2, 1))


def _train_step(fn):
    x, w, b, rm, rv = TRAIN
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rm, rv = rm.clone(), rv.clone()
    grad = torch.randn(4, 64, 64, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run():
        x.grad = w.grad = b.grad = None
        fn(x, w, b, rm, rv, True).backward(grad)
        _sync()
        return x.grad, w.grad, b.grad
    return run


def _infer(fn):
    def run():
        out = fn(*INFER, False)
        _sync()
        return out
    return run


@pytest.mark.benchmark(group="bn_relu_max_pool train fwd+bwd: 4x64x128x128 channels_last")
def test_bn_relu_max_pool_train_mrcnn_fast(bench):
    torch.testing.assert_close(_train_step(fused)(), _train_step(torch_ops)(), rtol=1e-4, atol=1e-4)
    bench(_train_step(fused))


@pytest.mark.benchmark(group="bn_relu_max_pool train fwd+bwd: 4x64x128x128 channels_last")
def test_bn_relu_max_pool_train_torchvision(bench):
    bench(_train_step(torch_ops))


@pytest.mark.benchmark(group="bn_relu_max_pool infer fwd: 2x64x400x672 channels_last")
def test_bn_relu_max_pool_infer_mrcnn_fast(bench):
    torch.testing.assert_close(_infer(fused)(), _infer(torch_ops)(), rtol=1e-5, atol=1e-5)
    bench(_infer(fused))


@pytest.mark.benchmark(group="bn_relu_max_pool infer fwd: 2x64x400x672 channels_last")
def test_bn_relu_max_pool_infer_torchvision(bench):
    bench(_infer(torch_ops))
