import pytest
import torch
import torchvision

from mrcnn_fast import ops


def _boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 1000
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 200 + 1], 1)


A, B = _boxes(1000, 0), _boxes(1000, 1)


@pytest.mark.benchmark(group="box_iou: 1000x1000")
def test_box_iou_mrcnn_fast(bench):
    torch.testing.assert_close(ops.box_iou(A, B), torchvision.ops.box_iou(A, B))
    bench(ops.box_iou, A, B)


@pytest.mark.benchmark(group="box_iou: 1000x1000")
def test_box_iou_torchvision(bench):
    bench(torchvision.ops.box_iou, A, B)
