"""CPU bfloat16 autocast (solver.cpu_autocast): the pooling and proposal ops take bfloat16 features in
float32 inside autocast, give the float32 result of the upcast input, send gradients back in bfloat16, and
still reject bfloat16 outside autocast."""
import pytest
import torch

from mrcnn_fast import ops


def _features(seed=0, shape=(2, 3, 24, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(torch.bfloat16).requires_grad_()


ROIS = torch.tensor([[0, 1.0, 2.0, 20.0, 15.0], [1, 4.5, 3.25, 30.0, 22.0], [0, 0.0, 0.0, 8.0, 9.0]])


def _check_pool(fn):
    x = _features()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fn(x)
    assert y.dtype == torch.float32
    x32 = x.detach().float().requires_grad_()
    y32 = fn(x32)
    assert torch.equal(y, y32)
    g = torch.randn_like(y32)
    y.backward(g)
    y32.backward(g)
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, x32.grad.to(torch.bfloat16))
    with pytest.raises(TypeError, match="bfloat16"):
        fn(x.detach())


def test_roi_align_under_cpu_autocast():
    _check_pool(lambda x: ops.roi_align(x, ROIS, (5, 4), 0.5, 2, True))


def test_roi_warp_under_cpu_autocast():
    _check_pool(lambda x: ops.roi_warp(x, ROIS, (5, 4), 0.5, 2))


def test_roi_pool_under_cpu_autocast():
    _check_pool(lambda x: ops.roi_pool(x, ROIS, (3, 3), 0.5))


def test_multilevel_roi_align_under_cpu_autocast():
    x0 = _features(1, (2, 3, 32, 32))
    x1 = _features(2, (2, 3, 16, 16))
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 15.0], [1, 0.0, 0.0, 120.0, 110.0]])

    def run(fs):
        return ops.multilevel_roi_align(fs, rois, 4, [0.25, 0.125], 2, True, canonical_level=3, canonical_scale=32)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run([x0, x1])
    f32 = [x0.detach().float(), x1.detach().float()]
    assert y.dtype == torch.float32 and torch.equal(y, run(f32))
    y.sum().backward()
    assert x0.grad.dtype == torch.bfloat16 and x1.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="bfloat16"):
        run([x0.detach(), x1.detach()])


def test_generate_proposals_under_cpu_autocast():
    g = torch.Generator().manual_seed(3)
    anchors = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 8.0, 40.0, 30.0], [20.0, 4.0, 60.0, 50.0]])]
    obj = [torch.randn(1, 3, generator=g).to(torch.bfloat16)]
    deltas = [(0.1 * torch.randn(1, 3, 4, generator=g)).to(torch.bfloat16)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        boxes, scores, counts = ops.generate_proposals(obj, deltas, anchors, [(64, 64)], 10, 10, 0.7)
    ref = ops.generate_proposals([obj[0].float()], [deltas[0].float()], anchors, [(64, 64)], 10, 10, 0.7)
    assert boxes.dtype == torch.float32
    assert torch.equal(boxes, ref[0]) and torch.equal(scores, ref[1]) and torch.equal(counts, ref[2])
    with pytest.raises(TypeError, match="bfloat16"):
        ops.generate_proposals(obj, deltas, anchors, [(64, 64)], 10, 10, 0.7)
