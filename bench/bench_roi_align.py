"""RoIAlign vs torchvision on Mask R-CNN sizes (CPU unless a CUDA device is present).

Single level: 2 x 256 x 200 x 336 features (P2 of an 800 x 1344 batch), 1000 RoIs, 7 x 7, sampling_ratio 2,
aligned. Multi-level: 5 levels (P2-P6) of two 800 x 1333 images, 1000 RoIs, torchvision MultiScaleRoIAlign.
RoIs look like proposals: log-uniform sizes 16-512 px, uniform positions.
"""
import pytest
import torch
import torchvision

from mrcnn_fast import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, C, K = 2, 256, 1000


def _boxes(n, image_hw, seed):
    g = torch.Generator().manual_seed(seed)
    H, W = image_hw
    wh = torch.exp(torch.empty(n, 2).uniform_(2.7726, 6.2383, generator=g))  # log(16), log(512)
    xy = torch.rand(n, 2, generator=g) * (torch.tensor([W, H], dtype=torch.float32) - wh)
    return torch.cat([xy, xy + wh], 1)


def _rois(seed=0):
    b = _boxes(K, (800, 1344), seed)
    idx = (torch.arange(K) % N).float()[:, None]
    return torch.cat([idx, b], 1).to(DEVICE)


X = torch.randn(N, C, 200, 336, generator=torch.Generator().manual_seed(1)).to(DEVICE)
ROIS = _rois()
GRAD = torch.randn(K, C, 7, 7, generator=torch.Generator().manual_seed(2)).to(DEVICE)
ARGS = (7, 0.25, 2, True)

LEVELS = {str(i): torch.randn(N, C, -(-800 // 2 ** (i + 2)), -(-1344 // 2 ** (i + 2)),
                              generator=torch.Generator().manual_seed(3 + i)).to(DEVICE) for i in range(5)}
BOXES = [_boxes(K // N, (800, 1333), 10 + i).to(DEVICE) for i in range(N)]
SHAPES = [(800, 1333)] * N
NAMES = list(LEVELS)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _fwd(fn):
    def run():
        out = fn(X, ROIS, *ARGS)
        _sync()
        return out
    return run


def _fwd_bwd(fn):
    x = X.clone().requires_grad_()

    def run():
        x.grad = None
        fn(x, ROIS, *ARGS).backward(GRAD)
        _sync()
        return x.grad
    return run


def _ms(module):
    def run():
        out = module(LEVELS, BOXES, SHAPES)
        _sync()
        return out
    return run


def _ms_fwd_bwd(module):
    feats = {k: v.clone().requires_grad_() for k, v in LEVELS.items()}

    def run():
        for v in feats.values():
            v.grad = None
        module(feats, BOXES, SHAPES).backward(GRAD)
        _sync()
        return [v.grad for v in feats.values()]
    return run


FWD = "roi_align fwd: 2x256x200x336, 1000 RoIs, 7x7, sr 2, aligned"
FWD_BWD = "roi_align fwd+bwd: 2x256x200x336, 1000 RoIs, 7x7, sr 2, aligned"
MS = "multiscale_roi_align fwd: 5 levels of 2x800x1333, 1000 RoIs, 7x7, sr 2"
MS_BWD = "multiscale_roi_align fwd+bwd: 5 levels of 2x800x1333, 1000 RoIs, 7x7, sr 2"


@pytest.mark.benchmark(group=FWD)
def test_roi_align_fwd_mrcnn_fast(bench):
    torch.testing.assert_close(_fwd(ops.roi_align)(), _fwd(torchvision.ops.roi_align)())
    bench(_fwd(ops.roi_align))


@pytest.mark.benchmark(group=FWD)
def test_roi_align_fwd_torchvision(bench):
    bench(_fwd(torchvision.ops.roi_align))


@pytest.mark.benchmark(group=FWD_BWD)
def test_roi_align_fwd_bwd_mrcnn_fast(bench):
    torch.testing.assert_close(_fwd_bwd(ops.roi_align)(), _fwd_bwd(torchvision.ops.roi_align)(), rtol=1e-4, atol=1e-4)
    bench(_fwd_bwd(ops.roi_align))


@pytest.mark.benchmark(group=FWD_BWD)
def test_roi_align_fwd_bwd_torchvision(bench):
    bench(_fwd_bwd(torchvision.ops.roi_align))


@pytest.mark.benchmark(group=MS)
def test_multiscale_fwd_mrcnn_fast(bench):
    ours, theirs = ops.MultiScaleRoIAlign(NAMES, 7, 2), torchvision.ops.MultiScaleRoIAlign(NAMES, 7, 2)
    torch.testing.assert_close(_ms(ours)(), _ms(theirs)())
    bench(_ms(ours))


@pytest.mark.benchmark(group=MS)
def test_multiscale_fwd_torchvision(bench):
    bench(_ms(torchvision.ops.MultiScaleRoIAlign(NAMES, 7, 2)))


@pytest.mark.benchmark(group=MS_BWD)
def test_multiscale_fwd_bwd_mrcnn_fast(bench):
    ours, theirs = ops.MultiScaleRoIAlign(NAMES, 7, 2), torchvision.ops.MultiScaleRoIAlign(NAMES, 7, 2)
    for a, b in zip(_ms_fwd_bwd(ours)(), _ms_fwd_bwd(theirs)()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    bench(_ms_fwd_bwd(ours))


@pytest.mark.benchmark(group=MS_BWD)
def test_multiscale_fwd_bwd_torchvision(bench):
    bench(_ms_fwd_bwd(torchvision.ops.MultiScaleRoIAlign(NAMES, 7, 2)))
