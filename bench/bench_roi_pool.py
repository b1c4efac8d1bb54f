"""RoIPool: 2x256x200x336 features (an 800x1344 batch at stride 4), 1000 RoIs, 7x7 bins.

MRCNN_BENCH_DEVICE containing "cuda" runs on the GPU (timings include a synchronize)."""
import os

import pytest
import torch
import torchvision

from mrcnn_fast import ops

DEVICE = torch.device("cuda" if "cuda" in os.environ.get("MRCNN_BENCH_DEVICE", "").lower() else "cpu")
SCALE = 0.25


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _rois(k, seed):
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(k, 2, generator=g) * 224 + 32  # 32..256 px boxes, like RPN proposals
    xy = torch.rand(k, 2, generator=g) * (torch.tensor([1344.0, 800.0]) - wh)
    idx = torch.randint(0, 2, (k, 1), generator=g).float()
    return torch.cat([idx, xy, xy + wh], 1).to(DEVICE)


X = torch.randn(2, 256, 200, 336, generator=torch.Generator().manual_seed(0)).to(DEVICE)
X_CL = X.contiguous(memory_format=torch.channels_last)
ROIS = _rois(1000, 1)
GRAD = torch.randn(1000, 256, 7, 7, generator=torch.Generator().manual_seed(2)).to(DEVICE)


def _forward(fn, x):
    def run():
        out = fn(x, ROIS, 7, SCALE)
        _sync()
        return out
    return run


def _forward_backward(fn, x):
    x = x.detach().clone().requires_grad_()

    def run():
        x.grad = None
        fn(x, ROIS, 7, SCALE).backward(GRAD)
        _sync()
        return x.grad
    return run


def _check(ours, theirs):
    torch.testing.assert_close(ours(), theirs(), rtol=1e-5, atol=1e-5)


@pytest.mark.benchmark(group="roi_pool fwd: 2x256x200x336, 1000 RoIs, 7x7")
def test_roi_pool_fwd_mrcnn_fast(bench):
    _check(_forward(ops.roi_pool, X), _forward(torchvision.ops.roi_pool, X))
    bench(_forward(ops.roi_pool, X))


@pytest.mark.benchmark(group="roi_pool fwd: 2x256x200x336, 1000 RoIs, 7x7")
def test_roi_pool_fwd_torchvision(bench):
    bench(_forward(torchvision.ops.roi_pool, X))


@pytest.mark.benchmark(group="roi_pool fwd channels_last: 2x256x200x336, 1000 RoIs, 7x7")
def test_roi_pool_fwd_cl_mrcnn_fast(bench):
    _check(_forward(ops.roi_pool, X_CL), _forward(torchvision.ops.roi_pool, X_CL))
    bench(_forward(ops.roi_pool, X_CL))


@pytest.mark.benchmark(group="roi_pool fwd channels_last: 2x256x200x336, 1000 RoIs, 7x7")
def test_roi_pool_fwd_cl_torchvision(bench):
    bench(_forward(torchvision.ops.roi_pool, X_CL))


@pytest.mark.benchmark(group="roi_pool fwd+bwd: 2x256x200x336, 1000 RoIs, 7x7")
def test_roi_pool_fwd_bwd_mrcnn_fast(bench):
    _check(_forward_backward(ops.roi_pool, X), _forward_backward(torchvision.ops.roi_pool, X))
    bench(_forward_backward(ops.roi_pool, X))


@pytest.mark.benchmark(group="roi_pool fwd+bwd: 2x256x200x336, 1000 RoIs, 7x7")
def test_roi_pool_fwd_bwd_torchvision(bench):
    bench(_forward_backward(torchvision.ops.roi_pool, X))
