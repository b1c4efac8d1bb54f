import pytest
import torch
import torchvision

from conftest import rand_boxes
from mrcnn_fast import ops


def ref_iou(a, b):
    a, b = a.double(), b.double()
    out = torch.empty(len(a), len(b), dtype=torch.float64)
    for i in range(len(a)):
        for j in range(len(b)):
            w = max(0.0, min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]))
            h = max(0.0, min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]))
            inter = w * h
            ua = (a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1]) + (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1]) - inter
            out[i, j] = inter / ua
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_iou_matches_reference_and_torchvision(device, dtype):
    g = torch.Generator().manual_seed(0)
    a = rand_boxes(37, dtype=dtype, device=device, generator=g)
    b = rand_boxes(53, dtype=dtype, device=device, generator=g)
    got = ops.box_iou(a, b)
    assert got.shape == (37, 53) and got.dtype == dtype and got.device == a.device
    torch.testing.assert_close(got.cpu().double(), ref_iou(a.cpu(), b.cpu()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, torchvision.ops.box_iou(a, b))


def test_box_iou_empty(device):
    a = torch.zeros(0, 4, device=device)
    b = rand_boxes(5, device=device)
    assert ops.box_iou(a, b).shape == (0, 5)
    assert ops.box_iou(b, a).shape == (5, 0)


def test_box_iou_bad_input():
    b = rand_boxes(3)
    with pytest.raises(ValueError, match="boxes1"):
        ops.box_iou(b[:, :3], b)
    with pytest.raises(TypeError, match="boxes2"):
        ops.box_iou(b, b.long())
    with pytest.raises(TypeError, match="same dtype"):
        ops.box_iou(b, b.double())
    with pytest.raises(TypeError, match="boxes1"):
        ops.box_iou([[0, 0, 1, 1]], b)


def test_box_iou_opcheck():
    a, b = rand_boxes(4), rand_boxes(6)
    torch.library.opcheck(torch.ops.mrcnn_fast.box_iou.default, (a, b))
